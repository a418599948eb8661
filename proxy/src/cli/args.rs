//! The command line's definition: every command, option and its help
//! (also the source of the completions and man pages, `generate`).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use edgegate::config::{DEFAULT_CONTROL_SOCKET, DEFAULT_STATE_DIR, LogFormat, Overrides};
#[cfg(feature = "test-hooks")]
use edgegate::privsep::escape::{Attempt, Target};

#[derive(Parser)]
#[command(
    name = "edgegate",
    version,
    about = "XDP allowlist and mTLS gate for partner-facing backends"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
pub struct Global {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "EDGEGATE_CONTROL_SOCKET")]
    pub control_socket: Option<PathBuf>,
    /// Where the daemon keeps state (the allowlist, unless the config names a file).
    #[arg(long, global = true, env = "EDGEGATE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// bpffs directory holding the pinned program links and maps.
    #[arg(long, global = true, env = "EDGEGATE_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
}

impl Global {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            control_socket: self.control_socket.clone(),
            state_dir: self.state_dir.clone(),
            bpffs_dir: self.bpffs_dir.clone(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| DEFAULT_STATE_DIR.into())
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: attach the XDP filter and serve the control socket (root).
    Run(RunArgs),
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
        duration: Duration,
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

/// How the daemon runs.
#[derive(Args)]
pub struct RunArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Log format (default: the config's `daemon.log_format`, else text).
    #[arg(long, value_enum, env = "EDGEGATE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    #[cfg(feature = "test-hooks")]
    #[command(flatten)]
    pub hooks: RunHooks,
}

/// `run`'s test hooks: only builds with the `test-hooks` feature have them.
#[cfg(feature = "test-hooks")]
#[derive(Args)]
pub struct RunHooks {
    /// Test only: every proxy worker tries this once sandboxed.
    #[arg(long, value_enum, hide = true)]
    pub worker_escape: Option<Attempt>,
    /// Benchmarks only: the worker holds the listeners' keys (to measure
    /// what keeping them in the gate costs).
    #[arg(long, hide = true)]
    pub keys_in_worker: bool,
    /// Test only: where a connection attempt of `--worker-escape` goes.
    #[arg(long, hide = true, requires = "worker_escape")]
    pub worker_escape_address: Option<std::net::SocketAddr>,
}

/// What the gate tells the worker on its command line (`privsep::spawn`).
#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub channel_fd: i32,
    #[arg(long = "key-fd")]
    pub key_fds: Vec<i32>,
    #[arg(long, value_enum)]
    pub log_format: LogFormat,
    #[arg(long = "connect-port")]
    pub connect_ports: Vec<u16>,
    #[cfg(feature = "test-hooks")]
    #[command(flatten)]
    pub hooks: WorkerHooks,
}

/// The worker's test hooks (`run --worker-escape`), as the gate passes them.
#[cfg(feature = "test-hooks")]
#[derive(Args)]
pub struct WorkerHooks {
    #[arg(long, value_enum, requires_all = ["escape_target", "escape_gate"])]
    pub escape: Option<Attempt>,
    #[arg(long)]
    pub escape_target: Option<PathBuf>,
    #[arg(long)]
    pub escape_gate: Option<u32>,
    #[arg(long)]
    pub escape_address: Option<std::net::SocketAddr>,
}

#[cfg(feature = "test-hooks")]
impl WorkerHooks {
    /// What to try once sandboxed, and at what.
    pub fn escape(self) -> Option<(Attempt, Target)> {
        let address = self.escape_address;
        let target = self.escape_target.zip(self.escape_gate);
        self.escape
            .zip(target)
            .map(|(attempt, (path, gate))| (attempt, Target { path, gate, address }))
    }
}

#[derive(Subcommand)]
pub enum FleetCommand {
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
pub enum AllowCommand {
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
        address: IpAddr,
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
pub enum DenyCommand {
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
pub struct AddArgs {
    /// CIDRs or addresses; all are added, or none.
    #[arg(required = true)]
    pub cidrs: Vec<String>,
    /// Kept next to the entries in the allowlist file.
    #[arg(long)]
    pub comment: Option<String>,
    #[command(flatten)]
    pub offline: Offline,
    #[command(flatten)]
    pub commit: Commit,
}

#[derive(Args)]
pub struct DelArgs {
    /// Entries to remove; all are removed, or none.
    #[arg(required = true)]
    pub cidrs: Vec<String>,
    #[command(flatten)]
    pub offline: Offline,
    #[command(flatten)]
    pub commit: Commit,
}

/// Changing the file while no daemon runs (e.g. to seed the list before the
/// first start).
#[derive(Args)]
pub struct Offline {
    /// Change the allowlist file directly (no daemon may run): validated
    /// whole and written atomically; a daemon applies it when it starts.
    #[arg(long)]
    pub offline: bool,
    /// With --offline: the config whose allowlist file and `max_entries` to
    /// use (default: `allowlist` in the state directory). With
    /// --signing-key: the file whose `[fleet]` table names the group and etcd.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// How a change is committed in fleet mode.
#[derive(Args)]
pub struct Commit {
    /// Fleet mode: wait until every live host of the group enforces the change.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit 1, naming the hosts behind) after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, requires = "wait")]
    pub wait_timeout: Duration,
    /// Fleet mode: allow a change that leaves the group's list empty (drops
    /// every source on every host).
    #[arg(long)]
    pub force: bool,
    /// Fleet mode with `trusted_keys`: sign the change with this private key
    /// and commit it to etcd directly (needs --config), without a daemon.
    #[arg(long, env = "EDGEGATE_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
}
