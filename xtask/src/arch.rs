//! The two architectures edgegate ships for and tests on, as each tool
//! names them: `dist` packages both, the VM harness boots both.

use crate::cross;

pub struct Arch {
    /// As Rust, `uname -m` and RPM name it (the `--arch` value).
    pub name: &'static str,
    /// As Debian names it.
    pub debian: &'static str,
    /// The Rust target its binaries are built for.
    pub rust_target: &'static str,
    /// An objdump and an objcopy that read its ELF files (Debian's plain
    /// ones only know the host's).
    pub objdump: &'static str,
    pub objcopy: &'static str,
    /// Its dynamic loader, which lists a foreign binary's libraries.
    pub loader: &'static str,
}

pub const X86_64: Arch = Arch {
    name: "x86_64",
    debian: "amd64",
    rust_target: "x86_64-unknown-linux-gnu",
    objdump: "objdump",
    objcopy: "objcopy",
    loader: "/lib64/ld-linux-x86-64.so.2",
};

pub const AARCH64: Arch = Arch {
    name: "aarch64",
    debian: "arm64",
    rust_target: cross::TARGET,
    objdump: "aarch64-linux-gnu-objdump",
    objcopy: "aarch64-linux-gnu-objcopy",
    loader: "/lib/ld-linux-aarch64.so.1",
};

impl Arch {
    /// Whether this host runs the architecture's binaries itself.
    pub fn is_host(&self) -> bool {
        self.name == std::env::consts::ARCH
    }
}
