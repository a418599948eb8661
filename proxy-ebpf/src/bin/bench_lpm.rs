//! Benchmark reference: the textbook allowlist, one LPM-trie lookup of the
//! source address of untagged IPv4/IPv6 frames, no scope, no counters.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};

#[map(name = "BENCH_V4_TRIE")]
static V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1 << 21, 0);

#[map(name = "BENCH_V6_TRIE")]
static V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(1 << 21, 0);

#[xdp]
pub fn bench_lpm(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 > end {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: every read below is bounds-checked against `end` first.
    let ethertype = unsafe { u16::from_be_bytes(*((start + 12) as *const [u8; 2])) };
    let found = match ethertype {
        0x0800 if start + 14 + 20 <= end => {
            let addr = unsafe { *((start + 14 + 12) as *const [u8; 4]) };
            V4.get(Key::new(32, addr)).is_some()
        }
        0x86dd if start + 14 + 40 <= end => {
            let addr = unsafe { *((start + 14 + 8) as *const [u8; 16]) };
            V6.get(Key::new(128, addr)).is_some()
        }
        _ => false,
    };
    if found { xdp_action::XDP_PASS } else { xdp_action::XDP_DROP }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
