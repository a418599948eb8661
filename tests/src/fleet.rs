//! A fleet in network namespaces: three hosts, each with a member of one
//! real etcd cluster and the real `edgegate` daemon in fleet mode, and two
//! clients, all joined by a bridge in a namespace of their own.
//!
//! etcd runs as in production: TLS with client certificates
//! (`--client-cert-auth`) and auth on, each host its own user whose role may
//! read the group and write only its own `hosts/` and `alive/` keys (and,
//! in an unsigned fleet, the list). `edgegate-admin` writes the list; `root`
//! is the test's hostile writer. A signed fleet's hosts trust one key,
//! `admin.key`, used by [`Fleet::admin_cli`].
//!
//! ```text
//!             fabric ns: bridge
//!   ┌───────────┬──────┴─────┬────────────┬──────────┐
//! host 0      host 1       host 2       allowed   stranger
//! 10.77.0.10  .11          .12          .100      .200 (+ .201…)
//! etcd m0     etcd m1      etcd m2
//! edgegate    edgegate     edgegate     (XDP on each host's link, port 9443)
//! ```

use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use edgegate::{
    control::{self, Request, Response},
    status::{FleetView, Status},
};

use edgegate::demo::pki::{Authority, Issued, Leaf};

use crate::{
    netns::{self, Netns},
    testbed::{CONNECT_TIMEOUT, PROTECTED_PORT, TcpServer, edgegate_binary},
    unique_name,
};

pub const HOSTS: usize = 3;
pub const GROUP: &str = "partner-gate";
pub const ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);

pub fn host_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + u8::try_from(index).expect("few hosts"))
}

/// The stranger's extra source addresses (`STRANGER` + 1 + n), for
/// measurements that need a fresh, never-listed source per change.
pub fn stranger_alias(n: usize) -> Ipv4Addr {
    let [a, b, c, d] = STRANGER.octets();
    Ipv4Addr::new(a, b, c, d + 1 + u8::try_from(n).expect("< 50 aliases"))
}

pub struct Host {
    pub netns: Netns,
    pub interface: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub bpffs_dir: PathBuf,
    daemon: Mutex<Option<Child>>,
    member: Mutex<Option<Child>>,
    _server: TcpServer,
}

/// etcd users (the certificates' common names).
pub const ROOT_USER: &str = "root";
pub const ADMIN_USER: &str = "edgegate-admin";

pub fn host_user(index: usize) -> String {
    format!("edgegate-host{index}")
}

pub struct Fleet {
    pub hosts: Vec<Host>,
    pub allowed: Netns,
    pub stranger: Netns,
    pub dir: PathBuf,
    /// The CA of etcd's members and clients.
    pub ca: PathBuf,
    /// Client certificates by etcd user.
    certs: std::collections::BTreeMap<String, Issued>,
    /// The hosts require the admin's signature (`trusted_keys`).
    pub signed: bool,
    /// The trusted key pair: `admin.key`, and `admin.pub`'s line.
    pub signing_key: PathBuf,
    pub trusted_key: String,
    /// The `[fleet]` file the admin commits with.
    pub admin_config: PathBuf,
    // Last: the bridge goes once every link to it is gone.
    _fabric: Netns,
}

impl Fleet {
    /// An unsigned fleet: the hosts commit changes themselves.
    pub fn new(stranger_aliases: usize) -> Self {
        Self::with(stranger_aliases, false)
    }

    /// A signed fleet: the hosts enforce only what `admin.key` signed, and
    /// their etcd users may not write the list.
    pub fn signed(stranger_aliases: usize) -> Self {
        Self::with(stranger_aliases, true)
    }

