//! Building `proxy-ebpf`'s programs for the BPF target from a build script:
//! shared by `proxy/build.rs` (the filter, embedded in the daemon) and
//! `tests/build.rs` (the benchmarks' reference programs), through `#[path]`.
//!
//! This is what `aya-build` does, written out because aya-build 0.2.0 can only
//! build members of the current workspace, and `proxy-ebpf` must stay out of
//! it (a host build of a `no_main` BPF crate cannot link).

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

/// The toolchain the eBPF crate builds with: it needs `-Z build-std=core`.
const TOOLCHAIN: &str = "nightly";
const TARGET: &str = "bpfel-unknown-none";
const SETUP_HINT: &str = "run `cargo xtask setup` once to install it";

/// Builds the eBPF crate's `programs` (binaries of `proxy-ebpf`) and leaves
/// each as `<program>.bpf.o` in `OUT_DIR`.
pub fn build(programs: &[&str]) {
    // Test-only program variants (see `cargo xtask integration-test --vm --broken-program`).
    println!("cargo:rerun-if-env-changed=EDGEGATE_EBPF_FEATURES");
    let features = env::var("EDGEGATE_EBPF_FEATURES").unwrap_or_default();
    let built = compile(programs, &features, "ebpf-target");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    for program in programs {
        copy(&built.join(program), &out_dir.join(format!("{program}.bpf.o")));
    }
}

/// Builds `program` with the crate's `features` and leaves it as
/// `<name>.bpf.o` in `OUT_DIR` (a variant a benchmark compares with).
#[allow(
    dead_code,
    reason = "only tests/build.rs, of the two scripts sharing this file, builds variants"
)]
pub fn build_variant(program: &str, features: &str, name: &str) {
    // A target directory of its own: builds with other features do not undo it.
    let built = compile(&[program], features, &format!("ebpf-target-{name}"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    copy(&built.join(program), &out_dir.join(format!("{name}.bpf.o")));
}

/// Runs the BPF build in `OUT_DIR/<target>`; returns where the binaries are.
fn compile(programs: &[&str], features: &str, target: &str) -> PathBuf {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_dir = manifest_dir.join("../proxy-ebpf");
    let common_dir = manifest_dir.join("../proxy-common");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!("cargo:rerun-if-changed={}", dir.join("Cargo.toml").display());
    }

    check_toolchain();
    let target_dir = out_dir.join(target);
    let mut rustflags = OsString::from("-Cdebuginfo=2");
    // BTF lets the kernel's verifier print source lines and lets bpftool show the maps.
    rustflags.push("\x1f-Clink-arg=--btf");
    let status = Command::new("rustup")
        .args(["run", TOOLCHAIN, "cargo", "build", "--release"])
        .args(programs.iter().flat_map(|program| ["--bin", program]))
        .args(["--target", TARGET, "-Z", "build-std=core", "--features", features])
        .arg("--manifest-path")
        .arg(ebpf_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // Cargo sets these for this build script; they point at the host toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run rustup to build the XDP program: {e}; {SETUP_HINT}")
        });
    assert!(status.success(), "building the XDP program (proxy-ebpf) failed: {status}");
    target_dir.join(TARGET).join("release")
}

/// Fails the build with one actionable message when the eBPF toolchain is missing.
fn check_toolchain() {
    let has = |args: &[&str]| {
        Command::new("rustup").args(args).output().is_ok_and(|o| o.status.success())
    };
    if !has(&["run", TOOLCHAIN, "rustc", "--version"]) {
        panic!("the `{TOOLCHAIN}` Rust toolchain is missing; {SETUP_HINT}");
    }
    let sysroot = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_default();
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        panic!("the `rust-src` component of `{TOOLCHAIN}` is missing; {SETUP_HINT}");
    }
    let in_path = env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join("bpf-linker").exists()));
    let in_cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .is_some_and(|home| home.join("bin/bpf-linker").exists());
    if !in_path && !in_cargo_home {
        panic!("bpf-linker is missing; {SETUP_HINT}");
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}
