//! Connection workers: one single-threaded runtime per core, each on its own
//! thread with its own epoll. A connection lives on one worker from its
//! handshake to its close, so a readable socket wakes the very thread that
//! serves it. On a work-stealing runtime a wake-up often lands on another
//! thread first; for small request/response traffic that hop cost ~25 µs
//! per round trip here (`cargo xtask bench relay`, echo latency).

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicUsize, Ordering},
    thread::JoinHandle,
};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` workers. Threads inherit the caller's credentials, so
    /// this runs after privileges are dropped.
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut workers =
            Self { handles: Vec::new(), threads: Vec::new(), next: AtomicUsize::new(0), stop };
        for index in 0..count.max(1) {
            // Each runtime is built, run and dropped in its own thread: a
            // runtime cannot be dropped inside another one (the caller's).
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("edgegate-worker-{index}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => {
                            let _ = started.send(Ok(runtime.handle().clone()));
                            runtime.block_on(stop.cancelled());
                        }
                        Err(e) => {
                            let _ = started.send(Err(e));
                        }
                    }
                })?;
            workers.threads.push(thread);
            let handle = handle.recv().map_err(|_| io::Error::other("a worker ended at start"))?;
            workers.handles.push(handle?);
        }
        Ok(workers)
    }

    /// Runs `task` on the next worker in turn. Sockets it creates or adopts
    /// (`TcpStream::from_std`) are registered with that worker's epoll.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[index].spawn(task);
    }
}

impl Drop for Workers {
    /// Stops every worker; tasks still running are dropped (their sockets
    /// close). Waits for the threads: a short block, at shutdown.
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
