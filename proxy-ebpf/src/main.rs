//! edgegate's XDP program.
//!
//! Parses Ethernet (and up to two VLAN tags) or, on layer-3 devices, none (one
//! program per `Framing`, chosen when attaching), IPv4 or IPv6 (with options
//! and extension headers) and the TCP/UDP/SCTP destination port; decides
//! whether the packet is subject to the allowlist (see `Scope`; tunnels are
//! judged by their outer source); looks the source up
//! with longest-prefix-match semantics; counts the outcome per CPU; samples
//! the sources it drops; and drops anything not allowed (in audit mode it
//! counts those as would-be drops and passes them). The daemon owns every
//! map; this program only reads them (and bumps counters and the sample).
#![no_std]
#![no_main]
// The BPF target has no `Atomic*::fetch_add`; the intrinsic lowers to BPF's atomic add.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the only way to emit BPF_ATOMIC_ADD")]

#[cfg_attr(
    feature = "without-drop-sample",
    expect(dead_code, reason = "the bench variant never reads a source again")
)]
mod parse;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use parse::{Ip, NeighborDiscovery, Outcome, Packet};
use proxy_common::{
    COUNTER_SLOTS, Counter, DROP_SAMPLE_ENTRIES, DROP_SAMPLE_MAX_EVERY, DROP_SAMPLE_NEW_EVERY,
    DroppedSource, Family, FilterConfig, Framing, Lookup, MAX_PER_LENGTH_LOOKUPS, PORT_BITMAP_WORDS,
    PREFILTER_LEVELS, PREFILTER_WORDS, Reason, Rule, Scope, SourceKey, counter_index,
    prefilter_level_offset,
};

/// Default capacity per family; the daemon sets the real one at load time.
const DEFAULT_MAX_RULES: u32 = 1 << 18;
/// Hash maps allocate entries on insert: capacity costs nothing until used.
const BPF_F_NO_PREALLOC: u32 = 1;
/// The daemon writes the prefilters through a shared mapping, not a
/// system call per word.
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map(name = "EG_CONFIG")]
static CONFIG: Array<FilterConfig> = Array::pinned(1, 0);

#[map(name = "EG_PORTS")]
static PORTS: Array<u64> = Array::pinned(PORT_BITMAP_WORDS, 0);

#[map(name = "EG_V4_RULES")]
static V4_RULES: HashMap<Key<[u8; 4]>, Rule> =
    HashMap::pinned(DEFAULT_MAX_RULES, BPF_F_NO_PREALLOC);

#[map(name = "EG_V4_TRIE")]
static V4_TRIE: LpmTrie<[u8; 4], Rule> = LpmTrie::pinned(DEFAULT_MAX_RULES, 0);

#[map(name = "EG_V6_RULES")]
static V6_RULES: HashMap<Key<[u8; 16]>, Rule> =
    HashMap::pinned(DEFAULT_MAX_RULES, BPF_F_NO_PREALLOC);

#[map(name = "EG_V6_TRIE")]
static V6_TRIE: LpmTrie<[u8; 16], Rule> = LpmTrie::pinned(DEFAULT_MAX_RULES, 0);

#[map(name = "EG_V4_PREFILTER")]
static V4_PREFILTER: Array<u64> = Array::pinned(PREFILTER_WORDS, BPF_F_MMAPABLE);

#[map(name = "EG_V6_PREFILTER")]
static V6_PREFILTER: Array<u64> = Array::pinned(PREFILTER_WORDS, BPF_F_MMAPABLE);

#[map(name = "EG_COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map(name = "EG_DROPPED")]
static DROPPED: LruHashMap<SourceKey, DroppedSource> = LruHashMap::pinned(DROP_SAMPLE_ENTRIES, 0);

/// Per-CPU time of the last diagnostic log line, to rate-limit them.
#[map(name = "EG_LOG_CLOCK")]
static LOG_CLOCK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// At most one diagnostic line per CPU per this many nanoseconds.
const LOG_INTERVAL_NS: u64 = 1_000_000_000;

