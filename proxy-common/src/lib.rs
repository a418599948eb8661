//! Types shared by the XDP program (`proxy-ebpf`) and the daemon (`proxy`).
//!
//! Everything here is `#[repr(C)]` and free of implicit padding, because the
//! kernel and user space exchange these values as raw bytes through BPF maps.
//! The `user` feature adds `aya::Pod` so the daemon can read and write them.
#![no_std]

/// Names of the maps, as the daemon finds (and pins) them.
pub mod map {
    /// `Array<FilterConfig>` with one element.
    pub const CONFIG: &str = "EG_CONFIG";
    /// `Array<u64>` bitmap of protected destination ports.
    pub const PORTS: &str = "EG_PORTS";
    /// `HashMap<Key<[u8; 4]>, Rule>`: IPv4 rules, exact match per prefix length.
    pub const V4_RULES: &str = "EG_V4_RULES";
    /// `LpmTrie<[u8; 4], Rule>`: the same IPv4 rules as a trie.
    pub const V4_TRIE: &str = "EG_V4_TRIE";
    /// `HashMap<Key<[u8; 16]>, Rule>`: IPv6 rules, exact match per prefix length.
    pub const V6_RULES: &str = "EG_V6_RULES";
    /// `LpmTrie<[u8; 16], Rule>`: the same IPv6 rules as a trie.
    pub const V6_TRIE: &str = "EG_V6_TRIE";
    /// `PerCpuArray<Counter>` indexed by [`crate::counter_index`].
    pub const COUNTERS: &str = "EG_COUNTERS";
    /// `LruHashMap<SourceKey, DroppedSource>`: a sample of the sources behind
    /// `denied` and `unlisted` verdicts.
    pub const DROPPED: &str = "EG_DROPPED";
    /// `Array<u64>`, memory-mapped by the daemon: which IPv4 sources any
    /// rule could match (see [`crate::PREFILTER_WORDS`]).
    pub const V4_PREFILTER: &str = "EG_V4_PREFILTER";
    /// The same for IPv6, over the first 24 bits of the address.
    pub const V6_PREFILTER: &str = "EG_V6_PREFILTER";
    /// All maps the daemon pins, so that filtering survives a restart.
    pub const PINNED: [&str; 10] = [
        CONFIG,
        PORTS,
        V4_RULES,
        V4_TRIE,
        V6_RULES,
        V6_TRIE,
        V4_PREFILTER,
        V6_PREFILTER,
        COUNTERS,
        DROPPED,
    ];
    /// Maps earlier builds pinned and this one no longer has: removed at start.
    pub const RETIRED: [&str; 1] = ["EG_SAMPLE_BUDGET"];
}

/// How frames start on an interface: it decides which of the object's two
/// programs (one per layout, otherwise identical) is attached there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Framing {
    /// An Ethernet header, possibly VLAN-tagged (Ethernet, veth, loopback, ENA).
    #[default]
    Ethernet,
    /// The IP header first, its version in the first nibble (TUN, WireGuard,
    /// ipip, GRE, sit, PPP): layer-3 devices have no link-layer header.
    Ip,
}

impl Framing {
    pub const ALL: [Self; 2] = [Self::Ethernet, Self::Ip];

    /// Name of the XDP program for this layout in the object file.
    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Ethernet => "edgegate",
            Self::Ip => "edgegate_ip",
        }
    }
}

/// IP protocols that carry tunnels: in ports scope, packets of those marked
/// in [`FilterConfig::tunnel_protocols`] are judged by their outer source.
pub mod tunnel {
    /// IPv4 in IP (ipip; in IPv6, 4in6).
    pub const IPIP: u8 = 4;
    /// IPv6 in IP (sit, 6in4; in IPv6, ip6ip6).
    pub const IPV6: u8 = 41;
    /// Generic Routing Encapsulation.
    pub const GRE: u8 = 47;
    /// UDP destination ports [`crate::FilterConfig`] can hold.
    pub const MAX_UDP_PORTS: usize = 8;
}

