//! Header parsing. Every read is bounds-checked against the end of the packet
//! (the verifier insists, and truncated packets must be reported, not misread).

use aya_ebpf::programs::XdpContext;
use proxy_common::{Family, Framing, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS, tunnel};

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

    /// The source address of `ip`, read again from the packet, as an IPv6
    /// address (IPv4 sources as IPv4-mapped). Reading it again where it is
    /// needed after the verdict costs less than keeping `ip.source` alive
    /// that long: its 16 bytes then live in as many stack slots, spilled and
    /// reloaded on every path, the pass path included.
    #[inline(always)]
    pub fn source_as_ipv6(&self, ip: &Ip) -> Option<[u8; 16]> {
        if ip.family == Family::Ipv6 {
            return self.bytes::<16>(ip.source_offset);
        }
        let [a, b, c, d] = self.bytes::<4>(ip.source_offset)?;
        Some([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d])
    }
}

/// What the filter needs to know about an IP packet.
///
/// A plain struct, filled in place and fully initialised on every path: an
/// enum whose variants differ in size (a 4-byte and a 16-byte address, say)
/// is copied whole when moved, and verifiers before Linux 6.4 reject the
/// resulting reads of never-written stack bytes.
pub struct Ip {
    pub family: Family,
    /// The source address; IPv4 uses the first 4 bytes.
    pub source: [u8; 16],
    /// Where the source address starts in the packet.
    pub source_offset: usize,
    /// TCP/UDP/SCTP destination port; meaningful only when `has_port`.
    pub destination_port: u16,
    /// False for protocols without ports and for later fragments.
    pub has_port: bool,
    /// A fragment other than the first: no transport header.
    pub later_fragment: bool,
    /// The protocol after the IP header(s); meaningful unless `later_fragment`.
    pub protocol: u8,
    pub neighbor_discovery: NeighborDiscovery,
}

impl Ip {
    pub const fn new() -> Self {
        Self {
            family: Family::Other,
            source: [0; 16],
            source_offset: 0,
            destination_port: 0,
            has_port: false,
            later_fragment: false,
            protocol: 0,
            neighbor_discovery: NeighborDiscovery::No,
        }
    }

    /// Whether the packet carries a tunnel to be judged by its outer source:
    /// one of the IP protocols set in `protocols` (bit per protocol number),
    /// or UDP to one of `udp_ports` (0 marks an unused slot).
    #[inline(always)]
    pub fn carries_tunnel(&self, protocols: u64, udp_ports: &[u16; tunnel::MAX_UDP_PORTS]) -> bool {
        if self.has_port {
            self.protocol == PROTO_UDP
                && self.destination_port != 0
                && udp_ports.iter().any(|&port| port == self.destination_port)
        } else {
            self.protocol < 64 && protocols & (1 << self.protocol) != 0
        }
    }
}

/// Whether a packet is ICMPv6 neighbour discovery, which host scope lets through.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NeighborDiscovery {
    No,
    Yes,
    /// ICMPv6 too short to carry its type: malformed where it matters (host
    /// scope), irrelevant where ICMPv6 is out of scope anyway (ports scope).
    Truncated,
}

/// How parsing ended. Fieldless, for the same reason as [`Ip`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `Ip` is filled in.
    Ip,
    NotIp,
    /// A header is cut short or invalid; the family, when known, is in `Ip`.
    Malformed,
}

/// Parses the headers into `ip`, the frame laid out as `framing` says.
#[inline(always)]
pub fn parse(packet: &Packet, framing: Framing, ip: &mut Ip) -> Outcome {
    let (ethertype, offset) = match framing {
        Framing::Ethernet => match ethernet_payload(packet) {
            Some(payload) => payload,
            None => return Outcome::Malformed,
        },
        Framing::Ip => match packet.bytes::<2>(0) {
            Some([first, _]) if first >> 4 == 4 => (ETHERTYPE_IPV4, 0),
            Some([first, _]) if first >> 4 == 6 => (ETHERTYPE_IPV6, 0),
            // A layer-3 device carries only IP: anything else is what the
            // stack would discard, and must not pass as "not IP".
            _ => return Outcome::Malformed,
        },
    };
    let parsed = match ethertype {
        ETHERTYPE_IPV4 => {
            ip.family = Family::Ipv4;
            parse_ipv4(packet, offset, ip)
        }
        ETHERTYPE_IPV6 => {
            ip.family = Family::Ipv6;
            parse_ipv6(packet, offset, ip)
        }
        _ => return Outcome::NotIp,
    };
    if parsed { Outcome::Ip } else { Outcome::Malformed }
}