/// For interfaces whose frames start with an Ethernet header.
#[xdp]
pub fn edgegate(ctx: XdpContext) -> u32 {
    judge(&ctx, Framing::Ethernet)
}

/// For layer-3 interfaces, whose frames start with the IP header.
#[xdp]
pub fn edgegate_ip(ctx: XdpContext) -> u32 {
    judge(&ctx, Framing::Ip)
}

/// The whole program; inlined into each entry point, so that `framing` is a
/// constant there and each program carries only its own parsing.
#[inline(always)]
fn judge(ctx: &XdpContext, framing: Framing) -> u32 {
    #[cfg(feature = "verifier-reject")]
    {
        // SAFETY: none; this read is unchecked on purpose (see Cargo.toml).
        if unsafe { core::ptr::read_volatile((ctx.data() + 64) as *const u8) } == 0xff {
            return xdp_action::XDP_DROP;
        }
    }
    let packet = Packet::new(ctx);
    let mut ip = Ip::new();
    let (reason, audit) = match CONFIG.get(0) {
        Some(config) => (classify(config, framing, &packet, &mut ip), config.audit != 0),
        // Element 0 of an array map always exists; fail closed regardless.
        None => (Reason::Malformed, false),
    };
    let family = ip.family;
    // Audit mode passes what it would drop, so it counts it apart: the
    // `drop` counters keep meaning "dropped".
    let counter = count(counter_index(family, reason, audit && !reason.passes()), packet.len());
    // Passing packets, the common case, leave after one test.
    if !reason.passes() {
        match (reason, counter) {
            (Reason::Malformed, _) => log_malformed(ctx, family),
            #[cfg(not(feature = "without-drop-sample"))]
            (_, Some(counter)) => sample_drop(ctx, &ip, reason, counter),
            _ => {}
        }
    }
    if reason.passes() || audit { xdp_action::XDP_PASS } else { xdp_action::XDP_DROP }
}

/// Why the packet passes or drops; `ip` holds what parsing found. Inlined
/// (as everything on the per-packet path): called from both entry points,
/// it would otherwise become one subprogram for both, paying a call, its
/// spills and a run-time `framing` on every packet.
#[inline(always)]
fn classify(config: &FilterConfig, framing: Framing, packet: &Packet, ip: &mut Ip) -> Reason {
    match parse::parse(packet, framing, ip) {
        Outcome::Ip => {}
        Outcome::NotIp => return Reason::NotIp,
        Outcome::Malformed => return Reason::Malformed,
    }
    let protected = ip.has_port && is_protected(ip.destination_port);
    let subject = if config.scope == Scope::Host as u32 {
        match ip.neighbor_discovery {
            NeighborDiscovery::Yes => return Reason::NeighborDiscovery,
            NeighborDiscovery::Truncated => return Reason::Malformed,
            NeighborDiscovery::No => {}
        }
        // A tunnel port inside the ephemeral range is a tunnel, not a reply.
        let reply = ip.has_port
            && !protected
            && ip.destination_port >= config.ephemeral_first
            && ip.destination_port <= config.ephemeral_last
            && !ip.carries_tunnel(config.tunnel_protocols, &config.tunnel_udp_ports);
        if reply {
            return Reason::EphemeralPort;
        }
        true
    } else {
        // A later fragment carries no port: it is subject to the list, so a
        // fragmented packet can never smuggle data past it. A tunnel carries
        // none either, but the host decapsulates it: its inner packets may
        // be bound for a protected port.
        protected
            || ip.later_fragment
            || ip.carries_tunnel(config.tunnel_protocols, &config.tunnel_udp_ports)
    };
    if !subject {
        return Reason::OutOfScope;
    }
    match lookup(config, ip) {
        Some(rule) => {
            // SAFETY: `rule` points into a map value, valid for this program run;
            // the counter is only ever updated atomically.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*rule).hits, 1)
            };
            // SAFETY: as above; the daemon writes `action` only through map updates.
            if unsafe { (*rule).action } == proxy_common::Action::Allow as u32 {
                Reason::Allowed
            } else {
                Reason::Denied
            }
        }
        None => Reason::Unlisted,
    }
}

