//! The control socket's protocol: how the CLI talks to the running daemon.
//! This is the protocol only (requests, answers, the client call and the
//! socket's creation); the daemon answers it in `daemon::control`.
//!
//! One JSON request line per connection, answered by one JSON response line.
//! The socket is mode 0600 in a 0700 directory: only root may change the list.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    allowlist::{Change, Diff, Entry},
    learned::Suggestion,
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
    /// is in audit mode (the only mode in which new sources are learned).
    Suggested { suggestions: Vec<Suggestion>, learned: usize, audit: bool },
    /// The request was refused; nothing changed.
    Error { message: String },
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
    let mut line = serde_json::to_vec(request).map_err(ClientError::Protocol)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_error)?;
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
    /// Creating the socket or its directory failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the control socket, replacing a stale one left by a killed daemon.
/// A std listener: start-up binds before the runtime (and its threads) exist.
pub fn bind(socket: &Path) -> Result<std::os::unix::net::UnixListener, BindError> {
    let io_error = |op, path: &Path| {
        let path = path.to_owned();
        move |source| BindError::Io { op, path, source }
    };
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error("set permissions of", dir))?;
        }
    }
    if socket.exists() {
        if StdUnixStream::connect(socket).is_ok() {
            return Err(BindError::InUse { socket: socket.to_owned() });
        }
        std::fs::remove_file(socket).map_err(io_error("remove stale", socket))?;
    }
    let listener =
        std::os::unix::net::UnixListener::bind(socket).map_err(io_error("bind", socket))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("set permissions of", socket))?;
    listener.set_nonblocking(true).map_err(io_error("configure", socket))?;
    Ok(listener)
}
