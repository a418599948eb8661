//! A testbed for the mTLS proxy: the namespace testbed with a PKI, a
//! listener on the server and a backend behind it, and TLS clients that run
//! inside the client namespaces.

use std::{
    future::Future,
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use rustls::{
    ClientConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    pki::{Authority, Issued, Leaf},
    testbed::{CONNECT_TIMEOUT, Testbed},
};

/// The listener's port on the server.
pub const LISTENER_PORT: u16 = 8443;
/// The backend's port, on the server's loopback.
pub const BACKEND_PORT: u16 = 18080;

/// How the test backend answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BackendMode {
    /// Sends back everything it reads; closes its side after the client's.
    Echo,
    /// Answers any request with `HTTP/1.1 200` and `ok`.
    Http,
    /// Echo over TLS, with a certificate for `backend.internal` from the server CA.
    TlsEcho,
}

/// The name in the TLS backend's certificate.
pub const BACKEND_NAME: &str = "backend.internal";

pub struct MtlsBed {
    pub testbed: Testbed,
    /// Issues client certificates; the listener's `client_ca`.
    pub client_ca: Authority,
    /// Issues the listener's certificate; what clients trust.
    pub server_ca: Authority,
    pub server_cert: Issued,
    /// A good client certificate (CN `partner`, DNS `api.partner.example`,
    /// URI `spiffe://partner.example/gateway`).
    pub client: Issued,
    pub backend: Backend,
}

impl MtlsBed {
    /// Two clients (client 0 on the allowlist, client 1 not), a PKI, an echo
    /// or HTTP backend. The daemon is not started: see [`Self::start`].
    pub fn new(mode: BackendMode) -> Self {
        let testbed = Testbed::new(2);
        let pki_dir = testbed.dir.join("pki");
        std::fs::create_dir_all(&pki_dir).expect("pki dir");
        let client_ca = Authority::new(&pki_dir, "client-ca");
        let server_ca = Authority::new(&pki_dir, "server-ca");
        let names: Vec<String> = testbed.server_ipv4.iter().map(ToString::to_string).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let server_cert = server_ca.issue("server", &Leaf::server(&names));
        let mut partner = Leaf::client("partner");
        partner.dns = vec!["api.partner.example".into()];
        partner.uris = vec!["spiffe://partner.example/gateway".into()];
        let client = client_ca.issue("partner", &partner);
        let tls = (mode == BackendMode::TlsEcho).then(|| {
            let issued = server_ca.issue("backend", &Leaf::server(&[BACKEND_NAME]));
            let chain = CertificateDer::pem_file_iter(&issued.cert)
                .expect("cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("chain");
            let key = PrivateKeyDer::from_pem_file(&issued.key).expect("key");
            let config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("backend TLS config");
            Arc::new(config)
        });
        let backend = Backend::start(&testbed, mode, tls);
        std::fs::create_dir_all(testbed.allowlist_path().parent().expect("dir")).expect("state");
        std::fs::write(
            testbed.allowlist_path(),
            format!("{}\n{}\n", testbed.clients[0].ipv4, testbed.clients[0].ipv6),
        )
        .expect("allowlist");
        Self { testbed, client_ca, server_ca, server_cert, client, backend }
    }

    /// The `[[listener]]` table for this bed, plus `extra` keys.
    pub fn listener_toml(&self, extra: &str) -> String {
        format!(
            "[[listener]]\nname = \"edge\"\nbind = \"0.0.0.0:{LISTENER_PORT}\"\n\
             backend = \"127.0.0.1:{BACKEND_PORT}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n{extra}\n",
            self.server_cert.cert.display(),
            self.server_cert.key.display(),
            self.client_ca.cert.display(),
        )
    }

    /// Writes the config with one listener (`extra` keys added to it) and
    /// starts the daemon.
    pub fn start(&self, extra: &str) {
        self.write(extra, "");
        self.testbed.start_daemon();
    }

    /// Writes the config: `daemon_extra` keys in `[daemon]`, `extra` in the listener.
    pub fn write(&self, extra: &str, daemon_extra: &str) {
        let tail = format!("{daemon_extra}\n{}", self.listener_toml(extra));
        self.testbed.write_config_with("", &tail);
    }

    pub fn listener_address(&self, client: usize) -> SocketAddr {
        SocketAddr::new(self.testbed.server_v4(client), LISTENER_PORT)
    }

    /// A client config trusting the server CA, presenting `cert` if given.
    pub fn client_config(&self, cert: Option<&Issued>) -> Arc<ClientConfig> {
        client_config(&self.server_ca.cert, cert)
    }

    /// From client `index`: connect, handshake, send `payload`, close the
    /// sending half, and read everything until the proxy closes.
    pub fn exchange(
        &self,
        index: usize,
        cert: Option<&Issued>,
        payload: &[u8],
    ) -> Result<Vec<u8>, String> {
        self.exchange_after(index, cert, &[], payload)
    }

    /// As [`Self::exchange`], sending `preamble` (a PROXY header) before TLS.
    pub fn exchange_after(
        &self,
        index: usize,
        cert: Option<&Issued>,
        preamble: &[u8],
        payload: &[u8],
    ) -> Result<Vec<u8>, String> {
        let config = self.client_config(cert);
        let (address, server) = (self.listener_address(index), self.testbed.server_v4(index));
        self.in_client(index, || async move {
            let mut tls = connect_tls(address, server, config, preamble).await?;
            tls.write_all(payload).await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            tls.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
            Ok(answer)
        })
    }

    /// `openssl s_client ARGS` from client 0 to the listener, trusting the
    /// server CA: sends one HTTP request and waits for the server to close.
    pub fn s_client_get<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: impl IntoIterator<Item = S>,
    ) -> std::process::Output {
        use std::process::Stdio;
        let mut child = self.testbed.clients[0]
            .netns
            .command("openssl")
            .arg("s_client")
            .args(args)
            .arg("-connect")
            .arg(format!("{}:{LISTENER_PORT}", self.testbed.server_ipv4[0]))
            .arg("-CAfile")
            .arg(&self.server_ca.cert)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n").expect("request");
        // openssl exits when the server closes; stdin stays open until then.
        let output = child.wait_with_output().expect("openssl output");
        drop(stdin);
        output
    }

