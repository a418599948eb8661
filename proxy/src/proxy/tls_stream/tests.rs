//! The stream against rustls's own buffered client (tokio-rustls), over an
//! in-memory pipe: both versions, large transfers both ways at once, when
//! the tickets leave, the size of a write, the ways a connection ends, key
//! updates, the buffers of a waiting connection, and what a refused or
//! hostile client gets.

use std::{sync::Arc, time::Duration};

use rustls::{
    ClientConfig, ServerConfig, SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream, duplex};
use tokio_rustls::{TlsConnector, client::TlsStream as ClientStream};

use super::{TlsStream, accept};
use crate::demo::pki::{self, Authority, Leaf};

/// A server config asking for client certificates from a test CA, and
/// client configs with and without one.
struct Peers {
    _dir: tempfile::TempDir,
    server: Arc<ServerConfig>,
    ca: std::path::PathBuf,
    client_cert: pki::Issued,
}

impl Peers {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Authority::new(dir.path(), "ca");
        let server = ca.issue("server", &Leaf::server(&["gate.example"]));
        let client_cert = ca.issue("client", &Leaf::client("partner"));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca.cert).expect("CA") {
            roots.add(cert.expect("CA cert")).expect("root");
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .expect("verifier");
        let chain = CertificateDer::pem_file_iter(&server.cert)
            .expect("chain")
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_file(&server.key).expect("key");
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13, &TLS12])
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        Self { _dir: dir, server: Arc::new(config), ca: ca.cert.clone(), client_cert }
    }

    /// A client config for `version`, presenting the client certificate or none.
    fn client(
        &self,
        version: &'static SupportedProtocolVersion,
        with_cert: bool,
    ) -> Arc<ClientConfig> {
        let cert = with_cert.then_some(&self.client_cert);
        Arc::new(pki::client_config(&self.ca, cert, &[version]).expect("client config"))
    }

    /// A handshake over a pipe of `pipe` bytes: both ends.
    async fn connect(
        &self,
        version: &'static SupportedProtocolVersion,
        pipe: usize,
    ) -> (ClientStream<DuplexStream>, TlsStream<DuplexStream>) {
        let (client_end, server_end) = duplex(pipe);
        let connector = TlsConnector::from(self.client(version, true));
        let name = ServerName::try_from("gate.example").expect("name");
        let (client, server) = tokio::join!(
            connector.connect(name, client_end),
            accept(self.server.clone(), server_end)
        );
        (client.expect("client handshake"), server.expect("server handshake"))
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test]
async fn both_versions_carry_large_transfers_both_ways_at_once() {
    let peers = Peers::new();
    for version in [&TLS13, &TLS12] {
        // A pipe smaller than a record: every write and read comes in pieces.
        let (client, server) = peers.connect(version, 5000).await;
        assert_eq!(server.session().protocol_version(), Some(version.version));
        assert!(server.session().peer_certificates().is_some_and(|chain| !chain.is_empty()));
        let up = pattern(1 << 20, 1);
        let down = pattern(3 << 19, 2);
        let (mut client_reads, mut client_writes) = tokio::io::split(client);
        let (mut server_reads, mut server_writes) = tokio::io::split(server);
        let (sent_up, sent_down) = (up.clone(), down.clone());
        let (received_up, received_down, (), ()) = tokio::join!(
            async {
                let mut all = Vec::new();
                server_reads.read_to_end(&mut all).await.expect("server reads");
                all
            },
            async {
                let mut all = Vec::new();
                client_reads.read_to_end(&mut all).await.expect("client reads");
                all
            },
            async {
                client_writes.write_all(&sent_up).await.expect("client writes");
                client_writes.shutdown().await.expect("client closes");
            },
            async {
                server_writes.write_all(&sent_down).await.expect("server writes");
                server_writes.shutdown().await.expect("server closes");
            },
        );
        assert!(received_up == up, "{version:?}: the client's bytes arrive whole and in order");
        assert!(received_down == down, "{version:?}: the server's bytes arrive whole and in order");
    }
}

#[tokio::test]
async fn a_request_sent_with_the_clients_finished_is_read() {
    let peers = Peers::new();
    let (client_end, server_end) = duplex(64 << 10);
    let connector = TlsConnector::from(peers.client(&TLS13, true));
    let name = ServerName::try_from("gate.example").expect("name");
    let client = async {
        let mut tls = connector.connect(name, client_end).await.expect("client handshake");
        tls.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("request");
        tls
    };
    let (_client, server) = tokio::join!(client, accept(peers.server.clone(), server_end));
    let mut server = server.expect("server handshake");
    let mut request = [0u8; 18];
    server.read_exact(&mut request).await.expect("request");
    assert_eq!(&request, b"GET / HTTP/1.0\r\n\r\n");
}

