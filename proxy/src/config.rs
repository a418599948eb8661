//! The TOML configuration file, parsed into a validated [`Config`].
//!
//! The allowlist is not configuration: it is state the daemon owns (see
//! `allowlist`); the config only says where it lives.

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use globset::Glob;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Where the daemon keeps its state when neither config nor flags say otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/edgegate";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/edgegate/control.sock";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/edgegate";
/// Rules per address family. Maps allocate on insert, so unused capacity is cheap.
pub const DEFAULT_MAX_ENTRIES: u32 = 1 << 18;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub filter: FilterConfig,
    pub daemon: DaemonConfig,
    pub listeners: Vec<ListenerConfig>,
    pub metrics: MetricsConfig,
    /// `[fleet]`: the list is the group's, kept in etcd; absent, the local file rules.
    pub fleet: Option<FleetConfig>,
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
    fn files_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
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

/// `[fleet]`: hosts of one group enforce one allowlist, kept in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd client URLs (`https://host:2379`); any member will do.
    pub endpoints: Vec<String>,
    /// Hosts of one group enforce one list.
    pub group: String,
    /// Key prefix under which the groups live.
    #[serde(default = "default_fleet_prefix")]
    pub prefix: String,
    /// CAs that issue the etcd members' certificates (needed with `https://`).
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How this host is named in `edgegate fleet status`; default: the hostname.
    pub host_id: Option<String>,
    /// The whole list is re-read this often even while the watch looks healthy.
    #[serde(default = "default_resync_interval", deserialize_with = "duration")]
    pub resync_interval: Duration,
    /// Each etcd request (and connection attempt) fails after this long.
    #[serde(default = "default_fleet_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Public keys (`ed25519:…`, from `edgegate fleet keygen`) whose
    /// signature a generation needs before this host enforces it. Empty:
    /// anyone who can write the group's keys in etcd decides the list.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Accept `http://` endpoints beyond loopback (the list and credentials
    /// cross the network unprotected).
    #[serde(default)]
    pub insecure_plaintext: bool,
}

impl FleetConfig {
    /// The parsed `trusted_keys` (validated with the config).
    pub fn trusted_keys(
        &self,
    ) -> Result<crate::fleet::trust::TrustedKeys, crate::fleet::trust::BadPublicKey> {
        let keys = self.trusted_keys.iter().map(|k| k.parse()).collect::<Result<_, _>>()?;
        Ok(crate::fleet::trust::TrustedKeys::new(keys))
    }
}

/// A file read only for its `[fleet]` table (and `filter.max_entries`): a
/// gate's config, or an admin's file that holds nothing else.
#[derive(Deserialize)]
struct FleetFile {
    fleet: Option<FleetConfig>,
    filter: Option<FleetFileFilter>,
}

#[derive(Deserialize)]
struct FleetFileFilter {
    #[serde(default = "default_max_entries")]
    max_entries: u32,
}

/// Where changes are made with a signing key: the `[fleet]` table of
/// `path` and the maps' capacity (`filter.max_entries`, default if absent).
pub fn load_fleet(path: &Path) -> Result<(FleetConfig, u32), ConfigError> {
    let text = fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let file: FleetFile = toml::from_str(&text).map_err(|e| syntax_error(path, &text, e))?;
    let Some(fleet) = file.fleet else {
        let problem =
            Invalid::new("fleet", "this file has no `[fleet]` table: name the group and its etcd");
        return Err(ConfigError::Invalid { path: path.to_owned(), problems: vec![problem] });
    };
    let problems = validate_fleet(&fleet);
    if !problems.is_empty() {
        return Err(ConfigError::Invalid { path: path.to_owned(), problems });
    }
    Ok((fleet, file.filter.map_or_else(default_max_entries, |f| f.max_entries)))
}

fn default_fleet_prefix() -> String {
    "/edgegate".into()
}
fn default_resync_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_fleet_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `[metrics]`: where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "default_metrics_bind")]
    pub bind: SocketAddr,
    /// A connection may start with a PROXY v1/v2 header, read and ignored:
    /// an NLB target group with proxy protocol on sends one on its health
    /// checks too. Plain HTTP requests are served either way.
    #[serde(default)]
    pub accept_proxy_protocol: bool,
}

impl MetricsConfig {
    /// Whether other hosts can reach the endpoint (it is then protected by the filter).
    pub fn exposed(&self) -> bool {
        !self.bind.ip().is_loopback()
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { bind: default_metrics_bind(), accept_proxy_protocol: false }
    }
}

fn default_metrics_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

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

/// A duration such as "10s", "5m" or "1h"; the error says so.
fn duration<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration ({e}): write a number and a unit, e.g. \"10s\", \"5m\" \
             or \"1h\""
        ))
    })
}

/// The form [`duration`] reads back: the worker receives listener configs
/// as the gate serializes them.
fn duration_text<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

