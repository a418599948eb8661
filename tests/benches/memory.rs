//! `cargo xtask bench memory`: proxy memory per idle, established mutual-TLS
//! connection (proportional set size, from /proc/<pid>/smaps_rollup), for
//! edgegate, HAProxy and stunnel, in one network namespace, in one run.
//!
//! Each round opens `--connections` (default 10,000) client connections,
//! completes the handshake and one byte each way through to the backend
//! (which holds every connection open), measures, and closes them all.

use std::{
    io::Read as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use edgegate_tests::{
    bench::{median, print_heading, save, spread, verdict},
    peers::{self, BACKEND_PORT, PeerBed},
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Proportional set size of a proxy, in KiB: its process and those below
/// it (edgegate's gate and worker).
fn pss_kib(pid: u32) -> u64 {
    edgegate_tests::bench::process_tree(pid)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .map(|rollup| {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .expect("Pss")
        })
        .sum()
}

fn main() {
    edgegate_tests::require_root();
    let (mut connections, mut rounds) = (10_000usize, 5usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next().and_then(|v| v.parse::<usize>().ok()).unwrap_or_else(|| panic!("{arg} N"))
        };
        match arg.as_str() {
            "--connections" => connections = value(),
            "--rounds" => rounds = value(),
            "--bench" => {}
            other => panic!("unknown argument {other} (--connections N, --rounds N)"),
        }
    }
    // Every connection is two descriptors in a proxy, and two in this process
    // (client and backend): raise the soft limit to the hard one, which
    // children inherit, and stay within it.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0, "RLIMIT_NOFILE");
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "raise RLIMIT_NOFILE");
    }
    let most = usize::try_from(limit.rlim_max.saturating_sub(1000) / 2).unwrap_or(usize::MAX);
    if connections > most {
        eprintln!(
            "the descriptor limit ({}) allows {most} connections, not {connections}",
            limit.rlim_max
        );
        connections = most;
    }

    let bed = PeerBed::new();
    // The backend: answers the first byte of each connection and holds it open.
    let backend = bed
        .netns
        .run(|| std::net::TcpListener::bind(("127.0.0.1", BACKEND_PORT)).expect("backend"));
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = Arc::clone(&held);
        std::thread::spawn(move || {
            for mut stream in backend.incoming().flatten() {
                let held = Arc::clone(&held);
                std::thread::spawn(move || {
                    let mut byte = [0u8; 1];
                    if stream.read_exact(&mut byte).is_ok() {
                        let _ = std::io::Write::write_all(&mut stream, &byte);
                        held.lock().expect("held").push(stream);
                    }
                });
            }
        });
    }

    // HAProxy refuses to start if its maxconn needs more descriptors than the limit.
    let servers = bed.start(connections + 50);
    let config = bed.client_config(None);

    let mut rows = Vec::new();
    for server in &servers {
        let mut per_connection = Vec::new();
        // Against the process before any connection: freed memory is often
        // kept by the allocator, so a later round would start higher.
        let idle = pss_kib(server.child.id());
        for _ in 0..rounds {
            let (opened, busy) = bed.netns.run(|| {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async {
                    let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
                    let mut tasks = Vec::new();
                    for _ in 0..connections {
                        let (config, semaphore) = (Arc::clone(&config), Arc::clone(&semaphore));
                        let port = server.port;
                        tasks.push(tokio::spawn(async move {
                            let _permit = semaphore.acquire_owned().await.expect("permit");
                            let tcp =
                                tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
                            let name = ServerName::try_from("127.0.0.1").expect("name");
                            let mut tls = tokio_rustls::TlsConnector::from(config)
                                .connect(name, tcp)
                                .await
                                .ok()?;
                            tls.write_all(b"x").await.ok()?;
                            let mut echo = [0u8; 1];
                            tls.read_exact(&mut echo).await.ok()?;
                            Some(tls)
                        }));
                    }
                    let mut open = Vec::new();
                    for task in tasks {
                        if let Some(tls) = task.await.expect("task") {
                            open.push(tls);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let busy = pss_kib(server.child.id());
                    let opened = open.len();
                    drop(open);
                    (opened, busy)
                })
            });
            assert!(
                opened * 10 >= connections * 9,
                "{}: only {opened} of {connections} connections",
                server.label
            );
            per_connection.push((busy.saturating_sub(idle)) as f64 * 1024.0 / opened as f64);
            // Let the proxy and the backend see the closes.
            std::thread::sleep(Duration::from_secs(2));
            held.lock().expect("held").clear();
        }
        eprintln!("{}: {:.0} bytes per connection", server.label, median(&per_connection));
        rows.push((server.label.as_str(), per_connection));
    }

    print_heading("memory");
    println!("{}", peers::versions(&bed.haproxies));
    println!(
        "{connections} idle established mTLS connections (TLS 1.3, one byte each way relayed), Pss growth of the proxy (all its processes), median of {rounds} rounds"
    );
    println!("\n| server | KiB per connection | (min–max) | edgegate ÷ this |");
    println!("|---|---:|---:|---:|");
    let ours = median(&rows[0].1);
    for (name, values) in &rows {
        let (low, high) = spread(values);
        println!(
            "| {name} | {:.1} | {:.1}–{:.1} | {:.2} |",
            median(values) / 1024.0,
            low / 1024.0,
            high / 1024.0,
            ours / median(values)
        );
    }
    println!("\ntargets:");
    for haproxy in &bed.haproxies {
        let Some((_, theirs)) = rows.iter().find(|(name, _)| *name == haproxy.label) else {
            continue;
        };
        let target = 0.5;
        let ratio = ours / median(theirs);
        println!(
            "- edgegate's memory per idle connection = {ratio:.2}× {}'s; target ≤ {target}×: {}",
            haproxy.label,
            verdict(ratio <= target)
        );
    }
    let json = serde_json::json!(
        rows.iter()
            .map(|(name, v)| serde_json::json!({"server": name, "bytes_per_connection": v}))
            .collect::<Vec<_>>()
    );
    save("memory", &json);
    drop(servers);
}
