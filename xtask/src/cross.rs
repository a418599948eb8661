//! Cross-building for aarch64 (Graviton) with Debian's cross toolchain: the
//! packages `dist` builds and the binaries the arm64 VM tests boot with.

use std::process::Command;

use crate::exec;

/// The Rust target.
pub const TARGET: &str = "aarch64-unknown-linux-gnu";

/// Where Debian's aarch64 libc lives: linked against by the cross build,
/// and the `-L` root qemu-user loads the dynamic linker from.
pub const SYSROOT: &str = "/usr/aarch64-linux-gnu";

/// Debian's aarch64 cross compiler and binutils: the linker, the C compiler
/// for aws-lc-sys and ring (which build with the `cc` crate: no cmake
/// needed), and the objdump that reads aarch64 ELF files.
const TOOLS: [(&str, &str); 3] = [
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ("aarch64-linux-gnu-ar", "binutils-aarch64-linux-gnu"),
    ("aarch64-linux-gnu-objdump", "binutils-aarch64-linux-gnu"),
];

/// Installs what a cross build needs, where it is missing.
pub fn prepare(what: &str) -> anyhow::Result<()> {
    exec::install_missing(what, &TOOLS)?;
    // gcc-aarch64-linux-gnu only recommends its libc, and apt here installs
    // no recommends: without it the link finds no crt1.o.
    exec::install_missing_files(
        what,
        &[(&format!("{SYSROOT}/lib/crt1.o"), "libc6-dev-arm64-cross")],
    )?;
    add_rust_target()
}

/// `cargo` set up to build for [`TARGET`] (the caller adds `--target`).
pub fn cargo() -> Command {
    let mut cargo = exec::cargo();
    cargo
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
        // For the C in aws-lc-sys and ring (the `cc` crate reads these).
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar");
    cargo
}

/// Adds the Rust standard library for [`TARGET`] to the toolchain cargo uses
/// here, unless it is there.
fn add_rust_target() -> anyhow::Result<()> {
    let rustup = || {
        let mut command = Command::new("rustup");
        command.current_dir(exec::workspace_root());
        command
    };
    let installed = exec::output(rustup().args(["target", "list", "--installed"]))?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|line| line.trim() == TARGET) {
        return Ok(());
    }
    println!("cross: adding the Rust target {TARGET}");
    exec::run(rustup().args(["target", "add", TARGET]))
}
