//! Safe rollout against the real daemon on veth pairs: audit mode switched
//! by reload both ways, the sample of dropped sources, `allow explain`
//! checked against the loaded program, and `allow suggest` learning from
//! real mTLS clients.

use std::{net::IpAddr, time::Duration};

use edgegate::{
    learned::Suggestion,
    status::{Explanation, Status},
};
use edgegate_tests::{
    mtls::{BackendMode, MtlsBed},
    packet::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, Fragment, Transport, ethernet, ipv4, ipv6},
    testbed::{OPEN_PORT, PROTECTED_PORT, Testbed},
};
use proxy_common::{Reason, Verdict};

/// Long enough for a SYN and its SYN-ACK on a veth; short enough that a
/// dropped SYN (first retransmit after 1 s) is not retried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

/// Client 0 allowed, client 1 not listed; `filter` is added to `[filter]`.
fn testbed(filter: &str) -> Testbed {
    let testbed = Testbed::new(2);
    testbed.write_config(filter);
    let list = format!("{}/32\n{}/128\n", testbed.clients[0].ipv4, testbed.clients[0].ipv6);
    std::fs::create_dir_all(testbed.allowlist_path().parent().expect("dir")).expect("state dir");
    std::fs::write(testbed.allowlist_path(), list).expect("write allowlist");
    testbed.start_daemon();
    testbed
}

fn status_json(testbed: &Testbed) -> Status {
    let output = testbed.cli_ok(&["status", "--dropped", "--json"]);
    serde_json::from_str(&output).expect("status --json")
}

fn sampled(status: &Status, source: IpAddr) -> Option<(Reason, u64)> {
    status.dropped_sources.iter().find(|s| s.source == source).map(|s| (s.reason, s.packets))
}

#[test]
fn audit_mode_passes_and_counts_would_be_drops_and_switches_on_reload_both_ways() {
    let testbed = testbed("audit = true");
    let stranger = IpAddr::V4(testbed.clients[1].ipv4);
    let text = testbed.cli_ok(&["status"]);
    assert!(text.contains("mode:       AUDIT"), "{text}");
    assert!(testbed.status().audit);
    let check = testbed.check();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success() && said.contains("audit mode: nothing is dropped"), "{said}");

    assert!(testbed.connects(1, testbed.server_v4(1), PROTECTED_PORT, CONNECT_TIMEOUT));
    assert!(testbed.connects(1, testbed.server_v6(1), PROTECTED_PORT, CONNECT_TIMEOUT));
    assert!(testbed.counted_as("ipv4", "unlisted", Verdict::WouldDrop) > 0);
    assert!(testbed.counted_as("ipv6", "unlisted", Verdict::WouldDrop) > 0);
    assert_eq!(testbed.counted_as("ipv4", "unlisted", Verdict::Drop), 0, "nothing dropped");
    let status = status_json(&testbed);
    assert_eq!(sampled(&status, stranger).map(|s| s.0), Some(Reason::Unlisted), "sampled in audit");

    // Enforcing, by reload: the stranger is dropped, the allowed client is not.
    testbed.write_config("");
    testbed.cli_ok(&["reload"]);
    assert!(testbed.cli_ok(&["status"]).contains("mode:       enforcing"));
    let would_drop = testbed.counted_as("ipv4", "unlisted", Verdict::WouldDrop);
    assert!(!testbed.connects(1, testbed.server_v4(1), PROTECTED_PORT, CONNECT_TIMEOUT));
    assert!(testbed.connects(0, testbed.server_v4(0), PROTECTED_PORT, CONNECT_TIMEOUT));
    assert!(testbed.counted_as("ipv4", "unlisted", Verdict::Drop) > 0);
    assert_eq!(testbed.counted_as("ipv4", "unlisted", Verdict::WouldDrop), would_drop);

    // And back to audit, again without a restart.
    testbed.write_config("audit = true");
    testbed.cli_ok(&["reload"]);
    assert!(testbed.connects(1, testbed.server_v4(1), PROTECTED_PORT, CONNECT_TIMEOUT));
    assert!(testbed.counted_as("ipv4", "unlisted", Verdict::WouldDrop) > would_drop);
    assert!(testbed.status().audit);
}

