//! Project tasks: `cargo xtask <command>`. Each command is one module with
//! its options and a `run` function.

mod bench;
mod build_ebpf;
mod demo;
mod dist;
mod exec;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building the XDP program needs (idempotent).
    Setup(setup::Options),
    /// Build the XDP programs and copy the objects to target/bpf/.
    BuildEbpf(build_ebpf::Options),
    /// Run lints and every test (as root: XDP and network namespaces).
    Test(test::Options),
    /// Start the daemon on a throwaway network-namespace testbed and show it work.
    Demo(demo::Options),
    /// Benchmarks (not tests): print a table of measurements.
    Bench(bench::Options),
    /// Build the .deb and tarball (with --check: install and test them).
    Dist(dist::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(options) => setup::run(&options),
        Command::BuildEbpf(options) => build_ebpf::run(&options),
        Command::Test(options) => test::run(&options),
        Command::Demo(options) => demo::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::Dist(options) => dist::run(&options),
    }
}