/// Words in the protected-port bitmap (65536 ports, 64 per word).
pub const PORT_BITMAP_WORDS: u32 = 65536 / 64;

/// The prefilter in front of the rule lookup: a source whose 24-bit prefix
/// (an IPv4 /24; the first 24 bits of an IPv6 address) no rule overlaps is
/// unlisted without a lookup. Random sources miss the rule maps' cache
/// lines on every lookup; most of them stop here, at a cost that grows
/// little with the list. Each level holds one bit per prefix of its length,
/// set when any 24-bit prefix within it is: 16 bits (8 KiB, in L1), 20 bits
/// (128 KiB, in L2), 24 bits (2 MiB). A source goes on to the next level
/// only if its bit is set, so a list that sets most 16-bit bits (100k random
/// /24s set 78% of them) still stops most sources in L2 rather than in the
/// 2 MiB level, which random sources read from memory. The daemon keeps the
/// bits a superset of what the rules need, so a bit can only send a packet
/// on to the full lookup, never decide it.
pub const PREFILTER_LEVELS: [u32; 3] = [16, 20, 24];

/// The first word of level `level` of [`PREFILTER_LEVELS`] in the map.
pub const fn prefilter_level_offset(level: usize) -> u32 {
    let mut offset = 0;
    let mut coarser = 0;
    while coarser < level {
        offset += (1 << PREFILTER_LEVELS[coarser]) / 64;
        coarser += 1;
    }
    offset
}

/// Words in each family's prefilter map (see [`PREFILTER_LEVELS`]).
pub const PREFILTER_WORDS: u32 = prefilter_level_offset(PREFILTER_LEVELS.len());

/// VLAN tags (802.1Q, 802.1ad) the parser looks through.
pub const MAX_VLAN_TAGS: usize = 2;

/// IPv6 extension headers the parser walks before giving up on a packet.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Per-length lookup is used only while a family has at most this many
/// distinct prefix lengths; beyond it, one trie lookup is cheaper. It also
/// bounds the program's lookup loop, which keeps verification cheap.
pub const MAX_PER_LENGTH_LOOKUPS: u32 = 6;

/// Which packets the allowlist applies to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Only packets to protected ports (and non-first fragments, which carry no port).
    Ports = 0,
    /// Every inbound IP packet except neighbour discovery and replies to the
    /// host's own connections (destination port in the ephemeral range).
    Host = 1,
}

/// How the program finds the longest matching prefix for a family.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Lookup {
    /// One exact-match hash lookup per prefix length in use, longest first:
    /// constant cost whatever the list size, cheapest when few lengths are used.
    #[cfg_attr(feature = "user", serde(rename = "per-length"))]
    PerLength = 0,
    /// One lookup in the kernel's LPM trie: cost grows with the list size, but
    /// does not grow with the number of distinct prefix lengths.
    Trie = 1,
}

impl Lookup {
    /// The value the config map holds; anything but the trie is per-length.
    pub const fn from_raw(raw: u32) -> Self {
        if raw == Self::Trie as u32 { Self::Trie } else { Self::PerLength }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::PerLength => "per-length",
            Self::Trie => "trie",
        }
    }
}

/// Everything the program needs besides the rules; element 0 of [`map::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    /// A [`Scope`] as `u32`.
    pub scope: u32,
    /// First port of the local ephemeral range (host scope only).
    pub ephemeral_first: u16,
    /// Last port of the local ephemeral range, inclusive (host scope only).
    pub ephemeral_last: u16,
    /// A [`Lookup`] as `u32`, for IPv4.
    pub v4_lookup: u32,
    /// A [`Lookup`] as `u32`, for IPv6.
    pub v6_lookup: u32,
    /// Bit `n` is set when some IPv4 rule has prefix length `n` (0..=32).
    pub v4_lengths: u64,
    /// Bit `n % 64` of word `n / 64` is set when some IPv6 rule has prefix length `n` (0..=128).
    pub v6_lengths: [u64; 3],
    /// Non-zero: audit mode. Packets are judged as always, but those the
    /// list would drop are passed, and counted apart (see [`counter_index`]).
    pub audit: u32,
    /// Zero; keeps the layout free of implicit padding.
    pub padding: u32,
    /// Bit `p` set: IP protocol `p` (< 64, see [`tunnel`]) carries a tunnel,
    /// judged by its outer source in ports scope.
    pub tunnel_protocols: u64,
    /// UDP destination ports that carry tunnels (VXLAN, GENEVE), judged like
    /// protected ports; 0 marks an unused slot.
    pub tunnel_udp_ports: [u16; tunnel::MAX_UDP_PORTS],
}

