//! `cargo xtask bench relay`: what the proxies cost once connections are up.
//!
//! - Throughput: 1 and 16 mutual-TLS connections each read what the backend
//!   streams for `--seconds`: GB/s, and the proxy's CPU seconds per GB (from
//!   /proc/<pid>/stat; the clients share the cores, so CPU per GB is the
//!   fairer figure).
//! - Latency: one connection sends a 64-byte message every millisecond
//!   (open loop, sends are not held back by replies) and times each echo:
//!   p50/p99, and what the proxy adds to a direct connection.
//!
//! edgegate, HAProxy and stunnel terminate the same client certificates and
//! forward to the same backend; "direct" is plain TCP to the backend. All in
//! one network namespace, in one run. Results also go to `target/bench/relay.json`.

use std::{
    net::TcpListener,
    sync::Arc,
    time::{Duration, Instant},
};

use edgegate::demo::netns::Netns;
use edgegate_tests::{
    bench::{median, percentile, print_heading, save, spread, tree_cpu, verdict},
    peers::{self, BACKEND_PORT, Haproxy, PeerBed, Server},
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// What the client asks the backend for, in its first byte.
const STREAM: u8 = b'S';
const ECHO: u8 = b'E';
const MESSAGE: usize = 64;
const ECHO_INTERVAL: Duration = Duration::from_millis(1);

struct Settings {
    seconds: u64,
    rounds: usize,
    /// edgegate and the direct connection only, no peer (`--no-peers`): to
    /// look at edgegate's rounds one by one.
    no_peers: bool,
}

/// Who the client connects to.
#[derive(Clone, Copy)]
enum Target<'a> {
    Proxy(&'a Server),
    Direct,
}

impl<'a> Target<'a> {
    fn name(self) -> &'a str {
        match self {
            Self::Proxy(server) => &server.label,
            Self::Direct => "direct (no proxy, no TLS)",
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection to `target` (handshake done, nothing sent yet).
async fn connect(target: Target<'_>, config: &Arc<ClientConfig>) -> Box<dyn Stream> {
    let port = match target {
        Target::Proxy(server) => server.port,
        Target::Direct => BACKEND_PORT,
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    tcp.set_nodelay(true).expect("TCP_NODELAY");
    match target {
        Target::Proxy(_) => {
            let name = ServerName::try_from("127.0.0.1").expect("name");
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
            Box::new(connector.connect(name, tcp).await.expect("TLS handshake"))
        }
        Target::Direct => Box::new(tcp),
    }
}

/// Tells the backend what to do with this connection.
async fn ask(stream: &mut Box<dyn Stream>, mode: u8) {
    stream.write_all(&[mode]).await.expect("mode byte");
    stream.flush().await.expect("flush");
}

/// The backend: streams data forever or echoes, as the first byte asks.
fn serve_backend(listener: TcpListener) {
    listener.set_nonblocking(true).expect("non-blocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("backend runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((mut stream, _)) = listener.accept().await {
                stream.set_nodelay(true).expect("TCP_NODELAY");
                tokio::spawn(async move {
                    let mut mode = [0u8];
                    if stream.read_exact(&mut mode).await.is_err() {
                        return;
                    }
                    if mode[0] == STREAM {
                        let chunk = vec![0x5a; 64 * 1024];
                        while stream.write_all(&chunk).await.is_ok() {}
                    } else {
                        let (mut reader, mut writer) = stream.split();
                        let _ = tokio::io::copy(&mut reader, &mut writer).await;
                    }
                });
            }
        });
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("client runtime")
}

/// Bytes `connections` streams read in `seconds`, and the time it took.
fn throughput(
    netns: &Netns,
    target: Target<'_>,
    config: &Arc<ClientConfig>,
    connections: usize,
    seconds: u64,
) -> (u64, Duration) {
    netns.run(|| {
        runtime().block_on(async {
            let mut streams = Vec::new();
            for _ in 0..connections {
                streams.push(connect(target, config).await);
            }
            // Nothing flows before this: the backend streams once asked.
            let started = Instant::now();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
            let tasks: Vec<_> = streams
                .into_iter()
                .map(|mut stream| {
                    tokio::spawn(async move {
                        ask(&mut stream, STREAM).await;
                        let mut buffer = vec![0u8; 64 * 1024];
                        let mut bytes = 0u64;
                        while tokio::time::Instant::now() < deadline {
                            match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await
                            {
                                Ok(Ok(0)) => panic!("the stream ended early"),
                                Ok(Ok(n)) => bytes += n as u64,
                                Ok(Err(e)) => panic!("read: {e}"),
                                Err(_) => break,
                            }
                        }
                        bytes
                    })
                })
                .collect();
            let mut total = 0;
            for task in tasks {
                total += task.await.expect("reader");
            }
            (total, started.elapsed())
        })
    })
}

/// Round trips of 64-byte echoes sent every [`ECHO_INTERVAL`] for `seconds`, in µs.
fn echo_latencies(
    netns: &Netns,
    target: Target<'_>,
    config: &Arc<ClientConfig>,
    seconds: u64,
) -> Vec<f64> {
    netns.run(|| {
        runtime().block_on(async {
            let mut stream = connect(target, config).await;
            ask(&mut stream, ECHO).await;
            let (mut reader, mut writer) = tokio::io::split(stream);
            let count =
                usize::try_from(seconds * 1000 / ECHO_INTERVAL.as_millis() as u64).expect("count");
            // Send times go to the reader in order; a slow echo does not delay
            // the next send (open loop), so queueing shows in the figures.
            let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
            let sender = tokio::spawn(async move {
                let mut ticks = tokio::time::interval(ECHO_INTERVAL);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for _ in 0..count {
                    ticks.tick().await;
                    sent_tx.send(Instant::now()).expect("reader alive");
                    writer.write_all(&[0x42; MESSAGE]).await.expect("send");
                }
                writer
            });
            let mut latencies = Vec::with_capacity(count);
            let mut message = [0u8; MESSAGE];
            for _ in 0..count {
                reader.read_exact(&mut message).await.expect("echo");
                let sent: Instant = sent_rx.recv().await.expect("a send time");
                latencies.push(sent.elapsed().as_secs_f64() * 1e6);
            }
            drop(sender.await.expect("sender"));
            latencies
        })
    })
}

struct ThroughputRow {
    connections: usize,
    target: String,
    gb_per_second: Vec<f64>,
    cpu_seconds_per_gb: Vec<f64>,
}

struct LatencyRow {
    target: String,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

fn main() {
    edgegate_tests::require_root();
    let mut settings = Settings { seconds: 3, rounds: 5, no_peers: false };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value =
            || args.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{arg} N"));
        match arg.as_str() {
            "--seconds" => settings.seconds = value(),
            "--rounds" => settings.rounds = usize::try_from(value()).expect("rounds"),
            "--no-peers" => settings.no_peers = true,
            "--bench" => {}
            other => panic!("unknown argument {other} (--seconds N, --rounds N, --no-peers)"),
        }
    }
    let bed = PeerBed::new();
    serve_backend(bed.netns.run(|| TcpListener::bind(("127.0.0.1", BACKEND_PORT)).expect("bind")));
    let servers = bed.start(1_000);
    let config = bed.client_config(Some(&rustls::version::TLS13));
    let targets: Vec<Target> = servers
        .iter()
        .map(Target::Proxy)
        .chain([Target::Direct])
        .filter(|target| {
            !settings.no_peers || matches!(target, Target::Direct) || target.name() == "edgegate"
        })
        .collect();

    let mut throughput_rows = Vec::new();
    for connections in [1, 16] {
        for &target in &targets {
            let (mut rates, mut cpu) = (Vec::new(), Vec::new());
            for _ in 0..settings.rounds {
                let pid = match target {
                    Target::Proxy(server) => Some(server.child.id()),
                    Target::Direct => None,
                };
                let before = pid.map(tree_cpu);
                let (bytes, elapsed) =
                    throughput(&bed.netns, target, &config, connections, settings.seconds);
                let gb = bytes as f64 / 1e9;
                rates.push(gb / elapsed.as_secs_f64());
                if let (Some(pid), Some(before)) = (pid, before) {
                    cpu.push((tree_cpu(pid) - before).as_secs_f64() / gb);
                }
            }
            // Every round, so that an outlier shows which round it was.
            let each: Vec<String> = rates.iter().map(|rate| format!("{rate:.2}")).collect();
            eprintln!(
                "{connections:>2} connection(s), {:<26} {:.2} GB/s (rounds: {})",
                target.name(),
                median(&rates),
                each.join(" ")
            );
            throughput_rows.push(ThroughputRow {
                connections,
                target: target.name().to_owned(),
                gb_per_second: rates,
                cpu_seconds_per_gb: cpu,
            });
        }
    }

    let mut latency_rows = Vec::new();
    for &target in &targets {
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        for _ in 0..settings.rounds {
            let latencies = echo_latencies(&bed.netns, target, &config, settings.seconds);
            p50.push(percentile(&latencies, 0.5));
            p99.push(percentile(&latencies, 0.99));
        }
        eprintln!(
            "echo {:<26} p50 {:.0} µs, p99 {:.0} µs",
            target.name(),
            median(&p50),
            median(&p99)
        );
        latency_rows.push(LatencyRow {
            target: target.name().to_owned(),
            p50_us: p50,
            p99_us: p99,
        });
    }
    drop(servers);
    report(&settings, &bed.haproxies, &throughput_rows, &latency_rows);
}

fn report(
    settings: &Settings,
    haproxies: &[Haproxy],
    throughput: &[ThroughputRow],
    latency: &[LatencyRow],
) {
    print_heading("relay");
    println!("{}", peers::versions(haproxies));
    println!(
        "TLS 1.3, ECDSA P-256, X25519; clients tokio + rustls on the same cores; {} s × {} rounds; medians",
        settings.seconds, settings.rounds
    );
    println!(
        "\n| connections | target | GB/s | min–max | proxy CPU s/GB | edgegate ÷ this (GB/s) | edgegate ÷ this (CPU/GB) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for row in throughput {
        let ours = throughput
            .iter()
            .find(|r| r.connections == row.connections && r.target == "edgegate")
            .expect("edgegate's row");
        let (low, high) = spread(&row.gb_per_second);
        let cpu = if row.cpu_seconds_per_gb.is_empty() {
            ("—".to_owned(), "—".to_owned())
        } else {
            (
                format!("{:.2}", median(&row.cpu_seconds_per_gb)),
                format!(
                    "{:.2}",
                    median(&ours.cpu_seconds_per_gb) / median(&row.cpu_seconds_per_gb)
                ),
            )
        };
        println!(
            "| {} | {} | {:.2} | {low:.2}–{high:.2} | {} | {:.2} | {} |",
            row.connections,
            row.target,
            median(&row.gb_per_second),
            cpu.0,
            median(&ours.gb_per_second) / median(&row.gb_per_second),
            cpu.1
        );
    }

    let direct = latency.iter().find(|r| r.target == Target::Direct.name()).expect("direct");
    let ours = latency.iter().find(|r| r.target == "edgegate").expect("edgegate");
    let added = |row: &LatencyRow| median(&row.p99_us) - median(&direct.p99_us);
    println!(
        "\n64-byte echoes, one every {} ms on one connection (open loop), {} s per round:",
        ECHO_INTERVAL.as_millis(),
        settings.seconds
    );
    println!(
        "\n| target | p50 µs | p99 µs | p99 min–max | p99 added to direct µs | edgegate ÷ this (added p99) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for row in latency {
        let (low, high) = spread(&row.p99_us);
        // A ratio of added latencies means something only when both add some.
        let ratio = if row.target == direct.target || added(ours) <= 0.0 || added(row) <= 0.0 {
            "—".to_owned()
        } else {
            format!("{:.2}", added(ours) / added(row))
        };
        println!(
            "| {} | {:.0} | {:.0} | {low:.0}–{high:.0} | {:.0} | {ratio} |",
            row.target,
            median(&row.p50_us),
            median(&row.p99_us),
            added(row)
        );
    }
    println!("\ntargets:");
    for haproxy in haproxies {
        let label = &haproxy.label;
        // Against the same crypto the bar is higher.
        let (throughput_target, cpu_target) = if haproxy.aws_lc { (1.1, 0.7) } else { (1.0, 1.0) };
        for connections in [1, 16] {
            let row = |target: &str| {
                throughput.iter().find(|r| r.connections == connections && r.target == target)
            };
            let (Some(ours), Some(theirs)) = (row("edgegate"), row(label)) else { continue };
            let rate = median(&ours.gb_per_second) / median(&theirs.gb_per_second);
            let cpu = median(&ours.cpu_seconds_per_gb) / median(&theirs.cpu_seconds_per_gb);
            println!(
                "- {connections} connection(s): edgegate's throughput {rate:.2}× {label}'s (target ≥ {throughput_target}×: {}), its CPU per GB {cpu:.2}× (target ≤ {cpu_target}×: {})",
                verdict(rate >= throughput_target),
                verdict(cpu <= cpu_target)
            );
        }
        if let Some(theirs) = latency.iter().find(|r| r.target == *label) {
            println!(
                "- added p99 echo latency: edgegate {:.0} µs, {label} {:.0} µs (target: no more): {}",
                added(ours),
                added(theirs),
                verdict(added(ours) <= added(theirs))
            );
        }
    }

    save(
        "relay",
        &serde_json::json!({
            "seconds": settings.seconds,
            "throughput": throughput.iter().map(|r| serde_json::json!({
                "connections": r.connections, "target": r.target,
                "gb_per_second": r.gb_per_second, "cpu_seconds_per_gb": r.cpu_seconds_per_gb,
            })).collect::<Vec<_>>(),
            "echo_latency": latency.iter().map(|r| serde_json::json!({
                "target": r.target, "p50_us": r.p50_us, "p99_us": r.p99_us,
            })).collect::<Vec<_>>(),
        }),
    );
}