/// Networks written as the allowlist writes them, refused as it refuses them
/// (host bits set, a prefix length beyond the family's, IPv4-mapped).
fn networks<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| crate::allowlist::parse_cidr(text).map_err(serde::de::Error::custom))
        .collect()
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Interfaces the XDP program is attached to.
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub mode: AttachMode,
    #[serde(default)]
    pub scope: Scope,
    /// Protected ports besides the listeners' own.
    #[serde(default)]
    pub ports: BTreeSet<u16>,
    /// The allowlist file; `<state dir>/allowlist` when absent.
    pub allowlist: Option<PathBuf>,
    /// Capacity of the rule maps, per address family.
    #[serde(default = "default_max_entries")]
    pub max_entries: u32,
    /// Audit mode: judge every packet, but pass (and count) those the list
    /// would drop. Switches on reload, both ways.
    #[serde(default)]
    pub audit: bool,
    /// Start enforcing with an empty list where that locks the operator out
    /// (host scope, or SSH's port protected): intent made explicit.
    #[serde(default)]
    pub allow_empty: bool,
    /// IP protocols carrying tunnels that ports scope judges by their outer
    /// source: the host decapsulates them, and their inner packets may be
    /// bound for a protected port.
    #[serde(default = "default_tunnel_protocols")]
    pub tunnel_protocols: BTreeSet<TunnelProtocol>,
    /// UDP ports carrying tunnels (VXLAN, GENEVE), judged in the same way.
    #[serde(default = "default_tunnel_ports")]
    pub tunnel_ports: BTreeSet<u16>,
}

fn default_max_entries() -> u32 {
    DEFAULT_MAX_ENTRIES
}
fn default_tunnel_protocols() -> BTreeSet<TunnelProtocol> {
    Tunnels::standard().protocols
}
fn default_tunnel_ports() -> BTreeSet<u16> {
    Tunnels::standard().udp_ports
}

/// VXLAN's IANA port (RFC 7348).
pub const VXLAN_PORT: u16 = 4789;
/// The VXLAN port Linux uses when none is given, and flannel and Cilium by
/// default (it predates the IANA assignment).
pub const LINUX_VXLAN_PORT: u16 = 8472;
/// GENEVE's IANA port (RFC 8926).
pub const GENEVE_PORT: u16 = 6081;

/// An IP protocol that carries a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelProtocol {
    /// IPv4 inside (protocol 4: ipip, 4in6).
    Ipip,
    /// IPv6 inside (protocol 41: sit and 6in4 over IPv4, ip6ip6 over IPv6).
    Sit,
    /// GRE (protocol 47), whatever it carries.
    Gre,
}

impl TunnelProtocol {
    pub const ALL: [Self; 3] = [Self::Ipip, Self::Sit, Self::Gre];

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Ipip => proxy_common::tunnel::IPIP,
            Self::Sit => proxy_common::tunnel::IPV6,
            Self::Gre => proxy_common::tunnel::GRE,
        }
    }
}

impl std::fmt::Display for TunnelProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ipip => "ipip",
            Self::Sit => "sit",
            Self::Gre => "gre",
        })
    }
}

/// The tunnels ports scope judges by their outer source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Tunnels {
    pub protocols: BTreeSet<TunnelProtocol>,
    pub udp_ports: BTreeSet<u16>,
}

impl Tunnels {
    /// Whether no tunnel is judged.
    pub fn is_empty(&self) -> bool {
        self.protocols.is_empty() && self.udp_ports.is_empty()
    }

    /// The default: every tunnel protocol, VXLAN (both its ports) and GENEVE.
    pub fn standard() -> Self {
        Self {
            protocols: TunnelProtocol::ALL.into(),
            udp_ports: BTreeSet::from([VXLAN_PORT, GENEVE_PORT, LINUX_VXLAN_PORT]),
        }
    }
}

impl std::fmt::Display for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds: Vec<String> = self.protocols.iter().map(ToString::to_string).collect();
        if !self.udp_ports.is_empty() {
            let ports: Vec<String> = self.udp_ports.iter().map(u16::to_string).collect();
            kinds.push(format!("UDP ports {}", ports.join(", ")));
        }
        if self.is_empty() { f.write_str("none") } else { f.write_str(&kinds.join(", ")) }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, else generic (skb) mode with a warning.
    #[default]
    Auto,
    Native,
    Skb,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Ports,
    Host,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Self::Ports => "ports",
            Self::Host => "host",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// How long a stopping daemon waits for work in progress.
    #[serde(default = "default_drain_timeout", deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// The unprivileged user to run as after start-up (see `privileges`).
    pub user: Option<String>,
    /// Start even where the worker's connections cannot be limited to the
    /// backends (no cgroup v2, no `cgroup/connect` programs): `status` says so.
    #[serde(default)]
    pub allow_unconfined_egress: bool,
    /// How the daemon and its worker write their logs; `run --log-format`
    /// and `EDGEGATE_LOG_FORMAT` win over it.
    #[serde(default)]
    pub log_format: LogFormat,
}

/// How the daemon writes its log lines.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

impl LogFormat {
    /// The name in the config and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            control_socket: default_control_socket(),
            state_dir: default_state_dir(),
            bpffs_dir: default_bpffs_dir(),
            drain_timeout: default_drain_timeout(),
            user: None,
            allow_unconfined_egress: false,
            log_format: LogFormat::Text,
        }
    }
}