    /// Namespaces, links, the etcd cluster (healthy, TLS, auth on) and the
    /// daemons' configs; no daemon runs yet.
    fn with(stranger_aliases: usize, signed: bool) -> Self {
        crate::require_root();
        let fabric = Netns::new("egf");
        fabric.ip(&["link", "add", "br0", "type", "bridge"]);
        fabric.ip(&["link", "set", "br0", "up"]);
        let attach = |ns: &Netns, address: Ipv4Addr| {
            let inside = unique_name("egh");
            let outside = unique_name("egb");
            netns::veth_pair(ns, &inside, &fabric, &outside);
            fabric.ip(&["link", "set", &outside, "master", "br0", "up"]);
            ns.ip(&["addr", "add", &format!("{address}/24"), "dev", &inside]);
            ns.ip(&["link", "set", &inside, "up"]);
            inside
        };
        let dir = std::env::temp_dir().join(unique_name("edgegate-fleet-"));
        std::fs::create_dir_all(&dir).expect("fleet dir");
        let hosts = (0..HOSTS)
            .map(|index| {
                let netns = Netns::new("egh");
                let interface = attach(&netns, host_address(index));
                let host_dir = dir.join(format!("host{index}"));
                std::fs::create_dir_all(&host_dir).expect("host dir");
                let server = TcpServer::start(&netns, PROTECTED_PORT);
                Host {
                    socket: host_dir.join("run/control.sock"),
                    config: host_dir.join("edgegate.toml"),
                    bpffs_dir: PathBuf::from("/sys/fs/bpf").join(unique_name("egfleet")),
                    dir: host_dir,
                    netns,
                    interface,
                    daemon: Mutex::new(None),
                    member: Mutex::new(None),
                    _server: server,
                }
            })
            .collect();
        let allowed = Netns::new("ega");
        attach(&allowed, ALLOWED);
        let stranger = Netns::new("egx");
        let stranger_link = attach(&stranger, STRANGER);
        for n in 0..stranger_aliases {
            stranger.ip(&[
                "addr",
                "add",
                &format!("{}/24", stranger_alias(n)),
                "dev",
                &stranger_link,
            ]);
        }
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        let authority = Authority::new(&pki, "etcd-ca");
        let both = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        for index in 0..HOSTS {
            let address = host_address(index).to_string();
            let leaf = Leaf { usages: both.clone(), ..Leaf::server(&[&address]) };
            authority.issue(&format!("member{index}"), &leaf);
        }
        let users = [ROOT_USER.to_owned(), ADMIN_USER.to_owned()]
            .into_iter()
            .chain((0..HOSTS).map(host_user));
        let certs = users.map(|user| (user.clone(), authority.issue(&user, &Leaf::client(&user))));
        let signing_stem = dir.join("admin");
        let keygen = Command::new(edgegate_binary())
            .args(["fleet", "keygen", "--out"])
            .arg(&signing_stem)
            .output()
            .expect("edgegate fleet keygen");
        assert!(keygen.status.success(), "keygen: {}", String::from_utf8_lossy(&keygen.stderr));
        let trusted_key =
            std::fs::read_to_string(dir.join("admin.pub")).expect("admin.pub").trim().to_owned();
        let fleet = Self {
            hosts,
            allowed,
            stranger,
            ca: authority.cert.clone(),
            certs: certs.collect(),
            signed,
            signing_key: dir.join("admin.key"),
            trusted_key,
            admin_config: dir.join("admin.toml"),
            dir,
            _fabric: fabric,
        };
        for index in 0..HOSTS {
            fleet.write_config(index, "");
            fleet.start_member(index);
        }
        fleet.write_admin_config(ADMIN_USER);
        fleet.await_etcd_healthy();
        fleet.enable_auth();
        fleet
    }

