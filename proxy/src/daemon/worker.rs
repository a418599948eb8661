//! The gate's side of the proxy worker: the listeners it hands over
//! ([`Listeners`]: sockets bound, TLS files read and checked, backends
//! resolved, all by the gate) and the worker process itself ([`Worker`]:
//! started, checked from `/proc`, fed, asked for counters, restarted with
//! backoff when it dies, drained at shutdown).
//!
//! Every frame from the worker is hostile: bounded, strictly decoded, and
//! anything unexpected (an unknown message, an answer to nothing, a frame
//! too big) gets the worker killed and replaced. Nothing it can say reaches
//! the allowlist or the maps: it only ever answers for its counters and its
//! sightings (which `allow suggest` shows an operator, who decides).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{SocketAddr, ToSocketAddrs as _},
    os::fd::AsFd as _,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::UnixStream,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    allowlist::Allowlist,
    config::ListenerConfig,
    privsep::{
        channel,
        escape::{Attempt, Target},
        protocol::{
            self, FROM_WORKER_MAX, FrameError, FromWorker, ListenerCounters, ListenerSpec,
            MAX_SIGHTINGS, Refused, SandboxReport, Sighting, ToWorker,
        },
        spawn::{self, Account, Launch},
    },
    proxy::ClientCheck,
    proxy::rejection::Rejection,
    status::{ListenerStatus, NotReady, ReloadOutcome, ReloadResult, WorkerStatus},
    tls::{Lifetime, ListenerTls, Material, TlsError},
};

/// How long a new worker may take to sandbox itself and say so.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the worker may take to answer a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a frame to the worker may take to go out: a worker that stops
/// reading (stopped, stuck, hostile) fills the socket's buffer, and is then
/// killed and replaced instead of stalling the gate.
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the gate waits for the supervisor to act on a request: every
/// step of the supervisor is bounded, so this only guards against a bug.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the serving worker is asked for its counters: `status`,
/// `/metrics` and `/readyz` read the newest answer, and never wait on it.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long an allowlist change waits for the worker to hold it too.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(2);
/// The first pause before starting a worker again; it doubles up to
/// [`MAX_BACKOFF`], and starts over once a worker has served for
/// [`STABLE_AFTER`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How many reported sightings wait, at most, for the gate to take them.
const MAX_WAITING_SIGHTINGS: usize = 4 * MAX_SIGHTINGS;

/// Why a listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Its TLS material is unusable.
    #[error("listener `{listener}`: {source}")]
    Tls {
        listener: String,
        #[source]
        source: TlsError,
    },
    /// The bind address is taken or not local.
    #[error("listener `{listener}`: cannot listen on {address}: {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The backend's name does not resolve.
    #[error("listener `{listener}`: backend `{backend}` does not resolve: {source}")]
    Resolve {
        listener: String,
        backend: String,
        #[source]
        source: io::Error,
    },
}

impl ListenerError {
    /// What is wrong, without the listener's name (a reload outcome names it).
    fn reason(&self) -> String {
        match self {
            Self::Tls { source, .. } => source.to_string(),
            Self::Bind { address, source, .. } => format!("cannot listen on {address}: {source}"),
            Self::Resolve { backend, source, .. } => {
                format!("backend `{backend}` does not resolve: {source}")
            }
        }
    }
}

/// One listener as the gate holds it.
struct Held {
    config: ListenerConfig,
    socket: Arc<std::net::TcpListener>,
    material: Material,
    backend_addrs: Vec<SocketAddr>,
    lifetimes: Vec<Lifetime>,
}

impl Held {
    /// Reads and checks the TLS files and resolves the backend; the socket
    /// is bound by the caller, or kept from the running listener.
    fn load(
        config: &ListenerConfig,
        socket: Arc<std::net::TcpListener>,
    ) -> Result<Self, ListenerError> {
        let listener = config.name.clone();
        let tls_error = |source| ListenerError::Tls { listener: listener.clone(), source };
        let material = Material::read(config).map_err(tls_error)?;
        let tls = ListenerTls::build(config, &material).map_err(tls_error)?;
        let backend_addrs = resolve(&config.backend).map_err(|source| ListenerError::Resolve {
            listener: listener.clone(),
            backend: config.backend.clone(),
            source,
        })?;
        Ok(Self {
            config: config.clone(),
            socket,
            material,
            backend_addrs,
            lifetimes: tls.lifetimes,
        })
    }

    fn bind(config: &ListenerConfig) -> Result<Arc<std::net::TcpListener>, ListenerError> {
        let error = |source| ListenerError::Bind {
            listener: config.name.clone(),
            address: config.bind,
            source,
        };
        Ok(Arc::new(listen(config.bind).map_err(error)?))
    }

