//! The `edgegate` command: the daemon (`run`) and the CLI that talks to it.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use edgegate::{
    allowlist::{self, Action, Allowlist, Change},
    config::{
        Config, DEFAULT_BPFFS_DIR, DEFAULT_CONTROL_SOCKET, DEFAULT_MAX_ENTRIES, DEFAULT_STATE_DIR,
        LogFormat, Overrides, Scope,
    },
    control::{self, ClientError, Request, Response},
    daemon, filter,
    status::{ListReload, Status},
};
use proxy_common::Framing;

#[cfg(test)]
mod docs;
mod generate;

#[derive(Parser)]
#[command(
    name = "edgegate",
    version,
    about = "XDP allowlist and mTLS gate for partner-facing backends"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "EDGEGATE_CONTROL_SOCKET")]
    control_socket: Option<PathBuf>,
    /// Where the daemon keeps state (the allowlist, unless the config names a file).
    #[arg(long, global = true, env = "EDGEGATE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// bpffs directory holding the pinned program links and maps.
    #[arg(long, global = true, env = "EDGEGATE_BPFFS_DIR")]
    bpffs_dir: Option<PathBuf>,
}

impl Global {
    fn overrides(&self) -> Overrides {
        Overrides {
            control_socket: self.control_socket.clone(),
            state_dir: self.state_dir.clone(),
            bpffs_dir: self.bpffs_dir.clone(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into())
    }

    fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| DEFAULT_STATE_DIR.into())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: attach the XDP filter and serve the control socket (root).
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Log format (default: the config's `daemon.log_format`, else text).
        #[arg(long, value_enum, env = "EDGEGATE_LOG_FORMAT")]
        log_format: Option<LogFormat>,
        /// Test only: every proxy worker tries this once sandboxed.
        #[arg(long, value_enum, hide = true)]
        worker_escape: Option<edgegate::privsep::escape::Attempt>,
        /// Benchmarks only: the worker holds the listeners' keys (to measure
        /// what keeping them in the gate costs).
        #[arg(long, hide = true)]
        keys_in_worker: bool,
        /// Test only: where a connection attempt of `--worker-escape` goes.
        #[arg(long, hide = true, requires = "worker_escape")]
        worker_escape_address: Option<std::net::SocketAddr>,
    },
    /// The sandboxed proxy worker; `run` starts it.
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Validate a config file and the allowlist it names; exit non-zero on error.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Change or show the allow entries.
    Allow {
        #[command(subcommand)]
        command: AllowCommand,
    },
    /// Change the deny entries (exceptions inside allowed ranges).
    Deny {
        #[command(subcommand)]
        command: DenyCommand,
    },
    /// Show the mode, interfaces, list sizes, counters and the busiest rules.
    Status {
        #[arg(long)]
        json: bool,
        /// How many of the busiest rules (and dropped sources) to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Also show the sampled sources with the most dropped (or, in audit
        /// mode, would-be dropped) packets.
        #[arg(long)]
        dropped: bool,
    },
    /// Re-read the config and the listeners' certificates, keys, CAs and CRLs (as SIGHUP).
    Reload,
    /// See the whole gate work on a throwaway testbed of network namespaces (root).
    Demo {
        /// Roughly how long the demo takes; it then cleans up and exits.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
    },
    /// Remove the pinned XDP program from one or all interfaces (daemon stopped).
    Detach {
        #[arg(long)]
        interface: Option<String>,
    },
    /// Fleet mode: the group's list in etcd and the hosts that enforce it.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Print the completion script for bash, zsh, fish, elvish or PowerShell.
    Completions { shell: clap_complete::Shell },
    /// Packaging: write the man pages (edgegate.1, edgegate-allow-add.1, …) into a directory.
    #[command(hide = true)]
    Man {
        #[arg(long)]
        out_dir: PathBuf,
    },
}

