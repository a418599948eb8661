//! `/metrics`, `/healthz` and `/readyz` of the running daemon.

use std::{net::SocketAddr, time::Duration};

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

/// A PROXY v2 header for `source` → `destination`, as an NLB target group
/// with proxy protocol on sends before its health checks.
fn proxy_v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else {
        panic!("IPv4 only");
    };
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([0x21, 0x11, 0, 12]);
    header.extend(source.ip().octets());
    header.extend(destination.ip().octets());
    header.extend(source.port().to_be_bytes());
    header.extend(destination.port().to_be_bytes());
    header
}

/// `GET path` on the metrics endpoint from the server's namespace, after
/// `preamble`: the status line (empty if the connection closed first).
fn get_after(testbed: &Testbed, preamble: &[u8], path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let address = SocketAddr::from(([127, 0, 0, 1], 9901));
    testbed.server.run(|| {
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
            .expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        // A server that refuses what it read may close before all is written.
        let _ = stream.write_all(preamble).and_then(|()| {
            write!(stream, "GET {path} HTTP/1.1\r\nHost: edgegate\r\nConnection: close\r\n\r\n")
        });
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.lines().next().unwrap_or_default().to_owned()
    })
}

/// Behind an NLB with proxy protocol v2, health checks arrive with a PROXY
/// header: with `accept_proxy_protocol`, `/readyz` reads past it; plain
/// requests still work; without the key, such a request is not served.
#[test]
fn readyz_answers_health_checks_that_start_with_a_proxy_header() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "[metrics]\naccept_proxy_protocol = true");
    bed.testbed.start_daemon();
    await_ready(&bed.testbed);
    let header = proxy_v2_header(
        SocketAddr::from(([10, 0, 0, 9], 41_000)),
        SocketAddr::from(([10, 0, 0, 1], 9901)),
    );
    assert_eq!(get_after(&bed.testbed, &header, "/readyz"), "HTTP/1.1 200 OK");
    let v1 = b"PROXY TCP4 10.0.0.9 10.0.0.1 41000 9901\r\n";
    assert_eq!(get_after(&bed.testbed, v1, "/readyz"), "HTTP/1.1 200 OK");
    assert_eq!(get_after(&bed.testbed, b"", "/readyz"), "HTTP/1.1 200 OK");
    // A client that sends half a header and stalls is cut off, not waited for.
    let started = std::time::Instant::now();
    let stalled = bed.testbed.server.run(|| {
        use std::io::{Read as _, Write as _};
        let address = SocketAddr::from(([127, 0, 0, 1], 9901));
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        stream.write_all(&header[..8]).expect("half a header");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).map(|_| answer)
    });
    // Closed (with a reset: the half header was never read), not timed out.
    match stalled {
        Ok(answer) => assert_eq!(answer, b""),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(started.elapsed() < Duration::from_secs(9), "{:?}", started.elapsed());

    bed.testbed.stop_daemon();
    bed.write("", "");
    bed.testbed.start_daemon();
    await_ready(&bed.testbed);
    assert!(!get_after(&bed.testbed, &header, "/readyz").contains("200"));
}

/// Probes never take the daemon's state lock: 500 concurrent `/readyz`
/// requests (more than the endpoint serves at once) do not slow a change.
#[test]
fn a_flood_of_probes_does_not_slow_a_change() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    await_ready(&bed.testbed);
    let quiet = timed(|| bed.testbed.cli_ok(&["allow", "add", "198.51.100.1"]));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (loud, served) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            bed.testbed.server.run(|| {
                edgegate_tests::mtls::runtime().block_on(async {
                    let mut served = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let probes = (0..500).map(|_| tokio::spawn(probe()));
                        for probe in probes.collect::<Vec<_>>() {
                            served += u32::from(probe.await.unwrap_or(false));
                        }
                    }
                    served
                })
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let loud = timed(|| bed.testbed.cli_ok(&["allow", "add", "198.51.100.2"]));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (loud, flood.join().expect("flood"))
    });
    assert!(served > 0, "no probe was served");
    assert!(loud < quiet + Duration::from_secs(1), "{loud:?} under probes, {quiet:?} without");
}

/// One `/readyz` probe; whether it got a 200.
async fn probe() -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = SocketAddr::from(([127, 0, 0, 1], 9901));
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(response.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.ok().flatten().unwrap_or(false)
}

fn timed<T>(f: impl FnOnce() -> T) -> Duration {
    let started = std::time::Instant::now();
    f();
    started.elapsed()
}

/// Waits (bounded) until `/readyz` says ready.
fn await_ready(testbed: &Testbed) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while testbed.http_get("/readyz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready:\n{}", testbed.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
