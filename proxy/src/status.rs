//! What the daemon publishes about itself. `edgegate status` (over the
//! control socket), `/metrics` and `/readyz` read these snapshots, never the
//! daemon's state: the filter and the proxy fill them in, `daemon::State`
//! assembles them, and the readers depend on this module alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::PathBuf,
};

use ipnet::IpNet;
use proxy_common::{Family, Framing, Lookup, Reason, Verdict};
use serde::{Deserialize, Serialize};

use crate::{
    allowlist::{Action, Diff},
    config::{Scope, Tunnels},
};

/// Text the worker sent (or a peer's certificate carried), made safe to
/// print and log: control characters escaped (`\u{1b}`, `\n`), so that it can
/// neither forge a log line nor reach a terminal as a command.
pub fn quoted(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len());
    push_quoted(&mut quoted, text);
    quoted
}

/// [`quoted`], appended to `out`.
pub fn push_quoted(out: &mut String, text: &str) {
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// What `edgegate status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub interfaces: Vec<Attachment>,
    pub scope: Scope,
    /// Audit mode: nothing is dropped; would-be drops are counted.
    #[serde(default)]
    pub audit: bool,
    /// The listeners' ports, `filter.ports`, and the metrics port when exposed.
    pub protected_ports: BTreeSet<u16>,
    /// Tunnels judged by their outer source (ports scope; absent from an
    /// older daemon's answer: it judged none).
    #[serde(default)]
    pub tunnels: Tunnels,
    pub allowlist: PathBuf,
    pub ipv4_entries: usize,
    pub ipv6_entries: usize,
    pub ipv4_lookup: Lookup,
    pub ipv6_lookup: Lookup,
    pub capacity_per_family: u32,
    pub counters: Vec<CounterSnapshot>,
    pub top_rules: Vec<RuleHits>,
    /// The sampled sources with the most dropped (or, in audit mode,
    /// would-be dropped) packets; only when asked for.
    #[serde(default)]
    pub dropped_sources: Vec<DroppedSourceStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// With `[fleet]`: where this host stands in its group.
    pub fleet: Option<FleetStatus>,
    /// The gate: this process, which holds the filter.
    pub gate_pid: u32,
    /// The sandboxed process that serves the listeners.
    pub worker: WorkerStatus,
}

/// The proxy worker, as the gate sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// While one serves.
    pub pid: Option<u32>,
    /// The account it runs as.
    pub user: String,
    /// Why none serves, while none does.
    pub down: Option<String>,
    /// Workers started again after one died.
    pub restarts: u64,
    /// What its sandbox enforces (as the worker reports it; uid, capabilities,
    /// `no_new_privs` and seccomp are checked by the gate from `/proc`).
    pub sandbox: Option<crate::privsep::protocol::SandboxReport>,
    /// Where it may connect to (enforced by the gate, see `daemon::egress`).
    /// Absent from an older daemon's answer.
    #[serde(default)]
    pub egress: EgressStatus,
}

/// The worker's egress filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressStatus {
    /// Connections are limited to `destinations`.
    pub confined: bool,
    /// The workers' cgroup, in the cgroup v2 hierarchy.
    pub cgroup: Option<String>,
    /// The backends' addresses and ports: all the worker may connect to.
    pub destinations: Vec<String>,
    /// Connections the filter refused since the gate started.
    pub refused: u64,
    /// Why it is not confined (`daemon.allow_unconfined_egress` let the gate start).
    pub unconfined_reason: Option<String>,
}

/// This host's view of its group (fleet mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub group: String,
    pub host: String,
    /// The watch on the group's list is up.
    pub connected: bool,
    /// The generation in force here (0: none from the group yet).
    pub applied_generation: u64,
    pub applied_entries: usize,
    pub applied_at_ms: Option<u64>,
    /// The newest generation seen in etcd.
    pub current_generation: Option<u64>,
    /// Seconds since etcd last answered (0 while connected; `None`: never).
    pub stale_seconds: Option<f64>,
    pub watch_restarts: BTreeMap<String, u64>,
    /// Newer generations put in force after a re-read rather than by the watch.
    pub resyncs: u64,
    pub apply_errors: u64,
    pub last_error: Option<String>,
    /// Generations in etcd refused here, by reason (`unsigned`, `rollback`, …).
    #[serde(default)]
    pub refusals: BTreeMap<String, u64>,
    /// Why the newest refused generation was refused, until one is put in force.
    #[serde(default)]
    pub last_refusal: Option<String>,
    /// Fingerprints of `trusted_keys` (empty: any etcd writer decides the list).
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Times the follower of the group's list stopped and was started again.
    #[serde(default)]
    pub follower_restarts: u64,
}

