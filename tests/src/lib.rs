//! Test support for edgegate: network namespaces, a testbed that runs the real
//! daemon binary on veth pairs, and packet builders for BPF_PROG_TEST_RUN.
//!
//! Everything here cleans up on drop, so a failing (panicking) test leaves no
//! namespace, process or pin behind.

pub use edgegate::demo::{netns, netns::unique_name, pki};

pub mod bench;
pub mod fleet;
pub mod flood;
pub mod harness;
pub mod mtls;
pub mod packet;
pub mod peers;
pub mod reference;
pub mod service;
pub mod testbed;
pub mod tun;

/// Panics unless running as root: CI runs as root, so a root-only test
/// must fail there rather than skip silently.
pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root (XDP, bpffs, namespaces)");
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
