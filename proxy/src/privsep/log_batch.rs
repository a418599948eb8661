//! The worker's log writer: its lines reach the gate in batches, one pipe
//! write (and so one wake-up of the gate's relay) per [`BATCH_DELAY`]
//! instead of one per connection's access line. Warnings and errors go at
//! once, with whatever waited before them, so that order is kept.
//!
//! The pipe is non-blocking (`daemon::worker_log`): when the gate does not
//! read, lines wait here up to [`MAX_PENDING`] bytes, then are dropped and
//! counted, never waited for.

use std::{io, os::fd::AsFd as _, sync::Mutex, time::Duration};

use tokio::sync::Notify;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait for the rest of its batch.
pub const BATCH_DELAY: Duration = Duration::from_millis(50);
/// A batch this large goes at once, well within a pipe's 64 KiB.
const BATCH_BYTES: usize = 16 * 1024;
/// What waits for a gate that does not read; later lines are dropped.
const MAX_PENDING: usize = 1024 * 1024;

/// The worker's log: give `&LOG` to the subscriber as its writer, run
/// [`BatchedLog::send_batches`] on the worker's runtime, and
/// [`BatchedLog::flush_at_exit`] before the process ends.
pub static LOG: BatchedLog = BatchedLog::new(Sink::Stdout);

pub struct BatchedLog {
    pending: Mutex<Pending>,
    /// Signalled when a batch starts.
    started: Notify,
    sink: Sink,
}

/// Where batches are written.
enum Sink {
    Stdout,
    #[cfg(test)]
    Pipe(std::os::fd::OwnedFd),
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Lines dropped since the last write, for a line that says so.
    dropped: u64,
}

impl BatchedLog {
    const fn new(sink: Sink) -> Self {
        Self {
            pending: Mutex::new(Pending { bytes: Vec::new(), dropped: 0 }),
            started: Notify::const_new(),
            sink,
        }
    }

    /// Writes each batch [`BATCH_DELAY`] after its first line; runs until
    /// the runtime stops.
    pub async fn send_batches(&self) {
        loop {
            self.started.notified().await;
            // A batch the pipe could not take whole is tried again later.
            loop {
                tokio::time::sleep(BATCH_DELAY).await;
                if self.flush() {
                    break;
                }
            }
        }
    }

    /// Writes what waits, as far as the pipe takes it now; true when
    /// nothing is left.
    pub fn flush(&self) -> bool {
        let mut pending = self.lock();
        self.write_out(&mut pending);
        pending.bytes.is_empty()
    }

    /// Writes what waits, as far as the pipe takes it, unless a write is
    /// under way (a panic inside one): at the end, without waiting.
    pub fn flush_at_exit(&self) {
        if let Ok(mut pending) = self.pending.try_lock() {
            self.write_out(&mut pending);
        }
    }

    fn push(&self, line: &[u8], urgent: bool) {
        let mut pending = self.lock();
        if pending.bytes.len() + line.len() > MAX_PENDING {
            pending.dropped += 1;
            return;
        }
        let starts_batch = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        if urgent || pending.bytes.len() >= BATCH_BYTES {
            self.write_out(&mut pending);
        } else if starts_batch {
            self.started.notify_one();
        }
    }

    /// One non-blocking write (more if the pipe takes part); the lock is
    /// held across it, which never waits.
    fn write_out(&self, pending: &mut Pending) {
        if pending.dropped > 0 && pending.bytes.len() < MAX_PENDING {
            let note =
                format!("WARN {} log lines dropped: the gate did not read them\n", pending.dropped);
            pending.bytes.extend_from_slice(note.as_bytes());
            pending.dropped = 0;
        }
        while !pending.bytes.is_empty() {
            match self.write(&pending.bytes) {
                Ok(written) => drop(pending.bytes.drain(..written)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The gate is gone: nobody will read these.
                Err(_) => pending.bytes.clear(),
            }
        }
        // A long quiet spell after a burst: give the memory back.
        if pending.bytes.capacity() > 4 * BATCH_BYTES {
            pending.bytes = Vec::new();
        }
    }

    fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        let written = match &self.sink {
            Sink::Stdout => nix::unistd::write(io::stdout().as_fd(), bytes),
            #[cfg(test)]
            Sink::Pipe(fd) => nix::unistd::write(fd, bytes),
        };
        written.map_err(io::Error::from)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One event's writer.
pub struct Line<'a> {
    log: &'a BatchedLog,
    urgent: bool,
}

impl io::Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.log.push(line, self.urgent);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MakeWriter<'_> for &'static BatchedLog {
    type Writer = Line<'static>;

