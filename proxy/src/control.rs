//! The control socket: how the CLI changes the running daemon's allowlist.
//!
//! One JSON request line per connection, answered by one JSON response line.
//! The socket is mode 0600 in a 0700 directory: only root may change the list.

use std::{
    fmt,
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use crate::{
    allowlist::{Change, Diff, Entry},
    daemon::State,
    filter::{Attachment, CounterSnapshot, RuleHits},
    proxy::{ListenerStatus, ReloadOutcome},
};

/// Requests larger than this are refused (a 1M-entry replace is ~60 MB).
const MAX_REQUEST_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Whether a daemon answers at all.
    Ping,
    /// Change the list: validated whole, persisted, applied, then acknowledged.
    Change(Change),
    /// The list in force.
    List,
    /// Re-read the config and the listeners' certificates (as SIGHUP does).
    Reload,
    /// Interfaces, counters and the `top_rules` busiest rules.
    Status { top_rules: usize },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `Ping`.
    Pong,
    /// The change is persisted and in the kernel.
    Changed { diff: Diff, entries: usize },
    /// Answer to `Reload`: what happened to the allowlist file and to each listener.
    Reloaded { allowlist: ListReload, outcomes: Vec<ReloadOutcome> },
    /// Answer to `List`.
    List { entries: Vec<Entry> },
    /// Answer to `Status`.
    Status(Box<Status>),
    /// The request was refused; nothing changed.
    Error { message: String },
}

/// What a reload made of the allowlist file (which may have been edited by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ListReload {
    /// The file holds the list in force.
    Unchanged,
    /// The file differed; its list is now in force.
    Applied { diff: Diff, entries: usize },
    /// The file is refused as a whole; the list in force stays.
    Kept { reason: String },
}

impl fmt::Display for ListReload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unchanged => f.write_str("unchanged"),
            Self::Applied { diff, entries } => write!(
                f,
                "re-read: {} added, {} removed, {} updated; {entries} entries in force",
                diff.added, diff.removed, diff.updated
            ),
            Self::Kept { reason } => write!(f, "kept the list in force: {reason}"),
        }
    }
}

/// What `edgegate status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub interfaces: Vec<Attachment>,
    pub scope: String,
    /// The listeners' ports, `filter.ports`, and the metrics port when exposed.
    pub protected_ports: std::collections::BTreeSet<u16>,
    pub allowlist: PathBuf,
    pub ipv4_entries: usize,
    pub ipv6_entries: usize,
    pub ipv4_lookup: String,
    pub ipv6_lookup: String,
    pub capacity_per_family: u32,
    pub counters: Vec<CounterSnapshot>,
    pub top_rules: Vec<RuleHits>,
    pub listeners: Vec<ListenerStatus>,
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

/// Serves requests until the task is dropped. Changes are applied one at a
/// time, in arrival order, under the state lock.
pub async fn serve(listener: UnixListener, state: Arc<Mutex<State>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            if let Err(e) = handle(stream, state).await {
                tracing::warn!("control connection failed: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, state: Arc<Mutex<State>>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::AsyncReadExt::take(tokio::io::BufReader::new(read), MAX_REQUEST_BYTES)
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let mut state = state.lock().await;
            // Map updates are blocking syscalls; a large replace takes a while.
            tokio::task::block_in_place(|| state.handle(request))
        }
        Err(e) => Response::Error { message: format!("malformed request: {e}") },
    };
    let mut answer = serde_json::to_vec(&response).map_err(io::Error::other)?;
    answer.push(b'\n');
    write.write_all(&answer).await
}
