//! The listeners' private keys and session-ticket keys stay in the gate, as
//! OpenSSH's host keys stay in its monitor: the worker holds stand-ins
//! (`RemoteKey`, `RemoteTickets`, in `client`) that ask the gate to sign a
//! handshake, to make data keys for new tickets and to unwrap the data key
//! of a presented one (see `tls::tickets` for the ticket format). A worker taken
//! over can use the keys while it runs, within the limits below, but takes
//! none away.
//!
//! Each CPU has its own channel (a `SOCK_SEQPACKET` socketpair, one message
//! per request or reply) and a gate thread that answers it, pinned to that
//! CPU; a worker thread asks on the channel of the CPU it runs on. So
//! handshakes on different cores never wait for each other, and a request
//! and its answer are two context switches on one CPU, without waking
//! another (which, in a VM, costs an interrupt between vCPUs each way). Every request
//! is bounded ([`MAX_MESSAGE`], [`MAX_DATA_KEYS`]) and strictly decoded; a
//! signature is made only over what a TLS handshake signs (see
//! `wire::signable`); each channel answers at most [`MAX_REQUESTS_PER_SECOND`].
//! A worker that breaks any of this is killed (the supervisor starts
//! another). The worker waits for an answer at most [`ANSWER_TIMEOUT`].
//!
//! Layout: `wire` (the requests as framed, and what may be signed), `gate`
//! (the [`KeyStore`] and the threads that answer the channels), `client`
//! (the worker's [`KeyClient`] and its stand-ins); the channels themselves
//! and the handles the worker is told are here.

mod client;
mod gate;
mod wire;

#[cfg(test)]
mod tests;

use std::{io, os::fd::OwnedFd, time::Duration};

use serde::{Deserialize, Serialize};

#[cfg(feature = "test-hooks")]
pub use self::client::sign_anything;
pub use self::{
    client::{KeyClient, KeyError, remote_keys},
    gate::{KeyStore, serve},
};

/// The largest request or reply on a key channel.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The most data keys one request may ask for.
pub const MAX_DATA_KEYS: u8 = 32;
/// How many requests a channel answers per second at most: far above what
/// one core's handshakes need (a full handshake costs well over 100 µs of
/// CPU, and needs one request).
pub const MAX_REQUESTS_PER_SECOND: u32 = 20_000;
/// How long the worker waits for an answer before the handshake fails.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A private key in the gate, as the worker knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyHandle {
    pub id: u32,
    /// rustls's `SignatureAlgorithm`.
    pub algorithm: u8,
    /// The schemes the key signs with, in its order of preference.
    pub schemes: Vec<u16>,
}

/// A listener's ticket keys in the gate, as the worker knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketHandle {
    pub id: u32,
    /// Seconds, as clients are told.
    pub lifetime: u32,
}

/// A listener's keys in the gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerKeyHandles {
    pub server: KeyHandle,
    pub backend: Option<KeyHandle>,
    pub tickets: Option<TicketHandle>,
}

/// `count` key channels: the gate's ends, and the worker's (which time out
/// after [`ANSWER_TIMEOUT`] on both directions).
pub fn channels(count: usize) -> io::Result<(Vec<OwnedFd>, Vec<OwnedFd>)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt};
    let timeout = nix::sys::time::TimeVal::new(
        i64::try_from(ANSWER_TIMEOUT.as_secs()).unwrap_or(i64::MAX),
        0,
    );
    let mut gate = Vec::with_capacity(count);
    let mut worker = Vec::with_capacity(count);
    for _ in 0..count {
        let (gate_end, worker_end) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        setsockopt(&worker_end, sockopt::ReceiveTimeout, &timeout)?;
        setsockopt(&worker_end, sockopt::SendTimeout, &timeout)?;
        // A worker that stops reading cannot hold a gate thread either.
        setsockopt(&gate_end, sockopt::SendTimeout, &timeout)?;
        gate.push(gate_end);
        worker.push(worker_end);
    }
    Ok((gate, worker))
}

/// The CPUs this process may run on, in order: channel `i` belongs to the
/// `i`-th (modulo the number of channels).
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).collect()
}
