//! A protected host and its clients in network namespaces, joined by veth
//! pairs, with the real `edgegate` binary attached to the host's interfaces.
//!
//! ```text
//!   client 0 ns            server ns (edgegate run, TCP server)
//!   [c0] 10.X.0.2  <--veth-->  [s0] 10.X.0.1
//!   client 1 ns
//!   [c1] 10.X.1.2  <--veth-->  [s1] 10.X.1.1
//! ```

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use edgegate::{
    control::{self, Request, Response},
    status::Status,
};
use proxy_common::Verdict;

use crate::{netns::Netns, unique_name};

/// The port the testbed's TCP server listens on and the filter protects.
pub const PROTECTED_PORT: u16 = 9443;
/// A port the server also listens on that the filter does not protect.
pub const OPEN_PORT: u16 = 9080;

pub struct Client {
    pub netns: Netns,
    pub interface: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

pub struct Testbed {
    pub server: Netns,
    pub server_ipv4: Vec<Ipv4Addr>,
    pub server_ipv6: Vec<Ipv6Addr>,
    pub clients: Vec<Client>,
    pub interfaces: Vec<String>,
    pub dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    daemon: Mutex<Option<Child>>,
    servers: Vec<TcpServer>,
}

impl Testbed {
    /// Namespaces, veths and a config; the daemon is not started yet.
    pub fn new(clients: usize) -> Self {
        crate::require_root();
        let server = Netns::new("egs");
        let subnet = u8::try_from(std::process::id() % 200).expect("< 200") + 20;
        let dir = scratch_root().join(unique_name("edgegate-test-"));
        std::fs::create_dir_all(&dir).expect("test dir");
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("egtest"));
        let mut testbed = Self {
            server,
            server_ipv4: Vec::new(),
            server_ipv6: Vec::new(),
            clients: Vec::new(),
            interfaces: Vec::new(),
            socket: dir.join("run/control.sock"),
            config: dir.join("edgegate.toml"),
            bpffs_dir,
            dir,
            daemon: Mutex::new(None),
            servers: Vec::new(),
        };
        for index in 0..clients {
            let index = u8::try_from(index).expect("few clients");
            let client = Netns::new("egc");
            let server_if = unique_name("egs");
            let client_if = unique_name("egc");
            crate::netns::veth_pair(&testbed.server, &server_if, &client, &client_if);
            let server_v4 = Ipv4Addr::new(10, subnet, index, 1);
            let client_v4 = Ipv4Addr::new(10, subnet, index, 2);
            let server_v6 =
                Ipv6Addr::new(0xfd00, u16::from(subnet), u16::from(index), 0, 0, 0, 0, 1);
            let client_v6 =
                Ipv6Addr::new(0xfd00, u16::from(subnet), u16::from(index), 0, 0, 0, 0, 2);
            for (ns, name, v4, v6) in [
                (&testbed.server, &server_if, server_v4, server_v6),
                (&client, &client_if, client_v4, client_v6),
            ] {
                ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", name]);
                ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", name, "nodad"]);
                ns.ip(&["link", "set", name, "up"]);
            }
            testbed.server_ipv4.push(server_v4);
            testbed.server_ipv6.push(server_v6);
            testbed.interfaces.push(server_if);
            testbed.clients.push(Client {
                netns: client,
                interface: client_if,
                ipv4: client_v4,
                ipv6: client_v6,
            });
        }
        testbed.write_config("");
        let servers =
            [PROTECTED_PORT, OPEN_PORT].map(|port| TcpServer::start(&testbed.server, port));
        testbed.servers.extend(servers);
        testbed
    }

    /// Writes the config; `extra_filter` is appended to its `[filter]` table.
    pub fn write_config(&self, extra_filter: &str) {
        self.write_config_with(extra_filter, "");
    }

    /// As [`Self::write_config`], with `tail` after the `[daemon]` table's
    /// keys: more daemon keys, then `[[listener]]` tables.
    pub fn write_config_with(&self, extra_filter: &str, tail: &str) {
        let interfaces: Vec<String> = self.interfaces.iter().map(|i| format!("\"{i}\"")).collect();
        let config = format!(
            "[filter]\ninterfaces = [{}]\nports = [{PROTECTED_PORT}]\n{extra_filter}\n\n\
             [daemon]\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\nbpffs_dir = \"{}\"\n{tail}\n",
            interfaces.join(", "),
            self.socket.display(),
            self.dir.join("state").display(),
            self.bpffs_dir.display(),
        );
        std::fs::write(&self.config, config).expect("write config");
    }

