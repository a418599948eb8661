//! What the program counted: packets and bytes per (family, reason), hits per rule.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use proxy_common::{Family, Reason, Rule, Verdict, counter_index, map};

use super::{
    Filter, FilterError, map_error,
    rules::{action_of, cidr_of},
};
use crate::{
    allowlist::Action,
    status::{CounterSnapshot, RuleHits},
};

impl Filter {
    /// Per-(family, reason) counters summed over CPUs; then, per dropping
    /// reason, what audit mode passed (verdict `would_drop`).
    pub fn counters(&self) -> Result<Vec<CounterSnapshot>, FilterError> {
        let mut snapshots = Vec::new();
        for audited in [false, true] {
            for family in Family::ALL {
                for reason in Reason::ALL.into_iter().filter(|r| !audited || !r.passes()) {
                    let per_cpu = self
                        .counters
                        .get(&counter_index(family, reason, audited), 0)
                        .map_err(map_error(map::COUNTERS))?;
                    snapshots.push(CounterSnapshot {
                        family,
                        reason,
                        verdict: if audited { Verdict::WouldDrop } else { reason.verdict() },
                        packets: per_cpu.iter().map(|c| c.packets).sum(),
                        bytes: per_cpu.iter().map(|c| c.bytes).sum(),
                    });
                }
            }
        }
        Ok(snapshots)
    }

    /// Hits per rule (both lookup structures count), busiest first.
    pub fn rule_hits(&self, limit: usize) -> Result<Vec<RuleHits>, FilterError> {
        let mut hits: BTreeMap<IpNet, (Action, u64)> = BTreeMap::new();
        let mut add = |addr: IpAddr, len: u32, rule: Rule| {
            if let Some(cidr) = cidr_of(addr, len) {
                let slot = hits.entry(cidr).or_insert((action_of(&rule), 0));
                slot.1 += rule.hits;
            }
        };
        for entry in self.v4_rules.iter() {
            let (key, rule) = entry.map_err(map_error(map::V4_RULES))?;
            add(IpAddr::from(key.data()), key.prefix_len(), rule);
        }
        for entry in self.v4_trie.iter() {
            let (key, rule) = entry.map_err(map_error(map::V4_TRIE))?;
            add(IpAddr::from(key.data()), key.prefix_len(), rule);
        }
        for entry in self.v6_rules.iter() {
            let (key, rule) = entry.map_err(map_error(map::V6_RULES))?;
            add(IpAddr::from(key.data()), key.prefix_len(), rule);
        }
        for entry in self.v6_trie.iter() {
            let (key, rule) = entry.map_err(map_error(map::V6_TRIE))?;
            add(IpAddr::from(key.data()), key.prefix_len(), rule);
        }
        let mut rules: Vec<RuleHits> = hits
            .into_iter()
            .filter(|(_, (_, hits))| *hits > 0)
            .map(|(cidr, (action, hits))| RuleHits { cidr, action, hits })
            .collect();
        rules.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.cidr.cmp(&b.cidr)));
        rules.truncate(limit);
        Ok(rules)
    }
}