#[test]
fn the_drop_sample_names_the_strangers_with_their_counts() {
    let testbed = testbed("");
    // A deny inside an allow, to see the `denied` reason too.
    testbed.cli_ok(&["allow", "add", "198.51.100.0/24"]);
    testbed.cli_ok(&["deny", "add", "198.51.100.7"]);
    let syn = Transport::Tcp { dst_port: PROTECTED_PORT };
    let strangers: Vec<IpAddr> =
        (1..=5).map(|i| format!("192.0.2.{i}").parse().expect("address")).collect();
    // Few enough packets to stay inside the per-CPU budget: exact counts.
    for (index, stranger) in strangers.iter().enumerate() {
        let IpAddr::V4(source) = stranger else { unreachable!() };
        let frame = ethernet(&[], ETHERTYPE_IPV4, ipv4(*source, syn, &[], Fragment::default()));
        for _ in 0..(index + 1) * 7 {
            testbed.inject(1, &frame.bytes);
        }
    }
    let denied: IpAddr = "198.51.100.7".parse().expect("address");
    let IpAddr::V4(denied_v4) = denied else { unreachable!() };
    let frame = ethernet(&[], ETHERTYPE_IPV4, ipv4(denied_v4, syn, &[], Fragment::default()));
    for _ in 0..3 {
        testbed.inject(1, &frame.bytes);
    }
    let stranger_v6: IpAddr = "2001:db8::66".parse().expect("address");
    let IpAddr::V6(source) = stranger_v6 else { unreachable!() };
    testbed.inject(1, &ethernet(&[], ETHERTYPE_IPV6, ipv6(source, &[], syn)).bytes);
    // Allowed and out-of-scope packets are never sampled.
    let allowed = ipv4("198.51.100.8".parse().expect("address"), syn, &[], Fragment::default());
    testbed.inject(1, &ethernet(&[], ETHERTYPE_IPV4, allowed).bytes);
    let open = Transport::Tcp { dst_port: OPEN_PORT };
    let unprotected = ipv4("192.0.2.99".parse().expect("address"), open, &[], Fragment::default());
    testbed.inject(1, &ethernet(&[], ETHERTYPE_IPV4, unprotected).bytes);

    let status = status_json(&testbed);
    for (index, stranger) in strangers.iter().enumerate() {
        let expected = u64::try_from((index + 1) * 7).expect("small");
        assert_eq!(sampled(&status, *stranger), Some((Reason::Unlisted, expected)), "{stranger}");
    }
    assert_eq!(sampled(&status, denied), Some((Reason::Denied, 3)));
    assert_eq!(sampled(&status, stranger_v6), Some((Reason::Unlisted, 1)));
    assert_eq!(sampled(&status, "198.51.100.8".parse().expect("address")), None);
    assert_eq!(sampled(&status, "192.0.2.99".parse().expect("address")), None);
    // Busiest first.
    assert_eq!(status.dropped_sources[0].source, strangers[4]);
    let text = testbed.cli_ok(&["status", "--dropped"]);
    assert!(text.contains("192.0.2.5") && text.contains("unlisted"), "{text}");

    // Past its budget a CPU samples, one drop in a power of two picked from
    // its drop rate, and weighs each record by it; each switch of mode can
    // be off by one mask per CPU.
    let flood = ethernet(
        &[],
        ETHERTYPE_IPV4,
        ipv4("203.0.113.9".parse().expect("address"), syn, &[], Fragment::default()),
    );
    for _ in 0..2000 {
        testbed.inject(1, &flood.bytes);
    }
    let status = status_json(&testbed);
    let (_, estimate) =
        sampled(&status, "203.0.113.9".parse().expect("address")).expect("the flood is sampled");
    assert!((1500..=2500).contains(&estimate), "estimate {estimate} of 2000");
}

fn explain(testbed: &Testbed, address: &str, port: u16) -> Explanation {
    let output = testbed.cli(&["allow", "explain", address, "--port", &port.to_string(), "--json"]);
    let explanation: Explanation = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    explanation
}

