//! The mutual-TLS termination proxy: one accept loop per `[[listener]]`, one
//! task per connection.
//!
//! A connection goes through, in order, each stage able to turn it away:
//! PROXY header (only from `trusted_proxies`) → allowlist check of the client
//! address → TLS handshake with a verified, allowed client certificate →
//! backend connect (optionally TLS, optionally with a PROXY v2 header) →
//! relay. Every connection ends in one access-log line; every rejection in
//! one line with its reason.
//!
//! It runs in the sandboxed worker process (`privsep`), which receives the
//! listening sockets and TLS material from the gate and binds or opens
//! nothing itself.
//!
//! One module per stage: `admit` (each worker's accept loop on a listener,
//! with [`crate::accept`], and the connection limit), `connection` (the stages in order and
//! the access log), `tls_stream` (the client's TLS, with no buffer held while
//! idle), `backend`, `relay`, `proxy_protocol`, `rejection` (the
//! reasons), `sightings` (clients that authenticated from unallowed
//! addresses, for `allow suggest`); `cores` runs the accept loops and the connections on per-core
//! threads. This file holds the listeners: configure, drain, counters.
//!
//! Reload swaps a listener's certificates and settings atomically; open
//! connections keep what they started with. Shutdown stops accepting, lets
//! connections finish for the drain timeout, then closes them.

mod admit;
mod backend;
mod connection;
mod cores;
pub mod proxy_protocol;
pub mod rejection;
pub mod relay;
mod sightings;
mod tls_stream;

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    allowlist::Allowlist,
    config::ListenerConfig,
    privsep::keys::{KeyClient, remote_keys},
    privsep::protocol::{ListenerCounters, ListenerSpec, Refused, Sighting},
    tls::{ListenerTls, Secrets},
};
use admit::AcceptLoop;
use cores::Cores;
use rejection::Rejection;

/// What the proxy checks client addresses against.
#[derive(Debug, Default)]
pub struct ClientCheck {
    pub list: Allowlist,
    /// Audit mode (`filter.audit`): a client the list does not allow is
    /// logged as one that would be refused, and served.
    pub audit: bool,
}

/// The client check as the proxy sees it: swapped by the daemon after each change.
pub type SharedAllowlist = Arc<ArcSwap<ClientCheck>>;

/// A listener's settings and TLS material, replaced whole on reload.
pub struct Settings {
    config: ListenerConfig,
    tls: ListenerTls,
    /// `config.backend`, resolved by the gate.
    backend_addrs: Vec<SocketAddr>,
}

/// Counters of one listener, for `edgegate status`.
#[derive(Default)]
struct Counters {
    handshakes_ok: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
    active: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    backend_failures: AtomicU64,
    relay_errors: AtomicU64,
    sightings: sightings::Sightings,
}

