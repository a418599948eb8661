//! Frames over the socketpair, with listening sockets passed as
//! `SCM_RIGHTS` (gate → worker only: the gate reads the worker's frames
//! with plain reads, which drop any descriptor a hostile worker attaches).

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::{
    io::{AsyncWriteExt as _, Interest},
    net::UnixStream,
};

use super::{
    protocol::{FrameError, TO_WORKER_MAX},
    sys,
};

/// At most this many descriptors travel with one frame (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Writes `frame` with `fds` attached to its first byte.
pub async fn send(stream: &mut UnixStream, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.is_empty() {
        return stream.write_all(frame).await;
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "{} sockets in one frame (at most {MAX_FDS})",
            fds.len()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            let control = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(frame)],
                &control,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        })
        .await?;
    stream.write_all(&frame[sent..]).await
}

/// The worker's end: frames from the gate, and the sockets that came with them.
pub struct Receiver {
    stream: UnixStream,
    buffer: Vec<u8>,
    /// What one `recvmsg` reads into, allocated once.
    chunk: Box<[u8]>,
    fds: VecDeque<OwnedFd>,
}

/// How much one `recvmsg` may read.
const CHUNK: usize = 256 << 10;

impl Receiver {
    pub fn new(stream: UnixStream) -> Self {
        Self { stream, buffer: Vec::new(), chunk: vec![0; CHUNK].into(), fds: VecDeque::new() }
    }

    /// The next frame's body. Descriptors that arrived with it (or before)
    /// are then available from [`Receiver::take_fds`].
    pub async fn next(&mut self) -> Result<Vec<u8>, FrameError> {
        loop {
            if self.buffer.len() >= 4 {
                let len =
                    u32::from_be_bytes(self.buffer[..4].try_into().expect("4 bytes")) as usize;
                if len > TO_WORKER_MAX {
                    return Err(FrameError::Oversized { len, max: TO_WORKER_MAX });
                }
                if self.buffer.len() >= 4 + len {
                    let body = self.buffer[4..4 + len].to_vec();
                    self.buffer.drain(..4 + len);
                    return Ok(body);
                }
            }
            let read = self.read().await.map_err(FrameError::Io)?;
            if read == 0 {
                return Err(if self.buffer.is_empty() {
                    FrameError::Closed
                } else {
                    FrameError::Truncated
                });
            }
            self.buffer.extend_from_slice(&self.chunk[..read]);
        }
    }

    /// The `count` descriptors that came first, or an error if fewer came.
    pub fn take_fds(&mut self, count: usize) -> io::Result<Vec<OwnedFd>> {
        if self.fds.len() < count {
            return Err(io::Error::other(format!(
                "a frame announced {count} socket(s), {} arrived",
                self.fds.len()
            )));
        }
        Ok(self.fds.drain(..count).collect())
    }

    /// The write half: the worker's frames to the gate.
    pub fn stream_mut(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// One `recvmsg` into `chunk`; the descriptors it brings are queued.
    async fn read(&mut self) -> io::Result<usize> {
        loop {
            self.stream.readable().await?;
            let received = self.stream.try_io(Interest::READABLE, || {
                sys::recv_with_fds(self.stream.as_fd(), &mut self.chunk)
            });
            match received {
                Ok((bytes, fds)) => {
                    self.fds.extend(fds);
                    return Ok(bytes);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
