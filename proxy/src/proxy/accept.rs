//! Accepting connections: the one accept loop every server of the daemon
//! runs (the listeners, the control socket, the metrics endpoint), and the
//! listener's first stage, which holds a connection to `max_connections` and
//! hands it to a worker.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

use super::{
    Counters, Settings, SharedAllowlist, connection::Connection, rejection::Rejection,
    workers::Workers,
};

/// The first pause after a failed accept; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts with `accept` and hands each connection to `handle`, until the
/// future is dropped. A failed accept (out of file descriptors, say) is
/// logged and retried after a pause that doubles up to a second: a starved
/// loop must not spin, nor stop.
pub async fn accept_loop<S, F: Future<Output = io::Result<S>>>(
    what: &str,
    mut accept: impl FnMut() -> F,
    mut handle: impl FnMut(S),
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match accept().await {
            Ok(accepted) => {
                backoff = MIN_BACKOFF;
                handle(accepted);
            }
            Err(e) => {
                warn!("{what}: accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

pub(super) struct AcceptLoop {
    pub(super) socket: TcpListener,
    pub(super) settings: Arc<ArcSwap<Settings>>,
    pub(super) counters: Arc<Counters>,
    pub(super) limit: Arc<Semaphore>,
    pub(super) allowlist: SharedAllowlist,
    pub(super) connections: TaskTracker,
    pub(super) close_all: CancellationToken,
    pub(super) workers: Arc<Workers>,
}

impl AcceptLoop {
    /// Accepts until `stop` is cancelled.
    pub(super) async fn run(self, stop: CancellationToken) {
        let what = format!("listener `{}`", self.settings.load().config.name);
        tokio::select! {
            () = stop.cancelled() => {}
            () = accept_loop(&what, || self.socket.accept(), |(stream, peer)| self.admit(stream, peer)) => {}
        }
    }

    /// Counts the connection against the limit and hands it to a worker.
    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let settings = self.settings.load_full();
        // Over the limit: refuse at once (close), so the accept loop never waits.
        let Ok(permit) = Arc::clone(&self.limit).try_acquire_owned() else {
            self.counters.reject(Rejection::OverLimit);
            warn!(
                target: "edgegate::access",
                listener = %settings.config.name,
                peer = %peer,
                reason = %Rejection::OverLimit,
                "connection refused: max_connections ({}) reached",
                settings.config.max_connections
            );
            return;
        };
        let connection = Connection {
            settings,
            counters: Arc::clone(&self.counters),
            allowlist: Arc::clone(&self.allowlist),
            peer,
            _permit: permit,
        };
        // Accepted here, served on a worker: the socket moves to its epoll.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                warn!(listener = %connection.settings.config.name, peer = %peer, "cannot hand over a connection: {e}");
                return;
            }
        };
        let close_all = self.close_all.clone();
        self.workers.spawn(self.connections.track_future(async move {
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    warn!(listener = %connection.settings.config.name, peer = %peer, "cannot take over a connection: {e}");
                    return;
                }
            };
            tokio::select! {
                () = connection.serve(stream) => {}
                () = close_all.cancelled() => {}
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::VecDeque};

    use super::*;

    /// Failed accepts are retried after 5, 10, 20 … ms, at most 1 s; a
    /// success resets the pause.
    #[tokio::test(start_paused = true)]
    async fn failed_accepts_back_off_doubling_and_recover() {
        let fail = || Err(io::Error::other("EMFILE"));
        let script: RefCell<VecDeque<io::Result<u32>>> = RefCell::new(
            [fail(), fail(), fail(), Ok(1), fail(), Ok(2)]
                .into_iter()
                .chain((0..12).map(|_| fail()))
                .collect(),
        );
        let started = tokio::time::Instant::now();
        let accepted = RefCell::new(Vec::new());
        let accept = || {
            let next = script.borrow_mut().pop_front();
            async move {
                match next {
                    Some(result) => result,
                    None => std::future::pending().await,
                }
            }
        };
        let run = accept_loop("test", accept, |n| {
            accepted.borrow_mut().push((n, started.elapsed()));
        });
        let _ = tokio::time::timeout(Duration::from_secs(60), run).await;
        let ms = |n| Duration::from_millis(n);
        assert_eq!(*accepted.borrow(), [(1, ms(5 + 10 + 20)), (2, ms(35 + 5))]);
        // Twelve more failures: 5, 10, …, 640 ms, then 1 s each, and no spin.
        let pauses: u64 = (0..12).map(|i| (5u64 << i).min(1000)).sum();
        assert!(script.borrow().is_empty(), "every scripted accept was tried");
        assert!(started.elapsed() >= ms(40 + pauses), "{:?}", started.elapsed());
    }
}