fn default_control_socket() -> PathBuf {
    DEFAULT_CONTROL_SOCKET.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_bpffs_dir() -> PathBuf {
    DEFAULT_BPFFS_DIR.into()
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The file as written; [`Config`] is what validation makes of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    filter: FilterConfig,
    #[serde(default)]
    daemon: DaemonConfig,
    #[serde(default)]
    listener: Vec<ListenerConfig>,
    #[serde(default)]
    metrics: MetricsConfig,
    fleet: Option<FleetConfig>,
}

impl RawConfig {
    /// Makes every relative path the file names start at `base`; returns
    /// the keys that held one.
    fn resolve_relative_paths(&mut self, base: &Path) -> Vec<String> {
        let mut resolved = Vec::new();
        let mut resolve = |key: String, path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
                resolved.push(key);
            }
        };
        if let Some(path) = &mut self.filter.allowlist {
            resolve("filter.allowlist".into(), path);
        }
        let daemon = &mut self.daemon;
        resolve("daemon.control_socket".into(), &mut daemon.control_socket);
        resolve("daemon.state_dir".into(), &mut daemon.state_dir);
        resolve("daemon.bpffs_dir".into(), &mut daemon.bpffs_dir);
        for listener in &mut self.listener {
            let name = listener.name.clone();
            for (key, path) in listener.files_mut() {
                resolve(format!("listener.{name}.{key}"), path);
            }
        }
        if let Some(fleet) = &mut self.fleet {
            for (key, path) in
                [("ca", &mut fleet.ca), ("cert", &mut fleet.cert), ("key", &mut fleet.key)]
            {
                if let Some(path) = path {
                    resolve(format!("fleet.{key}"), path);
                }
            }
        }
        resolved
    }
}

/// A config file as read: its config, every unusable value in it, and the
/// keys whose relative paths were resolved against `base`.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub problems: Vec<Invalid>,
    pub relative: Vec<String>,
    /// The config file's directory.
    pub base: Option<PathBuf>,
}

/// Why a configuration file is refused. Messages name the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or a key has the wrong type or an unknown name (the message has the line).
    #[error("config {}: {source}", path.display())]
    Syntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// Values are well-formed but unusable: every such problem, one per line.
    #[error("{}", problems.iter().map(|p| format!("config {}: {p}", path.display())).collect::<Vec<_>>().join("\n"))]
    Invalid { path: PathBuf, problems: Vec<Invalid> },
    /// `[listener]` where the file takes a list of tables, `[[listener]]`.
    #[error(
        "config {}: line {line}: `[{name}]` makes one table, but `{name}` is a list of tables: \
         write `[[{name}]]` (double brackets) above each one",
        path.display()
    )]
    SingleBrackets { path: PathBuf, line: usize, name: String },
    /// `[[filter]]` where the file takes one table, `[filter]`.
    #[error(
        "config {}: line {line}: `[[{name}]]` starts a list of tables, but `{name}` is a single \
         table: write `[{name}]` (single brackets), once",
        path.display()
    )]
    DoubleBrackets { path: PathBuf, line: usize, name: String },
}

/// A TOML error as the operator can act on it: toml's own text (it has the
/// line), except for a table header with the wrong brackets, of which toml
/// says only "invalid type: map, expected a sequence".
fn syntax_error(path: &Path, text: &str, error: toml::de::Error) -> ConfigError {
    let span = error.span().filter(|_| error.message().starts_with("invalid type:"));
    let header = span.clone().and_then(|span| text.get(span)).map(str::trim);
    let before = span.and_then(|span| text.get(..span.start)).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let path = path.to_owned();
    let table_name = |inner: &str| {
        let name = inner.trim();
        (!name.is_empty() && !name.contains(['[', ']'])).then(|| name.to_owned())
    };
    if let Some(header) = header {
        if let Some(name) =
            header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")).and_then(table_name)
        {
            return ConfigError::DoubleBrackets { path, line, name };
        }
        if let Some(name) =
            header.strip_prefix('[').and_then(|h| h.strip_suffix(']')).and_then(table_name)
            && error.message().contains("expected a sequence")
        {
            return ConfigError::SingleBrackets { path, line, name };
        }
    }
    ConfigError::Syntax { path, source: Box::new(error) }
}

/// One unusable value: the key it is under, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {problem}")]
pub struct Invalid {
    pub key: String,
    pub problem: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { key: key.into(), problem: problem.into() }
    }
}

/// Paths given on the command line, which win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub control_socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub bpffs_dir: Option<PathBuf>,
}

