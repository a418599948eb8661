//! The one capacity rule of the rule maps. Every path that changes the list
//! applies it: a change in the daemon, a fleet commit, an `--offline`
//! change, and `check`.

use std::{collections::BTreeSet, fmt};

use ipnet::IpNet;

/// The rule maps' room per address family: `filter.max_entries`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity(pub u32);

/// An address family, as the rule maps split them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        })
    }
}

/// A list the rule maps cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {family} rules need room for {needed} entries, but the maps hold {capacity} per family"
)]
pub struct TooMany {
    pub family: Family,
    pub needed: usize,
    pub capacity: u32,
}

impl Capacity {
    /// Whether the maps can take the list `next` in place of `installed`:
    /// new rules go in before stale ones go out (so that no source allowed
    /// by both is ever dropped), so each family needs room for the union of
    /// both. A list loaded into empty maps has nothing installed.
    pub fn check(
        self,
        installed: impl IntoIterator<Item = IpNet>,
        next: impl IntoIterator<Item = IpNet>,
    ) -> Result<(), TooMany> {
        let union: BTreeSet<IpNet> = installed.into_iter().chain(next).collect();
        let ipv4 = union.iter().filter(|cidr| matches!(cidr, IpNet::V4(_))).count();
        for (family, needed) in [(Family::Ipv4, ipv4), (Family::Ipv6, union.len() - ipv4)] {
            if needed > self.0 as usize {
                return Err(TooMany { family, needed, capacity: self.0 });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(text: &str) -> Vec<IpNet> {
        text.split_whitespace().map(|cidr| cidr.parse().unwrap()).collect()
    }

    #[test]
    fn each_family_needs_room_for_both_lists_while_one_replaces_the_other() {
        let installed = cidrs("192.0.2.0/24 198.51.100.0/24 2001:db8::/32");
        let capacity = Capacity(3);
        // Kept entries count once; new ones add to the installed ones.
        assert_eq!(capacity.check(installed.clone(), cidrs("192.0.2.0/24 203.0.113.0/24")), Ok(()));
        assert_eq!(
            capacity.check(installed.clone(), cidrs("203.0.113.0/24 203.0.113.128/25")),
            Err(TooMany { family: Family::Ipv4, needed: 4, capacity: 3 })
        );
        assert_eq!(
            capacity.check(installed, cidrs("2001:db8:1::/48 2001:db8:2::/48 2001:db8:3::/48")),
            Err(TooMany { family: Family::Ipv6, needed: 4, capacity: 3 })
        );
    }

    #[test]
    fn into_empty_maps_only_the_list_counts() {
        assert_eq!(Capacity(1).check([], cidrs("192.0.2.1/32 2001:db8::1/128")), Ok(()));
        let refused = Capacity(1).check([], cidrs("192.0.2.1/32 192.0.2.2/32")).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "the IPv4 rules need room for 2 entries, but the maps hold 1 per family"
        );
    }
}
