//! `cargo xtask bench handshake`: new full mutual-TLS handshakes per second
//! (ECDSA P-256 certificates, X25519, no resumption), and the server's CPU
//! time per handshake, for edgegate, HAProxy and stunnel, all terminating
//! the same client certificates and forwarding to the same backend, in one
//! network namespace, in one run.
//!
//! The load generator (tokio + rustls) shares the machine's cores with the
//! server, so handshakes/s understates differences; CPU µs per handshake
//! (from /proc/<pid>/stat of the server) is the fairer figure.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use edgegate::demo::netns::Netns;
use edgegate_tests::{
    bench::{machine, percentile, process_cpu, save},
    peers::{BACKEND_PORT, PeerBed},
};
use rustls::{ClientConfig, SupportedProtocolVersion, pki_types::ServerName};
use tokio::io::AsyncWriteExt as _;

struct Settings {
    seconds: u64,
    rounds: usize,
    concurrency: usize,
}

/// Runs `concurrency` closed-loop clients for `seconds`: (handshakes, latencies in µs).
fn load(
    netns: &Netns,
    port: u16,
    config: Arc<ClientConfig>,
    settings: &Settings,
) -> (u64, Vec<u64>) {
    netns.run(|| {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let done = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            for _ in 0..settings.concurrency {
                let (config, done, stop) =
                    (Arc::clone(&config), Arc::clone(&done), Arc::clone(&stop));
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let connector = tokio_rustls::TlsConnector::from(config);
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                        else {
                            continue;
                        };
                        let name = ServerName::try_from("127.0.0.1").expect("name");
                        if let Ok(mut tls) = connector.connect(name, tcp).await {
                            // TLS 1.3: the server verifies the client certificate
                            // after the client's Finished; a byte forces that through.
                            if tls.write_all(b"x").await.is_ok() && tls.flush().await.is_ok() {
                                latencies.push(
                                    u64::try_from(started.elapsed().as_micros())
                                        .unwrap_or(u64::MAX),
                                );
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    latencies
                }));
            }
            tokio::time::sleep(Duration::from_secs(settings.seconds)).await;
            stop.store(true, Ordering::Relaxed);
            let mut latencies = Vec::new();
            for task in tasks {
                latencies.extend(task.await.expect("client task"));
            }
            (done.load(Ordering::Relaxed), latencies)
        })
    })
}

fn main() {
    edgegate_tests::require_root();
    let mut settings = Settings { seconds: 3, rounds: 5, concurrency: 32 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value =
            || args.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{arg} N"));
        match arg.as_str() {
            "--seconds" => settings.seconds = value(),
            "--rounds" => settings.rounds = usize::try_from(value()).expect("rounds"),
            "--concurrency" => {
                settings.concurrency = usize::try_from(value()).expect("concurrency")
            }
            "--bench" => {}
            other => panic!("unknown argument {other} (--seconds N, --rounds N, --concurrency N)"),
        }
    }
    let bed = PeerBed::new();
    // The backend: accepts and closes.
    let backend = bed
        .netns
        .run(|| std::net::TcpListener::bind(("127.0.0.1", BACKEND_PORT)).expect("backend"));
    std::thread::spawn(move || {
        for stream in backend.incoming() {
            drop(stream);
        }
    });
    let servers = bed.start(5_000);
    let workers = std::thread::available_parallelism().map_or(2, usize::from);

    let versions: [(&str, &'static SupportedProtocolVersion); 2] =
        [("TLS 1.3", &rustls::version::TLS13), ("TLS 1.2", &rustls::version::TLS12)];
    let mut rows = Vec::new();
    for (label, version) in versions {
        let config = bed.client_config(Some(version));
        for server in &servers {
            let (mut rates, mut cpu_us, mut p50, mut p99) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..settings.rounds {
                let before = process_cpu(server.child.id());
                let started = Instant::now();
                let (handshakes, mut latencies) =
                    load(&bed.netns, server.port, Arc::clone(&config), &settings);
                let elapsed = started.elapsed().as_secs_f64();
                let cpu = process_cpu(server.child.id()) - before;
                assert!(
                    handshakes > 0,
                    "{}: no handshake completed; its log:\n{}",
                    server.name,
                    bed.log(server)
                );
                rates.push(handshakes as f64 / elapsed);
                cpu_us.push(cpu.as_secs_f64() * 1e6 / handshakes as f64);
                latencies.sort_unstable();
                p50.push(latencies[latencies.len() / 2] as f64 / 1e3);
                p99.push(latencies[latencies.len() * 99 / 100] as f64 / 1e3);
            }
            eprintln!(
                "{label} {}: {:.0} handshakes/s, {:.0} µs CPU each",
                server.name,
                percentile(&rates, 0.5),
                percentile(&cpu_us, 0.5)
            );
            rows.push((label, server.name, rates, cpu_us, p50, p99));
        }
    }

    println!("\n## cargo xtask bench handshake");
    let openssl = Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let haproxy_version = Command::new("haproxy")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    println!("{}", machine());
    println!("peers: {haproxy_version} (nbthread {workers}); stunnel 5; {openssl}");
    println!(
        "{} closed-loop clients (tokio + rustls, sharing the cores), {} s × {} rounds, ECDSA P-256, X25519, no resumption; medians",
        settings.concurrency, settings.seconds, settings.rounds
    );
    println!(
        "\n| TLS | server | handshakes/s | (min–max) | server CPU µs/handshake | edgegate ÷ this (CPU) | p50 ms | p99 ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (label, name, rates, cpu_us, p50, p99) in &rows {
        let ours = rows
            .iter()
            .find(|r| r.0 == *label && r.1 == "edgegate")
            .map_or(f64::NAN, |r| percentile(&r.3, 0.5));
        println!(
            "| {label} | {name} | {:.0} | {:.0}–{:.0} | {:.0} | {:.2} | {:.1} | {:.1} |",
            percentile(rates, 0.5),
            percentile(rates, 0.0),
            percentile(rates, 1.0),
            percentile(cpu_us, 0.5),
            ours / percentile(cpu_us, 0.5),
            percentile(p50, 0.5),
            percentile(p99, 0.5)
        );
    }
    let json = serde_json::json!(rows
        .iter()
        .map(|(label, name, rates, cpu_us, p50, p99)| serde_json::json!({
            "tls": label, "server": name, "handshakes_per_second": rates, "cpu_us_per_handshake": cpu_us,
            "p50_ms": p50, "p99_ms": p99,
        }))
        .collect::<Vec<_>>());
    save("handshake", &json);
    drop(servers);
}
