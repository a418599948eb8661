//! The gate's supervision of its worker, tried from outside: a worker that
//! stops answering freezes nothing and is replaced; a respawned worker lives
//! as long as the gate, whatever happens to the thread that asked for it;
//! and probes of `/readyz` never slow a change down.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use edgegate_tests::mtls::{BackendMode, MtlsBed, connect_tls};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn worker_pid(bed: &MtlsBed) -> Option<u32> {
    bed.testbed.status().worker.pid
}

fn signal(pid: u32, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, signal).expect("signal");
}

/// Waits (bounded) for a serving worker.
fn await_worker(bed: &MtlsBed) -> u32 {
    await_new_worker(bed, 0, Duration::from_secs(10))
}

/// Waits (bounded) for a serving worker other than `old`.
fn await_new_worker(bed: &MtlsBed, old: u32, within: Duration) -> u32 {
    let deadline = Instant::now() + within;
    loop {
        match worker_pid(bed) {
            Some(pid) if pid != old => return pid,
            _ => {}
        }
        assert!(Instant::now() < deadline, "no new worker:\n{}", bed.testbed.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `f`, asserting it takes less than `limit`.
fn within<T>(limit: Duration, what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = f();
    assert!(started.elapsed() < limit, "{what} took {:?}", started.elapsed());
    value
}

#[test]
fn a_stopped_worker_freezes_nothing_and_is_replaced() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "drain_timeout = \"3s\"");
    bed.testbed.start_daemon();
    let stopped = await_worker(&bed);
    let mut big = String::new();
    for i in 0..50_000u32 {
        let [_, b, c, d] = i.to_be_bytes();
        big.push_str(&format!("11.{b}.{c}.{d}/32\n"));
    }
    let client = &bed.testbed.clients[0];
    big.push_str(&format!("{}\n{}\n", client.ipv4, client.ipv6));
    let file = bed.testbed.dir.join("big.list");
    std::fs::write(&file, big).expect("write list");

    signal(stopped, Signal::SIGSTOP);
    std::thread::scope(|scope| {
        let replace = scope.spawn(|| {
            let file = file.to_str().expect("UTF-8");
            bed.testbed.cli_within(Duration::from_secs(15), &["allow", "replace", "--file", file])
        });
        std::thread::sleep(Duration::from_millis(200));
        let limit = Duration::from_secs(5);
        bed.testbed.cli_within(limit, &["status"]);
        bed.testbed.cli_within(limit, &["allow", "add", "198.51.100.1"]);
        let (code, _) = within(limit, "/readyz", || bed.testbed.http_get("/readyz"));
        assert!(code == 200 || code == 503, "{code}");
        replace.join().expect("replace");
    });
    let replaced = await_new_worker(&bed, stopped, Duration::from_secs(20));
    assert!(bed.testbed.status().worker.restarts >= 1);
    let log = bed.testbed.daemon_log();
    let missed = log.contains("no answer within") || log.contains("stopped or stuck");
    assert!(missed && log.contains(&format!("worker {stopped} was killed")), "{log}");
    assert_eq!(bed.exchange(0, Some(&bed.client), b"after").expect("exchange"), b"after");
    bed.testbed.cli_ok(&["allow", "add", "198.51.100.2"]);
    let listed = bed.testbed.cli_ok(&["allow", "list"]);
    assert!(listed.contains("198.51.100.2/32") && listed.contains("11.0.195.79/32"));

    // SIGTERM ends the gate within drain_timeout and a few seconds, also
    // with the new worker stopped.
    signal(replaced, Signal::SIGSTOP);
    bed.testbed.signal_daemon(Signal::SIGTERM);
    let exited = bed.testbed.wait_for_exit(Duration::from_secs(3 + 12));
    assert!(exited.is_some(), "the gate ignored SIGTERM:\n{}", bed.testbed.daemon_log());
}

/// Respawns used to run on runtime threads, and `PR_SET_PDEATHSIG` fires
/// when the forking *thread* exits: runtime threads retire (block_in_place
/// hands theirs over), and the worker died with every connection some
/// seconds later.
#[test]
fn a_respawned_worker_outlives_the_thread_that_asked_for_it() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    let first = await_worker(&bed);
    signal(first, Signal::SIGKILL);
    let respawned = await_new_worker(&bed, first, Duration::from_secs(10));

    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    let done = AtomicBool::new(false);
    let exchanges = std::thread::scope(|scope| {
        let holder = scope.spawn(|| {
            bed.in_client(0, || async {
                let mut tls = connect_tls(address, server, config, &[]).await?;
                let mut exchanges = 0u32;
                while !done.load(Ordering::Relaxed) {
                    let ping = format!("ping {exchanges}\n");
                    tls.write_all(ping.as_bytes()).await.map_err(|e| e.to_string())?;
                    let mut echo = vec![0u8; ping.len()];
                    let read =
                        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut echo));
                    read.await.map_err(|_| "no echo".to_owned())?.map_err(|e| e.to_string())?;
                    if echo != ping.as_bytes() {
                        return Err(format!("echo {echo:?}"));
                    }
                    exchanges += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok::<_, String>(exchanges)
            })
        });
        for n in 0..30u8 {
            let verb = if n % 2 == 0 { "add" } else { "del" };
            bed.testbed.cli_ok(&["allow", verb, &format!("198.51.100.{}", n / 2)]);
            std::thread::sleep(Duration::from_secs(2));
        }
        done.store(true, Ordering::Relaxed);
        holder.join().expect("holder")
    });
    let exchanges = exchanges
        .unwrap_or_else(|e| panic!("the held connection broke: {e}\n{}", bed.testbed.daemon_log()));
    assert!(exchanges >= 100, "{exchanges} exchanges in 60 s");
    assert_eq!(worker_pid(&bed), Some(respawned), "{}", bed.testbed.daemon_log());
    assert_eq!(bed.testbed.status().worker.restarts, 1);
}
