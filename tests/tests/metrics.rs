//! `/metrics`, `/healthz` and `/readyz` of the running daemon.

use std::net::SocketAddr;

use edgegate_tests::{
    mtls::{BackendMode, MtlsBed},
    testbed::{PROTECTED_PORT, Testbed},
};

/// The value of `name{labels}` (labels given as `key=value` pairs) in a scrape.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    // prometheus-parse reads the Prometheus text format; OpenMetrics adds only the `# EOF` line.
    let lines = body.lines().filter(|l| *l != "# EOF").map(|l| Ok(l.to_owned()));
    let scrape =
        prometheus_parse::Scrape::parse(lines).expect("a valid Prometheus text exposition");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map_or(0.0, |s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn metrics_parse_and_move_with_real_traffic() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    let (code, before) = bed.testbed.http_get("/metrics");
    assert_eq!(code, 200);
    assert_eq!(sample(&before, "edgegate_build_info", &[]), 1.0);
    assert_eq!(sample(&before, "edgegate_allowlist_entries", &[("family", "ipv4")]), 1.0);
    assert_eq!(sample(&before, "edgegate_ready", &[]), 1.0);

    assert_eq!(bed.exchange(0, Some(&bed.client), b"metrics").expect("exchange"), b"metrics");
    assert!(bed.exchange(0, None, b"x").is_err());
    assert!(bed.exchange(1, Some(&bed.client), b"x").is_err(), "client 1 is not listed");
    bed.await_rejected("no_certificate", 1);
    bed.testbed.await_log("connection closed");

    let (_, after) = bed.testbed.http_get("/metrics");
    let handshakes = |body: &str, result: &str| {
        sample(body, "edgegate_tls_handshakes_total", &[("listener", "edge"), ("result", result)])
    };
    assert_eq!(handshakes(&after, "ok") - handshakes(&before, "ok"), 1.0, "{after}");
    assert_eq!(handshakes(&after, "no_certificate"), 1.0);
    let relayed = sample(
        &after,
        "edgegate_relay_bytes_total",
        &[("listener", "edge"), ("direction", "from_client")],
    );
    assert_eq!(relayed, 7.0);
    let dropped = |body: &str| {
        sample(
            body,
            "edgegate_xdp_packets_total",
            &[("family", "ipv4"), ("verdict", "drop"), ("reason", "unlisted")],
        )
    };
    assert!(dropped(&after) > dropped(&before), "client 1's SYN is counted");
    let allowed = |body: &str| {
        sample(body, "edgegate_xdp_packets_total", &[("family", "ipv4"), ("reason", "allowed")])
    };
    assert!(allowed(&after) > allowed(&before));
    let interface = bed.testbed.interfaces[0].as_str();
    assert_eq!(
        sample(&after, "edgegate_xdp_attached", &[("interface", interface), ("mode", "native")]),
        1.0
    );
}

#[test]
fn healthz_and_readyz_follow_the_filter_and_the_listeners() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    assert_eq!(bed.testbed.http_get("/healthz"), (200, "ok\n".into()));
    assert_eq!(bed.testbed.http_get("/readyz"), (200, "ready\n".into()));

    // The interface disappears, and the program with it.
    let gone = bed.testbed.interfaces[1].clone();
    bed.testbed.server.ip(&["link", "del", &gone]);
    let (code, body) = bed.testbed.http_get("/readyz");
    assert_eq!(code, 503);
    assert!(body.contains(&format!("`{gone}`")), "{body}");
    assert_eq!(bed.testbed.http_get("/healthz").0, 200, "alive, though not ready");
    let (_, metrics) = bed.testbed.http_get("/metrics");
    assert_eq!(sample(&metrics, "edgegate_ready", &[]), 0.0);
    assert_eq!(bed.testbed.http_get("/nowhere").0, 404);
}

/// Bound beyond loopback (so that the NLB can health-check `/readyz`), the
/// metrics port is protected like a listener's: `/metrics` names the
/// partner's address ranges, and strangers never reach it.
#[test]
fn an_exposed_metrics_port_is_protected_by_the_filter() {
    let testbed = Testbed::new(2);
    testbed.write_config_with("", "[metrics]\nbind = \"0.0.0.0:9901\"\n");
    std::fs::create_dir_all(testbed.dir.join("state")).expect("state dir");
    std::fs::write(testbed.allowlist_path(), format!("{}\n", testbed.clients[0].ipv4))
        .expect("allowlist");
    testbed.start_daemon();
    let status = testbed.status();
    assert_eq!(status.protected_ports.into_iter().collect::<Vec<_>>(), [PROTECTED_PORT, 9901]);
    let listed = testbed.cli_ok(&["status"]);
    assert!(listed.contains(&format!("protected:  ports {PROTECTED_PORT}, 9901")), "{listed}");

    let metrics_at = |client: usize| SocketAddr::new(testbed.server_v4(client), 9901);
    assert_eq!(
        testbed.http_get_from(0, metrics_at(0), "/readyz").expect("allowed source"),
        (200, "ready\n".into())
    );
    let unlisted_before = testbed.counted("ipv4", "unlisted");
    let stranger = testbed.http_get_from(1, metrics_at(1), "/metrics");
    assert!(stranger.is_err(), "a stranger read the metrics: {stranger:?}");
    assert!(testbed.counted("ipv4", "unlisted") > unlisted_before, "its SYN is counted");
}
