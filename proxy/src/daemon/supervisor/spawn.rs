//! Starting workers. The first starts at start-up, before the runtime's
//! threads exist; every later one on one thread that lives as long as the
//! gate (see [`SpawnThread`]).

use std::{collections::BTreeSet, io, os::fd::OwnedFd, sync::Arc};

use tokio::sync::oneshot;

use super::super::{egress::WorkerCgroup, listeners::Listeners, worker_log};
use crate::{
    config::LogFormat,
    privsep::{
        keys::{self, KeyStore},
        spawn::{self, Account, Launch},
    },
};

/// At most this many key channels per worker (one per core it runs).
const MAX_KEY_CHANNELS: usize = 64;

/// How the gate starts workers.
pub struct Spawner {
    pub account: Account,
    pub log_format: LogFormat,
    /// The cgroup workers go into, whose programs limit where they connect.
    pub cgroup: Option<WorkerCgroup>,
    /// The listeners' keys, which workers use over their key channels;
    /// `None` where they hold them (`run --keys-in-worker`, benchmarks only).
    pub keys: Option<Arc<KeyStore>>,
    /// Test only: what each worker tries once sandboxed.
    #[cfg(feature = "test-hooks")]
    pub escape: Option<(crate::privsep::escape::Attempt, crate::privsep::escape::Target)>,
}

impl Spawner {
    fn spawn(&self, connect_ports: &BTreeSet<u16>) -> io::Result<Spawned> {
        let ports: Vec<u16> = connect_ports.iter().copied().collect();
        // One key channel per core the worker runs (it starts as many).
        let count = std::thread::available_parallelism().map_or(1, usize::from);
        let (gate_ends, worker_ends) = match &self.keys {
            Some(_) => keys::channels(count.min(MAX_KEY_CHANNELS))?,
            None => (Vec::new(), Vec::new()),
        };
        let (log, log_end) = worker_log::pipe()?;
        let (child, stream) = spawn::spawn(&Launch {
            account: &self.account,
            log_format: self.log_format,
            log: log_end,
            cgroup: self.cgroup.as_ref().map(|cgroup| &*cgroup.procs),
            key_channels: &worker_ends,
            connect_ports: &ports,
            #[cfg(feature = "test-hooks")]
            escape: self.escape.as_ref().map(|(attempt, target)| (*attempt, target)),
        })?;
        let services = Services {
            keys: self.keys.clone().map(|store| (store, gate_ends)),
            log,
            json: self.log_format == LogFormat::Json,
        };
        Ok(Spawned { child, stream, services })
    }
}

/// A started worker, the gate's end of its socketpair, and what the gate
/// runs for it once the gate has given up its privileges.
pub(super) struct Spawned {
    pub(super) child: std::process::Child,
    pub(super) stream: std::os::unix::net::UnixStream,
    pub(super) services: Services,
}

/// The gate's threads for one worker: its key channels' and its log's.
pub(super) struct Services {
    keys: Option<(Arc<KeyStore>, Vec<OwnedFd>)>,
    log: OwnedFd,
    json: bool,
}

impl Services {
    /// Starts them, for worker `pid`. Threads inherit the credentials of
    /// the one that starts them: call it only once the gate is confined.
    pub(super) fn start(self, pid: u32) -> io::Result<()> {
        worker_log::relay(self.log, pid, self.json)?;
        if let Some((store, channels)) = self.keys {
            let cpus = keys::allowed_cpus();
            for (index, channel) in channels.into_iter().enumerate() {
                let cpu = (!cpus.is_empty()).then(|| cpus[index % cpus.len()]);
                keys::serve(Arc::clone(&store), channel, pid, cpu)?;
            }
        }
        Ok(())
    }
}

/// Where respawns happen: one thread that lives as long as the process.
/// The kernel sends a worker its `PR_SET_PDEATHSIG` when the *thread* that
/// forked it exits, not the process, and runtime threads come and go
/// (`block_in_place` retires them): a worker forked on one would be killed
/// with every connection it holds some time later.
pub(super) struct SpawnThread {
    requests: std::sync::mpsc::Sender<(BTreeSet<u16>, oneshot::Sender<io::Result<Spawned>>)>,
}

impl SpawnThread {
    pub(super) fn start(spawner: Spawner) -> io::Result<Self> {
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

    pub(super) async fn spawn(&self, ports: &BTreeSet<u16>) -> io::Result<Spawned> {
        let (reply, answer) = oneshot::channel();
        let gone = || io::Error::other("the spawning thread is gone");
        self.requests.send((ports.clone(), reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// A worker started (at start-up, before the runtime's threads exist) but
/// not yet supervised.
pub struct Started {
    pub(super) spawner: Spawner,
    pub(super) first: Spawned,
    pub(super) ports: BTreeSet<u16>,
}

/// Starts the first worker for `listeners`.
pub fn start(spawner: Spawner, listeners: &Listeners) -> io::Result<Started> {
    let ports = listeners.connect_ports();
    let first = spawner.spawn(&ports)?;
    Ok(Started { spawner, first, ports })
}
