//! `cargo xtask build-ebpf`: builds the XDP programs through the daemon's
//! build script (the one place that knows how) and copies the objects to
//! `target/bpf/` for inspection (`llvm-objdump -d`, `bpftool prog load`).

use std::{fs, io::BufRead as _, path::PathBuf, process::Stdio};

use anyhow::{Context as _, bail};

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Build in release mode.
    #[arg(long)]
    release: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure()?;
    let mut cargo = exec::cargo();
    cargo.args(["build", "--package", "edgegate", "--message-format=json-render-diagnostics"]);
    if options.release {
        cargo.arg("--release");
    }
    let mut child = cargo.stdout(Stdio::piped()).spawn().context("cannot run cargo build")?;
    let mut out_dir = None;
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let message: serde_json::Value = serde_json::from_str(&line?)?;
        let is_ours = message["package_id"].as_str().is_some_and(|id| id.contains("/proxy#"));
        if message["reason"] == "build-script-executed" && is_ours {
            out_dir = message["out_dir"].as_str().map(PathBuf::from);
        }
    }
    if !child.wait()?.success() {
        bail!("cargo build --package edgegate failed");
    }
    let out_dir = out_dir.context("cargo did not report the daemon's build-script output")?;
    let destination = exec::workspace_root().join("target/bpf");
    fs::create_dir_all(&destination)?;
    for entry in fs::read_dir(&out_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "o") {
            let target = destination.join(path.file_name().expect("a file"));
            fs::copy(&path, &target)?;
            println!("{}", target.display());
        }
    }
    Ok(())
}
