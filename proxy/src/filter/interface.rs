//! What the filter must know about an interface before attaching to it: how
//! its frames start (which of the object's programs reads them) and, on
//! ENA, what keeps native XDP off. Read through the kernel (ioctls), not
//! `/sys`: `nsenter --net` keeps the host's `/sys`.

use std::fmt;

use proxy_common::Framing;

use super::{
    FilterError,
    sys::{interface_driver, interface_link_type, interface_mtu, interface_queues},
};

/// The largest MTU with which ENA, EC2's NIC, runs native XDP: above it
/// `mode = "auto"` falls back to generic XDP.
const ENA_XDP_MAX_MTU: u32 = 3498;

/// The driver of EC2's Elastic Network Adapter.
const ENA_DRIVER: &str = "ena";

/// `ARPHRD_IP6GRE` and `ARPHRD_RAWIP` (`linux/if_arp.h`), which libc lacks.
const ARPHRD_IP6GRE: u16 = 823;
const ARPHRD_RAWIP: u16 = 519;

/// Link types (`ARPHRD_*`) the program can read, and how their frames start.
const KNOWN_LINK_TYPES: [(u16, Framing); 10] = [
    (libc::ARPHRD_ETHER, Framing::Ethernet),
    (libc::ARPHRD_LOOPBACK, Framing::Ethernet),
    // TUN and WireGuard devices (`link/none`).
    (libc::ARPHRD_NONE, Framing::Ip),
    (libc::ARPHRD_TUNNEL, Framing::Ip),
    (libc::ARPHRD_TUNNEL6, Framing::Ip),
    (libc::ARPHRD_SIT, Framing::Ip),
    (libc::ARPHRD_IPGRE, Framing::Ip),
    (ARPHRD_IP6GRE, Framing::Ip),
    (libc::ARPHRD_PPP, Framing::Ip),
    (ARPHRD_RAWIP, Framing::Ip),
];

/// How frames of link type `link_type` start, if the program can read them.
pub fn framing_of(link_type: u16) -> Option<Framing> {
    KNOWN_LINK_TYPES.iter().find(|(known, _)| *known == link_type).map(|(_, framing)| *framing)
}

/// How frames start on `interface`, or why the program cannot read them.
pub fn framing(interface: &str) -> Result<Framing, FilterError> {
    let link_type = interface_link_type(interface)
        .ok_or_else(|| FilterError::UnknownInterface { name: interface.to_owned() })?;
    framing_of(link_type).ok_or_else(|| FilterError::UnsupportedLinkType {
        interface: interface.to_owned(),
        link_type,
    })
}

/// Combined (RX and TX) queues of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queues {
    pub in_use: u32,
    /// The most the driver offers.
    pub max: u32,
}

/// Something that makes ENA refuse native XDP, with its fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnaObstacle {
    /// ENA runs native XDP only up to [`ENA_XDP_MAX_MTU`].
    Mtu { interface: String, mtu: u32 },
    /// ENA runs native XDP only with at most half its queues in use: the
    /// other half carries XDP's own transmit queues.
    Queues { interface: String, queues: Queues },
}

impl fmt::Display for EnaObstacle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mtu { interface, mtu } => write!(
                f,
                "`{interface}` has MTU {mtu}, and ENA (EC2's NIC) runs native XDP only up to \
                 {ENA_XDP_MAX_MTU}: lower it with `ip link set dev {interface} mtu \
                 {ENA_XDP_MAX_MTU}` and make that persistent (docs/ec2.md: EC2's MTU)"
            ),
            Self::Queues { interface, queues } if queues.max < 2 => write!(
                f,
                "`{interface}` has {} queue(s), and ENA (EC2's NIC) runs native XDP only with \
                 at most half its queues in use: native XDP is impossible on it (an instance \
                 type with more queues has it)",
                queues.max
            ),
            Self::Queues { interface, queues } => write!(
                f,
                "`{interface}` uses {} of its {} queues, and ENA (EC2's NIC) runs native XDP only \
                 with at most half in use: run `ethtool -L {interface} combined {}` and make \
                 that persistent (docs/ec2.md: EC2's queues)",
                queues.in_use,
                queues.max,
                queues.max / 2
            ),
        }
    }
}

