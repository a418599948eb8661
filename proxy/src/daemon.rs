//! `edgegate run`: loads the allowlist, sets up the filter and the mTLS
//! listeners, serves the control socket, reloads on SIGHUP, and on SIGTERM
//! drains the connections and stops, leaving the filter pinned.
//!
//! Data flows one way: config → [`State`] (the list, the filter and the
//! listeners) → XDP maps and the proxy's own copy of the list. The control
//! socket only asks `State` for changes.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::{
    allowlist::{self, Allowlist, StoreError},
    config::{Config, Overrides},
    control::{self, BindError, ListReload, Request, Response, Status},
    filter::{Filter, FilterError, FilterOptions},
    metrics::{self, Observation},
    preflight, privileges,
    proxy::{self, Proxies, ProxyError, SharedAllowlist},
};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config, the list or a file they name is refused: every problem, one per line.
    #[error("{}", problems.join("\n"))]
    Refused { problems: Vec<String> },
    /// The allowlist file cannot be read or written.
    #[error(transparent)]
    Allowlist(#[from] StoreError),
    /// The XDP program cannot be loaded or attached.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// The control socket cannot be opened.
    #[error(transparent)]
    Control(#[from] BindError),
    /// A listener cannot start.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// Privileges could not be dropped to `daemon.user`.
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
    /// The runtime could not take over a socket.
    #[error("cannot serve: {source}")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    /// The metrics endpoint cannot listen.
    #[error("`metrics.bind` {address}: {source}")]
    Metrics {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The list and what enforces it; changed only under a lock.
pub struct State {
    list: Allowlist,
    list_path: PathBuf,
    filter: Filter,
    /// The proxy's copy of the list, for PROXY-reported client addresses.
    shared_list: SharedAllowlist,
    proxies: Proxies,
    config: Config,
    config_path: PathBuf,
    overrides: Overrides,
    reloads_ok: u64,
    reloads_failed: u64,
}

impl State {
    /// Answers one control request. A change is validated whole, persisted,
    /// applied to the maps and only then acknowledged; a refused change
    /// leaves file and maps as they were.
    pub fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Ping => Response::Pong,
            Request::Change(change) => {
                let next = change.apply_to(&self.list).map_err(|e| e.to_string());
                self.change(next, Persist::Yes)
            }
            Request::List => Response::List { entries: self.list.entries().cloned().collect() },
            Request::Reload => self.reload(),
            Request::Status { top_rules } => match self.status(top_rules) {
                Ok(status) => Response::Status(Box::new(status)),
                Err(e) => Response::Error { message: e.to_string() },
            },
        }
    }

    /// Puts `next` in force: capacity first, then the file (unless it is
    /// where `next` came from), then the maps, rolling both back on failure.
    fn change(&mut self, next: Result<Allowlist, String>, persist: Persist) -> Response {
        let next = match next {
            Ok(next) => next,
            Err(message) => return Response::Error { message },
        };
        if let Err(e) = self.filter.check_capacity(&next) {
            return Response::Error { message: e.to_string() };
        }
        if persist == Persist::Yes
            && let Err(e) = allowlist::store(&self.list_path, &next)
        {
            return Response::Error { message: format!("nothing changed: {e}") };
        }
        if let Err(e) = self.filter.apply(&next) {
            // Put the maps (and the file, if this wrote it) back to the list
            // that was acknowledged last.
            let restore_file = || match persist {
                Persist::Yes => allowlist::store(&self.list_path, &self.list),
                Persist::No => Ok(()),
            };
            let rollback = restore_file()
                .map_err(|e| e.to_string())
                .and_then(|()| self.filter.apply(&self.list).map_err(|e| e.to_string()));
            let message = match rollback {
                Ok(()) => format!("nothing changed: {e}"),
                Err(again) => format!("{e}; restoring the previous list also failed: {again}"),
            };
            tracing::error!("allowlist change failed: {message}");
            return Response::Error { message };
        }
        let diff = self.list.diff(&next);
        tracing::info!(
            "allowlist changed: {} added, {} removed, {} updated, {} entries",
            diff.added,
            diff.removed,
            diff.updated,
            next.len()
        );
        self.list = next;
        self.shared_list.store(Arc::new(self.list.clone()));
        Response::Changed { diff, entries: self.list.len() }
    }

    /// Re-reads the allowlist file, which an operator may have edited by hand:
    /// validated whole, and put in force only if it parses and fits.
    fn reload_list(&mut self) -> ListReload {
        let reason = match allowlist::load(&self.list_path) {
            Ok(list) if list == self.list => return ListReload::Unchanged,
            Ok(list) => match self.change(Ok(list), Persist::No) {
                Response::Changed { diff, entries } => {
                    return ListReload::Applied { diff, entries };
                }
                Response::Error { message } => message,
                other => format!("unexpected outcome {other:?}"),
            },
            Err(e) => e.to_string(),
        };
        tracing::error!(
            "reload: allowlist {}: {reason}; the list in force stays",
            self.list_path.display()
        );
        ListReload::Kept { reason }
    }

    fn status(&self, top_rules: usize) -> Result<Status, FilterError> {
        let (ipv4_entries, ipv6_entries) = self.list.family_sizes();
        let (v4, v6) = self.filter.lookups();
        Ok(Status {
            interfaces: self.filter.attachments().to_vec(),
            scope: format!("{:?}", self.config.filter.scope).to_lowercase(),
            protected_ports: self.config.protected_ports(),
            allowlist: self.list_path.clone(),
            ipv4_entries,
            ipv6_entries,
            ipv4_lookup: v4.name().to_owned(),
            ipv6_lookup: v6.name().to_owned(),
            capacity_per_family: self.filter.capacity(),
            counters: self.filter.counters()?,
            top_rules: self.filter.rule_hits(top_rules)?,
            listeners: self.proxies.status(),
        })
    }

    /// Logs what is about to expire among the certificates and CRLs in force.
    fn warn_of_expiry(&self) {
        let now = crate::tls::unix_now();
        for listener in self.proxies.status() {
            for lifetime in &listener.lifetimes {
                let at = format!("listener `{}`: `{}`", listener.name, lifetime.kind.key());
                if let Some(finding) = preflight::judge_lifetime(&at, lifetime, now) {
                    tracing::warn!("{finding}");
                }
            }
        }
    }

    /// What `/metrics` and `/readyz` report.
    pub fn observe(&self) -> Result<Observation, FilterError> {
        let ready = self.filter.verify_attachments().and_then(|()| self.proxies.verify_accepting());
        Ok(Observation {
            status: self.status(10)?,
            ready,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
        })
    }

    /// Re-reads the config file and the listeners' certificates, keys, CAs
    /// and CRLs. A config that does not parse changes nothing; a listener
    /// whose files are broken keeps its previous ones. Open connections are
    /// never disturbed.
    pub fn reload(&mut self) -> Response {
        let next = match Config::load(&self.config_path, &self.overrides) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!("reload: {e}; keeping the running configuration");
                self.reloads_failed += 1;
                return Response::Error { message: format!("nothing reloaded: {e}") };
            }
        };
        // Only `filter.ports` (and the listeners) change in place.
        let running_with_new_ports = crate::config::FilterConfig {
            ports: next.filter.ports.clone(),
            ..self.config.filter.clone()
        };
        if running_with_new_ports != next.filter
            || next.daemon != self.config.daemon
            || next.metrics != self.config.metrics
        {
            tracing::warn!(
                "reload: [filter], [daemon] and [metrics] changes other than `filter.ports` take \
                 effect at the next start"
            );
        }
        let allowlist = self.reload_list();
        self.config.listeners = next.listeners;
        self.config.filter.ports = next.filter.ports;
        // Protect new listeners' ports before they accept anything.
        if let Err(e) = self.filter.set_ports(&self.config.protected_ports()) {
            tracing::error!("reload: cannot update the protected ports: {e}");
        }
        let outcomes = self.proxies.reload(&self.config.listeners);
        if outcomes.iter().any(|o| o.result.failed())
            || matches!(allowlist, ListReload::Kept { .. })
        {
            self.reloads_failed += 1;
        } else {
            self.reloads_ok += 1;
        }
        Response::Reloaded { allowlist, outcomes }
    }
}

