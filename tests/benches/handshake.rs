//! `cargo xtask bench handshake`: the server's CPU time per mutual-TLS
//! connection (ECDSA P-256 certificates, X25519) for edgegate, HAProxy and
//! stunnel, all terminating the same client certificates and forwarding to
//! the same backend, in one network namespace, in one run, under three loads:
//!
//! - this project's generator (tokio + rustls): full handshakes, TLS 1.3 and
//!   1.2, until the backend's first byte; then resumed handshakes;
//! - OpenSSL's own client, `openssl s_time -new -www /`, as concurrent
//!   processes: a full handshake and one HTTP request through the proxy;
//! - bare `openssl s_time -new`, once, to show why it is not a fair load.
//!
//! Every peer runs in its defaults and in its best configuration for full
//! handshakes (HAProxy without session cache and tickets, edgegate without
//! resumption); HAProxy in each build given (Debian's on OpenSSL 3.0, and one
//! on AWS-LC, edgegate's crypto: `cargo xtask bench handshake --haproxy-awslc
//! PATH`). The floors are the public-key work of one handshake in each TLS
//! library, and the CPU of HAProxy relaying the same connections as plain TCP;
//! each peer's CPU per full handshake is also shown less its library's floor.
//!
//! The load generators share the machine's cores with the server, so rates
//! understate differences; CPU µs per connection (from /proc/<pid>/stat of
//! the server and the processes below it) is the fairer figure.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use edgegate::demo::netns::Netns;
use edgegate_tests::{
    bench::{median, percentile, print_heading, save, spread, tree_cpu, tree_switches, verdict},
    peers::{
        self, BACKEND_PORT, EDGEGATE_NO_RESUMPTION_PORT, HAPROXY_TCP_PORT, Haproxy, PeerBed, Server,
    },
};
use rustls::{ClientConfig, HandshakeKind, SupportedProtocolVersion, pki_types::ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Settings {
    seconds: u64,
    rounds: usize,
    concurrency: usize,
}

/// What the backend answers every connection, before reading anything.
const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n";

/// A server under a load: a name for the tables, its port and process.
#[derive(Clone, Copy)]
struct Target {
    name: &'static str,
    port: u16,
    pid: u32,
}

/// How one handshake went: its latency in µs, and whether it resumed.
type Outcome = Option<(f64, bool)>;

/// One handshake against `port`, until the backend's first byte arrives
/// through the proxy. (A TLS 1.3 client is done before the server has
/// checked its certificate; the backend's byte proves the server accepted it
/// and connected the backend.)
async fn handshake(connector: &tokio_rustls::TlsConnector, port: u16) -> Outcome {
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
    // The server's TLS 1.3 ticket came before that byte: the client has it.
    let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    Some((started.elapsed().as_secs_f64() * 1e6, resumed))
}

/// `settings.concurrency` clients in `netns`, each repeating `attempt` (told
/// which client it is) for `seconds`: every outcome.
fn closed_loop<T, F>(
    netns: &Netns,
    settings: &Settings,
    attempt: impl Fn(usize) -> F + Clone + Send + Sync + 'static,
) -> Vec<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let duration = Duration::from_secs(settings.seconds);
    netns.run(|| {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + duration;
            let mut tasks = tokio::task::JoinSet::new();
            for client in 0..settings.concurrency {
                let attempt = attempt.clone();
                let client = async move {
                    let mut outcomes = Vec::new();
                    while tokio::time::Instant::now() < deadline {
                        outcomes.push(attempt(client).await);
                    }
                    outcomes
                };
                tasks.spawn(client);
            }
            let mut outcomes = Vec::new();
            while let Some(done) = tasks.join_next().await {
                outcomes.extend(done.expect("client task"));
            }
            outcomes
        })
    })
}

/// The generator: TLS handshakes against `port`, client `n` with
/// `configs[n % configs.len()]`.
fn load(
    netns: &Netns,
    port: u16,
    configs: &[Arc<ClientConfig>],
    settings: &Settings,
) -> Vec<Outcome> {
    let connectors: Arc<[tokio_rustls::TlsConnector]> =
        configs.iter().map(|config| Arc::clone(config).into()).collect();
    closed_loop(netns, settings, move |client| {
        let connectors = Arc::clone(&connectors);
        async move { handshake(&connectors[client % connectors.len()], port).await }
    })
}