impl FilterConfig {
    /// Nothing allowed, ports scope: what a freshly created map holds.
    pub const EMPTY: Self = Self {
        scope: Scope::Ports as u32,
        ephemeral_first: 0,
        ephemeral_last: 0,
        v4_lookup: Lookup::PerLength as u32,
        v6_lookup: Lookup::PerLength as u32,
        v4_lengths: 0,
        v6_lengths: [0; 3],
        audit: 0,
        padding: 0,
        tunnel_protocols: 0,
        tunnel_udp_ports: [0; tunnel::MAX_UDP_PORTS],
    };
}

/// Sources the drop sample holds; the least recently seen make room.
pub const DROP_SAMPLE_ENTRIES: u32 = 4096;

/// Drops a counter slot (family, reason and mode) of one CPU records per
/// [`DROP_SAMPLE_WINDOW_NS`]: every one while it drops no more, about this
/// many (each weighted by the drops it stands for) while it drops more.
pub const DROP_SAMPLE_BUDGET: u64 = 256;

/// The window over which a counter slot's drop rate sets its sampling.
pub const DROP_SAMPLE_WINDOW_NS: u64 = 1_000_000_000;

/// The sparsest sampling: one drop in this many. Past a few hundred
/// thousand drops a second the records no longer cost anything measurable
/// per packet; the cap bounds how many drops a slot can leave unrecorded
/// after a flood ends (twice this at most) before its records find the rate
/// low again.
pub const DROP_SAMPLE_MAX_EVERY: u64 = 1024;

/// At the sparsest sampling, a source the sample does not hold yet is added
/// only by one drop in this many: in a random-source flood nearly every
/// record is a new source, and an insert into the full LRU map (an eviction
/// under its lock) costs microseconds, where updating a known source costs
/// nanoseconds. At 28 Mpps on one core, one insert per 1024 drops cost ~5%.
pub const DROP_SAMPLE_NEW_EVERY: u64 = 16 * DROP_SAMPLE_MAX_EVERY;

/// The drop sample's key: an IPv6 address, or an IPv4 one mapped into IPv6
/// (`::ffff:a.b.c.d`).
pub type SourceKey = [u8; 16];

/// What the drop sample knows of one source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DroppedSource {
    /// Packets recorded, each weighted by the sampling rate it was recorded at.
    pub packets: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the first and the latest record.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// The [`Reason`] of the latest record, as `u32`.
    pub reason: u32,
    /// Explicit padding (always 0).
    pub padding: u32,
}

/// What a matching rule does.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let the packet through.
    Allow = 1,
    /// Drop the packet, even if a shorter prefix allows it.
    Deny = 2,
}

/// The value of a rule in the hash and trie maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Packets that matched this rule; the program adds atomically.
    pub hits: u64,
    /// An [`Action`] as `u32`.
    pub action: u32,
    /// Explicit padding (always 0), so that the struct has no implicit padding.
    pub padding: u32,
}

impl Rule {
    /// A rule that has not matched anything yet.
    pub const fn new(action: Action) -> Self {
        Self { hits: 0, action: action as u32, padding: 0 }
    }
}

/// Address family of a counted packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Family {
    Ipv4 = 0,
    Ipv6 = 1,
    /// Not IP, or too short to tell.
    Other = 2,
}

impl Family {
    pub const ALL: [Self; 3] = [Self::Ipv4, Self::Ipv6, Self::Other];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::Other => "other",
        }
    }
}

