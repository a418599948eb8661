//! For the benchmarks that compare edgegate with its peers: edgegate, HAProxy
//! and stunnel side by side in one network namespace, terminating the same
//! mutual TLS (ECDSA P-256 certificates) on loopback and forwarding to the
//! same backend. Everything is removed on drop.
//!
//! HAProxy runs in every build given: Debian's (OpenSSL 3.0), and one built
//! with AWS-LC, edgegate's own crypto, when [`HAPROXY_AWSLC_ENV`] names it
//! (`cargo xtask bench --haproxy-awslc PATH`), so that a comparison can be
//! made on the same TLS library.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
};

use edgegate::demo::{
    netns::{Netns, unique_name},
    pki::{Authority, Issued, Leaf},
};
use rustls::{ClientConfig, SupportedProtocolVersion, client::Resumption};

use crate::bench::tool_version;

/// Where every proxy forwards to; the benchmark provides the backend.
pub const BACKEND_PORT: u16 = 18080;
/// edgegate's second listener, with resumption off (no ticket sealed).
pub const EDGEGATE_NO_RESUMPTION_PORT: u16 = 8448;
/// HAProxy `mode tcp` without TLS.
pub const HAPROXY_TCP_PORT: u16 = 8447;
/// The path of an HAProxy built with AWS-LC, if the benchmarks are to run one.
pub const HAPROXY_AWSLC_ENV: &str = "EDGEGATE_BENCH_HAPROXY_AWSLC";

/// One HAProxy build the benchmarks run, in its defaults (session cache and
/// tickets) on `port` and in its best configuration for full handshakes
/// (neither) on `full_port`.
#[derive(Clone, Debug)]
pub struct Haproxy {
    /// Names its servers and files: `haproxy` (Debian's) or `haproxy-awslc`.
    pub key: &'static str,
    /// Names its server without session cache and tickets.
    pub full_key: &'static str,
    pub program: PathBuf,
    /// Version and TLS library, e.g. "HAProxy 2.6.12, OpenSSL 3.0.20".
    pub label: String,
    /// Whether its TLS library is AWS-LC, edgegate's own.
    pub aws_lc: bool,
    pub port: u16,
    pub full_port: u16,
}

impl Haproxy {
    /// Debian's, from `PATH`, then the AWS-LC build [`HAPROXY_AWSLC_ENV`]
    /// names, if any.
    pub fn builds() -> Vec<Self> {
        let debian = Self::probe(["haproxy", "haproxy-full"], PathBuf::from("haproxy"), 8444, 8446);
        let mut builds = vec![debian];
        if let Some(path) = std::env::var_os(HAPROXY_AWSLC_ENV).filter(|p| !p.is_empty()) {
            let keys = ["haproxy-awslc", "haproxy-awslc-full"];
            builds.push(Self::probe(keys, PathBuf::from(path), 8454, 8456));
        }
        builds
    }