/// The generator resuming: each client's first connection is a full
/// handshake (fresh session stores, one per client), the rest resume.
fn resumed_load(
    bed: &PeerBed,
    port: u16,
    version: &'static SupportedProtocolVersion,
    settings: &Settings,
) -> Vec<Outcome> {
    let configs = bed.resuming_client_configs(Some(version), settings.concurrency);
    load(&bed.netns, port, &configs, settings)
}

/// The same connections without TLS: connect, send a request, read to the
/// end. How many were answered.
fn plain_load(netns: &Netns, port: u16, settings: &Settings) -> usize {
    let exchange = move |_| async move {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer.starts_with(b"HTTP/1.0 200"))
    };
    closed_loop(netns, settings, exchange)
        .into_iter()
        .filter(|answered| matches!(answered, Ok(true)))
        .count()
}

/// `instances` concurrent `openssl s_time` processes against `port`, TLS
/// 1.3, for `seconds`, with `mode` (`-new`, `-reuse`) and `www` (fetch `/`
/// through the proxy, or leave after the handshake): connections made, and
/// how many resumed.
fn s_time(
    bed: &PeerBed,
    port: u16,
    mode: &str,
    www: bool,
    instances: usize,
    seconds: u64,
) -> Round {
    let children: Vec<_> = (0..instances)
        .map(|_| {
            let mut command = bed.netns.command("openssl");
            command
                .args(["s_time", "-tls1_3", mode, "-time", &seconds.to_string(), "-connect"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("-cert")
                .arg(&bed.client.cert)
                .arg("-key")
                .arg(&bed.client.key)
                .arg("-CAfile")
                .arg(&bed.server_ca.cert);
            if www {
                command.args(["-www", "/"]);
            }
            command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("openssl s_time")
        })
        .collect();
    let mut round = Round::default();
    for child in children {
        let output = child.wait_with_output().expect("openssl s_time");
        let text = String::from_utf8_lossy(&output.stdout);
        // "N connections in T real seconds, ..."
        round.connections += text
            .lines()
            .find(|l| l.contains("connections in") && l.contains("real seconds"))
            .and_then(|l| l.split_whitespace().next()?.parse::<usize>().ok())
            .unwrap_or(0);
        // With -reuse, one character per connection: `r` when it resumed.
        round.resumed += text
            .lines()
            .filter(|l| !l.is_empty() && l.chars().all(|c| "rt*123".contains(c)))
            .map(|l| l.matches('r').count())
            .sum::<usize>();
    }
    round
}

/// A backend that answers at once and closes once the request (or the
/// client's close) has arrived, for every load alike.
fn start_backend(netns: &Netns) {
    let listener =
        netns.run(|| std::net::TcpListener::bind(("127.0.0.1", BACKEND_PORT)).expect("backend"));
    listener.set_nonblocking(true).expect("non-blocking");
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("backend");
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    if stream.write_all(RESPONSE).await.is_err() {
                        return;
                    }
                    let mut request = [0u8; 1024];
                    let read = stream.read(&mut request);
                    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
                });
            }
        });
    });
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

/// What one round of a load did.
#[derive(Default)]
struct Round {
    connections: usize,
    failed: usize,
    resumed: usize,
    latencies_us: Vec<f64>,
}

impl Round {
    fn from_outcomes(outcomes: Vec<Outcome>) -> Self {
        let mut round = Self::default();
        for outcome in outcomes {
            match outcome {
                Some((latency, resumed)) => {
                    round.connections += 1;
                    round.resumed += usize::from(resumed);
                    round.latencies_us.push(latency);
                }
                None => round.failed += 1,
            }
        }
        round
    }

    fn counted(connections: usize) -> Self {
        Self { connections, ..Self::default() }
    }
}

