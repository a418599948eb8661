//! Builds the XDP program (`proxy-ebpf`'s `edgegate`) for the BPF target and
//! leaves the object in `OUT_DIR`, where `src/filter/mod.rs` embeds it.

#[path = "../proxy-ebpf/build_support.rs"]
mod ebpf;

fn main() {
    ebpf::build(&["edgegate"]);
}
