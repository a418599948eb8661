//! The daemon's own commands: `run` (and the `worker` it starts), `check`
//! before a start, `reload`, `detach` after a stop, and `demo`.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, bail};
use edgegate::{
    config::{Config, DEFAULT_BPFFS_DIR, LogFormat},
    control::{self, ClientError, Request, Response},
    daemon, filter,
    privsep::worker,
    status::ListReload,
};

use super::{
    args::{Global, RunArgs, WorkerArgs},
    ask::ask,
    exit::Refused,
};

pub fn run(global: &Global, args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        config,
        log_format,
        #[cfg(feature = "test-hooks")]
        hooks,
    } = args;
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
        #[cfg(feature = "test-hooks")]
        keys_in_worker: hooks.keys_in_worker,
        #[cfg(feature = "test-hooks")]
        escape: hooks.worker_escape.map(|attempt| (attempt, hooks.worker_escape_address)),
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
    runtime.shutdown_timeout(Duration::from_secs(1));
    served?;
    Ok(())
}

/// The sandboxed proxy worker, as `run` starts it.
pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    use edgegate::privsep::log_batch::LOG;
    init_logging_to(args.log_format, &LOG);
    // What waited for its batch goes out before a panic ends the process.
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |panic| {
        LOG.flush_at_exit();
        report_panic(panic);
    }));
    let options = worker::Options {
        channel: args.channel_fd,
        key_channels: args.key_fds,
        connect_ports: args.connect_ports,
        #[cfg(feature = "test-hooks")]
        escape: args.hooks.escape(),
    };
    let served = worker::run(options);
    LOG.flush_at_exit();
    served.context("proxy worker")?;
    Ok(())
}

/// Validates everything `run` would load and prints every problem found;
/// of a fleet admin's config (`[fleet]` alone), what `--signing-key` reads.
pub fn check(path: &Path, global: &Global) -> anyhow::Result<()> {
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

pub fn reload(global: &Global) -> anyhow::Result<()> {
    let (allowlist, outcomes) = ask(global, &Request::Reload, |answer| match answer {
        Response::Reloaded { allowlist, outcomes } => Some((allowlist, outcomes)),
        _ => None,
    })?;
    println!("allowlist: {allowlist}");
    for outcome in &outcomes {
        println!("listener `{}`: {}", outcome.listener, outcome.result);
    }
    if matches!(allowlist, ListReload::Kept { .. }) {
        bail!(Refused(
            "the allowlist file was refused: fix it and reload again (see above)".into()
        ));
    }
    if outcomes.iter().any(|o| o.result.failed()) {
        bail!(Refused(
            "some listeners kept their previous configuration (see above and the daemon's log)"
                .into()
        ));
    }
    Ok(())
}

pub fn detach(global: &Global, interface: Option<&str>) -> anyhow::Result<()> {
    // A running daemon holds the links open: unpinning would not detach them.
    match control::call(&global.socket(), &Request::Ping) {
        Err(ClientError::NotRunning { .. }) => {}
        Ok(_) => bail!(Refused(format!(
            "the daemon is running (socket {}); stop it first (`systemctl stop edgegate`), \
             then detach",
            global.socket().display()
        ))),
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
pub fn demo(duration: Duration) -> anyhow::Result<()> {
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
    init_logging_to(format, std::io::stdout);
}

fn init_logging_to<W>(format: LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("EDGEGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // `init` also routes the `log` crate (which aya-log uses for the XDP
    // program's diagnostics) into tracing.
    match format {
        // Colours only for a terminal: journald and log files get plain text.
        LogFormat::Text => fmt()
            .with_writer(writer)
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => fmt().json().with_writer(writer).with_env_filter(filter).init(),
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