/// One target under one load, over the rounds.
struct Row {
    load: String,
    target: Target,
    /// Connections per second, one per round.
    rates: Vec<f64>,
    /// The server's CPU µs per connection, one per round.
    cpu_us: Vec<f64>,
    /// Its threads' context switches per connection, one per round.
    switches: Vec<f64>,
    /// p50, p99, p99.9 in ms, one per round (the generator's loads only).
    latencies_ms: [Vec<f64>; 3],
    failed: usize,
    /// Share of the connections that resumed.
    resumed: f64,
}

impl Row {
    fn cpu(&self) -> f64 {
        median(&self.cpu_us)
    }

    /// Adds `other`'s rounds (the same load and server) to this row's.
    fn merge(&mut self, other: Row) {
        let before = self.rates.len() as f64;
        self.rates.extend(other.rates);
        self.cpu_us.extend(other.cpu_us);
        self.switches.extend(other.switches);
        for (mine, theirs) in self.latencies_ms.iter_mut().zip(other.latencies_ms) {
            mine.extend(theirs);
        }
        self.failed += other.failed;
        self.resumed = (self.resumed * before + other.resumed) / (before + 1.0);
    }
}

fn measure(load: &str, target: Target, rounds: usize, mut run: impl FnMut() -> Round) -> Row {
    let mut row = Row {
        load: load.to_owned(),
        target,
        rates: Vec::new(),
        cpu_us: Vec::new(),
        switches: Vec::new(),
        latencies_ms: Default::default(),
        failed: 0,
        resumed: 0.0,
    };
    let (mut connections, mut resumed) = (0, 0);
    for _ in 0..rounds {
        let (before, switches_before) = (tree_cpu(target.pid), tree_switches(target.pid));
        let started = Instant::now();
        let round = run();
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = tree_cpu(target.pid) - before;
        let switches = tree_switches(target.pid).saturating_sub(switches_before);
        assert!(round.connections > 0, "{}: no connection completed under {load}", target.name);
        row.failed += round.failed;
        connections += round.connections;
        resumed += round.resumed;
        row.rates.push(round.connections as f64 / elapsed);
        row.cpu_us.push(cpu.as_secs_f64() * 1e6 / round.connections as f64);
        row.switches.push(switches as f64 / round.connections as f64);
        if !round.latencies_us.is_empty() {
            for (quantile, out) in [0.5, 0.99, 0.999].into_iter().zip(&mut row.latencies_ms) {
                out.push(percentile(&round.latencies_us, quantile) / 1e3);
            }
        }
    }
    row.resumed = resumed as f64 / connections.max(1) as f64;
    eprintln!("{load}, {}: {:.0}/s, {:.0} µs CPU each", target.name, median(&row.rates), row.cpu());
    row
}

const EDGEGATE: &str = "edgegate (defaults: tickets)";
const EDGEGATE_FULL: &str = "edgegate, resumption off";
const STUNNEL: &str = "stunnel (defaults)";
const EDGEGATE_KEYS_IN_WORKER: &str = "edgegate, keys in the worker (before)";

/// The loads under which keeping the keys in the gate is compared with the
/// worker holding them (see [`ALTERNATING_LOADS`]).
const CUSTODY_LOADS: [&str; 4] = [
    "custody: generator, full, TLS 1.3",
    "custody: s_time -new -www, 4",
    "custody: generator, resumed, TLS 1.3",
    "custody: s_time -reuse -www, 4",
];
/// A comparison with another build (`--baseline PATH`).
const BASELINE_LOADS: [&str; 4] = [
    "baseline: generator, full, TLS 1.3",
    "baseline: s_time -new -www, 4",
    "baseline: generator, resumed, TLS 1.3",
    "baseline: s_time -reuse -www, 4",
];
const EDGEGATE_BASELINE: &str = "edgegate, the baseline build";

