//! `cargo xtask build-ebpf`: builds the XDP programs through the build
//! scripts that embed them (the daemon's: the filter; the tests crate's: the
//! benchmarks' reference programs) and copies the objects to `target/bpf/`
//! for inspection (`llvm-objdump -d`, `bpftool prog load`).

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
    cargo.args(["build", "--package", "edgegate", "--package", "edgegate-tests", "--lib"]);
    cargo.arg("--message-format=json-render-diagnostics");
    if options.release {
        cargo.arg("--release");
    }
    let mut child = cargo.stdout(Stdio::piped()).spawn().context("cannot run cargo build")?;
    let mut out_dirs = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let message: serde_json::Value = serde_json::from_str(&line?)?;
        let is_ours = message["package_id"]
            .as_str()
            .is_some_and(|id| id.contains("/proxy#") || id.contains("/tests#"));
        if message["reason"] == "build-script-executed" && is_ours {
            out_dirs.extend(message["out_dir"].as_str().map(PathBuf::from));
        }
    }
    if !child.wait()?.success() {
        bail!("cargo build --package edgegate --package edgegate-tests failed");
    }
    if out_dirs.len() != 2 {
        bail!("cargo did not report both build scripts' output: {out_dirs:?}");
    }
    let destination = exec::workspace_root().join("target/bpf");
    fs::create_dir_all(&destination)?;
    for entry in
        out_dirs.iter().map(fs::read_dir).collect::<Result<Vec<_>, _>>()?.into_iter().flatten()
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "o") {
            let target = destination.join(path.file_name().expect("a file"));
            fs::copy(&path, &target)?;
            println!("{}", target.display());
        }
    }
    Ok(())
}
