//! The worker's log lines, relayed by the gate with the worker's label, so
//! that nothing a worker writes passes for the gate's own lines: in text,
//! each line gets `worker[<pid>]: ` in front and its control characters
//! escaped; in JSON, each line is an object whose `process` is `worker`
//! (whatever the worker put there) and `worker_pid` its pid.
//!
//! The worker writes to a pipe whose writing end is non-blocking: a gate
//! that falls behind costs the worker log lines, never its connections.
//! A worker handed over at a restart goes on writing: its pipe goes into
//! systemd's store with the listening sockets, and the next gate relays it.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read as _, Write as _},
    os::fd::{AsFd as _, OwnedFd},
    sync::{Mutex, PoisonError},
};

/// The longest line relayed whole; the rest of a longer one is dropped.
const MAX_LINE: usize = 16 * 1024;

/// The reading ends of the pipes being relayed, by worker pid: a copy
/// each, for a hand-over.
static RELAYED: Mutex<Option<HashMap<u32, OwnedFd>>> = Mutex::new(None);

/// A pipe for a worker's stdout and stderr: the reading end, and the
/// writing end (non-blocking).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let flags = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok((read, write))
}

/// Relays the lines from `read` (worker `pid`'s log) to this process's
/// stderr, on a thread of its own, until the worker's end closes.
pub fn relay(read: OwnedFd, pid: u32, json: bool) -> std::io::Result<()> {
    let copy = read.try_clone()?;
    RELAYED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_default()
        .insert(pid, copy);
    std::thread::Builder::new().name("edgegate-worker-log".into()).spawn(move || {
        let mut reader = BufReader::new(std::fs::File::from(read));
        let mut line = Vec::new();
        let mut labelled = String::new();
        while next_line(&mut reader, &mut line) {
            let text = String::from_utf8_lossy(&line);
            label_into(&mut labelled, text.trim_end_matches(['\n', '\r']), pid, json);
            labelled.push('\n');
            // One write for every line read together (the worker sends its
            // lines in batches): stderr is unbuffered.
            if reader.buffer().is_empty() || labelled.len() >= MAX_LINE {
                let _ = std::io::stderr().lock().write_all(labelled.as_bytes());
                labelled.clear();
            }
        }
        let _ = std::io::stderr().lock().write_all(labelled.as_bytes());
        if let Some(relayed) = RELAYED.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
            relayed.remove(&pid);
        }
    })?;
    Ok(())
}

/// Reads the next line into `line`, cut at [`MAX_LINE`] bytes (the rest of
/// a longer one is read past); false at the end.
fn next_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> bool {
    line.clear();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
    match reader.take(limit).read_until(b'\n', line) {
        Ok(0) | Err(_) => return false,
        Ok(_) => {}
    }
    if !line.ends_with(b"\n") && line.len() > MAX_LINE {
        line.truncate(MAX_LINE);
        line.extend_from_slice(" […]".as_bytes());
        skip_line(reader);
    }
    true
}

/// Reads past the rest of a line too long to relay.
fn skip_line(reader: &mut impl BufRead) {
    loop {
        let Ok(buffer) = reader.fill_buf() else { return };
        if buffer.is_empty() {
            return;
        }
        match buffer.iter().position(|&b| b == b'\n') {
            Some(at) => return reader.consume(at + 1),
            None => {
                let all = buffer.len();
                reader.consume(all);
            }
        }
    }
}

/// `line` from worker `pid`, labelled as the worker's, appended to `out`.
fn label_into(out: &mut String, line: &str, pid: u32, json: bool) {
    if !json {
        let _ = write!(out, "worker[{pid}]: ");
        crate::status::push_quoted(out, line);
        return;
    }
    let mut object = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(object)) => object,
        _ => {
            let mut object = serde_json::Map::new();
            object.insert("unparsed".into(), line.into());
            object
        }
    };
    object.insert("process".into(), "worker".into());
    object.insert("worker_pid".into(), pid.into());
    out.push_str(&serde_json::Value::Object(object).to_string());
}

/// The name of worker `pid`'s log pipe in systemd's store.
pub fn fd_name(pid: u32) -> String {
    format!("{FD_NAME_PREFIX}{pid}")
}

pub const FD_NAME_PREFIX: &str = "edgegate-worker-log-";

/// At a hand-over: puts the log pipe of every worker still writing (the
/// one handed over, and those an earlier gate handed to this one) into
/// systemd's store, for the next gate to relay.
pub fn hand_over() {
    let relayed = RELAYED.lock().unwrap_or_else(PoisonError::into_inner);
    for (pid, read) in relayed.iter().flatten() {
        let name = fd_name(*pid);
        let states = [sd_notify::NotifyState::FdStore, sd_notify::NotifyState::FdName(&name)];
        if let Err(e) = sd_notify::notify_with_fds(&states, &[read.as_fd()]) {
            tracing::warn!(
                "cannot keep worker {pid}'s log in systemd's store ({e}): its drain goes unlogged"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_LINE, label_into, next_line};

    fn label(line: &str, pid: u32, json: bool) -> String {
        let mut out = String::new();
        label_into(&mut out, line, pid, json);
        out
    }

    #[test]
    fn a_line_is_cut_at_its_bound_and_the_next_one_read_whole() {
        let mut input = vec![b'x'; 3 * MAX_LINE];
        input.extend_from_slice(b"\nnext\nlast without newline");
        let mut reader = std::io::BufReader::with_capacity(1024, &input[..]);
        let mut line = Vec::new();
        assert!(next_line(&mut reader, &mut line));
        assert_eq!(line.len(), MAX_LINE + " […]".len());
        assert!(line.ends_with(" […]".as_bytes()));
        assert!(next_line(&mut reader, &mut line));
        assert_eq!(line, b"next\n");
        assert!(next_line(&mut reader, &mut line));
        assert_eq!(line, b"last without newline");
        assert!(!next_line(&mut reader, &mut line));
    }

    #[test]
    fn worker_lines_cannot_pass_for_the_gates() {
        assert_eq!(label("INFO accepted", 7, false), "worker[7]: INFO accepted");
        assert_eq!(
            label("x\r2026-12-06T00:00:00Z INFO gate: list replaced", 7, false),
            "worker[7]: x\\r2026-12-06T00:00:00Z INFO gate: list replaced"
        );
        let forged = r#"{"level":"INFO","fields":{"message":"list replaced"},"process":"gate"}"#;
        let relayed: serde_json::Value = serde_json::from_str(&label(forged, 7, true)).unwrap();
        assert_eq!(relayed["process"], "worker");
        assert_eq!(relayed["worker_pid"], 7);
        assert_eq!(relayed["fields"]["message"], "list replaced");
        let text: serde_json::Value = serde_json::from_str(&label("not json", 7, true)).unwrap();
        assert_eq!(
            (text["unparsed"].as_str(), text["process"].as_str()),
            (Some("not json"), Some("worker"))
        );
    }
}
