//! Starting a worker: fork and exec of this very binary (`/proc/self/exe`,
//! which stays the running version through a package upgrade) as
//! `edgegate worker`, with credentials dropped between the two. The child
//! keeps only stdin (`/dev/null`), stdout and stderr (the log stream), its
//! end of the socketpair (`--channel-fd`; listening sockets follow over it)
//! and its ends of the key channels (`--key-fd`, see `keys`).

use std::{
    io,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{net::UnixStream, process::CommandExt as _},
    },
    process::{Child, Command, Stdio},
};

use crate::config::LogFormat;

use nix::unistd::{Gid, Uid};

#[cfg(feature = "test-hooks")]
use super::escape::{Attempt, Target};

/// Who the worker runs as.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// What the worker's command line says.
pub struct Launch<'a> {
    pub account: &'a Account,
    pub log_format: LogFormat,
    /// The writing end of the pipe the gate relays the worker's log from
    /// (`daemon::worker_log`): its stdout and stderr.
    pub log: OwnedFd,
    /// `cgroup.procs` of the cgroup the worker joins before exec.
    pub cgroup: Option<&'a std::fs::File>,
    /// The worker's ends of its key channels (`keys`).
    pub key_channels: &'a [OwnedFd],
    pub connect_ports: &'a [u16],
    #[cfg(feature = "test-hooks")]
    pub escape: Option<(Attempt, &'a Target)>,
}

/// Starts a worker; returns it and the gate's end of the socketpair.
pub fn spawn(launch: &Launch<'_>) -> io::Result<(Child, UnixStream)> {
    let (gate_end, worker_end) = UnixStream::pair()?;
    let mut command = Command::new("/proc/self/exe");
    command.arg0("edgegate").arg("worker").args(["--log-format", launch.log_format.name()]);
    command.args(["--channel-fd", &worker_end.as_raw_fd().to_string()]);
    // Copies the child keeps open across exec (see `Drop::apply`).
    let kept: Vec<OwnedFd> =
        launch.key_channels.iter().map(OwnedFd::try_clone).collect::<io::Result<_>>()?;
    for channel in &kept {
        command.args(["--key-fd", &channel.as_raw_fd().to_string()]);
    }
    for port in launch.connect_ports {
        command.args(["--connect-port", &port.to_string()]);
    }
    #[cfg(feature = "test-hooks")]
    if let Some((attempt, target)) = launch.escape {
        let name = clap::ValueEnum::to_possible_value(&attempt).expect("attempts have names");
        command.args(["--escape", name.get_name()]).arg("--escape-target").arg(&target.path);
        command.args(["--escape-gate", &target.gate.to_string()]);
        if let Some(address) = target.address {
            command.args(["--escape-address", &address.to_string()]);
        }
    }
    command.env_clear().stdin(Stdio::null());
    command.stdout(launch.log.try_clone()?).stderr(launch.log.try_clone()?);
    if let Ok(filter) = std::env::var("EDGEGATE_LOG") {
        command.env("EDGEGATE_LOG", filter);
    }
    let cgroup = launch.cgroup.map(std::fs::File::try_clone).transpose()?;
    let drop = Drop::new(launch.account, worker_end, kept, cgroup.map(OwnedFd::from))?;
    // SAFETY: `Drop::apply` makes only async-signal-safe system calls.
    unsafe { command.pre_exec(move || drop.apply()) };
    let child = command.spawn()?;
    Ok((child, gate_end))
}

/// What the child does between fork and exec, with everything prepared
/// beforehand: it may not allocate.
struct Drop {
    channel: OwnedFd,
    /// The key channels' worker ends: open across exec too.
    key_channels: Vec<OwnedFd>,
    /// `cgroup.procs` of the workers' cgroup, if any.
    cgroup: Option<OwnedFd>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    last_cap: libc::c_int,
    parent: libc::pid_t,
    /// The highest descriptor open before the fork (see `apply`).
    highest_fd: libc::c_int,
}

impl Drop {
    fn new(
        account: &Account,
        channel: UnixStream,
        key_channels: Vec<OwnedFd>,
        cgroup: Option<OwnedFd>,
    ) -> io::Result<Self> {
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
            .trim()
            .parse()
            .map_err(io::Error::other)?;
        if account.uid.is_root() {
            return Err(io::Error::other("the worker may not run as root"));
        }
        let highest_fd = std::fs::read_dir("/proc/self/fd")?
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .max()
            .unwrap_or(libc::STDERR_FILENO);
        Ok(Self {
            channel: channel.into(),
            key_channels,
            cgroup,
            uid: account.uid.as_raw(),
            gid: account.gid.as_raw(),
            last_cap,
            parent: std::process::id() as libc::pid_t,
            highest_fd,
        })
    }

    /// In the child: into the workers' cgroup (while still root), every
    /// descriptor but stdio and the socketpair closed at exec, every
    /// capability out of every set, then the account's ids, `no_new_privs`,
    /// and death with the gate.
    fn apply(&self) -> io::Result<()> {
        let ok = |rc: libc::c_int| if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
        // SAFETY (all below): plain system calls on values owned by `self`.
        unsafe {
            if let Some(procs) = &self.cgroup {
                // "0" moves the writer itself.
                if libc::write(procs.as_raw_fd(), c"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Close-on-exec for all (std's own exec-error pipe is already),
            // and then not for the socketpair.
            let marked =
                libc::syscall(libc::SYS_close_range, 3u32, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC);
            if marked < 0 {
                let errno = *libc::__errno_location();
                if errno != libc::EINVAL && errno != libc::ENOSYS {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                // Kernels before 5.11 lack the flag: mark one by one. Rust
                // and tokio open every descriptor close-on-exec, so only
                // those the daemon inherited may lack it, and they are all
                // below the highest open before the fork. Not open: EBADF.
                for fd in 3..=self.highest_fd {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            ok(libc::fcntl(self.channel.as_raw_fd(), libc::F_SETFD, 0))?;
            for channel in &self.key_channels {
                ok(libc::fcntl(channel.as_raw_fd(), libc::F_SETFD, 0))?;
            }
            for cap in 0..=self.last_cap {
                ok(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0))?;
            }
            ok(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))?;
            ok(libc::setgroups(0, std::ptr::null()))?;
            ok(libc::setresgid(self.gid, self.gid, self.gid))?;
            // Leaving uid 0 without keepcaps empties the permitted and
            // effective sets; the inheritable one is cleared below.
            ok(libc::setresuid(self.uid, self.uid, self.uid))?;
            let header = CapHeader { version: 0x2008_0522, pid: 0 };
            let data = [CapData::default(); 2];
            ok(libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int)?;
            ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            // Set after the change of ids, which clears it.
            ok(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            if libc::getppid() != self.parent {
                libc::_exit(1);
            }
        }
        Ok(())
    }
}

/// `close_range(2)`: mark instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

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
