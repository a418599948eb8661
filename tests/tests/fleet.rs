//! Fleet mode against a real 3-member etcd cluster: three daemons, each in
//! its own namespace, enforce one list; changes made on any host reach all;
//! outages, gaps, corruption and crashes never open the gate.

use std::time::{Duration, Instant};

use edgegate_tests::fleet::{ALLOWED, Fleet, GROUP, HOSTS, STRANGER};

/// Seeds the group's list with the allowed client, on every host.
fn seeded(fleet: &Fleet) -> u64 {
    fleet.start_daemons();
    fleet.cli_ok(0, &["allow", "add", &ALLOWED.to_string(), "--wait"]);
    let generation = fleet.applied(0);
    fleet.await_generation(generation, Duration::from_secs(10));
    generation
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_change_on_one_host_is_enforced_on_every_host() {
    let fleet = Fleet::new(0);
    let seed = seeded(&fleet);
    for host in 0..HOSTS {
        assert!(fleet.allowed_connects(host), "allowed client, host {host}");
        assert!(!fleet.stranger_connects(host), "stranger before, host {host}");
    }

    let out = fleet.cli_ok(0, &["allow", "add", &STRANGER.to_string(), "--wait"]);
    assert!(out.contains(&format!("generation {}", seed + 1)), "{out}");
    assert!(out.contains("every live host enforces"), "{out}");
    for host in 0..HOSTS {
        assert!(fleet.stranger_connects(host), "stranger after allow add, host {host}");
    }
    let view = fleet.view(2);
    assert_eq!(view.group, GROUP);
    assert_eq!(view.current_generation, Some(seed + 1));
    assert_eq!(view.hosts.len(), HOSTS, "{view:?}");
    assert!(
        view.hosts.iter().all(|h| h.alive && h.generation == seed + 1 && h.lag == 0),
        "{view:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&fleet.cli_ok(1, &["fleet", "status", "--json"])).expect("JSON");
    assert_eq!(json["current_generation"], seed + 1);
    let listed = fleet.cli_ok(2, &["allow", "list"]);
    assert!(listed.contains(&format!("# group {GROUP}, generation {}", seed + 1)), "{listed}");
    assert!(listed.contains(&format!("{STRANGER}/32")), "{listed}");

    fleet.cli_ok(1, &["allow", "del", &STRANGER.to_string(), "--wait"]);
    for host in 0..HOSTS {
        assert!(!fleet.stranger_connects(host), "stranger after allow del, host {host}");
        assert!(fleet.allowed_connects(host), "allowed client after del, host {host}");
    }

    // The list is the group's: emptying it needs --force, and --offline is refused.
    let emptied = fleet.cli(0, &["allow", "del", &ALLOWED.to_string()]);
    assert!(!emptied.status.success());
    assert!(
        stderr(&emptied).contains("empty") && stderr(&emptied).contains("--force"),
        "{}",
        stderr(&emptied)
    );
    let config = fleet.hosts[0].config.to_str().expect("UTF-8").to_owned();
    let offline = fleet.cli(0, &["allow", "add", "192.0.2.1", "--offline", "--config", &config]);
    assert!(stderr(&offline).contains("fleet mode"), "{}", stderr(&offline));
    assert!(fleet.allowed_connects(0));
}

#[test]
fn concurrent_writers_on_two_hosts_lose_nothing() {
    let fleet = Fleet::new(0);
    seeded(&fleet);
    std::thread::scope(|scope| {
        for host in [0, 1] {
            let fleet = &fleet;
            scope.spawn(move || {
                for n in 0..20 {
                    fleet.cli_ok(host, &["allow", "add", &format!("198.51.{host}.{n}")]);
                }
            });
        }
    });
    let generation = fleet.view(0).current_generation.expect("a list");
    fleet.await_generation(generation, Duration::from_secs(10));
    for host in 0..HOSTS {
        let listed = fleet.cli_ok(host, &["allow", "list"]);
        for writer in [0, 1] {
            for n in 0..20 {
                assert!(
                    listed.contains(&format!("198.51.{writer}.{n}/32")),
                    "host {host} lacks 198.51.{writer}.{n}:\n{listed}"
                );
            }
        }
    }
}

#[test]
fn an_etcd_outage_keeps_every_host_enforcing() {
    let fleet = Fleet::new(0);
    let seed = seeded(&fleet);
    fleet.kill_member(1);
    fleet.kill_member(2);

    let refused = fleet.cli(0, &["allow", "add", &STRANGER.to_string()]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("etcd is unreachable")
            && stderr(&refused).contains("nothing changed"),
        "{}",
        stderr(&refused)
    );
    for host in 0..HOSTS {
        assert!(fleet.allowed_connects(host), "allowed client during the outage, host {host}");
        assert!(!fleet.stranger_connects(host), "stranger during the outage, host {host}");
    }
    // Staleness shows once the watches notice (keep-alive: a few seconds).
    fleet.await_connected(1, false);
    let status = fleet.cli_ok(1, &["status"]);
    assert!(status.contains("STALE"), "{status}");

    // A daemon started during the outage enforces its cached list at once.
    fleet.kill_daemon(0);
    fleet.start_daemon(0);
    assert!(fleet.allowed_connects(0), "restarted during the outage");
    assert!(!fleet.stranger_connects(0), "restarted during the outage: stranger");
    assert_eq!(fleet.applied(0), seed);

    fleet.start_member(1);
    fleet.start_member(2);
    fleet.await_etcd_healthy();
    fleet.cli_ok(2, &["allow", "add", &STRANGER.to_string(), "--wait", "--wait-timeout", "30s"]);
    for host in 0..HOSTS {
        assert!(fleet.stranger_connects(host), "after the outage, host {host}");
        // A watch may still be retrying a member that came back a moment ago.
        fleet.await_connected(host, true);
    }
}

#[test]
fn a_host_cut_off_during_changes_and_a_compaction_resyncs_once() {
    let fleet = Fleet::new(0);
    let seed = seeded(&fleet);
    let resyncs = fleet.status(2).fleet.expect("fleet").resyncs;
    fleet.set_link(2, false);
    for n in 0..3 {
        fleet.cli_ok(0, &["allow", "add", &format!("198.51.100.{n}")]);
    }
    fleet.cli_ok(0, &["allow", "add", &STRANGER.to_string()]);
    let revision = fleet.etcdctl_ok(&["get", "/edgegate", "--prefix", "--keys-only", "-w", "json"]);
    let revision =
        serde_json::from_str::<serde_json::Value>(&revision).expect("JSON")["header"]["revision"]
            .as_i64()
            .expect("revision");
    fleet.etcdctl_ok(&["compact", &revision.to_string()]);
    // Long enough for host 2's keep-alive to give up on its streams.
    std::thread::sleep(Duration::from_secs(8));
    fleet.set_link(2, true);
    fleet.await_generation(seed + 4, Duration::from_secs(30));
    assert!(fleet.stranger_connects(2), "host 2 after reconnecting");
    let after = fleet.status(2).fleet.expect("fleet");
    assert_eq!(after.resyncs, resyncs + 1, "{after:?}");
    assert!(after.watch_restarts.values().sum::<u64>() >= 1, "{after:?}");
}

/// `n` IPv4 and `n` IPv6 host entries that match no test client, plus `extra`.
fn big_list(n: u32, extra: &[std::net::Ipv4Addr]) -> String {
    let mut text = String::with_capacity(60 * 2 * n as usize);
    for i in 0..n {
        let [_, b, c, d] = (0x0b00_0000 | i).to_be_bytes();
        text.push_str(&format!(
            "11.{b}.{c}.{d}/32\n2001:db8::{:x}:{:x}/128\n",
            i >> 16,
            i & 0xffff
        ));
    }
    for address in extra {
        text.push_str(&format!("{address}/32\n"));
    }
    text
}

#[test]
fn a_100k_replace_is_enforced_everywhere_and_a_corrupt_generation_is_refused() {
    let fleet = Fleet::new(0);
    seeded(&fleet);
    let file = fleet.dir.join("big.list");
    std::fs::write(&file, big_list(50_000, &[ALLOWED])).expect("write list");
    let started = Instant::now();
    fleet.cli_ok(
        1,
        &[
            "allow",
            "replace",
            "--file",
            file.to_str().expect("UTF-8"),
            "--wait",
            "--wait-timeout",
            "120s",
        ],
    );
    eprintln!("100k-entry replace enforced on {HOSTS} hosts in {:?}", started.elapsed());
    let generation = fleet.applied(1);
    for host in 0..HOSTS {
        let status = fleet.status(host);
        assert_eq!((status.ipv4_entries, status.ipv6_entries), (50_001, 50_000), "host {host}");
        assert!(fleet.allowed_connects(host) && !fleet.stranger_connects(host), "host {host}");
    }

    // A pointer to a chunk that does not match its hash, written behind edgegate's back.
    let dir = format!("/edgegate/{GROUP}/list/gen/{:020}-{:016x}/", generation + 1, 0xbad);
    fleet.etcdctl_ok(&["put", &format!("{dir}000000"), &format!("{STRANGER}/32\n")]);
    let pointer = serde_json::json!({
        "generation": generation + 1, "dir": dir, "chunks": 1, "entries": 1,
        "sha256": "00".repeat(32), "committed_at_ms": 0, "committed_by": "intruder",
    });
    fleet.etcdctl_ok(&["put", &format!("/edgegate/{GROUP}/list/current"), &pointer.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    for host in 0..HOSTS {
        loop {
            let status = fleet.status(host).fleet.expect("fleet");
            if status.apply_errors > 0 {
                assert!(
                    status.last_error.as_deref().unwrap_or("").contains("SHA-256"),
                    "{status:?}"
                );
                assert_eq!(status.applied_generation, generation);
                break;
            }
            assert!(Instant::now() < deadline, "host {host} did not refuse: {status:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            fleet.allowed_connects(host) && !fleet.stranger_connects(host),
            "host {host} after corruption"
        );
    }
    // An adding change cannot build on a corrupt list; a replacement repairs it.
    let refused = fleet.cli(0, &["allow", "add", "192.0.2.1"]);
    assert!(stderr(&refused).contains("corrupt"), "{}", stderr(&refused));
    let repair = fleet.dir.join("repair.list");
    std::fs::write(&repair, format!("{ALLOWED}\n{STRANGER}\n")).expect("write");
    fleet.cli_ok(0, &["allow", "replace", "--file", repair.to_str().expect("UTF-8"), "--wait"]);
    for host in 0..HOSTS {
        assert!(fleet.stranger_connects(host), "host {host} after the repair");
    }
}

#[test]
fn a_daemon_killed_while_applying_converges_and_never_opens() {
    let fleet = Fleet::new(0);
    let seed = seeded(&fleet);
    let file = fleet.dir.join("big.list");
    std::fs::write(&file, big_list(50_000, &[ALLOWED])).expect("write list");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (passed, probes) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut passed, mut probes) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && probes < 2000 {
                passed += u32::from(fleet.stranger_connects(1));
                probes += 1;
            }
            (passed, probes)
        });
        let writer = scope.spawn(|| {
            fleet.cli_ok(0, &["allow", "replace", "--file", file.to_str().expect("UTF-8")])
        });
        // Kill host 1 as soon as the new generation is committed: it is
        // fetching or applying 100k entries.
        let key = format!("/edgegate/{GROUP}/list/current");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !fleet
            .etcdctl_ok(&["get", &key, "--print-value-only"])
            .contains(&format!("\"generation\":{}", seed + 1))
        {
            assert!(Instant::now() < deadline, "the replace was never committed");
            std::thread::sleep(Duration::from_millis(5));
        }
        fleet.kill_daemon(1);
        fleet.start_daemon(1);
        writer.join().expect("writer");
        fleet.await_generation(seed + 1, Duration::from_secs(60));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        prober.join().expect("prober")
    });
    assert_eq!(passed, 0, "the stranger passed {passed} of {probes} probes");
    assert!(probes > 0);
    let status = fleet.status(1);
    assert_eq!(status.ipv4_entries + status.ipv6_entries, 100_001);
    assert!(fleet.allowed_connects(1));
}