/// A transport that records the length of every write the server makes.
struct Recorded {
    inner: DuplexStream,
    writes: Vec<usize>,
}

impl tokio::io::AsyncRead for Recorded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Recorded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, data))?;
        self.writes.push(written);
        std::task::Poll::Ready(Ok(written))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// TLS 1.3 tickets wait for the answer when a request came with the client's
/// Finished, and leave in the same write; otherwise (no request yet, or TLS
/// 1.2, whose last flight the client waits for) nothing waits. Either way the
/// client gets its tickets: its next connection resumes.
#[tokio::test]
async fn tickets_leave_with_the_answer_to_a_request_sent_with_the_finished() {
    const ANSWER: &[u8] = b"HTTP/1.0 200 OK\r\n\r\n";
    // TLS 1.3's record overhead: header, content type, tag.
    const SEALED_ANSWER: usize = ANSWER.len() + 5 + 1 + 16;
    let peers = Peers::new();
    for (version, request_with_finished, tickets_wait) in
        [(&TLS13, true, true), (&TLS13, false, false), (&TLS12, true, false)]
    {
        let config = peers.client(version, true);
        let case = format!("{version:?}, request with the Finished: {request_with_finished}");
        let (client_end, server_end) = duplex(64 << 10);
        let client = async {
            let name = ServerName::try_from("gate.example").expect("name");
            let connector = TlsConnector::from(Arc::clone(&config));
            let mut tls = connector.connect(name, client_end).await.expect("client handshake");
            if request_with_finished {
                tls.write_all(b"GET /").await.expect("request");
            }
            tls
        };
        let transport = Recorded { inner: server_end, writes: Vec::new() };
        let (mut client, server) = tokio::join!(client, accept(peers.server.clone(), transport));
        let mut server = server.expect("server handshake");
        assert_eq!(server.tickets_wait, tickets_wait, "{case}");
        let written = server.io.writes.len();
        server.write_all(ANSWER).await.expect("answer");
        assert_eq!(server.io.writes.len(), written + 1, "{case}: one write");
        let last = server.io.writes[written];
        if tickets_wait {
            assert!(last > SEALED_ANSWER + 100, "{case}: the tickets leave with the answer");
        } else if version == &TLS13 {
            assert_eq!(last, SEALED_ANSWER, "{case}: the tickets left before");
        }
        let mut answer = [0u8; ANSWER.len()];
        client.read_exact(&mut answer).await.expect("the answer");
        assert_eq!(answer, ANSWER);
        drop((client, server));

        let (client_end, server_end) = duplex(64 << 10);
        let name = ServerName::try_from("gate.example").expect("name");
        let (_client, server) = tokio::join!(
            TlsConnector::from(config).connect(name, client_end),
            accept(peers.server.clone(), server_end)
        );
        let kind = server.expect("server handshake").session().handshake_kind();
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "{case}: the ticket serves");
    }
}

