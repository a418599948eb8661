//! The proxy worker under attack, watched from outside: whatever a
//! compromised worker tries is refused or kills it, the gate starts another
//! with backoff, and the filter (held by the gate) never opens meanwhile.

use std::time::{Duration, Instant};

use std::net::{SocketAddr, TcpListener, TcpStream};

use edgegate_tests::{
    mtls::{BACKEND_PORT, BackendMode, LISTENER_PORT, MtlsBed},
    testbed::{OPEN_PORT, TcpServer},
};

/// Client 1 is a stranger: not on the allowlist.
const STRANGER: usize = 1;

/// How each attempt must end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    /// The call returns an error; the worker serves on.
    Refused,
    /// seccomp kills the worker.
    Killed,
    /// The gate drops the worker for what it sent.
    Dropped,
    /// The gate kills the worker for what it asked of its keys.
    KilledOverKeys,
}

fn stranger_passes(bed: &MtlsBed) -> bool {
    let server = bed.testbed.server_v4(STRANGER);
    bed.testbed.tcp_connects(STRANGER, server, LISTENER_PORT, Duration::from_millis(150))
}

/// Waits up to 10 s for `log` (after `from`) to satisfy `done`, probing
/// the filter with the stranger all the while.
fn watch(bed: &MtlsBed, from: usize, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(!stranger_passes(bed), "{what}: a stranger got through the filter");
        let log = bed.testbed.daemon_log()[from..].to_owned();
        if done(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what}: never happened:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_escape_attempt_is_refused_or_kills_the_worker() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "");
    let mut allowlist = None;
    for (attempt, fate) in [
        ("bpf-obj-get", Fate::Killed),
        ("write-allowlist", Fate::Refused),
        ("read-shadow", Fate::Refused),
        ("control-socket", Fate::Killed),
        ("exec-shell", Fate::Killed),
        ("ptrace-gate", Fate::Killed),
        ("bind-port", Fate::Killed),
        ("kill-gate", Fate::Killed),
        ("mptcp-socket", Fate::Killed),
        ("tcp-ulp", Fate::Killed),
        ("prctl", Fate::Killed),
        ("oversized-message", Fate::Dropped),
        ("unknown-message", Fate::Dropped),
        ("truncated-message", Fate::Dropped),
        ("sign-anything", Fate::KilledOverKeys),
    ] {
        let from = bed.testbed.daemon_log().len();
        bed.testbed.start_daemon_with(&["--worker-escape", attempt]);
        let gate = bed.testbed.daemon_pid();
        let list = std::fs::read_to_string(bed.testbed.allowlist_path()).expect("the list");
        allowlist.get_or_insert(list);
        watch(&bed, from, attempt, |log| log.contains("escape attempt `"));
        let log = match fate {
            Fate::Refused => watch(&bed, from, attempt, |log| log.contains(": refused: ")),
            Fate::Killed => watch(&bed, from, attempt, |log| {
                log.contains("killed by SIGSYS (a system call its seccomp filter forbids)")
            }),
            Fate::Dropped => watch(&bed, from, attempt, |log| log.contains("protocol violation")),
            Fate::KilledOverKeys => watch(&bed, from, attempt, |log| {
                log.contains(
                    "its key channel carried a signature over something no TLS handshake signs",
                ) && log.contains("killed by SIGKILL")
            }),
        };
        assert!(!log.contains("SUCCEEDED"), "{attempt}:\n{log}");
        // The worker's lines reach the log labelled as the worker's.
        let attempts: Vec<&str> = log.lines().filter(|l| l.contains("escape attempt `")).collect();
        assert!(attempts.iter().all(|l| l.starts_with("worker[")), "{attempt}: {attempts:?}");
        if fate == Fate::Refused {
            assert!(log.contains("Permission denied"), "{attempt}:\n{log}");
            // It serves on, sandboxed.
            assert_eq!(bed.exchange(0, Some(&bed.client), b"on").expect("exchange"), b"on");
        } else {
            // The gate starts another (which tries again, and so on).
            watch(&bed, from, attempt, |log| log.matches("proxy worker serves").count() >= 2);
            let restarts = bed.testbed.status().worker.restarts;
            assert!(restarts >= 1, "{attempt}: {restarts} restarts");
        }
        let gate = nix::unistd::Pid::from_raw(gate as i32);
        assert!(nix::sys::signal::kill(gate, None).is_ok(), "{attempt}: the gate lives");
        bed.testbed.stop_daemon();
        let list = std::fs::read_to_string(bed.testbed.allowlist_path()).expect("the list");
        assert_eq!(Some(&list), allowlist.as_ref(), "{attempt}: the list changed");
    }
}

