//! `cargo xtask demo`: builds the release binary (setting up the toolchain
//! if needed), then runs `edgegate demo`.

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Arguments for `edgegate demo` (e.g. `-- --duration 20s`).
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    exec::require_root("cargo xtask demo")?;
    setup::ensure()?;
    let edgegate = exec::build_release_binary(exec::Hooks::Off)?;
    exec::run(std::process::Command::new(edgegate).arg("demo").args(&options.args))
}
