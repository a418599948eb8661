//! Keeping the rule maps equal to the list: capacity, the order of updates,
//! the lookup strategy per family, and the protected ports.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{Array, MapData, MapError, lpm_trie::Key};
use ipnet::IpNet;
use proxy_common::{FilterConfig as KernelConfig, Lookup, PORT_BITMAP_WORDS, Rule, map};

use super::{Capacity, Filter, FilterError, map_error, prefilter};
use crate::allowlist::{Action, Allowlist};

impl Filter {
    /// Makes the rule maps hold exactly `list`.
    ///
    /// Ordered so that no source allowed by both the current and the new list
    /// is dropped at any instant: first every new or changed rule is written,
    /// longest prefixes first, then every stale rule is removed, shortest
    /// prefixes first. (Writing a short rule before a longer one of the new
    /// list, or removing a long rule before a shorter old one, could expose a
    /// deny in between.) The lookup configuration covers the union of both
    /// lists until the end.
    pub fn apply(&mut self, list: &Allowlist) -> Result<(), FilterError> {
        self.check_capacity(list)?;
        let desired: BTreeMap<IpNet, Action> = list.entries().map(|e| (e.cidr, e.action)).collect();

        let mut upserts: Vec<(IpNet, Action)> = desired
            .iter()
            .filter(|(cidr, action)| self.installed.get(cidr) != Some(action))
            .map(|(cidr, action)| (*cidr, *action))
            .collect();
        let mut removals: Vec<IpNet> =
            self.installed.keys().filter(|c| !desired.contains_key(c)).copied().collect();
        if upserts.is_empty() && removals.is_empty() {
            return Ok(());
        }
        upserts.sort_by_key(|(cidr, _)| std::cmp::Reverse(cidr.prefix_len()));
        removals.sort_by_key(IpNet::prefix_len);

        let mut union = self.installed.clone();
        union.extend(desired.iter().map(|(c, a)| (*c, *a)));
        self.config = lookup_config(&union, self.config);
        self.write_config()?;
        self.write_prefilters(&union);
        for (cidr, action) in upserts {
            self.insert_rule(cidr, action)?;
            self.installed.insert(cidr, action);
        }
        // With nothing to remove the union is the result, already written.
        if removals.is_empty() {
            return Ok(());
        }
        for cidr in removals {
            self.remove_rule(cidr)?;
            self.installed.remove(&cidr);
        }
        self.config = lookup_config(&self.installed, self.config);
        self.write_config()?;
        self.write_prefilters(&self.installed);
        Ok(())
    }

    /// Makes both prefilters hold what `rules` need.
    pub(super) fn write_prefilters(&self, rules: &BTreeMap<IpNet, Action>) {
        self.v4_prefilter.write(&prefilter::bits(rules.keys(), false));
        self.v6_prefilter.write(&prefilter::bits(rules.keys(), true));
    }

    /// Refuses, before touching any map, a list that would not fit while it replaces the current one.
    pub fn check_capacity(&self, list: &Allowlist) -> Result<(), FilterError> {
        let next = list.entries().map(|entry| entry.cidr);
        Capacity(self.capacity)
            .check(self.installed.keys().copied(), next)
            .map_err(FilterError::Capacity)
    }

    pub(super) fn insert_rule(&mut self, cidr: IpNet, action: Action) -> Result<(), FilterError> {
        let rule = Rule::new(action.to_kernel());
        match cidr {
            IpNet::V4(net) => {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                self.v4_rules.insert(key, rule, 0).map_err(map_error(map::V4_RULES))?;
                self.v4_trie.insert(&key, rule, 0).map_err(map_error(map::V4_TRIE))
            }
            IpNet::V6(net) => {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                self.v6_rules.insert(key, rule, 0).map_err(map_error(map::V6_RULES))?;
                self.v6_trie.insert(&key, rule, 0).map_err(map_error(map::V6_TRIE))
            }
        }
    }

    pub(super) fn remove_rule(&mut self, cidr: IpNet) -> Result<(), FilterError> {
        match cidr {
            IpNet::V4(net) => {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                ignore_missing(self.v4_rules.remove(&key)).map_err(map_error(map::V4_RULES))?;
                ignore_missing(self.v4_trie.remove(&key)).map_err(map_error(map::V4_TRIE))
            }
            IpNet::V6(net) => {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                ignore_missing(self.v6_rules.remove(&key)).map_err(map_error(map::V6_RULES))?;
                ignore_missing(self.v6_trie.remove(&key)).map_err(map_error(map::V6_TRIE))
            }
        }
    }

