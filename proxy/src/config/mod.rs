//! The TOML configuration file, parsed into a validated [`Config`].
//!
//! The allowlist is not configuration: it is state the daemon owns (see
//! `allowlist`); the config only says where it lives.
//!
//! Layout: one file per section of the file (`listener`, `filter`, `fleet`,
//! `daemon` with `[metrics]`), `values` for what TOML has no type for, `load`
//! for reading and path resolution, `validate` for what serde cannot check,
//! and `error` for the refusals.

mod daemon;
mod error;
mod filter;
mod fleet;
mod listener;
mod load;
mod validate;
mod values;

#[cfg(test)]
mod tests;

use std::{collections::BTreeSet, path::PathBuf};

pub use self::{
    daemon::{DaemonConfig, LogFormat, MetricsConfig},
    error::{ConfigError, Invalid},
    filter::{
        AttachMode, FilterConfig, GENEVE_PORT, LINUX_VXLAN_PORT, Scope, TunnelProtocol, Tunnels,
        VXLAN_PORT,
    },
    fleet::{FleetConfig, load_fleet},
    listener::{
        BackendTlsConfig, ListenerConfig, MAX_SESSION_LIFETIME, ProxyProtocol, SendProxyProtocol,
        TlsVersion,
    },
    load::{Loaded, Overrides},
};

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

impl Config {
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