    fn make_writer(&self) -> Line<'static> {
        Line { log: self, urgent: true }
    }

    fn make_writer_for(&self, meta: &Metadata<'_>) -> Line<'static> {
        Line { log: self, urgent: *meta.level() <= Level::WARN }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A log over a pipe of its own, and the pipe's reading end.
    fn log_and_reader() -> (BatchedLog, std::fs::File) {
        // Both ends non-blocking, like the worker's writing end.
        let flags = nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK;
        let (read, write) = nix::unistd::pipe2(flags).expect("pipe");
        (BatchedLog::new(Sink::Pipe(write)), std::fs::File::from(read))
    }

    /// What the pipe holds now.
    fn available(reader: &std::fs::File) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut buffer = [0; 65536];
        while let Ok(n) = (&*reader).read(&mut buffer) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buffer[..n]);
        }
        bytes
    }

    #[test]
    fn info_lines_wait_for_their_batch_and_a_warning_takes_them_along() {
        let (log, reader) = log_and_reader();
        Line { log: &log, urgent: false }.write_all(b"first\n").unwrap();
        Line { log: &log, urgent: false }.write_all(b"second\n").unwrap();
        assert_eq!(available(&reader), b"");
        Line { log: &log, urgent: true }.write_all(b"warning\n").unwrap();
        assert_eq!(available(&reader), b"first\nsecond\nwarning\n");
        Line { log: &log, urgent: false }.write_all(b"third\n").unwrap();
        assert!(log.flush());
        assert_eq!(available(&reader), b"third\n");
    }

    #[test]
    fn a_large_batch_goes_at_once() {
        let (log, reader) = log_and_reader();
        let line = [b'x'; 1023].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        for _ in 0..BATCH_BYTES / line.len() {
            Line { log: &log, urgent: false }.write_all(&line).unwrap();
        }
        assert_eq!(available(&reader).len(), BATCH_BYTES);
    }

    #[test]
    fn a_gate_that_does_not_read_costs_lines_not_memory_and_they_are_counted() {
        let (log, reader) = log_and_reader();
        let line = [b'y'; 4095].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        // The pipe fills (64 KiB), then the log holds up to its bound.
        let lines = (MAX_PENDING + 65536) / line.len() + 10;
        for _ in 0..lines {
            Line { log: &log, urgent: false }.write_all(&line).unwrap();
            assert!(log.lock().bytes.len() <= MAX_PENDING);
        }
        assert!(log.lock().dropped > 0);
        let mut read = Vec::new();
        for _ in 0..64 {
            read.extend(available(&reader));
            if log.flush() {
                break;
            }
        }
        read.extend(available(&reader));
        let text = String::from_utf8(read).unwrap();
        let (delivered, note) = text.trim_end().rsplit_once('\n').unwrap();
        let dropped: usize = note
            .strip_prefix("WARN ")
            .and_then(|n| n.strip_suffix(" log lines dropped: the gate did not read them"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a note of dropped lines: {note}"));
        assert!(delivered.lines().all(|l| l.len() == 4095 && l.bytes().all(|b| b == b'y')));
        assert_eq!(delivered.lines().count() + dropped, lines);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_sent_after_its_delay() {
        let (log, reader) = log_and_reader();
        let log: &'static BatchedLog = Box::leak(Box::new(log));
        tokio::spawn(log.send_batches());
        tokio::task::yield_now().await;
        Line { log, urgent: false }.write_all(b"access\n").unwrap();
        tokio::time::sleep(BATCH_DELAY / 2).await;
        assert_eq!(available(&reader), b"");
        tokio::time::sleep(BATCH_DELAY).await;
        assert_eq!(available(&reader), b"access\n");
    }
}