fn main() {
    edgegate_tests::require_root();
    let mut settings = Settings { seconds: 3, rounds: 5, concurrency: 32 };
    let mut only_custody = false;
    let mut baseline = None;
    let mut hold = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--only-custody" {
            only_custody = true;
            continue;
        }
        if arg == "--baseline" {
            baseline = Some(PathBuf::from(args.next().expect("--baseline PATH")));
            continue;
        }
        let mut value =
            || args.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{arg} N"));
        match arg.as_str() {
            "--hold" => hold = Some(Duration::from_secs(value().min(3600))),
            "--seconds" => settings.seconds = value(),
            "--rounds" => settings.rounds = usize::try_from(value()).expect("rounds"),
            "--concurrency" => {
                settings.concurrency = usize::try_from(value()).expect("concurrency");
            }
            "--bench" => {}
            other => panic!(
                "unknown argument {other} (--seconds N, --rounds N, --concurrency N, --only-custody, --baseline PATH, --hold SECONDS)"
            ),
        }
    }
    let bed = PeerBed::new();
    start_backend(&bed.netns);
    let servers = bed.start(5_000);
    if let Some(hold) = hold {
        let variants = bed.start_haproxy_variants();
        hold_for_profiling(&bed, servers.iter().chain(&variants), hold);
        return;
    }
    if only_custody {
        drop(servers);
        let rows = custody(&bed, &settings);
        print_heading("handshake (key custody only)");
        report_custody(&rows);
        return;
    }
    if let Some(baseline) = baseline {
        drop(servers);
        let binary = edgegate_tests::testbed::edgegate_binary();
        let variants = [
            Variant { name: EDGEGATE, binary: &binary, args: &[] },
            Variant { name: EDGEGATE_BASELINE, binary: &baseline, args: &[] },
        ];
        let rows = alternate(&bed, &settings, "baseline: ", &variants);
        print_heading("handshake (this build against a baseline build)");
        report_baseline(&rows, &baseline);
        return;
    }
    let variants = bed.start_haproxy_variants();
    let target = |name: &'static str, server: &str, port: Option<u16>| {
        let server = servers.iter().chain(&variants).find(|s| s.name == server).expect(server);
        Target { name, port: port.unwrap_or(server.port), pid: server.child.id() }
    };
    let edgegate = target(EDGEGATE, "edgegate", None);
    let edgegate_full = target(EDGEGATE_FULL, "edgegate", Some(EDGEGATE_NO_RESUMPTION_PORT));
    let haproxies: Vec<HaproxyTargets> = bed
        .haproxies
        .iter()
        .map(|build| HaproxyTargets {
            build: build.clone(),
            defaults: target(leak(build.defaults_name()), build.key, None),
            best: target(leak(build.full_name()), build.full_key, None),
        })
        .collect();
    let stunnel = target(STUNNEL, "stunnel", None);
    let tcp_name = format!("{}, mode tcp, no TLS", bed.haproxies[0].label);
    let haproxy_tcp = target(leak(tcp_name), "haproxy-tcp", Some(HAPROXY_TCP_PORT));
    let tls_targets: Vec<Target> = [edgegate, edgegate_full]
        .into_iter()
        .chain(haproxies.iter().flat_map(|h| [h.defaults, h.best]))
        .collect();
    // Resumption: every peer in its defaults, its best configuration here.
    let resuming_targets: Vec<Target> =
        [edgegate].into_iter().chain(haproxies.iter().map(|h| h.defaults)).collect();
    let rounds = settings.rounds;

    let mut rows = Vec::new();
    let versions: [(&str, &'static SupportedProtocolVersion); 2] =
        [("TLS 1.3", &rustls::version::TLS13), ("TLS 1.2", &rustls::version::TLS12)];
    for (tls, version) in versions {
        let config = bed.client_config(Some(version));
        let load_name = format!("generator, full, {tls}");
        for &target in tls_targets.iter().chain([&stunnel]) {
            rows.push(measure(&load_name, target, rounds, || {
                let configs = std::slice::from_ref(&config);
                Round::from_outcomes(load(&bed.netns, target.port, configs, &settings))
            }));
        }
    }
    for instances in [4, 16] {
        let load_name = format!("s_time -new -www, {instances}");
        for &target in &tls_targets {
            rows.push(measure(&load_name, target, rounds, || {
                s_time(&bed, target.port, "-new", true, instances, settings.seconds)
            }));
        }
    }
    for &target in &tls_targets {
        rows.push(measure("s_time -new, 4", target, 1, || {
            s_time(&bed, target.port, "-new", false, 4, settings.seconds)
        }));
    }
    for (tls, version) in versions {
        let load_name = format!("generator, resumed, {tls}");
        for &target in &resuming_targets {
            rows.push(measure(&load_name, target, rounds, || {
                Round::from_outcomes(resumed_load(&bed, target.port, version, &settings))
            }));
        }
    }
    for &target in &resuming_targets {
        rows.push(measure("s_time -reuse -www, 4", target, rounds, || {
            s_time(&bed, target.port, "-reuse", true, 4, settings.seconds)
        }));
    }
    rows.push(measure("plain TCP, same requests", haproxy_tcp, rounds, || {
        Round::counted(plain_load(&bed.netns, haproxy_tcp.port, &settings))
    }));
    drop((servers, variants));
    rows.extend(custody(&bed, &settings));
    let floors = Floors { aws_lc: CryptoFloor::measure(), openssl_us: openssl_floor_us() };
    report(&settings, &rows, &haproxies, haproxy_tcp.name, &floors);
}

/// Leaves every server running for `hold`, printing what a person needs to
/// load and profile them by hand (`strace -c -f -p`, `perf stat -p`):
/// the namespace, each server's port and pid, and the client's files.
fn hold_for_profiling<'a>(
    bed: &PeerBed,
    servers: impl Iterator<Item = &'a Server>,
    hold: Duration,
) {
    println!("namespace: {}", bed.netns.name());
    println!(
        "client: -cert {} -key {} -CAfile {}",
        bed.client.cert.display(),
        bed.client.key.display(),
        bed.server_ca.cert.display()
    );
    for server in servers {
        println!("{}: 127.0.0.1:{} pid {}", server.label, server.port, server.child.id());
    }
    println!("edgegate without resumption: 127.0.0.1:{EDGEGATE_NO_RESUMPTION_PORT}");
    println!("holding for {} s", hold.as_secs());
    std::thread::sleep(hold);
}