#[tokio::test]
async fn close_notify_ends_the_stream_and_a_bare_tcp_close_is_an_error() {
    let peers = Peers::new();
    let (mut client, mut server) = peers.connect(&TLS13, 64 << 10).await;
    client.write_all(b"last").await.expect("write");
    client.shutdown().await.expect("close_notify");
    let mut all = Vec::new();
    server.read_to_end(&mut all).await.expect("a clean end");
    assert_eq!(all, b"last");
    // The server's own close reaches the client as a clean end too.
    server.shutdown().await.expect("server close_notify");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.expect("client sees a clean end");
    assert!(rest.is_empty());

    // The TCP stream ends without close_notify: a truncation, not an end.
    let (client, mut server) = peers.connect(&TLS13, 64 << 10).await;
    let (tcp, _) = client.into_inner();
    drop(tcp);
    let error = server.read_to_end(&mut Vec::new()).await.expect_err("truncation");
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn a_write_takes_four_records_at_most_and_none_after_close_notify() {
    let peers = Peers::new();
    let (mut client, mut server) = peers.connect(&TLS13, 1 << 20).await;
    let data = pattern(200_000, 5);
    let taken = server.write(&data).await.expect("write");
    assert_eq!(taken, super::MAX_WRITE, "a short write, not 200 KB encrypted at once");
    assert!(server.outgoing.len() <= super::MAX_WRITE + 4 * super::MAX_RECORD);
    server.write_all(&data[taken..]).await.expect("the rest");
    server.flush().await.expect("flush");
    let mut got = vec![0u8; data.len()];
    client.read_exact(&mut got).await.expect("read");
    assert!(got == data, "the bytes arrive in order");

    server.shutdown().await.expect("close_notify");
    let error = server.write(b"after").await.expect_err("nothing after close_notify");
    assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.expect("a clean end");
    assert!(rest.is_empty(), "no data after close_notify");
}

#[tokio::test]
async fn the_client_may_update_its_keys() {
    let peers = Peers::new();
    let (mut client, mut server) = peers.connect(&TLS13, 64 << 10).await;
    for round in 0..3u8 {
        client.get_mut().1.refresh_traffic_keys().expect("key update");
        client.write_all(&[round; 100]).await.expect("write");
        let mut got = [0u8; 100];
        server.read_exact(&mut got).await.expect("read after the update");
        assert_eq!(got, [round; 100]);
        server.write_all(&[round; 7]).await.expect("answer");
        server.flush().await.expect("flush");
        let mut answer = [0u8; 7];
        client.read_exact(&mut answer).await.expect("answer after the update");
    }
}

#[tokio::test]
async fn a_waiting_connection_holds_no_buffer() {
    let peers = Peers::new();
    let (mut client, mut server) = peers.connect(&TLS13, 64 << 10).await;
    client.write_all(&pattern(40_000, 3)).await.expect("write");
    let mut got = vec![0u8; 40_000];
    server.read_exact(&mut got).await.expect("read");
    server.write_all(&pattern(30_000, 4)).await.expect("answer");
    server.flush().await.expect("flush");
    // Nothing more comes: the read waits, and the buffers are gone.
    let mut byte = [0u8; 1];
    let waiting = tokio::time::timeout(Duration::from_millis(50), server.read(&mut byte)).await;
    assert!(waiting.is_err(), "nothing to read");
    assert_eq!(
        (
            server.incoming.room.capacity(),
            server.outgoing.room.capacity(),
            server.plaintext.room.capacity()
        ),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn a_refused_client_hears_why_and_the_error_says_it() {
    let peers = Peers::new();
    let (client_end, server_end) = duplex(64 << 10);
    let connector = TlsConnector::from(peers.client(&TLS13, false));
    let name = ServerName::try_from("gate.example").expect("name");
    let client = async {
        let mut tls = connector.connect(name, client_end).await?;
        // TLS 1.3: the client learns of the refusal on its first read.
        tls.read(&mut [0u8; 1]).await
    };
    let (client, server) = tokio::join!(client, accept(peers.server.clone(), server_end));
    let refused = server.err().expect("refused");
    let cause = refused.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(cause, Some(&rustls::Error::NoCertificatesPresented));
    let heard = client.expect_err("the client is told").to_string();
    assert!(heard.contains("CertificateRequired"), "the client heard: {heard}");
}

#[tokio::test]
async fn hostile_bytes_end_the_handshake_within_bounds() {
    let peers = Peers::new();
    let record = |content: u8, body: &[u8]| {
        let mut record = vec![content, 3, 3];
        record.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        record.extend_from_slice(body);
        record
    };
    // A ClientHello claiming 16 MiB, sent in full records.
    let mut huge = vec![1, 0xff, 0xff, 0xff];
    huge.resize(16 * 1024, 0);
    let endless: Vec<u8> = (0..8).flat_map(|_| record(22, &huge)).collect();
    let cases: [(&str, Vec<u8>); 4] = [
        ("not TLS at all", b"GET / HTTP/1.1\r\nHost: gate\r\n\r\n".to_vec()),
        ("a record longer than TLS allows", record(22, &vec![0; 18 * 1024 + 1])),
        ("an application record before any handshake", record(23, &[0; 64])),
        ("a handshake message larger than 64 KiB", endless),
    ];
    for (name, bytes) in cases {
        let (mut client_end, server_end) = duplex(256 << 10);
        client_end.write_all(&bytes).await.expect("write");
        let handshake = accept(peers.server.clone(), server_end);
        let result = tokio::time::timeout(Duration::from_secs(5), handshake).await;
        let error = result.unwrap_or_else(|_| panic!("{name}: no answer")).err();
        let error = error.unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{name}: {error}");
    }
}

#[tokio::test]
async fn a_forged_record_breaks_the_connection_for_good() {
    let peers = Peers::new();
    let (mut client, mut server) = peers.connect(&TLS13, 64 << 10).await;
    // An application record nobody encrypted: its tag cannot check out.
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend_from_slice(&[0x5a; 40]);
    client.get_mut().0.write_all(&forged).await.expect("write");
    let error = tokio::time::timeout(Duration::from_secs(5), server.read(&mut [0u8; 16]))
        .await
        .expect("the server reads at once")
        .expect_err("refused");
    let cause = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(cause, Some(&rustls::Error::DecryptError), "{error}");
    // Later calls fail too, without rustls reading the same bytes again.
    assert!(server.read(&mut [0u8; 16]).await.is_err());
    assert!(server.write_all(b"more").await.is_err());
    // The client heard the alert.
    let heard = tokio::time::timeout(Duration::from_secs(5), client.read(&mut [0u8; 1]))
        .await
        .expect("the client hears at once")
        .expect_err("alert")
        .to_string();
    assert!(heard.contains("BadRecordMac"), "the client heard: {heard}");
}
