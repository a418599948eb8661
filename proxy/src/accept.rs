//! The one accept loop every server of the daemon runs: the gate's control
//! socket and metrics endpoint, and the worker's listeners (each worker's
//! accept loop on a listener, with the connection limit, is `proxy::admit`).

use std::{future::Future, io, time::Duration};

use tracing::warn;

/// The first pause after a failed accept; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts with `accept` and hands each connection to `handle`, until the
/// future is dropped. A failed accept (out of file descriptors, say) is
/// logged and retried after a pause that doubles up to a second: a starved
/// loop must not spin, nor stop.
pub async fn accept_loop<S, F: Future<Output = io::Result<S>>>(
    what: &str,
    mut accept: impl FnMut() -> F,
    mut handle: impl FnMut(S),
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match accept().await {
            Ok(accepted) => {
                backoff = MIN_BACKOFF;
                handle(accepted);
            }
            Err(e) => {
                warn!("{what}: accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::VecDeque};

    use super::*;

    /// Failed accepts are retried after 5, 10, 20 … ms, at most 1 s; a
    /// success resets the pause.
    #[tokio::test(start_paused = true)]
    async fn failed_accepts_back_off_doubling_and_recover() {
        let fail = || Err(io::Error::other("EMFILE"));
        let script: RefCell<VecDeque<io::Result<u32>>> = RefCell::new(
            [fail(), fail(), fail(), Ok(1), fail(), Ok(2)]
                .into_iter()
                .chain((0..12).map(|_| fail()))
                .collect(),
        );
        let started = tokio::time::Instant::now();
        let accepted = RefCell::new(Vec::new());
        let accept = || {
            let next = script.borrow_mut().pop_front();
            async move {
                match next {
                    Some(result) => result,
                    None => std::future::pending().await,
                }
            }
        };
        let run = accept_loop("test", accept, |n| {
            accepted.borrow_mut().push((n, started.elapsed()));
        });
        let _ = tokio::time::timeout(Duration::from_secs(60), run).await;
        let ms = |n| Duration::from_millis(n);
        assert_eq!(*accepted.borrow(), [(1, ms(5 + 10 + 20)), (2, ms(35 + 5))]);
        // Twelve more failures: 5, 10, …, 640 ms, then 1 s each, and no spin.
        let pauses: u64 = (0..12).map(|i| (5u64 << i).min(1000)).sum();
        assert!(script.borrow().is_empty(), "every scripted accept was tried");
        assert!(started.elapsed() >= ms(40 + pauses), "{:?}", started.elapsed());
    }
}