impl FleetStatus {
    /// What an operator must know about who decides this host's list.
    pub fn trust_warning(&self) -> Option<String> {
        self.trusted_keys.is_empty().then(|| {
            "no `trusted_keys`: anyone who can write the group's keys in etcd decides this \
             host's list"
                .to_owned()
        })
    }

    /// Why this host may enforce an outdated list, if it may.
    pub fn staleness(&self) -> Option<String> {
        if self.connected {
            return None;
        }
        Some(match self.stale_seconds {
            Some(seconds) => format!(
                "etcd unreachable for {seconds:.0} s; enforcing generation {}",
                self.applied_generation
            ),
            None => format!(
                "etcd not reached since start; enforcing generation {} (the local file)",
                self.applied_generation
            ),
        })
    }
}

/// `edgegate fleet status`: the group's generation and every host's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    pub group: String,
    /// The group's generation (`None`: no list committed yet).
    pub current_generation: Option<u64>,
    pub committed_at_ms: Option<u64>,
    pub committed_by: Option<String>,
    pub hosts: Vec<FleetHost>,
}

/// One host of the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetHost {
    pub host: String,
    /// Its lease is alive: the daemon runs and reaches etcd.
    pub alive: bool,
    pub generation: u64,
    pub applied_at_ms: u64,
    /// Generations behind the group's.
    pub lag: u64,
    pub version: String,
}

/// How a configured interface came to be filtered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachedMode,
    /// How the interface's frames start, which picks the program attached
    /// (absent from an older daemon's answer: it read Ethernet only).
    #[serde(default)]
    pub framing: Framing,
    /// The link was pinned by an earlier daemon and taken over.
    pub adopted: bool,
}

/// The mode an interface's program actually runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Native,
    Skb,
}

impl AttachedMode {
    pub const ALL: [Self; 2] = [Self::Native, Self::Skb];

    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Skb => "skb",
        }
    }
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Sums of the per-CPU counters for one (family, reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub family: Family,
    pub reason: Reason,
    pub verdict: Verdict,
    pub packets: u64,
    pub bytes: u64,
}

/// Hits of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHits {
    pub cidr: IpNet,
    pub action: Action,
    pub hits: u64,
}

/// `edgegate allow explain`: what decides for one source and port, from
/// the list in force and from the loaded program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub address: std::net::IpAddr,
    pub port: u16,
    pub scope: Scope,
    /// The port is protected (a listener's, `filter.ports`, or the metrics port).
    pub protected: bool,
    pub audit: bool,
    /// The longest matching entry; consulted only when the packet is subject
    /// to the list (`reason` is then `allowed` or `denied`).
    pub rule: Option<ExplainedRule>,
    /// The list's decision, as the program names it.
    pub reason: Reason,
    /// What the list's decision means for the packet (`would_drop` in audit mode).
    pub verdict: Verdict,
    /// What the loaded program did with a test packet (`pass` or `drop`).
    pub kernel: Verdict,
    /// The kernel did what the verdict says.
    pub agrees: bool,
}

/// The entry behind an explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainedRule {
    pub cidr: IpNet,
    pub action: Action,
    pub comment: Option<String>,
    /// Its line in the allowlist file, if the file lists it.
    pub line: Option<usize>,
    pub file: PathBuf,
}

/// One source of the drop sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedSourceStatus {
    pub source: std::net::IpAddr,
    /// The verdict's reason at the latest record: `denied` or `unlisted`.
    pub reason: Reason,
    /// Exact while the drops are few; past 256 a second per CPU an estimate
    /// (one drop in up to 1024 is recorded, counting for that many).
    pub packets: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// What `edgegate status` shows for a listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub bind: SocketAddr,
    pub backend: String,
    pub active: u64,
    pub handshakes_ok: u64,
    /// Rejections by reason (only reasons seen).
    pub rejected: BTreeMap<String, u64>,
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
    /// Handshakes that ended without a backend (unreachable, TLS refused).
    pub backend_failures: u64,
    /// Relays cut by a socket or TLS error.
    pub relay_errors: u64,
    /// When the certificates and CRLs in force stop being usable.
    pub lifetimes: Vec<crate::tls::Lifetime>,
}

