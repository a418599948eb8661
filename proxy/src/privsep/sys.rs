//! Every raw system call of privilege separation, each behind a safe
//! wrapper that says why it is sound: the worker's confinement rests on
//! these calls (the credential drop between fork and exec, the worker's
//! start-up, its channels), so they are audited in one file, and the rest
//! of `privsep` holds no `unsafe`. The escape attempts' calls (test hooks
//! only) are here too, except `bpf(BPF_OBJ_GET)`: that attempt makes the
//! filter's own call, `filter::sys::open_pinned`.
//!
//! Errors name the call (`recv: Resource temporarily unavailable`) and keep
//! the kind of the OS error. Those of [`CredentialDrop`] stay bare OS
//! errors: the child may not allocate, and std hands the parent nothing
//! but the errno anyway.

use std::{
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    process::Command,
};

use nix::sys::signal::{SigHandler, Signal};

/// `error`, prefixed with the call that failed; of the same kind.
fn named(call: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{call}: {error}"))
}

/// The last OS error, prefixed with the call that failed.
fn last_error(call: &str) -> io::Error {
    named(call, io::Error::last_os_error())
}

/// `result` of `call` (a system call returning -1 on error) as a result.
fn check(call: &str, result: libc::c_long) -> io::Result<libc::c_long> {
    if result < 0 { Err(last_error(call)) } else { Ok(result) }
}

/// As [`check`], with a bare OS error: allocation-free, for the child
/// between fork and exec.
fn check_in_child(result: libc::c_long) -> io::Result<()> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

// ---------------------------------------------------------------------------
// The credential drop: in the worker's process, between fork and exec.

/// What the worker's process does between fork and exec (see
/// [`CredentialDrop::apply`]), with everything prepared by the gate
/// beforehand (`spawn`): there it may not allocate.
pub(super) struct CredentialDrop {
    /// The worker's end of the socketpair: open across exec.
    pub(super) channel: OwnedFd,
    /// The key channels' worker ends: open across exec too.
    pub(super) key_channels: Vec<OwnedFd>,
    /// `cgroup.procs` of the workers' cgroup, if any.
    pub(super) cgroup: Option<OwnedFd>,
    pub(super) uid: libc::uid_t,
    pub(super) gid: libc::gid_t,
    /// The highest capability this kernel has.
    pub(super) last_cap: libc::c_int,
    /// The gate, which the worker dies with.
    pub(super) parent: libc::pid_t,
    /// The highest descriptor open before the fork (see
    /// [`mark_close_on_exec_above_stdio`]).
    pub(super) highest_fd: libc::c_int,
}

/// Has `command`'s process apply `credentials` between fork and exec.
pub(super) fn drop_credentials_before_exec(command: &mut Command, credentials: CredentialDrop) {
    // SAFETY: `CredentialDrop::apply` only makes async-signal-safe system
    // calls on values prepared before the fork: it allocates nothing and
    // takes no lock.
    unsafe { command.pre_exec(move || credentials.apply()) };
}

