//! The server side of the control socket: one request line per
//! connection. [`answer`] is the one place each request is handled: reads
//! and reloads under the state lock, in arrival order; a change where the
//! list is decided (here, or in fleet mode the group's list in etcd).

use std::{io, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use super::{State, fleet::Member, supervisor::Prober, transaction::ChangeRefused};
use crate::{
    accept::accept_loop,
    allowlist::Change,
    control::{ErrorKind, MAX_REQUEST_BYTES, Request, Response},
};

/// How long `status` and `allow suggest` wait for a fresh report from the
/// worker before answering with the newest one there is.
const FRESH_REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves requests until the task is dropped. Changes are applied one at a
/// time, in arrival order, under the state lock.
pub(super) async fn serve(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    fleet: Option<Arc<Member>>,
    prober: Prober,
) {
    let answer = |(stream, _): (UnixStream, _)| {
        let state = Arc::clone(&state);
        let fleet = fleet.clone();
        let prober = prober.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, state, fleet, prober).await {
                tracing::warn!("control connection failed: {e}");
            }
        });
    };
    accept_loop("control socket", || listener.accept(), answer).await;
}

async fn handle(
    stream: UnixStream,
    state: Arc<Mutex<State>>,
    fleet: Option<Arc<Member>>,
    prober: Prober,
) -> io::Result<()> {
    // Only root may ask: whatever the socket's mode, the kernel says who asks.
    match stream.peer_cred() {
        Ok(peer) if peer.uid() == 0 => {}
        refused => {
            let who = refused.map_or_else(|e| format!("unknown ({e})"), |p| p.uid().to_string());
            tracing::warn!("control socket: refused a client running as uid {who}");
            let answer = Response::error(
                ErrorKind::Refused,
                format!("permission denied: the daemon answers root only (you are uid {who})"),
            );
            let mut stream = stream;
            let mut line = serde_json::to_vec(&answer).map_err(io::Error::other)?;
            line.push(b'\n');
            return stream.write_all(&line).await;
        }
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::AsyncReadExt::take(tokio::io::BufReader::new(read), MAX_REQUEST_BYTES)
        .read_line(&mut line)
        .await?;
    // Answered on a task of its own, so that a bug in handling a request
    // reaches the CLI as an error, never as a closed connection.
    let answering = tokio::spawn(async move {
        match serde_json::from_str::<Request>(&line) {
            Ok(request) => answer(request, &state, fleet.as_deref(), &prober).await,
            Err(e) => Response::error(ErrorKind::Malformed, format!("malformed request: {e}")),
        }
    });
    let response = answering.await.unwrap_or_else(|e| {
        tracing::error!("control request failed: {e}");
        Response::error(
            ErrorKind::Internal,
            format!("the daemon failed to answer ({e}); see its log. Nothing was acknowledged"),
        )
    });
    let mut answer = serde_json::to_vec(&response).map_err(io::Error::other)?;
    answer.push(b'\n');
    write.write_all(&answer).await
}

/// Answers one request.
async fn answer(
    request: Request,
    state: &Mutex<State>,
    fleet: Option<&Member>,
    prober: &Prober,
) -> Response {
    match request {
        Request::Ping => Response::Pong,
        // Fleet mode: the group's list changes in etcd, outside the state
        // lock; the watch then applies it here as on every other host.
        Request::Change { change, empty_ok } => match fleet {
            Some(fleet) => fleet.commit(change, empty_ok).await,
            None => change_here(&change, state).await,
        },
        Request::FleetStatus => match fleet {
            Some(fleet) => fleet.view().await,
            None => Response::error(
                ErrorKind::Refused,
                "not in fleet mode: the config has no `[fleet]` table",
            ),
        },
        Request::List => {
            let (entries, fleet) = state.lock().await.list();
            Response::List { entries, fleet }
        }
        Request::Reload => {
            let mut state = state.lock().await;
            let response = state.reload().await;
            let caught_up = state.worker_caught_up();
            drop(state);
            caught_up.await;
            response
        }
        Request::Status { top_rules, dropped_sources } => {
            // Fresh counters are asked for before the lock is taken, and for a moment only.
            prober.refresh(FRESH_REPORT_WAIT).await;
            match state.lock().await.status(top_rules, dropped_sources) {
                Ok(status) => Response::Status(Box::new(status)),
                Err(e) => Response::error(ErrorKind::Internal, e),
            }
        }
        Request::Explain { address, port } => {
            let mut state = state.lock().await;
            match tokio::task::block_in_place(|| state.explain(address, port)) {
                Ok(explanation) => Response::Explained(Box::new(explanation)),
                Err(e) => Response::error(ErrorKind::Internal, e),
            }
        }
        Request::Suggest => {
            prober.refresh(FRESH_REPORT_WAIT).await;
            state.lock().await.suggest()
        }
    }
}

/// A change put in force here, under the state lock; acknowledged once
/// the worker checks clients against the new list too, which is awaited
/// after the lock is released.
async fn change_here(change: &Change, state: &Mutex<State>) -> Response {
    let mut state = state.lock().await;
    // Map updates are blocking system calls; a large replace takes a while.
    match tokio::task::block_in_place(|| state.apply(change)) {
        Ok(diff) => {
            let entries = state.entries();
            let caught_up = state.worker_caught_up();
            drop(state);
            caught_up.await;
            Response::Changed { diff, entries, fleet: None }
        }
        Err(refused) => Response::from(refused),
    }
}

/// A refused change's answer: the change's own fault, or the daemon's.
impl From<ChangeRefused> for Response {
    fn from(refused: ChangeRefused) -> Self {
        let kind = match refused {
            ChangeRefused::Conflict(_) | ChangeRefused::Capacity(_) => ErrorKind::Refused,
            ChangeRefused::Store(_)
            | ChangeRefused::Apply(_)
            | ChangeRefused::RollbackFailed { .. } => ErrorKind::Internal,
        };
        Self::error(kind, refused)
    }
}