/// What keeps ENA from running native XDP on `interface`; nothing for
/// other drivers, whose limits edgegate does not know.
pub fn ena_obstacles(interface: &str) -> Vec<EnaObstacle> {
    if interface_driver(interface).as_deref() != Some(ENA_DRIVER) {
        return Vec::new();
    }
    obstacles(interface, interface_mtu(interface), interface_queues(interface))
}

fn obstacles(interface: &str, mtu: Option<u32>, queues: Option<Queues>) -> Vec<EnaObstacle> {
    let interface = interface.to_owned();
    let mut found = Vec::new();
    if let Some(mtu) = mtu.filter(|&mtu| mtu > ENA_XDP_MAX_MTU) {
        found.push(EnaObstacle::Mtu { interface: interface.clone(), mtu });
    }
    if let Some(queues) = queues.filter(|q| q.in_use > q.max / 2) {
        found.push(EnaObstacle::Queues { interface, queues });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_three_devices_are_read_from_the_ip_header() {
        for link_type in [
            libc::ARPHRD_NONE,
            libc::ARPHRD_TUNNEL,
            libc::ARPHRD_TUNNEL6,
            libc::ARPHRD_SIT,
            libc::ARPHRD_IPGRE,
            ARPHRD_IP6GRE,
            libc::ARPHRD_PPP,
            ARPHRD_RAWIP,
        ] {
            assert_eq!(framing_of(link_type), Some(Framing::Ip), "link type {link_type}");
        }
        for link_type in [libc::ARPHRD_ETHER, libc::ARPHRD_LOOPBACK] {
            assert_eq!(framing_of(link_type), Some(Framing::Ethernet), "link type {link_type}");
        }
    }

    #[test]
    fn unknown_link_types_are_not_guessed() {
        for link_type in [libc::ARPHRD_INFINIBAND, libc::ARPHRD_IEEE80211_RADIOTAP, 0xffff] {
            assert_eq!(framing_of(link_type), None, "link type {link_type}");
        }
    }

    #[test]
    fn ena_refuses_native_xdp_above_its_mtu_and_with_more_than_half_its_queues() {
        let queues = |in_use, max| Some(Queues { in_use, max });
        assert_eq!(obstacles("ens5", Some(1500), queues(4, 8)), vec![]);
        assert_eq!(obstacles("ens5", Some(ENA_XDP_MAX_MTU), queues(1, 2)), vec![]);
        assert_eq!(
            obstacles("ens5", Some(9001), queues(8, 8)),
            vec![
                EnaObstacle::Mtu { interface: "ens5".into(), mtu: 9001 },
                EnaObstacle::Queues {
                    interface: "ens5".into(),
                    queues: Queues { in_use: 8, max: 8 }
                },
            ]
        );
        assert_eq!(
            obstacles("ens5", None, queues(5, 8)),
            vec![EnaObstacle::Queues {
                interface: "ens5".into(),
                queues: Queues { in_use: 5, max: 8 }
            }]
        );
        let queues =
            EnaObstacle::Queues { interface: "ens5".into(), queues: Queues { in_use: 8, max: 8 } };
        assert!(queues.to_string().contains("ethtool -L ens5 combined 4"), "{queues}");
        let single =
            EnaObstacle::Queues { interface: "ens5".into(), queues: Queues { in_use: 1, max: 1 } };
        assert_eq!(
            obstacles("ens5", Some(1500), Some(Queues { in_use: 1, max: 1 })),
            vec![single.clone()]
        );
        assert!(
            single.to_string().contains("impossible") && !single.to_string().contains("ethtool")
        );
    }
}
