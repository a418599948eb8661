//! `cargo xtask demo`: builds the release binary (setting up the toolchain
//! if needed), then runs `edgegate demo`.

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Arguments for `edgegate demo` (e.g. `-- --duration 20s`).
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
