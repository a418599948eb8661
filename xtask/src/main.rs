//! Project tasks: `cargo xtask <command>`. Each command is one module with
//! its options and a `run` function.

mod arch;
mod bench;
mod build_ebpf;
mod cross;
mod demo;
mod dist;
mod exec;
mod setup;
mod test;
mod vm;

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
    /// The integration tests, on this host or (--vm) on EC2 kernels under QEMU.
    IntegrationTest(IntegrationTest),
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
        Command::IntegrationTest(options) => options.run(),
        Command::Bench(options) => bench::run(&options),
        Command::Dist(options) => dist::run(&options),
    }
}

#[derive(clap::Args)]
struct IntegrationTest {
    /// Boot each kernel in QEMU and run the suite there.
    #[arg(long)]
    vm: bool,
    /// A kernel: 6.1 (Debian 12 cloud), 6.12 (Debian 12 backports cloud), a
    /// kernel .deb or a vmlinuz; repeat for more. Default: 6.1 and 6.12.
    #[arg(long, requires = "vm")]
    kernel: Vec<String>,
    /// The guest's architecture: x86_64, or aarch64 (Graviton; cross-built,
    /// booted under TCG).
    #[arg(long, requires = "vm", default_value = "x86_64", value_parser = ["x86_64", "aarch64"])]
    arch: String,
    /// Self-test: build a program the verifier must reject; every run must fail.
    #[arg(long, requires = "vm")]
    broken_program: bool,
}

impl IntegrationTest {
    fn run(self) -> anyhow::Result<()> {
        exec::require_root("cargo xtask integration-test")?;
        setup::ensure()?;
        if !self.vm {
            exec::install_missing("integration-test", &test::TOOLS)?;
            exec::build_test_binaries()?;
            return exec::run(
                exec::cargo()
                    .args(["test", "--package", "edgegate-tests"])
                    .args(exec::Hooks::On.features())
                    .args(["--", "--test-threads=1"]),
            );
        }
        let kernels = if self.kernel.is_empty() {
            vm::DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect()
        } else {
            self.kernel
        };
        let guest = vm::Guest::named(&self.arch).expect("clap allows only known architectures");
        vm::run(guest, &kernels, self.broken_program)
    }
}
