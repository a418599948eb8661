//! `cargo xtask bench handshake`: new full mutual-TLS handshakes per second
//! (ECDSA P-256 certificates, X25519, no resumption), and the server's CPU
//! time per handshake, for edgegate, HAProxy and stunnel, all terminating
//! the same client certificates and forwarding to the same backend, in one
//! network namespace, in one run.
//!
//! The load generator (tokio + rustls) shares the machine's cores with the
//! server, so handshakes/s understates differences; CPU µs per handshake
//! (from /proc/<pid>/stat of the server and the processes below it) is the fairer figure.

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use edgegate::demo::netns::Netns;
use edgegate_tests::{
    bench::{median, percentile, print_heading, save, spread, tree_cpu},
    peers::{self, BACKEND_PORT, PeerBed},
};
use rustls::{ClientConfig, SupportedProtocolVersion, pki_types::ServerName};
use tokio::io::AsyncReadExt as _;

struct Settings {
    seconds: u64,
    rounds: usize,
    concurrency: usize,
    /// Open loop: start this many handshakes per second whatever their fate,
    /// instead of `concurrency` clients that each wait for the previous one.
    rate: Option<u32>,
}

/// One full handshake against `port`, until the backend's first byte
/// arrives through the proxy: its latency in µs, if it succeeded. (A TLS 1.3
/// client is done before the server has checked its certificate; the
/// backend's byte proves the server accepted it and connected the backend.)
async fn handshake(connector: &tokio_rustls::TlsConnector, port: u16) -> Option<f64> {
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    // As curl does. Without it, rustls's TLS 1.3 client sometimes sends its
    // last flight in two writes, and Nagle holds the second until the
    // server's delayed ACK (40 ms) - edgegate's, here, about 1% of the time.
    tcp.set_nodelay(true).ok()?;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.ok()?;
    let mut byte = [0u8];
    tls.read_exact(&mut byte).await.ok()?;
    Some(started.elapsed().as_secs_f64() * 1e6)
}

/// Runs the load for `seconds`: the latencies (µs) of the handshakes that
/// completed, and how many failed.
fn load(
    netns: &Netns,
    port: u16,
    config: Arc<ClientConfig>,
    settings: &Settings,
) -> (Vec<f64>, usize) {
    let connector = tokio_rustls::TlsConnector::from(config);
    let duration = Duration::from_secs(settings.seconds);
    netns.run(|| {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + duration;
            let mut tasks = tokio::task::JoinSet::new();
            match settings.rate {
                Some(rate) => {
                    let mut ticks =
                        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    while ticks.tick().await < deadline {
                        let connector = connector.clone();
                        tasks.spawn(async move { vec![handshake(&connector, port).await] });
                    }
                }
                None => {
                    for _ in 0..settings.concurrency {
                        let connector = connector.clone();
                        tasks.spawn(async move {
                            let mut outcomes = Vec::new();
                            while tokio::time::Instant::now() < deadline {
                                outcomes.push(handshake(&connector, port).await);
                            }
                            outcomes
                        });
                    }
                }
            }
            let (mut latencies, mut failed) = (Vec::new(), 0);
            while let Some(outcomes) = tasks.join_next().await {
                for outcome in outcomes.expect("client task") {
                    match outcome {
                        Some(latency) => latencies.push(latency),
                        None => failed += 1,
                    }
                }
            }
            (latencies, failed)
        })
    })
}

/// Server-side public-key work of one full TLS 1.3 mutual-TLS handshake with
/// ECDSA P-256 certificates and X25519, in µs, as aws-lc (rustls's provider)
/// does it on this machine: one ECDSA signature (CertificateVerify), two
/// verifications (the client certificate's signature and its
/// CertificateVerify), one X25519 key pair and agreement.
struct CryptoFloor {
    sign_us: f64,
    verify_us: f64,
    x25519_us: f64,
}

