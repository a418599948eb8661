//! `cargo xtask bench <name>`: benchmarks, not tests. Each prints a table of
//! medians with ratios against the references it ran in the same process.

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    #[arg(value_enum)]
    name: Bench,
    /// Arguments for the benchmark binary.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// ns/packet of the XDP program (BPF_PROG_TEST_RUN) against a DROP-only
    /// baseline and a plain LPM-trie program, for list sizes up to 1M.
    Xdp,
    /// Allowlist changes through the CLI: `allow add` until visible, and a
    /// 100k-entry `allow replace` under a flood that must lose nothing.
    Update,
    /// Full mutual-TLS handshakes/s and server CPU per handshake: edgegate,
    /// HAProxy and stunnel (installed from Debian if missing).
    Handshake,
    /// Memory (Pss) per idle established mTLS connection: edgegate, HAProxy, stunnel.
    Memory,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    exec::require_root("cargo xtask bench")?;
    setup::ensure()?;
    let name = match options.name {
        Bench::Xdp => "xdp",
        Bench::Update => "update",
        Bench::Handshake => {
            install_peers(&["haproxy", "stunnel"], &["haproxy", "stunnel4"])?;
            "handshake"
        }
        Bench::Memory => {
            install_peers(&["haproxy", "stunnel"], &["haproxy", "stunnel4"])?;
            "memory"
        }
    };
    // The update, handshake and memory benches drive the real binary.
    exec::build_release_binary()?;
    exec::run(
        exec::cargo()
            .args(["bench", "--package", "edgegate-tests", "--bench", name, "--"])
            .args(&options.args),
    )
}

/// Installs the peers a benchmark compares with, from Debian, when missing.
fn install_peers(commands: &[&str], packages: &[&str]) -> anyhow::Result<()> {
    let missing = commands.iter().any(|c| {
        std::process::Command::new("which").arg(c).output().map_or(true, |o| !o.status.success())
    });
    if missing {
        println!("bench: installing {}", packages.join(", "));
        exec::run(
            std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}
