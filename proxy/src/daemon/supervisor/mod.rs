//! The gate's side of the proxy worker ("the worker": the sandboxed
//! process that serves the listeners): started, checked from `/proc`, fed
//! the allowlist and the listeners, asked for its counters, restarted with
//! backoff when it dies or stops answering, drained at shutdown.
//!
//! - this file: the handle the daemon holds ([`Worker`]) and the typed
//!   errors ([`SupervisorError`]);
//! - `spawn`: how workers are started, on one long-lived thread;
//! - `run`: the supervisor task: one worker's life, the restart policy;
//! - `link`: the channel to one running worker, every step bounded;
//! - `confinement`: the audit of a new worker's credentials from `/proc`.
//!
//! Every frame from the worker is hostile: bounded, strictly decoded, and
//! anything unexpected (an unknown message, an answer to nothing, a frame
//! too big, no answer in time) gets the worker killed and replaced. Nothing
//! it can say reaches the allowlist or the maps: it only ever answers for
//! its counters and its sightings (which `allow suggest` shows an operator,
//! who decides). No lock of the gate is held while it waits on the worker.

mod confinement;
mod link;
mod run;
mod spawn;

use std::{
    sync::{
        Arc, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use run::Supervisor;
use spawn::SpawnThread;
pub use spawn::{Spawner, Started, start};

use super::listeners::{Desired, Listeners};
use crate::{
    allowlist::Allowlist,
    privsep::protocol::{ListenerCounters, MAX_SIGHTINGS, Refused, SandboxReport, Sighting},
    proxy::ClientCheck,
    status::{EgressStatus, NotReady, WorkerStatus},
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

/// Why the gate gave up on a worker, or could not get an answer about it.
/// A worker that causes any of the first group is killed and replaced.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SupervisorError {
    /// A frame did not go out in time: the worker stopped reading.
    #[error("it took in no frame within {0:?} (stopped or stuck)")]
    SendTimeout(Duration),
    /// Writing to its channel failed.
    #[error("cannot write to the worker: {0}")]
    Write(#[source] Arc<std::io::Error>),
    /// It did not answer a request in time.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// It did not say it was sandboxed and ready in time.
    #[error("not ready within {0:?}")]
    NotReady(Duration),
    /// Its channel closed.
    #[error("closed the channel")]
    Closed,
    /// A frame broke the protocol (too big, not decodable).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A well-formed message that is not the answer expected (`{0}`: what it sent).
    #[error("sent {0}, which answers nothing asked")]
    Unexpected(String),
    /// `/proc` shows it is not confined as it must be.
    #[error("not confined: {0}")]
    NotConfined(String),
    /// It exited, or was killed (`{0}` says how).
    #[error("{0}")]
    Exited(String),
    /// No worker could be started, or talked to.
    #[error("cannot start a worker: {0}")]
    Spawn(#[source] Arc<std::io::Error>),

    /// No worker serves now (why the last one ended).
    #[error("no worker serves: {0}")]
    NoWorker(String),
    /// One is starting.
    #[error("the worker is starting")]
    Starting,
    /// The supervisor task is gone (the gate is stopping).
    #[error("the supervisor stopped")]
    Stopped,
    /// The supervisor did not act within the gate's bound (a bug).
    #[error("the supervisor did not answer within {0:?}")]
    Unanswered(Duration),
}

/// Where the worker stands.
#[derive(Clone, Debug)]
enum Phase {
    Starting,
    Serving { pid: u32, sandbox: SandboxReport },
    Down { reason: String },
}

enum Command {
    Configure { reply: oneshot::Sender<Result<Vec<Refused>, SupervisorError>>, desired: Desired },
    Report { reply: oneshot::Sender<Result<WorkerReport, SupervisorError>> },
    Drain { timeout: Duration, reply: oneshot::Sender<()> },
    HandOff { timeout: Duration, reply: oneshot::Sender<Option<u32>> },
}

/// The worker's answer to a report request.
#[derive(Clone)]
pub struct WorkerReport {
    pub listeners: Vec<ListenerCounters>,
}

/// The gate's handle on the worker.
pub struct Worker {
    /// The way to the supervisor task.
    prober: Prober,
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

/// The way to the supervisor task, usable without the gate's state: the
/// control socket, `/metrics` and shutdown ask for fresh reports through it
/// outside the state lock, and [`Worker`] sends its commands through it.
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
        match self.ask(Command::Report { reply }, answer, limit).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!("no fresh report from the worker: {e}"),
            Err(e) => tracing::debug!("no fresh report within {limit:?}: {e}"),
        }
    }

    /// Sends `command` to the supervisor and waits (up to `limit`) for `answer`.
    async fn ask<T>(
        &self,
        command: Command,
        answer: oneshot::Receiver<T>,
        limit: Duration,
    ) -> Result<T, SupervisorError> {
        let asked = async {
            self.commands.send(command).await.map_err(|_| SupervisorError::Stopped)?;
            answer.await.map_err(|_| SupervisorError::Stopped)
        };
        tokio::time::timeout(limit, asked).await.map_err(|_| SupervisorError::Unanswered(limit))?
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
        let cgroup = started.spawner.cgroup.as_ref().map(|c| c.path_in_hierarchy.clone());
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
            cgroup,
        };
        let supervisor = tokio::spawn(supervisor.run(started.first, started.ports));
        let prober = Prober { commands };
        Self { prober, phase, restarts, user, allowlist, applied, sightings, report, supervisor }
    }

    pub fn prober(&self) -> Prober {
        self.prober.clone()
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
    pub async fn configure(&self, listeners: &Listeners) -> Result<Vec<Refused>, SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.prober
            .ask(Command::Configure { reply, desired: listeners.desired() }, answer, ASK_TIMEOUT)
            .await?
    }

    /// The serving worker's newest counters (at most [`REPORT_INTERVAL`]
    /// old); an error while none serves. Never waits on the worker.
    pub fn report(&self) -> Result<WorkerReport, SupervisorError> {
        match (&*self.phase.borrow(), &*self.report.borrow()) {
            (Phase::Serving { .. }, Some(report)) => Ok(report.clone()),
            (Phase::Serving { .. }, None) | (Phase::Starting, _) => Err(SupervisorError::Starting),
            (Phase::Down { reason }, _) => Err(SupervisorError::NoWorker(reason.clone())),
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
        if let Err(e) = self.prober.ask(Command::Drain { timeout, reply }, answer, limit).await {
            tracing::warn!("proxy worker drain: {e}");
        }
    }

    /// Hands the worker over for a restart (see `daemon::handover`): its pid
    /// once it drains on its own; `None` if it drained here instead.
    pub async fn hand_off(&self, timeout: Duration) -> Option<u32> {
        let (reply, answer) = oneshot::channel();
        let limit = timeout + REPLY_TIMEOUT + SEND_TIMEOUT + ASK_TIMEOUT;
        match self.prober.ask(Command::HandOff { timeout, reply }, answer, limit).await {
            Ok(handed) => handed,
            Err(e) => {
                tracing::warn!("proxy worker hand-over: {e}");
                None
            }
        }
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

    /// Its status; `egress` is the gate's (see `daemon::egress`).
    pub fn status(&self, egress: EgressStatus) -> WorkerStatus {
        let (pid, down, sandbox) = match &*self.phase.borrow() {
            Phase::Serving { pid, sandbox } => (Some(*pid), None, Some(sandbox.clone())),
            Phase::Starting => (None, Some("starting".to_owned()), None),
            Phase::Down { reason } => (None, Some(reason.clone()), None),
        };
        let restarts = self.restarts();
        WorkerStatus { pid, user: self.user.clone(), down, restarts, sandbox, egress }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}
