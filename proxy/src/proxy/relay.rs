//! Copying bytes both ways between client and backend, with half-close,
//! backpressure (a side is only read as fast as the other side takes it),
//! and an idle timeout.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// Why a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides finished (each closed its sending half).
    Completed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// A socket or TLS error on either side.
    Error,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Idle => "idle_timeout",
            Self::Error => "error",
        }
    }
}

/// Bytes moved and how it ended.
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    pub reason: CloseReason,
}

/// Relays until both directions are closed, an error occurs, or nothing has
/// moved for `idle_timeout`. When one side closes its sending half, the
/// other side's sending half is shut down too, and the opposite direction
/// keeps flowing (half-close).
pub async fn relay<C, B>(client: C, backend: B, idle_timeout: Duration) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut client = Metered { inner: client, activity: Arc::clone(&activity), side: Side::Client };
    let mut backend =
        Metered { inner: backend, activity: Arc::clone(&activity), side: Side::Backend };
    let (mut client_reads, mut client_writes) = tokio::io::split(&mut client);
    let (mut backend_reads, mut backend_writes) = tokio::io::split(&mut backend);
    let copy = async {
        tokio::try_join!(
            copy_one_way(&mut client_reads, &mut backend_writes),
            copy_one_way(&mut backend_reads, &mut client_writes),
        )
    };
    let (reason, (up, down)) = tokio::select! {
        result = copy => match result {
            Ok(bytes) => (CloseReason::Completed, bytes),
            Err(_) => (CloseReason::Error, (activity.read_from_client(), activity.read_from_backend())),
        },
        () = activity.idle(idle_timeout) => {
            (CloseReason::Idle, (activity.read_from_client(), activity.read_from_backend()))
        }
    };
    Relayed { client_to_backend: up, backend_to_client: down, reason }
}

/// What a direction reads into while it waits: room for a small message,
/// kept in the task itself.
const SMALL_BUFFER: usize = 256;
/// A busy direction's buffer: four TLS records, encrypted and sent in one go.
const LARGE_BUFFER: usize = 64 << 10;

/// Copies `reader` to `writer` until end of stream, then closes the writer's
/// sending half (half-close). Most connections are idle most of the time, so
/// a direction waits with a small buffer. A read that fills it moves to a
/// record-sized one from the heap and takes what else is there at once, so
/// the message is written in one piece; the large buffer serves for as long
/// as data is there at once, then goes back and the direction waits small.
async fn copy_one_way<R, W>(reader: &mut R, writer: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut small = [0u8; SMALL_BUFFER];
    let mut large: Option<Box<[u8]>> = None;
    let mut total = 0u64;
    loop {
        let read = match large.as_deref_mut() {
            Some(buffer) => match ready_now(reader.read(buffer)).await {
                Some(read) => read?,
                None => {
                    large = None;
                    continue;
                }
            },
            None => {
                let read = reader.read(&mut small).await?;
                if read == SMALL_BUFFER {
                    let mut buffer = vec![0u8; LARGE_BUFFER].into_boxed_slice();
                    buffer[..read].copy_from_slice(&small);
                    // End of stream (0) shows again on the next read.
                    let more = ready_now(reader.read(&mut buffer[read..])).await.transpose()?;
                    large = Some(buffer);
                    read + more.unwrap_or(0)
                } else {
                    read
                }
            }
        };
        if read == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        let data = match large.as_deref() {
            Some(buffer) => &buffer[..read],
            None => &small[..read],
        };
        writer.write_all(data).await?;
        // TLS keeps records it could not send yet; the next read may wait
        // for an answer to them.
        writer.flush().await?;
        total += read as u64;
    }
}

