//! The listener's first stage, which runs on every worker: accepts with
//! [`accept_loop`], holds a connection to `max_connections` and serves it on
//! the worker that accepted it.

use std::{net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

use super::{Counters, Settings, SharedAllowlist, connection::Connection, rejection::Rejection};
use crate::accept::accept_loop;

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