/// One HAProxy build's two targets.
struct HaproxyTargets {
    build: Haproxy,
    /// Its defaults: session cache and tickets.
    defaults: Target,
    /// Its best configuration for full handshakes: neither.
    best: Target,
}

/// A table row's name, built once at start and kept for the whole run.
fn leak(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}

/// The loads two edgegate variants are compared under, alternating.
const ALTERNATING_LOADS: [&str; 4] = [
    "generator, full, TLS 1.3",
    "s_time -new -www, 4",
    "generator, resumed, TLS 1.3",
    "s_time -reuse -www, 4",
];

/// One edgegate variant of an alternating comparison.
struct Variant<'a> {
    name: &'static str,
    binary: &'a Path,
    args: &'a [&'a str],
}

/// edgegate with its keys in the gate (as it runs) and in the worker
/// (`run --keys-in-worker`, as before).
fn custody(bed: &PeerBed, settings: &Settings) -> Vec<Row> {
    let binary = edgegate_tests::testbed::edgegate_binary();
    let variants = [
        Variant { name: EDGEGATE, binary: &binary, args: &[] },
        Variant { name: EDGEGATE_KEYS_IN_WORKER, binary: &binary, args: &["--keys-in-worker"] },
    ];
    alternate(bed, settings, "custody: ", &variants)
}