impl Config {
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let Loaded { config, problems, .. } = Self::load_with_problems(path, overrides)?;
        if problems.is_empty() {
            return Ok(config);
        }
        Err(ConfigError::Invalid { path: path.to_owned(), problems })
    }

    /// Parses `text`; `path` is only used in messages (relative paths in
    /// `text` stay relative).
    pub fn parse(text: &str, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (config, problems) = Self::parse_with_problems(text, path, None, overrides)?;
        if problems.is_empty() {
            return Ok(config);
        }
        Err(ConfigError::Invalid { path: path.to_owned(), problems })
    }

    /// As [`Self::load`], but a file that parses yields its config together
    /// with every unusable value, so that `check` can go on to the files it
    /// names. Only a file that cannot be read or parsed is an error.
    pub fn load_with_problems(path: &Path, overrides: &Overrides) -> Result<Loaded, ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        // systemd starts the daemon in `/`: a path that works from the
        // operator's shell in the config's directory must work there too.
        let base = path.parent().map(|dir| std::path::absolute(dir).unwrap_or(dir.to_owned()));
        let mut relative = Vec::new();
        let (config, problems) = Self::parse_with_problems(
            &text,
            path,
            base.as_deref().map(|b| (b, &mut relative)),
            overrides,
        )?;
        Ok(Loaded { config, problems, relative, base })
    }

    /// `resolve`: the directory relative paths in the file are read from,
    /// and where to note the keys that held one.
    fn parse_with_problems(
        text: &str,
        path: &Path,
        resolve: Option<(&Path, &mut Vec<String>)>,
        overrides: &Overrides,
    ) -> Result<(Self, Vec<Invalid>), ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(path, text, e))?;
        if let Some((base, relative)) = resolve {
            relative.extend(raw.resolve_relative_paths(base));
        }
        let RawConfig { filter, mut daemon, listener: listeners, metrics, fleet } = raw;
        let mut problems = validate_listeners(&listeners);
        if let Some(fleet) = &fleet {
            problems.extend(validate_fleet(fleet));
        }
        if filter.interfaces.is_empty() {
            problems.push(Invalid::new(
                "filter.interfaces",
                "name at least one interface, e.g. [\"eth0\"]",
            ));
        }
        let mut seen = BTreeSet::new();
        for name in filter.interfaces.iter().filter(|name| !seen.insert(name.as_str())) {
            problems.push(Invalid::new(
                "filter.interfaces",
                format!("`{name}` is named twice; each interface takes one program"),
            ));
        }
        for name in filter.interfaces.iter().filter(|n| !valid_interface_name(n)) {
            problems.push(Invalid::new(
                "filter.interfaces",
                format!("`{name}` is not an interface name"),
            ));
        }
        if filter.scope == Scope::Ports && filter.ports.is_empty() && listeners.is_empty() {
            problems.push(Invalid::new(
                "filter.ports",
                "scope = \"ports\" with no ports and no listeners would protect nothing; \
                 list ports here or use scope = \"host\"",
            ));
        }
        if filter.ports.contains(&0) {
            problems.push(Invalid::new("filter.ports", "port 0 cannot be protected"));
        }
        if filter.tunnel_ports.contains(&0) {
            problems.push(Invalid::new("filter.tunnel_ports", "port 0 carries no tunnel"));
        }
        if filter.tunnel_ports.len() > proxy_common::tunnel::MAX_UDP_PORTS {
            problems.push(Invalid::new(
                "filter.tunnel_ports",
                format!(
                    "at most {} ports; a host rarely terminates more kinds of UDP tunnel",
                    proxy_common::tunnel::MAX_UDP_PORTS
                ),
            ));
        }
        if metrics.exposed() && metrics.bind.port() == 0 {
            problems.push(Invalid::new(
                "metrics.bind",
                "an endpoint other hosts can reach needs a fixed port, so that the filter can \
                 protect it",
            ));
        }
        if let Some(listener) = listeners.iter().find(|l| binds_overlap(l.bind, metrics.bind)) {
            problems.push(Invalid::new(
                "metrics.bind",
                format!("{} is also listener `{}`'s address", metrics.bind, listener.name),
            ));
        }
        if filter.max_entries == 0 {
            problems.push(Invalid::new("filter.max_entries", "must be at least 1"));
        }
        if let Some(dir) = &overrides.state_dir {
            daemon.state_dir.clone_from(dir);
        }
        if let Some(socket) = &overrides.control_socket {
            daemon.control_socket.clone_from(socket);
        }
        if let Some(dir) = &overrides.bpffs_dir {
            daemon.bpffs_dir.clone_from(dir);
        }
        Ok((Self { filter, daemon, listeners, metrics, fleet }, problems))
    }

    /// Ports the filter protects: `filter.ports`, every listener's port, and
    /// the metrics port unless it listens on loopback only: `/metrics` names
    /// the partner's address ranges, so strangers must not reach it.
    pub fn protected_ports(&self) -> BTreeSet<u16> {
        let mut ports = self.filter.ports.clone();
        ports.extend(self.listeners.iter().map(|l| l.bind.port()));
        if self.metrics.exposed() {
            ports.insert(self.metrics.bind.port());
        }
        ports
    }

    /// The tunnels judged by their outer source (ports scope).
    pub fn tunnels(&self) -> Tunnels {
        Tunnels {
            protocols: self.filter.tunnel_protocols.clone(),
            udp_ports: self.filter.tunnel_ports.clone(),
        }
    }

    /// `filter.allowlist`, or `allowlist` in the state directory.
    pub fn allowlist_path(&self) -> PathBuf {
        self.filter.allowlist.clone().unwrap_or_else(|| self.daemon.state_dir.join("allowlist"))
    }
}

/// Whether two sockets would clash: the same port on the same address, or
/// on an address and the wildcard of its family.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// Whether a socket bound to `wide` also takes `narrow`: an unspecified
/// address takes its family's addresses, and IPv6's (dual-stack, as the
/// listeners bind) IPv4's too.
fn covers(wide: IpAddr, narrow: IpAddr) -> bool {
    match wide {
        IpAddr::V4(wide) => wide.is_unspecified() && narrow.is_ipv4(),
        IpAddr::V6(wide) => wide.is_unspecified(),
    }
}

