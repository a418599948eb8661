//! Fleet mode from the CLI: `fleet status`, `fleet keygen`, the CLI's own
//! connection to the group's etcd (`--config`, `--signing-key`), and the
//! wait until every live host enforces a generation (`--wait`).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use edgegate::{
    control::{Request, Response},
    fleet::{Admin, trust::SigningKey},
    status::FleetView,
};

use super::{args::Global, ask::ask};

/// The CLI's own connection to the group's etcd (no daemon), on a runtime
/// of its own, as this machine's committer.
pub fn connect_admin(
    config: &Path,
    signing_key: Option<&Path>,
) -> anyhow::Result<(tokio::runtime::Runtime, Admin, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let committer = edgegate::fleet::committer_name();
    let admin = runtime.block_on(Admin::connect(config, signing_key, &committer))?;
    Ok((runtime, admin, committer))
}

/// Polls `fleet status` (through the daemon) until every live host enforces `generation`.
pub fn wait_for_daemon_fleet(
    global: &Global,
    generation: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for_fleet(generation, timeout, || Ok(ask(global, &Request::FleetStatus, fleet_view)?))
}

/// The answer to `Request::FleetStatus`.
fn fleet_view(answer: Response) -> Option<FleetView> {
    match answer {
        Response::Fleet(view) => Some(view),
        _ => None,
    }
}

/// Polls `view` until every live host enforces `generation`.
pub fn wait_for_fleet(
    generation: u64,
    timeout: Duration,
    mut view: impl FnMut() -> anyhow::Result<FleetView>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
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
        if Instant::now() >= deadline {
            bail!(
                "after {}, not every live host enforces generation {generation}: {}",
                humantime::format_duration(timeout),
                behind.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `fleet keygen`: a new key pair, and what to do with each half.
pub fn keygen(out: &Path) -> anyhow::Result<()> {
    let (public, [key, public_file]) = SigningKey::generate(out)?;
    println!("private key: {} (mode 0600; keep it off the gate hosts)", key.display());
    println!("public key:  {}", public_file.display());
    println!(
        "\nadd to the [fleet] table of every host (and of the admin file), then restart the daemons:"
    );
    println!("  trusted_keys = [\"{public}\"]");
    Ok(())
}

/// `fleet status`: through the daemon, or from etcd directly with `--config`.
pub fn status(global: &Global, json: bool, config: Option<&Path>) -> anyhow::Result<()> {
    let view = match config {
        Some(config) => {
            let (runtime, admin, _) = connect_admin(config, None)?;
            runtime.block_on(admin.view())?
        }
        None => ask(global, &Request::FleetStatus, fleet_view)?,
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
    let seconds = edgegate::clock::unix_ms().saturating_sub(at_ms) as f64 / 1000.0;
    format!("{seconds:.1} s ago")
}