/// How often the certificates in force are checked for nearing expiry.
const EXPIRY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Whether a change is written to the allowlist file before it is applied.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Persist {
    Yes,
    /// The change was read from the file.
    No,
}

/// What start-up prepared with root privileges, before any thread but the
/// main one exists; [`serve`] runs it.
pub struct Startup {
    list: Allowlist,
    list_path: PathBuf,
    filter: Filter,
    listeners: proxy::Prepared,
    control: std::os::unix::net::UnixListener,
    metrics: std::net::TcpListener,
    config: Config,
    config_path: PathBuf,
    overrides: Overrides,
}

/// Everything that needs root: reads the config and the list, loads the
/// listeners' certificates and binds their sockets, attaches (or takes over)
/// the XDP filter, opens the control socket, then drops to `[daemon] user`.
/// Call it before starting the async runtime: privileges are per thread.
pub fn start(config_path: PathBuf, overrides: Overrides) -> Result<Startup, DaemonError> {
    // What `edgegate check` checks, so that a config it passes starts.
    let report = preflight::inspect(&config_path, &overrides);
    for warning in report.warnings() {
        tracing::warn!("{warning}");
    }
    let Some((config, list)) = report.loaded else {
        let problems = report.errors().map(ToString::to_string).collect();
        return Err(DaemonError::Refused { problems });
    };
    let account = config.daemon.user.as_deref().map(privileges::lookup).transpose()?;
    let list_path = config.allowlist_path();
    // Certificates and sockets first: a listener that cannot start must not
    // leave a freshly attached filter behind.
    let listeners = proxy::Prepared::new(&config.listeners)?;
    let metrics_error = |source| DaemonError::Metrics { address: config.metrics.bind, source };
    let metrics = std::net::TcpListener::bind(config.metrics.bind).map_err(metrics_error)?;
    metrics.set_nonblocking(true).map_err(metrics_error)?;
    let options = FilterOptions {
        interfaces: config.filter.interfaces.clone(),
        mode: config.filter.mode,
        scope: config.filter.scope,
        ports: config.protected_ports(),
        max_entries: config.filter.max_entries,
        bpffs_dir: config.daemon.bpffs_dir.clone(),
    };
    if !list_path.exists() {
        tracing::warn!(
            "{} does not exist yet: protected traffic is dropped until `edgegate allow add`",
            list_path.display()
        );
        allowlist::store(&list_path, &list)?;
    }
    if let Some(account) = &account {
        // The daemon rewrites the list file atomically, so it needs the
        // directory too. The state directory is edgegate's own; any other
        // directory is left to the operator (the file alone is handed over).
        // Checked before the filter is touched: a start that fails here
        // leaves nothing attached.
        let state_dir = config.daemon.state_dir.as_path();
        let list_dir =
            list_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let owned: Vec<&Path> =
            if list_dir == state_dir { vec![state_dir, &list_path] } else { vec![&list_path] };
        privileges::hand_over(account, &owned, list_dir)?;
    }
    let filter = Filter::load(&options, &list)?;
    let control = control::bind(&config.daemon.control_socket)?;
    let (ipv4, ipv6) = list.family_sizes();
    tracing::info!(
        "filtering on {} ({ipv4} IPv4 and {ipv6} IPv6 entries from {}); control socket {}",
        config.filter.interfaces.join(", "),
        list_path.display(),
        config.daemon.control_socket.display()
    );
    match &account {
        Some(account) => privileges::drop_to(account)?,
        None => tracing::warn!(
            "running as root: set `daemon.user` so that TLS and PROXY parsing run unprivileged"
        ),
    }
    Ok(Startup {
        list,
        list_path,
        filter,
        listeners,
        control,
        metrics,
        config,
        config_path,
        overrides,
    })
}

