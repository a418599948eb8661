//! The channel to one running worker: frames out (each within
//! [`SEND_TIMEOUT`]), frames in (read by a task of their own), answers
//! awaited within [`REPLY_TIMEOUT`], and the process's exit.

use std::{io, time::Duration};

use tokio::{net::UnixStream, sync::mpsc, task::JoinHandle};

use std::{os::fd::AsFd as _, sync::Arc};

use super::{REPLY_TIMEOUT, SEND_TIMEOUT, SupervisorError, run::Ended};
use crate::{
    privsep::{
        channel,
        protocol::{self, FROM_WORKER_MAX, FrameError, FromWorker, ToWorker},
    },
    proxy::ClientCheck,
};

/// One running worker: its channel, and its exit.
pub(super) struct Link {
    pub(super) pid: u32,
    stream: UnixStream,
    pub(super) messages: mpsc::Receiver<Result<FromWorker, SupervisorError>>,
    pub(super) exited: JoinHandle<io::Result<std::process::ExitStatus>>,
    pub(super) reaped: bool,
}

impl Link {
    pub(super) fn new(
        child: std::process::Child,
        stream: std::os::unix::net::UnixStream,
    ) -> io::Result<Self> {
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

    pub(super) async fn next(&mut self) -> Result<FromWorker, SupervisorError> {
        self.messages.recv().await.unwrap_or(Err(SupervisorError::Closed))
    }

    async fn send(
        &mut self,
        message: &ToWorker,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), SupervisorError> {
        let frame = protocol::encode(message);
        match tokio::time::timeout(SEND_TIMEOUT, channel::send(&mut self.stream, &frame, fds)).await
        {
            Ok(sent) => sent.map_err(|e| SupervisorError::Write(Arc::new(e))),
            Err(_) => Err(SupervisorError::SendTimeout(SEND_TIMEOUT)),
        }
    }

    pub(super) async fn ask(
        &mut self,
        message: &ToWorker,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<FromWorker, SupervisorError> {
        self.send(message, fds).await?;
        match tokio::time::timeout(REPLY_TIMEOUT, self.next()).await {
            Ok(answer) => answer,
            Err(_) => Err(SupervisorError::NoAnswer(REPLY_TIMEOUT)),
        }
    }

    pub(super) async fn send_allowlist(
        &mut self,
        generation: u64,
        check: &ClientCheck,
    ) -> Result<(), SupervisorError> {
        let text = tokio::task::block_in_place(|| check.list.render());
        self.send(&ToWorker::Allowlist { generation, text, audit: check.audit }, &[]).await
    }

    /// Kills the worker for `why`, and waits for it.
    pub(super) async fn fail(mut self, why: SupervisorError) -> Ended {
        let pid = self.pid;
        self.kill();
        let status = (&mut self.exited).await;
        self.reaped = true;
        Ended::Failed { why, exit: Some(describe_exit(pid, status)) }
    }

    /// The gate is going away without a drain: the worker goes too.
    pub(super) async fn stop(mut self) -> Ended {
        self.kill();
        let _ = (&mut self.exited).await;
        self.reaped = true;
        Ended::Stopped
    }

    pub(super) async fn drain(&mut self, timeout: Duration) {
        let pid = self.pid;
        let drained = async {
            self.send(&ToWorker::Drain { timeout, detach: false }, &[]).await?;
            match self.next().await? {
                FromWorker::Drained {} => Ok(()),
                other => Err(SupervisorError::Unexpected(format!("{other:?}"))),
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

    /// Hands the worker over (a restart): it stops accepting and finishes
    /// its connections on its own, past the gate's exit. Its pid, once it
    /// says so; it is then no longer killed with this link.
    pub(super) async fn hand_off(&mut self, timeout: Duration) -> Result<u32, SupervisorError> {
        match self.ask(&ToWorker::Drain { timeout, detach: true }, &[]).await? {
            FromWorker::Detached {} => {
                self.reaped = true;
                Ok(self.pid)
            }
            other => Err(SupervisorError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Drains in the background (a worker replaced on reload).
    pub(super) fn retire(mut self, timeout: Duration) {
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
async fn read_frames(
    mut reader: UnixStream,
    messages: mpsc::Sender<Result<FromWorker, SupervisorError>>,
) {
    loop {
        let message = match protocol::read_frame(&mut reader, FROM_WORKER_MAX).await {
            Ok(body) => protocol::decode_from_worker(&body),
            Err(e) => Err(e),
        };
        let last = message.is_err();
        let message = message.map_err(|e| match e {
            FrameError::Closed => SupervisorError::Closed,
            e => SupervisorError::Protocol(crate::status::quoted(&e.to_string())),
        });
        if messages.send(message).await.is_err() || last {
            return;
        }
    }
}

pub(super) fn describe_exit(
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
