//! Least privilege: after start-up, every thread of the daemon (those that
//! parse TLS and PROXY headers included) runs as an unprivileged user with
//! only CAP_BPF and CAP_NET_BIND_SERVICE, and no way to regain more.

use edgegate_tests::mtls::{BackendMode, MtlsBed};

/// CAP_NET_BIND_SERVICE (10) and CAP_BPF (39).
const RETAINED: u64 = (1 << 10) | (1 << 39);
const NOBODY: &str = "65534";

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

#[test]
fn every_daemon_thread_runs_as_nobody_with_two_capabilities() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "user = \"nobody\"");
    bed.testbed.start_daemon();
    // Serve traffic first, so that every worker thread has started.
    assert_eq!(bed.exchange(0, Some(&bed.client), b"before").expect("exchange"), b"before");

    let pid = bed.testbed.daemon_pid();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .map(|task| task.expect("task").path())
        .collect();
    assert!(tasks.len() > 1, "a multi-threaded daemon");
    for task in tasks {
        let status = std::fs::read_to_string(task.join("status")).expect("status");
        let uids: Vec<&str> = field(&status, "Uid").split_whitespace().collect();
        assert_eq!(uids, [NOBODY; 4], "{}: real, effective, saved, fs uid", task.display());
        let gids: Vec<&str> = field(&status, "Gid").split_whitespace().collect();
        assert_eq!(gids, [NOBODY; 4], "{}", task.display());
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            let mask = u64::from_str_radix(field(&status, set), 16).expect("hex");
            assert_eq!(mask, RETAINED, "{}: {set} {mask:#x}", task.display());
        }
        assert_eq!(u64::from_str_radix(field(&status, "CapInh"), 16).expect("hex"), 0);
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{}", task.display());
    }

    // Unprivileged, it still does its whole job: map updates and the list
    // file, reloads that re-read certificates, readiness checks of the links.
    let listed = bed.testbed.cli_ok(&["allow", "add", "198.51.100.7"]);
    assert!(listed.contains("1 added"), "{listed}");
    let persisted = std::fs::read_to_string(bed.testbed.allowlist_path()).expect("list");
    assert!(persisted.contains("198.51.100.7/32"), "{persisted}");
    let reloaded = bed.testbed.cli_ok(&["reload"]);
    assert!(reloaded.contains("listener `edge`: reloaded"), "{reloaded}");
    assert_eq!(bed.testbed.http_get("/readyz").0, 200);
    assert_eq!(bed.exchange(0, Some(&bed.client), b"after").expect("exchange"), b"after");

    // The control socket stays root's: the daemon's own user cannot use it.
    let as_nobody = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(edgegate_tests::testbed::edgegate_binary())
        .arg("--control-socket")
        .arg(&bed.testbed.socket)
        .args(["allow", "add", "0.0.0.0/0"])
        .output()
        .expect("run the CLI as nobody");
    let message = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(!as_nobody.status.success());
    assert!(message.contains("permission denied") && message.contains("root-only"), "{message}");
}

#[test]
fn an_unknown_user_stops_the_start() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "user = \"no-such-edgegate-user\"");
    let output = bed.testbed.refused_start(&[]);
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("`daemon.user`: no user `no-such-edgegate-user`"), "{message}");
    assert!(!bed.testbed.bpffs_dir.exists(), "checked before anything is attached");
}

/// A state directory the daemon's user cannot reach (here: under a root-only
/// 0700 directory) would make every allowlist change fail with "Permission
/// denied" once the daemon runs; the start is refused instead, naming the
/// directory in the way and the fix, before anything is attached.
#[test]
fn a_state_directory_the_user_cannot_reach_stops_the_start() {
    use std::os::unix::fs::PermissionsExt as _;
    let bed = MtlsBed::new(BackendMode::Echo);
    let locked = bed.testbed.dir.join("root-only");
    std::fs::create_dir(&locked).expect("locked dir");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let state_dir = locked.join("state");
    bed.write("", "user = \"nobody\"");
    let state_override = ["--state-dir", state_dir.to_str().expect("UTF-8")];

    let output = bed.testbed.refused_start(&state_override);
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains(&format!(
            "`daemon.user` `nobody` cannot update the allowlist in {}",
            state_dir.display()
        )),
        "{message}"
    );
    assert!(message.contains("Permission denied"), "{message}");
    assert!(
        message.contains(&format!("`nobody` may not enter {}", locked.display()))
            && message.contains(&format!("chmod o+x {}", locked.display())),
        "{message}"
    );
    assert!(!bed.testbed.bpffs_dir.exists(), "refused before anything is attached");

    // Made searchable, the same config starts and the daemon's user changes the list.
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    bed.testbed.start_daemon_with(&state_override);
    let changed = bed.testbed.cli_ok(&["allow", "add", "198.51.100.7"]);
    assert!(changed.contains("1 added"), "{changed}");
}