#[test]
fn explain_names_the_deciding_rule_and_matches_the_kernel() {
    let testbed = testbed("");
    let list = "# partners\n10.200.0.0/16 # partner A\ndeny 10.200.5.0/24 # A's test range\n\
                10.200.5.9/32 # A's one tester\n2001:db8::/32\ndeny 2001:db8:bad::/48\n";
    std::fs::write(testbed.dir.join("list"), list).expect("write list");
    testbed.cli_ok(&[
        "allow",
        "replace",
        "--file",
        testbed.dir.join("list").to_str().expect("UTF-8"),
    ]);
    let cases = [
        ("10.200.1.1", PROTECTED_PORT, Reason::Allowed, Verdict::Pass, Some("10.200.0.0/16")),
        ("10.200.5.1", PROTECTED_PORT, Reason::Denied, Verdict::Drop, Some("10.200.5.0/24")),
        ("10.200.5.9", PROTECTED_PORT, Reason::Allowed, Verdict::Pass, Some("10.200.5.9/32")),
        ("2001:db8::1", PROTECTED_PORT, Reason::Allowed, Verdict::Pass, Some("2001:db8::/32")),
        (
            "2001:db8:bad::1",
            PROTECTED_PORT,
            Reason::Denied,
            Verdict::Drop,
            Some("2001:db8:bad::/48"),
        ),
        ("192.0.2.1", PROTECTED_PORT, Reason::Unlisted, Verdict::Drop, None),
        ("2001:db9::1", PROTECTED_PORT, Reason::Unlisted, Verdict::Drop, None),
        ("10.200.5.1", OPEN_PORT, Reason::OutOfScope, Verdict::Pass, Some("10.200.5.0/24")),
        ("192.0.2.1", OPEN_PORT, Reason::OutOfScope, Verdict::Pass, None),
    ];
    for (address, port, reason, verdict, cidr) in cases {
        let e = explain(&testbed, address, port);
        let at = format!("{address} port {port}: {e:?}");
        assert_eq!((e.reason, e.verdict, e.kernel), (reason, verdict, verdict), "{at}");
        assert!(e.agrees, "{at}");
        assert_eq!(e.protected, port == PROTECTED_PORT, "{at}");
        assert_eq!(e.rule.as_ref().map(|r| r.cidr.to_string()).as_deref(), cidr, "{at}");
    }
    let rule = explain(&testbed, "10.200.5.1", PROTECTED_PORT).rule.expect("a rule");
    assert_eq!(rule.comment.as_deref(), Some("A's test range"));
    assert!(rule.line.is_some(), "{rule:?}");
    let file = std::fs::read_to_string(testbed.allowlist_path()).expect("the list file");
    let line = file.lines().nth(rule.line.expect("line") - 1).expect("the line");
    assert!(line.contains("deny") && line.contains("10.200.5.0/24"), "{line}");
    // A probe is not traffic: it does not show up in the drop sample.
    assert_eq!(sampled(&status_json(&testbed), "192.0.2.1".parse().expect("address")), None);

    let text =
        testbed.cli_ok(&["allow", "explain", "192.0.2.1", "--port", &PROTECTED_PORT.to_string()]);
    assert!(text.contains("DROP (unlisted)") && text.contains("none: unlisted"), "{text}");
    assert!(text.contains("agrees"), "{text}");

    // In audit mode the list's drop is a would-be drop, and the kernel passes.
    testbed.write_config("audit = true");
    testbed.cli_ok(&["reload"]);
    let e = explain(&testbed, "10.200.5.1", PROTECTED_PORT);
    assert_eq!(
        (e.reason, e.verdict, e.kernel),
        (Reason::Denied, Verdict::WouldDrop, Verdict::Pass)
    );
    assert!(e.audit && e.agrees, "{e:?}");
}

fn suggestions(testbed: &Testbed) -> Vec<Suggestion> {
    serde_json::from_str(&testbed.cli_ok(&["allow", "suggest", "--json"])).expect("suggest --json")
}