    pub fn allowlist_path(&self) -> PathBuf {
        self.dir.join("state/allowlist")
    }

    /// Starts `edgegate run` in the server namespace and waits until its
    /// control socket answers.
    pub fn start_daemon(&self) {
        self.start_daemon_with(&[]);
    }

    /// As [`Self::start_daemon`], with extra `edgegate run` arguments.
    pub fn start_daemon_with(&self, args: &[&str]) {
        self.start_daemon_with_env(args, &[]);
    }

    /// As [`Self::start_daemon_with`], with extra environment variables.
    pub fn start_daemon_with_env(&self, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) {
        self.start_daemon_prepared(|command| {
            command.args(args).envs(env.iter().copied());
        });
    }

    /// As [`Self::start_daemon`], with the command changed by `prepare`
    /// first (arguments, environment, what runs between fork and exec).
    pub fn start_daemon_prepared(&self, prepare: impl FnOnce(&mut Command)) {
        let mut command =
            self.in_server(&["run", "--config", self.config.to_str().expect("UTF-8 path")]);
        prepare(&mut command);
        self.start_daemon_command(command);
    }

    /// Starts `binary` (another build, or a copy: an upgrade) as systemd
    /// starts the service, with `manager`'s notification socket and store.
    pub fn start_daemon_as_service(
        &self,
        manager: &crate::service::ServiceManager,
        binary: &std::path::Path,
    ) {
        let config = self.config.to_str().expect("UTF-8 path");
        let wrapped = crate::service::ServiceManager::wrap(binary, &["run", "--config", config]);
        let mut command = self.server.command(&wrapped[0]);
        command.args(&wrapped[1..]);
        manager.prepare(&mut command);
        self.start_daemon_command(command);
    }

