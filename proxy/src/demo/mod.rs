//! `edgegate demo`: the whole gate at work on a throwaway testbed of network
//! namespaces, narrated step by step with a live view of the counters.
//!
//! ```text
//!   partner ns 10.N.0.2 ──veth── 10.N.0.1 ┐
//!                                          ├ edge host ns: edgegate run (XDP + mTLS :8443) → backend 127.0.0.1:18080
//!   stranger ns 10.N.1.2 ──veth── 10.N.1.1 ┘
//! ```
//!
//! Everything it creates (namespaces, pins, files, the daemon) is removed on
//! exit, also after Ctrl-C. [`netns`] and [`pki`] are the testbed's building
//! blocks; the project's end-to-end tests build on them too.

pub mod netns;
pub mod pki;

use std::{
    io::{IsTerminal as _, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use proxy_common::{Reason, Verdict};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    control::{self, Request, Response},
    status::{CounterSnapshot, Status},
};
use netns::{Netns, unique_name};
use pki::{Authority, Issued, Leaf};

const LISTENER_PORT: u16 = 8443;
const BACKEND_PORT: u16 = 18080;

/// What the demo saw, checked at the end: each line of the story must happen.
#[derive(Default)]
struct Observed {
    partner_served: bool,
    stranger_dropped: bool,
    wrong_certificate_rejected: bool,
    stranger_served_after_allow: bool,
}

/// Runs the demo; `duration` paces the steps (at least ~1 s each).
pub fn run(duration: Duration, interrupted: Arc<AtomicBool>) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo builds network namespaces and attaches XDP: run it as root (or with sudo)");
    }
    let pause = (duration / 7).max(Duration::from_millis(800));
    let mut bed = Bed::new().context("cannot build the testbed")?;
    let mut observed = Observed::default();
    let step = |text: &str| -> anyhow::Result<()> {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if std::io::stdout().is_terminal() {
            println!("\n\x1b[1m▶ {text}\x1b[0m");
        } else {
            println!("\n▶ {text}");
        }
        Ok(())
    };
    let command = |line: &str| println!("  $ {line}");

    step(&format!(
        "a protected host, a partner ({}) and a stranger ({}), in network namespaces",
        bed.partner_ip, bed.stranger_ip
    ))?;
    println!(
        "  allowlist: {}/32 (the partner); listener :{LISTENER_PORT} requires a client certificate",
        bed.partner_ip
    );
    command(&format!("edgegate run --config {}", bed.config.display()));
    bed.start_daemon()?;
    bed.show(&bed.status()?);

    step("the partner calls the API over mutual TLS")?;
    for _ in 0..3 {
        let answer = bed.request(&bed.partner_ns, bed.host_ip(0), Some(&bed.partner_cert));
        println!("  partner  → {}", describe(&answer));
        observed.partner_served |= answer.as_deref().is_ok_and(|a| a.starts_with("HTTP/1.1 200"));
    }
    bed.show(&bed.status()?);
    bed.watch(pause, &interrupted);

    step("the stranger is not on the list: XDP drops its packets at the NIC")?;
    let answer = bed.request(&bed.stranger_ns, bed.host_ip(1), Some(&bed.stranger_cert));
    println!("  stranger → {}", describe(&answer));
    let status = bed.status()?;
    observed.stranger_dropped = answer.is_err() && counted(&status, "ipv4", "unlisted") > 0;
    bed.show(&status);
    bed.watch(pause, &interrupted);

    step("a client with a certificate from another CA, from an allowed address")?;
    let answer = bed.request(&bed.partner_ns, bed.host_ip(0), Some(&bed.foreign_cert));
    println!("  impostor → {}", describe(&answer));
    let status = bed.status()?;
    observed.wrong_certificate_rejected = answer.is_err() && rejected(&status, "unknown_ca") > 0;
    bed.show(&status);
    bed.watch(pause, &interrupted);

    step("the stranger becomes a partner: allow it at runtime, no restart")?;
    command(&format!("edgegate allow add {} --comment \"second partner\"", bed.stranger_ip));
    bed.cli(&["allow", "add", &bed.stranger_ip.to_string(), "--comment", "second partner"])?;
    let answer = bed.request(&bed.stranger_ns, bed.host_ip(1), Some(&bed.stranger_cert));
    println!("  stranger → {}", describe(&answer));
    observed.stranger_served_after_allow =
        answer.as_deref().is_ok_and(|a| a.starts_with("HTTP/1.1 200"));
    bed.show(&bed.status()?);
    bed.watch(pause, &interrupted);

    step("what the gate saw")?;
    command("edgegate status");
    bed.show(&bed.status()?);
    let missing: Vec<&str> = [
        (observed.partner_served, "the partner was served"),
        (observed.stranger_dropped, "the stranger was dropped at XDP"),
        (observed.wrong_certificate_rejected, "the foreign certificate was rejected"),
        (observed.stranger_served_after_allow, "the stranger was served after `allow add`"),
    ]
    .into_iter()
    .filter(|(seen, _)| !seen)
    .map(|(_, what)| what)
    .collect();
    if !missing.is_empty() {
        bail!("the demo did not see: {}", missing.join("; "));
    }
    println!("\n✔ demo complete: every step behaved as expected; removing the testbed");
    Ok(())
}

