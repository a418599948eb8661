//! Traffic generator for `cargo xtask bench flood`, run by BPF_PROG_TEST_RUN
//! in live-frames mode: each run rewrites the source address of the
//! template frame (Ethernet + IPv4 without options + TCP for `flood_*`,
//! Ethernet + IPv6 without extension headers + TCP for `flood6_*`) to a
//! random one, keeps the checksums valid, and either sends the frame out of
//! `TARGET_IFINDEX` or drops it, which measures the generator's own cost.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_prandom_u32, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
};

/// Where `flood_redirect` sends frames; set when the object is loaded.
#[unsafe(no_mangle)]
static TARGET_IFINDEX: u32 = 0;

const IPV4: usize = 14;
const IPV4_CHECKSUM: usize = IPV4 + 10;
const IPV4_SOURCE: usize = IPV4 + 12;
const TCP_CHECKSUM: usize = IPV4 + 20 + 16;
const IPV6_SOURCE: usize = 14 + 8;
const TCP6_CHECKSUM: usize = 14 + 40 + 16;

#[xdp]
pub fn flood_redirect(ctx: XdpContext) -> u32 {
    if !randomise_source(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: a read of a load-time constant.
    let ifindex = unsafe { core::ptr::read_volatile(&TARGET_IFINDEX) };
    // SAFETY: bpf_redirect only records the target for after the program returns.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

#[xdp]
pub fn flood_drop(ctx: XdpContext) -> u32 {
    if !randomise_source(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn flood6_redirect(ctx: XdpContext) -> u32 {
    if !randomise_source6(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: a read of a load-time constant.
    let ifindex = unsafe { core::ptr::read_volatile(&TARGET_IFINDEX) };
    // SAFETY: bpf_redirect only records the target for after the program returns.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

#[xdp]
pub fn flood6_drop(ctx: XdpContext) -> u32 {
    if !randomise_source6(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_DROP
}

/// Writes a random IPv6 source address and updates the TCP checksum (the
/// pseudo-header holds the source; IPv6 has no header checksum).
#[inline(always)]
fn randomise_source6(ctx: &XdpContext) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + TCP6_CHECKSUM + 2 > end {
        return false;
    }
    // SAFETY: every access below lies within the bounds checked above.
    unsafe {
        let checksum = (start + TCP6_CHECKSUM) as *mut u16;
        let mut sum = checksum.read_unaligned();
        for quarter in 0..4 {
            let source = (start + IPV6_SOURCE + 4 * quarter) as *mut [u16; 2];
            let old = source.read_unaligned();
            let new: [u16; 2] = core::mem::transmute(bpf_get_prandom_u32());
            source.write_unaligned(new);
            sum = replace_words(sum, old, new);
        }
        checksum.write_unaligned(sum);
    }
    true
}

/// Writes a random source address and updates the IPv4 and TCP checksums
/// incrementally (RFC 1624), so the frame stays valid for every receiver,
/// whatever an earlier run left in a recycled page.
#[inline(always)]
fn randomise_source(ctx: &XdpContext) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + TCP_CHECKSUM + 2 > end {
        return false;
    }
    // SAFETY: every access below lies within the bounds checked above.
    unsafe {
        let source = (start + IPV4_SOURCE) as *mut [u16; 2];
        let old = source.read_unaligned();
        let new: [u16; 2] = core::mem::transmute(bpf_get_prandom_u32());
        source.write_unaligned(new);
        for offset in [IPV4_CHECKSUM, TCP_CHECKSUM] {
            let checksum = (start + offset) as *mut u16;
            checksum.write_unaligned(replace_words(checksum.read_unaligned(), old, new));
        }
    }
    true
}

/// The ones'-complement checksum after `old` words are replaced by `new`:
/// HC' = ~(~HC + ~m + m'). Byte order does not matter as long as it is the
/// same for every word.
#[inline(always)]
fn replace_words(checksum: u16, old: [u16; 2], new: [u16; 2]) -> u16 {
    let mut sum = u32::from(!checksum)
        + u32::from(!old[0])
        + u32::from(!old[1])
        + u32::from(new[0])
        + u32::from(new[1]);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