    fn probe(
        [key, full_key]: [&'static str; 2],
        program: PathBuf,
        port: u16,
        full_port: u16,
    ) -> Self {
        let output = Command::new(&program)
            .arg("-vv")
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        let label = haproxy_label(&String::from_utf8_lossy(&output.stdout))
            .unwrap_or_else(|| panic!("{}: no HAProxy version in `-vv`", program.display()));
        let aws_lc = label.contains("AWS-LC");
        Self { key, full_key, program, label, aws_lc, port, full_port }
    }

    /// Its name in its defaults, for a table row.
    pub fn defaults_name(&self) -> String {
        format!("{} (defaults: session cache, tickets)", self.label)
    }

    /// Its name without session cache or tickets, for a table row.
    pub fn full_name(&self) -> String {
        format!("{}, cache and tickets off", self.label)
    }
}

/// "HAProxy 3.5-dev5, AWS-LC 5.12.0" from `haproxy -vv`: the release (without
/// a commit or a distribution's suffix) and the TLS library it runs on.
fn haproxy_label(vv: &str) -> Option<String> {
    let version = vv.lines().find_map(|l| l.strip_prefix("HAProxy version "))?;
    let version = version.split_whitespace().next()?;
    let release: Vec<&str> = version
        .split('-')
        .enumerate()
        .take_while(|(i, part)| *i == 0 || !part.starts_with(|c: char| c.is_ascii_digit()))
        .map(|(_, part)| part)
        .collect();
    let library = vv
        .lines()
        .filter(|l| l.starts_with("Running on ") && l.contains(" version : "))
        .find_map(|l| l.split_once(" : "))
        .map(|(_, library)| library.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown TLS library".into());
    Some(format!("HAProxy {}, {library}", release.join("-")))
}

/// One proxy under test, killed on drop.
pub struct Server {
    /// Names its log file.
    pub name: &'static str,
    /// Names it in a table: the program, and for HAProxy its version and TLS library.
    pub label: String,
    pub port: u16,
    pub child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct PeerBed {
    pub netns: Netns,
    pub server_ca: Authority,
    pub client_ca: Authority,
    pub server: Issued,
    pub client: Issued,
    pub dir: PathBuf,
    pub haproxies: Vec<Haproxy>,
    bpffs_dir: PathBuf,
}

impl Default for PeerBed {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerBed {
    /// The namespace and the PKI; the proxies start with [`Self::start`],
    /// once the caller's backend listens on [`BACKEND_PORT`] in `netns`.
    pub fn new() -> Self {
        crate::require_root();
        for tool in ["haproxy", "stunnel"] {
            let found = Command::new("which").arg(tool).output().is_ok_and(|o| o.status.success());
            assert!(found, "`{tool}` is missing: apt-get install haproxy stunnel4");
        }
        let netns = Netns::new("egbp");
        let dir = std::env::temp_dir().join(unique_name("edgegate-bench-"));
        std::fs::create_dir_all(dir.join("state")).expect("bench dir");
        let server_ca = Authority::new(&dir, "server-ca");
        let client_ca = Authority::new(&dir, "client-ca");
        let server = server_ca.issue("server", &Leaf::server(&["127.0.0.1"]));
        let client = client_ca.issue("client", &Leaf::client("partner"));
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("egbench"));
        let haproxies = Haproxy::builds();
        Self { netns, server_ca, client_ca, server, client, dir, haproxies, bpffs_dir }
    }

    /// Starts edgegate (:8443), each HAProxy build in its defaults (Debian's
    /// on :8444, `nbthread` = cores) and stunnel (:8445), each accepting up
    /// to `max_connections`.
    pub fn start(&self, max_connections: usize) -> Vec<Server> {
        let dir = &self.dir;
        let (cert, key, client_ca) = (&self.server.cert, &self.server.key, &self.client_ca.cert);
        let combined = dir.join("server-with-key.pem");
        let pem = std::fs::read_to_string(cert).expect("cert")
            + &std::fs::read_to_string(key).expect("key");
        std::fs::write(&combined, pem).expect("HAProxy's certificate file");
        std::fs::write(dir.join("state/allowlist"), "127.0.0.0/8\n").expect("allowlist");
        write(
            &dir.join("edgegate.toml"),
            &format!(
                "[filter]\ninterfaces = [\"lo\"]\nmode = \"skb\"\n\n[daemon]\ncontrol_socket = \"{d}/run/control.sock\"\n\
                 state_dir = \"{d}/state\"\nbpffs_dir = \"{}\"\n\n[[listener]]\nname = \"bench\"\n\
                 bind = \"127.0.0.1:8443\"\nbackend = \"127.0.0.1:{BACKEND_PORT}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
                 client_ca = \"{ca}\"\nmax_connections = {max_connections}\n\n\
                 [[listener]]\nname = \"no-resumption\"\nbind = \"127.0.0.1:{EDGEGATE_NO_RESUMPTION_PORT}\"\n\
                 backend = \"127.0.0.1:{BACKEND_PORT}\"\ncert = \"{cert}\"\nkey = \"{key}\"\nclient_ca = \"{ca}\"\n\
                 max_connections = {max_connections}\nsession_lifetime = \"0s\"\n",
                self.bpffs_dir.display(),
                cert = cert.display(),
                key = key.display(),
                ca = client_ca.display(),
                d = dir.display(),
            ),
        );
        // HAProxy's TLS 1.2 key exchange is P-256 only unless curves are named.
        let tls_global = |options: &str| {
            format!(
                "ssl-default-bind-options ssl-min-ver TLSv1.2{options}\n  ssl-default-bind-curves X25519:P-256"
            )
        };
        let tls_bind = |port: u16| {
            format!(
                "127.0.0.1:{port} ssl crt {} ca-file {} verify required",
                combined.display(),
                client_ca.display()
            )
        };
        let haproxy = |name: &str, global: &str, bind: &str| {
            write(&dir.join(name), &haproxy_config(max_connections, global, bind));
        };
        for build in &self.haproxies {
            haproxy(&format!("{}.cfg", build.key), &tls_global(""), &tls_bind(build.port));
            // The same frontend without a session cache or tickets: HAProxy's
            // best configuration for clients that never resume.
            haproxy(
                &format!("{}-full.cfg", build.key),
                &format!("tune.ssl.cachesize 0\n  {}", tls_global(" no-tls-tickets")),
                &tls_bind(build.full_port),
            );
        }
        // No TLS at all: the cost of the two TCP connections alone.
        haproxy("haproxy-tcp.cfg", "", &format!("127.0.0.1:{HAPROXY_TCP_PORT}"));
        write(
            &dir.join("stunnel.conf"),
            &format!(
                "foreground = yes\npid =\n[bench]\naccept = 127.0.0.1:8445\nconnect = 127.0.0.1:{BACKEND_PORT}\n\
                 cert = {}\nkey = {}\nCAfile = {}\nrequireCert = yes\nverifyChain = yes\n",
                cert.display(),
                key.display(),
                client_ca.display()
            ),
        );
        let edgegate = crate::testbed::edgegate_binary();
        let mut servers = vec![self.spawn(
            "edgegate",
            "edgegate".into(),
            8443,
            &edgegate,
            &["run", "--config", &path(&dir.join("edgegate.toml"))],
        )];
        for build in &self.haproxies {
            servers.push(self.spawn(
                build.key,
                build.label.clone(),
                build.port,
                &build.program,
                &["-db", "-f", &path(&dir.join(format!("{}.cfg", build.key)))],
            ));
        }
        servers.push(self.spawn(
            "stunnel",
            "stunnel".into(),
            8445,
            Path::new("stunnel"),
            &[&path(&dir.join("stunnel.conf"))],
        ));
        std::thread::sleep(std::time::Duration::from_secs(2));
        self.check_started(servers)
    }

    /// After [`Self::start`] (whose edgegate must be stopped first): another
    /// edgegate, the `binary` given, with the same config and `args` added to
    /// `run`, once it accepts on :8443.
    pub fn start_edgegate(&self, binary: &Path, args: &[&str]) -> Server {
        let config = path(&self.dir.join("edgegate.toml"));
        let mut run = vec!["run", "--config", &config];
        run.extend_from_slice(args);
        let server = self.spawn("edgegate", "edgegate".into(), 8443, binary, &run);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], 8443));
        let timeout = std::time::Duration::from_millis(200);
        while self.netns.run(|| std::net::TcpStream::connect_timeout(&address, timeout)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "edgegate did not start:\n{}",
                self.log(&server)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Listening is not serving yet: the worker starts after the sockets.
        std::thread::sleep(std::time::Duration::from_millis(500));
        server
    }

    /// After [`Self::start`]: each HAProxy build without session cache and
    /// tickets (on its `full_port`, named its `full_key`) and Debian's relaying
    /// plain TCP ([`HAPROXY_TCP_PORT`], named `haproxy-tcp`).
    pub fn start_haproxy_variants(&self) -> Vec<Server> {
        let config = |name: &str| path(&self.dir.join(name));
        let mut servers = Vec::new();
        for build in &self.haproxies {
            servers.push(self.spawn(
                build.full_key,
                build.full_name(),
                build.full_port,
                &build.program,
                &["-db", "-f", &config(&format!("{}-full.cfg", build.key))],
            ));
        }
        servers.push(self.spawn(
            "haproxy-tcp",
            format!("{}, mode tcp, no TLS", self.haproxies[0].label),
            HAPROXY_TCP_PORT,
            Path::new("haproxy"),
            &["-db", "-f", &config("haproxy-tcp.cfg")],
        ));
        std::thread::sleep(std::time::Duration::from_secs(1));
        self.check_started(servers)
    }

    fn check_started(&self, mut servers: Vec<Server>) -> Vec<Server> {
        for server in &mut servers {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "{} exited at start ({status}); its log:\n{}",
                    server.name,
                    self.log(server)
                );
            }
        }
        servers
    }

    fn spawn(
        &self,
        name: &'static str,
        label: String,
        port: u16,
        program: &Path,
        args: &[&str],
    ) -> Server {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log");
        let child = self
            .netns
            .command(program.to_str().expect("UTF-8 path"))
            .args(args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Server { name, label, port, child }
    }

    /// A server's log, for a failure message.
    pub fn log(&self, server: &Server) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", server.name))).unwrap_or_default()
    }

    /// A client config for full handshakes only (no resumption) with X25519,
    /// in `version` (or any version the server picks).
    pub fn client_config(
        &self,
        version: Option<&'static SupportedProtocolVersion>,
    ) -> Arc<ClientConfig> {
        self.client_config_with(version, Resumption::disabled())
    }

    /// `clients` configs as [`Self::client_config`], each resuming from a
    /// session store of its own, as separate client processes would. (rustls
    /// keeps at most 8 TLS 1.3 tickets per server in a store: 32 clients
    /// sharing one took each other's, and found none for about a quarter of
    /// their connections when the server answered in bursts.)
    pub fn resuming_client_configs(
        &self,
        version: Option<&'static SupportedProtocolVersion>,
        clients: usize,
    ) -> Vec<Arc<ClientConfig>> {
        (0..clients)
            .map(|_| self.client_config_with(version, Resumption::in_memory_sessions(8)))
            .collect()
    }

    fn client_config_with(
        &self,
        version: Option<&'static SupportedProtocolVersion>,
        resumption: Resumption,
    ) -> Arc<ClientConfig> {
        let only = version.map(|v| [v]);
        let versions = only.as_ref().map_or(rustls::DEFAULT_VERSIONS, |v| v.as_slice());
        // X25519 for the key exchange: the peers' OpenSSL 3.0 has no
        // post-quantum hybrid (rustls would otherwise offer, and edgegate
        // pick, X25519MLKEM768). P-256 is listed too: OpenSSL's TLS 1.2 uses
        // an ECDSA certificate only on a curve the client lists.
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: vec![
                rustls::crypto::aws_lc_rs::kx_group::X25519,
                rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
            ],
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let mut config = crate::pki::client_config_with(
            provider,
            &self.server_ca.cert,
            Some(&self.client),
            versions,
        )
        .expect("client config");
        config.resumption = resumption;
        Arc::new(config)
    }
}

