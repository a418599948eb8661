//! `edgegate run`: loads the allowlist, sets up the filter and the mTLS
//! listeners, serves the control socket, reloads on SIGHUP, and on SIGTERM
//! drains the connections and stops, leaving the filter pinned.
//!
//! Data flows one way: config → [`State`] (the list, the filter and the
//! listeners) → XDP maps and the proxy's own copy of the list. The control
//! socket only asks `State` for changes; status, `/metrics` and `/readyz`
//! read the snapshots it publishes (`status`).
//!
//! - this file: start-up (with root, before any thread) and the serve loop
//!   (SIGHUP reloads, SIGTERM drains);
//! - `state`: the list, the filter and the listeners, and every change to them;
//! - `control`: the control socket's server loop;
//! - `fleet`: fleet mode: changes committed to etcd, generations adopted from it;
//! - `listeners`: the listeners' sockets, TLS files and backends, held by the gate;
//! - `supervisor`: the sandboxed proxy worker the listeners run in
//!   (`privsep`): its start, restarts, bounded channel and drain.

mod control;
pub(crate) mod egress;
mod explain;
mod fleet;
mod handover;
pub(crate) mod listeners;
mod state;
mod supervisor;
mod transaction;
mod worker_log;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::Mutex;

use egress::WorkerEgress;
use listeners::{ListenerError, Listeners};
use state::State;
use supervisor::{Spawner, Worker};

