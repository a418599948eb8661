//! The control socket's protocol: how the CLI talks to the running daemon.
//! This is the protocol only (requests, answers, the client call and the
//! socket's creation); the daemon answers it in `daemon::control`.
//!
//! One JSON request line per connection, answered by one JSON response line.
//! The socket is created 0600 (under a restrictive umask, never a moment
//! wider) in a root-owned 0700 directory, and both ends check the other's
//! credentials (`SO_PEERCRED`): the daemon answers only root, and the CLI
//! talks only to a root daemon, whatever the socket's mode became later.
//!
//! A request not carried out is answered with a [`DaemonError`]: its
//! [`ErrorKind`] says whose fault it is (the CLI's exit status follows it),
//! its message says what to do.

use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream as StdUnixStream,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    allowlist::{Change, Diff, Entry},
    files::{IoContext as _, IoError},
    fleet::{CommitError, StoreError},
    learned::{SightingRefusal, Suggestion},
    status::{Explanation, FleetView, ListReload, ReloadOutcome, Status},
};

/// Requests larger than this are refused (a 1M-entry replace is ~60 MB).
pub const MAX_REQUEST_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Whether a daemon answers at all.
    Ping,
    /// Change the list: validated whole, persisted, applied, then acknowledged.
    /// In fleet mode: committed to the group's list in etcd. `empty_ok`
    /// allows a change that leaves the group's list empty.
    Change {
        change: Change,
        #[serde(default)]
        empty_ok: bool,
    },
    /// The list in force.
    List,
    /// Re-read the config and the listeners' certificates (as SIGHUP does).
    Reload,
    /// Interfaces, counters, the `top_rules` busiest rules and the
    /// `dropped_sources` sampled sources with the most drops.
    Status {
        top_rules: usize,
        #[serde(default)]
        dropped_sources: usize,
    },
    /// Fleet mode: the group's generation and what every host enforces.
    FleetStatus,
    /// What decides for `address` on `port` (default: the first listener's).
    Explain { address: std::net::IpAddr, port: Option<u16> },
    /// Allow entries for the authenticated clients the list does not allow.
    Suggest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `Ping`.
    Pong,
    /// The change is persisted and in the kernel (fleet mode: committed in etcd).
    Changed {
        diff: Diff,
        entries: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fleet: Option<FleetCommit>,
    },
    /// Answer to `Reload`: what happened to the allowlist file and to each listener.
    Reloaded { allowlist: ListReload, outcomes: Vec<ReloadOutcome> },
    /// Answer to `List`.
    List {
        entries: Vec<Entry>,
        /// Fleet mode: the group and the generation in force here.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fleet: Option<ListSource>,
    },
    /// Answer to `Status`.
    Status(Box<Status>),
    /// Answer to `FleetStatus`.
    Fleet(FleetView),
    /// Answer to `Explain`.
    Explained(Box<Explanation>),
    /// Answer to `Suggest`: out of the `learned` sources kept, those the
    /// list does not decide, as entries; `audit` says whether the filter
    /// is in audit mode (the only mode in which new sources are learned);
    /// `refused` counts the worker's sightings not taken, by why.
    Suggested {
        suggestions: Vec<Suggestion>,
        learned: usize,
        audit: bool,
        #[serde(default)]
        refused: BTreeMap<SightingRefusal, u64>,
    },
    /// The request was not carried out: why, and what kind of failure.
    Error(DaemonError),
}

impl Response {
    /// The answer to a request not carried out.
    pub fn error(kind: ErrorKind, message: impl std::fmt::Display) -> Self {
        Self::Error(DaemonError { kind, message: message.to_string() })
    }
}

/// A request the daemon did not carry out, in its words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    /// An older daemon's errors carry no kind: they count as internal.
    #[serde(default)]
    pub kind: ErrorKind,
    pub message: String,
}

