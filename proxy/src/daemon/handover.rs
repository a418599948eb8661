//! Restarts and upgrades that refuse no connection. Under systemd the gate
//! keeps its listening sockets in the service's file-descriptor store
//! (`FileDescriptorStoreMax=`), so they stay open while no gate runs and
//! come back to the next one (`LISTEN_FDS`): a client's SYN waits in the
//! socket's queue for that moment instead of being refused. On SIGTERM the
//! gate hands its worker over: the worker stops accepting and finishes its
//! open connections on its own, and the gate exits at once, so that the
//! next one starts without waiting for the drain. The next gate kills any
//! such worker still there at its drain deadline (whatever the worker
//! does), so a hand-over never outlives `drain_timeout`.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The name a listener's socket has in the store (`FDNAME`, which may not
/// hold `:`).
fn fd_name(bind: SocketAddr) -> String {
    format!("edgegate-listener-{}", bind.to_string().replace(':', "_"))
}

/// The sockets the service manager passed to this process.
#[derive(Default)]
pub struct Inherited(BTreeMap<String, OwnedFd>);

impl Inherited {
    /// Takes what systemd passed (`LISTEN_FDS`, for this process only) and
    /// clears the variables, so that no child sees them. Call it before any
    /// thread starts.
    pub fn take() -> Self {
        let passed = match sd_notify::listen_fds_with_names() {
            Ok(passed) => passed,
            Err(e) => {
                tracing::warn!("the sockets systemd passed are unreadable: {e}; binding anew");
                return Self::default();
            }
        };
        // SAFETY: the fds are this process's, passed for it alone, and
        // nothing else owns them; the environment changes while the
        // process has one thread (see above).
        let sockets = passed.map(|(fd, name)| (name, unsafe { OwnedFd::from_raw_fd(fd) }));
        let inherited = Self(sockets.collect());
        for variable in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: single-threaded, see above.
            unsafe { std::env::remove_var(variable) };
        }
        inherited
    }

    /// The listening socket kept for `bind`, if one was passed and it is
    /// one: a TCP socket listening on exactly that address.
    pub fn listener(&mut self, bind: SocketAddr) -> Option<TcpListener> {
        let fd = self.0.remove(&fd_name(bind))?;
        use nix::sys::socket::{SockType, getsockopt, sockopt};
        let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
            && getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
        let listener = TcpListener::from(fd);
        if listening && listener.local_addr().is_ok_and(|local| local == bind) {
            tracing::info!("{bind}: listening socket taken over from the previous gate");
            return Some(listener);
        }
        tracing::warn!("{bind}: the socket passed for it is not listening there; binding anew");
        None
    }

    /// The log pipes of workers an earlier gate handed over, by pid
    /// (`worker_log`): taken out of the store, for this gate to relay.
    pub fn worker_logs(&mut self) -> Vec<(u32, OwnedFd)> {
        let names: Vec<String> = self
            .0
            .keys()
            .filter(|name| name.starts_with(super::worker_log::FD_NAME_PREFIX))
            .cloned()
            .collect();
        let mut logs = Vec::new();
        for name in names {
            let Some(fd) = self.0.remove(&name) else { continue };
            forget(&name);
            let pid =
                name.strip_prefix(super::worker_log::FD_NAME_PREFIX).and_then(|p| p.parse().ok());
            if let Some(pid) = pid {
                logs.push((pid, fd));
            }
        }
        logs
    }

    /// Names passed but not taken (listeners that are gone): removed from the store.
    pub fn forget_rest(self) {
        for name in self.0.keys() {
            forget(name);
        }
    }
}

/// Removes `name` from systemd's store.
fn forget(name: &str) {
    let states = [sd_notify::NotifyState::FdStoreRemove, sd_notify::NotifyState::FdName(name)];
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!("cannot drop {name} from systemd's store: {e}");
    }
}

/// Puts each listening socket in systemd's store. Returns whether the store
/// took them all: only then can SIGTERM hand over instead of draining.
pub fn store<'a>(listeners: impl IntoIterator<Item = (SocketAddr, &'a TcpListener)>) -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    let mut stored = true;
    for (bind, socket) in listeners {
        let name = fd_name(bind);
        let states = [sd_notify::NotifyState::FdStore, sd_notify::NotifyState::FdName(&name)];
        if let Err(e) = sd_notify::notify_with_fds(&states, &[socket.as_fd()]) {
            tracing::warn!(
                "{bind}: cannot keep the socket in systemd's store ({e}): a restart drains \
                 instead of handing over (FileDescriptorStoreMax= in the unit?)"
            );
            stored = false;
        }
    }
    stored
}

/// A handed-over worker: its process, and when it must be gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Draining {
    pid: u32,
    /// `/proc/<pid>/stat`'s start time: a reused pid is not that worker.
    start_time: String,
    deadline_ms: u64,
}

const DRAINING_FILE: &str = "draining-workers";

fn draining_path(state_dir: &Path) -> PathBuf {
    state_dir.join(DRAINING_FILE)
}

/// At most a few entries (one per restart within drain_timeout); the file
/// is read only up to this size.
const MAX_DRAINING_BYTES: u64 = 64 * 1024;

fn read_draining(state_dir: &Path) -> Vec<Draining> {
    let Ok(text) = crate::files::read_bounded(&draining_path(state_dir), MAX_DRAINING_BYTES) else {
        return Vec::new();
    };
    serde_json::from_slice::<Vec<Draining>>(&text)
        .unwrap_or_default()
        .into_iter()
        .take(64)
        .collect()
}

fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at ") ".
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split(' ').nth(19).map(str::to_owned)
}

/// Records worker `pid`, handed over to drain for up to `drain_timeout`.
pub fn record_draining(state_dir: &Path, pid: u32, drain_timeout: Duration) {
    let Some(start_time) = start_time(pid) else { return };
    let now = crate::clock::unix_ms();
    let deadline_ms = now + u64::try_from(drain_timeout.as_millis()).unwrap_or(u64::MAX);
    let mut draining: Vec<Draining> =
        read_draining(state_dir).into_iter().filter(|d| d.deadline_ms > now).collect();
    draining.push(Draining { pid, start_time, deadline_ms });
    let text = serde_json::to_vec(&draining).expect("records serialize");
    if let Err(e) = crate::files::replace(&draining_path(state_dir), &text) {
        tracing::warn!("cannot record the draining worker: {e}; it ends at its own deadline");
    }
}

/// Kills each worker an earlier gate handed over that is still there at
/// its deadline (at once if that has passed).
pub async fn end_leftovers(state_dir: PathBuf) {
    let mut draining = read_draining(&state_dir);
    draining.sort_by_key(|d| d.deadline_ms);
    for worker in draining {
        let wait = worker.deadline_ms.saturating_sub(crate::clock::unix_ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if start_time(worker.pid).as_deref() == Some(worker.start_time.as_str()) {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(worker.pid).unwrap_or(i32::MAX));
            tracing::warn!(pid = worker.pid, "a handed-over worker outlived its drain: killing it");
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _ = std::fs::remove_file(draining_path(&state_dir));
}
