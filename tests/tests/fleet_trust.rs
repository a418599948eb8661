//! Fleet trust, tried from outside: a hostile writer of etcd (`root`, with
//! `etcdctl`, no edgegate code) and a compromised gate host. Whatever they
//! write, every host stays up, keeps enforcing the last good list (the
//! partner connects, a stranger does not), says what it refused, and takes
//! the next real change. Other applications' keys survive the repairs.

use std::time::{Duration, Instant};

use edgegate_tests::fleet::{ADMIN_USER, ALLOWED, Fleet, GROUP, HOSTS, STRANGER, host_user};
use sha2::Digest as _;

fn current_key() -> String {
    format!("/edgegate/{GROUP}/list/current")
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every host's refusals so far.
fn refusals(fleet: &Fleet) -> Vec<u64> {
    (0..HOSTS)
        .map(|host| fleet.status(host).fleet.expect("fleet").refusals.values().sum())
        .collect()
}

/// Waits (bounded) until every host refused once more than `before`, with
/// `reason` counted and shown; then checks that each still enforces the
/// last good list.
fn assert_refused(fleet: &Fleet, before: &[u64], reason: &str, case: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for (host, before) in before.iter().enumerate() {
        loop {
            let status = fleet.status(host).fleet.expect("fleet");
            if status.refusals.values().sum::<u64>() > *before {
                assert!(status.refusals.contains_key(reason), "{case}, host {host}: {status:?}");
                assert!(status.last_refusal.is_some(), "{case}, host {host}: {status:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{case}: host {host} did not refuse: {status:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(fleet.allowed_connects(host), "{case}: the partner, host {host}");
        assert!(!fleet.stranger_connects(host), "{case}: the stranger, host {host}");
    }
}

/// Writes a chunk and a pointer to it straight into etcd, as `root`;
/// `edit` changes the pointer's JSON before it is written.
fn write_generation(fleet: &Fleet, list: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let generation = (0..HOSTS).map(|h| fleet.applied(h)).max().expect("hosts") + 1;
    let dir = format!("/edgegate/{GROUP}/list/gen/{generation:020}-{:016x}/", 0xbad);
    fleet.etcdctl_ok(&["put", &format!("{dir}000000"), list]);
    let sha256: String =
        sha2::Sha256::digest(list.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let mut pointer = serde_json::json!({
        "generation": generation, "previous": generation - 1, "dir": dir, "chunks": 1,
        "entries": list.lines().count(), "sha256": sha256, "committed_at_ms": 0,
        "committed_by": "intruder",
    });
    edit(&mut pointer);
    fleet.etcdctl_ok(&["put", &current_key(), &pointer.to_string()]);
}

/// Keys of other applications and groups, which no repair may touch.
fn plant_canaries(fleet: &Fleet) -> Vec<(String, String)> {
    let canaries = vec![
        ("/zzz-other-app/config".to_owned(), "keep me".to_owned()),
        ("/edgegate/other-group/list/current".to_owned(), "{\"theirs\":1}".to_owned()),
        (format!("/edgegate/{GROUP}/other-key"), "mine, not edgegate's".to_owned()),
        ("/\u{1}low".to_owned(), "sorts first".to_owned()),
    ];
    for (key, value) in &canaries {
        fleet.etcdctl_ok(&["put", key, value]);
    }
    canaries
}

fn assert_canaries(fleet: &Fleet, canaries: &[(String, String)]) {
    for (key, value) in canaries {
        let got = fleet.etcdctl_ok(&["get", key, "--print-value-only"]);
        assert_eq!(got.trim(), value, "canary {key:?} lost");
    }
}

/// The admin's repair: the list written whole, signed, and waited for.
fn repair(fleet: &Fleet, marker: &str) {
    let file = fleet.dir.join("repair.list");
    std::fs::write(&file, format!("{ALLOWED}\n{marker}\n")).expect("write list");
    fleet.admin_cli_ok(&["allow", "replace", "--file", file.to_str().expect("UTF-8"), "--wait"]);
    for host in 0..HOSTS {
        let listed = fleet.cli_ok(host, &["allow", "list"]);
        assert!(listed.contains(marker), "host {host} lacks {marker}:\n{listed}");
        assert!(fleet.allowed_connects(host) && !fleet.stranger_connects(host), "host {host}");
    }
}

#[test]
fn a_signed_fleet_enforces_only_what_a_trusted_key_signed() {
    let fleet = Fleet::signed(0);
    fleet.start_daemons();
    let out = fleet.admin_cli_ok(&["allow", "add", &ALLOWED.to_string(), "--wait"]);
    assert!(out.contains("signed") && out.contains("every live host enforces"), "{out}");
    let canaries = plant_canaries(&fleet);
    for host in 0..HOSTS {
        assert!(fleet.allowed_connects(host) && !fleet.stranger_connects(host), "host {host}");
        let status = fleet.cli_ok(host, &["status"]);
        assert!(status.contains("need a signature by a trusted key"), "{status}");
    }

    // A gate host cannot change the list: its daemon has no key, and its etcd
    // user may not write the list (it goes on working).
    let refused = fleet.cli(0, &["allow", "add", &STRANGER.to_string()]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("--signing-key"), "{}", stderr(&refused));
    let denied = fleet.etcdctl_as(&host_user(1), &["put", &current_key(), "{}"]);
    assert!(!denied.status.success(), "a host's user wrote the list");
    assert!(stderr(&denied).contains("permission denied"), "{}", stderr(&denied));
    fleet.write_admin_config(&host_user(1));
    let as_host = fleet.admin_cli(&["allow", "add", &STRANGER.to_string()]);
    assert!(!as_host.status.success());
    assert!(stderr(&as_host).contains("permission denied"), "{}", stderr(&as_host));
    fleet.write_admin_config(ADMIN_USER);
    for host in 0..HOSTS {
        assert!(fleet.allowed_connects(host) && !fleet.stranger_connects(host), "host {host}");
    }

    // An allow-all generation with a matching hash, unsigned.
    let before = refusals(&fleet);
    write_generation(&fleet, "0.0.0.0/0\n", |_| {});
    assert_refused(&fleet, &before, "unsigned", "unsigned allow-all");
    // A change cannot build on it: the admin is told to review and replace.
    let on_top = fleet.admin_cli(&["allow", "add", "192.0.2.1"]);
    assert!(
        stderr(&on_top).contains("refused") && stderr(&on_top).contains("allow replace"),
        "{}",
        stderr(&on_top)
    );
    repair(&fleet, "192.0.2.10/32");

    // An allow-all list, signed by a key the hosts do not trust.
    let other = fleet.dir.join("other");
    let keygen = fleet.cli(0, &["fleet", "keygen", "--out", other.to_str().expect("UTF-8")]);
    assert!(keygen.status.success(), "{}", stderr(&keygen));
    let allow_all = fleet.dir.join("allow-all.list");
    std::fs::write(&allow_all, "0.0.0.0/0\n").expect("write");
    let before = refusals(&fleet);
    let by_other = fleet.admin_cli_with(
        &["allow", "replace", "--file", allow_all.to_str().expect("UTF-8")],
        &fleet.dir.join("other.key"),
    );
    assert!(by_other.status.success(), "{}", stderr(&by_other));
    assert_refused(&fleet, &before, "untrusted_key", "signed by another key");
    repair(&fleet, "192.0.2.11/32");

    // A replay: an older, validly signed pointer and its chunks put back.
    let old_pointer = fleet.etcdctl_ok(&["get", &current_key(), "--print-value-only"]);
    let old: serde_json::Value = serde_json::from_str(old_pointer.trim()).expect("pointer");
    let old_dir = old["dir"].as_str().expect("dir").to_owned();
    let old_chunk = fleet.etcdctl_ok(&["get", &format!("{old_dir}000000"), "--print-value-only"]);
    fleet.admin_cli_ok(&["allow", "add", "192.0.2.12", "--wait"]);
    let before = refusals(&fleet);
    // etcdctl prints the value and a line break of its own.
    let old_chunk = old_chunk.strip_suffix('\n').expect("etcdctl's line break");
    fleet.etcdctl_ok(&["put", &format!("{old_dir}000000"), old_chunk]);
    fleet.etcdctl_ok(&["put", &current_key(), old_pointer.trim()]);
    assert_refused(&fleet, &before, "rollback", "replayed pointer");
    for host in 0..HOSTS {
        let listed = fleet.cli_ok(host, &["allow", "list"]);
        assert!(listed.contains("192.0.2.12/32"), "host {host} went back:\n{listed}");
    }
    // As after a restore from an old backup: the next change builds on what
    // etcd holds and lands above every host's generation.
    let applied = fleet.applied(0);
    fleet.admin_cli_ok(&["allow", "add", "192.0.2.13", "--wait"]);
    for host in 0..HOSTS {
        assert!(fleet.applied(host) > applied, "host {host} did not move forward");
        assert!(fleet.allowed_connects(host) && !fleet.stranger_connects(host), "host {host}");
    }

    // A restarted host keeps its generation: the replay is refused again.
    let before = refusals(&fleet);
    fleet.etcdctl_ok(&["put", &current_key(), old_pointer.trim()]);
    assert_refused(&fleet, &before, "rollback", "replay before a restart");
    fleet.kill_daemon(2);
    fleet.start_daemon(2);
    assert!(fleet.applied(2) > applied, "host 2 forgot its generation");
    assert!(fleet.allowed_connects(2) && !fleet.stranger_connects(2), "host 2 after restart");
    repair(&fleet, "192.0.2.14/32");
    assert_canaries(&fleet, &canaries);
}

/// A change to a pointer's JSON before it is written.
type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

/// The values the audit used to crash and open hosts, written into a fleet
/// without `trusted_keys` (where any etcd writer decides the list, but none
/// may crash a host or reach beyond the group).
#[test]
fn hostile_values_never_crash_a_host_or_reach_beyond_the_group() {
    let fleet = Fleet::new(0);
    fleet.start_daemons();
    fleet.cli_ok(0, &["allow", "add", &ALLOWED.to_string(), "--wait"]);
    let canaries = plant_canaries(&fleet);
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("2^40 chunks", "out_of_bounds", Box::new(|p| p["chunks"] = (1u64 << 40).into())),
        ("2^64-1 chunks", "out_of_bounds", Box::new(|p| p["chunks"] = u64::MAX.into())),
        ("huge entries", "out_of_bounds", Box::new(|p| p["entries"] = u64::MAX.into())),
        (
            "dir outside the group",
            "out_of_bounds",
            Box::new(|p| p["dir"] = "/zzz-other-app/".into()),
        ),
        ("NUL dir", "out_of_bounds", Box::new(|p| p["dir"] = "\u{0}".into())),
        ("garbage JSON", "malformed", Box::new(|p| *p = "{\"generation\": [".into())),
    ];
    for (n, (case, reason, edit)) in cases.into_iter().enumerate() {
        let before = refusals(&fleet);
        write_generation(&fleet, "0.0.0.0/0\n", edit);
        assert_refused(&fleet, &before, reason, case);
        // A change from the CLI is answered (never an EOF), naming the repair.
        let add = fleet.cli(1, &["allow", "add", "192.0.2.1"]);
        assert!(!add.status.success(), "{case}: a change built on a refused pointer");
        assert!(stderr(&add).contains("allow replace"), "{case}: {}", stderr(&add));
        // The documented repair works and deletes nothing outside the group's list.
        let file = fleet.dir.join("repair.list");
        let marker = format!("192.0.2.{}/32", 100 + n);
        std::fs::write(&file, format!("{ALLOWED}\n{marker}\n")).expect("write");
        fleet.cli_ok(0, &["allow", "replace", "--file", file.to_str().expect("UTF-8"), "--wait"]);
        for host in 0..HOSTS {
            assert!(
                fleet.cli_ok(host, &["allow", "list"]).contains(&marker),
                "{case}: host {host}"
            );
        }
        assert_canaries(&fleet, &canaries);
    }
    // And a later change cleans the old generations up, inside the group only.
    fleet.cli_ok(2, &["allow", "add", "192.0.2.200", "--wait"]);
    let generations = fleet.etcdctl_ok(&[
        "get",
        &format!("/edgegate/{GROUP}/list/gen/"),
        "--prefix",
        "--keys-only",
    ]);
    let dirs: std::collections::BTreeSet<&str> = generations
        .lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.rsplit_once('/'))
        .map(|(d, _)| d)
        .collect();
    assert!(dirs.len() <= 3, "old generations left behind: {dirs:?}");
    assert_canaries(&fleet, &canaries);
    for host in 0..HOSTS {
        let status = fleet.status(host).fleet.expect("fleet");
        assert_eq!(status.follower_restarts, 0, "host {host}: {status:?}");
        assert!(
            !fleet.daemon_log(host).contains("panicked"),
            "host {host}:\n{}",
            fleet.daemon_log(host)
        );
    }
}