/// Each variant in turn under each of [`ALTERNATING_LOADS`] (its name
/// prefixed with `prefix`), in every round, so that the machine's drift
/// falls on all alike; the order turns around every round (A B, B A, ...):
/// the same binary measured against itself came out up to 7% dearer when
/// always started first.
fn alternate(bed: &PeerBed, settings: &Settings, prefix: &str, variants: &[Variant]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let full = [bed.client_config(Some(&rustls::version::TLS13))];
    for round in 0..settings.rounds {
        let order: Vec<&Variant> = match round % 2 {
            0 => variants.iter().collect(),
            _ => variants.iter().rev().collect(),
        };
        for variant in order {
            let server = bed.start_edgegate(variant.binary, variant.args);
            let target = Target { name: variant.name, port: 8443, pid: server.child.id() };
            for load_name in ALTERNATING_LOADS {
                let name = format!("{prefix}{load_name}");
                let round = measure(&name, target, 1, || match load_name {
                    "generator, full, TLS 1.3" => {
                        Round::from_outcomes(load(&bed.netns, target.port, &full, settings))
                    }
                    "generator, resumed, TLS 1.3" => Round::from_outcomes(resumed_load(
                        bed,
                        target.port,
                        &rustls::version::TLS13,
                        settings,
                    )),
                    "s_time -new -www, 4" => {
                        s_time(bed, target.port, "-new", true, 4, settings.seconds)
                    }
                    _ => s_time(bed, target.port, "-reuse", true, 4, settings.seconds),
                });
                match rows.iter_mut().find(|r| r.load == name && r.target.name == variant.name) {
                    Some(row) => row.merge(round),
                    None => rows.push(round),
                }
            }
        }
    }
    rows
}

fn report_custody(rows: &[Row]) {
    println!(
        "\nKey custody: edgegate with its private keys and ticket keys in the gate (as it runs) and in the worker (`run --keys-in-worker`, as before), alternating in every round; whole daemon (gate and worker):"
    );
    print_table(rows, &CUSTODY_LOADS, true);
    for load in CUSTODY_LOADS {
        let [gate, worker] =
            [EDGEGATE, EDGEGATE_KEYS_IN_WORKER].map(|t| median(&find(rows, load, t).switches));
        println!(
            "- context switches per connection ({load}): {gate:.1} with the keys in the gate, {worker:.1} in the worker"
        );
    }
    for load in CUSTODY_LOADS {
        let cost =
            find(rows, load, EDGEGATE).cpu() / find(rows, load, EDGEGATE_KEYS_IN_WORKER).cpu();
        println!(
            "- keys in the gate ({load}): {:+.1}% CPU per connection against keys in the worker; target ≤ +5%: {}",
            (cost - 1.0) * 100.0,
            verdict(cost <= 1.05)
        );
    }
}

/// One lever's effect: this build against `baseline`, alternating.
fn report_baseline(rows: &[Row], baseline: &Path) {
    println!(
        "\nThis build ({EDGEGATE}) against {} ({EDGEGATE_BASELINE}), alternating in every round; whole daemon:",
        baseline.display()
    );
    print_table(rows, &BASELINE_LOADS, true);
    for load in BASELINE_LOADS {
        let [ours, theirs] = [EDGEGATE, EDGEGATE_BASELINE].map(|t| find(rows, load, t));
        println!(
            "- {load}: {:+.1}% CPU per connection, {:.1} against {:.1} context switches per connection",
            (ours.cpu() / theirs.cpu() - 1.0) * 100.0,
            median(&ours.switches),
            median(&theirs.switches)
        );
    }
}

fn find<'a>(rows: &'a [Row], load: &str, target: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.load == load && r.target.name == target)
        .unwrap_or_else(|| panic!("no row for {target} under {load}"))
}