fn describe(answer: &Result<String, String>) -> String {
    match answer {
        Ok(response) => {
            format!("{} (over mTLS)", response.lines().next().unwrap_or("empty answer"))
        }
        Err(e) => format!("refused: {e}"),
    }
}

fn counted(status: &Status, family: &str, reason: &str) -> u64 {
    status
        .counters
        .iter()
        .find(|c| c.family.name() == family && c.reason.name() == reason)
        .map_or(0, |c| c.packets)
}

fn rejected(status: &Status, reason: &str) -> u64 {
    status.listeners.iter().filter_map(|l| l.rejected.get(reason)).sum()
}

/// The demo's testbed. Dropping it removes everything.
struct Bed {
    host: Netns,
    partner_ns: Netns,
    stranger_ns: Netns,
    subnet: u8,
    partner_ip: Ipv4Addr,
    stranger_ip: Ipv4Addr,
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    bpffs_dir: PathBuf,
    server_ca: Authority,
    partner_cert: Issued,
    stranger_cert: Issued,
    foreign_cert: Issued,
    daemon: Option<Child>,
    backend_stop: Arc<AtomicBool>,
}

impl Bed {
    fn new() -> anyhow::Result<Self> {
        let subnet = u8::try_from(std::process::id() % 200).expect("< 200") + 20;
        // Fresh and private: a directory planted under /tmp is never reused.
        let dir = crate::files::private_dir("edgegate-demo-")?;
        std::fs::create_dir_all(dir.join("pki"))?;
        let host = Netns::new("egdh");
        let partner_ns = Netns::new("egdp");
        let stranger_ns = Netns::new("egds");
        let mut interfaces = Vec::new();
        for (index, client) in [&partner_ns, &stranger_ns].into_iter().enumerate() {
            let index = u8::try_from(index).expect("two");
            let (host_if, client_if) = (unique_name("egdh"), unique_name("egdc"));
            netns::veth_pair(&host, &host_if, client, &client_if);
            for (ns, name, last) in [(&host, &host_if, 1), (client, &client_if, 2)] {
                ns.ip(&["addr", "add", &format!("10.{subnet}.{index}.{last}/24"), "dev", name]);
                ns.ip(&["link", "set", name, "up"]);
            }
            interfaces.push(host_if);
        }
        let server_ca = Authority::new(&dir.join("pki"), "server-ca");
        let client_ca = Authority::new(&dir.join("pki"), "partner-ca");
        let foreign_ca = Authority::new(&dir.join("pki"), "foreign-ca");
        let host_ips: Vec<String> = (0..2).map(|i| format!("10.{subnet}.{i}.1")).collect();
        let host_ips: Vec<&str> = host_ips.iter().map(String::as_str).collect();
        let server_cert = server_ca.issue("server", &Leaf::server(&host_ips));
        let partner_cert = client_ca.issue("partner", &Leaf::client("partner"));
        let stranger_cert = client_ca.issue("stranger", &Leaf::client("second-partner"));
        let foreign_cert = foreign_ca.issue("impostor", &Leaf::client("partner"));
        let partner_ip = Ipv4Addr::new(10, subnet, 0, 2);
        let state = dir.join("state");
        std::fs::create_dir_all(&state)?;
        std::fs::write(
            state.join("allowlist"),
            format!("{partner_ip}/32  # the partner platform\n"),
        )?;
        let socket = dir.join("control.sock");
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("egdemo"));
        let config = dir.join("edgegate.toml");
        let quoted: Vec<String> = interfaces.iter().map(|i| format!("\"{i}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "[filter]\ninterfaces = [{}]\n\n[daemon]\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\
                 bpffs_dir = \"{}\"\ndrain_timeout = \"2s\"\n\n[[listener]]\nname = \"api\"\n\
                 bind = \"0.0.0.0:{LISTENER_PORT}\"\nbackend = \"127.0.0.1:{BACKEND_PORT}\"\n\
                 cert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
                quoted.join(", "),
                socket.display(),
                state.display(),
                bpffs_dir.display(),
                server_cert.cert.display(),
                server_cert.key.display(),
                client_ca.cert.display(),
            ),
        )?;
        let bed = Self {
            host,
            partner_ns,
            stranger_ns,
            subnet,
            partner_ip,
            stranger_ip: Ipv4Addr::new(10, subnet, 1, 2),
            dir,
            config,
            socket,
            bpffs_dir,
            server_ca,
            partner_cert,
            stranger_cert,
            foreign_cert,
            daemon: None,
            backend_stop: Arc::new(AtomicBool::new(false)),
        };
        bed.start_backend()?;
        Ok(bed)
    }

    fn host_ip(&self, index: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, self.subnet, index, 1))
    }

    /// A tiny HTTP backend on the host's loopback.
    fn start_backend(&self) -> anyhow::Result<()> {
        let listener =
            self.host.run(|| std::net::TcpListener::bind(("127.0.0.1", BACKEND_PORT)))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::clone(&self.backend_stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nhello, partner\n",
                );
            }
        });
        Ok(())
    }

    fn start_daemon(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("daemon.log"))?;
        let exe = std::env::current_exe()?;
        let child = self
            .host
            .command(exe.to_str().context("a UTF-8 path")?)
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start `edgegate run`")?;
        // Stored before waiting, so that Drop stops it whatever happens next.
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while control::call(&self.socket, &Request::Ping).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
                bail!("the daemon did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn status(&self) -> anyhow::Result<Status> {
        match control::call(&self.socket, &Request::Status { top_rules: 5, dropped_sources: 0 })? {
            Response::Status(status) => Ok(*status),
            other => bail!("unexpected answer: {other:?}"),
        }
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new(std::env::current_exe()?)
            .arg("--control-socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            bail!("edgegate {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// One HTTPS request over mutual TLS from inside `client`.
    fn request(
        &self,
        client: &Netns,
        server: IpAddr,
        cert: Option<&Issued>,
    ) -> Result<String, String> {
        let config = pki::client_config(&self.server_ca.cert, cert, rustls::DEFAULT_VERSIONS)
            .map_err(|e| e.to_string())?;
        client.run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let address = SocketAddr::new(server, LISTENER_PORT);
                let tcp = tokio::time::timeout(
                    Duration::from_millis(800),
                    tokio::net::TcpStream::connect(address),
                )
                .await
                .map_err(|_| "no answer to the SYN (dropped at XDP)".to_owned())?
                .map_err(|e| e.to_string())?;
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                let mut tls = connector
                    .connect(ServerName::IpAddress(server.into()), tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                tls.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
                    .await
                    .map_err(|e| e.to_string())?;
                let mut response = Vec::new();
                tls.read_to_end(&mut response).await.map_err(|e| format!("TLS alert: {e}"))?;
                Ok(String::from_utf8_lossy(&response).into_owned())
            })
        })
    }

    /// Waits `pause`, redrawing the counters in place twice a second when the
    /// output is a terminal.
    fn watch(&self, pause: Duration, interrupted: &AtomicBool) {
        let live = std::io::stdout().is_terminal();
        let until = Instant::now() + pause;
        while Instant::now() < until && !interrupted.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(500).min(until - Instant::now()));
            if live && let Ok(status) = self.status() {
                // Up over the panel (one XDP line, one per listener), clear, redraw.
                print!("\x1b[{}A\x1b[J", 1 + status.listeners.len());
                self.show(&status);
            }
        }
    }

    /// Prints the counters that tell the story.
    fn show(&self, status: &Status) {
        let packets = |counts: fn(&CounterSnapshot) -> bool| -> u64 {
            status.counters.iter().filter(|c| counts(c)).map(|c| c.packets).sum()
        };
        println!(
            "  ┌ XDP      passed {:>6}   dropped: unlisted {:>4}, denied {:>4}, malformed {:>4}",
            packets(|c| c.verdict == Verdict::Pass),
            packets(|c| c.reason == Reason::Unlisted),
            packets(|c| c.reason == Reason::Denied),
            packets(|c| c.reason == Reason::Malformed),
        );
        for listener in &status.listeners {
            let rejected: Vec<String> =
                listener.rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
            println!(
                "  └ mTLS :{} handshakes ok {:>4}   rejected: {}   active {}",
                listener.bind.port(),
                listener.handshakes_ok,
                if rejected.is_empty() { "none".to_owned() } else { rejected.join(", ") },
                listener.active
            );
        }
        let _ = std::io::stdout().flush();
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        self.backend_stop.store(true, Ordering::Relaxed);
        if let Err(e) = crate::filter::detach_pinned(&self.bpffs_dir, None) {
            eprintln!("cleanup of {}: {e}", self.bpffs_dir.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces (and their interfaces) go with their fields.
    }
}
