//! Reference programs the benchmarks compare the filter with, and drive it
//! with, built by `build.rs` from `proxy-ebpf`.

/// Returns XDP_DROP and nothing else: the cost floor of running any program.
pub static DROP_ONLY: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-drop.bpf.o"));
/// One LPM-trie lookup of the source address (maps `BENCH_V4_TRIE`,
/// `BENCH_V6_TRIE`; any value means allowed).
pub static PLAIN_LPM: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-lpm.bpf.o"));
/// `cargo xtask bench flood`'s traffic generator: programs `flood_redirect`
/// (random IPv4 source, out of the global `TARGET_IFINDEX`) and
/// `flood_drop` (the same rewrite, then dropped).
pub static FLOOD_GENERATOR: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-flood.bpf.o"));
/// The filter built without its drop sample (feature `without-drop-sample`):
/// what `bench xdp` and `bench flood` compare the filter with to show the
/// sample's cost. Loaded with `Filter::open_object`, it uses the same maps.
pub static FILTER_WITHOUT_DROP_SAMPLE: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edgegate-without-drop-sample.bpf.o"));
