//! `[daemon]` and `[metrics]`: the daemon's own paths, user, drain time and
//! log format, and where its HTTP endpoint listens.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{DEFAULT_BPFFS_DIR, DEFAULT_CONTROL_SOCKET, DEFAULT_STATE_DIR, values::duration};

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