/// The ethertype after the Ethernet header and its VLAN tags, and where its
/// payload starts; `None` if the frame is malformed.
#[inline(always)]
fn ethernet_payload(packet: &Packet) -> Option<(u16, usize)> {
    let mut ethertype = packet.u16_at(12)?;
    let mut offset = ETH_HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        ethertype = packet.u16_at(offset + 2)?;
        offset += VLAN_TAG_LEN;
    }
    if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        // More tags than the walk covers: the frame may well carry IP, and
        // passing it as "not IP" would let it around the list. Fail closed.
        return None;
    }
    Some((ethertype, offset))
}

/// Fills `ip` from an IPv4 header at `offset`; false if it is malformed.
#[inline(always)]
fn parse_ipv4(packet: &Packet, offset: usize, ip: &mut Ip) -> bool {
    let Some(header) = packet.bytes::<IPV4_MIN_HEADER_LEN>(offset) else {
        return false;
    };
    let version = header[0] >> 4;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if version != 4 || header_len < IPV4_MIN_HEADER_LEN {
        return false;
    }
    // Options: the whole header must be present even though only the fixed
    // part is read. Its length is a multiple of 4, so check its last 4 bytes.
    if packet.bytes::<4>(offset + header_len - 4).is_none() {
        return false;
    }
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    ip.source[..4].copy_from_slice(&header[12..16]);
    ip.source_offset = offset + 12;
    ip.later_fragment = fragment_offset != 0;
    ip.later_fragment || transport_port(packet, header[9], offset + header_len, ip)
}

/// Fills `ip` from an IPv6 header (and its extension headers) at `offset`.
#[inline(always)]
fn parse_ipv6(packet: &Packet, offset: usize, ip: &mut Ip) -> bool {
    let Some(header) = packet.bytes::<IPV6_HEADER_LEN>(offset) else {
        return false;
    };
    if header[0] >> 4 != 6 {
        return false;
    }
    ip.source.copy_from_slice(&header[8..24]);
    ip.source_offset = offset + 8;

    let mut next_header = header[6];
    let mut offset = offset + IPV6_HEADER_LEN;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS {
        match next_header {
            PROTO_HOP_BY_HOP | PROTO_ROUTING | PROTO_DEST_OPTS | PROTO_MOBILITY => {
                let Some([next, len]) = packet.bytes::<2>(offset) else {
                    return false;
                };
                next_header = next;
                offset += (usize::from(len) + 1) * 8;
            }
            PROTO_AUTH => {
                let Some([next, len]) = packet.bytes::<2>(offset) else {
                    return false;
                };
                next_header = next;
                offset += (usize::from(len) + 2) * 4;
            }
            PROTO_FRAGMENT => {
                let Some(fragment) = packet.bytes::<8>(offset) else {
                    return false;
                };
                next_header = fragment[0];
                offset += fragment.len();
                if u16::from_be_bytes([fragment[2], fragment[3]]) >> 3 != 0 {
                    ip.later_fragment = true;
                    return true;
                }
            }
            _ => break,
        }
        walked += 1;
    }
    if is_extension_header(next_header) {
        // Longer chains than any real traffic uses: refuse rather than guess.
        return false;
    }
    if next_header == PROTO_ICMPV6 {
        // An ICMPv6 header is at least type, code and checksum.
        ip.neighbor_discovery = match packet.bytes::<4>(offset) {
            Some([kind, ..]) if (ND_FIRST_TYPE..=ND_LAST_TYPE).contains(&kind) => {
                NeighborDiscovery::Yes
            }
            Some(_) => NeighborDiscovery::No,
            None => NeighborDiscovery::Truncated,
        };
    }
    transport_port(packet, next_header, offset, ip)
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

/// Records `protocol` and reads the destination port of port-carrying
/// protocols into `ip`; false
/// when their header is cut short before it.
#[inline(always)]
fn transport_port(packet: &Packet, protocol: u8, offset: usize, ip: &mut Ip) -> bool {
    ip.protocol = protocol;
    match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP | PROTO_UDPLITE => {
            let Some(ports) = packet.bytes::<PORTS_LEN>(offset) else {
                return false;
            };
            ip.destination_port = u16::from_be_bytes([ports[2], ports[3]]);
            ip.has_port = true;
            true
        }
        _ => true,
    }
}
