//! systemd's part in a restart, played by the test: the notification socket
//! (`NOTIFY_SOCKET`) with its file-descriptor store (`FDSTORE=1` and
//! `FDNAME=`, the descriptors passed with `SCM_RIGHTS`), and the start of
//! the next daemon with the stored descriptors (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`) from descriptor 3 on, as
//! `sd_listen_fds(3)` describes.

use std::{
    collections::BTreeMap,
    io::IoSliceMut,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{net::UnixDatagram, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// The store, as systemd keeps it for one service.
pub struct ServiceManager {
    pub socket_path: PathBuf,
    store: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl ServiceManager {
    pub fn new(dir: &Path) -> Self {
        let socket_path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let store = Arc::new(Mutex::new(BTreeMap::new()));
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (store, messages, stop) =
                (Arc::clone(&store), Arc::clone(&messages), Arc::clone(&stop));
            std::thread::spawn(move || receive(&socket, &store, &messages, &stop));
        }
        Self { socket_path, store, messages, stop }
    }

    /// The names of the stored descriptors.
    pub fn stored(&self) -> Vec<String> {
        self.store.lock().expect("store").keys().cloned().collect()
    }

    /// Every notification received so far.
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().expect("messages").clone()
    }

    /// Makes `command` start as systemd starts a service: with
    /// `NOTIFY_SOCKET`, and the stored descriptors from 3 on. `command`
    /// must be `sh -c 'LISTEN_PID=$$ exec "$0" "$@"' …` (see
    /// [`Self::wrap`]), which sets `LISTEN_PID` to the daemon's own pid.
    pub fn prepare(&self, command: &mut Command) {
        command.env("NOTIFY_SOCKET", &self.socket_path);
        let store = self.store.lock().expect("store");
        if store.is_empty() {
            return;
        }
        let names: Vec<&str> = store.keys().map(String::as_str).collect();
        command.env("LISTEN_FDS", store.len().to_string());
        command.env("LISTEN_FDNAMES", names.join(":"));
        // Copies above the range they go to, so that no dup2 overwrites one.
        let sources: Vec<RawFd> = store
            .values()
            .map(|fd| {
                // SAFETY: F_DUPFD_CLOEXEC on a descriptor the store owns.
                let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                assert!(copy >= 0, "dup a stored descriptor");
                copy
            })
            .collect();
        // SAFETY: only dup2 (async-signal-safe) between fork and exec; the
        // copies stay open in this process, which closes nothing of them.
        unsafe {
            command.pre_exec(move || {
                for (index, source) in sources.iter().enumerate() {
                    let target = 3 + index as RawFd;
                    if libc::dup2(*source, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// `sh -c 'LISTEN_PID=$$ exec "$0" "$@"' PROGRAM ARGS…`: the shell's
    /// pid is the daemon's, through `exec`.
    pub fn wrap(program: &Path, args: &[&str]) -> Vec<String> {
        let mut wrapped = vec!["sh".to_owned(), "-c".to_owned()];
        wrapped.push("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"".to_owned());
        wrapped.push(program.to_str().expect("UTF-8").to_owned());
        wrapped.extend(args.iter().map(|a| (*a).to_owned()));
        wrapped
    }
}

/// Receives notifications until the socket is gone; `FDSTORE=1` messages
/// put their descriptors in `store` under their `FDNAME`.
fn receive(
    socket: &UnixDatagram,
    store: &Mutex<BTreeMap<String, OwnedFd>>,
    messages: &Mutex<Vec<String>>,
    stop: &AtomicBool,
) {
    let mut buffer = [0u8; 4096];
    loop {
        let mut space = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let received =
            recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty());
        let message = match received {
            Ok(message) => message,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        let mut fds = Vec::new();
        for cmsg in message.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors here.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let length = message.bytes;
        let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
        let field =
            |key: &str| text.lines().find_map(|line| line.strip_prefix(key)).map(str::to_owned);
        if field("FDSTORE=").as_deref() == Some("1") {
            let name = field("FDNAME=").unwrap_or_else(|| "stored".to_owned());
            if let Some(fd) = fds.into_iter().next() {
                store.lock().expect("store").insert(name, fd);
            }
        } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
            if let Some(name) = field("FDNAME=") {
                store.lock().expect("store").remove(&name);
            }
        }
        messages.lock().expect("messages").push(text);
    }
}
