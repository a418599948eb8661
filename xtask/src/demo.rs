//! `cargo xtask demo`: builds everything (setting up the toolchain if
//! needed), then runs the namespace testbed demo from the tests crate.

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Arguments for the demo (see `cargo xtask demo -- --help`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    exec::require_root("cargo xtask demo")?;
    setup::ensure()?;
    exec::run(exec::cargo().args(["build", "--release", "--package", "edgegate", "--bins"]))?;
    exec::run(
        exec::cargo()
            .args([
                "run",
                "--release",
                "--package",
                "edgegate-tests",
                "--bin",
                "edgegate-demo",
                "--",
            ])
            .args(&options.args),
    )
}
