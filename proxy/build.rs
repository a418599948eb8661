//! Builds the XDP program (`proxy-ebpf`'s `edgegate`) and the worker's egress
//! filter (`egress`) for the BPF target and leaves the objects in `OUT_DIR`,
//! where `src/filter/mod.rs` and `src/daemon/egress.rs` embed them.

#[path = "../proxy-ebpf/build_support.rs"]
mod ebpf;

fn main() {
    ebpf::build(&["edgegate", "egress"]);
}