    fn spec(&self) -> ListenerSpec {
        ListenerSpec {
            config: self.config.clone(),
            backend_addrs: self.backend_addrs.clone(),
            material: self.material.clone(),
        }
    }
}

/// A listening socket on `address` whose queue of connections not yet
/// accepted is as deep as the host allows (`net.core.somaxconn`, 4096 by
/// default). The standard library's 128 is too shallow for a proxy whose
/// handshakes cost CPU: a burst of new connections while the workers are
/// busy would have its SYNs dropped past it, each client then waiting a
/// second or more to retry.
fn listen(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = std::net::TcpListener::bind(address)?;
    // On a listening socket listen() only sets the queue's length; -1 asks
    // for the host's limit.
    nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::MAXALLOWABLE)?;
    Ok(socket)
}

/// Every address of `backend` (`host:port`); at least one.
fn resolve(backend: &str) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = backend.to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::other("no address"));
    }
    Ok(addrs)
}

/// The listeners, as handed to the worker.
pub struct Listeners(BTreeMap<String, Held>);

impl Listeners {
    /// Reads every listener's files, resolves its backend and binds its
    /// address; fails whole, so that a daemon never starts with half its
    /// listeners.
    pub fn prepare(configs: &[ListenerConfig]) -> Result<Self, ListenerError> {
        let mut held = BTreeMap::new();
        for config in configs {
            held.insert(config.name.clone(), Held::load(config, Held::bind(config)?)?);
        }
        Ok(Self(held))
    }

    /// Applies a new set of listener configs. A listener whose new files do
    /// not load keeps its previous ones, and the outcome says why.
    pub fn reload(&mut self, configs: &[ListenerConfig]) -> Vec<ReloadOutcome> {
        let mut outcomes = Vec::new();
        let wanted: BTreeMap<&str, SocketAddr> =
            configs.iter().map(|c| (c.name.as_str(), c.bind)).collect();
        self.0.retain(|name, held| {
            let keep = wanted.get(name.as_str()) == Some(&held.config.bind);
            if !keep {
                outcomes
                    .push(ReloadOutcome { listener: name.clone(), result: ReloadResult::Stopped });
            }
            keep
        });
        for config in configs {
            let result = match self.0.get(&config.name) {
                Some(running) => match Held::load(config, Arc::clone(&running.socket)) {
                    Ok(held) => {
                        self.0.insert(config.name.clone(), held);
                        ReloadResult::Reloaded
                    }
                    Err(e) => ReloadResult::KeptPrevious(e.reason()),
                },
                None => match Held::bind(config).and_then(|socket| Held::load(config, socket)) {
                    Ok(held) => {
                        self.0.insert(config.name.clone(), held);
                        ReloadResult::Started
                    }
                    Err(e) => ReloadResult::NotStarted(e.to_string()),
                },
            };
            outcomes.push(ReloadOutcome { listener: config.name.clone(), result });
        }
        outcomes
    }

    fn desired(&self) -> Desired {
        Desired {
            specs: self.0.values().map(Held::spec).collect(),
            sockets: self.0.values().map(|held| Arc::clone(&held.socket)).collect(),
            connect_ports: self.connect_ports(),
        }
    }

    /// The backends' ports: all a worker may connect to.
    fn connect_ports(&self) -> BTreeSet<u16> {
        self.0.values().flat_map(|h| h.backend_addrs.iter().map(SocketAddr::port)).collect()
    }

    /// Closes the gate's copies of the listening sockets (at shutdown).
    pub fn close(&mut self) {
        self.0.clear();
    }

    /// The listeners' status, with the counters the worker reported.
    pub fn status(&self, report: Option<&[ListenerCounters]>) -> Vec<ListenerStatus> {
        self.0
            .values()
            .map(|held| {
                let counters = report.and_then(|r| r.iter().find(|c| c.name == held.config.name));
                let count = |pick: fn(&ListenerCounters) -> u64| counters.map_or(0, pick);
                ListenerStatus {
                    name: held.config.name.clone(),
                    bind: held.config.bind,
                    backend: held.config.backend.clone(),
                    active: count(|c| c.active),
                    handshakes_ok: count(|c| c.handshakes_ok),
                    rejected: counters
                        .map(|c| {
                            Rejection::ALL
                                .iter()
                                .zip(&c.rejected)
                                .filter(|(_, n)| **n > 0)
                                .map(|(r, n)| (r.as_str().to_owned(), *n))
                                .collect()
                        })
                        .unwrap_or_default(),
                    bytes_from_clients: count(|c| c.bytes_from_clients),
                    bytes_to_clients: count(|c| c.bytes_to_clients),
                    backend_failures: count(|c| c.backend_failures),
                    relay_errors: count(|c| c.relay_errors),
                    lifetimes: held.lifetimes.clone(),
                }
            })
            .collect()
    }