/// What the gate tells the worker on its command line (`privsep::spawn`).
#[derive(Args)]
struct WorkerArgs {
    #[arg(long)]
    channel_fd: i32,
    #[arg(long = "key-fd")]
    key_fds: Vec<i32>,
    #[arg(long, value_enum)]
    log_format: LogFormat,
    #[arg(long = "connect-port")]
    connect_ports: Vec<u16>,
    #[arg(long, value_enum, requires_all = ["escape_target", "escape_gate"])]
    escape: Option<edgegate::privsep::escape::Attempt>,
    #[arg(long)]
    escape_target: Option<PathBuf>,
    #[arg(long)]
    escape_gate: Option<u32>,
    #[arg(long)]
    escape_address: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum FleetCommand {
    /// The group's generation, and per host: alive, the generation it enforces, when, its lag.
    Status {
        #[arg(long)]
        json: bool,
        /// Read etcd directly with this file's `[fleet]` table (no daemon needed).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a new signing key pair: FILE.key (private, 0600) and FILE.pub
    /// (the line for `[fleet] trusted_keys`). Keep the private key off the gate hosts.
    Keygen {
        /// Path without extension, e.g. /etc/edgegate/admin-2026.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AllowCommand {
    /// Allow sources (CIDRs or addresses).
    Add(AddArgs),
    /// Remove allow entries.
    Del(DelArgs),
    /// Print every entry with its action (the file format, or JSON).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Replace the whole list with a file, without dropping sources both lists allow.
    Replace {
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        offline: Offline,
        #[command(flatten)]
        commit: Commit,
    },
    /// Allow AWS's published ranges (ip-ranges.json) of some regions and services.
    ImportAws {
        /// A copy of https://ip-ranges.amazonaws.com/ip-ranges.json.
        #[arg(long)]
        file: PathBuf,
        /// Only these regions (e.g. eu-west-1); repeat for more. Default: all.
        #[arg(long = "region")]
        regions: Vec<String>,
        /// Only these services (e.g. EC2); repeat for more. Default: all.
        #[arg(long = "service")]
        services: Vec<String>,
        /// Drop the entries of earlier imports first (refresh), keeping the operator's own.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        offline: Offline,
        #[command(flatten)]
        commit: Commit,
    },
    /// Explain the verdict for a source: the deciding entry (and its line),
    /// the port's scope, and what the loaded XDP program does with it.
    Explain {
        address: std::net::IpAddr,
        /// The destination port (default: the first listener's).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    /// Suggest allow entries for clients that authenticated (mTLS) from
    /// addresses the list does not allow, as audit mode lets them: grouped
    /// per certificate name into the narrowest CIDRs.
    Suggest {
        #[arg(long, conflicts_with = "apply")]
        json: bool,
        /// Add the suggestions reviewed, as one change, each commented with
        /// its identities: DIGEST is the one `allow suggest` printed with
        /// them, and a different set now (the sources changed) is refused.
        #[arg(long, value_name = "DIGEST")]
        apply: Option<String>,
        /// With --apply: only these of the reviewed suggestions.
        #[arg(long = "only", value_name = "CIDR", requires = "apply")]
        only: Vec<ipnet::IpNet>,
        /// With --signing-key: the file whose `[fleet]` table names the
        /// group and etcd.
        #[arg(long, requires = "signing_key")]
        config: Option<PathBuf>,
        #[command(flatten)]
        commit: Commit,
    },
}

#[derive(Subcommand)]
enum DenyCommand {
    /// Deny sources, even inside allowed ranges (the longest prefix wins).
    Add(AddArgs),
    /// Remove deny entries.
    Del(DelArgs),
    /// Print the deny entries (the file format, or JSON).
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct AddArgs {
    /// CIDRs or addresses; all are added, or none.
    #[arg(required = true)]
    cidrs: Vec<String>,
    /// Kept next to the entries in the allowlist file.
    #[arg(long)]
    comment: Option<String>,
    #[command(flatten)]
    offline: Offline,
    #[command(flatten)]
    commit: Commit,
}

#[derive(Args)]
struct DelArgs {
    /// Entries to remove; all are removed, or none.
    #[arg(required = true)]
    cidrs: Vec<String>,
    #[command(flatten)]
    offline: Offline,
    #[command(flatten)]
    commit: Commit,
}

/// Changing the file while no daemon runs (e.g. to seed the list before the
/// first start).
#[derive(Args)]
struct Offline {
    /// Change the allowlist file directly (no daemon may run): validated
    /// whole and written atomically; a daemon applies it when it starts.
    #[arg(long)]
    offline: bool,
    /// With --offline: the config whose allowlist file and `max_entries` to
    /// use (default: `allowlist` in the state directory). With
    /// --signing-key: the file whose `[fleet]` table names the group and etcd.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// How a change is committed in fleet mode.
#[derive(Args)]
struct Commit {
    /// Fleet mode: wait until every live host of the group enforces the change.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up (exit 1, naming the hosts behind) after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, requires = "wait")]
    wait_timeout: std::time::Duration,
    /// Fleet mode: allow a change that leaves the group's list empty (drops
    /// every source on every host).
    #[arg(long)]
    force: bool,
    /// Fleet mode with `trusted_keys`: sign the change with this private key
    /// and commit it to etcd directly (needs --config), without a daemon.
    #[arg(long, env = "EDGEGATE_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgegate: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping causes that a message already quotes.
fn report(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    let Cli { global, command } = cli;
    match command {
        Command::Run {
            config,
            log_format,
            keys_in_worker,
            worker_escape,
            worker_escape_address,
        } => {
            let overrides = global.overrides();
            // The config is read again (and every problem reported) by
            // `daemon::start`; here only its log format matters, and one
            // that does not parse leaves the default to report that.
            let log_format = log_format.unwrap_or_else(|| {
                Config::load(&config, &overrides).map(|c| c.daemon.log_format).unwrap_or_default()
            });
            init_logging(log_format);
            // Start-up (and dropping privileges) happens before the runtime's
            // threads exist: they inherit the reduced credentials.
            let options = daemon::Options {
                overrides,
                log_format,
                keys_in_worker,
                escape: worker_escape.map(|attempt| (attempt, worker_escape_address)),
            };
            let startup = daemon::start(config, options)?;
            // Connections run on per-core workers of their own (proxy::workers);
            // this runtime accepts, answers the CLI, serves metrics, reloads.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            let served = runtime.block_on(daemon::serve(startup, shutdown_signal()));
            // Not a wait for blocking tasks: one waits on a worker that was
            // handed over and drains on after this process is gone.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            served?;
            Ok(())
        }
        Command::Worker(args) => {
            init_logging(args.log_format);
            let address = args.escape_address;
            let escape = args.escape.zip(args.escape_target.zip(args.escape_gate)).map(
                |(attempt, (path, gate))| {
                    (attempt, edgegate::privsep::escape::Target { path, gate, address })
                },
            );
            let options = edgegate::privsep::worker::Options {
                channel: args.channel_fd,
                key_channels: args.key_fds,
                connect_ports: args.connect_ports,
                escape,
            };
            edgegate::privsep::worker::run(options).context("proxy worker")?;
            Ok(())
        }
        Command::Check { config } => check(&config, &global),
        Command::Reload => reload(&global),
        Command::Demo { duration } => demo(duration),
        Command::Allow { command } => match command {
            AllowCommand::Add(args) => add(&global, Action::Allow, args),
            AllowCommand::Del(args) => remove(&global, Action::Allow, args),
            AllowCommand::List { json } => list(&global, json, None),
            AllowCommand::Explain { address, port, json } => explain(&global, address, port, json),
            AllowCommand::Suggest { json, apply, only, config, commit } => {
                let via = Offline { offline: false, config };
                suggest(&global, json, apply.as_deref(), &only, &via, &commit)
            }
            AllowCommand::ImportAws { file, regions, services, replace, offline, commit } => {
                let selection = edgegate::aws::Selection { regions, services };
                let entries = edgegate::aws::read(&file, &selection)?;
                let tag = edgegate::aws::COMMENT_TAG.to_owned();
                change(&global, Change::Import { entries, tag, replace }, &offline, &commit)
            }
            AllowCommand::Replace { file, offline, commit } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                // Check locally first so that errors name the file.
                Allowlist::parse(&text).with_context(|| file.display().to_string())?;
                change(&global, Change::Replace { text }, &offline, &commit)
            }
        },
        Command::Deny { command } => match command {
            DenyCommand::Add(args) => add(&global, Action::Deny, args),
            DenyCommand::Del(args) => remove(&global, Action::Deny, args),
            DenyCommand::List { json } => list(&global, json, Some(Action::Deny)),
        },
        Command::Status { json, top, dropped } => status(&global, json, top, dropped),
        Command::Detach { interface } => detach(&global, interface.as_deref()),
        Command::Fleet { command: FleetCommand::Status { json, config } } => {
            fleet_status(&global, json, config.as_deref())
        }
        Command::Fleet { command: FleetCommand::Keygen { out } } => keygen(&out),
        Command::Completions { shell } => generate::completions(shell),
        Command::Man { out_dir } => generate::man_pages(&out_dir),
    }
}

/// Validates everything `run` would load and prints every problem found;
/// of a fleet admin's config (`[fleet]` alone), what `--signing-key` reads.
fn check(path: &std::path::Path, global: &Global) -> anyhow::Result<()> {
    let report = edgegate::preflight::inspect_admin(path)
        .unwrap_or_else(|| edgegate::preflight::inspect(path, &global.overrides()));
    for line in &report.passed {
        println!("{line}");
    }
    for warning in report.warnings() {
        eprintln!("edgegate: warning: {warning}");
    }
    let errors: Vec<_> = report.errors().collect();
    if let Some((config, _)) = &report.loaded {
        println!(
            "config OK: {} interface(s), {} listener(s)",
            config.filter.interfaces.len(),
            config.listeners.len()
        );
        return Ok(());
    }
    if let (Some(fleet), true) = (&report.admin, errors.is_empty()) {
        println!("admin config OK: group `{}`", fleet.group);
        return Ok(());
    }
    for error in &errors {
        eprintln!("edgegate: {error}");
    }
    bail!("{} problem(s) found", errors.len())
}

fn reload(global: &Global) -> anyhow::Result<()> {
    let Response::Reloaded { allowlist, outcomes } = call(global, &Request::Reload)? else {
        bail!("unexpected answer from the daemon");
    };
    println!("allowlist: {allowlist}");
    for outcome in &outcomes {
        println!("listener `{}`: {}", outcome.listener, outcome.result);
    }
    if matches!(allowlist, ListReload::Kept { .. }) {
        bail!("the allowlist file was refused: fix it and reload again (see above)");
    }
    if outcomes.iter().any(|o| o.result.failed()) {
        bail!("some listeners kept their previous configuration (see above and the daemon's log)");
    }
    Ok(())
}

fn call(global: &Global, request: &Request) -> anyhow::Result<Response> {
    match control::call(&global.socket(), request)? {
        Response::Error { message } => bail!("{message}"),
        response => Ok(response),
    }
}

fn add(global: &Global, action: Action, args: AddArgs) -> anyhow::Result<()> {
    let AddArgs { cidrs, comment, offline, commit } = args;
    change(global, Change::Add { action, cidrs, comment }, &offline, &commit)
}

fn remove(
    global: &Global,
    action: Action,
    DelArgs { cidrs, offline, commit }: DelArgs,
) -> anyhow::Result<()> {
    change(global, Change::Remove { action, cidrs }, &offline, &commit)
}

/// Validates `change` here (errors name the argument even with no daemon),
/// then has the daemon apply it, or applies it to the file with `--offline`.
fn change(
    global: &Global,
    change: Change,
    offline: &Offline,
    commit: &Commit,
) -> anyhow::Result<()> {
    change.validate()?;
    if let Some(key) = &commit.signing_key {
        if offline.offline {
            bail!(
                "--signing-key commits to the group's list in etcd; --offline changes a local file"
            );
        }
        let Some(config) = &offline.config else {
            bail!("--signing-key needs --config: the file whose `[fleet]` table names the group");
        };
        return change_signed(change, config, key, commit);
    }
    if offline.config.is_some() && !offline.offline {
        bail!("--config goes with --offline or --signing-key");
    }
    if offline.offline {
        let (diff, entries, path) = change_offline(global, &change, offline.config.as_deref())?;
        println!(
            "ok: {} added, {} removed, {} updated; {entries} entries in {} (applied when the \
             daemon starts)",
            diff.added,
            diff.removed,
            diff.updated,
            path.display()
        );
        return Ok(());
    }
    let request = Request::Change { change, empty_ok: commit.force };
    let Response::Changed { diff, entries, fleet } = call(global, &request)? else {
        bail!("unexpected answer from the daemon");
    };
    let counts =
        format!("{} added, {} removed, {} updated", diff.added, diff.removed, diff.updated);
    let Some(fleet) = fleet else {
        println!("ok: {counts}; {entries} entries in force");
        return Ok(());
    };
    let here = if fleet.enforced_here { "in force here" } else { "not yet in force here" };
    println!(
        "ok: {counts}; {entries} entries; committed as the group's generation {} ({here})",
        fleet.generation
    );
    if commit.wait {
        wait_for_daemon_fleet(global, fleet.generation, commit.wait_timeout)?;
    }
    Ok(())
}

/// Signs `change` and commits it to etcd from here (`--signing-key`).
fn change_signed(
    change: Change,
    config: &std::path::Path,
    key: &std::path::Path,
    commit: &Commit,
) -> anyhow::Result<()> {
    let (runtime, admin, committer) = connect_admin(config, Some(key))?;
    let committed = runtime.block_on(admin.commit(&change, commit.force))?;
    let diff = committed.diff;
    println!(
        "ok: {} added, {} removed, {} updated; {} entries; committed and signed as the group's \
         generation {} (by {committer})",
        diff.added, diff.removed, diff.updated, committed.entries, committed.generation
    );
    if commit.wait {
        wait_for_fleet(committed.generation, commit.wait_timeout, || {
            runtime.block_on(admin.view()).map_err(anyhow::Error::from)
        })?;
    }
    Ok(())
}

/// The CLI's own connection to the group's etcd (no daemon), on a runtime
/// of its own, as this machine's committer.
fn connect_admin(
    config: &std::path::Path,
    signing_key: Option<&std::path::Path>,
) -> anyhow::Result<(tokio::runtime::Runtime, edgegate::fleet::Admin, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let committer = edgegate::fleet::committer_name();
    let admin =
        runtime.block_on(edgegate::fleet::Admin::connect(config, signing_key, &committer))?;
    Ok((runtime, admin, committer))
}

/// Polls `fleet status` (through the daemon) until every live host enforces `generation`.
fn wait_for_daemon_fleet(
    global: &Global,
    generation: u64,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    wait_for_fleet(generation, timeout, || match call(global, &Request::FleetStatus)? {
        Response::Fleet(view) => Ok(view),
        _ => bail!("unexpected answer from the daemon"),
    })
}

/// Polls `view` until every live host enforces `generation`.
fn wait_for_fleet(
    generation: u64,
    timeout: std::time::Duration,
    mut view: impl FnMut() -> anyhow::Result<edgegate::status::FleetView>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let behind: Vec<String> = match view() {
            Ok(view) => view
                .hosts
                .iter()
                .filter(|h| h.alive && h.generation < generation)
                .map(|h| format!("{} (at generation {})", h.host, h.generation))
                .collect(),
            Err(e) => vec![format!("unknown: {e}")],
        };
        if behind.is_empty() {
            println!("every live host enforces generation {generation}");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "after {}, not every live host enforces generation {generation}: {}",
                humantime::format_duration(timeout),
                behind.join(", ")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `fleet keygen`: a new key pair, and what to do with each half.
fn keygen(out: &std::path::Path) -> anyhow::Result<()> {
    let (public, [key, public_file]) = edgegate::fleet::trust::SigningKey::generate(out)?;
    println!("private key: {} (mode 0600; keep it off the gate hosts)", key.display());
    println!("public key:  {}", public_file.display());
    println!(
        "\nadd to the [fleet] table of every host (and of the admin file), then restart the daemons:"
    );
    println!("  trusted_keys = [\"{public}\"]");
    Ok(())
}

fn fleet_status(
    global: &Global,
    json: bool,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let view = match config {
        Some(config) => {
            let (runtime, admin, _) = connect_admin(config, None)?;
            runtime.block_on(admin.view())?
        }
        None => match call(global, &Request::FleetStatus)? {
            Response::Fleet(view) => view,
            _ => bail!("unexpected answer from the daemon"),
        },
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    match view.current_generation {
        Some(generation) => println!(
            "group {}: generation {generation}, committed {} by {}",
            view.group,
            view.committed_at_ms.map_or_else(|| "?".into(), ago),
            view.committed_by.as_deref().unwrap_or("?")
        ),
        None => println!("group {}: no list committed yet", view.group),
    }
    println!(
        "\n{:<24} {:<6} {:>10} {:>5} {:<16} version",
        "host", "alive", "generation", "lag", "applied"
    );
    for host in &view.hosts {
        println!(
            "{:<24} {:<6} {:>10} {:>5} {:<16} {}",
            host.host,
            if host.alive { "yes" } else { "no" },
            host.generation,
            host.lag,
            if host.applied_at_ms == 0 { "-".into() } else { ago(host.applied_at_ms) },
            host.version
        );
    }
    Ok(())
}

/// "3.2 s ago" for a Unix-milliseconds time.
fn ago(at_ms: u64) -> String {
    let seconds = edgegate::fleet::unix_now_ms().saturating_sub(at_ms) as f64 / 1000.0;
    format!("{seconds:.1} s ago")
}

/// Applies `change` to the allowlist file, as a daemon would, but for the maps.
fn change_offline(
    global: &Global,
    change: &Change,
    config: Option<&std::path::Path>,
) -> anyhow::Result<(allowlist::Diff, usize, PathBuf)> {
    let (path, capacity, socket) = match config {
        Some(config) => {
            let config = Config::load(config, &global.overrides())?;
            if let Some(fleet) = &config.fleet {
                bail!(
                    "this config is in fleet mode (group `{}`): the list is the group's, in etcd; \
                     start the daemon and drop --offline",
                    fleet.group
                );
            }
            (config.allowlist_path(), config.filter.max_entries, config.daemon.control_socket)
        }
        None => (global.state_dir().join("allowlist"), DEFAULT_MAX_ENTRIES, global.socket()),
    };
    // A running daemon would not see the file change, and would overwrite it.
    if control::call(&socket, &Request::Ping).is_ok() {
        bail!(
            "the daemon is running (socket {}): drop --offline, and it applies the change at once",
            socket.display()
        );
    }
    // A daemon starting meanwhile waits for this change: it holds the same lock.
    let _lock = match edgegate::files::StateLock::acquire(&path) {
        Err(edgegate::files::LockError::Held { path: lock }) => bail!(
            "a daemon (or another --offline change) holds {}: drop --offline if the daemon runs",
            lock.display()
        ),
        locked => locked?,
    };
    let list = allowlist::load(&path)?;
    let next = change.apply_to(&list)?;
    let (ipv4, ipv6) = next.family_sizes();
    if ipv4.max(ipv6) > capacity as usize {
        bail!(
            "the list would hold {ipv4} IPv4 and {ipv6} IPv6 entries, more than `max_entries` = \
             {capacity} per family"
        );
    }
    allowlist::store(&path, &next)?;
    Ok((list.diff(&next), next.len(), path))
}

/// Asks the daemon what decides for `address`, and checks that the loaded
/// program agrees.
fn explain(
    global: &Global,
    address: std::net::IpAddr,
    port: Option<u16>,
    json: bool,
) -> anyhow::Result<()> {
    let Response::Explained(explanation) = call(global, &Request::Explain { address, port })?
    else {
        bail!("unexpected answer from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print_explanation(&explanation);
    }
    if !explanation.agrees {
        bail!(
            "the loaded XDP program's verdict ({}) differs from the list's ({}): please report this",
            explanation.kernel,
            explanation.verdict
        );
    }
    Ok(())
}

fn print_explanation(e: &edgegate::status::Explanation) {
    use proxy_common::Reason;
    let protected = if e.protected { "protected" } else { "not protected" };
    println!(
        "{} to port {} ({protected}, {} scope): {} ({})",
        e.address,
        e.port,
        e.scope,
        e.verdict.name().to_uppercase(),
        e.reason
    );
    let consulted = matches!(e.reason, Reason::Allowed | Reason::Denied | Reason::Unlisted);
    match &e.rule {
        Some(rule) => {
            let comment = rule.comment.as_deref().map(|c| format!("  # {c}")).unwrap_or_default();
            let at = match rule.line {
                Some(line) => format!("{} line {line}", rule.file.display()),
                None => format!("not in {} (edited since?)", rule.file.display()),
            };
            let note = if consulted { "" } else { " (not consulted: the port is out of scope)" };
            println!("  rule:    {} {}{comment}{note}", rule.action, rule.cidr);
            println!("           {at}");
        }
        None if consulted => println!("  rule:    none: unlisted"),
        None => println!("  rule:    none (and not consulted: the port is out of scope)"),
    }
    if e.audit {
        println!("  mode:    AUDIT: nothing is dropped");
    }
    let check = if e.agrees { "agrees" } else { "DISAGREES" };
    println!("  kernel:  {} (a test packet through the loaded XDP program {check})", e.kernel);
}

fn suggest(
    global: &Global,
    json: bool,
    apply: Option<&str>,
    only: &[ipnet::IpNet],
    via: &Offline,
    commit: &Commit,
) -> anyhow::Result<()> {
    let Response::Suggested { suggestions, learned, audit, refused } =
        call(global, &Request::Suggest)?
    else {
        bail!("unexpected answer from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&suggestions)?);
        return Ok(());
    }
    for (why, count) in &refused {
        println!("{count} sighting(s) from the proxy worker not taken: {}", why.describe());
    }
    if suggestions.is_empty() {
        let how = if audit {
            "clients from unlisted addresses are learned as they authenticate"
        } else {
            "sources are learned only in audit mode (`[filter] audit = true`), where unlisted \
             clients get to authenticate"
        };
        println!(
            "nothing to suggest ({learned} source(s) learned, all decided by the list); {how}"
        );
        return Ok(());
    }
    println!("authenticated clients the list does not allow ({learned} source(s) learned):");
    let now = u64::try_from(edgegate::tls::unix_now()).unwrap_or(0);
    for suggestion in &suggestions {
        let names: Vec<String> = suggestion.names.iter().map(ToString::to_string).collect();
        println!(
            "  allow {:<40} {} connection(s) from {} address(es), last {}s ago: {}",
            suggestion.cidr,
            suggestion.connections,
            suggestion.addresses.len(),
            now.saturating_sub(suggestion.last_seen),
            names.join("; ")
        );
    }
    let digest = edgegate::learned::digest(&suggestions);
    let Some(reviewed) = apply else {
        println!("digest: {digest}");
        println!(
            "review them (a compromised proxy worker could invent names), then add them with \
             `edgegate allow suggest --apply {digest}` (add `--only CIDR` for some of them)"
        );
        return Ok(());
    };
    if reviewed != digest {
        bail!(
            "the suggestions are not the ones reviewed (digest {reviewed}; now {digest}): \
             nothing applied; review the list above and run `edgegate allow suggest --apply \
             {digest}`"
        );
    }
    if let Some(missing) = only.iter().find(|cidr| !suggestions.iter().any(|s| s.cidr == **cidr)) {
        bail!("{missing} is not among the suggestions: nothing applied");
    }
    let entries = suggestions
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.cidr))
        .map(edgegate::learned::Suggestion::entry)
        .collect();
    let tag = edgegate::learned::COMMENT_TAG.to_owned();
    change(global, Change::Import { entries, tag, replace: false }, via, commit)
}

fn list(global: &Global, json: bool, only: Option<Action>) -> anyhow::Result<()> {
    let Response::List { mut entries, fleet } = call(global, &Request::List)? else {
        bail!("unexpected answer from the daemon");
    };
    entries.retain(|e| only.is_none_or(|action| e.action == action));
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if let Some(source) = fleet {
        println!("# group {}, generation {} (in force here)", source.group, source.generation);
    }
    for entry in &entries {
        let line = format!("{:<5} {}", entry.action, entry.cidr);
        match &entry.comment {
            Some(comment) => println!("{line:<49} # {comment}"),
            None => println!("{line}"),
        }
    }
    Ok(())
}

fn status(global: &Global, json: bool, top: usize, dropped: bool) -> anyhow::Result<()> {
    let request =
        Request::Status { top_rules: top, dropped_sources: if dropped { top } else { 0 } };
    let Response::Status(status) = call(global, &request)? else {
        bail!("unexpected answer from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status, dropped);
    }
    Ok(())
}

fn print_status(status: &Status, dropped: bool) {
    if status.audit {
        println!(
            "mode:       AUDIT: nothing is dropped; packets the list would drop are counted as \
             would_drop and passed (filter.audit = true)"
        );
    } else {
        println!("mode:       enforcing");
    }
    println!("scope:      {}", status.scope);
    let ports: Vec<String> = status.protected_ports.iter().map(u16::to_string).collect();
    println!("protected:  ports {}", ports.join(", "));
    if status.scope == Scope::Ports {
        if status.tunnels.is_empty() {
            println!("tunnels:    none judged");
        } else {
            println!("tunnels:    {} (judged by their outer source)", status.tunnels);
        }
    }
    for attachment in &status.interfaces {
        let framing = match attachment.framing {
            Framing::Ethernet => "",
            Framing::Ip => ", layer 3: frames start with the IP header",
        };
        let how = if attachment.adopted { ", taken over from a previous daemon" } else { "" };
        println!("interface:  {} ({} mode{framing}{how})", attachment.interface, attachment.mode);
    }
    println!("allowlist:  {}", status.allowlist.display());
    let worker = &status.worker;
    let serving = match (worker.pid, &worker.down) {
        (Some(pid), _) => format!("worker pid {pid} (as `{}`)", worker.user),
        (None, down) => format!("NO WORKER ({})", down.as_deref().unwrap_or("unknown")),
    };
    println!(
        "processes:  gate pid {} (filter, maps, list); {serving}; {} restart(s)",
        status.gate_pid, worker.restarts
    );
    if let Some(sandbox) = &worker.sandbox {
        let on = |yes: bool| if yes { "yes" } else { "no" };
        let landlock = if sandbox.landlock_abi == 0 {
            "Landlock absent".to_owned()
        } else {
            format!(
                "Landlock ABI {}: no files {}, network restricted {}, scoped {}",
                sandbox.landlock_abi,
                on(sandbox.file_system_denied),
                on(sandbox.network_restricted),
                on(sandbox.scoped)
            )
        };
        println!(
            "sandbox:    no capabilities, no_new_privs, seccomp {}; {landlock}",
            on(sandbox.seccomp)
        );
    }
    let egress = &worker.egress;
    match &egress.unconfined_reason {
        None => println!(
            "egress:     only to {} (cgroup {}); {} connection(s) refused",
            egress.destinations.join(", "),
            egress.cgroup.as_deref().unwrap_or("?"),
            egress.refused
        ),
        Some(reason) => println!(
            "egress:     UNCONFINED: the worker may connect anywhere ({reason}; \
             daemon.allow_unconfined_egress = true)"
        ),
    }
    println!(
        "entries:    {} IPv4 ({} lookup), {} IPv6 ({} lookup); capacity {} per family",
        status.ipv4_entries,
        status.ipv4_lookup,
        status.ipv6_entries,
        status.ipv6_lookup,
        status.capacity_per_family
    );
    println!(
        "\n{:<7} {:<10} {:<20} {:>14} {:>16}",
        "family", "verdict", "reason", "packets", "bytes"
    );
    for counter in status.counters.iter().filter(|c| c.packets > 0) {
        println!(
            "{:<7} {:<10} {:<20} {:>14} {:>16}",
            counter.family, counter.verdict, counter.reason, counter.packets, counter.bytes
        );
    }
    if let Some(fleet) = &status.fleet {
        let current = fleet.current_generation.map_or_else(|| "none yet".into(), |g| g.to_string());
        println!(
            "fleet:      group {} as {}: generation {} in force (etcd's: {current})",
            fleet.group, fleet.host, fleet.applied_generation
        );
        match fleet.staleness() {
            Some(stale) => println!("            STALE: {stale}"),
            None => println!("            connected to etcd"),
        }
        if let Some(error) = &fleet.last_error {
            println!("            last error: {error}");
        }
        if let Some(refusal) = &fleet.last_refusal {
            println!("            REFUSING etcd's list: {refusal}");
        }
        if !fleet.refusals.is_empty() {
            let counts: Vec<String> =
                fleet.refusals.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
            println!("            refused generations: {}", counts.join(", "));
        }
        match fleet.trust_warning() {
            Some(warning) => println!("            WARNING: {warning}"),
            None => println!(
                "            generations need a signature by a trusted key ({})",
                fleet.trusted_keys.join(", ")
            ),
        }
    }
    for listener in &status.listeners {
        let rejected: Vec<String> =
            listener.rejected.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        println!(
            "\nlistener {} on {} → {}: {} active, {} handshakes ok, rejected: {}",
            listener.name,
            listener.bind,
            listener.backend,
            listener.active,
            listener.handshakes_ok,
            if rejected.is_empty() { "none".to_owned() } else { rejected.join(", ") }
        );
    }
    if !status.top_rules.is_empty() {
        println!("\nbusiest rules:");
        for rule in &status.top_rules {
            println!("  {:<5} {:<43} {:>14} hits", rule.action, rule.cidr, rule.hits);
        }
    }
    if dropped {
        print_dropped_sources(status);
    }
}

fn print_dropped_sources(status: &Status) {
    let verb = if status.audit { "would-be dropped" } else { "dropped" };
    if status.dropped_sources.is_empty() {
        println!(
            "
no {verb} sources sampled"
        );
        return;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let ago = |ms: u64| format!("{}s ago", now_ms.saturating_sub(ms) / 1000);
    println!(
        "
sources {verb} most (sampled; counts are estimates under floods):"
    );
    println!("  {:<40} {:<9} {:>14} {:>12} {:>12}", "source", "reason", "packets", "first", "last");
    for source in &status.dropped_sources {
        println!(
            "  {:<40} {:<9} {:>14} {:>12} {:>12}",
            source.source,
            source.reason,
            source.packets,
            ago(source.first_seen_ms),
            ago(source.last_seen_ms)
        );
    }
}

fn detach(global: &Global, interface: Option<&str>) -> anyhow::Result<()> {
    // A running daemon holds the links open: unpinning would not detach them.
    match control::call(&global.socket(), &Request::Ping) {
        Err(ClientError::NotRunning { .. }) => {}
        Ok(_) => bail!(
            "the daemon is running (socket {}); stop it first (`systemctl stop edgegate`), \
             then detach",
            global.socket().display()
        ),
        Err(e) => return Err(e.into()),
    }
    let dir = global.bpffs_dir.clone().unwrap_or_else(|| DEFAULT_BPFFS_DIR.into());
    let detached = filter::detach_pinned(&dir, interface)?;
    if detached.interfaces.is_empty() && !detached.maps_removed {
        match interface {
            Some(name) => {
                bail!("`{name}` has no edgegate XDP program pinned under {}", dir.display())
            }
            None => println!("nothing pinned under {}", dir.display()),
        }
    }
    for (name, mode) in &detached.interfaces {
        println!("detached from {name} ({mode} mode)");
    }
    if detached.maps_removed {
        println!("removed the pinned maps under {}", dir.display());
    }
    Ok(())
}

/// Runs the demo; Ctrl-C stops it at the next step, and it cleans up.
fn demo(duration: std::time::Duration) -> anyhow::Result<()> {
    use std::sync::{Arc, atomic::AtomicBool};
    // Block SIGINT in every thread (threads inherit the mask), and let one
    // thread wait for it: Ctrl-C must not kill the demo halfway through.
    let mut sigint = nix::sys::signal::SigSet::empty();
    sigint.add(nix::sys::signal::Signal::SIGINT);
    sigint.thread_block().context("cannot block SIGINT")?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    std::thread::spawn(move || {
        if sigint.wait().is_ok() {
            println!("\ninterrupted: cleaning up after the current step");
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    edgegate::demo::run(duration, interrupted)
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("EDGEGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // `init` also routes the `log` crate (which aya-log uses for the XDP
    // program's diagnostics) into tracing.
    match format {
        // Colours only for a terminal: journald and log files get plain text.
        LogFormat::Text => fmt()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => fmt().json().with_env_filter(filter).init(),
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).expect("installing a signal handler cannot fail");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
