//! The proxy worker's process (`edgegate worker`, started by the gate):
//! check that it holds nothing, sandbox itself, then serve the listeners
//! the gate sends until the gate says drain or goes away.

use std::{
    os::fd::{OwnedFd, RawFd},
    sync::Arc,
};

use arc_swap::ArcSwap;
use nix::sys::signal::Signal;
use tokio::{io::AsyncWriteExt as _, net::UnixStream};

#[cfg(feature = "test-hooks")]
use super::escape::{self, Attempt, Target};
use super::{
    channel::Receiver,
    keys::KeyClient,
    protocol::{FrameError, FromWorker, SandboxReport, ToWorker, decode, encode},
    sandbox::{self, SandboxError},
    sys,
};
use crate::{
    allowlist::Allowlist,
    proxy::{ClientCheck, Proxies},
};

/// How the gate started this worker (its command line).
pub struct Options {
    /// The worker's end of the socketpair.
    pub channel: RawFd,
    /// Its ends of the key channels (`privsep::keys`).
    pub key_channels: Vec<RawFd>,
    /// The backends' ports: the only ones it may connect to.
    pub connect_ports: Vec<u16>,
    /// Test only: what to try once sandboxed.
    #[cfg(feature = "test-hooks")]
    pub escape: Option<(Attempt, Target)>,
}

/// Why the worker stopped other than by a drain.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("refusing to serve with privileges: {0}")]
    Privileged(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("cannot start: {0}")]
    Start(#[source] std::io::Error),
    #[error("channel to the gate: {0}")]
    Channel(#[from] FrameError),
    #[error("channel to the gate: {0}")]
    ChannelIo(#[source] std::io::Error),
}

/// Runs the worker; returns after a drain, or with why it cannot go on.
pub fn run(options: Options) -> Result<(), WorkerError> {
    refuse_privileges()?;
    // Not dumpable: no other process of this user may ptrace it or read
    // its memory (which holds TLS keys), and no core file is written.
    sys::set_dumpable(false).map_err(WorkerError::Start)?;
    // Stopping and reloading are the gate's: systemd signals the whole
    // service (and a terminal its process group), but the worker drains
    // only when the gate says so.
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        sys::ignore_signal(signal).map_err(WorkerError::Start)?;
    }
    // Read what the sandbox will hide: the CPU quota (cgroup files).
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let landlock = sandbox::restrict_paths_and_network(&options.connect_ports)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WorkerError::Start)?;
    // The gate handed these descriptors over for these purposes alone.
    let channel = sys::adopt_inherited_fd(options.channel).map_err(WorkerError::Start)?;
    let key_channels: Vec<OwnedFd> = options
        .key_channels
        .iter()
        .map(|&fd| sys::adopt_inherited_fd(fd))
        .collect::<std::io::Result<_>>()
        .map_err(WorkerError::Start)?;
    let keys = Arc::new(KeyClient::new(key_channels));
    runtime.block_on(async move {
        tokio::spawn(super::log_batch::LOG.send_batches());
        let allowlist = Arc::new(ArcSwap::from_pointee(ClientCheck::default()));
        // Every thread exists once the connection workers have started.
        let proxies =
            Proxies::start(Arc::clone(&allowlist), cores, keys).map_err(WorkerError::Start)?;
        let sandbox = sandbox::confine_syscalls(&landlock)?;
        log_sandbox(&sandbox);
        let stream = std::os::unix::net::UnixStream::from(channel);
        stream.set_nonblocking(true).map_err(WorkerError::Start)?;
        let stream = UnixStream::from_std(stream).map_err(WorkerError::Start)?;
        Serve { channel: Receiver::new(stream), proxies, allowlist, generation: 0 }
            .run(
                sandbox,
                #[cfg(feature = "test-hooks")]
                options.escape,
            )
            .await
    })
}

/// The worker never runs with a capability or as root, whoever started it.
fn refuse_privileges() -> Result<(), WorkerError> {
    use caps::CapSet;
    if nix::unistd::geteuid().is_root() || nix::unistd::getuid().is_root() {
        return Err(WorkerError::Privileged("running as root".into()));
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Bounding,
        CapSet::Ambient,
    ] {
        let held = caps::read(None, set).map_err(|e| WorkerError::Privileged(e.to_string()))?;
        if !held.is_empty() {
            return Err(WorkerError::Privileged(format!("{set:?} set holds {held:?}")));
        }
    }
    Ok(())
}

fn log_sandbox(sandbox: &SandboxReport) {
    let yes_no = |on: bool| if on { "enforced" } else { "NOT enforced (kernel too old)" };
    if sandbox.landlock_abi == 0 {
        tracing::warn!("worker sandbox: seccomp enforced; Landlock absent from this kernel");
        return;
    }
    tracing::info!(
        "worker sandbox: seccomp enforced; Landlock ABI {}: no file access {}, no bind and \
         backend ports only {}, no signals outside {}",
        sandbox.landlock_abi,
        yes_no(sandbox.file_system_denied),
        yes_no(sandbox.network_restricted),
        yes_no(sandbox.scoped)
    );
}