fn print_table(rows: &[Row], loads: &[&str], with_latency: bool) {
    print!(
        "\n| load | server | conn/s | min–max | server CPU µs/conn | min–max | ÷ edgegate's CPU | switches/conn |"
    );
    if with_latency {
        print!(" p50 ms | p99 ms | p99.9 ms | resumed | failed |");
    }
    println!();
    let columns = if with_latency { 13 } else { 8 };
    println!("|---|---|{}", "---:|".repeat(columns - 2));
    for row in rows.iter().filter(|r| loads.contains(&r.load.as_str())) {
        let ours = rows
            .iter()
            .find(|r| r.load == row.load && r.target.name == EDGEGATE)
            .map_or(f64::NAN, Row::cpu);
        let (rate_low, rate_high) = spread(&row.rates);
        let (cpu_low, cpu_high) = spread(&row.cpu_us);
        print!(
            "| {} | {} | {:.0} | {rate_low:.0}–{rate_high:.0} | {:.0} | {cpu_low:.0}–{cpu_high:.0} | {:.2} | {:.1} |",
            row.load,
            row.target.name,
            median(&row.rates),
            row.cpu(),
            row.cpu() / ours,
            median(&row.switches),
        );
        if with_latency {
            // `s_time` reports no latencies.
            let ms = |samples: &[f64]| match samples.is_empty() {
                true => "—".to_owned(),
                false => format!("{:.1}", median(samples)),
            };
            print!(
                " {} | {} | {} | {:.0}% | {} |",
                ms(&row.latencies_ms[0]),
                ms(&row.latencies_ms[1]),
                ms(&row.latencies_ms[2]),
                row.resumed * 100.0,
                row.failed
            );
        }
        println!();
    }
}

/// What each proxy costs beyond its TLS library's public-key work, for full
/// handshakes in its best configuration: the part a proxy's own design decides.
fn report_above_floor(rows: &[Row], haproxies: &[HaproxyTargets], floors: &Floors) {
    println!(
        "\nWhat the proxies themselves cost: CPU µs per full handshake in their best configuration, less their TLS library's floor above:"
    );
    let loads = ["generator, full, TLS 1.3", "s_time -new -www, 4", "s_time -new -www, 16"];
    println!("\n| server | {} |", loads.join(" | "));
    println!("|---|{}", "---:|".repeat(loads.len()));
    // edgegate's library is aws-lc.
    let servers = [(EDGEGATE_FULL, true)]
        .into_iter()
        .chain(haproxies.iter().map(|h| (h.best.name, h.build.aws_lc)));
    for (server, aws_lc) in servers {
        let Some(floor) = floors.of(aws_lc) else { continue };
        let cells: Vec<String> = loads
            .iter()
            .map(|load| format!("{:.0}", find(rows, load, server).cpu() - floor))
            .collect();
        println!("| {server} | {} |", cells.join(" | "));
    }
}

/// The public-key work of one handshake, server side, in each TLS library.
struct Floors {
    aws_lc: CryptoFloor,
    /// From `openssl speed`, if it gave figures.
    openssl_us: Option<f64>,
}

impl Floors {
    /// The floor of a TLS library: aws-lc's, or OpenSSL's if it gave figures.
    fn of(&self, aws_lc: bool) -> Option<f64> {
        if aws_lc { Some(self.aws_lc.total_us()) } else { self.openssl_us }
    }
}

