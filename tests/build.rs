//! Builds the benchmarks' reference XDP programs (`proxy-ebpf`'s `bench-*`
//! binaries, and the filter without its drop sample) into `OUT_DIR`, where
//! `src/reference.rs` embeds them: the daemon's own build only carries the
//! filter.

#[path = "../proxy-ebpf/build_support.rs"]
mod ebpf;

fn main() {
    ebpf::build(&["bench-drop", "bench-lpm", "bench-flood"]);
    ebpf::build_variant("edgegate", "without-drop-sample", "edgegate-without-drop-sample");
}
