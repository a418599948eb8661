//! Test only (`edgegate run --worker-escape`): once sandboxed, the worker
//! tries one forbidden thing and logs the outcome, so that the tests can
//! watch each attempt fail from outside. seccomp kills the worker for most
//! of them (the gate then starts a new one); the others come back refused.

use std::{
    ffi::CString,
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
};

use clap::ValueEnum;

use super::protocol::{FromWorker, Sighting, encode};
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
    let path =
        CString::new(target.path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let gate = target.gate as libc::pid_t;
    let check = |rc: libc::c_long| {
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(format!("returned {rc}")) }
    };
    match attempt {
        Attempt::BpfObjGet => {
            // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
            #[repr(C)]
            struct ObjGet {
                pathname: u64,
                bpf_fd: u32,
                file_flags: u32,
            }
            let attr = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
            // SAFETY: attr outlives the call and has the layout the kernel reads.
            check(unsafe {
                libc::syscall(libc::SYS_bpf, 7 /* BPF_OBJ_GET */, &attr, size_of::<ObjGet>())
            })
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
        Attempt::ExecShell => {
            let shell = c"/bin/sh";
            let argv = [shell.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: null-terminated argument and environment arrays.
            check(unsafe { libc::execve(shell.as_ptr(), argv.as_ptr(), envp.as_ptr()) }.into())
        }
        Attempt::PtraceGate => {
            // SAFETY: plain syscall; the result is checked.
            check(unsafe { libc::ptrace(libc::PTRACE_ATTACH, gate, 0, 0) })
        }
        Attempt::BindPort => std::net::TcpListener::bind("127.0.0.1:0")
            .map(|l| format!("listening on {:?}", l.local_addr())),
        // SAFETY: plain syscall; the result is checked.
        Attempt::KillGate => check(unsafe { libc::kill(gate, libc::SIGKILL) }.into()),
        Attempt::MptcpSocket => {
            const IPPROTO_MPTCP: libc::c_int = 262;
            // SAFETY: plain syscall; the result is checked.
            check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_MPTCP) }.into())
        }
        Attempt::TcpUlp => {
            let ulp = c"tls";
            // SAFETY: plain syscalls on values that outlive them; results are checked.
            check(
                unsafe {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_ULP, ulp.as_ptr().cast(), 4)
                }
                .into(),
            )
        }
        // SAFETY: plain syscall; the result is checked.
        Attempt::Prctl => check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) }.into()),
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

/// `sendto(MSG_FASTOPEN)` on a new TCP socket: the kernel connects as it
/// sends (or, without a cookie, sends a SYN and returns).
fn fast_open(address: SocketAddr) -> io::Result<String> {
    let SocketAddr::V4(v4) = address else {
        return Err(io::Error::other("--escape-address must be IPv4"));
    };
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
        sin_zero: [0; 8],
    };
    let request = b"GET / HTTP/1.0\r\n\r\n";
    // SAFETY: plain system calls on values that outlive them; results are checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sent = libc::sendto(
            fd,
            request.as_ptr().cast(),
            request.len(),
            libc::MSG_FASTOPEN,
            (&raw const sockaddr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let outcome = if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(format!("sent {sent} bytes"))
        };
        libc::close(fd);
        outcome
    }
}
