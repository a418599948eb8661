//! `cargo xtask bench <name>`: benchmarks, not tests. Each prints a table of
//! medians with ratios against the references it ran in the same process.
//!
//! The benchmark binaries run as children of this process, so that whatever
//! an interrupted (Ctrl-C) or crashed one leaves behind — namespaces and the
//! proxies in them, bpffs pins, temporary directories, all named by
//! `unique_name` after its PID — is removed here once it has exited.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
};

use anyhow::{Context as _, bail};

use crate::{exec, setup};

/// Where the benchmarks find an HAProxy built with AWS-LC (`tests/src/peers.rs` reads it).
const HAPROXY_AWSLC_ENV: &str = "EDGEGATE_BENCH_HAPROXY_AWSLC";

/// A benchmark binary's exit status when this host cannot run it (it says
/// why in its report): `NOT_MEASURABLE_HERE` in `tests/src/bench.rs`.
const NOT_MEASURABLE_HERE: i32 = 77;

#[derive(clap::Args)]
pub struct Options {
    #[arg(value_enum)]
    name: Bench,
    /// An HAProxy built with AWS-LC (edgegate's crypto), run beside Debian's
    /// by the handshake, relay and memory benches; docs/BENCHMARKS.md says
    /// how to build one.
    #[arg(long, value_name = "PATH", env = HAPROXY_AWSLC_ENV)]
    haproxy_awslc: Option<PathBuf>,
    /// Arguments for the benchmark binary (not with `all`).
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    /// Every benchmark below, in turn; the tables also go to target/bench/all.md.
    All,
    /// ns/packet of the XDP program (BPF_PROG_TEST_RUN) against a DROP-only
    /// baseline and a plain LPM-trie program, for list sizes up to 1M.
    Xdp,
    /// Packets/s dropped per core under a random-source flood: edgegate's XDP
    /// program vs nftables, iptables + ipset and no filter (installed from
    /// Debian if missing), with 10, 10k and 100k prefixes.
    Flood,
    /// Allowlist changes through the CLI: `allow add` until visible, and a
    /// 100k-entry `allow replace` under a flood that must lose nothing.
    Update,
    /// Server CPU per mutual-TLS connection, full and resumed, under this
    /// project's generator and `openssl s_time`: edgegate, HAProxy (each
    /// build, defaults and without session cache/tickets), stunnel, and the
    /// floors. `-- --baseline PATH` compares this build with another instead.
    Handshake,
    /// Throughput (1 and 16 connections) and 64-byte echo latency through
    /// edgegate, HAProxy (each build) and stunnel, and directly to the backend.
    Relay,
    /// Memory (Pss) per idle established mTLS connection: edgegate, HAProxy
    /// (each build), stunnel.
    Memory,
    /// Fleet mode on a real 3-member etcd cluster: a change on one host until
    /// every host enforces it (with and without 50 more watchers), and a
    /// 100k-entry replace.
    Fleet,
}

impl Bench {
    const EACH: [Self; 7] = [
        Self::Xdp,
        Self::Flood,
        Self::Update,
        Self::Handshake,
        Self::Relay,
        Self::Memory,
        Self::Fleet,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Xdp => "xdp",
            Self::Flood => "flood",
            Self::Update => "update",
            Self::Handshake => "handshake",
            Self::Relay => "relay",
            Self::Memory => "memory",
            Self::Fleet => "fleet",
        }
    }

    /// Commands the benchmark compares with, and the Debian packages they come from.
    fn peers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Flood => &[
                ("nft", "nftables"),
                ("iptables", "iptables"),
                ("ipset", "ipset"),
                ("ethtool", "ethtool"),
            ],
            Self::Handshake | Self::Relay | Self::Memory => {
                &[("haproxy", "haproxy"), ("stunnel", "stunnel4"), ("openssl", "openssl")]
            }
            Self::All | Self::Xdp | Self::Update => &[],
            Self::Fleet => &[("etcd", "etcd-server"), ("etcdctl", "etcd-client")],
        }
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    exec::require_root("cargo xtask bench")?;
    if options.name == Bench::All && !options.args.is_empty() {
        bail!(
            "`cargo xtask bench all` takes no benchmark arguments; run one benchmark to pass some"
        );
    }
    setup::ensure()?;
    let benches: Vec<Bench> =
        if options.name == Bench::All { Bench::EACH.to_vec() } else { vec![options.name] };
    for bench in &benches {
        exec::install_missing("bench", bench.peers())?;
    }
    let haproxy_awslc = options.haproxy_awslc.as_deref().map(aws_lc_haproxy).transpose()?;
    // The update, handshake, relay and memory benches drive the real binary.
    // With the hooks: `bench handshake` also runs `--keys-in-worker`.
    exec::build_release_binary(exec::Hooks::On)?;
    let report_path = exec::workspace_root().join("target/bench/all.md");
    let mut report = Vec::new();
    let mut failed = Vec::new();
    let mut not_measurable = Vec::new();
    catch_interrupts();
    for bench in benches {
        let executable = build(bench)?;
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted before `bench {}`", bench.name());
        }
        println!("bench: running {}", bench.name());
        let mut command = Command::new(executable);
        command.args(&options.args);
        match &haproxy_awslc {
            Some(path) => command.env(HAPROXY_AWSLC_ENV, path),
            None => command.env_remove(HAPROXY_AWSLC_ENV),
        };
        match run_child(&mut command, &mut report)? {
            Outcome::Done => {}
            Outcome::NotMeasurableHere => not_measurable.push(bench.name()),
            Outcome::Failed(status) => failed.push(format!("{} ({status})", bench.name())),
            Outcome::Interrupted => bail!("interrupted during `bench {}`", bench.name()),
        }
    }
    if options.name == Bench::All {
        std::fs::create_dir_all(report_path.parent().expect("target/bench"))?;
        std::fs::write(&report_path, &report)
            .with_context(|| format!("cannot write {}", report_path.display()))?;
        println!("\nbench: every table is also in {}", report_path.display());
    }
    let not_measurable = not_measurable.join(", ");
    if !failed.is_empty() {
        let also = if not_measurable.is_empty() {
            String::new()
        } else {
            format!("; not measurable on this host: {not_measurable}")
        };
        bail!("benchmarks failed: {}{also}", failed.join(", "));
    }
    // Still an error: a table is missing, but nothing is wrong with edgegate.
    if !not_measurable.is_empty() {
        bail!("not measurable on this host (the report says why): {not_measurable}");
    }
    Ok(())
}

