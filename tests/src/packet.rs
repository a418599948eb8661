//! Builders for the frames the XDP tests feed to BPF_PROG_TEST_RUN. Each
//! builder also reports how many bytes the filter must see to decide
//! (`needed`): every shorter cut of the frame is a truncation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const TPID_VLAN: u16 = 0x8100;
pub const TPID_QINQ: u16 = 0x88a8;

/// What follows the IP header(s).
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Tcp {
        dst_port: u16,
    },
    Udp {
        dst_port: u16,
    },
    /// ICMP (IPv4) echo request.
    Icmp,
    /// ICMPv6 with the given type.
    Icmpv6 {
        kind: u8,
    },
    /// A tunnel protocol (ipip 4, IPv6 41, GRE 47) and a payload the
    /// filter never reads.
    Tunnel {
        protocol: u8,
    },
}

impl Transport {
    fn protocol(self, ipv6: bool) -> u8 {
        match self {
            Self::Tcp { .. } => 6,
            Self::Udp { .. } => 17,
            Self::Icmp if ipv6 => 58,
            Self::Icmp => 1,
            Self::Icmpv6 { .. } => 58,
            Self::Tunnel { protocol } => protocol,
        }
    }

    /// The header bytes, and how many of them the filter reads (0 if none).
    fn bytes(self) -> (Vec<u8>, usize) {
        match self {
            Self::Tcp { dst_port } => {
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
                tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
                tcp[12] = 5 << 4;
                tcp[13] = 0x02; // SYN
                (tcp, 4)
            }
            Self::Udp { dst_port } => {
                let mut udp = vec![0u8; 8];
                udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
                udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
                udp[4..6].copy_from_slice(&8u16.to_be_bytes());
                (udp, 4)
            }
            Self::Icmp => (vec![8, 0, 0, 0, 0, 1, 0, 1], 0),
            Self::Icmpv6 { kind } => (vec![kind, 0, 0, 0, 0, 0, 0, 0], 4),
            Self::Tunnel { .. } => (vec![0x45; 28], 0),
        }
    }
}

/// An IPv6 extension header to put between the fixed header and the transport.
#[derive(Clone, Copy, Debug)]
pub enum Extension {
    HopByHop,
    Routing,
    DestinationOptions,
    /// Fragment header with this offset (in 8-byte units) and more-fragments flag.
    Fragment {
        offset: u16,
        more: bool,
    },
    Authentication,
}

impl Extension {
    fn protocol(self) -> u8 {
        match self {
            Self::HopByHop => 0,
            Self::Routing => 43,
            Self::DestinationOptions => 60,
            Self::Fragment { .. } => 44,
            Self::Authentication => 51,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            // 16 bytes: length field 1 (units of 8 beyond the first 8), padded with PadN.
            Self::HopByHop | Self::DestinationOptions => {
                let mut header = vec![next, 1, 1, 12];
                header.resize(16, 0);
                header
            }
            // Type 0 routing header with no addresses left: 8 bytes.
            Self::Routing => vec![next, 0, 0, 0, 0, 0, 0, 0],
            Self::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(more);
                let [high, low] = field.to_be_bytes();
                vec![next, 0, high, low, 0, 0, 0, 42]
            }
            // Payload length 4 means (4 + 2) * 4 = 24 bytes.
            Self::Authentication => {
                let mut header = vec![next, 4, 0, 0];
                header.resize(24, 0);
                header
            }
        }
    }
}

/// IPv4 fragmentation fields.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fragment {
    /// In 8-byte units.
    pub offset: u16,
    pub more: bool,
}

/// A frame, and the prefix of it the filter needs to decide.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub needed: usize,
}

/// An IPv4 packet (no link layer). `options` must be a multiple of 4 bytes.
pub fn ipv4(src: Ipv4Addr, transport: Transport, options: &[u8], fragment: Fragment) -> Frame {
    assert_eq!(options.len() % 4, 0, "IPv4 options come in 4-byte words");
    let header_len = 20 + options.len();
    let (payload, read) = transport.bytes();
    let mut packet = vec![0u8; header_len];
    packet[0] = 0x40 | u8::try_from(header_len / 4).expect("IHL fits");
    let total = u16::try_from(header_len + payload.len()).expect("small packet");
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    let flags = (fragment.offset & 0x1fff) | if fragment.more { 0x2000 } else { 0 };
    packet[6..8].copy_from_slice(&flags.to_be_bytes());
    packet[8] = 64;
    packet[9] = transport.protocol(false);
    packet[12..16].copy_from_slice(&src.octets());
    packet[16..20].copy_from_slice(&[192, 0, 2, 1]);
    packet[20..header_len].copy_from_slice(options);
    let later_fragment = fragment.offset != 0;
    let needed = header_len + if later_fragment { 0 } else { read };
    packet.extend_from_slice(&payload);
    Frame { bytes: packet, needed }
}

