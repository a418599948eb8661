//! The supervisor task: runs one worker at a time to its end, answers the
//! gate's commands meanwhile, and starts another with backoff.

use std::{
    collections::BTreeSet,
    io,
    os::fd::AsFd as _,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::super::listeners::Desired;
use super::{
    Command, MAX_BACKOFF, MAX_WAITING_SIGHTINGS, MIN_BACKOFF, Phase, READY_TIMEOUT,
    REPORT_INTERVAL, STABLE_AFTER, Sightings, SupervisorError, WorkerReport,
    confinement::verify_confined,
    link::{Link, describe_exit},
    spawn::{Services, SpawnThread, Spawned},
};
use crate::{
    privsep::protocol::{FromWorker, Refused, ToWorker},
    proxy::ClientCheck,
};

/// How one worker's life ended.
pub(super) enum Ended {
    /// It failed (died, misbehaved, would not start): start another.
    /// `exit` says how the process ended, when it had to be killed.
    Failed { why: SupervisorError, exit: Option<String> },
    /// The backends' ports changed beyond its sandbox: a new one takes
    /// over at once, and this one drains in the background.
    Replaced,
    /// Drained at shutdown, or the gate is gone.
    Stopped,
}

pub(super) struct Supervisor {
    /// `Err` if the thread could not start: every respawn then fails, counted.
    pub(super) spawner: io::Result<SpawnThread>,
    pub(super) desired: Desired,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) phase: watch::Sender<Phase>,
    pub(super) allowlist: watch::Receiver<(u64, Arc<ClientCheck>)>,
    pub(super) applied: watch::Sender<u64>,
    pub(super) report: watch::Sender<Option<WorkerReport>>,
    pub(super) restarts: Arc<AtomicU64>,
    pub(super) sightings: Sightings,
    pub(super) next_id: u64,
    /// How long a replaced worker may take to finish its connections.
    pub(super) retire_timeout: Duration,
    /// The cgroup every worker must be in (see `daemon::egress`).
    pub(super) cgroup: Option<String>,
}

impl Supervisor {
    pub(super) async fn run(mut self, first: Spawned, ports: BTreeSet<u16>) {
        let mut next = Some((first, ports));
        let mut backoff = MIN_BACKOFF;
        loop {
            let (Spawned { child, stream, services }, ports) = match next.take() {
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
                            let reason = SupervisorError::Spawn(Arc::new(e)).to_string();
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
            match self.serve(child, stream, services, ports).await {
                Ended::Stopped => return,
                Ended::Replaced => backoff = MIN_BACKOFF,
                Ended::Failed { why, exit } => {
                    if started.elapsed() >= STABLE_AFTER {
                        backoff = MIN_BACKOFF;
                    }
                    let reason = match exit {
                        Some(exit) => format!("{why}; {exit}"),
                        None => why.to_string(),
                    };
                    if self.pause(reason, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Counts and logs a failure (`reason`, as `status` shows it), then
    /// waits out the backoff while still answering commands. Returns
    /// whether to stop.
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
                        let _ = reply.send(Err(SupervisorError::NoWorker(reason.clone())));
                    }
                    Some(Command::Drain { reply, .. }) => {
                        let _ = reply.send(());
                        return true;
                    }
                    Some(Command::HandOff { reply, .. }) => {
                        let _ = reply.send(None);
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
        services: Services,
        ports: BTreeSet<u16>,
    ) -> Ended {
        let mut link = match Link::new(child, stream) {
            Ok(link) => link,
            Err(e) => {
                return Ended::Failed { why: SupervisorError::Spawn(Arc::new(e)), exit: None };
            }
        };
        let pid = link.pid;
        if let Err(e) = services.start(pid) {
            return link.fail(SupervisorError::Spawn(Arc::new(e))).await;
        }
        let sandbox = match tokio::time::timeout(READY_TIMEOUT, link.next()).await {
            Ok(Ok(FromWorker::Ready { sandbox })) => sandbox,
            Ok(Ok(other)) => {
                return link
                    .fail(SupervisorError::Unexpected(format!("{other:?} before Ready")))
                    .await;
            }
            Ok(Err(e)) => return link.fail(e).await,
            Err(_) => return link.fail(SupervisorError::NotReady(READY_TIMEOUT)).await,
        };
        if let Err(e) = verify_confined(pid, self.cgroup.as_deref()) {
            return link.fail(SupervisorError::NotConfined(e)).await;
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
        tracing::info!(pid, "proxy worker serves");
        self.phase.send_replace(Phase::Serving { pid, sandbox });
        // The first report at once: `status` has counters from the start.
        let mut reports = tokio::time::interval(REPORT_INTERVAL);
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
                    let why = SupervisorError::Exited(describe_exit(pid, status));
                    return Ended::Failed { why, exit: None };
                }
                message = link.messages.recv() => {
                    let why = match message {
                        Some(Ok(message)) => SupervisorError::Unexpected(format!("{message:?}")),
                        Some(Err(e)) => e,
                        None => SupervisorError::Closed,
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
                    Some(Command::HandOff { timeout, reply }) => {
                        self.desired.sockets.clear();
                        let handed = match link.hand_off(timeout).await {
                            Ok(pid) => Some(pid),
                            Err(e) => {
                                tracing::warn!(pid, "proxy worker hand-over: {e}; draining here");
                                link.drain(timeout).await;
                                None
                            }
                        };
                        self.phase.send_replace(Phase::Down { reason: "handed over".into() });
                        let _ = reply.send(handed);
                        return Ended::Stopped;
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
    ) -> Result<Vec<Refused>, SupervisorError> {
        let id = self.id();
        let fds: Vec<_> = desired.sockets.iter().map(|s| s.as_fd()).collect();
        let message = ToWorker::Configure { id, listeners: desired.specs.clone() };
        match link.ask(&message, &fds).await? {
            FromWorker::Configured { id: got, refused } if got == id => Ok(refused),
            other => Err(SupervisorError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks for the worker's report: the allowlist generation it holds
    /// (published as applied), its counters (cached for `status`) and its
    /// sightings (kept for the gate to take).
    async fn report(&mut self, link: &mut Link) -> Result<WorkerReport, SupervisorError> {
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
            other => Err(SupervisorError::Unexpected(format!("{other:?}"))),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}