#[inline(always)]
fn is_protected(port: u16) -> bool {
    let word = PORTS.get(u32::from(port) / 64).copied().unwrap_or(0);
    word & (1 << (port % 64)) != 0
}

/// The longest-prefix rule matching the packet's source, if any.
#[inline(always)]
fn lookup(config: &FilterConfig, ip: &Ip) -> Option<*mut Rule> {
    let prefix = u32::from_be_bytes([0, ip.source[0], ip.source[1], ip.source[2]]);
    if ip.family == Family::Ipv4 {
        if !may_match(&V4_PREFILTER, prefix) {
            return None;
        }
        let addr = [ip.source[0], ip.source[1], ip.source[2], ip.source[3]];
        if config.v4_lookup == Lookup::Trie as u32 {
            trie_rule(V4_TRIE.get(Key::new(32, addr)))
        } else {
            lookup_v4_per_length(config.v4_lengths, u32::from_be_bytes(addr))
        }
    } else if !may_match(&V6_PREFILTER, prefix) {
        None
    } else if config.v6_lookup == Lookup::Trie as u32 {
        trie_rule(V6_TRIE.get(Key::new(128, ip.source)))
    } else {
        lookup_v6_per_length(&config.v6_lengths, ip.source)
    }
}

/// Whether any rule could match a source whose first 24 bits are `prefix`
/// (see [`PREFILTER_LEVELS`]): each level in turn, coarsest first.
#[inline(always)]
fn may_match(prefilter: &Array<u64>, prefix: u32) -> bool {
    let is_set = |level: usize| {
        let bit = prefix >> (24 - PREFILTER_LEVELS[level]);
        let index = prefilter_level_offset(level) + bit / 64;
        // Element `index` always exists; were it ever missing, the full lookup decides.
        prefilter.get(index).map_or(true, |word| word & (1 << (bit % 64)) != 0)
    };
    is_set(0) && is_set(1) && is_set(2)
}

#[inline(always)]
fn trie_rule(rule: Option<&Rule>) -> Option<*mut Rule> {
    // The hit counter is bumped atomically through this pointer; the map value
    // is writable memory even though the trie API hands out a shared reference.
    rule.map(|rule| core::ptr::from_ref(rule).cast_mut())
}

/// Tries each prefix length in use, longest first: the first hit is the longest
/// match. The daemon switches to the trie before more lengths are in use than
/// the loop covers; were that ever violated, the source is unlisted (dropped).
#[inline(always)]
fn lookup_v4_per_length(mut lengths: u64, addr: u32) -> Option<*mut Rule> {
    for _ in 0..MAX_PER_LENGTH_LOOKUPS {
        if lengths == 0 {
            return None;
        }
        let len = 63 - lengths.leading_zeros();
        lengths &= !(1 << len);
        if len > 32 {
            return None;
        }
        let masked = if len == 0 { 0 } else { addr & (u32::MAX << (32 - len)) };
        if let Some(rule) = V4_RULES.get_ptr_mut(Key::new(len, masked.to_be_bytes())) {
            return Some(rule);
        }
    }
    None
}