#[test]
fn allow_suggest_learns_authenticated_strangers_in_audit_mode_and_apply_lets_them_in() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let listener = bed.listener_toml("");
    bed.testbed.write_config_with("audit = true", &listener);
    bed.testbed.start_daemon();
    let testbed = &bed.testbed;
    let stranger = IpAddr::V4(testbed.clients[1].ipv4);
    let said = testbed.cli_ok(&["allow", "suggest"]);
    assert!(said.contains("nothing to suggest (0 source(s) learned"), "{said}");

    // Client 1 is not listed: audit mode lets it authenticate. Client 0 is
    // listed, and a client without a certificate proves nothing: neither
    // is learned.
    for _ in 0..2 {
        assert_eq!(bed.exchange(1, Some(&bed.client), b"ping").as_deref(), Ok(&b"ping"[..]));
    }
    assert!(bed.exchange(1, None, b"ping").is_err(), "no certificate, no service");
    assert_eq!(bed.exchange(0, Some(&bed.client), b"ping").as_deref(), Ok(&b"ping"[..]));
    let learned = suggestions(testbed);
    assert_eq!(learned.len(), 1, "{learned:?}");
    let suggestion = &learned[0];
    assert_eq!(suggestion.cidr.to_string(), format!("{stranger}/32"));
    assert_eq!(suggestion.addresses, [stranger]);
    assert_eq!(suggestion.connections, 2);
    assert_eq!(suggestion.listeners.iter().collect::<Vec<_>>(), ["edge"]);
    let identity = "CN=partner, DNS=api.partner.example, URI=spiffe://partner.example/gateway";
    assert_eq!(suggestion.names.iter().map(ToString::to_string).collect::<Vec<_>>(), [identity]);
    let said = testbed.cli_ok(&["allow", "suggest"]);
    assert!(said.contains(&format!("{stranger}/32")) && said.contains(identity), "{said}");
    assert!(said.contains("2 connection(s) from 1 address(es)"), "{said}");

    // Kept on disk: a crash loses nothing that was taken in...
    testbed.kill_daemon();
    testbed.start_daemon();
    assert_eq!(suggestions(testbed)[0].connections, 2, "after a crash");
    // ...and a stop takes in what the worker saw last.
    assert!(bed.exchange(1, Some(&bed.client), b"ping").is_ok());
    assert!(testbed.stop_daemon().success());
    testbed.start_daemon();
    assert_eq!(suggestions(testbed)[0].connections, 3, "after a stop");

    // --apply needs the digest of what was reviewed: another set's, or a
    // CIDR outside it, changes nothing.
    let reviewed = testbed.cli_ok(&["allow", "suggest"]);
    let digest = reviewed
        .lines()
        .find_map(|line| line.strip_prefix("digest: "))
        .unwrap_or_else(|| panic!("no digest in:\n{reviewed}"))
        .to_owned();
    let before = std::fs::read_to_string(testbed.allowlist_path()).expect("allowlist file");
    let stale = testbed.cli(&["allow", "suggest", "--apply", "00000000deadbeef"]);
    let said = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success() && said.contains("not the ones reviewed"), "{said}");
    assert!(said.contains(&format!("--apply {digest}")), "names the digest to review: {said}");
    let outside =
        testbed.cli(&["allow", "suggest", "--apply", &digest, "--only", "203.0.113.0/24"]);
    let said = String::from_utf8_lossy(&outside.stderr);
    assert!(!outside.status.success() && said.contains("not among the suggestions"), "{said}");
    let after = std::fs::read_to_string(testbed.allowlist_path()).expect("allowlist file");
    assert_eq!(before, after, "a refused --apply changed the list");

    // --apply adds it, commented with the identity; then enforcing lets it in.
    let said = testbed.cli_ok(&["allow", "suggest", "--apply", &digest]);
    assert!(said.contains("ok: 1 added"), "{said}");
    let file = std::fs::read_to_string(testbed.allowlist_path()).expect("allowlist file");
    let line = file.lines().find(|l| l.starts_with(&format!("{stranger}/32"))).expect("added");
    assert!(line.ends_with(&format!("# learned from mTLS: {identity}")), "{line}");
    assert!(testbed.cli_ok(&["allow", "suggest"]).contains("nothing to suggest (1 source(s)"));
    testbed.write_config_with("", &listener);
    testbed.cli_ok(&["reload"]);
    assert!(!testbed.status().audit);
    assert_eq!(bed.exchange(1, Some(&bed.client), b"ping").as_deref(), Ok(&b"ping"[..]));
    assert!(suggestions(testbed).is_empty());
}

/// A compromised worker's invented sightings never become suggestions: not
/// for an identity the listener's rules refuse, not from an address the
/// filter never saw a packet from, not for a listener that does not exist,
/// and nothing outside audit mode.
#[test]
fn allow_suggest_takes_no_invented_sightings() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let listener = bed.listener_toml("allow_cn = [\"partner\"]");
    bed.testbed.write_config_with("audit = true", &listener);
    let testbed = &bed.testbed;
    let stranger = IpAddr::V4(testbed.clients[1].ipv4);
    let seen = format!("{stranger}:0");
    testbed.start_daemon_with(&[
        "--worker-escape",
        "forge-sightings",
        "--worker-escape-address",
        &seen,
    ]);
    // A real partner from an unlisted address: the filter samples its SYN.
    assert_eq!(bed.exchange(1, Some(&bed.client), b"ping").as_deref(), Ok(&b"ping"[..]));
    let refused = |testbed: &Testbed, why: &str| -> u64 {
        let said = testbed.cli_ok(&["allow", "suggest"]);
        said.lines()
            .find_map(|line| {
                line.strip_suffix(why)?
                    .strip_suffix(" sighting(s) from the proxy worker not taken: ")
            })
            .map_or(0, |count| count.parse().expect("a count"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while refused(testbed, "from an address the filter's drop sample never saw") == 0 {
        assert!(std::time::Instant::now() < deadline, "no forged report taken in");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        refused(testbed, "for an identity no listener rule allows") >= 2,
        "intruder, no listener"
    );
    let learned = suggestions(testbed);
    assert_eq!(learned.len(), 1, "{learned:?}");
    assert_eq!(learned[0].cidr.to_string(), format!("{stranger}/32"));
    let names: Vec<String> = learned[0].names.iter().map(ToString::to_string).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("CN=partner"), "{names:?}");

    // Enforcing: whatever the worker reports now is not taken.
    testbed.write_config_with("", &listener);
    testbed.cli_ok(&["reload"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while refused(testbed, "reported outside audit mode") == 0 {
        assert!(std::time::Instant::now() < deadline, "no report refused outside audit mode");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(suggestions(testbed).len(), 1);
}
