//! `cargo xtask test`: formatting, lints, then every test. The integration
//! tests load XDP programs and build network namespaces, so this runs as root.

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Skip the VM tests (`cargo xtask integration-test --vm`).
    #[arg(long)]
    no_vm: bool,
    /// Skip building and checking the package (`cargo xtask dist --check`).
    #[arg(long)]
    no_dist: bool,
    /// Passed to the test binaries (e.g. a test name filter).
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// Commands the tests run, and the Debian packages they come from: namespaces
/// and veths, entering them, dropping to a user, the real TLS clients and
/// scanner, the unit checker for the packaged service, and the etcd cluster
/// of the fleet tests.
pub const TOOLS: [(&str, &str); 9] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("testssl", "testssl.sh"),
    ("systemd-analyze", "systemd"),
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
];

pub fn run(options: &Options) -> anyhow::Result<()> {
    exec::require_root("cargo xtask test")?;
    exec::install_missing("test", &TOOLS)?;
    setup::ensure()?;
    if !options.no_lint {
        exec::run(exec::cargo().args(["fmt", "--all", "--", "--check"]))?;
        // The daemon with its test hooks, as the tests build it, and as shipped.
        exec::run(
            exec::cargo()
                .args(["clippy", "--workspace", "--all-targets"])
                .args(exec::Hooks::On.features())
                .args(["--", "-D", "warnings"]),
        )?;
        exec::run(exec::cargo().args([
            "clippy",
            "--package",
            "edgegate",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The end-to-end tests start the real binary; build it first.
    exec::build_test_binaries()?;
    // One test at a time: the tests share the kernel (bpffs, XDP, CPU time),
    // and some assert latencies that a parallel verifier run would distort.
    exec::run(
        exec::cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(exec::Hooks::On.features())
            .args(["--", "--test-threads=1"])
            .args(&options.test_args),
    )?;
    if !options.no_vm {
        // The suite on the kernels EC2 images run, on both architectures,
        // then proof that a program the verifier rejects does fail the VM
        // run: a test of the harness, which one kernel (the oldest
        // verifier) gives.
        let kernels: Vec<String> =
            crate::vm::DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect();
        crate::vm::run(&crate::vm::X86_64, &kernels, false)?;
        crate::vm::run(&crate::vm::AARCH64, &kernels, false)?;
        crate::vm::run(&crate::vm::X86_64, &kernels[..1], true)?;
    }
    if options.no_dist {
        return Ok(());
    }
    // The package, installed into an empty root, runs the demo; and the
    // README's first command works as written.
    crate::dist::run(&crate::dist::Options { check: true })?;
    crate::demo::run(&crate::demo::Options { args: vec!["--duration".into(), "2s".into()] })
}