/// As [`lookup_v4_per_length`], over 129 lengths kept in three words.
#[inline(always)]
fn lookup_v6_per_length(lengths: &[u64; 3], addr: [u8; 16]) -> Option<*mut Rule> {
    let high = u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let low = u64::from_be_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]);
    let mut words = *lengths;
    for _ in 0..MAX_PER_LENGTH_LOOKUPS {
        let (word, mut bits) = if words[2] != 0 {
            (2, words[2])
        } else if words[1] != 0 {
            (1, words[1])
        } else if words[0] != 0 {
            (0, words[0])
        } else {
            return None;
        };
        let bit = 63 - bits.leading_zeros();
        bits &= !(1 << bit);
        words[word] = bits;
        let len = word as u32 * 64 + bit;
        if len > 128 {
            return None;
        }
        let (masked_high, masked_low) = match len {
            0 => (0, 0),
            1..=64 => (high & (u64::MAX << (64 - len)), 0),
            _ => (high, low & (u64::MAX << (128 - len))),
        };
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&masked_high.to_be_bytes());
        key[8..].copy_from_slice(&masked_low.to_be_bytes());
        if let Some(rule) = V6_RULES.get_ptr_mut(Key::new(len, key)) {
            return Some(rule);
        }
    }
    None
}

/// A packet just counted: its counter slot (this CPU's), which also paces
/// the drop sample, and the slot's packets with this one.
struct Counted {
    slot: *mut Counter,
    packets: u64,
}

/// Counts the packet. The count is handed on in a register: reading it back
/// from the slot just written is a store-to-load stall on every drop.
#[inline(always)]
fn count(index: u32, bytes: usize) -> Option<Counted> {
    let slot = COUNTERS.get_ptr_mut(index)?;
    // SAFETY: a per-CPU slot: nothing else writes it while this program runs.
    unsafe {
        let packets = (*slot).packets + 1;
        (*slot).packets = packets;
        (*slot).bytes += bytes as u64;
        Some(Counted { slot, packets })
    }
}

/// Records a dropped packet's source in the sample, when its counter slot's
/// pacing says so (see `Counter::pace_sample`): what most drops of a flood
/// pay here is one mask test.
#[cfg_attr(feature = "without-drop-sample", expect(dead_code, reason = "bench variant"))]
#[inline(always)]
fn sample_drop(ctx: &XdpContext, ip: &Ip, reason: Reason, counted: Counted) {
    // SAFETY: a per-CPU slot, as in `count`.
    let counter = unsafe { &mut *counted.slot };
    if !counter.records(counted.packets) {
        return;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let weight = counter.pace_sample(now);
    // The packet's bounds are read from the context again: carried here
    // from the parse, they would hold two registers through the whole
    // program, and every bounds check before would reload its end from the
    // stack, the pass path's included.
    let Some(key) = Packet::new(ctx).source_as_ipv6(ip) else {
        return;
    };
    // A flood's new sources get in more rarely.
    let admits_new = weight < DROP_SAMPLE_MAX_EVERY || counted.packets % DROP_SAMPLE_NEW_EVERY == 0;
    match DROPPED.get_ptr_mut(&key) {
        // SAFETY: `seen` points into a map value, valid for this program run;
        // `packets` is only ever updated atomically, the rest are plain
        // stores whose races only blur a timestamp or the latest reason.
        Some(seen) => unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*seen).packets, weight);
            (*seen).last_seen_ns = now;
            (*seen).reason = reason as u32;
        },
        None if !admits_new => {}
        None => {
            let value = DroppedSource {
                packets: weight,
                first_seen_ns: now,
                last_seen_ns: now,
                reason: reason as u32,
                padding: 0,
            };
            // A full map evicts its least recently used source; a failed
            // insert (another CPU raced us) only loses one record.
            let _ = DROPPED.insert(&key, &value, 0);
        }
    }
}

/// Malformed packets are rare in normal traffic but can arrive in floods, so
/// the log line is rate-limited per CPU and never costs more than a timestamp.
/// Kept out of line: it is cold, and large (the log record's formatting).
#[inline(never)]
fn log_malformed(ctx: &XdpContext, family: Family) {
    let Some(last) = LOG_CLOCK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU slot, as in `count`.
    unsafe {
        if now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return;
        }
        *last = now;
    }
    warn!(
        ctx,
        "dropped malformed {} packet on ifindex {} (further ones counted, not logged, for 1s)",
        family.name(),
        ctx.ingress_ifindex()
    );
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