    /// Starts `command` as the daemon (its output to the log) and waits for
    /// its control socket.
    fn start_daemon_command(&self, mut command: Command) {
        let mut daemon = self.daemon.lock().expect("daemon lock");
        assert!(daemon.is_none(), "the daemon is already running");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("daemon log");
        let child = command
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start edgegate run");
        let child = daemon.insert(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while control::call(&self.socket, &Request::Ping).is_err() {
            if let Some(status) = child.try_wait().expect("wait") {
                panic!("the daemon exited with {status}:\n{}", self.daemon_log());
            }
            assert!(Instant::now() < deadline, "the daemon did not start:\n{}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(daemon);
        // The proxy worker starts after the control socket: wait (bounded)
        // until it serves, or says why it does not.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.status().worker.down.as_deref() == Some("starting") && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `edgegate ARGS` in the server namespace (where its interfaces are).
    fn in_server(&self, args: &[&str]) -> Command {
        let mut command = self.server.command(edgegate_binary().to_str().expect("UTF-8 path"));
        command.args(args);
        command
    }

    /// Runs `edgegate run` (with extra `args`) where the start must be
    /// refused, and returns its output. A daemon that starts instead is
    /// killed after 30 s and the test fails.
    pub fn refused_start(&self, args: &[&str]) -> Output {
        let mut child = self
            .in_server(&["run", "--config", self.config.to_str().expect("UTF-8 path")])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start edgegate run");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let output = child.wait_with_output().expect("output");
                panic!(
                    "the daemon started instead of refusing:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().expect("output");
        assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        output
    }

    /// Kills the daemon with SIGKILL, as a crash would, and reaps it.
    pub fn kill_daemon(&self) {
        let mut child = self.take_daemon();
        child.kill().expect("kill the daemon");
        child.wait().expect("reap the daemon");
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop_daemon(&self) -> std::process::ExitStatus {
        self.signal_daemon(nix::sys::signal::Signal::SIGTERM);
        self.take_daemon().wait().expect("reap the daemon")
    }

    /// Sends `signal` to the running daemon.
    pub fn signal_daemon(&self, signal: nix::sys::signal::Signal) {
        let daemon = self.daemon.lock().expect("daemon lock");
        let pid = daemon.as_ref().expect("the daemon is running").id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
            signal,
        )
        .expect("signal the daemon");
    }

    /// The running daemon's process id.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.lock().expect("daemon lock").as_ref().expect("the daemon is running").id()
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait_for_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut daemon = self.daemon.lock().expect("daemon lock");
            let status = daemon.as_mut().expect("the daemon is running").try_wait().expect("wait");
            if let Some(status) = status {
                *daemon = None;
                return Some(status);
            }
            drop(daemon);
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn take_daemon(&self) -> Child {
        self.daemon.lock().expect("daemon lock").take().expect("the daemon is running")
    }

    /// Waits up to 5 s for the daemon's log to contain `needle` (a line is
    /// written after the connection it describes is closed), and panics with
    /// the log if it never does.
    pub fn await_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.daemon_log().contains(needle) {
            assert!(Instant::now() < deadline, "no `{needle}` in the log:\n{}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs the `edgegate` CLI against this testbed's daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(edgegate_binary())
            .arg("--control-socket")
            .arg(&self.socket)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the edgegate CLI")
    }

    /// As [`Self::cli_ok`], failing (instead of hanging) if the CLI takes
    /// longer than `limit`: it runs under coreutils' `timeout`.
    pub fn cli_within(&self, limit: Duration, args: &[&str]) -> String {
        let started = Instant::now();
        let output = Command::new("timeout")
            .arg("--kill-after=1")
            .arg(format!("{}", limit.as_secs_f64()))
            .arg(edgegate_binary())
            .arg("--control-socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the edgegate CLI under timeout");
        assert!(
            output.status.success(),
            "edgegate {} (after {:?}, limit {limit:?}): {}",
            args.join(" "),
            started.elapsed(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// `edgegate check` of the testbed's config, in the server namespace
    /// (where its interfaces are).
    pub fn check(&self) -> Output {
        self.in_server(&["check", "--config", self.config.to_str().expect("UTF-8 path")])
            .stdin(Stdio::null())
            .output()
            .expect("run edgegate check")
    }

    /// As [`Self::cli`], panicking with the CLI's message unless it succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "edgegate {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    pub fn status(&self) -> Status {
        let request = Request::Status { top_rules: 10, dropped_sources: 50 };
        match control::call(&self.socket, &request).expect("status") {
            Response::Status(status) => *status,
            other => panic!("unexpected answer: {other:?}"),
        }
    }

    /// Packets counted for (family, reason) so far (passed or dropped).
    pub fn counted(&self, family: &str, reason: &str) -> u64 {
        self.counted_as(family, reason, Verdict::Pass)
            + self.counted_as(family, reason, Verdict::Drop)
    }

    /// Packets counted for (family, reason) with `verdict` so far: audit
    /// mode counts what it would drop apart, as `would_drop`.
    pub fn counted_as(&self, family: &str, reason: &str, verdict: Verdict) -> u64 {
        self.status()
            .counters
            .iter()
            .find(|c| {
                c.family.name() == family && c.reason.name() == reason && c.verdict == verdict
            })
            .map_or(0, |c| c.packets)
    }

    /// Whether client `index` completes a TCP connection (and reads the
    /// server's greeting) to `server` within `timeout`.
    pub fn connects(&self, index: usize, server: IpAddr, port: u16, timeout: Duration) -> bool {
        self.clients[index].netns.run(|| {
            let Ok(mut stream) =
                TcpStream::connect_timeout(&SocketAddr::new(server, port), timeout)
            else {
                return false;
            };
            stream.set_read_timeout(Some(timeout)).expect("set timeout");
            let mut greeting = [0u8; 5];
            stream.read_exact(&mut greeting).is_ok() && &greeting == b"hello"
        })
    }

    /// Whether client `index` completes a TCP handshake with `server:port`
    /// within `timeout` (the filter drops a stranger's SYN).
    pub fn tcp_connects(&self, index: usize, server: IpAddr, port: u16, timeout: Duration) -> bool {
        self.clients[index]
            .netns
            .run(|| TcpStream::connect_timeout(&SocketAddr::new(server, port), timeout).is_ok())
    }

    /// Sends a raw Ethernet frame from client `index`'s interface (AF_PACKET),
    /// for what the kernel would not send itself: VLAN tags, broken headers.
    pub fn inject(&self, index: usize, frame: &[u8]) {
        let client = &self.clients[index];
        client.netns.run(|| {
            let name = std::ffi::CString::new(client.interface.as_str()).expect("name");
            // SAFETY: plain syscalls on a socket this closure owns, with
            // pointers to live, correctly sized values.
            unsafe {
                let if_index = libc::if_nametoindex(name.as_ptr());
                assert_ne!(if_index, 0, "interface {}", client.interface);
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
                let mut address: libc::sockaddr_ll = std::mem::zeroed();
                address.sll_family = libc::AF_PACKET as u16;
                address.sll_ifindex = i32::try_from(if_index).expect("index");
                address.sll_halen = 6;
                address.sll_addr[..6].copy_from_slice(&frame[..6]);
                let sent = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const address).cast(),
                    u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("size"),
                );
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                assert_eq!(sent, isize::try_from(frame.len()).expect("len"), "sendto: {error}");
            }
        });
    }

    /// The server's IPv4 address on client `index`'s link.
    pub fn server_v4(&self, index: usize) -> IpAddr {
        IpAddr::V4(self.server_ipv4[index])
    }

    pub fn server_v6(&self, index: usize) -> IpAddr {
        IpAddr::V6(self.server_ipv6[index])
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.daemon_log());
        }
        let daemon = self.daemon.get_mut().map_or(None, Option::take);
        if let Some(mut child) = daemon {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.servers.clear();
        // The daemon is gone, so removing the pins detaches the program.
        if let Err(e) = edgegate::filter::detach_pinned(&self.bpffs_dir, None) {
            eprintln!("cleanup of {}: {e}", self.bpffs_dir.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP server in a namespace that greets every connection with "hello".
pub struct TcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    pub fn start(netns: &Netns, port: u16) -> Self {
        let listener = netns.run(|| {
            // Dual-stack: IPv4 clients arrive as IPv4-mapped addresses.
            TcpListener::bind(("::", port)).expect("bind the test server")
        });
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = std::io::Write::write_all(&mut stream, b"hello");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where testbeds keep their files: `/dev/shm` where it is a tmpfs, so that
/// the gate's fsyncs of the list (a change is on disk before it is
/// acknowledged) cost what they cost in memory, not what a shared VM disk
/// makes them at times (2.4 s for one fsync of /tmp here, failing a
/// test that times `allow add`); else the temporary directory.
fn scratch_root() -> PathBuf {
    use nix::sys::statfs::{TMPFS_MAGIC, statfs};
    let shm = std::path::Path::new("/dev/shm");
    if statfs(shm).is_ok_and(|fs| fs.filesystem_type() == TMPFS_MAGIC) {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// The `edgegate` binary built next to the running executable
/// (`target/<profile>/edgegate`, also from `target/<profile>/deps/`), or `$EDGEGATE_BIN`.
pub fn edgegate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EDGEGATE_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let candidates = exe.ancestors().skip(1).take(2).map(|dir| dir.join("edgegate"));
    candidates
        .into_iter()
        .find(|path: &PathBuf| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no edgegate binary next to {}; build it (`cargo build -p edgegate`) or set EDGEGATE_BIN",
                exe.display()
            )
        })
}

impl Testbed {
    /// `GET path` on the daemon's metrics endpoint (127.0.0.1:9901 in the
    /// server namespace): the status code and the body.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let address = SocketAddr::from(([127, 0, 0, 1], 9901));
        self.server.run(|| http_get(address, path, Duration::from_secs(10))).expect("GET /metrics")
    }

    /// `GET path` from client `index` to `address`: the status code and
    /// body, or the error (a connection the filter drops times out).
    pub fn http_get_from(
        &self,
        index: usize,
        address: SocketAddr,
        path: &str,
    ) -> std::io::Result<(u16, String)> {
        self.clients[index].netns.run(|| http_get(address, path, CONNECT_TIMEOUT))
    }
}

/// A dropped SYN is retried after 1 s; anything slower than this is a drop.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

fn http_get(address: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::Write as _;
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: edgegate\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not HTTP: {response:?}"))
    })?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((code, body))
}