/// Runs the daemon until `shutdown` completes. The XDP program stays
/// attached and pinned afterwards: stopping the daemon never opens the gate.
pub async fn serve(
    startup: Startup,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let Startup {
        list,
        list_path,
        mut filter,
        listeners,
        control,
        metrics,
        config,
        config_path,
        overrides,
    } = startup;
    let io_error = |source| DaemonError::Runtime { source };
    let control_listener = tokio::net::UnixListener::from_std(control).map_err(io_error)?;
    let metrics_listener = tokio::net::TcpListener::from_std(metrics).map_err(io_error)?;
    filter.forward_logs();
    let shared_list = Arc::new(ArcSwap::from_pointee(list.clone()));
    let proxies = listeners.start(Arc::clone(&shared_list))?;
    let socket = config.daemon.control_socket.clone();
    let drain_timeout = config.daemon.drain_timeout;
    let state = Arc::new(Mutex::new(State {
        list,
        list_path,
        filter,
        shared_list,
        proxies,
        config,
        config_path,
        overrides,
        reloads_ok: 0,
        reloads_failed: 0,
    }));

    let control = tokio::spawn(control::serve(control_listener, Arc::clone(&state)));
    let observe: metrics::Observe = {
        let state = Arc::clone(&state);
        Arc::new(move || {
            let state = Arc::clone(&state);
            Box::pin(async move {
                let state = state.lock().await;
                tokio::task::block_in_place(|| state.observe())
                    .map_err(|e| format!("cannot read the filter's state: {e}"))
            })
        })
    };
    let metrics = tokio::spawn(metrics::serve(metrics_listener, observe));
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("installing a signal handler cannot fail");
    // Start-up has logged expiry warnings already; repeat them twice a day.
    let mut expiry_check = tokio::time::interval_at(
        tokio::time::Instant::now() + EXPIRY_CHECK_INTERVAL,
        EXPIRY_CHECK_INTERVAL,
    );
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = expiry_check.tick() => state.lock().await.warn_of_expiry(),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let reloading = sd_notify::NotifyState::monotonic_usec_now()
                    .map(|now| vec![sd_notify::NotifyState::Reloading, now])
                    .unwrap_or_else(|_| vec![sd_notify::NotifyState::Reloading]);
                notify_systemd(&reloading);
                let mut state = state.lock().await;
                tokio::task::block_in_place(|| state.reload());
                notify_systemd(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    tracing::info!("shutting down; the XDP filter stays attached (pinned)");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    control.abort();
    metrics.abort();
    // Taking the lock waits for a change in flight: it finishes (and is
    // acknowledged) or never starts.
    let mut state = state.lock().await;
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!("cannot remove {}: {e}", socket.display());
    }
    state.proxies.drain(drain_timeout).await;
    Ok(())
}

/// Tells systemd (`Type=notify`) where the daemon is; a no-op elsewhere.
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