    pub fn endpoints(&self) -> String {
        (0..HOSTS)
            .map(|i| format!("https://{}:2379", host_address(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client certificate of etcd user `user`.
    pub fn cert(&self, user: &str) -> &Issued {
        &self.certs[user]
    }

    /// Roles as the README gives them: hosts read the group and write their
    /// own records (and the list, unless the fleet is signed); the admin
    /// writes the list. Then auth goes on.
    fn enable_auth(&self) {
        let group = format!("/edgegate/{GROUP}/");
        let list = format!("{group}list/");
        self.etcdctl_ok(&["user", "add", ROOT_USER, "--no-password"]);
        self.etcdctl_ok(&["user", "grant-role", ROOT_USER, "root"]);
        self.etcdctl_ok(&["role", "add", ADMIN_USER]);
        self.etcdctl_ok(&["role", "grant-permission", ADMIN_USER, "read", &group, "--prefix"]);
        self.etcdctl_ok(&["role", "grant-permission", ADMIN_USER, "readwrite", &list, "--prefix"]);
        self.etcdctl_ok(&["user", "add", ADMIN_USER, "--no-password"]);
        self.etcdctl_ok(&["user", "grant-role", ADMIN_USER, ADMIN_USER]);
        for index in 0..HOSTS {
            let user = host_user(index);
            self.etcdctl_ok(&["role", "add", &user]);
            self.etcdctl_ok(&["role", "grant-permission", &user, "read", &group, "--prefix"]);
            for own in [format!("{group}hosts/host{index}"), format!("{group}alive/host{index}")] {
                self.etcdctl_ok(&["role", "grant-permission", &user, "readwrite", &own]);
            }
            if !self.signed {
                self.etcdctl_ok(&[
                    "role",
                    "grant-permission",
                    &user,
                    "readwrite",
                    &list,
                    "--prefix",
                ]);
            }
            self.etcdctl_ok(&["user", "add", &user, "--no-password"]);
            self.etcdctl_ok(&["user", "grant-role", &user, &user]);
        }
        self.etcdctl_ok(&["auth", "enable"]);
    }

    /// The admin's file: only a `[fleet]` table, with `user`'s credentials.
    pub fn write_admin_config(&self, user: &str) {
        let cert = self.cert(user);
        let endpoints: Vec<String> =
            self.endpoints().split(',').map(|e| format!("\"{e}\"")).collect();
        let config = format!(
            "[fleet]\nendpoints = [{}]\ngroup = \"{GROUP}\"\nca = \"{}\"\ncert = \"{}\"\n\
             key = \"{}\"\ntimeout = \"1s\"\ntrusted_keys = [\"{}\"]\n",
            endpoints.join(", "),
            self.ca.display(),
            cert.cert.display(),
            cert.key.display(),
            self.trusted_key,
        );
        std::fs::write(&self.admin_config, config).expect("write admin config");
    }

    /// Writes host `index`'s config; `extra_fleet` goes into its `[fleet]`
    /// table. A signed fleet's hosts trust the admin's key.
    pub fn write_config(&self, index: usize, extra_fleet: &str) {
        let host = &self.hosts[index];
        let endpoints: Vec<String> =
            self.endpoints().split(',').map(|e| format!("\"{e}\"")).collect();
        let cert = self.cert(&host_user(index));
        let trusted = if self.signed {
            format!("trusted_keys = [\"{}\"]\n", self.trusted_key)
        } else {
            String::new()
        };
        let config = format!(
            "[filter]\ninterfaces = [\"{}\"]\nports = [{PROTECTED_PORT}]\n\n\
             [daemon]\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\nbpffs_dir = \"{}\"\n\n\
             [fleet]\nendpoints = [{}]\ngroup = \"{GROUP}\"\nhost_id = \"host{index}\"\n\
             timeout = \"1s\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{trusted}{extra_fleet}\n",
            host.interface,
            host.socket.display(),
            host.dir.join("state").display(),
            host.bpffs_dir.display(),
            endpoints.join(", "),
            self.ca.display(),
            cert.cert.display(),
            cert.key.display(),
        );
        std::fs::write(&host.config, config).expect("write config");
    }

    /// Starts (or restarts, on its data) etcd member `index` in host `index`'s namespace.
    pub fn start_member(&self, index: usize) {
        let host = &self.hosts[index];
        let address = host_address(index);
        let cluster: Vec<String> =
            (0..HOSTS).map(|i| format!("m{i}=http://{}:2380", host_address(i))).collect();
        let pki = self.dir.join("pki");
        let log = std::fs::File::create(host.dir.join(format!("etcd-{}.log", unique_name(""))))
            .expect("etcd log");
        let child = host
            .netns
            .command("etcd")
            .args(["--name", &format!("m{index}")])
            .arg("--data-dir")
            .arg(host.dir.join("etcd"))
            .args(["--listen-client-urls", &format!("https://{address}:2379")])
            .args(["--advertise-client-urls", &format!("https://{address}:2379")])
            .arg("--cert-file")
            .arg(pki.join(format!("member{index}.pem")))
            .arg("--key-file")
            .arg(pki.join(format!("member{index}.key")))
            .arg("--trusted-ca-file")
            .arg(&self.ca)
            .arg("--client-cert-auth")
            .args(["--listen-peer-urls", &format!("http://{address}:2380")])
            .args(["--initial-advertise-peer-urls", &format!("http://{address}:2380")])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", "edgegate-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian's etcd-server)");
        *host.member.lock().expect("lock") = Some(child);
    }

    /// Kills etcd member `index` (SIGKILL, as a crashed instance).
    pub fn kill_member(&self, index: usize) {
        if let Some(mut child) = self.hosts[index].member.lock().expect("lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `etcdctl ARGS` against the cluster as `root`, from host 0's namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_as(ROOT_USER, args)
    }

    /// `etcdctl ARGS` as etcd user `user` (by its client certificate).
    pub fn etcdctl_as(&self, user: &str, args: &[&str]) -> Output {
        let cert = self.cert(user);
        self.hosts[0]
            .netns
            .command("etcdctl")
            .arg(format!("--endpoints={}", self.endpoints()))
            .arg(format!("--cacert={}", self.ca.display()))
            .arg(format!("--cert={}", cert.cert.display()))
            .arg(format!("--key={}", cert.key.display()))
            .args(["--command-timeout=5s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl (Debian's etcd-client)")
    }

    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        succeeded(self.etcdctl(args), &format!("etcdctl {}", args.join(" ")))
    }

    pub fn await_etcd_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.etcdctl(&["endpoint", "health"]).status.success() {
            assert!(Instant::now() < deadline, "etcd did not become healthy: {}", self.etcd_logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn etcd_logs(&self) -> String {
        let mut logs = String::new();
        for host in &self.hosts {
            for entry in std::fs::read_dir(&host.dir).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with("etcd-") {
                    logs += &std::fs::read_to_string(entry.path()).unwrap_or_default();
                }
            }
        }
        logs
    }

    /// Starts host `index`'s daemon and waits for its control socket.
    pub fn start_daemon(&self, index: usize) {
        let host = &self.hosts[index];
        let mut daemon = host.daemon.lock().expect("lock");
        assert!(daemon.is_none(), "host {index}'s daemon already runs");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(host.dir.join("daemon.log"))
            .expect("daemon log");
        let child = host
            .netns
            .command(edgegate_binary().to_str().expect("UTF-8"))
            .args(["run", "--config", host.config.to_str().expect("UTF-8")])
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start edgegate run");
        let child = daemon.insert(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while control::call(&host.socket, &Request::Ping).is_err() {
            if let Some(status) = child.try_wait().expect("wait") {
                panic!("host {index}'s daemon exited with {status}:\n{}", self.daemon_log(index));
            }
            assert!(
                Instant::now() < deadline,
                "no daemon on host {index}:\n{}",
                self.daemon_log(index)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start_daemons(&self) {
        (0..HOSTS).for_each(|i| self.start_daemon(i));
    }

    pub fn kill_daemon(&self, index: usize) {
        let mut child = self.hosts[index].daemon.lock().expect("lock").take().expect("running");
        child.kill().expect("kill");
        child.wait().expect("reap");
    }

    pub fn daemon_log(&self, index: usize) -> String {
        std::fs::read_to_string(self.hosts[index].dir.join("daemon.log")).unwrap_or_default()
    }

    /// `edgegate ARGS` against host `index`'s daemon.
    pub fn cli(&self, index: usize, args: &[&str]) -> Output {
        Command::new(edgegate_binary())
            .arg("--control-socket")
            .arg(&self.hosts[index].socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the edgegate CLI")
    }

    /// `edgegate ARGS --signing-key admin.key --config admin.toml`: a change
    /// made where the key is, straight to etcd (from host 0's namespace,
    /// which reaches the cluster).
    pub fn admin_cli(&self, args: &[&str]) -> Output {
        self.admin_cli_with(args, &self.signing_key)
    }

    /// As [`Self::admin_cli`], signed with `key`.
    pub fn admin_cli_with(&self, args: &[&str], key: &std::path::Path) -> Output {
        self.hosts[0]
            .netns
            .command(edgegate_binary().to_str().expect("UTF-8"))
            .args(args)
            .arg("--signing-key")
            .arg(key)
            .arg("--config")
            .arg(&self.admin_config)
            .stdin(Stdio::null())
            .output()
            .expect("run the edgegate CLI")
    }

    pub fn admin_cli_ok(&self, args: &[&str]) -> String {
        succeeded(self.admin_cli(args), &format!("admin: edgegate {}", args.join(" ")))
    }

    pub fn cli_ok(&self, index: usize, args: &[&str]) -> String {
        succeeded(self.cli(index, args), &format!("host {index}: edgegate {}", args.join(" ")))
    }

    pub fn status(&self, index: usize) -> Status {
        match control::call(
            &self.hosts[index].socket,
            &Request::Status { top_rules: 0, dropped_sources: 0 },
        ) {
            Ok(Response::Status(status)) => *status,
            other => panic!("host {index}: status: {other:?}"),
        }
    }

    pub fn view(&self, index: usize) -> FleetView {
        match control::call(&self.hosts[index].socket, &Request::FleetStatus) {
            Ok(Response::Fleet(view)) => view,
            other => panic!("host {index}: fleet status: {other:?}"),
        }
    }

    /// The generation host `index` enforces.
    pub fn applied(&self, index: usize) -> u64 {
        self.status(index).fleet.expect("fleet mode").applied_generation
    }

    /// Waits until host `index` says its watch is `connected` to etcd (or
    /// not): a watch notices an outage only by its keep-alive, and after
    /// one retries on a backoff that grew meanwhile.
    pub fn await_connected(&self, index: usize, connected: bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.status(index).fleet.expect("fleet mode").connected != connected {
            assert!(
                Instant::now() < deadline,
                "host {index} never became {}:\n{}",
                if connected { "connected" } else { "disconnected" },
                self.daemon_log(index)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every host enforces `generation` or later.
    pub fn await_generation(&self, generation: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let behind: Vec<(usize, u64)> =
                (0..HOSTS).map(|i| (i, self.applied(i))).filter(|(_, g)| *g < generation).collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hosts (index, generation) {behind:?} do not enforce generation {generation}:\n{}",
                self.daemon_log(behind[0].0)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a TCP connection from `client` (from `source`) to host
    /// `index`'s protected port completes and reads the greeting.
    pub fn connects(&self, client: &Netns, source: Ipv4Addr, index: usize) -> bool {
        let target = SocketAddr::from((host_address(index), PROTECTED_PORT));
        client.run(|| connect_from(source, target, CONNECT_TIMEOUT))
    }

    pub fn allowed_connects(&self, index: usize) -> bool {
        self.connects(&self.allowed, ALLOWED, index)
    }

    pub fn stranger_connects(&self, index: usize) -> bool {
        self.connects(&self.stranger, STRANGER, index)
    }

    /// Takes host `index` off the bridge (its etcd member too), or puts it back.
    pub fn set_link(&self, index: usize, up: bool) {
        let host = &self.hosts[index];
        host.netns.ip(&["link", "set", &host.interface, if up { "up" } else { "down" }]);
    }
}

/// `output`'s stdout, asserting that `what` succeeded (its output otherwise).
fn succeeded(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// A connection from `source` (bound first) to `target`, greeting read.
pub fn connect_from(source: Ipv4Addr, target: SocketAddr, timeout: Duration) -> bool {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    let socket =
        socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).expect("socket");
    setsockopt(&socket, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
    )
    .expect("bind the source address");
    // Connect without blocking past `timeout`: a dropped SYN never answers.
    let stream = TcpStream::from(socket);
    stream.set_nonblocking(true).expect("nonblocking");
    let address = nix::sys::socket::SockaddrStorage::from(target);
    match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&stream), &address) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(_) => return false,
    }
    let mut poll =
        [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&stream), nix::poll::PollFlags::POLLOUT)];
    let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    if nix::poll::poll(&mut poll, millis).unwrap_or(0) == 0
        || stream.take_error().ok().flatten().is_some()
    {
        return false;
    }
    stream.set_nonblocking(false).expect("blocking");
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    let mut greeting = [0u8; 5];
    (&stream).read_exact(&mut greeting).is_ok() && &greeting == b"hello"
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for host in &self.hosts {
            for process in [&host.daemon, &host.member] {
                let child = process.lock().map_or(None, |mut c| c.take());
                if let Some(mut child) = child {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            if let Err(e) = edgegate::filter::detach_pinned(&host.bpffs_dir, None) {
                eprintln!("cleanup of {}: {e}", host.bpffs_dir.display());
            }
        }
        if std::thread::panicking() {
            for index in 0..HOSTS {
                eprintln!("--- host {index}'s daemon log:\n{}", self.daemon_log(index));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