struct Serve {
    channel: Receiver,
    proxies: Proxies,
    allowlist: Arc<ArcSwap<ClientCheck>>,
    generation: u64,
}

impl Serve {
    async fn run(
        mut self,
        sandbox: SandboxReport,
        #[cfg(feature = "test-hooks")] mut escape: Option<(Attempt, Target)>,
    ) -> Result<(), WorkerError> {
        self.send(&FromWorker::Ready { sandbox }).await?;
        #[cfg(feature = "test-hooks")]
        let mut forging = None;
        loop {
            let body = match self.channel.next().await {
                Ok(body) => body,
                // The gate is gone: nothing may run unsupervised.
                Err(FrameError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match decode::<ToWorker>(&body)? {
                ToWorker::Configure { id, listeners } => {
                    let sockets =
                        self.channel.take_fds(listeners.len()).map_err(WorkerError::ChannelIo)?;
                    let sockets = sockets.into_iter().map(std::net::TcpListener::from);
                    let refused =
                        self.proxies.configure(listeners.into_iter().zip(sockets).collect());
                    self.send(&FromWorker::Configured { id, refused }).await?;
                    // Test only: serving, and sandboxed; now misbehave.
                    #[cfg(feature = "test-hooks")]
                    match escape.take() {
                        Some((Attempt::ForgeSightings, target)) => {
                            tracing::warn!("escape attempt `ForgeSightings`: in every report");
                            forging = Some(target);
                        }
                        Some((attempt, target)) => self.misbehave(attempt, &target).await?,
                        None => {}
                    }
                }
                ToWorker::Allowlist { generation, text, audit } => match Allowlist::parse(&text) {
                    Ok(list) => {
                        self.allowlist.store(Arc::new(ClientCheck { list, audit }));
                        self.generation = generation;
                    }
                    Err(e) => {
                        tracing::error!("allowlist generation {generation} from the gate: {e}")
                    }
                },
                ToWorker::Report { id } => {
                    let listeners = self.proxies.counters();
                    let sightings = self.proxies.take_sightings();
                    #[cfg(feature = "test-hooks")]
                    let sightings = match &forging {
                        Some(target) => {
                            let names: Vec<String> =
                                listeners.iter().map(|l| l.name.clone()).collect();
                            let forged = escape::forged_sightings(target, &names);
                            sightings.into_iter().chain(forged).collect()
                        }
                        None => sightings,
                    };
                    let report = FromWorker::Report {
                        id,
                        allowlist_generation: self.generation,
                        listeners,
                        sightings,
                    };
                    self.send(&report).await?;
                }
                ToWorker::Drain { timeout, detach: false } => {
                    self.proxies.drain(timeout).await;
                    self.send(&FromWorker::Drained {}).await?;
                    return Ok(());
                }
                ToWorker::Drain { timeout, detach: true } => {
                    // The gate exits next; its successor serves the
                    // listeners. Open connections finish here, bounded by
                    // `timeout` (and by the successor, which kills this
                    // process at that deadline whatever it does).
                    sys::clear_parent_death_signal().map_err(WorkerError::ChannelIo)?;
                    self.proxies.stop_accepting();
                    self.send(&FromWorker::Detached {}).await?;
                    tracing::info!("handed over: draining open connections for up to {timeout:?}");
                    self.proxies.drain(timeout).await;
                    return Ok(());
                }
            }
        }
    }

    async fn send(&mut self, message: &FromWorker) -> Result<(), WorkerError> {
        self.channel.stream_mut().write_all(&encode(message)).await.map_err(WorkerError::ChannelIo)
    }

    #[cfg(feature = "test-hooks")]
    async fn misbehave(&mut self, attempt: Attempt, target: &Target) -> Result<(), WorkerError> {
        tracing::warn!("escape attempt `{attempt:?}`: trying");
        if let Some(frame) = escape::bad_frame(attempt) {
            let stream = self.channel.stream_mut();
            stream.write_all(&frame).await.map_err(WorkerError::ChannelIo)?;
            if attempt == Attempt::TruncatedMessage {
                stream.shutdown().await.map_err(WorkerError::ChannelIo)?;
            }
            return Ok(());
        }
        let outcome = match attempt {
            Attempt::SignAnything => super::keys::sign_anything(self.proxies.keys())
                .map(|_| "signed".to_owned())
                .map_err(std::io::Error::other),
            _ => escape::attempt(attempt, target),
        };
        match outcome {
            Ok(what) => tracing::error!("escape attempt `{attempt:?}`: SUCCEEDED ({what})"),
            Err(e) => tracing::warn!("escape attempt `{attempt:?}`: refused: {e}"),
        }
        Ok(())
    }
}