/// `future`'s output if it is ready at once; `None` (and `future` dropped)
/// if it would wait, or if the task has used up its scheduling budget
/// (tokio then makes reads wait). Only for cancel-safe futures, such as a read.
async fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// When bytes last moved, shared by both sides of one relay.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last read or write on either side.
    last: AtomicU64,
    /// Bytes read from each side so far (for the log of a relay cut short).
    from_client: AtomicU64,
    from_backend: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            from_client: AtomicU64::new(0),
            from_backend: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn read_from_client(&self) -> u64 {
        self.from_client.load(Ordering::Relaxed)
    }

    fn read_from_backend(&self) -> u64 {
        self.from_backend.load(Ordering::Relaxed)
    }

    /// Completes once nothing has moved for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Backend,
}

/// One side of the relay, recording activity and the bytes read from it.
struct Metered<S> {
    inner: S,
    activity: Arc<Activity>,
    side: Side,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            let counter = match self.side {
                Side::Client => &self.activity.from_client,
                Side::Backend => &self.activity.from_backend,
            };
            counter.fetch_add(read, Ordering::Relaxed);
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    /// Messages around the small buffer's size, a burst larger than the
    /// large one and pauses (the large buffer is given back and taken again)
    /// arrive whole and in order, both ways, then both sides see the close.
    #[tokio::test]
    async fn relays_every_size_both_ways() {
        let sizes = [1, SMALL_BUFFER - 1, SMALL_BUFFER, SMALL_BUFFER + 1, LARGE_BUFFER, 100_000];
        let (client, client_end) = duplex(64 << 10);
        let (backend, backend_end) = duplex(64 << 10);
        let relay = tokio::spawn(relay(client_end, backend_end, Duration::from_secs(10)));
        let (mut client_reads, mut client_writes) = tokio::io::split(client);
        let (mut backend_reads, mut backend_writes) = tokio::io::split(backend);
        let mut sent = Vec::new();
        for (index, size) in sizes.into_iter().enumerate() {
            let message: Vec<u8> = (0..size).map(|i| (i + index) as u8).collect();
            client_writes.write_all(&message).await.unwrap();
            backend_writes.write_all(&message).await.unwrap();
            let mut up = vec![0u8; size];
            let mut down = vec![0u8; size];
            backend_reads.read_exact(&mut up).await.unwrap();
            client_reads.read_exact(&mut down).await.unwrap();
            assert_eq!(up, message, "client to backend, {size} bytes");
            assert_eq!(down, message, "backend to client, {size} bytes");
            sent.push(size as u64);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        client_writes.shutdown().await.unwrap();
        backend_writes.shutdown().await.unwrap();
        assert_eq!(backend_reads.read(&mut [0u8; 1]).await.unwrap(), 0, "backend sees the close");
        assert_eq!(client_reads.read(&mut [0u8; 1]).await.unwrap(), 0, "client sees the close");
        let relayed = relay.await.unwrap();
        let total: u64 = sent.iter().sum();
        assert_eq!(relayed.client_to_backend, total);
        assert_eq!(relayed.backend_to_client, total);
        assert_eq!(relayed.reason, CloseReason::Completed);
    }

    /// A connection on which nothing moves ends after exactly the idle
    /// timeout; traffic in either direction restarts the clock.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_after_the_idle_timeout() {
        let idle = Duration::from_secs(30);
        let (client, client_end) = duplex(1024);
        let (backend, backend_end) = duplex(1024);
        let started = tokio::time::Instant::now();
        let relay = tokio::spawn(relay(client_end, backend_end, idle));
        let (mut client_reads, mut client_writes) = tokio::io::split(client);
        let (mut backend_reads, _backend_writes) = tokio::io::split(backend);
        tokio::time::sleep(Duration::from_secs(20)).await;
        client_writes.write_all(b"ping").await.unwrap();
        let mut up = [0u8; 4];
        backend_reads.read_exact(&mut up).await.unwrap();
        let relayed = relay.await.unwrap();
        assert_eq!(relayed.reason, CloseReason::Idle);
        assert_eq!(relayed.client_to_backend, 4);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(50) && elapsed < Duration::from_secs(52),
            "20 s, then a message, then 30 s idle: {elapsed:?}"
        );
        assert_eq!(client_reads.read(&mut [0u8; 1]).await.unwrap(), 0, "the client is closed");
    }
}