fn report(
    settings: &Settings,
    rows: &[Row],
    haproxies: &[HaproxyTargets],
    tcp_name: &str,
    floors: &Floors,
) {
    let builds: Vec<Haproxy> = haproxies.iter().map(|h| h.build.clone()).collect();
    print_heading("handshake");
    println!("{}", peers::versions(&builds));
    println!(
        "ECDSA P-256 certificates, X25519; {} s × {} rounds per row (bare s_time: 1 round); medians; \
         CPU and context switches (voluntary and not, every thread) of the server's process tree per \
         completed connection; the loads share the cores",
        settings.seconds, settings.rounds
    );
    println!(
        "\nFull handshakes, this generator ({} clients, tokio + rustls, no resumption; done at the backend's first byte):",
        settings.concurrency
    );
    print_table(rows, &["generator, full, TLS 1.3", "generator, full, TLS 1.2"], true);
    println!(
        "\nOpenSSL's client: concurrent `openssl s_time -tls1_3 -new -www /` processes (full handshake, one HTTP request through the proxy, read to the backend's close):"
    );
    print_table(rows, &["s_time -new -www, 4", "s_time -new -www, 16"], false);
    println!(
        "\nNot a fair load, shown once: bare `s_time -new` leaves right after the handshake, before any proxy has connected its backend:"
    );
    print_table(rows, &["s_time -new, 4"], false);
    println!(
        "\nResumed handshakes (each client's first connection is full, the rest resume; HAProxy's defaults are its best configuration here):"
    );
    print_table(
        rows,
        &["generator, resumed, TLS 1.3", "generator, resumed, TLS 1.2", "s_time -reuse -www, 4"],
        true,
    );
    report_custody(rows);
    let tcp = find(rows, "plain TCP, same requests", tcp_name).cpu();
    let aws_lc = &floors.aws_lc;
    println!(
        "\nfloors: public-key work of one TLS 1.3 mTLS handshake, server side (1 ECDSA P-256 sign, 2 verifies, 1 X25519 key pair + agreement):"
    );
    println!(
        "- aws-lc (rustls; HAProxy on AWS-LC): {:.0} µs (sign {:.1}, verify {:.1}, X25519 {:.1})",
        aws_lc.total_us(),
        aws_lc.sign_us,
        aws_lc.verify_us,
        aws_lc.x25519_us
    );
    match floors.openssl_us {
        Some(us) => println!("- OpenSSL 3.0 (`openssl speed`; Debian's HAProxy): {us:.0} µs"),
        None => println!("- OpenSSL: `openssl speed` gave no figures"),
    }
    println!(
        "- {tcp_name}, relaying the same connections ({} clients): {tcp:.0} µs per connection",
        settings.concurrency
    );
    report_above_floor(rows, haproxies, floors);

    println!("\ntargets:");
    for h in haproxies {
        let label = &h.build.label;
        // The targets set against each build.
        let (full_target, resumed_target) = if h.build.aws_lc { (1.25, 1.5) } else { (3.0, 2.0) };
        for instances in [4, 16] {
            let load = format!("s_time -new -www, {instances}");
            let best =
                find(rows, &load, h.best.name).cpu() / find(rows, &load, EDGEGATE_FULL).cpu();
            let defaults =
                find(rows, &load, h.defaults.name).cpu() / find(rows, &load, EDGEGATE).cpu();
            println!(
                "- `s_time -new -www`, {instances} processes: {label}'s CPU per connection = {best:.2}× edgegate's, both in their best configuration for full handshakes ({defaults:.2}× in their defaults); target ≥ {full_target}×: {}",
                verdict(best >= full_target)
            );
        }
        for load in
            ["generator, resumed, TLS 1.3", "generator, resumed, TLS 1.2", "s_time -reuse -www, 4"]
        {
            let ratio = find(rows, load, h.defaults.name).cpu() / find(rows, load, EDGEGATE).cpu();
            println!(
                "- resumed ({load}): edgegate completes {ratio:.2}× {label}'s connections per CPU second; target ≥ {resumed_target}×: {}",
                verdict(ratio >= resumed_target)
            );
        }
    }
    let full = find(rows, "generator, full, TLS 1.3", EDGEGATE_FULL).cpu();
    let floor_sum = aws_lc.total_us() + tcp;
    println!(
        "- edgegate's CPU per full TLS 1.3 handshake ({full:.0} µs, resumption off) = {:.2}× (crypto floor {:.0} + plain TCP proxy {tcp:.0} µs); target ≤ 1.5×: {}",
        full / floor_sum,
        aws_lc.total_us(),
        verdict(full / floor_sum <= 1.5)
    );

    save(
        "handshake",
        &serde_json::json!({
            "rows": rows.iter().map(|r| serde_json::json!({
                "load": r.load, "server": r.target.name, "connections_per_second": r.rates,
                "cpu_us_per_connection": r.cpu_us, "switches_per_connection": r.switches,
                "p50_ms": r.latencies_ms[0],
                "p99_ms": r.latencies_ms[1], "p999_ms": r.latencies_ms[2], "failed": r.failed,
                "resumed_share": r.resumed,
            })).collect::<Vec<_>>(),
            "crypto_floor_us": {
                "aws_lc": aws_lc.total_us(), "sign": aws_lc.sign_us, "verify": aws_lc.verify_us,
                "x25519": aws_lc.x25519_us, "openssl": floors.openssl_us,
            },
            "haproxy_builds": builds.iter().map(|b| &b.label).collect::<Vec<_>>(),
            "plain_tcp_proxy_us": tcp,
        }),
    );
}
