//! `cargo xtask bench update`: allowlist changes through the CLI against a
//! running daemon, on a namespace testbed.
//!
//! - `allow add`: from starting the CLI until a blocked source's TCP
//!   connection gets through (p50/p99 over `--rounds`, default 100);
//! - `allow replace` of 100k entries and back: seconds per replace, while a
//!   UDP flood from a source that both lists allow runs; any of its packets
//!   dropped by XDP is counted (the target is zero).
//!
//! Results also go to `target/bench/update.json`.

use std::{
    net::UdpSocket,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use proxy_common::Reason;

use edgegate_tests::{
    bench::{percentile, print_heading, save},
    testbed::{PROTECTED_PORT, Testbed},
};

/// Drops by the list (unlisted or denied), all families.
fn list_drops(testbed: &Testbed) -> u64 {
    testbed
        .status()
        .counters
        .iter()
        .filter(|c| matches!(c.reason, Reason::Unlisted | Reason::Denied))
        .map(|c| c.packets)
        .sum()
}

fn main() {
    edgegate_tests::require_root();
    let mut rounds = 100usize;
    let mut entries = 100_000u32;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--entries" => entries = args.next().and_then(|v| v.parse().ok()).expect("--entries N"),
            "--bench" => {}
            other => panic!("unknown argument {other} (--rounds N, --entries N)"),
        }
    }

    let testbed = Testbed::new(2);
    testbed.write_config(&format!(
        "max_entries = {}",
        (u64::from(entries) * 2 + 16).next_power_of_two()
    ));
    let allowed = testbed.clients[0].ipv4;
    let blocked = testbed.clients[1].ipv4.to_string();
    std::fs::create_dir_all(testbed.allowlist_path().parent().expect("dir")).expect("state dir");
    std::fs::write(testbed.allowlist_path(), format!("{allowed}/32\n")).expect("allowlist");
    testbed.start_daemon();

    // 1. One `allow add` until the blocked source connects.
    let mut visible_ms = Vec::new();
    let mut cli_ms = Vec::new();
    for _ in 0..rounds {
        assert!(!testbed.connects(
            1,
            testbed.server_v4(1),
            PROTECTED_PORT,
            Duration::from_millis(20)
        ));
        let started = Instant::now();
        testbed.cli_ok(&["allow", "add", &blocked]);
        cli_ms.push(started.elapsed().as_secs_f64() * 1e3);
        while !testbed.connects(1, testbed.server_v4(1), PROTECTED_PORT, Duration::from_millis(5)) {
            assert!(started.elapsed() < Duration::from_secs(5), "never became visible");
        }
        visible_ms.push(started.elapsed().as_secs_f64() * 1e3);
        testbed.cli_ok(&["allow", "del", &blocked]);
    }

    // 2. Replace with `entries` more entries and back, under a flood from a
    // source that every list allows.
    let dir = &testbed.dir;
    let small = dir.join("small.list");
    let large = dir.join("large.list");
    std::fs::write(&small, format!("{allowed}/32\n")).expect("small list");
    let mut text = format!("{allowed}/32\n");
    for i in 0..entries {
        text.push_str(&format!("{}/32\n", std::net::Ipv4Addr::from(0xac10_0000 + i)));
    }
    std::fs::write(&large, text).expect("large list");
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let server = testbed.server_v4(0);
    let mut replace_s = Vec::new();
    let drops_before = list_drops(&testbed);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            testbed.clients[0].netns.run(|| {
                let socket = UdpSocket::bind(("0.0.0.0", 0)).expect("udp");
                while !stop.load(Ordering::Relaxed) {
                    if socket.send_to(b"flood", (server, PROTECTED_PORT)).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        });
        for _ in 0..5 {
            for list in [&large, &small] {
                let started = Instant::now();
                testbed.cli_ok(&["allow", "replace", "--file", list.to_str().expect("UTF-8")]);
                if list == &large {
                    replace_s.push(started.elapsed().as_secs_f64());
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let dropped = list_drops(&testbed) - drops_before;

    print_heading("update");
    println!("\n| measurement | p50 | p99 | min | max | target |");
    println!("|---|---:|---:|---:|---:|---|");
    let row = |name: &str, samples: &[f64], unit: &str, target: &str| {
        println!(
            "| {name} | {:.2} {unit} | {:.2} {unit} | {:.2} {unit} | {:.2} {unit} | {target} |",
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            percentile(samples, 0.0),
            percentile(samples, 1.0)
        );
    };
    row("`allow add` until the source connects", &visible_ms, "ms", "< 10 ms");
    row("`allow add` CLI round trip alone", &cli_ms, "ms", "");
    row(&format!("`allow replace` of {entries} entries"), &replace_s, "s", "< 1 s");
    println!(
        "\nflood during the replaces: {} packets from a source both lists allow, {dropped} dropped by the list (target 0)",
        sent.load(Ordering::Relaxed)
    );

    let json = serde_json::json!({
        "allow_add_visible_ms": visible_ms,
        "allow_add_cli_ms": cli_ms,
        "replace_seconds": replace_s,
        "replace_entries": entries,
        "flood_packets": sent.load(Ordering::Relaxed),
        "flood_dropped": dropped,
    });
    save("update", &json);
}