impl CryptoFloor {
    fn measure() -> Self {
        use aws_lc_rs::{
            agreement,
            rand::SystemRandom,
            signature::{self, EcdsaKeyPair, KeyPair as _},
        };
        const ITERATIONS: u32 = 2_000;
        let time = |f: &mut dyn FnMut()| {
            let started = Instant::now();
            for _ in 0..ITERATIONS {
                f();
            }
            started.elapsed().as_secs_f64() * 1e6 / f64::from(ITERATIONS)
        };
        let rng = SystemRandom::new();
        let algorithm = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(algorithm, &rng).expect("key");
        let key = EcdsaKeyPair::from_pkcs8(algorithm, pkcs8.as_ref()).expect("key");
        // What TLS 1.3 signs: 64 spaces, a context string, a transcript hash.
        let message = [0x20u8; 130];
        let signature = key.sign(&rng, &message).expect("sign");
        let public =
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key.public_key());
        let peer = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .and_then(|k| k.compute_public_key())
            .expect("X25519 key");
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer.as_ref().to_vec());
        Self {
            sign_us: time(&mut || {
                std::hint::black_box(key.sign(&rng, &message).expect("sign"));
            }),
            verify_us: time(&mut || public.verify(&message, signature.as_ref()).expect("verify")),
            x25519_us: time(&mut || {
                let private = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
                    .expect("X25519 key");
                private.compute_public_key().expect("public key");
                agreement::agree_ephemeral(private, &peer, (), |_| Ok(())).expect("agree");
            }),
        }
    }

    fn total_us(&self) -> f64 {
        self.sign_us + 2.0 * self.verify_us + self.x25519_us
    }
}

