//! The socketpair protocol between the gate and the proxy worker: frames of
//! a 4-byte big-endian length and one JSON message, decoded strictly
//! (unknown types and fields are errors). The gate treats every frame from
//! the worker as hostile: bounded at [`FROM_WORKER_MAX`], and nothing in
//! [`FromWorker`] can name a list entry, a map or a file.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::{
    config::ListenerConfig,
    privsep::keys::ListenerKeyHandles,
    proxy::rejection::Rejection,
    tls::{ClientName, Material},
};

/// The largest frame the gate reads from the worker: a report of every
/// listener's counters fits many times over.
pub const FROM_WORKER_MAX: usize = 1 << 20;
/// The largest frame the worker reads from the gate: an allowlist snapshot of
/// a million entries, or listeners' CRLs, fit.
pub const TO_WORKER_MAX: usize = 256 << 20;

/// Gate → worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToWorker {
    /// Serve exactly these listeners. The frame carries one listening socket
    /// per listener, in this order.
    Configure { id: u64, listeners: Vec<ListenerSpec> },
    /// The allowlist in force (its file form), for PROXY-reported
    /// addresses; with `audit`, clients it does not allow are only logged.
    Allowlist { generation: u64, text: String, audit: bool },
    /// Answer with [`FromWorker::Report`].
    Report { id: u64 },
    /// Stop accepting, let open connections finish within `timeout`, exit.
    /// With `detach`, answer [`FromWorker::Detached`] at once and drain
    /// without the gate (a restart hands the listeners to the next gate).
    Drain {
        timeout: Duration,
        #[serde(default)]
        detach: bool,
    },
}

/// One listener as the worker serves it: the config, the backend's
/// addresses (the gate resolves names: the worker has no resolver), the
/// contents of its TLS files but those with secrets, and its keys in the
/// gate (`privsep::keys`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub config: ListenerConfig,
    pub backend_addrs: Vec<SocketAddr>,
    pub material: Material,
    /// `None` only in the benchmarks' comparison mode (`run
    /// --keys-in-worker`), where `material` holds the secrets too.
    #[serde(default)]
    pub keys: Option<ListenerKeyHandles>,
}

/// Worker → gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromWorker {
    /// Sandboxed, waiting for its listeners.
    Ready { sandbox: SandboxReport },
    /// `Configure` `id` is in force, but for the listeners named in `refused`.
    Configured { id: u64, refused: Vec<Refused> },
    /// The answer to `Report` `id`, with the clients that authenticated
    /// from unallowed addresses since the last report.
    Report {
        id: u64,
        allowlist_generation: u64,
        listeners: Vec<ListenerCounters>,
        #[serde(default)]
        sightings: Vec<Sighting>,
    },
    /// Every connection has finished (or was closed at the drain timeout).
    /// (A struct variant: serde refuses unknown fields only in those.)
    Drained {},
    /// No longer accepting, and draining on its own, no longer tied to the
    /// gate's life (the answer to a detached `Drain`).
    Detached {},
}

/// A listener whose material the worker could not build a TLS config from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refused {
    pub listener: String,
    pub reason: String,
}

/// What the worker's sandbox enforces, as the worker saw it applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxReport {
    /// The kernel's Landlock ABI version; 0 without Landlock.
    pub landlock_abi: u32,
    /// No file may be opened, read or written (Landlock file system rules).
    pub file_system_denied: bool,
    /// No TCP bind, and connect only to the backends' ports (Landlock ABI 4+).
    pub network_restricted: bool,
    /// No signals to, nor abstract sockets of, processes outside the worker (ABI 6+).
    pub scoped: bool,
    /// The seccomp filter is in force on every thread.
    pub seccomp: bool,
}

/// One listener's counters, as the worker reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerCounters {
    pub name: String,
    pub accepting: bool,
    pub active: u64,
    pub handshakes_ok: u64,
    /// Per [`Rejection::ALL`], in that order.
    pub rejected: Vec<u64>,
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
    pub backend_failures: u64,
    pub relay_errors: u64,
}

/// A client that completed the mTLS handshake from an address the
/// allowlist does not allow (audit mode lets it through): what `allow
/// suggest` learns from. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sighting {
    pub listener: String,
    pub address: IpAddr,
    pub name: ClientName,
    pub connections: u64,
    pub first_seen: u64,
    pub last_seen: u64,
}

/// At most this many sightings per report: the worker keeps no more
/// between two reports.
pub const MAX_SIGHTINGS: usize = 1024;
/// Bounds on a sighting's names, so that a hostile worker cannot make the
/// gate store (and an operator paste) a novel.
pub const MAX_NAMES: usize = 16;
pub const MAX_NAME_BYTES: usize = 256;

