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
//! One module per stage: `accept` (the accept loop all the daemon's servers
//! share, and the connection limit), `connection` (the stages in order and
//! the access log), `backend`, `relay`, `proxy_protocol`, `rejection` (the
//! reasons); `workers` runs connections on per-core threads. This file holds
//! the listeners: start, reload, drain, status.
//!
//! Reload swaps a listener's certificates and settings atomically; open
//! connections keep what they started with. Shutdown stops accepting, lets
//! connections finish for the drain timeout, then closes them.

pub mod accept;
mod backend;
mod connection;
pub mod proxy_protocol;
pub mod rejection;
pub mod relay;
mod workers;

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
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    allowlist::Allowlist,
    config::ListenerConfig,
    status::{ListenerStatus, NotReady, ReloadOutcome, ReloadResult},
    tls::{ListenerTls, TlsError},
};
use accept::AcceptLoop;
use rejection::Rejection;
use workers::Workers;

/// The allowlist as the proxy sees it: swapped by the daemon after each change.
pub type SharedAllowlist = Arc<ArcSwap<Allowlist>>;

/// Why the listeners could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener's TLS material is unusable.
    #[error("listener `{listener}`: {source}")]
    Tls {
        listener: String,
        #[source]
        source: TlsError,
    },
    /// The bind address is taken or not local.
    #[error("listener `{listener}`: cannot listen on {address}: {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The connection worker threads could not start.
    #[error("cannot start the connection workers: {0}")]
    Workers(#[source] io::Error),
}

/// A listener's settings and TLS material, replaced whole on reload.
pub struct Settings {
    config: ListenerConfig,
    tls: ListenerTls,
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
    accepting: tokio::task::JoinHandle<()>,
}

/// Every listener of the daemon, and the connections they accepted.
pub struct Proxies {
    listeners: BTreeMap<String, Listener>,
    allowlist: SharedAllowlist,
    connections: TaskTracker,
    /// Cancelled when the drain timeout is over: open connections close.
    close_all: CancellationToken,
    workers: Arc<Workers>,
}

/// Listeners with their TLS material loaded and their sockets bound, not
/// accepting yet.
pub struct Prepared(Vec<(Settings, std::net::TcpListener)>);

impl Prepared {
    /// Loads every listener's TLS material and binds every address; fails
    /// whole, so that a daemon never starts with half its listeners.
    pub fn new(configs: &[ListenerConfig]) -> Result<Self, ProxyError> {
        configs.iter().map(prepare).collect::<Result<Vec<_>, _>>().map(Self)
    }

    /// Starts the connection workers, one per core, and accepting.
    pub fn start(self, allowlist: SharedAllowlist) -> Result<Proxies, ProxyError> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = Workers::start(cores).map_err(ProxyError::Workers)?;
        let mut proxies = Proxies {
            listeners: BTreeMap::new(),
            allowlist,
            connections: TaskTracker::new(),
            close_all: CancellationToken::new(),
            workers: Arc::new(workers),
        };
        for (settings, socket) in self.0 {
            proxies.spawn(settings, socket);
        }
        Ok(proxies)
    }
}

