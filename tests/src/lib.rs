//! Test support for edgegate: network namespaces, a testbed that runs the real
//! daemon binary on veth pairs, and packet builders for BPF_PROG_TEST_RUN.
//!
//! Everything here cleans up on drop, so a failing (panicking) test leaves no
//! namespace, process or pin behind.

pub mod harness;
pub mod mtls;
pub mod netns;
pub mod packet;
pub mod pki;
pub mod testbed;

use std::sync::atomic::{AtomicU32, Ordering};

/// A short name unique to this process and call, for interfaces (at most 15
/// bytes), namespaces and pin directories.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Panics unless running as root: CI runs as root, so a root-only test
/// must fail there rather than skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (XDP, bpffs, namespaces)");
}

/// A tiny deterministic generator (Knuth's MMIX LCG): tests and benchmarks
/// must see the same "random" lists and addresses on every run.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 53 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 =
            self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }
}