/// Checks `[fleet]`: usable URLs, one scheme, TLS files that belong together,
/// names that fit in an etcd key.
fn validate_fleet(fleet: &FleetConfig) -> Vec<Invalid> {
    let mut problems = Vec::new();
    if fleet.endpoints.is_empty() {
        problems.push(Invalid::new(
            "fleet.endpoints",
            "name at least one etcd member, e.g. [\"https://10.0.1.10:2379\"]",
        ));
    }
    let mut schemes = BTreeSet::new();
    for endpoint in &fleet.endpoints {
        match endpoint.split_once("://") {
            Some((scheme @ ("http" | "https"), authority))
                if authority.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                }) =>
            {
                schemes.insert(scheme);
            }
            _ => problems.push(Invalid::new(
                "fleet.endpoints",
                format!("`{endpoint}` is not an etcd URL such as https://10.0.1.10:2379"),
            )),
        }
    }
    if schemes.len() > 1 {
        problems.push(Invalid::new(
            "fleet.endpoints",
            "mixes http:// and https://: use https:// for every member",
        ));
    }
    let tls = schemes.contains("https");
    if tls && fleet.ca.is_none() {
        problems.push(Invalid::new(
            "fleet.ca",
            "https:// endpoints need the CA that issued the members' certificates",
        ));
    }
    let beyond_loopback = |endpoint: &&String| {
        let host = endpoint
            .strip_prefix("http://")
            .and_then(|authority| authority.rsplit_once(':'))
            .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'));
        host.is_some_and(|host| {
            host != "localhost" && !host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        })
    };
    if let Some(endpoint) = fleet.endpoints.iter().find(beyond_loopback)
        && !fleet.insecure_plaintext
    {
        problems.push(Invalid::new(
            "fleet.endpoints",
            format!(
                "`{endpoint}` is plaintext beyond loopback: anyone on the path could read the \
                 credentials and change what every host enforces. Use https:// with `ca` (and \
                 `cert`/`key`), or set `insecure_plaintext = true` to accept that risk"
            ),
        ));
    }
    for key in &fleet.trusted_keys {
        if let Err(e) = key.parse::<crate::fleet::trust::PublicKey>() {
            problems.push(Invalid::new("fleet.trusted_keys", e.to_string()));
        }
    }
    if !tls && (fleet.ca.is_some() || fleet.cert.is_some()) {
        problems.push(Invalid::new(
            "fleet.endpoints",
            "`ca`/`cert` are set but the endpoints are http://: use https://",
        ));
    }
    if fleet.cert.is_some() != fleet.key.is_some() {
        problems.push(Invalid::new("fleet.cert", "`cert` and `key` go together"));
    }
    let key_safe = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !key_safe(&fleet.group) {
        problems.push(Invalid::new(
            "fleet.group",
            format!("`{}` must be letters, digits, `-`, `_` or `.`", fleet.group),
        ));
    }
    if let Some(host) = fleet.host_id.as_deref().filter(|h| !key_safe(h)) {
        problems.push(Invalid::new(
            "fleet.host_id",
            format!("`{host}` must be letters, digits, `-`, `_` or `.`"),
        ));
    }
    if !fleet.prefix.starts_with('/') || fleet.prefix.ends_with('/') && fleet.prefix.len() > 1 {
        problems.push(Invalid::new(
            "fleet.prefix",
            format!(
                "`{}` must start with `/` and not end with one, e.g. \"/edgegate\"",
                fleet.prefix
            ),
        ));
    }
    if fleet.timeout.is_zero() || fleet.resync_interval < Duration::from_secs(1) {
        problems.push(Invalid::new(
            "fleet.timeout",
            "`timeout` must be positive and `resync_interval` at least 1s",
        ));
    }
    problems
}

/// Checks what serde cannot: uniqueness, coherence, patterns. Keys are
/// `listener.<name>.<field>`.
fn validate_listeners(listeners: &[ListenerConfig]) -> Vec<Invalid> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    let mut binds: Vec<SocketAddr> = Vec::new();
    for listener in listeners {
        let key = |field: &str| format!("listener.{}.{field}", listener.name);
        if listener.name.is_empty() || !names.insert(listener.name.as_str()) {
            problems.push(Invalid::new(
                "listener.name",
                format!("`{}` is empty or not unique", listener.name),
            ));
        }
        // `0.0.0.0:8443` also takes `127.0.0.1:8443`: the second bind fails.
        if let Some(other) = binds.iter().find(|&&bind| binds_overlap(bind, listener.bind)) {
            problems.push(Invalid::new(
                key("bind"),
                format!("{} overlaps another listener's {other}", listener.bind),
            ));
        }
        binds.push(listener.bind);
        if listener.bind.port() == 0 {
            problems.push(Invalid::new(key("bind"), "a listener needs a fixed port"));
        }
        if !listener.backend.contains(':') {
            problems.push(Invalid::new(
                key("backend"),
                format!("`{}` is not host:port", listener.backend),
            ));
        }
        for (field, patterns) in [
            ("allow_cn", &listener.allow_cn),
            ("allow_dns", &listener.allow_dns),
            ("allow_uri", &listener.allow_uri),
        ] {
            for error in patterns.iter().filter_map(|p| Glob::new(p).err()) {
                problems.push(Invalid::new(key(field), error.to_string()));
            }
        }
        if listener.proxy_protocol != ProxyProtocol::Off && listener.trusted_proxies.is_empty() {
            problems.push(Invalid::new(
                key("trusted_proxies"),
                "accepting PROXY headers needs the load balancer's addresses here; \
                 anyone else could claim any client address",
            ));
        }
        for (field, value) in [
            ("handshake_timeout", listener.handshake_timeout),
            ("connect_timeout", listener.connect_timeout),
            ("idle_timeout", listener.idle_timeout),
        ] {
            if value.is_zero() {
                problems.push(Invalid::new(key(field), "must be longer than 0s"));
            }
        }
        if listener.max_connections == 0 {
            problems.push(Invalid::new(key("max_connections"), "must be at least 1"));
        }
        if listener.session_lifetime > MAX_SESSION_LIFETIME {
            problems
                .push(Invalid::new(key("session_lifetime"), "must be at most 7 days (RFC 8446)"));
        }
        if listener.session_lifetime.is_zero() && listener.tls_ticket_keys.is_some() {
            problems.push(Invalid::new(
                key("tls_ticket_keys"),
                "session_lifetime = \"0s\" turns resumption off: remove one of the two",
            ));
        }
        if let Some(tls) = &listener.backend_tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            problems
                .push(Invalid::new(key("backend_tls"), "set both `cert` and `key`, or neither"));
        }
    }
    problems
}

