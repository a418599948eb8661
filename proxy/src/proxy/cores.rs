//! The worker's cores: one single-threaded runtime per core, each on its
//! own thread with its own epoll. Every core accepts on each listening
//! socket itself, and a connection lives on the core that accepted it from
//! its handshake to its close, so a readable socket wakes the very thread
//! that serves it. On a work-stealing runtime a wake-up often lands on another
//! thread first; for small request/response traffic that hop cost ~25 µs
//! per round trip here (`cargo xtask bench relay`, echo latency).

use std::{future::Future, io, thread, time::Duration};

use tokio::{runtime::Handle, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// How often a core's own timer fires: below the connection timeouts
/// (handshake 10 s, connect 5 s by default; a shorter one configured only
/// costs the wake-up it always did).
const NEAR_TIMER: Duration = Duration::from_secs(1);

pub struct Cores {
    handles: Vec<Handle>,
    threads: Vec<thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Cores {
    /// Starts `count` cores. Threads inherit the caller's credentials, so
    /// this runs after privileges are dropped.
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut cores = Self { handles: Vec::new(), threads: Vec::new(), stop };
        for index in 0..count.max(1) {
            // Each runtime is built, run and dropped in its own thread: a
            // runtime cannot be dropped inside another one (the caller's).
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            let stop = cores.stop.clone();
            let thread =
                thread::Builder::new().name(format!("edgegate-core-{index}")).spawn(move || {
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => {
                            let _ = started.send(Ok(runtime.handle().clone()));
                            runtime.block_on(async {
                                tokio::select! {
                                    () = stop.cancelled() => {}
                                    () = keep_a_timer_near() => {}
                                }
                            });
                        }
                        Err(e) => {
                            let _ = started.send(Err(e));
                        }
                    }
                })?;
            cores.threads.push(thread);
            let handle = handle.recv().map_err(|_| io::Error::other("a core ended at start"))?;
            cores.handles.push(handle?);
        }
        Ok(cores)
    }

    /// How many cores run.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs one of `tasks` on each core, in order ([`Self::count`] of
    /// them). Sockets a task adopts (`TcpListener::from_std`) are registered
    /// with its core's epoll, and what it `tokio::spawn`s runs there too.
    pub fn spawn_each<F>(&self, tasks: impl IntoIterator<Item = F>) -> Vec<JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handles.iter().zip(tasks).map(|(handle, task)| handle.spawn(task)).collect()
    }
}

/// Keeps a timer due within [`NEAR_TIMER`] on this core. Tokio wakes its own
/// driver (an eventfd write, then one more `epoll_wait`) whenever a timer is
/// set earlier than every timer it holds, even from the thread that runs it
/// (tokio-rs/tokio#5207): without this, each connection's handshake and
/// connect timeouts did so on a core with no other connection.
async fn keep_a_timer_near() {
    loop {
        tokio::time::sleep(NEAR_TIMER).await;
    }
}

impl Drop for Cores {
    /// Stops every core; tasks still running are dropped (their sockets
    /// close). Waits for the threads: a short block, at shutdown.
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
