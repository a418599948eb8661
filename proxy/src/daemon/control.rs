//! The server side of the control socket: one request line per
//! connection, answered by `State` under its lock, in arrival order (in
//! fleet mode, changes and `fleet status` go to etcd instead).

use std::{io, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use super::{State, fleet::Member};
use crate::{
    control::{MAX_REQUEST_BYTES, Request, Response},
    proxy::accept::accept_loop,
};

/// Serves requests until the task is dropped. Changes are applied one at a
/// time, in arrival order, under the state lock.
pub(super) async fn serve(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    fleet: Option<Arc<Member>>,
) {
    let answer = |(stream, _): (UnixStream, _)| {
        let state = Arc::clone(&state);
        let fleet = fleet.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, state, fleet).await {
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
) -> io::Result<()> {
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
            (Ok(request), _) => state.lock().await.handle(request).await,
            (Err(e), _) => Response::Error { message: format!("malformed request: {e}") },
        }
    });
    let response = answering.await.unwrap_or_else(|e| {
        tracing::error!("control request failed: {e}");
        Response::Error {
            message: format!(
                "the daemon failed to answer ({e}); see its log. Nothing was acknowledged"
            ),
        }
    });
    let mut answer = serde_json::to_vec(&response).map_err(io::Error::other)?;
    answer.push(b'\n');
    write.write_all(&answer).await
}