use crate::{
    allowlist::{self, Allowlist, StoreError},
    config::{Config, LogFormat, Overrides},
    control::BindError,
    filter::{Filter, FilterError, FilterOptions},
    fleet::Health,
    learned::{self, LearnedSources},
    metrics, preflight, privileges,
    privsep::keys::KeyStore,
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
    Listener(#[from] ListenerError),
    /// Privileges could not be given up, or `daemon.user` is unknown.
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
    /// The proxy worker cannot be started.
    #[error("cannot start the proxy worker: {0}")]
    Worker(#[source] std::io::Error),
    /// The runtime could not take over a socket.
    #[error("cannot serve: {source}")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    /// The worker's connections cannot be limited to its backends.
    #[error(
        "cannot limit the proxy worker's connections to its backends: {0}; set \
         `daemon.allow_unconfined_egress = true` to run without that limit"
    )]
    Egress(#[from] egress::EgressError),
    /// The etcd client cannot be set up (a bad URL or TLS material).
    #[error("`[fleet]`: {0}")]
    Fleet(#[from] crate::fleet::StoreError),
    /// Another daemon (or an `--offline` change) holds the state.
    #[error(transparent)]
    StateLocked(#[from] crate::files::LockError),
    /// The metrics endpoint cannot listen.
    #[error("`metrics.bind` {address}: {source}")]
    Metrics {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How often the certificates in force are checked for nearing expiry.
const EXPIRY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// How often the worker's sightings are taken in and kept on disk.
const LEARN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How `edgegate run` was asked to run.
pub struct Options {
    pub overrides: Overrides,
    /// The log format, passed on to the worker.
    pub log_format: LogFormat,
    /// Benchmarks only: the worker holds the listeners' keys, as before
    /// they stayed in the gate (`run --keys-in-worker`), to measure what that costs.
    #[cfg(feature = "test-hooks")]
    pub keys_in_worker: bool,
    /// Test only: what each worker tries once sandboxed (`--worker-escape`),
    /// and where to for a connection.
    #[cfg(feature = "test-hooks")]
    pub escape: Option<(crate::privsep::escape::Attempt, Option<std::net::SocketAddr>)>,
}

/// What start-up prepared with root privileges, before any thread but the
/// main one exists; [`serve`] runs it.
pub struct Startup {
    /// Held while the daemon runs: `--offline` changes wait for its end.
    lock: crate::files::StateLock,
    list: Allowlist,
    list_path: PathBuf,
    filter: Filter,
    listeners: Listeners,
    egress: WorkerEgress,
    worker: supervisor::Started,
    /// The log pipes of workers the previous gate handed over.
    handed_over_logs: Vec<(u32, std::os::fd::OwnedFd)>,
    /// Whether log lines are JSON (`--log-format json`).
    log_json: bool,
    control: std::os::unix::net::UnixListener,
    metrics: std::net::TcpListener,
    config: Config,
    config_path: PathBuf,
    overrides: Overrides,
    fleet: Option<fleet::Setup>,
    /// The listening sockets are in systemd's store: SIGTERM hands over.
    hand_over: bool,
}

/// Everything that needs root: reads the config and the list, reads the
/// listeners' TLS files and binds their sockets, attaches (or takes over)
/// the XDP filter, opens the control socket, starts the proxy worker as
/// `daemon.user`, then gives up what the gate does not need. Call it before
/// starting the async runtime: privileges are per thread.
pub fn start(config_path: PathBuf, options: Options) -> Result<Startup, DaemonError> {
    let Options {
        overrides,
        log_format,
        #[cfg(feature = "test-hooks")]
        keys_in_worker,
        #[cfg(feature = "test-hooks")]
        escape,
    } = options;
    #[cfg(not(feature = "test-hooks"))]
    let keys_in_worker = false;
    // What `edgegate check` checks, so that a config it passes starts.
    let report = preflight::inspect(&config_path, &overrides);
    for warning in report.warnings() {
        tracing::warn!("{warning}");
    }
    let Some((config, list)) = report.loaded else {
        let problems = report.errors().map(ToString::to_string).collect();
        return Err(DaemonError::Refused { problems });
    };
    let account = privileges::worker_account(config.daemon.user.as_deref())?;
    let list_path = config.allowlist_path();
    let lock = crate::files::StateLock::acquire(&list_path)?;
    // The etcd TLS files are read now, as root; the list file is the cache.
    let fleet = config
        .fleet
        .clone()
        .map(|fleet| fleet::Setup::new(fleet, &list_path))
        .transpose()
        .map_err(|problem| DaemonError::Refused { problems: vec![problem.to_string()] })?;
    // Certificates and sockets first: a listener that cannot start must not
    // leave a freshly attached filter behind.
    let mut inherited = handover::Inherited::take();
    let keys = (!keys_in_worker).then(|| Arc::new(KeyStore::default()));
    if keys_in_worker {
        tracing::warn!("--keys-in-worker: the proxy worker holds the listeners' private keys");
    }
    let listeners = Listeners::prepare(&config.listeners, &mut inherited, keys.clone())?;
    let handed_over_logs = inherited.worker_logs();
    inherited.forget_rest();
    let hand_over = handover::store(listeners.sockets());
    let metrics_error = |source| DaemonError::Metrics { address: config.metrics.bind, source };
    let metrics = std::net::TcpListener::bind(config.metrics.bind).map_err(metrics_error)?;
    metrics.set_nonblocking(true).map_err(metrics_error)?;
    let options = FilterOptions {
        interfaces: config.filter.interfaces.clone(),
        mode: config.filter.mode,
        scope: config.filter.scope,
        ports: config.protected_ports(),
        tunnels: config.tunnels(),
        max_entries: config.filter.max_entries,
        bpffs_dir: config.daemon.bpffs_dir.clone(),
        audit: config.filter.audit,
    };
    if config.filter.audit {
        tracing::warn!(
            "AUDIT MODE (filter.audit = true): nothing is dropped; packets the list would drop \
             are counted as would_drop and passed"
        );
    }
    if !list_path.exists() {
        tracing::warn!(
            "{} does not exist yet: protected traffic is dropped until `edgegate allow add`",
            list_path.display()
        );
        allowlist::store(&list_path, &list)?;
    }
    // Only the gate writes state; a directory an older version handed to
    // `daemon.user` comes back to root.
    let state_dir = config.daemon.state_dir.as_path();
    let list_dir =
        list_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let owned: Vec<&Path> =
        if list_dir == state_dir { vec![state_dir, &list_path] } else { vec![&list_path] };
    privileges::reclaim(&owned)?;
    let filter = Filter::load(&options, &list)?;
    let control = crate::control::bind(&config.daemon.control_socket)?;
    let (ipv4, ipv6) = list.family_sizes();
    tracing::info!(
        "filtering on {} ({ipv4} IPv4 and {ipv6} IPv6 entries from {}); control socket {}",
        config.filter.interfaces.join(", "),
        list_path.display(),
        config.daemon.control_socket.display()
    );
    #[cfg(feature = "test-hooks")]
    let escape = escape.map(|(attempt, address)| {
        let target = crate::privsep::escape::Target::on_this_host(attempt, &config, &list_path);
        (attempt, crate::privsep::escape::Target { address, ..target })
    });
    let egress =
        WorkerEgress::set_up(&listeners.destinations(), config.daemon.allow_unconfined_egress)?;
    let log_json = log_format == LogFormat::Json;
    let spawner = Spawner {
        account,
        log_format,
        cgroup: egress.cgroup(),
        keys,
        #[cfg(feature = "test-hooks")]
        escape,
    };
    let worker = supervisor::start(spawner, &listeners).map_err(DaemonError::Worker)?;
    privileges::confine_gate()?;
    Ok(Startup {
        lock,
        list,
        list_path,
        filter,
        listeners,
        egress,
        worker,
        handed_over_logs,
        log_json,
        control,
        metrics,
        config,
        config_path,
        overrides,
        fleet,
        hand_over,
    })
}

/// Runs the daemon until `shutdown` completes. The XDP program stays
/// attached and pinned afterwards: stopping the daemon never opens the gate.
pub async fn serve(
    startup: Startup,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let Startup {
        lock,
        list,
        list_path,
        mut filter,
        listeners,
        egress,
        worker,
        handed_over_logs,
        log_json,
        control,
        metrics,
        config,
        config_path,
        overrides,
        fleet,
        hand_over,
    } = startup;
    // Relayed from here, where threads start with the gate's reduced rights.
    for (pid, log) in handed_over_logs {
        if let Err(e) = worker_log::relay(log, pid, log_json) {
            tracing::warn!("cannot relay handed-over worker {pid}'s log: {e}");
        }
    }
    let io_error = |source| DaemonError::Runtime { source };
    let control_listener = tokio::net::UnixListener::from_std(control).map_err(io_error)?;
    let metrics_listener = tokio::net::TcpListener::from_std(metrics).map_err(io_error)?;
    filter.forward_logs();
    let socket = config.daemon.control_socket.clone();
    let drain_timeout = config.daemon.drain_timeout;
    let worker = Worker::supervise(worker, &listeners, &list, config.filter.audit, drain_timeout);
    let prober = worker.prober();
    let capacity = config.filter.max_entries;
    let health = fleet.as_ref().map(|setup| {
        Arc::new(Health::new(
            &setup.config.group,
            &setup.host,
            setup.cached,
            list.len(),
            &setup.trusted,
        ))
    });
    let state_dir = config.daemon.state_dir.clone();
    let accept_proxy_protocol = config.metrics.accept_proxy_protocol;
    let learned_path = state_dir.join(learned::FILE_NAME);
    let learned = LearnedSources::load(learned_path.clone()).unwrap_or_else(|e| {
        tracing::warn!("{e}; starting with no learned sources (the next one replaces the file)");
        LearnedSources::empty(learned_path)
    });
    let state = Arc::new(Mutex::new(State {
        _lock: lock,
        list,
        list_path,
        filter,
        listeners,
        egress,
        worker,
        config,
        config_path,
        overrides,
        reloads_ok: 0,
        reloads_failed: 0,
        fleet: health.clone(),
        learned,
        sightings_refused: std::collections::BTreeMap::new(),
    }));
    let (member, fleet_tasks) = match fleet.zip(health) {
        Some((setup, health)) => {
            let (member, tasks) =
                fleet::Member::start(setup, health, Arc::clone(&state), capacity).await?;
            (Some(Arc::new(member)), tasks)
        }
        None => (None, Vec::new()),
    };

    let control =
        tokio::spawn(control::serve(control_listener, Arc::clone(&state), member, prober.clone()));
    // Probes of `/metrics` and `/readyz` never wait long for the state: see `Observer`.
    let observer = Observer::new(Arc::clone(&state), prober.clone()).await;
    let keep_recent = observer.keep_recent();
    let observe: metrics::Observe = Arc::new(move || {
        let observer = Arc::clone(&observer);
        Box::pin(async move { observer.current().await })
    });
    let metrics = tokio::spawn(metrics::serve(metrics_listener, observe, accept_proxy_protocol));
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    // Workers an earlier gate handed over end by their deadline.
    let leftovers = tokio::spawn(handover::end_leftovers(state_dir));
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("installing a signal handler cannot fail");
    // Start-up has logged expiry warnings already; repeat them twice a day.
    let mut expiry_check = tokio::time::interval_at(
        tokio::time::Instant::now() + EXPIRY_CHECK_INTERVAL,
        EXPIRY_CHECK_INTERVAL,
    );
    let mut learn = tokio::time::interval(LEARN_INTERVAL);
    learn.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = expiry_check.tick() => state.lock().await.warn_of_expiry(),
            _ = learn.tick() => state.lock().await.learn(),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let reloading = sd_notify::NotifyState::monotonic_usec_now()
                    .map(|now| vec![sd_notify::NotifyState::Reloading, now])
                    .unwrap_or_else(|_| vec![sd_notify::NotifyState::Reloading]);
                notify_systemd(&reloading);
                state.lock().await.reload().await;
                notify_systemd(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    tracing::info!("shutting down; the XDP filter stays attached (pinned)");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    control.abort();
    metrics.abort();
    keep_recent.abort();
    leftovers.abort();
    fleet_tasks.iter().for_each(tokio::task::JoinHandle::abort);
    // What the worker saw last is asked for (briefly) and kept before it goes.
    prober.refresh(std::time::Duration::from_secs(1)).await;
    // Taking the lock waits for a change in flight: it finishes (and is
    // acknowledged) or never starts.
    let mut state = state.lock().await;
    state.listeners.close();
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!("cannot remove {}: {e}", socket.display());
    }
    state.learn();
    if !hand_over {
        state.worker.drain(drain_timeout).await;
        state.egress.remove();
        return Ok(());
    }
    // A restart: the next gate takes the listening sockets from systemd's
    // store, and this worker finishes its connections meanwhile.
    if let Some(pid) = state.worker.hand_off(drain_timeout).await {
        handover::record_draining(&state.config.daemon.state_dir, pid, drain_timeout);
        worker_log::hand_over();
        tracing::info!(
            pid,
            "handed over: the worker finishes its connections (up to {drain_timeout:?}) while \
             the next gate serves the listeners"
        );
    }
    Ok(())
}

/// A refresh of the observation waits at most this long for the worker,
/// then as long for the state lock, before the newest observation there is
/// is served.
const REFRESH_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
/// The observation is also taken this often in the background, so that it
/// stays recent while the state is busy with a long change.
const OBSERVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

type Observed = Arc<Result<crate::status::Observation, crate::status::NotReady>>;

/// What `/metrics` and `/readyz` read: the newest observation, refreshed
/// by one caller at a time while the others wait for it, every wait bounded
/// (never a wait on a stuck worker or a long change).
struct Observer {
    state: Arc<Mutex<State>>,
    prober: supervisor::Prober,
    /// The newest observation, and when the refresh that took it started.
    latest: std::sync::Mutex<(Observed, tokio::time::Instant)>,
    refreshing: Mutex<()>,
}

impl Observer {
    async fn new(state: Arc<Mutex<State>>, prober: supervisor::Prober) -> Arc<Self> {
        let first = Self::take(&*state.lock().await);
        let latest = std::sync::Mutex::new((first, tokio::time::Instant::now()));
        Arc::new(Self { state, prober, latest, refreshing: Mutex::new(()) })
    }

    fn take(state: &State) -> Observed {
        let observation = tokio::task::block_in_place(|| state.observe())
            .map_err(|e| crate::status::NotReady::Unobservable { reason: e.to_string() });
        Arc::new(observation)
    }

    fn latest(&self) -> (Observed, tokio::time::Instant) {
        self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// An observation taken after this call began: a refresh that starts
    /// now, or one that started meanwhile (callers waiting together share
    /// one). Every wait is bounded: past it, the newest one there is.
    async fn current(&self) -> Observed {
        let asked = tokio::time::Instant::now();
        let Ok(_only_refresher) =
            tokio::time::timeout(2 * REFRESH_WAIT, self.refreshing.lock()).await
        else {
            return self.latest().0;
        };
        if self.latest().1 < asked {
            let started = tokio::time::Instant::now();
            self.prober.refresh(REFRESH_WAIT).await;
            if let Ok(state) = tokio::time::timeout(REFRESH_WAIT, self.state.lock()).await {
                let observation = Self::take(&state);
                drop(state);
                *self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    (observation, started);
            }
        }
        self.latest().0
    }

    /// Keeps the observation recent in the background.
    fn keep_recent(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let observer = Arc::clone(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(OBSERVE_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                observer.current().await;
            }
        })
    }
}

/// Tells systemd (`Type=notify`) where the daemon is; a no-op elsewhere.
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