/// Why the program passed or dropped a packet. The verdict follows from the reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Reason {
    /// The longest matching rule allows the source.
    Allowed = 0,
    /// Not subject to the allowlist in this scope (unprotected port, or no port).
    OutOfScope = 1,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp = 2,
    /// ICMPv6 neighbour discovery, which the host needs to be reachable at all.
    NeighborDiscovery = 3,
    /// Host scope: a reply to one of the host's own connections (ephemeral port).
    EphemeralPort = 4,
    /// The longest matching rule denies the source.
    Denied = 5,
    /// No rule matches the source.
    Unlisted = 6,
    /// A header is shorter than it claims, or the packet cannot be parsed.
    Malformed = 7,
}

impl Reason {
    pub const COUNT: usize = 8;
    pub const ALL: [Self; Self::COUNT] = [
        Self::Allowed,
        Self::OutOfScope,
        Self::NotIp,
        Self::NeighborDiscovery,
        Self::EphemeralPort,
        Self::Denied,
        Self::Unlisted,
        Self::Malformed,
    ];

    /// The reason a map value holds, if it is one.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        if (raw as usize) < Self::COUNT { Some(Self::ALL[raw as usize]) } else { None }
    }

    pub const fn passes(self) -> bool {
        (self as u32) < Self::Denied as u32
    }

    pub const fn verdict(self) -> Verdict {
        if self.passes() { Verdict::Pass } else { Verdict::Drop }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::OutOfScope => "out_of_scope",
            Self::NotIp => "not_ip",
            Self::NeighborDiscovery => "neighbor_discovery",
            Self::EphemeralPort => "ephemeral_port",
            Self::Denied => "denied",
            Self::Unlisted => "unlisted",
            Self::Malformed => "malformed",
        }
    }
}

/// What the program did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Verdict {
    Pass,
    Drop,
    /// Audit mode passed a packet that enforcing mode would drop.
    WouldDrop,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::WouldDrop => "would_drop",
        }
    }
}

impl Action {
    /// The value a rule holds; anything but allow denies (fail closed).
    pub const fn from_raw(raw: u32) -> Self {
        if raw == Self::Allow as u32 { Self::Allow } else { Self::Deny }
    }
}

/// Names as in metrics, logs and JSON.
macro_rules! display_by_name {
    ($($type:ty),*) => {$(
        impl core::fmt::Display for $type {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.pad(self.name())
            }
        }
    )*};
}
display_by_name!(Family, Reason, Verdict, Lookup);

/// Packets and bytes counted for one (family, reason) pair on one CPU, and
/// how the drop sample paces itself for them. Only the program writes it:
/// the pacing lives here, in the cache line the count has just touched, and
/// is one mask that a flood's drop tests against `packets` (a map of its own
/// cost about 10% of the drop path, a per-second budget check 20%).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
    /// The drop sample records a drop when `packets & sample_mask` is zero
    /// (see [`Counter::records`]).
    pub sample_mask: u32,
    /// The low 32 bits of `packets` when the current window opened.
    pub window_packets: u32,
    /// When the current window opened (`bpf_ktime_get_ns`).
    pub window_start_ns: u64,
}

impl Counter {
    /// Whether the drop sample records the drop just counted; `packets` is
    /// [`Counter::packets`] with it (the program has it in a register).
    #[inline(always)]
    pub const fn records(&self, packets: u64) -> bool {
        packets & self.sample_mask as u64 == 0
    }

    /// Paces the drop sample for a drop it records at `now`; returns how many
    /// drops the record stands for. The mask is set from the slot's drop rate
    /// when a window ends, and as soon as the slot drops more than
    /// [`DROP_SAMPLE_BUDGET`] within one: a flood is sampled from its first
    /// few hundred drops on, and a slot that drops little is exact again at
    /// the first record after a quiet window.
    #[inline(always)]
    pub fn pace_sample(&mut self, now: u64) -> u64 {
        let weight = self.sample_mask as u64 + 1;
        let elapsed = now.wrapping_sub(self.window_start_ns);
        // Only the low bits are kept; a window never counts 2^32 drops.
        let counted = (self.packets as u32).wrapping_sub(self.window_packets) as u64;
        let window_over = elapsed >= DROP_SAMPLE_WINDOW_NS;
        if window_over || (self.sample_mask == 0 && counted > DROP_SAMPLE_BUDGET) {
            // `elapsed` is not zero here, but the division must not trap.
            let per_window = counted * DROP_SAMPLE_WINDOW_NS / elapsed.max(1);
            self.sample_mask = sample_mask(per_window);
        }
        if window_over {
            self.window_start_ns = now;
            self.window_packets = self.packets as u32;
        }
        weight
    }
}