impl Proxies {
    fn spawn(&mut self, settings: Settings, socket: std::net::TcpListener) {
        let name = settings.config.name.clone();
        let socket = match TcpListener::from_std(socket) {
            Ok(socket) => socket,
            Err(e) => {
                warn!(listener = %name, "cannot listen: {e}");
                return;
            }
        };
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
            socket,
            settings: Arc::clone(&settings),
            counters: Arc::clone(&counters),
            limit: Arc::clone(&limit),
            allowlist: Arc::clone(&self.allowlist),
            connections: self.connections.clone(),
            close_all: self.close_all.clone(),
            workers: Arc::clone(&self.workers),
        };
        let accepting = tokio::spawn(accept.run(stop_accepting.clone()));
        self.listeners
            .insert(name, Listener { settings, counters, limit, stop_accepting, accepting });
    }

    /// Applies a new set of listener configs. A listener whose new files do
    /// not load keeps its previous settings, and the outcome says why.
    /// Established connections are never touched.
    pub fn reload(&mut self, configs: &[ListenerConfig]) -> Vec<ReloadOutcome> {
        let mut outcomes = Vec::new();
        let wanted: BTreeMap<&str, &ListenerConfig> =
            configs.iter().map(|c| (c.name.as_str(), c)).collect();
        let stale: Vec<String> = self
            .listeners
            .iter()
            .filter(|(name, listener)| {
                wanted
                    .get(name.as_str())
                    .is_none_or(|c| c.bind != listener.settings.load().config.bind)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(listener) = self.listeners.remove(&name) {
                listener.stop_accepting.cancel();
                outcomes.push(ReloadOutcome { listener: name, result: ReloadResult::Stopped });
            }
        }
        for config in configs {
            let outcome = match self.listeners.get(&config.name) {
                Some(listener) => match ListenerTls::load(config) {
                    Ok(tls) => {
                        resize(
                            &listener.limit,
                            listener.settings.load().config.max_connections,
                            config.max_connections,
                        );
                        listener.settings.store(Arc::new(Settings { config: config.clone(), tls }));
                        ReloadResult::Reloaded
                    }
                    Err(e) => ReloadResult::KeptPrevious(e.to_string()),
                },
                None => match prepare(config) {
                    Ok((settings, socket)) => {
                        self.spawn(settings, socket);
                        ReloadResult::Started
                    }
                    Err(e) => ReloadResult::NotStarted(e.to_string()),
                },
            };
            if outcome.failed() {
                warn!(listener = %config.name, "reload: {outcome}");
            } else {
                info!(listener = %config.name, "reload: {outcome}");
            }
            outcomes.push(ReloadOutcome { listener: config.name.clone(), result: outcome });
        }
        outcomes
    }

    /// Stops accepting, waits up to `timeout` for open connections to
    /// finish, then closes the rest.
    pub async fn drain(&mut self, timeout: Duration) {
        for listener in self.listeners.values() {
            listener.stop_accepting.cancel();
        }
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

    /// Whether every listener's accept loop is running.
    pub fn verify_accepting(&self) -> Result<(), NotReady> {
        match self.listeners.iter().find(|(_, l)| l.accepting.is_finished()) {
            Some((name, _)) => Err(NotReady::NotAccepting { listener: name.clone() }),
            None => Ok(()),
        }
    }

    pub fn status(&self) -> Vec<ListenerStatus> {
        self.listeners
            .iter()
            .map(|(name, listener)| {
                let settings = listener.settings.load();
                let counters = &listener.counters;
                ListenerStatus {
                    name: name.clone(),
                    bind: settings.config.bind,
                    backend: settings.config.backend.clone(),
                    active: counters.active.load(Ordering::Relaxed),
                    handshakes_ok: counters.handshakes_ok.load(Ordering::Relaxed),
                    rejected: Rejection::ALL
                        .iter()
                        .zip(&counters.rejected)
                        .map(|(r, c)| (r.as_str().to_owned(), c.load(Ordering::Relaxed)))
                        .filter(|(_, n)| *n > 0)
                        .collect(),
                    bytes_from_clients: counters.bytes_in.load(Ordering::Relaxed),
                    bytes_to_clients: counters.bytes_out.load(Ordering::Relaxed),
                    backend_failures: counters.backend_failures.load(Ordering::Relaxed),
                    relay_errors: counters.relay_errors.load(Ordering::Relaxed),
                    lifetimes: settings.tls.lifetimes.clone(),
                }
            })
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

/// Loads TLS material and binds the socket, without starting anything.
fn prepare(config: &ListenerConfig) -> Result<(Settings, std::net::TcpListener), ProxyError> {
    let tls = ListenerTls::load(config)
        .map_err(|source| ProxyError::Tls { listener: config.name.clone(), source })?;
    let bind_error =
        |source| ProxyError::Bind { listener: config.name.clone(), address: config.bind, source };
    let socket = std::net::TcpListener::bind(config.bind).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    Ok((Settings { config: config.clone(), tls }, socket))
}