/// What kind of failure a [`DaemonError`] is: what the operator (or a
/// script, through the CLI's exit status) does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The daemon said no and nothing changed: an invalid or conflicting
    /// change, a list the maps cannot hold, a config or files a reload
    /// refuses, a fleet rule (an empty list, signatures required), a
    /// request that does not apply (fleet status outside fleet mode), or a
    /// client that is not root. Fix the request (the message says how).
    Refused,
    /// What the daemon needs did not answer (the fleet's etcd), or other
    /// writers kept committing first; nothing changed. Try again.
    Unavailable,
    /// The request is not this daemon's protocol (a CLI of another version?).
    Malformed,
    /// The daemon failed while answering: a file write, a map update or
    /// its rollback, a map read, a crash. The message says whether
    /// anything changed; the daemon's log says more.
    #[default]
    Internal,
}

impl From<&StoreError> for ErrorKind {
    fn from(error: &StoreError) -> Self {
        match error {
            StoreError::Unreachable(_) => Self::Unavailable,
            StoreError::Pointer { .. } | StoreError::Corrupt(_) => Self::Internal,
        }
    }
}

impl From<&CommitError> for ErrorKind {
    fn from(error: &CommitError) -> Self {
        match error {
            CommitError::Store(store) => store.into(),
            CommitError::Contention => Self::Unavailable,
            CommitError::Refused(_)
            | CommitError::Conflict { .. }
            | CommitError::Empty
            | CommitError::Capacity { .. }
            | CommitError::Untrusted { .. }
            | CommitError::Invalid(_)
            | CommitError::TooLarge { .. }
            | CommitError::GenerationExhausted { .. } => Self::Refused,
        }
    }
}

/// A change committed to the group's list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetCommit {
    pub generation: u64,
    /// Whether this host enforced it before answering.
    pub enforced_here: bool,
}

/// Where the listed entries come from in fleet mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListSource {
    pub group: String,
    pub generation: u64,
}

/// Why the CLI could not get an answer from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "the edgegate daemon is not running (nothing listens on {}); start it with \
         `edgegate run --config FILE` or `systemctl start edgegate`",
        socket.display()
    )]
    NotRunning { socket: PathBuf },
    /// Not root.
    #[error("permission denied on {}: the control socket is root-only", socket.display())]
    PermissionDenied { socket: PathBuf },
    /// The connection failed midway.
    #[error("talking to the daemon on {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The answer is not the protocol (a different version?).
    #[error("the daemon sent an unreadable answer: {0}")]
    Protocol(#[source] serde_json::Error),
    /// The process behind the socket is not root: not an edgegate daemon.
    #[error(
        "the process listening on {} runs as uid {uid}, not root: it is not the edgegate daemon",
        socket.display()
    )]
    NotTheDaemon { socket: PathBuf, uid: u32 },
}

/// How long the CLI waits for an answer (a 1M-entry replace takes seconds).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The uid of the process at the other end of `stream`.
pub fn peer_uid(stream: &impl std::os::fd::AsFd) -> io::Result<u32> {
    let credentials =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(io::Error::from)?;
    Ok(credentials.uid())
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let io_error = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { socket: socket.to_owned() }
        }
        io::ErrorKind::PermissionDenied => {
            ClientError::PermissionDenied { socket: socket.to_owned() }
        }
        _ => ClientError::Io { socket: socket.to_owned(), source },
    };
    let mut stream = StdUnixStream::connect(socket).map_err(io_error)?;
    let uid = peer_uid(&stream).map_err(io_error)?;
    if uid != 0 {
        return Err(ClientError::NotTheDaemon { socket: socket.to_owned(), uid });
    }
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io_error)?;
    let mut line = serde_json::to_vec(request).map_err(ClientError::Protocol)?;
    line.push(b'\n');
    // A daemon that refuses the client (not root) answers and closes before
    // reading: the request then cannot be written, but the answer is there.
    match stream.write_all(&line) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(io_error(e)),
        _ => {}
    }
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io_error)?;
    serde_json::from_str(&answer).map_err(ClientError::Protocol)
}

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A live daemon owns the socket.
    #[error("another edgegate daemon already listens on {}", socket.display())]
    InUse { socket: PathBuf },
    /// The socket's directory could let another user replace the socket.
    #[error(
        "{} holds the control socket but is {problem}: it must be a directory owned by root \
         with mode 0700 (`chown root:root {0} && chmod 700 {0}`), or set \
         `daemon.control_socket` to a path in one",
        dir.display()
    )]
    UnsafeDirectory { dir: PathBuf, problem: String },
    /// Creating the socket or its directory failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Binds the control socket, replacing a stale one left by a killed daemon.