/// What a reload did to one listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub listener: String,
    pub result: ReloadResult,
}

/// The fate of one listener in a reload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum ReloadResult {
    /// New settings and files are in force for new connections.
    Reloaded,
    /// A listener new in the config accepts connections.
    Started,
    /// A listener gone from the config (or moved) no longer accepts.
    Stopped,
    /// Its new files did not load: it serves on with the previous ones.
    KeptPrevious(String),
    /// A listener new in the config could not start.
    NotStarted(String),
}

impl ReloadResult {
    /// Whether the reload did not do what the config asked for.
    pub fn failed(&self) -> bool {
        matches!(self, Self::KeptPrevious(_) | Self::NotStarted(_))
    }
}

impl std::fmt::Display for ReloadResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reloaded => f.write_str("reloaded"),
            Self::Started => f.write_str("started"),
            Self::Stopped => f.write_str("stopped"),
            Self::KeptPrevious(why) => write!(f, "kept previous: {why}"),
            Self::NotStarted(why) => write!(f, "not started: {why}"),
        }
    }
}

/// What a reload made of the allowlist file (which may have been edited by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ListReload {
    /// The file holds the list in force.
    Unchanged,
    /// The file differed; its list is now in force.
    Applied { diff: Diff, entries: usize },
    /// The file is refused as a whole; the list in force stays.
    Kept { reason: String },
    /// Fleet mode: the list is the group's, from etcd; the file is its cache.
    Fleet { group: String },
}

impl fmt::Display for ListReload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unchanged => f.write_str("unchanged"),
            Self::Applied { diff, entries } => write!(
                f,
                "re-read: {} added, {} removed, {} updated; {entries} entries in force",
                diff.added, diff.removed, diff.updated
            ),
            Self::Kept { reason } => write!(f, "kept the list in force: {reason}"),
            Self::Fleet { group } => write!(
                f,
                "not re-read: the list is group `{group}`'s, from etcd (the file is its cache)"
            ),
        }
    }
}

/// What one scrape or probe sees.
pub struct Observation {
    pub status: Status,
    /// Why `/readyz` answers 503, if it does.
    pub ready: Result<(), NotReady>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Fleet mode: seconds from a commit to its enforcement here.
    pub fleet_propagation: Option<prometheus_client::metrics::histogram::Histogram>,
}

/// Why the daemon is not ready to serve (`/readyz` answers 503 with this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// The interface's XDP link no longer holds the program.
    #[error("`{interface}`: the XDP program is no longer attached")]
    Detached { interface: String },
    /// The interface was deleted and created again: the link points at the old one.
    #[error("`{interface}` was recreated; the XDP program is not on it")]
    Recreated { interface: String },
    /// The interface is gone.
    #[error("`{interface}` no longer exists")]
    Gone { interface: String },
    /// The link's state cannot be read.
    #[error("`{interface}`: its XDP link cannot be read ({reason})")]
    Unreadable { interface: String, reason: String },
    /// A listener's accept loop has ended.
    #[error("listener `{listener}` is not accepting")]
    NotAccepting { listener: String },
    /// No proxy worker serves the listeners (it is starting, or died).
    #[error("no proxy worker serves: {reason}")]
    NoWorker { reason: String },
    /// The filter's maps could not be read.
    #[error("cannot read the filter's state: {reason}")]
    Unobservable { reason: String },
}

#[cfg(test)]
mod tests {
    use super::{AttachedMode, Attachment, quoted};
    use proxy_common::Framing;

    /// During an upgrade the new CLI may read an older daemon's status.
    #[test]
    fn an_older_daemons_attachment_reads_as_ethernet() {
        let old = r#"{"interface":"eth0","mode":"native","adopted":false}"#;
        let attachment: Attachment = serde_json::from_str(old).expect("an older answer");
        assert_eq!(attachment.framing, Framing::Ethernet);
        assert_eq!(attachment.mode, AttachedMode::Native);
    }

    #[test]
    fn worker_text_cannot_forge_a_line_or_drive_a_terminal() {
        assert_eq!(quoted("edge: bad key"), "edge: bad key");
        assert_eq!(
            quoted("a\n2026-12-06T00:00:00Z INFO forged"),
            "a\\n2026-12-06T00:00:00Z INFO forged"
        );
        assert_eq!(quoted("\u{1b}[2Jx\r\t"), "\\u{1b}[2Jx\\r\\t");
        assert_eq!(quoted("CN=Grüße"), "CN=Grüße");
    }
}