impl Counters {
    fn reject(&self, rejection: Rejection) {
        self.rejected[rejection.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// One running listener.
struct Listener {
    settings: Arc<ArcSwap<Settings>>,
    counters: Arc<Counters>,
    limit: Arc<Semaphore>,
    stop_accepting: CancellationToken,
    /// Each core's accept loop.
    accepting: Vec<tokio::task::JoinHandle<()>>,
}

/// Every listener of the worker, and the connections they accepted.
pub struct Proxies {
    listeners: BTreeMap<String, Listener>,
    allowlist: SharedAllowlist,
    connections: TaskTracker,
    /// Cancelled when the drain timeout is over: open connections close.
    close_all: CancellationToken,
    cores: Cores,
    /// The channels to the gate, which holds the listeners' keys.
    keys: Arc<KeyClient>,
}

impl Proxies {
    /// Starts one runtime per core; no listener yet.
    pub fn start(
        allowlist: SharedAllowlist,
        cores: usize,
        keys: Arc<KeyClient>,
    ) -> Result<Self, io::Error> {
        Ok(Self {
            listeners: BTreeMap::new(),
            allowlist,
            connections: TaskTracker::new(),
            close_all: CancellationToken::new(),
            cores: Cores::start(cores)?,
            keys,
        })
    }

    /// The channels to the gate's keys.
    pub fn keys(&self) -> &KeyClient {
        &self.keys
    }

    fn spawn(&mut self, settings: Settings, socket: std::net::TcpListener) -> io::Result<()> {
        let name = settings.config.name.clone();
        socket.set_nonblocking(true)?;
        info!(
            listener = %name,
            bind = %settings.config.bind,
            backend = %settings.config.backend,
            "listening for mutual-TLS clients"
        );
        let settings = Arc::new(ArcSwap::from_pointee(settings));
        let counters = Arc::new(Counters::default());
        let limit = Arc::new(Semaphore::new(settings.load().config.max_connections));
        let stop_accepting = CancellationToken::new();
        let accept = AcceptLoop {
            settings: Arc::clone(&settings),
            counters: Arc::clone(&counters),
            limit: Arc::clone(&limit),
            allowlist: Arc::clone(&self.allowlist),
            connections: self.connections.clone(),
            close_all: self.close_all.clone(),
        };
        let mut sockets =
            (1..self.cores.count()).map(|_| socket.try_clone()).collect::<io::Result<Vec<_>>>()?;
        sockets.push(socket);
        let accepting = self.cores.spawn_each(
            sockets.into_iter().map(|socket| accept.clone().run(socket, stop_accepting.clone())),
        );
        self.listeners
            .insert(name, Listener { settings, counters, limit, stop_accepting, accepting });
        Ok(())
    }

    /// Serves exactly `listeners` (each with its listening socket): stops
    /// the others, swaps the settings of those already running (open
    /// connections keep theirs) and starts the new ones. A listener whose
    /// material does not build keeps what it had (or does not start).
    pub fn configure(
        &mut self,
        listeners: Vec<(ListenerSpec, std::net::TcpListener)>,
    ) -> Vec<Refused> {
        let wanted: BTreeMap<&str, SocketAddr> = listeners
            .iter()
            .map(|(spec, _)| (spec.config.name.as_str(), spec.config.bind))
            .collect();
        self.listeners.retain(|name, listener| {
            let keep = wanted.get(name.as_str()) == Some(&listener.settings.load().config.bind);
            if !keep {
                info!(listener = %name, "stopped accepting");
                listener.stop_accepting.cancel();
            }
            keep
        });
        let mut refused = Vec::new();
        for (spec, socket) in listeners {
            let ListenerSpec { config, backend_addrs, material, keys } = spec;
            let name = config.name.clone();
            let keys = match &keys {
                Some(handles) => Ok(remote_keys(&self.keys, handles)),
                None => Secrets::read(&config, &material).map(|secrets| secrets.keys()),
            };
            let built = keys.and_then(|keys| ListenerTls::build(&config, &material, &keys));
            let settings = match built {
                Ok(tls) => Settings { config, tls, backend_addrs },
                Err(e) => {
                    warn!(listener = %name, "cannot build its TLS config: {e}");
                    refused.push(Refused { listener: name, reason: e.to_string() });
                    continue;
                }
            };
            match self.listeners.get(&name) {
                Some(listener) => {
                    resize(
                        &listener.limit,
                        listener.settings.load().config.max_connections,
                        settings.config.max_connections,
                    );
                    listener.settings.store(Arc::new(settings));
                }
                None => {
                    if let Err(e) = self.spawn(settings, socket) {
                        warn!(listener = %name, "cannot listen: {e}");
                        refused.push(Refused { listener: name, reason: e.to_string() });
                    }
                }
            }
        }
        refused
    }

    /// Stops every accept loop (each closes its copy of the listening socket).
    pub fn stop_accepting(&self) {
        for listener in self.listeners.values() {
            listener.stop_accepting.cancel();
        }
    }

    /// Stops accepting, waits up to `timeout` for open connections to
    /// finish, then closes the rest.
    pub async fn drain(&mut self, timeout: Duration) {
        self.stop_accepting();
        self.connections.close();
        let open = self.connections.len();
        if open > 0 {
            info!("draining {open} connection(s) for up to {timeout:?}");
        }
        if tokio::time::timeout(timeout, self.connections.wait()).await.is_err() {
            warn!("drain timeout: closing {} connection(s)", self.connections.len());
            self.close_all.cancel();
            self.connections.wait().await;
        }
    }

    /// Every listener's counters, for the gate's `status` and `/metrics`.
    pub fn counters(&self) -> Vec<ListenerCounters> {
        self.listeners
            .iter()
            .map(|(name, listener)| {
                let counters = &listener.counters;
                ListenerCounters {
                    name: name.clone(),
                    accepting: listener.accepting.iter().all(|task| !task.is_finished()),
                    active: counters.active.load(Ordering::Relaxed),
                    handshakes_ok: counters.handshakes_ok.load(Ordering::Relaxed),
                    rejected: counters.rejected.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
                    bytes_from_clients: counters.bytes_in.load(Ordering::Relaxed),
                    bytes_to_clients: counters.bytes_out.load(Ordering::Relaxed),
                    backend_failures: counters.backend_failures.load(Ordering::Relaxed),
                    relay_errors: counters.relay_errors.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Every listener's sightings since the last call, for the gate's report.
    pub fn take_sightings(&self) -> Vec<Sighting> {
        self.listeners
            .iter()
            .flat_map(|(name, listener)| listener.counters.sightings.take(name))
            .take(crate::privsep::protocol::MAX_SIGHTINGS)
            .collect()
    }
}

/// Grows or shrinks a listener's connection limit in place.
fn resize(limit: &Semaphore, old: usize, new: usize) {
    if new > old {
        limit.add_permits(new - old);
    } else {
        // Only idle permits can be forgotten; busy ones return and the limit
        // converges as connections end.
        limit.forget_permits(old - new);
    }
}
