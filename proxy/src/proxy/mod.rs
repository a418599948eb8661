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
//! Reload swaps a listener's certificates and settings atomically; open
//! connections keep what they started with. Shutdown stops accepting, lets
//! connections finish for the drain timeout, then closes them.

pub mod proxy_protocol;
pub mod relay;
mod workers;

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    allowlist::{Action, Allowlist},
    config::{ListenerConfig, ProxyProtocol, SendProxyProtocol},
    status::{ListenerStatus, NotReady, ReloadOutcome, ReloadResult},
    tls::{Identity, ListenerTls, Rejection, TlsError},
};
use proxy_protocol::Prefixed;
use relay::Relayed;
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
    rejected: [AtomicU64; REJECTIONS.len()],
    active: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    backend_failures: AtomicU64,
    relay_errors: AtomicU64,
}

const REJECTIONS: [Rejection; 14] = [
    Rejection::NoCertificate,
    Rejection::UnknownCa,
    Rejection::Expired,
    Rejection::NotYetValid,
    Rejection::Revoked,
    Rejection::IdentityNotAllowed,
    Rejection::WrongKeyUsage,
    Rejection::BadCertificate,
    Rejection::Handshake,
    Rejection::Timeout,
    Rejection::ProxyHeaderInvalid,
    Rejection::UntrustedProxy,
    Rejection::SourceNotAllowed,
    Rejection::OverLimit,
];