/// The same primitives as OpenSSL (HAProxy's and stunnel's library) does
/// them, from `openssl speed`: µs per handshake.
fn openssl_floor_us() -> Option<f64> {
    let output = Command::new("openssl")
        .args(["speed", "-seconds", "1", "ecdsap256", "ecdhx25519"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let numbers = |line: &str| -> Vec<f64> {
        line.split_whitespace().filter_map(|w| w.parse().ok()).collect()
    };
    let ecdsa = text.lines().find(|l| l.contains("ecdsa (nistp256)")).map(numbers)?;
    let ecdh = text.lines().find(|l| l.contains("ecdh (X25519)")).map(numbers)?;
    // "256 bits ecdsa (nistp256) <sign s> <verify s> <sign/s> <verify/s>";
    // "253 bits ecdh (X25519) <s> <op/s>", an op being one agreement (a key
    // pair costs about as much again).
    let (signs, verifies) = (ecdsa.get(ecdsa.len().checked_sub(2)?)?, ecdsa.last()?);
    let agreements = ecdh.last()?;
    Some(1e6 / signs + 2.0 * 1e6 / verifies + 2.0 * 1e6 / agreements)
}

/// `openssl s_time` against edgegate for `seconds`: new handshakes per second.
fn s_time(bed: &PeerBed, seconds: u64) -> Option<f64> {
    let mut command = bed.netns.command("openssl");
    command
        .args(["s_time", "-connect", "127.0.0.1:8443", "-new", "-time", &seconds.to_string()])
        .arg("-cert")
        .arg(&bed.client.cert)
        .arg("-key")
        .arg(&bed.client.key)
        .arg("-CAfile")
        .arg(&bed.server_ca.cert);
    // s_time reports whole seconds only: time it here.
    let started = Instant::now();
    let output = command.output().ok()?;
    let elapsed = started.elapsed().as_secs_f64();
    // "N connections in T real seconds, ..."
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().find(|l| l.contains("connections in") && l.contains("real seconds"))?;
    let count: f64 = line.split_whitespace().next()?.parse().ok()?;
    Some(count / elapsed)
}

struct Row {
    tls: &'static str,
    server: &'static str,
    rates: Vec<f64>,
    cpu_us: Vec<f64>,
    latencies_ms: [Vec<f64>; 3],
    /// Handshakes that failed, over all rounds.
    failed: usize,
}

fn main() {
    edgegate_tests::require_root();
    let mut settings = Settings { seconds: 3, rounds: 5, concurrency: 32, rate: None };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value =
            || args.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{arg} N"));
        match arg.as_str() {
            "--seconds" => settings.seconds = value(),
            "--rounds" => settings.rounds = usize::try_from(value()).expect("rounds"),
            "--concurrency" => {
                settings.concurrency = usize::try_from(value()).expect("concurrency");
            }
            "--rate" => settings.rate = Some(u32::try_from(value()).expect("rate")),
            "--bench" => {}
            other => panic!(
                "unknown argument {other} (--seconds N, --rounds N, --concurrency N, --rate N)"
            ),
        }
    }
    let bed = PeerBed::new();
    // The backend: sends one byte and closes.
    let backend = bed
        .netns
        .run(|| std::net::TcpListener::bind(("127.0.0.1", BACKEND_PORT)).expect("backend"));
    std::thread::spawn(move || {
        for mut stream in backend.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut stream, b"x");
        }
    });
    let servers = bed.start(5_000);

    let versions: [(&str, &'static SupportedProtocolVersion); 2] =
        [("TLS 1.3", &rustls::version::TLS13), ("TLS 1.2", &rustls::version::TLS12)];
    let mut rows = Vec::new();
    for (tls, version) in versions {
        let config = bed.client_config(Some(version));
        for server in &servers {
            let mut row = Row {
                tls,
                server: server.name,
                rates: Vec::new(),
                cpu_us: Vec::new(),
                latencies_ms: Default::default(),
                failed: 0,
            };
            for _ in 0..settings.rounds {
                let before = tree_cpu(server.child.id());
                let started = Instant::now();
                let (latencies, failed) =
                    load(&bed.netns, server.port, Arc::clone(&config), &settings);
                row.failed += failed;
                let elapsed = started.elapsed().as_secs_f64();
                let cpu = tree_cpu(server.child.id()) - before;
                assert!(
                    !latencies.is_empty(),
                    "{}: no handshake completed; its log:\n{}",
                    server.name,
                    bed.log(server)
                );
                let handshakes = latencies.len() as f64;
                row.rates.push(handshakes / elapsed);
                row.cpu_us.push(cpu.as_secs_f64() * 1e6 / handshakes);
                for (quantile, out) in [0.5, 0.99, 0.999].into_iter().zip(&mut row.latencies_ms) {
                    out.push(percentile(&latencies, quantile) / 1e3);
                }
            }
            eprintln!(
                "{tls} {}: {:.0} handshakes/s, {:.0} µs CPU each",
                server.name,
                median(&row.rates),
                median(&row.cpu_us)
            );
            rows.push(row);
        }
    }

    // Cross-checks, in the same run: OpenSSL's own client against edgegate
    // next to this generator with one client, and the crypto floors.
    let one_client = Settings { concurrency: 1, rate: None, ..settings };
    let tls13 = bed.client_config(Some(&rustls::version::TLS13));
    let ours_one =
        load(&bed.netns, 8443, tls13, &one_client).0.len() as f64 / settings.seconds as f64;
    let s_time_rate = s_time(&bed, settings.seconds);
    drop(servers);
    let floor = CryptoFloor::measure();
    let openssl_floor = openssl_floor_us();
    report(&settings, &rows, &floor, openssl_floor, ours_one, s_time_rate);
}

fn report(
    settings: &Settings,
    rows: &[Row],
    floor: &CryptoFloor,
    openssl_floor: Option<f64>,
    ours_one: f64,
    s_time_rate: Option<f64>,
) {
    print_heading("handshake");
    println!("{}", peers::versions());
    let load = match settings.rate {
        Some(rate) => format!("open loop, {rate} new handshakes/s"),
        None => format!("{} closed-loop clients", settings.concurrency),
    };
    println!(
        "{load} (tokio + rustls, sharing the cores), {} s × {} rounds, ECDSA P-256, X25519, no resumption; medians",
        settings.seconds, settings.rounds
    );
    println!(
        "\n| TLS | server | handshakes/s | min–max | server CPU µs/handshake | min–max | edgegate ÷ this (CPU) | p50 ms | p99 ms | p99.9 ms | failed |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let ours = rows
            .iter()
            .find(|r| r.tls == row.tls && r.server == "edgegate")
            .map_or(f64::NAN, |r| median(&r.cpu_us));
        let (rate_low, rate_high) = spread(&row.rates);
        let (cpu_low, cpu_high) = spread(&row.cpu_us);
        println!(
            "| {} | {} | {:.0} | {rate_low:.0}–{rate_high:.0} | {:.0} | {cpu_low:.0}–{cpu_high:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {} |",
            row.tls,
            row.server,
            median(&row.rates),
            median(&row.cpu_us),
            ours / median(&row.cpu_us),
            median(&row.latencies_ms[0]),
            median(&row.latencies_ms[1]),
            median(&row.latencies_ms[2]),
            row.failed,
        );
    }
    let ours = rows
        .iter()
        .find(|r| r.tls == "TLS 1.3" && r.server == "edgegate")
        .map(|r| median(&r.cpu_us))
        .expect("edgegate's TLS 1.3 row");
    let haproxy = rows
        .iter()
        .find(|r| r.tls == "TLS 1.3" && r.server == "haproxy")
        .map(|r| median(&r.cpu_us))
        .expect("HAProxy's TLS 1.3 row");
    println!(
        "\ncrypto floor of one TLS 1.3 mTLS handshake, server side (1 ECDSA P-256 sign, 2 verifies, 1 X25519 key pair + agreement):"
    );
    println!(
        "- aws-lc (rustls): {:.0} µs (sign {:.1}, verify {:.1}, X25519 {:.1}); edgegate's CPU per handshake = {:.2}× it (target ≤ 1.3×)",
        floor.total_us(),
        floor.sign_us,
        floor.verify_us,
        floor.x25519_us,
        ours / floor.total_us()
    );
    match openssl_floor {
        Some(us) => println!(
            "- OpenSSL (`openssl speed`): {us:.0} µs; HAProxy's CPU per handshake = {:.2}× it",
            haproxy / us
        ),
        None => println!("- OpenSSL: `openssl speed` gave no figures"),
    }
    println!(
        "- HAProxy's CPU per TLS 1.3 handshake = {:.2}× edgegate's (target ≥ 2×)",
        haproxy / ours
    );
    match s_time_rate {
        Some(rate) => println!(
            "\ncross-check, one client at a time against edgegate (TLS 1.3): `openssl s_time -new` {rate:.0} handshakes/s; this generator {ours_one:.0}/s"
        ),
        None => println!("\ncross-check: `openssl s_time` gave no figures"),
    }

    save(
        "handshake",
        &serde_json::json!({
            "rows": rows.iter().map(|r| serde_json::json!({
                "tls": r.tls, "server": r.server, "handshakes_per_second": r.rates,
                "cpu_us_per_handshake": r.cpu_us, "p50_ms": r.latencies_ms[0],
                "p99_ms": r.latencies_ms[1], "p999_ms": r.latencies_ms[2], "failed": r.failed,
            })).collect::<Vec<_>>(),
            "crypto_floor_us": {
                "aws_lc": floor.total_us(), "sign": floor.sign_us, "verify": floor.verify_us,
                "x25519": floor.x25519_us, "openssl": openssl_floor,
            },
            "s_time_handshakes_per_second": s_time_rate,
            "generator_one_client_handshakes_per_second": ours_one,
        }),
    );
}
