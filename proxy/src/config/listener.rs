//! `[[listener]]`: one mutual-TLS listener, its files, identity rules,
//! PROXY protocol, timeouts, resumption and TLS towards the backend.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::values::{duration, duration_text, networks};

/// One mutual-TLS listener: `[[listener]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Names the listener in logs, metrics and reloads.
    pub name: String,
    pub bind: SocketAddr,
    /// `host:port`; a name is resolved for every connection.
    pub backend: String,
    /// Server certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CAs that issue client certificates (PEM bundle).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM or DER), enforced for client certificates.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// Glob patterns for the client certificate's subject CN.
    #[serde(default)]
    pub allow_cn: Vec<String>,
    /// Glob patterns for its DNS subject alternative names.
    #[serde(default)]
    pub allow_dns: Vec<String>,
    /// Glob patterns for its URI subject alternative names (SPIFFE IDs).
    #[serde(default)]
    pub allow_uri: Vec<String>,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Peers allowed to send a PROXY header (the load balancer's addresses).
    #[serde(default, deserialize_with = "networks")]
    pub trusted_proxies: Vec<IpNet>,
    #[serde(default)]
    pub send_proxy_protocol: SendProxyProtocol,
    #[serde(default)]
    pub min_tls_version: TlsVersion,
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub handshake_timeout: Duration,
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub connect_timeout: Duration,
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub idle_timeout: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Session-ticket keys shared by every host behind the load balancer
    /// (`tls::tickets`); without them each worker seals tickets with a key of
    /// its own, so a partner resumes only on the host that issued its ticket.
    pub tls_ticket_keys: Option<PathBuf>,
    /// How long a session may be resumed; `0s` turns resumption off.
    #[serde(
        default = "default_session_lifetime",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub session_lifetime: Duration,
    pub backend_tls: Option<BackendTlsConfig>,
}

impl ListenerConfig {
    /// Every file the listener names, with its key.
    pub fn files(&self) -> Vec<(&'static str, &Path)> {
        let mut files: Vec<(&'static str, &Path)> =
            vec![("cert", &self.cert), ("key", &self.key), ("client_ca", &self.client_ca)];
        files.extend(self.crl.iter().map(|path| ("crl", path.as_path())));
        files.extend(self.tls_ticket_keys.as_deref().map(|path| ("tls_ticket_keys", path)));
        if let Some(tls) = &self.backend_tls {
            files.push(("backend_tls.ca", &tls.ca));
            files.extend(tls.cert.as_deref().map(|path| ("backend_tls.cert", path)));
            files.extend(tls.key.as_deref().map(|path| ("backend_tls.key", path)));
        }
        files
    }

    /// As [`Self::files`], to change them.
    pub(super) fn files_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        let mut files = vec![
            ("cert", &mut self.cert),
            ("key", &mut self.key),
            ("client_ca", &mut self.client_ca),
        ];
        files.extend(self.crl.iter_mut().map(|path| ("crl", path)));
        files.extend(self.tls_ticket_keys.as_mut().map(|path| ("tls_ticket_keys", path)));
        if let Some(tls) = &mut self.backend_tls {
            files.push(("backend_tls.ca", &mut tls.ca));
            files.extend(tls.cert.as_mut().map(|path| ("backend_tls.cert", path)));
            files.extend(tls.key.as_mut().map(|path| ("backend_tls.key", path)));
        }
        files
    }
}

/// RFC 8446 caps a ticket's lifetime at seven days.
pub const MAX_SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// `[listener.backend_tls]`: encrypt (and verify) the connection to the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// CAs that issue the backend's certificate.
    pub ca: PathBuf,
    /// The name the backend's certificate must carry.
    pub server_name: String,
    /// Client certificate for backends that require one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Accepting a PROXY protocol header from `trusted_proxies`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V1,
    V2,
    Any,
}

/// Sending a PROXY protocol header to the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxyProtocol {
    #[default]
    Off,
    V2,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_session_lifetime() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_max_connections() -> usize {
    10_000
}