#[test]
fn killing_the_worker_in_a_loop_never_opens_the_filter() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "");
    bed.testbed.start_daemon();
    let mut seen_not_ready = false;
    let kills = 5;
    for round in 0..kills {
        let worker = await_worker(&bed, None);
        let pid = nix::unistd::Pid::from_raw(worker as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9 the worker");
        // While no worker serves: /readyz says so, the stranger stays out.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(!stranger_passes(&bed), "round {round}: a stranger got through");
            let (code, body) = bed.testbed.http_get("/readyz");
            if code == 503 {
                assert!(body.contains("no proxy worker serves"), "{body}");
                seen_not_ready = true;
            }
            if bed.testbed.status().worker.pid.is_some_and(|pid| pid != worker) {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: no new worker");
        }
        // Good clients recover.
        let deadline = Instant::now() + Duration::from_secs(10);
        while bed.exchange(0, Some(&bed.client), b"back").as_deref() != Ok(b"back".as_slice()) {
            assert!(Instant::now() < deadline, "round {round}: the good client never recovers");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(seen_not_ready, "/readyz never answered 503 while a worker was down");
    assert_eq!(bed.testbed.status().worker.restarts, kills);
    let (_, metrics) = bed.testbed.http_get("/metrics");
    assert!(metrics.contains(&format!("edgegate_worker_restarts_total {kills}")), "{metrics}");
    assert!(metrics.contains("edgegate_worker_up 1"), "{metrics}");
    assert_eq!(bed.testbed.http_get("/readyz").0, 200);
}

/// Where a compromised worker would go: the instance metadata service,
/// etcd, the backend's port on another address, any other port, IPv6.
/// Each is reachable from the server's namespace by anyone but the worker.
struct Strangers {
    addresses: Vec<SocketAddr>,
    _servers: Vec<TcpServer>,
    _listener: TcpListener,
}

/// Metadata, etcd, and the backend's port on another loopback address.
const METADATA: &str = "169.254.169.254:80";
const ETCD: &str = "127.0.0.1:2379";

fn strangers(bed: &MtlsBed) -> Strangers {
    let server = &bed.testbed.server;
    server.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let servers = vec![TcpServer::start(server, 80), TcpServer::start(server, 2379)];
    let other_backend: SocketAddr = ([127, 0, 0, 2], BACKEND_PORT).into();
    let listener = server.run(|| TcpListener::bind(other_backend).expect("bind"));
    let addresses = vec![
        METADATA.parse().unwrap(),
        ETCD.parse().unwrap(),
        other_backend,
        ([127, 0, 0, 1], OPEN_PORT).into(),
        (bed.testbed.server_v6(0), OPEN_PORT).into(),
    ];
    for address in &addresses {
        let reached = server.run(|| TcpStream::connect_timeout(address, Duration::from_secs(1)));
        assert!(reached.is_ok(), "{address} is not reachable even from outside the worker");
    }
    Strangers { addresses, _servers: servers, _listener: listener }
}

#[test]
fn the_worker_connects_to_its_backends_and_nowhere_else() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let strangers = strangers(&bed);
    let other_backend: SocketAddr = ([127, 0, 0, 2], BACKEND_PORT).into();
    let mut attempts: Vec<(&str, SocketAddr)> =
        strangers.addresses.iter().map(|address| ("connect", *address)).collect();
    for address in [METADATA.parse().unwrap(), other_backend] {
        attempts.push(("connect-mapped", address));
        attempts.push(("fast-open", address));
    }
    bed.write("", "");
    for (attempt, address) in attempts {
        let what = format!("{attempt} to {address}");
        let from = bed.testbed.daemon_log().len();
        let target = address.to_string();
        bed.testbed.start_daemon_with(&[
            "--worker-escape",
            attempt,
            "--worker-escape-address",
            &target,
        ]);
        let log = watch(&bed, from, &what, |log| {
            log.contains(": refused: ") || log.contains("SUCCEEDED")
        });
        assert!(!log.contains("SUCCEEDED"), "{what}:\n{log}");
        // The cgroup's filter refuses with EPERM; Landlock (Linux 6.7), where
        // it knows the port is not a backend's, first with EACCES.
        let refused_by_address = log.contains("Operation not permitted");
        assert!(refused_by_address || log.contains("Permission denied"), "{what}:\n{log}");
        if address == other_backend {
            assert!(refused_by_address, "{what}: the backend's port elsewhere:\n{log}");
        }
        // The backend itself stays reachable.
        assert_eq!(bed.exchange(0, Some(&bed.client), b"on").expect("exchange"), b"on", "{what}");
        let egress = bed.testbed.status().worker.egress;
        assert!(egress.confined, "{what}: {egress:?}");
        assert_eq!(egress.destinations, [format!("127.0.0.1:{BACKEND_PORT}")], "{what}");
        if refused_by_address {
            assert!(egress.refused >= 1, "{what}: {egress:?}");
        }
        bed.testbed.stop_daemon();
    }
}

#[test]
fn a_reload_that_moves_the_backend_moves_the_permission() {
    let bed = MtlsBed::new(BackendMode::Echo);
    // The new backend: another address and port, greeting with "hello".
    let moved: SocketAddr = ([127, 0, 0, 2], BACKEND_PORT + 1).into();
    let _greeter = TcpServer::start(&bed.testbed.server, moved.port());
    bed.write("", "");
    let target = moved.to_string();
    // Every worker tries the new backend once, when it starts; a port
    // outside the running worker's Landlock rules makes a reload start one.
    bed.testbed.start_daemon_with(&[
        "--worker-escape",
        "connect",
        "--worker-escape-address",
        &target,
    ]);
    let log = watch(&bed, 0, "before", |log| log.contains(": refused: "));
    assert!(!log.contains("SUCCEEDED"), "{log}");

    let original = std::fs::read_to_string(&bed.testbed.config).expect("config");
    let at = |backend: &str| {
        let config = original.replace(&format!("127.0.0.1:{BACKEND_PORT}"), backend);
        std::fs::write(&bed.testbed.config, config).expect("config");
        let from = bed.testbed.daemon_log().len();
        bed.testbed.cli_ok(&["reload"]);
        let log = watch(&bed, from, backend, |log| {
            log.contains(": refused: ") || log.contains("SUCCEEDED")
        });
        let egress = bed.testbed.status().worker.egress;
        assert_eq!(egress.destinations, [backend], "{egress:?}");
        log
    };
    let log = at(&target);
    assert!(log.contains("SUCCEEDED"), "the new backend stays refused:\n{log}");
    let greeting = bed.exchange(0, Some(&bed.client), b"").expect("exchange");
    assert_eq!(greeting, b"hello", "served by the new backend");

    let log = at(&format!("127.0.0.1:{BACKEND_PORT}"));
    assert!(!log.contains("SUCCEEDED"), "the old backend stays allowed:\n{log}");
    assert_eq!(bed.exchange(0, Some(&bed.client), b"back").expect("exchange"), b"back");
}

/// The worker's pid once one serves (another than `not`).
fn await_worker(bed: &MtlsBed, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = bed.testbed.status().worker.pid.filter(|pid| Some(*pid) != not) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no worker serves");
        std::thread::sleep(Duration::from_millis(20));
    }
}