    /// Runs async client code on a thread inside client `index`'s namespace.
    pub fn in_client<T: Send, F: Future<Output = T>>(
        &self,
        index: usize,
        f: impl FnOnce() -> F + Send,
    ) -> T {
        self.testbed.clients[index].netns.run(|| runtime().block_on(f()))
    }

    /// Waits up to 5 s for the listener to have counted `count` rejections
    /// for `reason` (a client may see the close before the count is made).
    pub fn await_rejected(&self, reason: &str, count: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let status = self.testbed.status();
            let counted = status.listeners.first().and_then(|l| l.rejected.get(reason).copied());
            if counted.unwrap_or(0) == count {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "expected {count} `{reason}` rejections: {:?}",
                status.listeners
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Connects to `address`, sends `preamble`, and completes a TLS handshake
/// with a server whose certificate names `server`.
pub async fn connect_tls(
    address: SocketAddr,
    server: std::net::IpAddr,
    config: Arc<ClientConfig>,
    preamble: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let connect = tokio::net::TcpStream::connect(address);
    let mut tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    tcp.write_all(preamble).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    connector.connect(ServerName::IpAddress(server.into()), tcp).await.map_err(|e| e.to_string())
}

/// A rustls client config trusting `ca`.
pub fn client_config(ca: &std::path::Path, cert: Option<&Issued>) -> Arc<ClientConfig> {
    client_config_for(ca, cert, rustls::DEFAULT_VERSIONS)
}

/// As [`client_config`], limited to the TLS `versions`.
pub fn client_config_for(
    ca: &std::path::Path,
    cert: Option<&Issued>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    Arc::new(crate::pki::client_config(ca, cert, versions).expect("client config"))
}

/// A single-threaded runtime for client code in a namespace thread.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// The backend behind the listener, on the server's loopback. It records how
/// many connections it accepted and the first bytes of each.
pub struct Backend {
    pub accepted: Arc<AtomicUsize>,
    pub heads: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(testbed: &Testbed, mode: BackendMode, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = testbed
            .server
            .run(|| TcpListener::bind(("127.0.0.1", BACKEND_PORT)).expect("bind backend"));
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, heads, stop) =
                (Arc::clone(&accepted), Arc::clone(&heads), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let heads = Arc::clone(&heads);
                    let tls = tls.clone();
                    std::thread::spawn(move || {
                        stream.set_nonblocking(false).expect("blocking");
                        match tls {
                            Some(config) => {
                                let connection =
                                    rustls::ServerConnection::new(config).expect("TLS");
                                serve(rustls::StreamOwned::new(connection, stream), mode, &heads);
                            }
                            None => serve(stream, mode, &heads),
                        }
                    });
                }
            })
        };
        Self { accepted, heads, stop, thread: Some(thread) }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// A stream whose sending half the backend can close.
trait Closable: std::io::Read + std::io::Write {
    fn close_sending(&mut self);
}

impl Closable for TcpStream {
    fn close_sending(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Closable for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn close_sending(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }
}

/// The fixed start of a PROXY protocol v2 header.
const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn serve(mut stream: impl Closable, mode: BackendMode, heads: &Mutex<Vec<Vec<u8>>>) {
    let mut head = Vec::new();
    let mut buffer = vec![0u8; 64 << 10];
    let mut index = None;
    // Like a real PROXY-aware backend, the echo does not send the header back.
    let mut skip = None;
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let remaining = skip.get_or_insert_with(|| {
            if buffer[..read].starts_with(PROXY_V2_SIGNATURE) && read >= 16 {
                16 + usize::from(u16::from_be_bytes([buffer[14], buffer[15]]))
            } else {
                0
            }
        });
        let start = (*remaining).min(read);
        *remaining -= start;
        if head.len() < 1024 {
            head.extend_from_slice(&buffer[..read.min(1024 - head.len())]);
            let mut heads = heads.lock().expect("heads");
            match index {
                Some(i) => heads[i] = head.clone(),
                None => {
                    heads.push(head.clone());
                    index = Some(heads.len() - 1);
                }
            }
        }
        match mode {
            BackendMode::Echo | BackendMode::TlsEcho => {
                if stream.write_all(&buffer[start..read]).is_err() {
                    return;
                }
            }
            BackendMode::Http => {
                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                    );
                    return;
                }
            }
        }
    }
    stream.close_sending();
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
