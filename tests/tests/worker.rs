//! The proxy worker under attack, watched from outside: whatever a
//! compromised worker tries is refused or kills it, the gate starts another
//! with backoff, and the filter (held by the gate) never opens meanwhile.

use std::time::{Duration, Instant};

use edgegate_tests::mtls::{BackendMode, LISTENER_PORT, MtlsBed};

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
    bed.write("", "user = \"nobody\"");
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
        };
        assert!(!log.contains("SUCCEEDED"), "{attempt}:\n{log}");
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
    bed.write("", "user = \"nobody\"");
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