/// Why a frame was not read or not understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the socketpair between frames.
    #[error("the channel is closed")]
    Closed,
    /// The peer closed it inside a frame.
    #[error("the channel closed inside a frame")]
    Truncated,
    #[error("a frame of {len} bytes is over the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("undecodable frame: {0}")]
    Malformed(#[source] serde_json::Error),
    /// `Report.rejected` does not have one counter per reason.
    #[error("a report with {0} rejection counters")]
    BadReport(usize),
    /// A sighting beyond the bounds: too many, or names too many or too long.
    #[error("a report with a sighting out of bounds: {0}")]
    BadSighting(&'static str),
    #[error("cannot read the channel: {0}")]
    Io(#[source] std::io::Error),
}

/// `message` as a frame.
pub fn encode(message: &impl Serialize) -> Vec<u8> {
    let body = serde_json::to_vec(message).expect("protocol messages always serialize");
    let len = u32::try_from(body.len()).expect("frames stay under 4 GiB");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Reads one frame's body of at most `max` bytes; an oversized length is
/// refused before anything is allocated for it.
pub async fn read_frame(
    reader: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < header.len() {
        match reader.read(&mut header[filled..]).await.map_err(FrameError::Io)? {
            0 if filled == 0 => return Err(FrameError::Closed),
            0 => return Err(FrameError::Truncated),
            n => filled += n,
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(body)
}

/// Decodes a frame's body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Malformed)
}

/// Decodes a frame from the worker, with the checks serde cannot express.
pub fn decode_from_worker(body: &[u8]) -> Result<FromWorker, FrameError> {
    let message: FromWorker = decode(body)?;
    if let FromWorker::Report { listeners, sightings, .. } = &message {
        if let Some(bad) = listeners.iter().find(|l| l.rejected.len() != Rejection::ALL.len()) {
            return Err(FrameError::BadReport(bad.rejected.len()));
        }
        check_sightings(sightings)?;
    }
    Ok(message)
}

fn check_sightings(sightings: &[Sighting]) -> Result<(), FrameError> {
    if sightings.len() > MAX_SIGHTINGS {
        return Err(FrameError::BadSighting("too many"));
    }
    for sighting in sightings {
        if sighting.name.names().count() > MAX_NAMES {
            return Err(FrameError::BadSighting("too many names"));
        }
        let too_long = |name: &str| name.len() > MAX_NAME_BYTES;
        if sighting.name.names().any(too_long) || too_long(&sighting.listener) {
            return Err(FrameError::BadSighting("a name too long"));
        }
        if sighting.connections == 0 || sighting.first_seen > sighting.last_seen {
            return Err(FrameError::BadSighting("inconsistent counts or times"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> FromWorker {
        FromWorker::Report {
            id: 7,
            allowlist_generation: 3,
            listeners: vec![ListenerCounters {
                name: "edge".into(),
                accepting: true,
                active: 1,
                handshakes_ok: 2,
                rejected: vec![0; Rejection::ALL.len()],
                bytes_from_clients: 3,
                bytes_to_clients: 4,
                backend_failures: 5,
                relay_errors: 6,
            }],
            sightings: vec![sighting()],
        }
    }

    fn sighting() -> Sighting {
        Sighting {
            listener: "edge".into(),
            address: "198.51.100.7".parse().unwrap(),
            name: ClientName {
                common_name: Some("partner-a".into()),
                dns: vec!["api.partner-a.example".into()],
                uris: vec![],
            },
            connections: 3,
            first_seen: 1_700_000_000,
            last_seen: 1_700_000_060,
        }
    }

    fn report_with(sightings: Vec<Sighting>) -> Vec<u8> {
        let FromWorker::Report { id, allowlist_generation, listeners, .. } = report() else {
            unreachable!()
        };
        encode(&FromWorker::Report { id, allowlist_generation, listeners, sightings })
    }

    async fn read_one(bytes: &[u8]) -> Result<FromWorker, FrameError> {
        let mut reader = bytes;
        decode_from_worker(&read_frame(&mut reader, FROM_WORKER_MAX).await?)
    }

    #[tokio::test]
    async fn messages_survive_a_round_trip() {
        let sandbox = SandboxReport {
            landlock_abi: 6,
            file_system_denied: true,
            network_restricted: true,
            scoped: true,
            seccomp: true,
        };
        for message in [report(), FromWorker::Ready { sandbox }, FromWorker::Drained {}] {
            assert_eq!(read_one(&encode(&message)).await.expect("decodes"), message);
        }
    }

    /// The worker gets the listener config exactly as the gate parsed it.
    #[test]
    fn a_listener_config_survives_the_trip_to_the_worker() {
        let config: ListenerConfig = toml::from_str(
            r#"
            name = "edge"
            bind = "0.0.0.0:8443"
            backend = "backend.internal:8080"
            cert = "/etc/edgegate/server.pem"
            key = "/etc/edgegate/server.key"
            client_ca = "/etc/edgegate/ca.pem"
            crl = ["/etc/edgegate/ca.crl"]
            allow_dns = ["*.partner.example"]
            proxy_protocol = "v2"
            trusted_proxies = ["10.0.0.0/16", "fd00::/8"]
            send_proxy_protocol = "v2"
            min_tls_version = "1.3"
            handshake_timeout = "2s 500ms"
            connect_timeout = "750ms"
            idle_timeout = "1h"
            max_connections = 7
            [backend_tls]
            ca = "/etc/edgegate/backend-ca.pem"
            server_name = "backend.internal"
            "#,
        )
        .expect("a listener");
        let message = ToWorker::Configure {
            id: 1,
            listeners: vec![ListenerSpec {
                config: config.clone(),
                backend_addrs: vec!["10.0.0.5:8080".parse().unwrap()],
                material: Material::default(),
                keys: None,
            }],
        };
        let ToWorker::Configure { listeners, .. } =
            decode(&encode(&message)[4..]).expect("decodes")
        else {
            panic!("another message");
        };
        assert_eq!(listeners[0].config, config);
    }

    /// Every way a hostile worker can get a frame wrong is an error, never a
    /// panic nor an allocation of the length it claims.
    #[tokio::test]
    async fn bad_frames_are_errors() {
        let good = encode(&report());
        let body = |json: &str| {
            let mut frame = (json.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(json.as_bytes());
            frame
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("half a header", vec![0, 0]),
            ("truncated body", good[..good.len() - 1].to_vec()),
            ("oversized", u32::MAX.to_be_bytes().to_vec()),
            ("just over the limit", ((FROM_WORKER_MAX + 1) as u32).to_be_bytes().to_vec()),
            ("not JSON", body("\u{0}\u{1}garbage")),
            ("unknown type", body(r#"{"type":"set_allowlist","text":"allow 0.0.0.0/0"}"#)),
            ("no type", body(r#"{"id":1}"#)),
            ("unknown field", body(r#"{"type":"drained","entries":["0.0.0.0/0"]}"#)),
            (
                "extra field",
                body(r#"{"type":"configured","id":1,"refused":[],"allow":"0.0.0.0/0"}"#),
            ),
            ("wrong field type", body(r#"{"type":"configured","id":"1","refused":[]}"#)),
            (
                "short rejection counters",
                body(
                    &String::from_utf8(encode(&report())[4..].to_vec()).unwrap().replace(
                        &format!("[{}]", vec!["0"; Rejection::ALL.len()].join(",")),
                        "[0]",
                    ),
                ),
            ),
            ("a gate message", encode(&ToWorker::Report { id: 1 })),
            ("too many sightings", report_with(vec![sighting(); MAX_SIGHTINGS + 1])),
            ("too many names", {
                let mut s = sighting();
                s.name.dns = vec!["a.example".into(); MAX_NAMES];
                report_with(vec![s])
            }),
            ("a name too long", {
                let mut s = sighting();
                s.name.uris = vec!["u".repeat(MAX_NAME_BYTES + 1)];
                report_with(vec![s])
            }),
            ("a listener name too long", {
                let mut s = sighting();
                s.listener = "l".repeat(MAX_NAME_BYTES + 1);
                report_with(vec![s])
            }),
            ("no connections", {
                let mut s = sighting();
                s.connections = 0;
                report_with(vec![s])
            }),
            ("last seen before first", {
                let mut s = sighting();
                s.last_seen = s.first_seen - 1;
                report_with(vec![s])
            }),
            (
                "a sighting without an address",
                body(
                    r#"{"type":"report","id":1,"allowlist_generation":1,"listeners":[],"sightings":[{"listener":"e","name":{},"connections":1,"first_seen":1,"last_seen":1}]}"#,
                ),
            ),
        ];
        for (case, bytes) in cases {
            assert!(read_one(&bytes).await.is_err(), "{case} was accepted");
        }
        assert!(matches!(read_one(&[]).await, Err(FrameError::Closed)));
        assert!(read_one(&report_with(vec![sighting(); MAX_SIGHTINGS])).await.is_ok());
        assert!(matches!(
            read_one(&u32::MAX.to_be_bytes()).await,
            Err(FrameError::Oversized { len, .. }) if len == u32::MAX as usize
        ));
    }

    /// Fuzz-style: random bytes, and random corruptions of a good frame.
    #[tokio::test]
    async fn random_bytes_never_panic_the_decoder() {
        let good = encode(&report());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..5000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let mut bytes = good.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
                bytes.truncate(bytes.len() - (next() as usize % 3));
                bytes
            };
            let _ = read_one(&bytes).await;
        }
    }
}
