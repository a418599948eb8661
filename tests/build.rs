//! Builds the benchmarks' reference XDP programs (`proxy-ebpf`'s `bench-*`
//! binaries) into `OUT_DIR`, where `src/reference.rs` embeds them: the
//! daemon's own build only carries the filter.

#[path = "../proxy-ebpf/build_support.rs"]
mod ebpf;

fn main() {
    ebpf::build(&["bench-drop", "bench-lpm", "bench-flood"]);
}
