//! The server side of the control socket: one request line per
//! connection, answered by `State` under its lock, in arrival order.

use std::{io, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use super::State;
use crate::control::{MAX_REQUEST_BYTES, Request, Response};

/// Serves requests until the task is dropped. Changes are applied one at a
/// time, in arrival order, under the state lock.
pub(super) async fn serve(listener: UnixListener, state: Arc<Mutex<State>>) {
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
