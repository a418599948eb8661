//! Accepting connections: the one accept loop every server of the daemon
//! runs (the listeners, the control socket, the metrics endpoint), and the
//! listener's first stage, which runs on every worker, holds a connection to
//! `max_connections` and serves it on the worker that accepted it.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

use super::{Counters, Settings, SharedAllowlist, connection::Connection, rejection::Rejection};

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

/// One worker's accept loop on one listener. Every worker accepts on its own
/// descriptor of the listening socket: whichever is free takes the next
/// connection from the one queue, and serves it without a hand-over to
/// another thread (a wake-up and two `epoll_ctl` calls per connection).
#[derive(Clone)]
pub(super) struct AcceptLoop {
    pub(super) settings: Arc<ArcSwap<Settings>>,
    pub(super) counters: Arc<Counters>,
    pub(super) limit: Arc<Semaphore>,
    pub(super) allowlist: SharedAllowlist,
    pub(super) connections: TaskTracker,
    pub(super) close_all: CancellationToken,
}

impl AcceptLoop {
    /// Accepts on `socket` until `stop` is cancelled. Runs on the worker
    /// that is to serve the connections: adopting the socket registers it
    /// with that worker's epoll.
    pub(super) async fn run(self, socket: std::net::TcpListener, stop: CancellationToken) {
        let name = self.settings.load().config.name.clone();
        let socket = match TcpListener::from_std(socket) {
            Ok(socket) => socket,
            Err(e) => {
                warn!(listener = %name, "cannot accept on a worker: {e}");
                return;
            }
        };
        let what = format!("listener `{name}`");
        tokio::select! {
            () = stop.cancelled() => {}
            () = accept_loop(&what, || socket.accept(), |(stream, peer)| self.admit(stream, peer)) => {}
        }
    }

    /// Counts the connection against the limit and serves it on this worker.
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
        let close_all = self.close_all.clone();
        tokio::spawn(self.connections.track_future(async move {
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
