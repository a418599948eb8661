//! Running commands, with errors that name the command.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Context as _, bail};

/// Runs `command` with inherited output; fails naming it unless it succeeds.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs `command` and returns its output, whether or not it succeeded.
pub fn output(command: &mut Command) -> anyhow::Result<Output> {
    command.output().with_context(|| format!("cannot run {command:?}"))
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_owned()
}

/// `cargo` as the one running xtask.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Builds the release `edgegate` binary and returns its path: as shipped,
/// or with the test hooks (`--keys-in-worker`, for benchmarks).
pub fn build_release_binary(hooks: Hooks) -> anyhow::Result<PathBuf> {
    let mut build = cargo();
    build.args(["build", "--release", "--package", "edgegate", "--bin", "edgegate"]);
    run(build.args(hooks.features()))?;
    Ok(workspace_root().join("target/release/edgegate"))
}

/// Builds the debug binaries the integration tests start: with the test
/// hooks (`run --worker-escape`), which the shipped binary has not. Every
/// test build passes [`Hooks::On`] too, so that edgegate is built once.
pub fn build_test_binaries() -> anyhow::Result<()> {
    run(cargo().args(["build", "--package", "edgegate", "--bins"]).args(Hooks::On.features()))
}

/// Whether a build of the daemon has the `test-hooks` feature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hooks {
    /// As shipped: no test hooks.
    Off,
    On,
}

impl Hooks {
    pub fn features(self) -> &'static [&'static str] {
        match self {
            Self::Off => &[],
            Self::On => &["--features", "edgegate/test-hooks"],
        }
    }
}

/// Whether `command` is on the PATH.
pub fn on_path(command: &str) -> bool {
    Command::new("which").arg(command).output().is_ok_and(|o| o.status.success())
}

/// Installs, from Debian, the packages whose commands are missing: `needed`
/// pairs a command with its package. Refreshes the package lists when a
/// fresh machine has none.
pub fn install_missing(what: &str, needed: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing = needed
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|&(_, package)| package)
        .collect();
    apt_install(what, missing)
}

/// Like [`install_missing`], for packages that provide files rather than
/// commands (a cross-compiler's libc): `needed` pairs a path with its package.
pub fn install_missing_files(what: &str, needed: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing = needed
        .iter()
        .filter(|(path, _)| !std::path::Path::new(path).exists())
        .map(|&(_, package)| package)
        .collect();
    apt_install(what, missing)
}

fn apt_install(what: &str, mut missing: Vec<&str>) -> anyhow::Result<()> {
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    println!("{what}: installing {}", missing.join(", "));
    let install = || {
        let mut command = Command::new("apt-get");
        command
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    if run(&mut install()).is_err() {
        println!("{what}: refreshing the package lists and trying again");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(&mut install())?;
    }
    Ok(())
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root (XDP, bpffs, network namespaces): run it as root or with `sudo -E`"
        );
    }
    Ok(())
}
