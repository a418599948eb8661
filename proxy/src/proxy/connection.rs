//! One connection's stages, each able to turn it away: PROXY header (only
//! from `trusted_proxies`) → allowlist check of the client address → TLS
//! handshake with a verified, allowed client certificate → backend →
//! relay; and its one access-log line.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use rustls::HandshakeKind;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
    time::Instant,
};
use tracing::{info, warn};

use super::{
    Counters, Settings, SharedAllowlist, backend,
    proxy_protocol::{self, ClientTls, Prefixed},
    rejection::Rejection,
    relay::{self, Relayed},
    tls_stream,
};
use crate::{allowlist::Action, config::ProxyProtocol, tls::Identity};

/// One accepted connection.
pub(super) struct Connection {
    pub(super) settings: Arc<Settings>,
    pub(super) counters: Arc<Counters>,
    pub(super) allowlist: SharedAllowlist,
    pub(super) peer: SocketAddr,
    /// Held for the connection's lifetime: counts against `max_connections`.
    pub(super) _permit: OwnedSemaphorePermit,
}

/// How a connection ended, for its counters and its access-log line.
enum Outcome {
    /// Handshake, backend connect and relay happened.
    Relayed(Finished),
    /// The client was authenticated, but the backend could not be reached.
    BackendFailed { client: SocketAddr, identity: Identity, detail: String },
    /// A stage turned the client away before the handshake completed.
    Refused { rejection: Rejection, client: SocketAddr, detail: String },
}

/// A byte stream to relay: TCP, or TLS over TCP.
pub(super) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Connection {
    pub(super) async fn serve(self, stream: TcpStream) {
        let started = Instant::now();
        let name = self.settings.config.name.clone();
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        let result = self.handshake_and_relay(stream).await;
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        let duration_ms = started.elapsed().as_millis();
        match result {
            Outcome::Relayed(finished) => {
                let Finished { client, identity, version, cipher, resumed, relayed } = finished;
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
                    san_dns = ?identity.name.dns,
                    san_uri = ?identity.name.uris,
                    serial = %identity.serial,
                    tls_version = %version,
                    cipher = %cipher,
                    resumed,
                    bytes_in = relayed.client_to_backend,
                    bytes_out = relayed.backend_to_client,
                    duration_ms,
                    close = %relayed.reason.as_str(),
                    "connection closed"
                );
            }
            Outcome::BackendFailed { client, identity, detail } => {
                self.counters.backend_failures.fetch_add(1, Ordering::Relaxed);
                warn!(
                    target: "edgegate::access",
                    listener = %name,
                    client = %client,
                    subject = %identity.subject,
                    duration_ms,
                    close = "backend_unavailable",
                    "connection closed: {detail}"
                );
            }
            Outcome::Refused { rejection, client, detail } => {
                self.counters.reject(rejection);
                warn!(
                    target: "edgegate::access",
                    listener = %name,
                    client = %client,
                    peer = %self.peer,
                    reason = %rejection,
                    duration_ms,
                    "connection rejected: {detail}"
                );
            }
        }
    }

    /// Takes the connection through every stage; the first that fails ends it.
    async fn handshake_and_relay(&self, stream: TcpStream) -> Outcome {
        let config = &self.settings.config;
        let peer = self.peer;
        let refuse =
            |rejection, client, detail: String| Outcome::Refused { rejection, client, detail };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let deadline = Instant::now() + config.handshake_timeout;

        let (client, stream) = if config.proxy_protocol == ProxyProtocol::Off {
            (peer, Prefixed::plain(stream))
        } else {
            if !config.trusted_proxies.iter().any(|net| net.contains(&peer.ip())) {
                let detail = format!("{} is not in trusted_proxies", peer.ip());
                return refuse(Rejection::UntrustedProxy, peer, detail);
            }
            let header = Box::pin(proxy_protocol::read_header(stream, config.proxy_protocol));
            match tokio::time::timeout_at(deadline, header).await {
                Err(_) => {
                    return refuse(Rejection::Timeout, peer, "no PROXY header in time".into());
                }
                Ok(Err(e)) => {
                    return refuse(Rejection::ProxyHeaderInvalid, peer, e.to_string());
                }
                // UNKNOWN/LOCAL (health checks): the connection is the proxy's own.
                Ok(Ok((reported, rest))) => (reported.unwrap_or(peer), rest),
            }
        };
        // IPv4 clients of a dual-stack socket arrive as `::ffff:a.b.c.d`; the
        // allowlist (like the wire) knows them as IPv4.
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let check = self.allowlist.load();
        let allowed = check.list.verdict(client.ip()) == Some(Action::Allow);
        if !allowed {
            let detail = format!("{} is not allowed by the allowlist", client.ip());
            if !check.audit {
                return refuse(Rejection::SourceNotAllowed, client, detail);
            }
            warn!(
                target: "edgegate::access",
                listener = %config.name,
                client = %client,
                peer = %peer,
                reason = %Rejection::SourceNotAllowed,
                "audit mode: served a connection enforcing mode would refuse: {detail}"
            );
        }

        // The handshake's state is large and short-lived: boxed, it is freed
        // once done instead of sizing every idle connection's task (likewise
        // the backend connect below).
        let handshake = Box::pin(tls_stream::accept(Arc::clone(&self.settings.tls.server), stream));
        let tls = match tokio::time::timeout_at(deadline, handshake).await {
            Err(_) => {
                let detail = format!("no TLS handshake within {:?}", config.handshake_timeout);
                return refuse(Rejection::Timeout, client, detail);
            }
            Ok(Err(e)) => {
                let rejection = Rejection::from_handshake_error(&e);
                return refuse(rejection, client, e.to_string());
            }
            // Boxed: moved into the relay, the stream would otherwise take
            // room twice in this task (async fn frames do not share the slot).
            Ok(Ok(tls)) => Box::new(tls),
        };
        let session = tls.session();
        let resumed = session.handshake_kind() == Some(HandshakeKind::Resumed);
        if resumed && let Err(e) = self.settings.tls.recheck(session.peer_certificates()) {
            let detail = format!("resumed session refused: {e}");
            return refuse(Rejection::from_tls_error(&e), client, detail);
        }
        self.counters.handshakes_ok.fetch_add(1, Ordering::Relaxed);
        let certificate = session.peer_certificates().and_then(|chain| chain.first());
        let identity = self.settings.tls.identity(session.peer_certificates());
        if !allowed {
            self.counters.sightings.record(client.ip(), identity.name.clone());
        }
        let version = session.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
        let cipher = session
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();

        let client_tls = ClientTls {
            version: &version,
            cipher: &cipher,
            identity: &identity,
            certificate: certificate.map(|cert| cert.as_ref()),
            resumed,
        };
        let connect = Box::pin(backend::connect(&self.settings, client, local, &client_tls));
        let backend = match connect.await {
            Ok(backend) => backend,
            Err(detail) => return Outcome::BackendFailed { client, identity, detail },
        };
        let relayed = relay::relay(tls, backend, config.idle_timeout).await;
        Outcome::Relayed(Finished { client, identity, version, cipher, resumed, relayed })
    }
}

/// A relayed connection's facts for the access log.
struct Finished {
    client: SocketAddr,
    identity: Identity,
    version: String,
    cipher: String,
    resumed: bool,
    relayed: Relayed,
}
