//! Header parsing. Every read is bounds-checked against the end of the packet
//! (the verifier insists, and truncated packets must be reported, not misread).

use aya_ebpf::programs::XdpContext;
use proxy_common::{Family, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS};

const ETH_HEADER_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
/// Bytes of a TCP/UDP/SCTP header up to and including the destination port.
const PORTS_LEN: usize = 4;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

const PROTO_HOP_BY_HOP: u8 = 0;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ROUTING: u8 = 43;
const PROTO_FRAGMENT: u8 = 44;
const PROTO_AUTH: u8 = 51;
const PROTO_ICMPV6: u8 = 58;
const PROTO_DEST_OPTS: u8 = 60;
const PROTO_SCTP: u8 = 132;
const PROTO_MOBILITY: u8 = 135;
const PROTO_UDPLITE: u8 = 136;

/// ICMPv6 router solicitation .. redirect: neighbour discovery (RFC 4861).
const ND_FIRST_TYPE: u8 = 133;
const ND_LAST_TYPE: u8 = 137;

/// Headers never start this far into a frame; bounding offsets keeps the
/// verifier's range tracking simple.
const MAX_HEADER_OFFSET: usize = 1024;

/// The packet bytes of one XDP run.
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    pub fn new(ctx: &XdpContext) -> Self {
        Self { start: ctx.data(), end: ctx.data_end() }
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// `N` bytes at `offset`, or `None` if the packet ends before them.
    ///
    /// `N` is at least 2: the compiler turns a one-byte check into
    /// `at >= end`, from which the verifier learns no readable range.
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        const { assert!(N >= 2, "read at least two bytes (see above)") };
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let at = self.start + offset;
        if at + N > self.end {
            return None;
        }
        // SAFETY: [at, at + N) lies within the packet, checked just above.
        Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
    }

    #[inline(always)]
    fn u16_at(&self, offset: usize) -> Option<u16> {
        self.bytes::<2>(offset).map(u16::from_be_bytes)
    }
}

/// The source address of an IP packet.
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Source {
    pub fn family(&self) -> Family {
        match self {
            Self::V4(_) => Family::Ipv4,
            Self::V6(_) => Family::Ipv6,
        }
    }
}

/// What the filter needs to know about a well-formed packet.
pub enum Parsed {
    NotIp,
    Ip {
        source: Source,
        /// TCP/UDP/SCTP destination port; `None` for other protocols and later fragments.
        destination_port: Option<u16>,
        /// A fragment other than the first: no transport header.
        later_fragment: bool,
        neighbor_discovery: NeighborDiscovery,
    },
}

/// Whether a packet is ICMPv6 neighbour discovery, which host scope lets through.
#[derive(PartialEq, Eq)]
pub enum NeighborDiscovery {
    No,
    Yes,
    /// ICMPv6 too short to carry its type: malformed where it matters (host
    /// scope), irrelevant where ICMPv6 is out of scope anyway (ports scope).
    Truncated,
}

/// Parses the headers, or returns the family of a malformed packet.
#[inline(always)]
pub fn parse(packet: &Packet) -> Result<Parsed, Family> {
    let mut ethertype = packet.u16_at(12).ok_or(Family::Other)?;
    let mut offset = ETH_HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        ethertype = packet.u16_at(offset + 2).ok_or(Family::Other)?;
        offset += VLAN_TAG_LEN;
    }
    match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(packet, offset).ok_or(Family::Ipv4),
        ETHERTYPE_IPV6 => parse_ipv6(packet, offset).ok_or(Family::Ipv6),
        _ => Ok(Parsed::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(packet: &Packet, offset: usize) -> Option<Parsed> {
    let header: [u8; IPV4_MIN_HEADER_LEN] = packet.bytes(offset)?;
    let version = header[0] >> 4;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if version != 4 || header_len < IPV4_MIN_HEADER_LEN {
        return None;
    }
    // Options: the whole header must be present even though only the fixed
    // part is read. Its length is a multiple of 4, so check its last 4 bytes.
    packet.bytes::<4>(offset + header_len - 4)?;
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let source = Source::V4([header[12], header[13], header[14], header[15]]);
    let later_fragment = fragment_offset != 0;
    let destination_port = if later_fragment {
        None
    } else {
        transport_port(packet, header[9], offset + header_len)?
    };
    Some(Parsed::Ip {
        source,
        destination_port,
        later_fragment,
        neighbor_discovery: NeighborDiscovery::No,
    })
}

#[inline(always)]
fn parse_ipv6(packet: &Packet, offset: usize) -> Option<Parsed> {
    let header: [u8; IPV6_HEADER_LEN] = packet.bytes(offset)?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&header[8..24]);
    let source = Source::V6(source);

    let mut next_header = header[6];
    let mut offset = offset + IPV6_HEADER_LEN;
    let mut later_fragment = false;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS {
        match next_header {
            PROTO_HOP_BY_HOP | PROTO_ROUTING | PROTO_DEST_OPTS | PROTO_MOBILITY => {
                let [next, len] = packet.bytes::<2>(offset)?;
                next_header = next;
                offset += (usize::from(len) + 1) * 8;
            }
            PROTO_AUTH => {
                let [next, len] = packet.bytes::<2>(offset)?;
                next_header = next;
                offset += (usize::from(len) + 2) * 4;
            }
            PROTO_FRAGMENT => {
                let fragment: [u8; 8] = packet.bytes(offset)?;
                next_header = fragment[0];
                offset += fragment.len();
                if u16::from_be_bytes([fragment[2], fragment[3]]) >> 3 != 0 {
                    later_fragment = true;
                    break;
                }
            }
            _ => break,
        }
        walked += 1;
    }
    if later_fragment {
        return Some(Parsed::Ip {
            source,
            destination_port: None,
            later_fragment,
            neighbor_discovery: NeighborDiscovery::No,
        });
    }
    if is_extension_header(next_header) {
        // Longer chains than any real traffic uses: refuse rather than guess.
        return None;
    }
    let neighbor_discovery = if next_header != PROTO_ICMPV6 {
        NeighborDiscovery::No
    } else {
        // An ICMPv6 header is at least type, code and checksum.
        match packet.bytes::<4>(offset) {
            Some([kind, ..]) if (ND_FIRST_TYPE..=ND_LAST_TYPE).contains(&kind) => {
                NeighborDiscovery::Yes
            }
            Some(_) => NeighborDiscovery::No,
            None => NeighborDiscovery::Truncated,
        }
    };
    let destination_port = transport_port(packet, next_header, offset)?;
    Some(Parsed::Ip { source, destination_port, later_fragment, neighbor_discovery })
}

fn is_extension_header(protocol: u8) -> bool {
    matches!(
        protocol,
        PROTO_HOP_BY_HOP
            | PROTO_ROUTING
            | PROTO_FRAGMENT
            | PROTO_AUTH
            | PROTO_DEST_OPTS
            | PROTO_MOBILITY
    )
}

/// `Some(Some(port))` for port-carrying protocols, `Some(None)` for others,
/// `None` when the transport header is cut short.
#[inline(always)]
fn transport_port(packet: &Packet, protocol: u8, offset: usize) -> Option<Option<u16>> {
    match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP | PROTO_UDPLITE => {
            let ports: [u8; PORTS_LEN] = packet.bytes(offset)?;
            Some(Some(u16::from_be_bytes([ports[2], ports[3]])))
        }
        _ => Some(None),
    }
}