/// The absolute path of `path`, once it is known to be an HAProxy that runs
/// on AWS-LC: a wrong path must fail here, not after minutes of benchmarks.
fn aws_lc_haproxy(path: &Path) -> anyhow::Result<PathBuf> {
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("--haproxy-awslc {}: no such file", path.display()))?;
    let output = Command::new(&path)
        .arg("-vv")
        .output()
        .with_context(|| format!("--haproxy-awslc {}: cannot run it", path.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !text.starts_with("HAProxy version") {
        bail!("--haproxy-awslc {}: not an HAProxy (`-vv` says no version)", path.display());
    }
    if !text.lines().any(|l| l.starts_with("Running on") && l.contains("AWS-LC")) {
        bail!("--haproxy-awslc {}: this HAProxy does not run on AWS-LC", path.display());
    }
    Ok(path)
}

/// Builds one benchmark binary and returns its path.
fn build(bench: Bench) -> anyhow::Result<PathBuf> {
    let output = exec::output(
        exec::cargo()
            .args(["bench", "--no-run", "--message-format=json-render-diagnostics"])
            .args(["--package", "edgegate-tests", "--bench", bench.name()])
            .stderr(Stdio::inherit()),
    )?;
    if !output.status.success() {
        bail!("building `bench {}` failed: {}", bench.name(), output.status);
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == bench.name()
        })
        .and_then(|message| message["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo reported no executable for `bench {}`", bench.name()))
}

enum Outcome {
    Done,
    /// This host cannot run the benchmark; it said why.
    NotMeasurableHere,
    Failed(std::process::ExitStatus),
    Interrupted,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, signal) };
    }
}

/// From here on, Ctrl-C and SIGTERM are noted (and passed to a running
/// benchmark) instead of ending this process before it has cleaned up.
fn catch_interrupts() {
    // SAFETY: the handler only touches atomics and calls kill. Handlers (unlike
    // ignored signals) are reset to the default in children by exec.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as *const () as libc::sighandler_t);
    }
}

/// Runs a benchmark binary, copying its stdout (the tables) to ours and to
/// `report`; on Ctrl-C or SIGTERM it is passed the signal, and this process
/// stays to clean up after it, whatever happened.
fn run_child(command: &mut Command, report: &mut Vec<u8>) -> anyhow::Result<Outcome> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {command:?}"))?;
    CHILD.store(i32::try_from(child.id()).expect("PID"), Ordering::SeqCst);
    let stdout = child.stdout.take().expect("piped stdout");
    let copied = BufReader::new(stdout).lines().try_for_each(|line| {
        let line = line?;
        println!("{line}");
        writeln!(report, "{line}")
    });
    if copied.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    let removed = clean_up_after(child.id());
    if !removed.is_empty() {
        println!("bench: removed what the benchmark left behind: {}", removed.join(", "));
    }
    copied.context("cannot copy the benchmark's output")?;
    let status = status?;
    Ok(if INTERRUPTED.load(Ordering::SeqCst) {
        Outcome::Interrupted
    } else if status.success() {
        Outcome::Done
    } else if status.code() == Some(NOT_MEASURABLE_HERE) {
        Outcome::NotMeasurableHere
    } else {
        Outcome::Failed(status)
    })
}

/// Removes the namespaces (killing what runs in them), bpffs pins and
/// temporary directories that process `pid` named with `unique_name`.
fn clean_up_after(pid: u32) -> Vec<String> {
    let tag = format!("{}x", pid % 100_000);
    let ours = |name: &str| {
        let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
        stem.len() < name.len()
            && stem.strip_suffix(&tag).is_some_and(|prefix| {
                !prefix.is_empty() && prefix.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            })
    };
    let mut removed = Vec::new();
    let namespaces = exec::output(Command::new("ip").args(["netns", "list"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in namespaces.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| ours(n)) {
        let pids = exec::output(Command::new("ip").args(["netns", "pids", name]))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for process in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(process, libc::SIGKILL) };
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        removed.push(format!("namespace {name}"));
    }
    for dir in [Path::new("/sys/fs/bpf"), &std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if ours(&name) && std::fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(entry.path().display().to_string());
            }
        }
    }
    removed
}