    /// The rules the (possibly adopted) maps hold. The hash maps are the
    /// reference; the tries always hold the same keys.
    pub(super) fn read_installed(&self) -> Result<BTreeMap<IpNet, Action>, FilterError> {
        let mut installed = BTreeMap::new();
        for entry in self.v4_rules.iter() {
            let (key, rule) = entry.map_err(map_error(map::V4_RULES))?;
            if let Some(cidr) = cidr_of(IpAddr::from(key.data()), key.prefix_len()) {
                installed.insert(cidr, action_of(&rule));
            }
        }
        for entry in self.v6_rules.iter() {
            let (key, rule) = entry.map_err(map_error(map::V6_RULES))?;
            if let Some(cidr) = cidr_of(IpAddr::from(key.data()), key.prefix_len()) {
                installed.insert(cidr, action_of(&rule));
            }
        }
        Ok(installed)
    }

    pub(super) fn write_config(&mut self) -> Result<(), FilterError> {
        self.kernel_config.set(0, self.config, 0).map_err(map_error(map::CONFIG))
    }

    /// Sets the protected ports (`filter.ports` and the listeners' ports).
    pub fn set_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), FilterError> {
        let mut ports_map: Array<&mut MapData, u64> = Array::try_from(
            self.ebpf.map_mut(map::PORTS).expect("the object defines the ports map"),
        )
        .map_err(map_error(map::PORTS))?;
        let mut words = [0u64; PORT_BITMAP_WORDS as usize];
        for &port in ports {
            words[usize::from(port / 64)] |= 1 << (port % 64);
        }
        for (index, word) in (0..).zip(words) {
            ports_map.set(index, word, 0).map_err(map_error(map::PORTS))?;
        }
        Ok(())
    }

    /// Switches audit mode: the program reads the config map on every
    /// packet, so the next packet is judged in the new mode.
    pub fn set_audit(&mut self, audit: bool) -> Result<(), FilterError> {
        self.config.audit = u32::from(audit);
        self.write_config()
    }

    pub fn audit(&self) -> bool {
        self.config.audit != 0
    }

    /// The local ephemeral port range, as host scope exempts it.
    pub fn ephemeral_ports(&self) -> (u16, u16) {
        (self.config.ephemeral_first, self.config.ephemeral_last)
    }

    /// The lookup strategy in force per family: (IPv4, IPv6).
    pub fn lookups(&self) -> (Lookup, Lookup) {
        (Lookup::from_raw(self.config.v4_lookup), Lookup::from_raw(self.config.v6_lookup))
    }
}

pub(super) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

pub(super) fn action_of(rule: &Rule) -> Action {
    Action::from_kernel(proxy_common::Action::from_raw(rule.action))
}

pub(super) fn cidr_of(addr: IpAddr, prefix_len: u32) -> Option<IpNet> {
    IpNet::new(addr, u8::try_from(prefix_len).ok()?).ok()
}

/// Lookup strategy and prefix-length masks for the rules in `rules`.
pub(super) fn lookup_config(rules: &BTreeMap<IpNet, Action>, base: KernelConfig) -> KernelConfig {
    let mut v4_lengths = 0u64;
    let mut v6_lengths = [0u64; 3];
    for cidr in rules.keys() {
        let len = cidr.prefix_len();
        match cidr {
            IpNet::V4(_) => v4_lengths |= 1 << len,
            IpNet::V6(_) => v6_lengths[usize::from(len / 64)] |= 1 << (len % 64),
        }
    }
    let choose = |distinct: u32| {
        if distinct > proxy_common::MAX_PER_LENGTH_LOOKUPS {
            Lookup::Trie as u32
        } else {
            Lookup::PerLength as u32
        }
    };
    KernelConfig {
        v4_lookup: choose(v4_lengths.count_ones()),
        v6_lookup: choose(v6_lengths.iter().map(|w| w.count_ones()).sum()),
        v4_lengths,
        v6_lengths,
        ..base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_lengths_use_per_length_lookup_many_use_the_trie() {
        let few: BTreeMap<IpNet, Action> =
            [("10.0.0.0/8", Action::Allow), ("10.1.2.3/32", Action::Deny)]
                .map(|(c, a)| (c.parse().unwrap(), a))
                .into();
        let config = lookup_config(&few, KernelConfig::EMPTY);
        assert_eq!(config.v4_lookup, Lookup::PerLength as u32);
        assert_eq!(config.v4_lengths, (1 << 8) | (1 << 32));

        let many: BTreeMap<IpNet, Action> = (8..=30u8)
            .map(|len| (IpNet::new("10.0.0.0".parse().unwrap(), len).unwrap(), Action::Allow))
            .chain([("2001:db8::/128".parse().unwrap(), Action::Allow)])
            .collect();
        let config = lookup_config(&many, KernelConfig::EMPTY);
        assert_eq!(config.v4_lookup, Lookup::Trie as u32);
        assert_eq!(config.v6_lookup, Lookup::PerLength as u32);
        assert_eq!(config.v6_lengths, [0, 0, 1]);
    }
}
