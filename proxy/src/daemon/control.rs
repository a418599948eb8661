//! The server side of the control socket: one request line per
//! connection, answered by `State` under its lock, in arrival order (in
//! fleet mode, changes and `fleet status` go to etcd instead).

use std::{io, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use super::{State, fleet::Member, supervisor::Prober, transaction::ChangeRefused};
use crate::{
    accept::accept_loop,
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
        match (serde_json::from_str::<Request>(&line), fleet) {
            // Fleet mode: the group's list changes in etcd, outside the state
            // lock; the watch then applies it here as on every other host.
            (Ok(Request::Change { change, empty_ok }), Some(fleet)) => {
                fleet.commit(change, empty_ok).await
            }
            (Ok(Request::FleetStatus), Some(fleet)) => fleet.view().await,
            (Ok(request), _) => {
                // Fresh counters and sightings are asked for before the lock
                // is taken, and for a moment only.
                if matches!(request, Request::Suggest | Request::Status { .. }) {
                    prober.refresh(FRESH_REPORT_WAIT).await;
                }
                let (response, catch_up) = state.lock().await.handle(request).await;
                if let Some(catch_up) = catch_up {
                    catch_up.await;
                }
                response
            }
            (Err(e), _) => Response::error(ErrorKind::Malformed, format!("malformed request: {e}")),
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

/// A refused change's answer: the change's own fault, or the daemon's.
impl From<ChangeRefused> for Response {
    fn from(refused: ChangeRefused) -> Self {
        let kind = match refused {
            ChangeRefused::Invalid(_) | ChangeRefused::Capacity(_) => ErrorKind::Refused,
            ChangeRefused::Store(_)
            | ChangeRefused::Apply(_)
            | ChangeRefused::RollbackFailed { .. } => ErrorKind::Internal,
        };
        Self::error(kind, refused)
    }
}