impl Drop for PeerBed {
    fn drop(&mut self) {
        let _ = edgegate::filter::detach_pinned(&self.bpffs_dir, None);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// HAProxy relaying TCP from `bind` to the backend, `nbthread` = cores, with
/// `global` lines added.
fn haproxy_config(max_connections: usize, global: &str, bind: &str) -> String {
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    // HAProxy sizes its descriptor needs from maxconn (two per connection)
    // and refuses to start beyond the limit.
    let maxconn = max_connections + 100;
    let global = if global.is_empty() { String::new() } else { format!("  {global}\n") };
    format!(
        "global\n  nbthread {workers}\n  maxconn {maxconn}\n{global}\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n\
         frontend fe\n  bind {bind}\n  default_backend be\n\
         backend be\n  server s1 127.0.0.1:{BACKEND_PORT}\n"
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn path(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_owned()
}

/// The peers' versions, for a benchmark table's header.
pub fn versions(haproxies: &[Haproxy]) -> String {
    let labels: Vec<&str> = haproxies.iter().map(|h| h.label.as_str()).collect();
    let aws_lc = if haproxies.iter().any(|h| h.aws_lc) {
        String::new()
    } else {
        format!(
            "\nno HAProxy on AWS-LC (edgegate's crypto) in this run: give its path with \
             `cargo xtask bench --haproxy-awslc PATH` or {HAPROXY_AWSLC_ENV} (docs/BENCHMARKS.md \
             says how to build one)"
        )
    };
    format!(
        "peers: {} (nbthread = cores); {}; {}{aws_lc}",
        labels.join("; "),
        tool_version("stunnel", "-version"),
        tool_version("openssl", "version")
    )
}

#[cfg(test)]
mod tests {
    use super::haproxy_label;

    #[test]
    fn haproxy_builds_are_named_by_release_and_tls_library() {
        let debian = "HAProxy version 2.6.12-1+deb12u3 2025/10/03 - https://haproxy.org/\n\
                      Running on: Linux 6.18.44 x86_64\n\
                      Built with OpenSSL version : OpenSSL 3.0.17 1 Jul 2025\n\
                      Running on OpenSSL version : OpenSSL 3.0.20 7 Apr 2026\n";
        assert_eq!(haproxy_label(debian).as_deref(), Some("HAProxy 2.6.12, OpenSSL 3.0.20"));
        let aws_lc = "HAProxy version 3.5-dev5-50872daa6 2026/08/21 - https://haproxy.org/\n\
                      Running on: Linux 6.18.44 x86_64\n\
                      Running on SSL library version : AWS-LC 5.12.0\n";
        assert_eq!(haproxy_label(aws_lc).as_deref(), Some("HAProxy 3.5-dev5, AWS-LC 5.12.0"));
        assert_eq!(haproxy_label("stunnel 5.68"), None);
    }
}
