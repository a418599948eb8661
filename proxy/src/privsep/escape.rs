//! Test only (`edgegate run --worker-escape`): once sandboxed, the worker
//! tries one forbidden thing and logs the outcome, so that the tests can
//! watch each attempt fail from outside. seccomp kills the worker for most
//! of them (the gate then starts a new one); the others come back refused.

use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use clap::ValueEnum;

use super::{
    protocol::{FromWorker, Sighting, encode},
    sys,
};
use proxy_common::map;

use crate::{config::Config, tls::ClientName};

/// Things a compromised worker would want to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Attempt {
    /// `bpf(BPF_OBJ_GET)` on a pinned map: write access to the allowlist maps.
    BpfObjGet,
    /// Open the allowlist file for writing.
    WriteAllowlist,
    /// Read `/etc/shadow`.
    ReadShadow,
    /// Connect to the control socket (a UNIX socket).
    ControlSocket,
    /// `execve("/bin/sh")`.
    ExecShell,
    /// `ptrace(PTRACE_ATTACH)` on the gate.
    PtraceGate,
    /// Listen on a new port.
    BindPort,
    /// `kill(SIGKILL)` the gate.
    KillGate,
    /// A stream socket of another protocol (MPTCP), which Landlock's TCP
    /// rules do not cover.
    MptcpSocket,
    /// `setsockopt(TCP_ULP)`: a kernel upper-layer protocol on a socket.
    TcpUlp,
    /// `prctl(PR_SET_DUMPABLE, 1)`: only `prctl(PR_SET_PDEATHSIG, 0)` passes.
    Prctl,
    /// A TCP connection to `--escape-address` (anything but a backend).
    Connect,
    /// The same over an IPv6 socket, to the address's IPv4-mapped form.
    ConnectMapped,
    /// A TCP Fast Open `sendto`: a connection without `connect()`.
    FastOpen,
    /// Add invented sightings to every report: an identity no rule allows
    /// from `--escape-address`'s address, an allowed one from an address
    /// no packet came from, one for a listener that does not exist.
    ForgeSightings,
    /// Ask the gate to sign something no TLS handshake signs, with the
    /// listener's key: a signing oracle.
    SignAnything,
    /// Send the gate a frame bigger than it accepts.
    OversizedMessage,
    /// Send the gate a message type it does not know.
    UnknownMessage,
    /// Send the gate half a frame, then close.
    TruncatedMessage,
}

/// What an attempt aims at: a path, the gate's pid, or an address.
pub struct Target {
    pub path: PathBuf,
    pub gate: u32,
    pub address: Option<SocketAddr>,
}

impl Target {
    /// What `attempt` aims at when this gate starts it: the pinned maps,
    /// the list's file and the control socket for the attempts on those,
    /// `/etc/shadow` for the others; no address.
    pub fn on_this_host(attempt: Attempt, config: &Config, list_path: &Path) -> Self {
        let path = match attempt {
            Attempt::BpfObjGet => config.daemon.bpffs_dir.join("maps").join(map::V4_RULES),
            Attempt::WriteAllowlist => list_path.to_owned(),
            Attempt::ControlSocket => config.daemon.control_socket.clone(),
            _ => PathBuf::from("/etc/shadow"),
        };
        Self { path, gate: std::process::id(), address: None }
    }
}

/// The frames a protocol attempt sends instead of a real message; `None`
/// for the other attempts.
pub fn bad_frame(attempt: Attempt) -> Option<Vec<u8>> {
    match attempt {
        Attempt::OversizedMessage => {
            let mut frame = (super::protocol::FROM_WORKER_MAX as u32 + 1).to_be_bytes().to_vec();
            frame.extend(std::iter::repeat_n(b' ', 4096));
            Some(frame)
        }
        Attempt::UnknownMessage => {
            let body = br#"{"type":"allow","cidr":"0.0.0.0/0"}"#;
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(body);
            Some(frame)
        }
        Attempt::TruncatedMessage => {
            let frame = encode(&FromWorker::Drained {});
            Some(frame[..frame.len() - 2].to_vec())
        }
        _ => None,
    }
}

