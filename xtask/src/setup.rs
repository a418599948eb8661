//! `cargo xtask setup`: installs, from nothing, what the eBPF build needs:
//! the nightly toolchain's `rust-src` (for `-Z build-std=core`) and a
//! `bpf-linker` built against that nightly's own libLLVM, so that the linker
//! and rustc agree on the LLVM bitcode version. Idempotent.

use std::{fs, os::unix::fs::symlink, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::exec::{self, workspace_root};

const TOOLCHAIN: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13";

#[derive(clap::Args, Default)]
pub struct Options {
    /// Rebuild bpf-linker even when a working one is installed.
    #[arg(long)]
    force: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    install_build_tools("setup")?;
    if !nightly_available() {
        println!("setup: installing the {TOOLCHAIN} toolchain");
        exec::run(Command::new("rustup").args([
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    if !rust_src_installed()? {
        println!("setup: adding rust-src to {TOOLCHAIN}");
        exec::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            TOOLCHAIN,
        ]))?;
    }
    if options.force || !bpf_linker_works() {
        install_bpf_linker()?;
    }
    println!(
        "setup: eBPF toolchain ready ({TOOLCHAIN} + rust-src + bpf-linker {BPF_LINKER_VERSION})"
    );
    Ok(())
}

/// Commands the build itself runs, and their Debian packages.
const BUILD_TOOLS: [(&str, &str); 1] = [("protoc", "protobuf-compiler")];
/// Files protoc imports (the well-known types), which `protobuf-compiler`
/// only recommends.
const BUILD_FILES: [(&str, &str); 1] =
    [("/usr/include/google/protobuf/descriptor.proto", "libprotobuf-dev")];

/// Runs setup when something is missing, saying why; other commands call this first.
pub fn ensure() -> anyhow::Result<()> {
    install_build_tools("build")?;
    if nightly_available() && rust_src_installed()? && bpf_linker_works() {
        return Ok(());
    }
    eprintln!("the eBPF toolchain is incomplete: running `cargo xtask setup` first");
    run(&Options::default())
}

/// The etcd client's build script generates its gRPC code with protoc.
fn install_build_tools(what: &str) -> anyhow::Result<()> {
    exec::install_missing(what, &BUILD_TOOLS)?;
    exec::install_missing_files(what, &BUILD_FILES)
}

fn nightly_available() -> bool {
    Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn sysroot() -> anyhow::Result<PathBuf> {
    let output = exec::output(
        Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]),
    )?;
    if !output.status.success() {
        bail!("cannot find the {TOOLCHAIN} sysroot: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn rust_src_installed() -> anyhow::Result<bool> {
    Ok(nightly_available()
        && sysroot()?.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists())
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    })
}

/// Builds bpf-linker against the libLLVM that ships inside the nightly
/// toolchain: a prefix directory whose `lib/` links to it is all its build
/// script needs (about a minute, no LLVM download).
fn install_bpf_linker() -> anyhow::Result<()> {
    let sysroot = sysroot()?;
    let sysroot_lib = sysroot.join("lib");
    let libllvm = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", sysroot_lib.display()))?;
    let major = llvm_major()?;

    let prefix = workspace_root().join("target/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for link in [libllvm.as_str(), "libLLVM.so"] {
        let path = prefix_lib.join(link);
        let _ = fs::remove_file(&path);
        symlink(sysroot_lib.join(&libllvm), &path)
            .with_context(|| format!("cannot link {}", path.display()))?;
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against {libllvm} (LLVM {major})");
    exec::run(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", &format!("^{BPF_LINKER_VERSION}")])
            .args(["--no-default-features", "--features", &format!("llvm-{major}"), "--force"])
            .env("LLVM_PREFIX", &prefix)
            // Link the linker to the toolchain's libLLVM at run time too.
            .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", sysroot_lib.display())),
    )?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn llvm_major() -> anyhow::Result<String> {
    let output = exec::output(Command::new("rustup").args([
        "run",
        TOOLCHAIN,
        "rustc",
        "--version",
        "--verbose",
    ]))?;
    let text = String::from_utf8(output.stdout)?;
    text.lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .map(str::to_owned)
        .context("rustc does not report its LLVM version")
}
