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

use super::sys::{self, CredentialDrop};
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
    // Copies the child keeps open across exec (see `sys::CredentialDrop::apply`).
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
    let credentials = credential_drop(launch.account, worker_end, kept, cgroup.map(OwnedFd::from))?;
    sys::drop_credentials_before_exec(&mut command, credentials);
    let child = command.spawn()?;
    Ok((child, gate_end))
}

/// What the child does between fork and exec (`sys::CredentialDrop`),
/// prepared here: there it may not allocate.
fn credential_drop(
    account: &Account,
    channel: UnixStream,
    key_channels: Vec<OwnedFd>,
    cgroup: Option<OwnedFd>,
) -> io::Result<CredentialDrop> {
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
    Ok(CredentialDrop {
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