/// Makes a system-level attempt; returns only if it was refused (or, which
/// the tests treat as a failure, if it succeeded).
pub fn attempt(attempt: Attempt, target: &Target) -> io::Result<String> {
    let gate = target.gate as libc::pid_t;
    let returned = |value: i64| format!("returned {value}");
    match attempt {
        // The very call the gate makes to open a pin.
        Attempt::BpfObjGet => {
            crate::filter::sys::open_pinned(&target.path).map(|fd| returned(fd.as_raw_fd().into()))
        }
        Attempt::WriteAllowlist => {
            std::fs::OpenOptions::new().append(true).open(&target.path)?;
            Ok("opened for writing".into())
        }
        Attempt::ReadShadow => {
            std::fs::read("/etc/shadow").map(|b| format!("read {} bytes", b.len()))
        }
        Attempt::ControlSocket => {
            std::os::unix::net::UnixStream::connect(&target.path)?;
            Ok("connected".into())
        }
        Attempt::ExecShell => Err(sys::exec_shell()),
        Attempt::PtraceGate => sys::ptrace_attach(gate).map(|()| returned(0)),
        Attempt::BindPort => std::net::TcpListener::bind("127.0.0.1:0")
            .map(|l| format!("listening on {:?}", l.local_addr())),
        Attempt::KillGate => sys::kill_process(gate).map(|()| returned(0)),
        Attempt::MptcpSocket => sys::mptcp_socket().map(|fd| returned(fd.as_raw_fd().into())),
        Attempt::TcpUlp => sys::set_tcp_ulp_tls().map(|()| returned(0)),
        Attempt::Prctl => sys::set_dumpable(true).map(|()| returned(0)),
        Attempt::Connect => {
            TcpStream::connect(destination(target)?).map(|s| format!("connected: {s:?}"))
        }
        Attempt::ConnectMapped => {
            let address = destination(target)?;
            let IpAddr::V4(v4) = address.ip() else {
                return Err(io::Error::other("--escape-address must be IPv4 to be mapped"));
            };
            TcpStream::connect((v4.to_ipv6_mapped(), address.port()))
                .map(|s| format!("connected: {s:?}"))
        }
        Attempt::FastOpen => fast_open(destination(target)?),
        Attempt::OversizedMessage
        | Attempt::UnknownMessage
        | Attempt::TruncatedMessage
        | Attempt::ForgeSightings
        | Attempt::SignAnything => {
            Err(io::Error::other("a protocol attempt, made by the worker's loop"))
        }
    }
}

/// The sightings [`Attempt::ForgeSightings`] adds to a report for the
/// worker's `listeners`.
pub fn forged_sightings(target: &Target, listeners: &[String]) -> Vec<Sighting> {
    let seen = target.address.map_or(IpAddr::from([192, 0, 2, 1]), |a| a.ip());
    let unseen = IpAddr::from([203, 0, 113, 99]);
    let name = |cn: &str| ClientName { common_name: Some(cn.into()), ..ClientName::default() };
    let sighting = |listener: &str, address, cn| Sighting {
        listener: listener.to_owned(),
        address,
        name: name(cn),
        connections: 1,
        first_seen: 1,
        last_seen: 1,
    };
    let mut forged: Vec<Sighting> = listeners
        .iter()
        .flat_map(|listener| {
            [sighting(listener, seen, "intruder"), sighting(listener, unseen, "partner")]
        })
        .collect();
    forged.push(sighting("no-such-listener", seen, "partner"));
    forged
}

fn destination(target: &Target) -> io::Result<SocketAddr> {
    target.address.ok_or_else(|| io::Error::other("no --escape-address"))
}

/// A TCP Fast Open request to `address` (see [`sys::send_fast_open`]).
fn fast_open(address: SocketAddr) -> io::Result<String> {
    let SocketAddr::V4(v4) = address else {
        return Err(io::Error::other("--escape-address must be IPv4"));
    };
    sys::send_fast_open(v4, b"GET / HTTP/1.0\r\n\r\n").map(|sent| format!("sent {sent} bytes"))
}
