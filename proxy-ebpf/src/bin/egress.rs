//! edgegate's egress filter for the proxy worker: attached to the worker's
//! cgroup at `connect4` and `connect6`, it lets a `connect()` (or a TCP Fast
//! Open `sendmsg`) through only to a destination in `EG_EGRESS_ALLOWED`,
//! which the gate keeps equal to the backends' resolved addresses. Anything
//! else fails with `EPERM` and is counted. It holds independently of
//! Landlock, whose network rules (Linux 6.7) know ports, not addresses.
#![no_std]
#![no_main]
// The BPF target has no `Atomic*::fetch_add`; the intrinsic lowers to BPF's atomic add.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the only way to emit BPF_ATOMIC_ADD")]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap},
    programs::SockAddrContext,
};
use proxy_common::{EgressKey, egress::MAX_DESTINATIONS};

#[map(name = "EG_EGRESS_ALLOWED")]
static ALLOWED: HashMap<EgressKey, u8> = HashMap::with_max_entries(MAX_DESTINATIONS, 0);

#[map(name = "EG_EGRESS_REFUSED")]
static REFUSED: Array<u64> = Array::with_max_entries(1, 0);

/// The verdicts a `cgroup/connect*` program returns.
const REFUSE: i32 = 0;
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`; these
    // are the 4-byte reads the verifier allows on it.
    let (address, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // Both are stored in network byte order: their bytes, in memory order,
    // are the address's and the port's.
    judge(&EgressKey::v4(address.to_ne_bytes(), port_bytes(port)))
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let (words, port) = unsafe { ((*ctx.sock_addr).user_ip6, (*ctx.sock_addr).user_port) };
    let mut address = [0u8; 16];
    for (chunk, word) in address.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    judge(&EgressKey::v6(address, port_bytes(port)))
}

/// The port's two bytes, in network order, from the `u32` that holds them
/// in its first two bytes of memory.
fn port_bytes(port: u32) -> [u8; 2] {
    let [high, low, _, _] = port.to_ne_bytes();
    [high, low]
}

fn judge(destination: &EgressKey) -> i32 {
    // SAFETY: a lookup of a key the program owns; the value is not kept.
    if unsafe { ALLOWED.get(destination) }.is_some() {
        return ALLOW;
    }
    if let Some(refused) = REFUSED.get_ptr_mut(0) {
        // SAFETY: element 0 of an array map exists for the map's lifetime.
        unsafe { atomic_xadd::<_, _, { AtomicOrdering::Relaxed }>(refused, 1u64) };
    }
    REFUSE
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