impl CredentialDrop {
    /// Into the workers' cgroup (while still root), every descriptor but
    /// stdio and the channels closed at exec, every capability out of every
    /// set, then the account's ids, `no_new_privs`, and death with the gate.
    fn apply(&self) -> io::Result<()> {
        if let Some(procs) = &self.cgroup {
            join_cgroup(procs)?;
        }
        // Close-on-exec for all (std's own exec-error pipe is already), and
        // then not for the channels.
        mark_close_on_exec_above_stdio(self.highest_fd)?;
        keep_open_across_exec(&self.channel)?;
        for channel in &self.key_channels {
            keep_open_across_exec(channel)?;
        }
        for cap in 0..=self.last_cap {
            drop_bounding_capability(cap)?;
        }
        clear_ambient_capabilities()?;
        clear_supplementary_groups()?;
        set_all_gids(self.gid)?;
        // Leaving uid 0 without keepcaps empties the permitted and effective
        // sets; the inheritable one is cleared next.
        set_all_uids(self.uid)?;
        clear_capability_sets()?;
        set_no_new_privs()?;
        // Set after the change of ids, which clears it.
        die_with_parent(self.parent)
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`.
fn join_cgroup(procs: &OwnedFd) -> io::Result<()> {
    // SAFETY: writes one byte from a static string to an open descriptor.
    // "0" moves the writer itself.
    if unsafe { libc::write(procs.as_raw_fd(), c"0".as_ptr().cast(), 1) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `close_range(2)`: mark instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Marks every descriptor from 3 up close-on-exec.
fn mark_close_on_exec_above_stdio(highest_fd: libc::c_int) -> io::Result<()> {
    // SAFETY: integer arguments only; it marks descriptors, closes none.
    let marked = unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC)
    };
    if marked >= 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if !matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(error);
    }
    // Kernels before 5.11 lack the flag: mark one by one. Rust and tokio
    // open every descriptor close-on-exec, so only those the daemon
    // inherited may lack it, and they are all below the highest open
    // before the fork. Not open: EBADF.
    for fd in 3..=highest_fd {
        // SAFETY: integer arguments only; sets a flag of a descriptor, if open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Clears close-on-exec on `fd`: the new program gets it.
fn keep_open_across_exec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: integer arguments only, on a descriptor `fd` keeps open.
    check_in_child(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) }.into())
}

/// `PR_CAPBSET_DROP`: `cap` can never be gained again, not even by exec.
fn drop_bounding_capability(cap: libc::c_int) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check_in_child(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) }.into())
}

fn clear_ambient_capabilities() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let result =
        unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    check_in_child(result.into())
}

fn clear_supplementary_groups() -> io::Result<()> {
    // SAFETY: an empty list: the kernel reads nothing through the pointer.
    check_in_child(unsafe { libc::setgroups(0, std::ptr::null()) }.into())
}

/// The real, effective and saved group id.
fn set_all_gids(gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check_in_child(unsafe { libc::setresgid(gid, gid, gid) }.into())
}

/// The real, effective and saved user id.
fn set_all_uids(uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check_in_child(unsafe { libc::setresuid(uid, uid, uid) }.into())
}

/// `struct __user_cap_header_struct`, version 3.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: two of them for 64 capabilities.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `capset`: empties the effective, permitted and inheritable sets.
fn clear_capability_sets() -> io::Result<()> {
    let header = CapHeader { version: 0x2008_0522, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: a version 3 header and the two data structs it makes the
    // kernel read, both alive across the call.
    let result = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
    check_in_child(result)
}

fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check_in_child(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
}

/// `PR_SET_PDEATHSIG`: SIGKILL once `parent` dies; if it has died already
/// (the signal would never come), exits at once.
fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check_in_child(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }.into())?;
    if nix::unistd::getppid().as_raw() != parent {
        // SAFETY: ends the process without running any of its code (no
        // exit handlers, no flush), as a forked child must.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The worker's start-up.

/// `PR_SET_DUMPABLE`: whether other processes of this user may ptrace this
/// one or read its memory, and whether it leaves a core file.
pub(super) fn set_dumpable(dumpable: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let result =
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, libc::c_ulong::from(dumpable), 0, 0, 0) };
    check("prctl(PR_SET_DUMPABLE)", result.into()).map(drop)
}

/// The process ignores `signal` from now on.
pub(super) fn ignore_signal(signal: Signal) -> io::Result<()> {
    // SAFETY: ignoring a signal installs no handler.
    unsafe { nix::sys::signal::signal(signal, SigHandler::SigIgn) }
        .map(drop)
        .map_err(|e| named(&format!("sigaction({signal}, SIG_IGN)"), e.into()))
}

/// `PR_SET_PDEATHSIG` 0: the process outlives its parent.
pub(super) fn clear_parent_death_signal() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(
        "prctl(PR_SET_PDEATHSIG)",
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) }.into(),
    )
    .map(drop)
}

/// Takes ownership of `fd`, a descriptor this process inherited across
/// exec (the worker's `--channel-fd` and `--key-fd`), once it has checked
/// that it is one: open, not stdin, stdout or stderr, and not close-on-exec.
/// Nothing in the process can own such a descriptor already: every one
/// opened since exec is close-on-exec (Rust, tokio and Landlock open them
/// so), and before exec `CredentialDrop` marked all but the channels. Marks
/// it close-on-exec, so that a second adoption of the same number fails
/// instead of making a second owner. Call it while the process has one
/// thread.
pub(super) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if (0..=libc::STDERR_FILENO).contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is stdin, stdout or stderr, not one handed over"),
        ));
    }
    // SAFETY: integer arguments only; reads the flags of a descriptor, or
    // fails with EBADF if it is not open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(last_error(&format!("fcntl(F_GETFD) of inherited descriptor {fd}")));
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io::Error::other(format!(
            "descriptor {fd} is close-on-exec: not inherited, or taken already"
        )));
    }
    // SAFETY: integer arguments only, on the open descriptor above.
    let marked = unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    check("fcntl(F_SETFD)", marked.into())?;
    // SAFETY: open and inherited across exec, not taken before (see the
    // function's comment): nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The kernel's Landlock ABI version (`LANDLOCK_CREATE_RULESET_VERSION`);
/// an error where Landlock is absent or disabled.
pub(super) fn landlock_abi_version() -> io::Result<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with this flag the call takes no ruleset (null, size 0) and
    // returns the version.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    let version = check("landlock_create_ruleset(VERSION)", version)?;
    u32::try_from(version).map_err(io::Error::other)
}

// ---------------------------------------------------------------------------
// The channels between gate and worker.

/// One `recvmsg` from `socket` into `buffer`: the bytes read, and the
/// descriptors (at most `channel::MAX_FDS`) that came with them, close-on-exec.
pub(super) fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut control = nix::cmsg_space!([RawFd; super::channel::MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buffer)];
    let message =
        recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| named("recvmsg", e.into()))?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs().map_err(|e| named("recvmsg", e.into()))? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this
            // process for this call; nothing else owns them.
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok((message.bytes, fds))
}

/// One message (a key channel's: `SOCK_SEQPACKET`) on `socket`; no SIGPIPE
/// if the peer is gone.
pub(super) fn send_message(socket: BorrowedFd<'_>, message: &[u8]) -> io::Result<usize> {
    // SAFETY: `message` is readable for its length; the descriptor is open.
    let sent = unsafe {
        libc::send(socket.as_raw_fd(), message.as_ptr().cast(), message.len(), libc::MSG_NOSIGNAL)
    };
    check("send", sent as libc::c_long).map(|sent| sent as usize)
}

/// One message from `socket` into `buffer`: its length (0: the peer closed).
pub(super) fn recv_message(socket: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is writable for its length; the descriptor is open.
    let received =
        unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    check("recv", received as libc::c_long).map(|received| received as usize)
}

/// The CPU the calling thread runs on.
pub(super) fn current_cpu() -> io::Result<usize> {
    // SAFETY: no arguments; glibc answers from the vDSO or rseq.
    let cpu = unsafe { libc::sched_getcpu() };
    check("sched_getcpu", cpu.into()).map(|cpu| cpu as usize)
}

// ---------------------------------------------------------------------------
// Test only: the escape attempts' calls (`escape`), which the sandbox must
// refuse or punish.

/// `execve("/bin/sh")` with no environment; returns only if refused.
#[cfg(feature = "test-hooks")]
pub(super) fn exec_shell() -> io::Error {
    let shell = c"/bin/sh";
    let argv = [shell.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: a NUL-terminated path and null-terminated argument and
    // environment arrays, alive across the call.
    unsafe { libc::execve(shell.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    last_error("execve")
}

/// `ptrace(PTRACE_ATTACH)` on `pid`.
#[cfg(feature = "test-hooks")]
pub(super) fn ptrace_attach(pid: libc::pid_t) -> io::Result<()> {
    // SAFETY: integer arguments only; PTRACE_ATTACH reads no address.
    check("ptrace(PTRACE_ATTACH)", unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) })
        .map(drop)
}

/// `kill(SIGKILL)` of `pid`.
#[cfg(feature = "test-hooks")]
pub(super) fn kill_process(pid: libc::pid_t) -> io::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)
        .map_err(|e| named("kill", e.into()))
}

/// A stream socket of IPv4 MPTCP (`IPPROTO_MPTCP`).
#[cfg(feature = "test-hooks")]
pub(super) fn mptcp_socket() -> io::Result<OwnedFd> {
    const IPPROTO_MPTCP: libc::c_int = 262;
    // SAFETY: integer arguments only.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_MPTCP) };
    check("socket(IPPROTO_MPTCP)", fd.into())?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new TCP socket (IPv4), not close-on-exec, as the escape attempts open
/// it.
#[cfg(feature = "test-hooks")]
fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    check("socket", fd.into())?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt(TCP_ULP, "tls")` on a new TCP socket: a kernel upper-layer
/// protocol.
#[cfg(feature = "test-hooks")]
pub(super) fn set_tcp_ulp_tls() -> io::Result<()> {
    let socket = tcp_socket()?;
    let ulp = c"tls";
    // SAFETY: the option value is readable for the length given (with its
    // NUL); the descriptor is open.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.to_bytes_with_nul().len() as libc::socklen_t,
        )
    };
    check("setsockopt(TCP_ULP)", result.into()).map(drop)
}

/// `sendto(MSG_FASTOPEN)` of `data` to `address` on a new TCP socket: the
/// kernel connects as it sends (or, without a cookie, sends a SYN and
/// returns). The bytes sent.
#[cfg(feature = "test-hooks")]
pub(super) fn send_fast_open(address: std::net::SocketAddrV4, data: &[u8]) -> io::Result<usize> {
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(address.ip().octets()) },
        sin_zero: [0; 8],
    };
    let socket = tcp_socket()?;
    // SAFETY: `data` is readable for its length, `sockaddr` is a
    // `sockaddr_in` of the size given; both outlive the call, and the
    // descriptor is open.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_FASTOPEN,
            (&raw const sockaddr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    check("sendto(MSG_FASTOPEN)", sent as libc::c_long).map(|sent| sent as usize)
}
