//! The worker's sandbox, applied by the worker to itself before it reads a
//! byte from the network:
//!
//! 1. Landlock, first, while the process has one thread (threads started
//!    later inherit it): no file may be opened at all; where the kernel
//!    has network rules (ABI 4, Linux 6.7), no TCP bind and connect only to
//!    the backends' ports; where it has scopes (ABI 6, Linux 6.12), no
//!    signal to, nor abstract socket of, any process outside the worker.
//! 2. seccomp, last, on every thread (TSYNC): anything not listed kills the
//!    process; `socket` only for TCP over IPv4/IPv6; no new threads or
//!    processes; `openat` fails with `EACCES` (a library that looks for a
//!    file gets an error, not a dead worker).
//!
//! Each layer degrades on its own: a kernel without Landlock still gets
//! seccomp, and [`SandboxReport`] says what is in force.

use std::collections::BTreeMap;

use landlock::{
    ABI, Access as _, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr as _,
    RulesetCreatedAttr as _, RulesetStatus, Scope,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::protocol::SandboxReport;

/// The Landlock ABI whose rights the worker asks for; newer kernels enforce
/// all of them, older ones what they know.
const LANDLOCK_TARGET: ABI = ABI::V6;

/// Why the sandbox could not be put in place. The worker exits: it never
/// serves unconfined.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp: {0}")]
    SeccompBackend(#[from] seccompiler::BackendError),
}

/// What Landlock enforces, from [`restrict_paths_and_network`].
pub struct LandlockOutcome {
    abi: u32,
    enforced: bool,
}

/// The kernel's Landlock ABI version, 0 without Landlock.
fn kernel_abi() -> u32 {
    super::sys::landlock_abi_version().unwrap_or(0)
}

/// Step 1: Landlock. Call it while the process has a single thread.
pub fn restrict_paths_and_network(connect_ports: &[u16]) -> Result<LandlockOutcome, SandboxError> {
    let abi = kernel_abi();
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(LANDLOCK_TARGET))?;
    if abi >= 4 {
        ruleset = ruleset.handle_access(AccessNet::from_all(LANDLOCK_TARGET))?;
    }
    if abi >= 6 {
        ruleset = ruleset.scope(Scope::from_all(LANDLOCK_TARGET))?;
    }
    let mut created = ruleset.create()?;
    if abi >= 4 {
        for port in connect_ports {
            created = created.add_rule(NetPort::new(*port, AccessNet::ConnectTcp))?;
        }
    }
    let status = created.restrict_self()?;
    Ok(LandlockOutcome { abi, enforced: status.ruleset != RulesetStatus::NotEnforced })
}

/// Step 2: seccomp, on every thread. Call it once every thread has started.
pub fn confine_syscalls(landlock: &LandlockOutcome) -> Result<SandboxReport, SandboxError> {
    let arch = target_arch();
    // Two filters: the kernel applies the strictest verdict of all, so
    // `openat` gets EACCES even though the second filter allows it.
    let deny_files = SeccompFilter::new(
        file_syscalls().into_iter().map(|n| (n, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )?;
    let allowed = SeccompFilter::new(
        allowed_syscalls()?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    for filter in [deny_files, allowed] {
        let program: BpfProgram = filter.try_into()?;
        seccompiler::apply_filter_all_threads(&program)?;
    }
    let (abi, on) = (landlock.abi, landlock.enforced);
    Ok(SandboxReport {
        landlock_abi: abi,
        file_system_denied: on && abi >= 1,
        network_restricted: on && abi >= 4,
        scoped: on && abi >= 6,
        seccomp: true,
    })
}

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    return TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
}

/// Opening and looking up paths (aws-lc, for one, looks for
/// `/dev/sysgenid`): an error, not a kill.
fn file_syscalls() -> Vec<i64> {
    let at_calls = [
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_readlinkat,
    ];
    // aarch64 has only the `*at` forms.
    #[cfg(target_arch = "x86_64")]
    let legacy_calls = [
        libc::SYS_open,
        libc::SYS_creat,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_readlink,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let legacy_calls: [i64; 0] = [];
    at_calls.into_iter().chain(legacy_calls).collect()
}

/// Every syscall the worker makes once it serves, some only with certain
/// arguments. Found by `strace -f` over the whole test suite; anything else
/// is a bug or an attack, and kills the worker.
fn allowed_syscalls() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let any = |calls: &[i64]| calls.iter().map(|&n| (n, Vec::new())).collect::<Vec<_>>();
    let arg = |index, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = any(&[
        // Memory.
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        // Threads already running, time, randomness (rustls' keys).
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        // sched_getcpu() where glibc has neither vDSO nor rseq for it.
        libc::SYS_getcpu,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // The event loop and sockets it was given or opened.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd2,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_shutdown,
    ])
    .into_iter()
    .collect();
    // Allowed here, refused with EACCES by the first filter.
    rules.extend(any(&file_syscalls()));
    #[cfg(target_arch = "x86_64")]
    rules.extend(any(&[libc::SYS_epoll_wait]));
    // Backend connections: TCP over IPv4 or IPv6, nothing else (no UNIX,
    // netlink, packet or UDP sockets). The type may carry SOCK_NONBLOCK and
    // SOCK_CLOEXEC. The protocol is 0 or TCP: a stream socket of another
    // protocol (MPTCP) would escape what Landlock's TCP rules cover.
    let stream = || {
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xf),
            libc::SOCK_STREAM as u64,
        )
    };
    let mut sockets = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for protocol in [0, libc::IPPROTO_TCP] {
            sockets.push(SeccompRule::new(vec![
                arg(0, family as u64)?,
                stream()?,
                arg(2, protocol as u64)?,
            ])?);
        }
    }
    rules.insert(libc::SYS_socket, sockets);
    // A hand-over drain outlives the gate: the worker lets go of its
    // parent-death signal then, and may change nothing else with prctl.
    rules.insert(
        libc::SYS_prctl,
        vec![SeccompRule::new(vec![arg(0, libc::PR_SET_PDEATHSIG as u64)?, arg(1, 0)?])?],
    );
    // Socket options: only those the worker sets (TCP_NODELAY on both legs)
    // and reads (SO_ERROR, a connect's outcome). No TCP_ULP (kernel TLS or
    // MPTCP upgrades), no SO_BINDTODEVICE, no filters attached.
    rules.insert(
        libc::SYS_setsockopt,
        vec![SeccompRule::new(vec![
            arg(1, libc::IPPROTO_TCP as u64)?,
            arg(2, libc::TCP_NODELAY as u64)?,
        ])?],
    );
    rules.insert(
        libc::SYS_getsockopt,
        vec![SeccompRule::new(vec![
            arg(1, libc::SOL_SOCKET as u64)?,
            arg(2, libc::SO_ERROR as u64)?,
        ])?],
    );
    // Non-blocking mode, the only ioctl.
    rules.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![arg(1, libc::FIONBIO)?])?]);
    // abort(): a signal to itself, to no one else.
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![arg(0, u64::from(std::process::id()))?])?],
    );
    Ok(rules)
}