/// A std listener: start-up binds before the runtime (and its threads) exist,
/// which also makes the umask change below safe (it is per process).
pub fn bind(socket: &Path) -> Result<std::os::unix::net::UnixListener, BindError> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let dir = socket.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).at("create", dir)?;
    }
    let metadata = std::fs::symlink_metadata(dir).at("inspect", dir)?;
    let problem = if !metadata.is_dir() {
        Some("not a directory (a link?)".to_owned())
    } else if metadata.uid() != nix::unistd::geteuid().as_raw() {
        Some(format!("owned by uid {}", metadata.uid()))
    } else if metadata.mode() & 0o077 != 0 {
        Some(format!("mode {:04o}", metadata.mode() & 0o7777))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(BindError::UnsafeDirectory { dir: dir.to_owned(), problem });
    }
    if socket.exists() {
        if StdUnixStream::connect(socket).is_ok() {
            return Err(BindError::InUse { socket: socket.to_owned() });
        }
        std::fs::remove_file(socket).at("remove stale", socket)?;
    }
    // Created 0600: no moment at which another user could connect.
    let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(socket);
    nix::sys::stat::umask(previous);
    let listener = bound.at("bind", socket)?;
    listener.set_nonblocking(true).at("configure", socket)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn an_error_answer_carries_its_kind_next_to_its_message() {
        let refused = Response::error(ErrorKind::Refused, "nothing changed");
        let json = serde_json::to_value(&refused).expect("serialize");
        let expected = r#"{"result":"error","kind":"refused","message":"nothing changed"}"#;
        assert_eq!(json, serde_json::from_str::<serde_json::Value>(expected).expect("JSON"));
    }

    #[test]
    fn an_older_daemons_error_without_a_kind_is_internal() {
        let old = r#"{"result":"error","message":"nothing changed"}"#;
        let Response::Error(error) = serde_json::from_str(old).expect("readable") else {
            panic!("not an error answer");
        };
        assert_eq!(
            error,
            DaemonError { kind: ErrorKind::Internal, message: "nothing changed".into() }
        );
    }

    #[test]
    fn fleet_failures_are_refusals_unless_etcd_is_out_of_reach_or_busy() {
        assert_eq!(ErrorKind::from(&CommitError::Empty), ErrorKind::Refused);
        let too_large = CommitError::TooLarge { bytes: 2, max: 1 };
        assert_eq!(ErrorKind::from(&too_large), ErrorKind::Refused);
        assert_eq!(ErrorKind::from(&CommitError::Contention), ErrorKind::Unavailable);
        let unreachable = StoreError::Unreachable(etcd_client::Error::InvalidArgs("down".into()));
        assert_eq!(ErrorKind::from(&unreachable), ErrorKind::Unavailable);
        assert_eq!(ErrorKind::from(&CommitError::Store(unreachable)), ErrorKind::Unavailable);
    }

    #[test]
    fn the_socket_is_born_0600_in_a_private_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/control.sock");
        let _listener = bind(&socket).expect("bind");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&socket), 0o600);
        assert_eq!(mode(socket.parent().expect("dir")), 0o700);
    }

    #[test]
    fn a_directory_others_can_write_is_refused_naming_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let error = bind(&open.join("control.sock")).expect_err("refused").to_string();
        assert!(error.contains("mode 0777") && error.contains("chmod 700"), "{error}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).expect("symlink");
        let error = bind(&link.join("control.sock")).expect_err("refused").to_string();
        assert!(error.contains("not a directory"), "{error}");
    }
}
