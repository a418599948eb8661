//! The list's model: entries (a network, an action, a comment), the list
//! ordered by network, and the verdict of its longest matching prefix.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What an entry does to the sources it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn to_kernel(self) -> proxy_common::Action {
        match self {
            Self::Allow => proxy_common::Action::Allow,
            Self::Deny => proxy_common::Action::Deny,
        }
    }

    pub fn from_kernel(action: proxy_common::Action) -> Self {
        match action {
            proxy_common::Action::Allow => Self::Allow,
            proxy_common::Action::Deny => Self::Deny,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// One line of the list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub cidr: IpNet,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// The whole list, ordered by network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    pub(super) entries: BTreeMap<IpNet, Entry>,
}

impl Allowlist {
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Self {
        Self { entries: entries.into_iter().map(|e| (e.cidr, e)).collect() }
    }

    pub fn entries(&self) -> impl ExactSizeIterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn get(&self, cidr: &IpNet) -> Option<&Entry> {
        self.entries.get(cidr)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries per family: (IPv4, IPv6).
    pub fn family_sizes(&self) -> (usize, usize) {
        let v4 = self.entries.keys().filter(|c| matches!(c, IpNet::V4(_))).count();
        (v4, self.len() - v4)
    }

    /// The longest matching entry's action for `addr`, or `None` if nothing matches.
    pub fn verdict(&self, addr: IpAddr) -> Option<Action> {
        self.deciding_entry(addr).map(|e| e.action)
    }

    /// The entry that decides for `addr`: the longest matching prefix.
    pub fn deciding_entry(&self, addr: IpAddr) -> Option<&Entry> {
        let max_len = if addr.is_ipv4() { 32 } else { 128 };
        (0..=max_len).rev().find_map(|len| self.entries.get(&IpNet::new(addr, len).ok()?.trunc()))
    }
}