impl Counters {
    fn reject(&self, rejection: Rejection) {
        let index = REJECTIONS.iter().position(|r| *r == rejection).expect("every rejection");
        self.rejected[index].fetch_add(1, Ordering::Relaxed);
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
                    rejected: REJECTIONS
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

struct AcceptLoop {
    socket: TcpListener,
    settings: Arc<ArcSwap<Settings>>,
    counters: Arc<Counters>,
    limit: Arc<Semaphore>,
    allowlist: SharedAllowlist,
    connections: TaskTracker,
    close_all: CancellationToken,
    workers: Arc<Workers>,
}

impl AcceptLoop {
    async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = self.socket.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    warn!("accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(5);
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
                continue;
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
                    continue;
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
}

/// One accepted connection.
struct Connection {
    settings: Arc<Settings>,
    counters: Arc<Counters>,
    allowlist: SharedAllowlist,
    peer: SocketAddr,
    /// Held for the connection's lifetime: counts against `max_connections`.
    _permit: OwnedSemaphorePermit,
}

/// A connection that was turned away, and what to log about it.
struct Refusal {
    rejection: Rejection,
    client: SocketAddr,
    detail: String,
}

/// A connection that failed after the handshake.
struct BackendFailure {
    detail: String,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Connection {
    async fn serve(self, stream: TcpStream) {
        let started = Instant::now();
        let name = self.settings.config.name.clone();
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        let result = self.handshake_and_relay(stream).await;
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        let duration_ms = started.elapsed().as_millis();
        match result {
            Ok(Ok(finished)) => {
                let Finished { client, identity, version, cipher, relayed } = finished;
                self.counters.bytes_in.fetch_add(relayed.client_to_backend, Ordering::Relaxed);
                self.counters.bytes_out.fetch_add(relayed.backend_to_client, Ordering::Relaxed);
                if relayed.reason == relay::CloseReason::Error {
                    self.counters.relay_errors.fetch_add(1, Ordering::Relaxed);
                }
                info!(
                    target: "edgegate::access",
                    listener = %name,
                    client = %client,
                    peer = %self.peer,
                    subject = %identity.subject,
                    san_dns = ?identity.dns,
                    san_uri = ?identity.uris,
                    serial = %identity.serial,
                    tls_version = %version,
                    cipher = %cipher,
                    bytes_in = relayed.client_to_backend,
                    bytes_out = relayed.backend_to_client,
                    duration_ms,
                    close = %relayed.reason.as_str(),
                    "connection closed"
                );
            }
            Ok(Err((client, identity, failure))) => {
                self.counters.backend_failures.fetch_add(1, Ordering::Relaxed);
                warn!(
                    target: "edgegate::access",
                    listener = %name,
                    client = %client,
                    subject = %identity.subject,
                    duration_ms,
                    close = "backend_unavailable",
                    "connection closed: {}",
                    failure.detail
                );
            }
            Err(refusal) => {
                self.counters.reject(refusal.rejection);
                warn!(
                    target: "edgegate::access",
                    listener = %name,
                    client = %refusal.client,
                    peer = %self.peer,
                    reason = %refusal.rejection,
                    duration_ms,
                    "connection rejected: {}",
                    refusal.detail
                );
            }
        }
    }

    /// The outer `Result` is the client's fate before the handshake completed;
    /// the inner one is the backend's.
    async fn handshake_and_relay(
        &self,
        stream: TcpStream,
    ) -> Result<Result<Finished, (SocketAddr, Identity, BackendFailure)>, Refusal> {
        let config = &self.settings.config;
        let peer = self.peer;
        let refuse = |rejection, client, detail: String| Refusal { rejection, client, detail };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let deadline = Instant::now() + config.handshake_timeout;

        let (client, stream) = if config.proxy_protocol == ProxyProtocol::Off {
            (peer, Prefixed::plain(stream))
        } else {
            if !config.trusted_proxies.iter().any(|net| net.contains(&peer.ip())) {
                let detail = format!("{} is not in trusted_proxies", peer.ip());
                return Err(refuse(Rejection::UntrustedProxy, peer, detail));
            }
            let header = Box::pin(proxy_protocol::read_header(stream, config.proxy_protocol));
            match tokio::time::timeout_at(deadline, header).await {
                Err(_) => {
                    return Err(refuse(Rejection::Timeout, peer, "no PROXY header in time".into()));
                }
                Ok(Err(e)) => {
                    return Err(refuse(Rejection::ProxyHeaderInvalid, peer, e.to_string()));
                }
                // UNKNOWN/LOCAL (health checks): the connection is the proxy's own.
                Ok(Ok((reported, rest))) => (reported.unwrap_or(peer), rest),
            }
        };
        let client = SocketAddr::new(canonical(client.ip()), client.port());
        if self.allowlist.load().verdict(client.ip()) != Some(Action::Allow) {
            let detail = format!("{} is not allowed by the allowlist", client.ip());
            return Err(refuse(Rejection::SourceNotAllowed, client, detail));
        }

        // The handshake's state is large and short-lived: boxed, it is freed
        // once done instead of sizing every idle connection's task (likewise
        // the backend connect below).
        let acceptor = TlsAcceptor::from(Arc::clone(&self.settings.tls.server));
        let handshake = Box::pin(acceptor.accept(stream));
        let tls = match tokio::time::timeout_at(deadline, handshake).await {
            Err(_) => {
                let detail = format!("no TLS handshake within {:?}", config.handshake_timeout);
                return Err(refuse(Rejection::Timeout, client, detail));
            }
            Ok(Err(e)) => {
                let rejection = Rejection::from_handshake_error(&e);
                return Err(refuse(rejection, client, e.to_string()));
            }
            // Boxed: moved into the relay, the stream would otherwise take
            // room twice in this task (async fn frames do not share the slot).
            Ok(Ok(tls)) => Box::new(tls),
        };
        self.counters.handshakes_ok.fetch_add(1, Ordering::Relaxed);
        let (_, session) = tls.get_ref();
        let identity = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| Identity::from_der(cert))
            .unwrap_or_default();
        let version = session.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
        let cipher = session
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();

        let connect = Box::pin(self.connect_backend(client, local, &version, &cipher, &identity));
        let backend = match connect.await {
            Ok(backend) => backend,
            Err(detail) => return Ok(Err((client, identity, BackendFailure { detail }))),
        };
        let relayed = relay::relay(tls, backend, config.idle_timeout).await;
        Ok(Ok(Finished { client, identity, version, cipher, relayed }))
    }

    async fn connect_backend(
        &self,
        client: SocketAddr,
        local: SocketAddr,
        version: &str,
        cipher: &str,
        identity: &Identity,
    ) -> Result<Box<dyn Stream>, String> {
        let config = &self.settings.config;
        let connect = async {
            let stream = TcpStream::connect(&config.backend)
                .await
                .map_err(|e| format!("backend {}: {e}", config.backend))?;
            let _ = stream.set_nodelay(true);
            let mut backend: Box<dyn Stream> = match &self.settings.tls.backend {
                Some(tls) => Box::new(
                    tls.connector
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(|e| format!("backend {} TLS: {e}", config.backend))?,
                ),
                None => Box::new(stream),
            };
            if config.send_proxy_protocol == SendProxyProtocol::V2 {
                let header =
                    proxy_protocol::backend_header(client, local, version, cipher, identity)
                        .map_err(|e| format!("PROXY header: {e}"))?;
                backend
                    .write_all(&header)
                    .await
                    .map_err(|e| format!("backend {}: {e}", config.backend))?;
            }
            Ok(backend)
        };
        tokio::time::timeout(config.connect_timeout, connect).await.unwrap_or_else(|_| {
            Err(format!(
                "backend {}: no connection within {:?}",
                config.backend, config.connect_timeout
            ))
        })
    }
}

/// A relayed connection's facts for the access log.
struct Finished {
    client: SocketAddr,
    identity: Identity,
    version: String,
    cipher: String,
    relayed: Relayed,
}

/// IPv4 clients of a dual-stack socket arrive as `::ffff:a.b.c.d`; the
/// allowlist (like the wire) knows them as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}