/// The mask that records about [`DROP_SAMPLE_BUDGET`] of `per_window` drops:
/// zero (every drop) up to it, then a power of two minus one, capped at
/// [`DROP_SAMPLE_MAX_EVERY`] (BPF has no count-leading-zeros: the bits are
/// smeared down by hand).
const fn sample_mask(per_window: u64) -> u32 {
    let mut mask = per_window / DROP_SAMPLE_BUDGET;
    if mask >= DROP_SAMPLE_MAX_EVERY {
        mask = DROP_SAMPLE_MAX_EVERY - 1;
    }
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask as u32
}

const _: () = assert!(
    DROP_SAMPLE_MAX_EVERY.is_power_of_two() && DROP_SAMPLE_MAX_EVERY <= 1 << 16,
    "the smear in `sample_mask` covers 16 bits"
);

/// Counters per mode: one per (family, reason).
const SLOTS_PER_MODE: u32 = (Family::ALL.len() * Reason::COUNT) as u32;

/// Entries in [`map::COUNTERS`]: every (family, reason), then the same
/// again for what audit mode passed but would have dropped.
pub const COUNTER_SLOTS: u32 = 2 * SLOTS_PER_MODE;

/// Index of the (family, reason) counter in [`map::COUNTERS`]; `audited`:
/// of the packets audit mode passed that enforcing mode would drop. One map
/// for both, so the program's lookup stays a constant map (the verifier
/// inlines it; a map chosen at run time costs a helper call).
pub const fn counter_index(family: Family, reason: Reason, audited: bool) -> u32 {
    let index = family as u32 * Reason::COUNT as u32 + reason as u32;
    if audited { SLOTS_PER_MODE + index } else { index }
}

/// The worker's egress filter (`egress` program): which backend addresses
/// and ports a worker may connect to.
pub mod egress {
    /// The map of allowed destinations, [`super::EgressKey`] → 1.
    pub const ALLOWED: &str = "EG_EGRESS_ALLOWED";
    /// One `u64`: connections refused since the programs were loaded.
    pub const REFUSED: &str = "EG_EGRESS_REFUSED";
    /// The programs, attached to the worker's cgroup.
    pub const CONNECT4: &str = "egress_connect4";
    pub const CONNECT6: &str = "egress_connect6";
    /// How many destinations the map holds at most; more backends than
    /// this are refused at start and on reload.
    pub const MAX_DESTINATIONS: u32 = 1024;
}

/// An allowed destination: an IPv6 address, or an IPv4 one mapped into IPv6
/// (`::ffff:a.b.c.d`, which is also how an IPv6 socket reaches IPv4), and a
/// port, both in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgressKey {
    pub address: [u8; 16],
    pub port: [u8; 2],
    /// Explicit padding (always 0), so that the key has no implicit padding.
    pub padding: [u8; 2],
}

impl EgressKey {
    /// An IPv4 destination, as its mapped IPv6 form.
    pub const fn v4(address: [u8; 4], port: [u8; 2]) -> Self {
        let [a, b, c, d] = address;
        Self {
            address: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
            port,
            padding: [0; 2],
        }
    }

    pub const fn v6(address: [u8; 16], port: [u8; 2]) -> Self {
        Self { address, port, padding: [0; 2] }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all four are `#[repr(C)]`, made only of integers, without
    // implicit padding, and valid for any bit pattern.
    unsafe impl aya::Pod for super::FilterConfig {}
    unsafe impl aya::Pod for super::DroppedSource {}
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::EgressKey {}
}

#[cfg(test)]
mod tests;
