//! `[filter]`: where the XDP program is attached, what it protects (ports or
//! host scope, tunnels judged by their outer source) and the maps' capacity.

use std::{collections::BTreeSet, path::PathBuf};

use serde::Deserialize;

use super::DEFAULT_MAX_ENTRIES;

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

pub(super) fn default_max_entries() -> u32 {
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