fn valid_interface_name(name: &str) -> bool {
    // IFNAMSIZ is 16 including the terminating NUL.
    !name.is_empty()
        && name.len() < 16
        && !name.contains(['/', ' ', '\0'])
        && name != "."
        && name != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("edgegate.toml"), &Overrides::default())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse("[filter]\ninterfaces = [\"eth0\"]\nports = [8443]\n").unwrap();
        assert_eq!(config.filter.mode, AttachMode::Auto);
        assert_eq!(config.filter.scope, Scope::Ports);
        assert_eq!(config.allowlist_path(), Path::new("/var/lib/edgegate/allowlist"));
        assert_eq!(config.daemon.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(config.daemon.drain_timeout, Duration::from_secs(30));
        assert_eq!(config.tunnels(), Tunnels::standard());
        assert_eq!(config.tunnels().to_string(), "ipip, sit, gre, UDP ports 4789, 6081, 8472");
    }

    #[test]
    fn tunnels_can_be_narrowed_or_turned_off() {
        let base = "[filter]\ninterfaces = [\"eth0\"]\nports = [8443]\n";
        let config =
            parse(&format!("{base}tunnel_protocols = [\"gre\"]\ntunnel_ports = [4789]\n")).unwrap();
        assert_eq!(config.tunnels().to_string(), "gre, UDP ports 4789");
        let config = parse(&format!("{base}tunnel_protocols = []\ntunnel_ports = []\n")).unwrap();
        assert_eq!(config.tunnels().to_string(), "none");
        let error = parse(&format!("{base}tunnel_protocols = [\"esp\"]\n")).unwrap_err();
        assert!(error.to_string().contains("unknown variant `esp`"), "{error}");
    }

    #[test]
    fn overrides_win_and_move_the_default_allowlist() {
        let overrides = Overrides { state_dir: Some("/tmp/eg".into()), ..Overrides::default() };
        let config = Config::parse(
            "[filter]\ninterfaces = [\"eth0\"]\nscope = \"host\"\n",
            Path::new("x.toml"),
            &overrides,
        )
        .unwrap();
        assert_eq!(config.allowlist_path(), Path::new("/tmp/eg/allowlist"));
    }

    #[test]
    fn a_fleet_table_gets_defaults() {
        let config = parse(
            "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[fleet]\n\
             endpoints = [\"http://127.0.0.1:2379\"]\ngroup = \"partner-gate\"\n",
        )
        .unwrap();
        let fleet = config.fleet.expect("fleet mode");
        assert_eq!(fleet.prefix, "/edgegate");
        assert_eq!(fleet.resync_interval, Duration::from_secs(60));
        assert_eq!(fleet.host_id, None);
        assert!(fleet.trusted_keys.is_empty() && !fleet.insecure_plaintext);
    }

    /// Plaintext only on loopback, or when the config accepts the risk by name.
    #[test]
    fn plaintext_etcd_beyond_loopback_needs_consent() {
        let fleet = |endpoint: &str, extra: &str| {
            parse(&format!(
                "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[fleet]\n\
                 endpoints = [\"{endpoint}\"]\ngroup = \"g\"\n{extra}"
            ))
        };
        for loopback in [
            "http://127.0.0.1:2379",
            "http://127.9.0.1:2379",
            "http://[::1]:2379",
            "http://localhost:2379",
        ] {
            assert!(fleet(loopback, "").is_ok(), "{loopback}");
        }
        let error = fleet("http://10.0.1.10:2379", "").expect_err("plaintext").to_string();
        assert!(error.contains("insecure_plaintext") && error.contains("https://"), "{error}");
        assert!(fleet("http://10.0.1.10:2379", "insecure_plaintext = true").is_ok());
    }

    #[test]
    fn trusted_keys_must_be_ed25519_public_keys() {
        let text = |key: &str| {
            format!(
                "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[fleet]\n\
                 endpoints = [\"http://127.0.0.1:2379\"]\ngroup = \"g\"\ntrusted_keys = [\"{key}\"]\n"
            )
        };
        let good = format!("ed25519:{}", "A".repeat(43) + "=");
        let config = parse(&text(&good)).expect("a key");
        assert!(config.fleet.expect("fleet").trusted_keys().expect("parses").required());
        let error = parse(&text("ssh-ed25519 AAAA")).expect_err("not a key").to_string();
        assert!(
            error.contains("`fleet.trusted_keys`") && error.contains("fleet keygen"),
            "{error}"
        );
    }

    #[test]
    fn an_admin_file_needs_only_a_fleet_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.toml");
        std::fs::write(
            &path,
            "[fleet]\nendpoints = [\"https://10.0.1.10:2379\"]\ngroup = \"g\"\nca = \"/ca\"\n",
        )
        .expect("write");
        let (fleet, capacity) = load_fleet(&path).expect("admin file");
        assert_eq!((fleet.group.as_str(), capacity), ("g", DEFAULT_MAX_ENTRIES));
        std::fs::write(&path, "[filter]\ninterfaces = [\"eth0\"]\n").expect("write");
        let error = load_fleet(&path).expect_err("no fleet").to_string();
        assert!(error.contains("`fleet`"), "{error}");
    }

    /// Every `[fleet]` mistake, each named by its key.
    #[test]
    fn fleet_mistakes_are_refused_by_key() {
        let cases = [
            ("endpoints = []\ngroup = \"g\"", "fleet.endpoints"),
            ("endpoints = [\"10.0.1.10:2379\"]\ngroup = \"g\"", "fleet.endpoints"),
            ("endpoints = [\"http://10.0.1.10\"]\ngroup = \"g\"", "fleet.endpoints"),
            ("endpoints = [\"ftp://a:1\"]\ngroup = \"g\"", "fleet.endpoints"),
            (
                "endpoints = [\"http://a:1\", \"https://b:1\"]\ngroup = \"g\"\nca = \"/ca\"",
                "fleet.endpoints",
            ),
            ("endpoints = [\"https://a:1\"]\ngroup = \"g\"", "fleet.ca"),
            ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\nca = \"/ca\"", "fleet.endpoints"),
            (
                "endpoints = [\"https://a:1\"]\ngroup = \"g\"\nca = \"/ca\"\ncert = \"/c\"",
                "fleet.cert",
            ),
            ("endpoints = [\"http://a:1\"]\ngroup = \"a/b\"", "fleet.group"),
            ("endpoints = [\"http://a:1\"]\ngroup = \"\"", "fleet.group"),
            ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\nhost_id = \"x y\"", "fleet.host_id"),
            ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\nprefix = \"edgegate\"", "fleet.prefix"),
            ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\nprefix = \"/e/\"", "fleet.prefix"),
            ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\ntimeout = \"0s\"", "fleet.timeout"),
        ];
        for (fleet, key) in cases {
            let text =
                format!("[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[fleet]\n{fleet}\n");
            let error = parse(&text).expect_err(fleet).to_string();
            assert!(error.contains(&format!("`{key}`")), "{fleet}: {error}");
        }
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            ("[filter]\ninterfaces = []\nports = [1]\n", "filter.interfaces"),
            ("[filter]\ninterfaces = [\"eth0\"]\n", "filter.ports"),
            ("[filter]\ninterfaces = [\"eth0\"]\nports = [0]\n", "filter.ports"),
            ("[filter]\ninterfaces = [\"a/b\"]\nports = [1]\n", "filter.interfaces"),
            (
                "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\ntunnel_ports = [0]\n",
                "filter.tunnel_ports",
            ),
            ("[filter]\ninterfaces = [\"eth0\", \"eth0\"]\nports = [1]\n", "filter.interfaces"),
            (
                "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\ntunnel_ports = [1,2,3,4,5,6,7,8,9]\n",
                "filter.tunnel_ports",
            ),
        ];
        let listener_cases = [
            ("proxy_protocol = \"v2\"", "listener.edge.trusted_proxies"),
            ("allow_cn = [\"partner-[\"]", "listener.edge.allow_cn"),
            ("handshake_timeout = \"0s\"", "listener.edge.handshake_timeout"),
            ("max_connections = 0", "listener.edge.max_connections"),
            ("session_lifetime = \"8d\"", "listener.edge.session_lifetime"),
            (
                "session_lifetime = \"0s\"\ntls_ticket_keys = \"keys\"",
                "listener.edge.tls_ticket_keys",
            ),
            (
                "[listener.backend_tls]\nca = \"ca.pem\"\nserver_name = \"db\"\ncert = \"c.pem\"",
                "listener.edge.backend_tls",
            ),
        ];
        let listener_texts: Vec<(String, &str)> = listener_cases
            .iter()
            .map(|(extra, key)| {
                (
                    format!(
                        "[filter]\ninterfaces = [\"eth0\"]\n{}{extra}\n",
                        listener("edge", 8443)
                    ),
                    *key,
                )
            })
            .chain([(
                format!(
                    "[filter]\ninterfaces = [\"eth0\"]\n{}{}",
                    listener("edge", 8443),
                    listener("edge", 8444)
                ),
                "listener.name",
            )])
            .chain([(
                format!(
                    "[filter]\ninterfaces = [\"eth0\"]\n{}{}",
                    listener("a", 8443),
                    listener("b", 8443)
                ),
                "listener.b.bind",
            )])
            .collect();
        let cases = cases.iter().map(|(t, k)| ((*t).to_owned(), *k)).chain(listener_texts);
        for (text, key) in cases {
            let err = parse(&text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { problems, .. } if problems.len() == 1 && problems[0].key == key),
                "{text}: {err}"
            );
            assert!(err.to_string().starts_with("config edgegate.toml: "), "{err}");
        }
    }

    fn listener(name: &str, port: u16) -> String {
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"0.0.0.0:{port}\"\nbackend = \"127.0.0.1:8080\"\n\
             cert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n"
        )
    }

    #[test]
    fn listeners_whose_binds_overlap_are_refused() {
        let base = "[filter]\ninterfaces = [\"eth0\"]\n";
        let loopback = listener("second", 8443).replace("0.0.0.0:8443", "127.0.0.1:8443");
        for second in [listener("second", 8443), loopback.clone()] {
            let text = format!("{base}{}{second}", listener("edge", 8443));
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains("`listener.second.bind`"), "{error}");
            assert!(error.contains("overlaps another listener's 0.0.0.0:8443"), "{error}");
        }
        let other_port = format!("{base}{}{}", listener("edge", 8443), listener("second", 8444));
        parse(&other_port).expect("different ports");
        let ipv6 = listener("second", 8443).replace("0.0.0.0:8443", "[::1]:8443");
        parse(&format!("{base}{}{ipv6}", listener("edge", 8443))).expect("the other family");
        // `[::]` is dual-stack: it takes IPv4's 0.0.0.0 too.
        let dual = listener("second", 8443).replace("0.0.0.0:8443", "[::]:8443");
        let error = parse(&format!("{base}{}{dual}", listener("edge", 8443))).unwrap_err();
        assert!(error.to_string().contains("`listener.second.bind`"), "{error}");
    }

    #[test]
    fn listeners_get_defaults_and_protect_their_ports() {
        let text =
            format!("[filter]\ninterfaces = [\"eth0\"]\nports = [22]\n{}", listener("edge", 8443));
        let config = parse(&text).unwrap();
        let edge = &config.listeners[0];
        assert_eq!(edge.handshake_timeout, Duration::from_secs(10));
        assert_eq!(edge.connect_timeout, Duration::from_secs(5));
        assert_eq!(edge.idle_timeout, Duration::from_secs(3600));
        assert_eq!(edge.max_connections, 10_000);
        assert_eq!(edge.min_tls_version, TlsVersion::Tls12);
        assert_eq!(edge.proxy_protocol, ProxyProtocol::Off);
        assert_eq!(config.protected_ports(), BTreeSet::from([22, 8443]));
    }

    #[test]
    fn a_metrics_port_other_hosts_can_reach_is_protected() {
        let with_metrics = |bind: &str| {
            parse(&format!(
                "[filter]\ninterfaces = [\"eth0\"]\nports = [8443]\n[metrics]\nbind = \"{bind}\"\n"
            ))
        };
        for (bind, protected) in [
            ("127.0.0.1:9901", BTreeSet::from([8443])),
            ("[::1]:9901", BTreeSet::from([8443])),
            ("0.0.0.0:9901", BTreeSet::from([8443, 9901])),
            ("[::]:9901", BTreeSet::from([8443, 9901])),
            ("10.0.1.5:9902", BTreeSet::from([8443, 9902])),
        ] {
            assert_eq!(with_metrics(bind).unwrap().protected_ports(), protected, "{bind}");
        }
        let err = with_metrics("0.0.0.0:0").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { problems, .. } if problems[0].key == "metrics.bind"),
            "{err}"
        );
        assert!(with_metrics("127.0.0.1:0").is_ok(), "loopback needs no protection");
    }

    #[test]
    fn durations_say_the_accepted_format() {
        let err = parse(&format!(
            "[filter]\ninterfaces = [\"eth0\"]\n{}idle_timeout = \"10\"\n",
            listener("edge", 8443)
        ))
        .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(
            message.contains("`10` is not a duration")
                && message.contains("\"10s\", \"5m\" or \"1h\""),
            "{message}"
        );
    }

    #[test]
    fn every_unusable_value_is_reported_not_just_the_first() {
        let text = format!(
            "[filter]\ninterfaces = [\"a/b\"]\nports = [0]\nmax_entries = 0\n[metrics]\nbind = \"0.0.0.0:8443\"\n{}max_connections = 0\n",
            listener("edge", 8443)
        );
        let Err(ConfigError::Invalid { problems, .. }) = parse(&text) else {
            panic!("refused as invalid");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "listener.edge.max_connections",
                "filter.interfaces",
                "filter.ports",
                "metrics.bind",
                "filter.max_entries"
            ]
        );
    }

    #[test]
    fn syntax_errors_point_at_the_key() {
        let err = parse("[filter]\ninterfaces = [\"eth0\"]\nmode = \"turbo\"\n").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(message.contains("line 3") && message.contains("turbo"), "{message}");
        let err = parse("[filter]\ninterfaces = [\"eth0\"]\nport = [1]\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `port`"), "{err}");
    }

    /// toml says "invalid type: map, expected a sequence" of a header with
    /// the wrong brackets; the message says which brackets to write.
    #[test]
    fn table_headers_with_the_wrong_brackets_say_which_to_write() {
        let base = "[filter]\ninterfaces = [\"eth0\"]\n";
        let single =
            format!("{base}{}", listener("edge", 8443).replace("[[listener]]", "[listener]"));
        let double = base.replace("[filter]", "[[filter]]");
        let cases = [
            (single, "line 3: `[listener]` makes one table", "write `[[listener]]`"),
            (double, "line 1: `[[filter]]` starts a list of tables", "write `[filter]`"),
        ];
        for (text, cause, fix) in cases {
            let message = parse(&text).unwrap_err().to_string();
            assert!(message.contains("edgegate.toml"), "{message}");
            assert!(message.contains(cause) && message.contains(fix), "{message}");
            assert!(!message.contains("invalid type"), "{message}");
        }
        // Other type errors keep toml's own text.
        let err = parse(&format!("{base}ports = 22\n")).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }
}