/// An IPv6 packet (no link layer) with `extensions` in order.
pub fn ipv6(src: Ipv6Addr, extensions: &[Extension], transport: Transport) -> Frame {
    let (payload, read) = transport.bytes();
    let mut chain = Vec::new();
    let mut later_fragment = false;
    for (index, extension) in extensions.iter().enumerate() {
        let next = extensions.get(index + 1).map_or(transport.protocol(true), |e| e.protocol());
        chain.extend_from_slice(&extension.bytes(next));
        if let Extension::Fragment { offset, .. } = extension {
            later_fragment |= *offset != 0;
        }
    }
    let first = extensions.first().map_or(transport.protocol(true), |e| e.protocol());
    let mut packet = vec![0u8; 40];
    packet[0] = 0x60;
    let payload_len = u16::try_from(chain.len() + payload.len()).expect("small packet");
    packet[4..6].copy_from_slice(&payload_len.to_be_bytes());
    packet[6] = first;
    packet[7] = 64;
    packet[8..24].copy_from_slice(&src.octets());
    packet[24..40].copy_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1).octets());
    // A later fragment stops the walk at the fragment header.
    let needed = if later_fragment {
        let until_fragment = extensions
            .iter()
            .take_while(|e| !matches!(e, Extension::Fragment { offset, .. } if *offset != 0))
            .map(|e| e.bytes(0).len())
            .sum::<usize>();
        40 + until_fragment + 8
    } else {
        40 + chain.len() + read
    };
    packet.extend_from_slice(&chain);
    packet.extend_from_slice(&payload);
    Frame { bytes: packet, needed }
}

/// Wraps an IP packet (or any payload) in Ethernet, with VLAN tags whose
/// TPIDs are `tags` (outermost first).
pub fn ethernet(tags: &[u16], ethertype: u16, inner: Frame) -> Frame {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for (vid, &tpid) in (100u16..).zip(tags) {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&vid.to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    let link_len = frame.len();
    frame.extend_from_slice(&inner.bytes);
    Frame { bytes: frame, needed: link_len + inner.needed }
}

/// An ARP request frame.
pub fn arp() -> Frame {
    let mut payload = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    payload.resize(28, 0);
    ethernet(&[], ETHERTYPE_ARP, Frame { bytes: payload, needed: 0 })
}

/// Source port of the SYNs [`tcp_syn`] builds, which their replies go back to.
pub const SYN_SOURCE_PORT: u16 = 40_000;

/// A TCP SYN (an IP packet, no link layer) from port [`SYN_SOURCE_PORT`],
/// with valid checksums: TUN delivers it as received, and the host's stack
/// checks them.
pub fn tcp_syn(source: IpAddr, destination: IpAddr, port: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&SYN_SOURCE_PORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let tcp_len = u16::try_from(tcp.len()).expect("small");
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let pseudo = [&source.octets()[..], &destination.octets(), &[0, 6]].concat();
            let sum = checksum(&[&pseudo, &tcp_len.to_be_bytes(), &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            let mut ip = ipv4_header(source, destination, 20 + tcp_len);
            ip.extend_from_slice(&tcp);
            ip
        }
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            let pseudo = [&source.octets()[..], &destination.octets()].concat();
            let length = u32::from(tcp_len).to_be_bytes();
            let sum = checksum(&[&pseudo, &length, &[0, 0, 0, 6], &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&tcp_len.to_be_bytes());
            ip.extend_from_slice(&[6, 64]);
            ip.extend_from_slice(&source.octets());
            ip.extend_from_slice(&destination.octets());
            ip.extend_from_slice(&tcp);
            ip
        }
        _ => panic!("source and destination of one family"),
    }
}

fn ipv4_header(source: Ipv4Addr, destination: Ipv4Addr, total: u16) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&source.octets());
    ip.extend_from_slice(&destination.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

/// The Internet checksum (RFC 1071) over `parts` laid end to end (each of
/// even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

/// `packet` in an Ethernet frame from the `source` MAC to `destination`,
/// untagged.
pub fn ethernet_to(
    destination: [u8; 6],
    source: [u8; 6],
    ethertype: u16,
    packet: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + packet.len());
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(packet);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_of_a_known_header() {
        // RFC 1071's example words, and a header that sums to 0 with its checksum.
        assert_eq!(checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]), !0xddf2);
        let header = ipv4_header(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 40);
        assert_eq!(checksum(&[&header]), 0);
    }
}
