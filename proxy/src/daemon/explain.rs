//! `allow explain`: the list's decision for one source and port, computed
//! from the list in force the way the XDP program decides, and checked
//! against the program itself with one test packet.

use std::{collections::BTreeSet, net::IpAddr};

use proxy_common::{Reason, Verdict};

use super::State;
use crate::{
    allowlist::{self, Allowlist, Entry},
    config::Scope,
    filter::FilterError,
    status::{ExplainedRule, Explanation},
};

impl State {
    pub(super) fn explain(
        &mut self,
        address: IpAddr,
        port: Option<u16>,
    ) -> Result<Explanation, FilterError> {
        let protected_ports = self.config.protected_ports();
        let port = port
            .or_else(|| self.config.listeners.first().map(|l| l.bind.port()))
            .or_else(|| protected_ports.first().copied())
            .unwrap_or(0);
        let scope = Scoping {
            scope: self.config.filter.scope,
            protected: &protected_ports,
            ephemeral: self.filter.ephemeral_ports(),
        };
        let (reason, entry) = decide(&self.list, &scope, address, port);
        let audit = self.filter.audit();
        let verdict = match reason.verdict() {
            Verdict::Drop if audit => Verdict::WouldDrop,
            verdict => verdict,
        };
        let kernel = self.filter.probe(address, port)?;
        let expected = if verdict == Verdict::Drop { Verdict::Drop } else { Verdict::Pass };
        // The file is read again for the line number: the operator may have
        // edited it since (then its line may be missing until a reload).
        let text = std::fs::read_to_string(&self.list_path).unwrap_or_default();
        Ok(Explanation {
            address,
            port,
            scope: scope.scope,
            protected: protected_ports.contains(&port),
            audit,
            rule: entry.map(|entry| ExplainedRule {
                cidr: entry.cidr,
                action: entry.action,
                comment: entry.comment.clone(),
                line: allowlist::line_of(&text, &entry.cidr),
                file: self.list_path.clone(),
            }),
            reason,
            verdict,
            kernel,
            agrees: kernel == expected,
        })
    }
}

/// What makes a packet subject to the list.
struct Scoping<'a> {
    scope: Scope,
    protected: &'a BTreeSet<u16>,
    /// The local ephemeral port range (host scope: replies pass).
    ephemeral: (u16, u16),
}

/// The program's decision for a TCP packet from `address` to `port`, and
/// the entry that decides (when the packet is subject to the list), or
/// that would (when it is not).
fn decide<'a>(
    list: &'a Allowlist,
    scoping: &Scoping<'_>,
    address: IpAddr,
    port: u16,
) -> (Reason, Option<&'a Entry>) {
    let entry = list.deciding_entry(address);
    let protected = scoping.protected.contains(&port);
    let (first, last) = scoping.ephemeral;
    let out_of_scope = match scoping.scope {
        Scope::Ports if !protected => Some(Reason::OutOfScope),
        Scope::Host if !protected && (first..=last).contains(&port) => Some(Reason::EphemeralPort),
        Scope::Ports | Scope::Host => None,
    };
    let reason = out_of_scope.unwrap_or(match entry.map(|e| e.action) {
        Some(allowlist::Action::Allow) => Reason::Allowed,
        Some(allowlist::Action::Deny) => Reason::Denied,
        None => Reason::Unlisted,
    });
    (reason, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_follow_the_longest_prefix_and_the_scope() {
        let list = Allowlist::parse(
            "10.0.0.0/8\ndeny 10.1.0.0/16\n10.1.2.0/24\ndeny 2001:db8::/32\n2001:db8:1::/48\n",
        )
        .unwrap();
        let protected = BTreeSet::from([8443]);
        let ports =
            Scoping { scope: Scope::Ports, protected: &protected, ephemeral: (32768, 60999) };
        let host = Scoping { scope: Scope::Host, ..ports };
        let cases = [
            (&ports, "10.9.9.9", 8443, Reason::Allowed, Some("10.0.0.0/8")),
            (&ports, "10.1.9.9", 8443, Reason::Denied, Some("10.1.0.0/16")),
            (&ports, "10.1.2.9", 8443, Reason::Allowed, Some("10.1.2.0/24")),
            (&ports, "2001:db8::1", 8443, Reason::Denied, Some("2001:db8::/32")),
            (&ports, "2001:db8:1::1", 8443, Reason::Allowed, Some("2001:db8:1::/48")),
            (&ports, "192.0.2.1", 8443, Reason::Unlisted, None),
            (&ports, "2001:db9::1", 8443, Reason::Unlisted, None),
            // Not protected: out of scope, but the entry that would decide is named.
            (&ports, "10.1.9.9", 22, Reason::OutOfScope, Some("10.1.0.0/16")),
            (&host, "192.0.2.1", 22, Reason::Unlisted, None),
            (&host, "192.0.2.1", 40000, Reason::EphemeralPort, None),
            (&host, "10.1.9.9", 8443, Reason::Denied, Some("10.1.0.0/16")),
        ];
        for (scoping, address, port, reason, cidr) in cases {
            let (got, entry) = decide(&list, scoping, address.parse().unwrap(), port);
            assert_eq!(got, reason, "{address} port {port}");
            assert_eq!(entry.map(|e| e.cidr.to_string()).as_deref(), cidr, "{address} port {port}");
        }
    }
}
