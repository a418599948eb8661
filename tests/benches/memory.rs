//! `cargo xtask bench memory`: proxy memory per idle, established mutual-TLS
//! connection (proportional set size, from /proc/<pid>/smaps_rollup), for
//! edgegate, HAProxy and stunnel, in one network namespace, in one run.
//!
//! Each round opens `--connections` (default 10,000) client connections,
//! completes the handshake and one byte each way through to the backend
//! (which holds every connection open), measures, and closes them all.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use edgegate::demo::{
    netns::{Netns, unique_name},
    pki::{Authority, Issued, Leaf},
};
use rustls::{
    ClientConfig, RootCertStore,
    client::Resumption,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BACKEND_PORT: u16 = 18080;

struct Server {
    name: &'static str,
    port: u16,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Scratch {
    dir: PathBuf,
    bpffs_dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = edgegate::filter::detach_pinned(&self.bpffs_dir, None);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Proportional set size of a process, in KiB.
fn pss_kib(pid: u32) -> u64 {
    let rollup =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Pss")
}

fn client_config(ca: &Path, cert: &Issued) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca).expect("CA") {
        roots.add(certificate.expect("cert")).expect("trust");
    }
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_file(&cert.key).expect("key");
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client config");
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
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

    let netns = Netns::new("egbm");
    let scratch = Scratch {
        dir: std::env::temp_dir().join(unique_name("edgegate-bench-")),
        bpffs_dir: PathBuf::from("/sys/fs/bpf").join(unique_name("egbench")),
    };
    let dir = &scratch.dir;
    std::fs::create_dir_all(dir.join("state")).expect("dir");
    let server_ca = Authority::new(dir, "server-ca");
    let client_ca = Authority::new(dir, "client-ca");
    let server = server_ca.issue("server", &Leaf::server(&["127.0.0.1"]));
    let client = client_ca.issue("client", &Leaf::client("partner"));
    let combined = dir.join("server-with-key.pem");
    let pem = std::fs::read_to_string(&server.cert).expect("cert")
        + &std::fs::read_to_string(&server.key).expect("key");
    std::fs::write(&combined, pem).expect("combined");

    // The backend: answers the first byte of each connection and holds it open.
    let backend =
        netns.run(|| std::net::TcpListener::bind(("127.0.0.1", BACKEND_PORT)).expect("backend"));
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

    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    std::fs::write(dir.join("state/allowlist"), "127.0.0.0/8\n").expect("allowlist");
    std::fs::write(
        dir.join("edgegate.toml"),
        format!(
            "[filter]\ninterfaces = [\"lo\"]\nmode = \"skb\"\n\n[daemon]\ncontrol_socket = \"{d}/control.sock\"\n\
             state_dir = \"{d}/state\"\nbpffs_dir = \"{}\"\n\n[[listener]]\nname = \"bench\"\nbind = \"127.0.0.1:8443\"\n\
             backend = \"127.0.0.1:{BACKEND_PORT}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nmax_connections = {}\n",
            scratch.bpffs_dir.display(),
            server.cert.display(),
            server.key.display(),
            client_ca.cert.display(),
            connections * 2,
            d = dir.display(),
        ),
    )
    .expect("config");
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  nbthread {workers}\n  maxconn {}\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n\
             frontend fe\n  bind 127.0.0.1:8444 ssl crt {} ca-file {} verify required\n  default_backend be\n\
             backend be\n  server s1 127.0.0.1:{BACKEND_PORT}\n",
            // HAProxy sizes its descriptor needs from maxconn (two per
            // connection) and refuses to start beyond the limit.
            connections + 100,
            combined.display(),
            client_ca.cert.display()
        ),
    )
    .expect("haproxy.cfg");
    std::fs::write(
        dir.join("stunnel.conf"),
        format!(
            "foreground = yes\npid =\n[bench]\naccept = 127.0.0.1:8445\nconnect = 127.0.0.1:{BACKEND_PORT}\n\
             cert = {}\nkey = {}\nCAfile = {}\nrequireCert = yes\nverifyChain = yes\n",
            server.cert.display(),
            server.key.display(),
            client_ca.cert.display()
        ),
    )
    .expect("stunnel.conf");

    let spawn = |name: &'static str, port: u16, program: &str, args: &[&str]| {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
        let child = netns
            .command(program)
            .args(args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Server { name, port, child }
    };
    let edgegate = edgegate_tests::testbed::edgegate_binary();
    let config_path = dir.join("edgegate.toml");
    let servers = [
        spawn(
            "edgegate",
            8443,
            edgegate.to_str().expect("UTF-8"),
            &["run", "--config", config_path.to_str().expect("UTF-8")],
        ),
        spawn(
            "haproxy",
            8444,
            "haproxy",
            &["-db", "-f", dir.join("haproxy.cfg").to_str().expect("UTF-8")],
        ),
        spawn("stunnel", 8445, "stunnel", &[dir.join("stunnel.conf").to_str().expect("UTF-8")]),
    ];
    std::thread::sleep(Duration::from_secs(2));
    let config = client_config(&server_ca.cert, &client);

    let mut rows = Vec::new();
    for server in &servers {
        let mut per_connection = Vec::new();
        // Against the process before any connection: freed memory is often
        // kept by the allocator, so a later round would start higher.
        let idle = pss_kib(server.child.id());
        for _ in 0..rounds {
            let (opened, busy) = netns.run(|| {
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
                server.name
            );
            per_connection.push((busy.saturating_sub(idle)) as f64 * 1024.0 / opened as f64);
            // Let the proxy and the backend see the closes.
            std::thread::sleep(Duration::from_secs(2));
            held.lock().expect("held").clear();
        }
        eprintln!("{}: {:.0} bytes per connection", server.name, median(&per_connection));
        rows.push((server.name, per_connection));
    }

    println!("\n## cargo xtask bench memory");
    println!(
        "{connections} idle established mTLS connections (TLS 1.3, one byte each way relayed), Pss growth of the proxy process, median of {rounds} rounds"
    );
    println!("\n| server | KiB per connection | (min–max) | edgegate ÷ this |");
    println!("|---|---:|---:|---:|");
    let ours = median(&rows[0].1);
    for (name, values) in &rows {
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.1} | {:.1}–{:.1} | {:.2} |",
            median(values) / 1024.0,
            sorted[0] / 1024.0,
            sorted[sorted.len() - 1] / 1024.0,
            ours / median(values)
        );
    }
    let json = serde_json::json!(
        rows.iter()
            .map(|(name, v)| serde_json::json!({"server": name, "bytes_per_connection": v}))
            .collect::<Vec<_>>()
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(out.join("memory.json"), serde_json::to_string_pretty(&json).expect("json"))
        .expect("write");
    drop(servers);
    drop(scratch);
}
