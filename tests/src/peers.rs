//! For the benchmarks that compare edgegate with its peers: edgegate, HAProxy
//! and stunnel side by side in one network namespace, terminating the same
//! mutual TLS (ECDSA P-256 certificates) on loopback and forwarding to the
//! same backend. Everything is removed on drop.

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
/// HAProxy without session cache or tickets (see [`PeerBed::start_haproxy_variants`]).
pub const HAPROXY_FULL_PORT: u16 = 8446;
/// HAProxy `mode tcp` without TLS.
pub const HAPROXY_TCP_PORT: u16 = 8447;

/// One proxy under test, killed on drop.
pub struct Server {
    pub name: &'static str,
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
        Self { netns, server_ca, client_ca, server, client, dir, bpffs_dir }
    }

    /// Starts edgegate (:8443), HAProxy (:8444, `nbthread` = cores) and
    /// stunnel (:8445), each accepting up to `max_connections`.
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
        haproxy("haproxy.cfg", &tls_global(""), &tls_bind(8444));
        // The same frontend without a session cache or tickets: HAProxy's
        // best configuration for clients that never resume.
        haproxy(
            "haproxy-full.cfg",
            &format!("tune.ssl.cachesize 0\n  {}", tls_global(" no-tls-tickets")),
            &tls_bind(HAPROXY_FULL_PORT),
        );
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
        let servers = vec![
            self.spawn(
                "edgegate",
                8443,
                &edgegate,
                &["run", "--config", &path(&dir.join("edgegate.toml"))],
            ),
            self.spawn(
                "haproxy",
                8444,
                Path::new("haproxy"),
                &["-db", "-f", &path(&dir.join("haproxy.cfg"))],
            ),
            self.spawn("stunnel", 8445, Path::new("stunnel"), &[&path(&dir.join("stunnel.conf"))]),
        ];
        std::thread::sleep(std::time::Duration::from_secs(2));
        self.check_started(servers)
    }

    /// After [`Self::start`] (whose edgegate must be stopped first): another
    /// edgegate with the same config and `args` added to `run`, once it
    /// accepts on :8443.
    pub fn start_edgegate(&self, args: &[&str]) -> Server {
        let config = path(&self.dir.join("edgegate.toml"));
        let mut run = vec!["run", "--config", &config];
        run.extend_from_slice(args);
        let server = self.spawn("edgegate", 8443, &crate::testbed::edgegate_binary(), &run);
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

    /// After [`Self::start`]: HAProxy without session cache and tickets
    /// ([`HAPROXY_FULL_PORT`]) and HAProxy relaying plain TCP ([`HAPROXY_TCP_PORT`]).
    pub fn start_haproxy_variants(&self) -> Vec<Server> {
        let config = |name: &str| path(&self.dir.join(name));
        let haproxy = Path::new("haproxy");
        let servers = vec![
            self.spawn(
                "haproxy-full",
                HAPROXY_FULL_PORT,
                haproxy,
                &["-db", "-f", &config("haproxy-full.cfg")],
            ),
            self.spawn(
                "haproxy-tcp",
                HAPROXY_TCP_PORT,
                haproxy,
                &["-db", "-f", &config("haproxy-tcp.cfg")],
            ),
        ];
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

    fn spawn(&self, name: &'static str, port: u16, program: &Path, args: &[&str]) -> Server {
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
        Server { name, port, child }
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

    /// As [`Self::client_config`], resuming from an in-memory session store
    /// shared by every connection made with it.
    pub fn resuming_client_config(
        &self,
        version: Option<&'static SupportedProtocolVersion>,
    ) -> Arc<ClientConfig> {
        self.client_config_with(version, Resumption::in_memory_sessions(4096))
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
pub fn versions() -> String {
    format!(
        "peers: {} (nbthread = cores); {}; {}",
        tool_version("haproxy", "-v"),
        tool_version("stunnel", "-version"),
        tool_version("openssl", "version")
    )
}