    /// Whether the worker accepts on every listener, per its report.
    pub fn verify_accepting(&self, report: &[ListenerCounters]) -> Result<(), NotReady> {
        match self.0.keys().find(|name| !report.iter().any(|c| &&c.name == name && c.accepting)) {
            Some(name) => Err(NotReady::NotAccepting { listener: name.clone() }),
            None => Ok(()),
        }
    }
}

/// What every worker must serve: a new one gets it whole.
#[derive(Clone)]
struct Desired {
    specs: Vec<ListenerSpec>,
    sockets: Vec<Arc<std::net::TcpListener>>,
    connect_ports: BTreeSet<u16>,
}

/// How the gate starts workers.
pub struct Spawner {
    pub account: Account,
    pub log_format: String,
    /// Test only: what each worker tries once sandboxed.
    pub escape: Option<(Attempt, Target)>,
}

impl Spawner {
    fn spawn(&self, connect_ports: &BTreeSet<u16>) -> io::Result<Spawned> {
        let ports: Vec<u16> = connect_ports.iter().copied().collect();
        spawn::spawn(&Launch {
            account: &self.account,
            log_format: &self.log_format,
            connect_ports: &ports,
            escape: self.escape.as_ref().map(|(attempt, target)| (*attempt, target)),
        })
    }
}

/// A started worker and the gate's end of its socketpair.
type Spawned = (std::process::Child, std::os::unix::net::UnixStream);

/// Where respawns happen: one thread that lives as long as the process.
/// The kernel sends a worker its `PR_SET_PDEATHSIG` when the *thread* that
/// forked it exits, not the process, and runtime threads come and go
/// (`block_in_place` retires them): a worker forked on one would be killed
/// with every connection it holds some time later.
struct SpawnThread {
    requests: std::sync::mpsc::Sender<(BTreeSet<u16>, oneshot::Sender<io::Result<Spawned>>)>,
}

impl SpawnThread {
    fn start(spawner: Spawner) -> io::Result<Self> {
        let (requests, received) =
            std::sync::mpsc::channel::<(BTreeSet<u16>, oneshot::Sender<_>)>();
        std::thread::Builder::new().name("edgegate-spawn".into()).spawn(move || {
            for (ports, reply) in received {
                let _ = reply.send(spawner.spawn(&ports));
            }
            // Never exit: a worker forked here lives until the gate does.
            loop {
                std::thread::park();
            }
        })?;
        Ok(Self { requests })
    }

