//! Restarts and upgrades refuse no connection: under a partner load of new
//! mTLS connections and held ones, the gate is restarted as the packages'
//! unit does it (SIGTERM, wait for the exit, start; systemd's part played by
//! `ServiceManager`, with its file-descriptor store), then upgraded to
//! another binary the same way. No new connection fails, every held one
//! completes its exchanges, and a stranger never gets through.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use edgegate_tests::{
    mtls::{BackendMode, MtlsBed, connect_tls},
    service::ServiceManager,
    testbed::edgegate_binary,
};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Concurrent clients opening connection after connection.
const OPENERS: usize = 6;
const HELD: usize = 20;

#[derive(Default)]
struct Load {
    stop: AtomicBool,
    opened: AtomicU64,
    failed: AtomicU64,
    held_exchanges: AtomicU64,
    held_failed: AtomicU64,
    stranger_passed: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Load {
    fn failure(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.first_failure.lock().expect("lock").get_or_insert(what);
    }
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// SIGTERM, a bounded wait for the exit, then `binary` started with the store.
fn restart(bed: &MtlsBed, manager: &ServiceManager, binary: &std::path::Path) -> Duration {
    let started = Instant::now();
    bed.testbed.signal_daemon(Signal::SIGTERM);
    let exited = bed.testbed.wait_for_exit(Duration::from_secs(10));
    assert!(exited.is_some(), "the gate did not exit:\n{}", bed.testbed.daemon_log());
    bed.testbed.start_daemon_as_service(manager, binary);
    started.elapsed()
}

#[test]
fn restarts_and_upgrades_refuse_no_connection() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "drain_timeout = \"15s\"");
    let manager = ServiceManager::new(&bed.testbed.dir);
    bed.testbed.start_daemon_as_service(&manager, &edgegate_binary());
    let deadline = Instant::now() + Duration::from_secs(5);
    while manager.stored().is_empty() {
        assert!(Instant::now() < deadline, "nothing stored: {:?}", manager.messages());
        std::thread::sleep(Duration::from_millis(20));
    }
    let upgraded = bed.testbed.dir.join("edgegate-upgraded");
    std::fs::copy(edgegate_binary(), &upgraded).expect("a second binary");

    let load = std::sync::Arc::new(Load::default());
    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    let stranger = (bed.testbed.server_v4(1), bed.listener_address(1).port());
    let (elapsed, restarts, first_worker) = std::thread::scope(|scope| {
        let clients = scope.spawn(|| {
            bed.in_client(0, || async {
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..HELD {
                    let (config, load) = (config.clone(), std::sync::Arc::clone(&load));
                    tasks.spawn(async move {
                        let mut tls = match connect_tls(address, server, config, &[]).await {
                            Ok(tls) => tls,
                            Err(e) => return load.failure(&load.held_failed, format!("held: {e}")),
                        };
                        while !load.stop.load(Ordering::Relaxed) {
                            let mut echo = [0u8; 5];
                            let exchanged = async {
                                tls.write_all(b"ping\n").await?;
                                tls.read_exact(&mut echo).await
                            };
                            match tokio::time::timeout(Duration::from_secs(5), exchanged).await {
                                Ok(Ok(_)) if &echo == b"ping\n" => {
                                    load.held_exchanges.fetch_add(1, Ordering::Relaxed);
                                }
                                other => {
                                    let what = format!("held exchange: {other:?}");
                                    return load.failure(&load.held_failed, what);
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        let _ = tls.shutdown().await;
                    });
                }
                for _ in 0..OPENERS {
                    let (config, load) = (config.clone(), std::sync::Arc::clone(&load));
                    tasks.spawn(async move {
                        while !load.stop.load(Ordering::Relaxed) {
                            match tokio::time::timeout(
                                Duration::from_secs(10),
                                open_one(address, server, config.clone()),
                            )
                            .await
                            {
                                Ok(Ok(())) => {
                                    load.opened.fetch_add(1, Ordering::Relaxed);
                                }
                                other => load.failure(&load.failed, format!("new: {other:?}")),
                            }
                        }
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    done.expect("a client task");
                }
            })
        });
        let strangers = scope.spawn(|| {
            while !load.stop.load(Ordering::Relaxed) {
                let timeout = Duration::from_millis(150);
                if bed.testbed.tcp_connects(1, stranger.0, stranger.1, timeout) {
                    load.stranger_passed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // However this thread ends (a failed assertion too), the load stops:
        // the scope waits for its threads.
        let _stop = StopOnDrop(&load.stop);
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let first_worker = bed.testbed.status().worker.pid.expect("a worker serves");
        let restarts = [restart(&bed, &manager, &edgegate_binary()), {
            std::thread::sleep(Duration::from_secs(2));
            restart(&bed, &manager, &upgraded)
        }];
        std::thread::sleep(Duration::from_secs(2));
        load.stop.store(true, Ordering::Relaxed);
        clients.join().expect("clients");
        strangers.join().expect("strangers");
        (started.elapsed(), restarts, first_worker)
    });

    let opened = load.opened.load(Ordering::Relaxed);
    let rate = opened as f64 / elapsed.as_secs_f64();
    eprintln!(
        "{opened} new mTLS connections in {elapsed:.1?} ({rate:.0}/s), {} failed; {} held \
         exchanges, {} failed; restarts took {restarts:?}",
        load.failed.load(Ordering::Relaxed),
        load.held_exchanges.load(Ordering::Relaxed),
        load.held_failed.load(Ordering::Relaxed),
    );
    let first = load.first_failure.lock().expect("lock").clone();
    assert_eq!(load.failed.load(Ordering::Relaxed), 0, "{first:?}\n{}", bed.testbed.daemon_log());
    assert_eq!(load.held_failed.load(Ordering::Relaxed), 0, "{first:?}");
    assert!(load.held_exchanges.load(Ordering::Relaxed) >= (HELD * 20) as u64);
    assert_eq!(load.stranger_passed.load(Ordering::Relaxed), 0, "a stranger got through");
    let log = bed.testbed.daemon_log();
    assert_eq!(log.matches("handed over: the worker finishes").count(), 2, "{log}");
    // The first worker's held connections closed after both restarts: the
    // third gate relayed their access lines, labelled with its pid.
    let last_gate = log.rfind("listening socket taken over").expect("a taken-over socket");
    let labelled = format!("worker[{first_worker}]: ");
    let late: Vec<&str> = log[last_gate..]
        .lines()
        .filter(|l| l.starts_with(&labelled) && l.contains("connection closed"))
        .collect();
    assert!(!late.is_empty(), "no access line of worker {first_worker} after the restarts:\n{log}");
    assert!(log.contains("listening socket taken over from the previous gate"), "{log}");
    assert!(rate >= 200.0, "the load was {rate:.0} new connections per second, not 200");
}

/// One new connection: handshake, a line echoed, closed by both sides.
async fn open_one(
    address: std::net::SocketAddr,
    server: std::net::IpAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let mut tls = connect_tls(address, server, config, &[]).await?;
    tls.write_all(b"new\n").await.map_err(|e| e.to_string())?;
    tls.shutdown().await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
    if answer == b"new\n" { Ok(()) } else { Err(format!("answered {answer:?}")) }
}
