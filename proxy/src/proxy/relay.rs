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

/// Bytes in a read buffer until a direction proves busy.
const SMALL_BUFFER: usize = 1024;
/// One TLS record: the read buffer of a busy direction.
const LARGE_BUFFER: usize = 16 << 10;

/// Copies `reader` to `writer` until end of stream, then closes the writer's
/// sending half (half-close). Idle connections are the common case, so a
/// direction starts with a small buffer kept in the task itself and takes a
/// record-sized one from the heap only once a read fills the small one.
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
        let buffer: &mut [u8] = match large.as_mut() {
            Some(large) => large,
            None => &mut small,
        };
        let read = reader.read(buffer).await?;
        if read == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buffer[..read]).await?;
        // TLS keeps records it could not send yet; the next read may wait
        // for an answer to them.
        writer.flush().await?;
        total += read as u64;
        if large.is_none() && read == SMALL_BUFFER {
            large = Some(vec![0u8; LARGE_BUFFER].into_boxed_slice());
        }
    }
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