    async fn spawn(&self, ports: &BTreeSet<u16>) -> io::Result<Spawned> {
        let (reply, answer) = oneshot::channel();
        let gone = || io::Error::other("the spawning thread is gone");
        self.requests.send((ports.clone(), reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// A worker started (at start-up, before the runtime's threads exist) but
/// not yet supervised.
pub struct Started {
    spawner: Spawner,
    first: Spawned,
    ports: BTreeSet<u16>,
}

/// Starts the first worker for `listeners`.
pub fn start(spawner: Spawner, listeners: &Listeners) -> io::Result<Started> {
    let ports = listeners.connect_ports();
    let first = spawner.spawn(&ports)?;
    Ok(Started { spawner, first, ports })
}

/// Where the worker stands.
#[derive(Clone, Debug)]
enum Phase {
    Starting,
    Serving { pid: u32, sandbox: SandboxReport },
    Down { reason: String },
}

enum Command {
    Configure { reply: oneshot::Sender<Result<Vec<Refused>, String>>, desired: Desired },
    Report { reply: oneshot::Sender<Result<WorkerReport, String>> },
    Drain { timeout: Duration, reply: oneshot::Sender<()> },
}

/// The worker's answer to a report request.
#[derive(Clone)]
pub struct WorkerReport {
    pub listeners: Vec<ListenerCounters>,
}

/// The gate's handle on the worker.
pub struct Worker {
    commands: mpsc::Sender<Command>,
    phase: watch::Receiver<Phase>,
    restarts: Arc<AtomicU64>,
    user: String,
    allowlist: watch::Sender<(u64, Arc<ClientCheck>)>,
    /// The allowlist generation the serving worker has confirmed.
    applied: watch::Receiver<u64>,
    /// What the worker's reports brought, until the gate learns it.
    sightings: Sightings,
    /// The serving worker's newest report (none while none serves).
    report: watch::Receiver<Option<WorkerReport>>,
    supervisor: JoinHandle<()>,
}

/// Asks the supervisor for a fresh report without the gate's state: the
/// control socket uses it before `allow suggest`, outside the state lock.
#[derive(Clone)]
pub struct Prober {
    commands: mpsc::Sender<Command>,
}

impl Prober {
    /// A fresh report (its counters go where [`Worker::report`] reads them,
    /// its sightings where [`Worker::take_sightings`] finds them), waited
    /// for up to `limit`: a worker slower than that is the supervisor's
    /// business, and the caller goes on with the newest report there is.
    pub async fn refresh(&self, limit: Duration) {
        let (reply, answer) = oneshot::channel();
        let asked = async {
            self.commands.send(Command::Report { reply }).await.ok()?;
            answer.await.ok()
        };
        if let Ok(Some(Err(e))) = tokio::time::timeout(limit, asked).await {
            tracing::debug!("no fresh report from the worker: {e}");
        }
    }
}

/// Sightings the supervisor has received and the gate not yet taken.
type Sightings = Arc<std::sync::Mutex<Vec<Sighting>>>;

impl Worker {
    /// Supervises the worker `started` started; `list` is the allowlist in
    /// force (only audited with `audit`); a worker replaced on reload drains
    /// for up to `drain_timeout`.
    pub fn supervise(
        started: Started,
        listeners: &Listeners,
        list: &Allowlist,
        audit: bool,
        drain_timeout: Duration,
    ) -> Self {
        let (commands, receiver) = mpsc::channel(16);
        let (phase_tx, phase) = watch::channel(Phase::Starting);
        let (allowlist, allowlist_rx) =
            watch::channel((1, Arc::new(ClientCheck { list: list.clone(), audit })));
        let (applied_tx, applied) = watch::channel(0);
        let (report_tx, report) = watch::channel(None);
        let restarts = Arc::new(AtomicU64::new(0));
        let sightings = Sightings::default();
        let user = started.spawner.account.name.clone();
        let spawner = SpawnThread::start(started.spawner);
        let supervisor = Supervisor {
            spawner,
            desired: listeners.desired(),
            commands: receiver,
            phase: phase_tx,
            allowlist: allowlist_rx,
            applied: applied_tx,
            report: report_tx,
            restarts: Arc::clone(&restarts),
            sightings: Arc::clone(&sightings),
            next_id: 0,
            retire_timeout: drain_timeout,
        };
        let supervisor = tokio::spawn(supervisor.run(started.first, started.ports));
        Self { commands, phase, restarts, user, allowlist, applied, sightings, report, supervisor }
    }

    pub fn prober(&self) -> Prober {
        Prober { commands: self.commands.clone() }
    }

    /// Sends the worker the allowlist now in force, and whether it is only audited.
    pub fn publish(&self, list: &Allowlist, audit: bool) {
        self.allowlist.send_modify(|(generation, current)| {
            *generation += 1;
            *current = Arc::new(ClientCheck { list: list.clone(), audit });
        });
    }

    /// Waits (up to [`CATCH_UP_TIMEOUT`]) until the worker checks clients
    /// against the list published last, so that a change the CLI reports
    /// done holds in the proxy as well as in the filter. Without a worker
    /// there is nothing to wait for: the next one starts with that list.
    /// The future holds nothing of the gate's state: await it after
    /// releasing the state lock.
    pub fn caught_up(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let target = self.allowlist.borrow().0;
        let mut phase = self.phase.clone();
        let mut applied = self.applied.clone();
        async move {
            let wait = async {
                loop {
                    let down = matches!(*phase.borrow_and_update(), Phase::Down { .. });
                    if down || *applied.borrow_and_update() >= target {
                        return;
                    }
                    tokio::select! {
                        changed = phase.changed() => if changed.is_err() { return },
                        changed = applied.changed() => if changed.is_err() { return },
                    }
                }
            };
            if tokio::time::timeout(CATCH_UP_TIMEOUT, wait).await.is_err() {
                tracing::warn!(
                    "the proxy worker has not confirmed allowlist generation {target} within \
                     {CATCH_UP_TIMEOUT:?}; the filter has it"
                );
            }
        }
    }

    /// Has the worker serve `listeners` as they now are; the listeners it
    /// refuses keep what they had.
    pub async fn configure(&self, listeners: &Listeners) -> Result<Vec<Refused>, String> {
        let (reply, answer) = oneshot::channel();
        self.ask(Command::Configure { reply, desired: listeners.desired() }, answer, ASK_TIMEOUT)
            .await?
    }

    /// The serving worker's newest counters (at most [`REPORT_INTERVAL`]
    /// old); an error while none serves. Never waits on the worker.
    pub fn report(&self) -> Result<WorkerReport, String> {
        match (&*self.phase.borrow(), &*self.report.borrow()) {
            (Phase::Serving { .. }, Some(report)) => Ok(report.clone()),
            (Phase::Serving { .. }, None) | (Phase::Starting, _) => {
                Err("the worker is starting".to_owned())
            }
            (Phase::Down { reason }, _) => Err(reason.clone()),
        }
    }

    /// The sightings reported since the last call (the periodic reports and
    /// [`Prober::refresh`] bring them).
    pub fn take_sightings(&self) -> Vec<Sighting> {
        std::mem::take(&mut *self.sightings.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Drains the worker's connections (up to `timeout`) and stops it.
    pub async fn drain(&self, timeout: Duration) {
        let (reply, answer) = oneshot::channel();
        let limit = timeout + REPLY_TIMEOUT + SEND_TIMEOUT + ASK_TIMEOUT;
        if let Err(e) = self.ask(Command::Drain { timeout, reply }, answer, limit).await {
            tracing::warn!("proxy worker drain: {e}");
        }
    }

    /// Sends `command` to the supervisor and waits (up to `limit`) for `answer`.
    async fn ask<T>(
        &self,
        command: Command,
        answer: oneshot::Receiver<T>,
        limit: Duration,
    ) -> Result<T, String> {
        let asked = async {
            self.commands.send(command).await.map_err(|_| "the supervisor stopped".to_owned())?;
            answer.await.map_err(|_| "the supervisor stopped".to_owned())
        };
        tokio::time::timeout(limit, asked)
            .await
            .map_err(|_| format!("the supervisor did not answer within {limit:?}"))?
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Ready when a worker serves.
    pub fn ready(&self) -> Result<(), NotReady> {
        match &*self.phase.borrow() {
            Phase::Serving { .. } => Ok(()),
            Phase::Starting => Err(NotReady::NoWorker { reason: "one is starting".into() }),
            Phase::Down { reason } => Err(NotReady::NoWorker { reason: reason.clone() }),
        }
    }

    pub fn status(&self) -> WorkerStatus {
        let (pid, down, sandbox) = match &*self.phase.borrow() {
            Phase::Serving { pid, sandbox } => (Some(*pid), None, Some(sandbox.clone())),
            Phase::Starting => (None, Some("starting".to_owned()), None),
            Phase::Down { reason } => (None, Some(reason.clone()), None),
        };
        WorkerStatus { pid, user: self.user.clone(), down, restarts: self.restarts(), sandbox }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

/// How one worker's life ended.
enum Ended {
    /// It failed (died, misbehaved, would not start): start another.
    Failed(String),
    /// The backends' ports changed beyond its sandbox: a new one takes
    /// over at once, and this one drains in the background.
    Replaced,
    /// Drained at shutdown, or the gate is gone.
    Stopped,
}

struct Supervisor {
    /// `Err` if the thread could not start: every respawn then fails, counted.
    spawner: io::Result<SpawnThread>,
    desired: Desired,
    commands: mpsc::Receiver<Command>,
    phase: watch::Sender<Phase>,
    allowlist: watch::Receiver<(u64, Arc<ClientCheck>)>,
    applied: watch::Sender<u64>,
    report: watch::Sender<Option<WorkerReport>>,
    restarts: Arc<AtomicU64>,
    sightings: Sightings,
    next_id: u64,
    /// How long a replaced worker may take to finish its connections.
    retire_timeout: Duration,
}

impl Supervisor {
    async fn run(mut self, first: Spawned, ports: BTreeSet<u16>) {
        let mut next = Some((first, ports));
        let mut backoff = MIN_BACKOFF;
        loop {
            let ((child, stream), ports) = match next.take() {
                Some(started) => started,
                None => {
                    let ports = self.desired.connect_ports.clone();
                    let spawned = match &self.spawner {
                        Ok(thread) => thread.spawn(&ports).await,
                        Err(e) => Err(io::Error::new(e.kind(), format!("no spawning thread: {e}"))),
                    };
                    match spawned {
                        Ok(started) => (started, ports),
                        Err(e) => {
                            let reason = format!("cannot start a worker: {e}");
                            if self.pause(reason, &mut backoff).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            self.phase.send_replace(Phase::Starting);
            self.report.send_replace(None);
            let started = Instant::now();
            match self.serve(child, stream, ports).await {
                Ended::Stopped => return,
                Ended::Replaced => backoff = MIN_BACKOFF,
                Ended::Failed(reason) => {
                    if started.elapsed() >= STABLE_AFTER {
                        backoff = MIN_BACKOFF;
                    }
                    if self.pause(reason, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Counts and logs a failure, then waits out the backoff while still
    /// answering commands. Returns whether to stop.
    async fn pause(&mut self, reason: String, backoff: &mut Duration) -> bool {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            "proxy worker: {reason}; the filter stays in force; starting another in {backoff:?}"
        );
        self.phase.send_replace(Phase::Down { reason: reason.clone() });
        let until = Instant::now() + *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return false,
                command = self.commands.recv() => match command {
                    None => return true,
                    Some(Command::Configure { reply, desired }) => {
                        self.desired = desired;
                        let _ = reply.send(Ok(Vec::new()));
                    }
                    Some(Command::Report { reply }) => {
                        let _ = reply.send(Err(format!("no worker serves: {reason}")));
                    }
                    Some(Command::Drain { reply, .. }) => {
                        let _ = reply.send(());
                        return true;
                    }
                },
            }
        }
    }

    /// Runs one worker to its end.
    async fn serve(
        &mut self,
        child: std::process::Child,
        stream: std::os::unix::net::UnixStream,
        ports: BTreeSet<u16>,
    ) -> Ended {
        let mut link = match Link::new(child, stream) {
            Ok(link) => link,
            Err(e) => return Ended::Failed(format!("cannot talk to the worker: {e}")),
        };
        let pid = link.pid;
        let sandbox = match tokio::time::timeout(READY_TIMEOUT, link.next()).await {
            Ok(Ok(FromWorker::Ready { sandbox })) => sandbox,
            Ok(Ok(other)) => return link.fail(format!("sent {other:?} before Ready")).await,
            Ok(Err(e)) => return link.fail(e).await,
            Err(_) => return link.fail(format!("not ready within {READY_TIMEOUT:?}")).await,
        };
        if let Err(e) = verify_confined(pid) {
            return link.fail(format!("not confined: {e}")).await;
        }
        let (generation, list) = self.allowlist.borrow_and_update().clone();
        if let Err(e) = link.send_allowlist(generation, &list).await {
            return link.fail(e).await;
        }
        // A clone only for the call: a socket must close as soon as a reload drops it.
        if let Err(e) = self.configure(&mut link, &self.desired.clone()).await {
            return link.fail(e).await;
        }
        // The worker handles frames in order: configured, it holds the list.
        self.applied.send_replace(generation);
        if let Err(e) = self.report(&mut link).await {
            return link.fail(e).await;
        }
        tracing::info!(pid, "proxy worker serves");
        self.phase.send_replace(Phase::Serving { pid, sandbox });
        let mut reports =
            tokio::time::interval_at(Instant::now() + REPORT_INTERVAL, REPORT_INTERVAL);
        reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = reports.tick() => {
                    if let Err(e) = self.report(&mut link).await {
                        return link.fail(e).await;
                    }
                }
                status = &mut link.exited => {
                    link.reaped = true;
                    return Ended::Failed(describe_exit(pid, status));
                }
                message = link.messages.recv() => {
                    let why = match message {
                        Some(Ok(message)) => format!("sent {message:?} unasked"),
                        Some(Err(e)) => e,
                        None => "closed the channel".to_owned(),
                    };
                    return link.fail(why).await;
                }
                changed = self.allowlist.changed() => {
                    if changed.is_err() {
                        return link.stop().await;
                    }
                    let (generation, list) = self.allowlist.borrow_and_update().clone();
                    if let Err(e) = link.send_allowlist(generation, &list).await {
                        return link.fail(e).await;
                    }
                    if let Err(e) = self.report(&mut link).await {
                        return link.fail(e).await;
                    }
                }
                command = self.commands.recv() => match command {
                    None => return link.stop().await,
                    Some(Command::Configure { reply, desired }) => {
                        let outgrown = !desired.connect_ports.is_subset(&ports);
                        self.desired = desired.clone();
                        if outgrown {
                            // Landlock cannot widen: a new worker, with the
                            // new ports, takes the listeners over.
                            tracing::info!(pid, "backend ports changed: a new proxy worker takes over, this one drains");
                            let _ = reply.send(Ok(Vec::new()));
                            link.retire(self.retire_timeout);
                            return Ended::Replaced;
                        }
                        match self.configure(&mut link, &desired).await {
                            Ok(refused) => { let _ = reply.send(Ok(refused)); }
                            Err(e) => {
                                let _ = reply.send(Err(e.clone()));
                                return link.fail(e).await;
                            }
                        }
                    }
                    Some(Command::Report { reply }) => {
                        match self.report(&mut link).await {
                            Ok(report) => { let _ = reply.send(Ok(report)); }
                            Err(e) => {
                                let _ = reply.send(Err(e.clone()));
                                return link.fail(e).await;
                            }
                        }
                    }
                    Some(Command::Drain { timeout, reply }) => {
                        // The last copies of the listening sockets close with
                        // the worker's: new clients are refused, not queued.
                        self.desired.sockets.clear();
                        link.drain(timeout).await;
                        self.phase.send_replace(Phase::Down { reason: "stopped".into() });
                        let _ = reply.send(());
                        return Ended::Stopped;
                    }
                },
            }
        }
    }

    async fn configure(
        &mut self,
        link: &mut Link,
        desired: &Desired,
    ) -> Result<Vec<Refused>, String> {
        let id = self.id();
        let fds: Vec<_> = desired.sockets.iter().map(|s| s.as_fd()).collect();
        let message = ToWorker::Configure { id, listeners: desired.specs.clone() };
        match link.ask(&message, &fds).await? {
            FromWorker::Configured { id: got, refused } if got == id => Ok(refused),
            other => Err(format!("answered a configuration with {other:?}")),
        }
    }

    /// Asks for the worker's report: the allowlist generation it holds
    /// (published as applied), its counters (cached for `status`) and its
    /// sightings (kept for the gate to take).
    async fn report(&mut self, link: &mut Link) -> Result<WorkerReport, String> {
        let id = self.id();
        match link.ask(&ToWorker::Report { id }, &[]).await? {
            FromWorker::Report { id: got, allowlist_generation, listeners, sightings }
                if got == id =>
            {
                let mut waiting = self.sightings.lock().unwrap_or_else(PoisonError::into_inner);
                // Bounded while nobody takes them (the gate does every few seconds).
                let room = MAX_WAITING_SIGHTINGS.saturating_sub(waiting.len());
                waiting.extend(sightings.into_iter().take(room));
                drop(waiting);
                self.applied.send_replace(allowlist_generation);
                let report = WorkerReport { listeners };
                self.report.send_replace(Some(report.clone()));
                Ok(report)
            }
            other => Err(format!("answered a report with {other:?}")),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// One running worker: its channel, and its exit.
struct Link {
    pid: u32,
    stream: UnixStream,
    messages: mpsc::Receiver<Result<FromWorker, String>>,
    exited: JoinHandle<io::Result<std::process::ExitStatus>>,
    reaped: bool,
}

impl Link {
    fn new(child: std::process::Child, stream: std::os::unix::net::UnixStream) -> io::Result<Self> {
        let pid = child.id();
        let mut child = child;
        let exited = tokio::task::spawn_blocking(move || child.wait());
        stream.set_nonblocking(true)?;
        let stream = UnixStream::from_std(stream)?;
        // A second handle for the reader: frames are read in a task of
        // their own, so that no select ever cuts one in half.
        let reader = UnixStream::from_std(std::os::unix::net::UnixStream::from(
            stream.as_fd().try_clone_to_owned()?,
        ))?;
        let (sender, messages) = mpsc::channel(4);
        tokio::spawn(read_frames(reader, sender));
        Ok(Self { pid, stream, messages, exited, reaped: false })
    }

    async fn next(&mut self) -> Result<FromWorker, String> {
        match self.messages.recv().await {
            Some(message) => message,
            None => Err("closed the channel".into()),
        }
    }

    async fn send(
        &mut self,
        message: &ToWorker,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), String> {
        let frame = protocol::encode(message);
        match tokio::time::timeout(SEND_TIMEOUT, channel::send(&mut self.stream, &frame, fds)).await
        {
            Ok(sent) => sent.map_err(|e| format!("cannot write to the worker: {e}")),
            Err(_) => {
                Err(format!("it took in no frame within {SEND_TIMEOUT:?} (stopped or stuck)"))
            }
        }
    }

    async fn ask(
        &mut self,
        message: &ToWorker,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<FromWorker, String> {
        self.send(message, fds).await?;
        match tokio::time::timeout(REPLY_TIMEOUT, self.next()).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {REPLY_TIMEOUT:?}")),
        }
    }

    async fn send_allowlist(&mut self, generation: u64, check: &ClientCheck) -> Result<(), String> {
        let text = tokio::task::block_in_place(|| check.list.render());
        self.send(&ToWorker::Allowlist { generation, text, audit: check.audit }, &[]).await
    }

    /// Kills the worker for `why`, and waits for it.
    async fn fail(mut self, why: impl std::fmt::Display) -> Ended {
        let pid = self.pid;
        self.kill();
        let status = (&mut self.exited).await;
        self.reaped = true;
        Ended::Failed(format!("{why}; {}", describe_exit(pid, status)))
    }

    /// The gate is going away without a drain: the worker goes too.
    async fn stop(mut self) -> Ended {
        self.kill();
        let _ = (&mut self.exited).await;
        self.reaped = true;
        Ended::Stopped
    }

    async fn drain(&mut self, timeout: Duration) {
        let pid = self.pid;
        let drained = async {
            self.send(&ToWorker::Drain { timeout }, &[]).await?;
            match self.next().await? {
                FromWorker::Drained {} => Ok(()),
                other => Err(format!("answered a drain with {other:?}")),
            }
        };
        match tokio::time::timeout(timeout + REPLY_TIMEOUT, drained).await {
            Ok(Ok(())) => tracing::info!(pid, "proxy worker drained"),
            Ok(Err(e)) => tracing::warn!(pid, "proxy worker drain: {e}"),
            Err(_) => tracing::warn!(pid, "proxy worker did not drain in time"),
        }
        // It exits after `Drained`; anything left is killed.
        if tokio::time::timeout(REPLY_TIMEOUT, &mut self.exited).await.is_err() {
            self.kill();
            let _ = (&mut self.exited).await;
        }
        self.reaped = true;
    }

    /// Drains in the background (a worker replaced on reload).
    fn retire(mut self, timeout: Duration) {
        tokio::spawn(async move { self.drain(timeout).await });
    }

    fn kill(&self) {
        if !self.reaped && !self.exited.is_finished() {
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the worker's frames until one is bad or the channel closes.
async fn read_frames(mut reader: UnixStream, messages: mpsc::Sender<Result<FromWorker, String>>) {
    loop {
        let message = match protocol::read_frame(&mut reader, FROM_WORKER_MAX).await {
            Ok(body) => protocol::decode_from_worker(&body),
            Err(e) => Err(e),
        };
        let last = message.is_err();
        let message = message.map_err(|e| match e {
            FrameError::Closed => "closed the channel".to_owned(),
            e => format!("protocol violation: {e}"),
        });
        if messages.send(message).await.is_err() || last {
            return;
        }
    }
}

fn describe_exit(
    pid: u32,
    status: Result<io::Result<std::process::ExitStatus>, tokio::task::JoinError>,
) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match status {
        Ok(Ok(status)) => match (status.code(), status.signal()) {
            (_, Some(signal)) => {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map_or_else(|_| signal.to_string(), |s| s.to_string());
                let hint = if signal == libc::SIGSYS {
                    " (a system call its seccomp filter forbids)"
                } else {
                    ""
                };
                format!("worker {pid} was killed by {name}{hint}")
            }
            (Some(code), None) => format!("worker {pid} exited with status {code}"),
            (None, None) => format!("worker {pid} ended"),
        },
        Ok(Err(e)) => format!("worker {pid}: cannot wait for it: {e}"),
        Err(e) => format!("worker {pid}: {e}"),
    }
}

/// Checks from `/proc`, for every thread of `pid`, what the worker is
/// supposed to have done to itself: not root, no capability in any set,
/// `no_new_privs`, seccomp filtering.
fn verify_confined(pid: u32) -> Result<(), String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    for task in tasks {
        let path = task.map_err(|e| e.to_string())?.path().join("status");
        let status =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .ok_or_else(|| format!("{}: no {name}", path.display()))
        };
        if field("Uid")?.split_whitespace().any(|uid| uid == "0") {
            return Err(format!("{}: runs as root", path.display()));
        }
        for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            if u64::from_str_radix(field(set)?, 16).map_err(|e| e.to_string())? != 0 {
                return Err(format!("{}: {set} is not empty", path.display()));
            }
        }
        if field("NoNewPrivs")? != "1" || field("Seccomp")? != "2" {
            return Err(format!("{}: no_new_privs or seccomp missing", path.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{net::TcpStream, time::Duration};

    use super::*;

    #[test]
    fn the_listen_queue_is_as_deep_as_the_host_allows() {
        let host_limit: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("net.core.somaxconn")
            .trim()
            .parse()
            .expect("a number");
        // Past the standard library's 128, below anything a test should open.
        let burst = host_limit.min(300);
        let socket = listen("127.0.0.1:0".parse().unwrap()).expect("listen");
        let address = socket.local_addr().unwrap();
        // Nothing accepts: each connection waits in the queue. One that
        // does not fit has its SYN dropped and would time out.
        let queued: Vec<TcpStream> = (0..burst)
            .map_while(|_| TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok())
            .collect();
        assert_eq!(queued.len(), burst, "connections queued before one was refused");
    }
}
