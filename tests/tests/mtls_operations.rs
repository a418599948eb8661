//! The mTLS proxy in operation: PROXY protocol in and out, backend TLS, bulk
//! relay with half-close, timeouts, connection limits, reload and drain.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use edgegate_tests::{
    Lcg,
    mtls::{BACKEND_NAME, BackendMode, LISTENER_PORT, MtlsBed, connect_tls},
    pki::Leaf,
};
use nix::sys::signal::Signal;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn proxy_v1(client: &str, port: u16) -> Vec<u8> {
    let family = if client.contains(':') { "TCP6" } else { "TCP4" };
    let destination = if client.contains(':') { "2001:db8::1" } else { "192.0.2.1" };
    format!("PROXY {family} {client} {destination} {port} {LISTENER_PORT}\r\n").into_bytes()
}

fn proxy_v2(client: SocketAddr) -> Vec<u8> {
    let destination: SocketAddr = match client {
        SocketAddr::V4(_) => ([192, 0, 2, 1], LISTENER_PORT).into(),
        SocketAddr::V6(_) => ("2001:db8::1".parse::<IpAddr>().expect("ip"), LISTENER_PORT).into(),
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client, destination),
    )
    .build()
    .expect("PROXY v2 header")
}

/// Client 0 plays the load balancer: it is the trusted proxy and speaks for
/// clients it reports in the header.
fn behind_a_load_balancer(mode: &str) -> MtlsBed {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start(&format!(
        "proxy_protocol = \"{mode}\"\ntrusted_proxies = [\"{}/32\"]",
        bed.testbed.clients[0].ipv4
    ));
    bed.testbed.cli_ok(&["allow", "add", "203.0.113.0/24", "2001:db8:77::/48"]);
    bed
}

#[test]
fn proxy_v1_and_v2_from_a_trusted_load_balancer_are_accepted() {
    let bed = behind_a_load_balancer("any");
    let v1 = proxy_v1("203.0.113.10", 40001);
    assert_eq!(bed.exchange_after(0, Some(&bed.client), &v1, b"one").expect("v1"), b"one");
    let v2 = proxy_v2("[2001:db8:77::9]:40002".parse().expect("addr"));
    assert_eq!(bed.exchange_after(0, Some(&bed.client), &v2, b"two").expect("v2"), b"two");
    // The reported client, not the load balancer, is logged.
    bed.testbed.await_log("client=203.0.113.10:40001");
    bed.testbed.await_log("client=[2001:db8:77::9]:40002");
}

#[test]
fn proxy_headers_are_refused_from_untrusted_peers() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("proxy_protocol = \"v2\"\ntrusted_proxies = [\"192.0.2.0/24\"]");
    let v2 = proxy_v2("203.0.113.10:40001".parse().expect("addr"));
    assert!(bed.exchange_after(0, Some(&bed.client), &v2, b"x").is_err());
    bed.await_rejected("untrusted_proxy", 1);
    assert_eq!(bed.backend.accepted(), 0);
}

#[test]
fn a_reported_client_outside_the_allowlist_is_refused() {
    let bed = behind_a_load_balancer("v1");
    let header = proxy_v1("198.51.100.9", 40001);
    assert!(bed.exchange_after(0, Some(&bed.client), &header, b"x").is_err());
    bed.await_rejected("source_not_allowed", 1);
    assert_eq!(bed.backend.accepted(), 0);
}

#[test]
fn a_missing_or_wrong_version_header_is_refused() {
    let bed = behind_a_load_balancer("v2");
    // TLS straight away: the ClientHello is not a PROXY header.
    assert!(bed.exchange(0, Some(&bed.client), b"x").is_err());
    // v1 where v2 is required.
    assert!(bed.exchange_after(0, Some(&bed.client), &proxy_v1("203.0.113.10", 1), b"x").is_err());
    bed.await_rejected("proxy_header_invalid", 2);
}

#[test]
fn the_backend_gets_a_proxy_v2_header_with_tls_details() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("send_proxy_protocol = \"v2\"");
    assert_eq!(bed.exchange(0, Some(&bed.client), b"data").expect("exchange"), b"data");
    let heads = bed.backend.heads.lock().expect("heads").clone();
    let header = ppp::v2::Header::try_from(&heads[0][..]).expect("a PROXY v2 header first");
    let ppp::v2::Addresses::IPv4(addresses) = header.addresses else {
        panic!("IPv4 addresses expected: {:?}", header.addresses);
    };
    assert_eq!(addresses.source_address, bed.testbed.clients[0].ipv4);
    assert_eq!(addresses.destination_port, LISTENER_PORT);
    let tlvs: Vec<_> = header.tlvs().map(|t| t.expect("TLV")).collect();
    let ssl = tlvs.iter().find(|t| t.kind == 0x20).expect("PP2_TYPE_SSL");
    assert_eq!(ssl.value[0] & 0x03, 0x03, "client used TLS and presented a certificate");
    // The sub-TLVs fill PP2_TYPE_SSL's value exactly, as a strict reader wants.
    let mut subs = Vec::new();
    let mut rest = &ssl.value[5..];
    while !rest.is_empty() {
        let end = 3 + usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        assert!(end <= rest.len(), "sub-TLV {:#x} overruns PP2_TYPE_SSL", rest[0]);
        subs.push((rest[0], &rest[3..end]));
        rest = &rest[end..];
    }
    let sub = |kind: u8| subs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
    assert_eq!(sub(0x22), Some(&b"partner"[..]), "PP2_SUBTYPE_SSL_CN");
    assert!(sub(0x21).is_some_and(|v| v.starts_with(b"TLS")), "PP2_SUBTYPE_SSL_VERSION");
    // The certificate the client presented, byte for byte.
    let presented = first_certificate(&bed.client.cert);
    assert_eq!(sub(0x28), Some(&presented[..]), "PP2_SUBTYPE_SSL_CLIENT_CERT");
    let value = |kind: u8| tlvs.iter().find(|t| t.kind == kind).map(|t| t.value.to_vec());
    assert_eq!(value(0xE0).as_deref(), Some(&b"api.partner.example"[..]));
    assert_eq!(value(0xE1).as_deref(), Some(&b"spiffe://partner.example/gateway"[..]));
    // The client's data follows the header unchanged.
    assert!(heads[0].ends_with(b"data"));
}

#[test]
fn backend_tls_is_verified() {
    let bed = MtlsBed::new(BackendMode::TlsEcho);
    let good = format!(
        "[listener.backend_tls]\nca = \"{}\"\nserver_name = \"{BACKEND_NAME}\"",
        bed.server_ca.cert.display()
    );
    bed.start(&good);
    assert_eq!(bed.exchange(0, Some(&bed.client), b"secret").expect("exchange"), b"secret");

    let other_ca = edgegate_tests::pki::Authority::new(&bed.testbed.dir.join("pki"), "other-ca");
    let bad = format!(
        "[listener.backend_tls]\nca = \"{}\"\nserver_name = \"{BACKEND_NAME}\"",
        other_ca.cert.display()
    );
    bed.write(&bad, "");
    bed.testbed.cli_ok(&["reload"]);
    let answer = bed.exchange(0, Some(&bed.client), b"secret");
    assert!(answer.as_deref().is_err_or_empty(), "{answer:?}");
    bed.testbed.await_log("backend_unavailable");
    bed.testbed.await_log("UnknownIssuer");
}

trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl ErrOrEmpty for Result<&[u8], &String> {
    fn is_err_or_empty(&self) -> bool {
        self.is_err() || self.is_ok_and(<[u8]>::is_empty)
    }
}

/// Sends `total` bytes in random-size chunks while reading the echo, closes
/// the sending half, reads to the end; returns (sent hash, received hash, received bytes).
async fn transfer(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    total: usize,
    seed: u64,
) -> (Vec<u8>, Vec<u8>, usize) {
    let (mut reader, mut writer) = tokio::io::split(&mut tls);
    let send = async {
        let mut rng = Lcg::new(seed);
        let mut hash = Sha256::new();
        let mut sent = 0;
        let mut chunk = vec![0u8; 64 << 10];
        while sent < total {
            let size = (1 + rng.next_u64() as usize % chunk.len()).min(total - sent);
            for byte in &mut chunk[..size] {
                *byte = rng.next_u64() as u8;
            }
            writer.write_all(&chunk[..size]).await.expect("send");
            hash.update(&chunk[..size]);
            sent += size;
        }
        writer.shutdown().await.expect("half-close");
        hash.finalize().to_vec()
    };
    let receive = async {
        let mut hash = Sha256::new();
        let mut received = 0;
        let mut buffer = vec![0u8; 128 << 10];
        loop {
            let read = reader.read(&mut buffer).await.expect("receive");
            if read == 0 {
                break;
            }
            hash.update(&buffer[..read]);
            received += read;
        }
        (hash.finalize().to_vec(), received)
    };
    let (sent, (received, count)) = tokio::join!(send, receive);
    (sent, received, count)
}

#[test]
fn a_256_mib_transfer_both_ways_with_half_close_arrives_intact() {
    const TOTAL: usize = 256 << 20;
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    let started = Instant::now();
    let (sent, received, count) = bed.in_client(0, || async move {
        let tls = connect_tls(address, server, config, &[]).await.expect("connect");
        transfer(tls, TOTAL, 7).await
    });
    eprintln!("256 MiB each way in {:?}", started.elapsed());
    assert_eq!(count, TOTAL);
    assert_eq!(sent, received, "the echo is byte for byte what was sent");
    bed.testbed.await_log("connection closed");
    let status = bed.testbed.status();
    assert_eq!(status.listeners[0].bytes_from_clients, TOTAL as u64);
    assert_eq!(status.listeners[0].bytes_to_clients, TOTAL as u64);
}

#[test]
fn a_silent_client_is_closed_at_the_handshake_timeout() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("handshake_timeout = \"1s\"");
    let address = bed.listener_address(0);
    let waited = bed.in_client(0, || async move {
        let mut tcp = tokio::net::TcpStream::connect(address).await.expect("connect");
        let started = Instant::now();
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed, not answered: {read:?}");
        started.elapsed()
    });
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
    bed.await_rejected("timeout", 1);
}

#[test]
fn an_idle_connection_is_closed_at_the_idle_timeout() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("idle_timeout = \"1s\"");
    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    let waited = bed.in_client(0, || async move {
        let mut tls = connect_tls(address, server, config, &[]).await.expect("connect");
        tls.write_all(b"hi").await.expect("write");
        let mut echo = [0u8; 2];
        tls.read_exact(&mut echo).await.expect("echo");
        let started = Instant::now();
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
        started.elapsed()
    });
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
    bed.testbed.await_log("close=idle_timeout");
}

#[test]
fn the_listener_queues_as_many_connections_as_the_host_allows() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    let server = &bed.testbed.server;
    let host_limit = server.run(|| std::fs::read_to_string("/proc/sys/net/core/somaxconn"));
    // `ss` shows a listening socket's queue limit as its Send-Q.
    let listening = server
        .command("ss")
        .args(["-Hltn", &format!("sport = :{LISTENER_PORT}")])
        .output()
        .expect("ss");
    let listening = String::from_utf8_lossy(&listening.stdout);
    let queue_limits: Vec<&str> =
        listening.lines().filter_map(|line| line.split_whitespace().nth(2)).collect();
    assert_eq!(queue_limits, [host_limit.expect("somaxconn").trim()], "{listening}");
}

#[test]
fn connections_over_the_limit_are_refused_at_once() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("max_connections = 2");
    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    bed.in_client(0, || async move {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut tls = connect_tls(address, server, config.clone(), &[]).await.expect("connect");
            tls.write_all(b"x").await.expect("write");
            let mut echo = [0u8; 1];
            tls.read_exact(&mut echo).await.expect("echo");
            held.push(tls);
        }
        let started = Instant::now();
        let third = connect_tls(address, server, config.clone(), &[]).await;
        let refused = match third {
            Err(_) => true,
            Ok(mut tls) => {
                let mut buffer = [0u8; 1];
                matches!(tls.read(&mut buffer).await, Ok(0) | Err(_))
            }
        };
        assert!(refused, "the third connection was served");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused quickly: {:?}",
            started.elapsed()
        );
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut tls = connect_tls(address, server, config, &[]).await.expect("room again");
        tls.write_all(b"y").await.expect("write");
        let mut echo = [0u8; 1];
        tls.read_exact(&mut echo).await.expect("served once a slot is free");
    });
    bed.await_rejected("over_limit", 1);
}

/// The DER of the certificate the server presents to a new connection.
fn presented_certificate(bed: &MtlsBed) -> Vec<u8> {
    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    bed.in_client(0, || async move {
        let tls = connect_tls(address, server, config, &[]).await.expect("connect");
        tls.get_ref().1.peer_certificates().expect("server certificate")[0].to_vec()
    })
}

fn first_certificate(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    CertificateDer::pem_file_iter(path)
        .expect("file")
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

#[test]
fn sighup_rotates_the_certificate_without_disturbing_a_transfer() {
    const TOTAL: usize = 64 << 20;
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    let old = presented_certificate(&bed);
    assert_eq!(old, first_certificate(&bed.server_cert.cert));

    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    std::thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            bed.in_client(0, || async move {
                let tls = connect_tls(address, server, config, &[]).await.expect("connect");
                transfer(tls, TOTAL, 11).await
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        // Rotate: a new certificate and key in the same files, then SIGHUP.
        let names: Vec<String> = bed.testbed.server_ipv4.iter().map(ToString::to_string).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let rotated = bed.server_ca.issue("server", &Leaf::server(&names));
        assert_eq!(rotated.cert, bed.server_cert.cert);
        bed.testbed.signal_daemon(Signal::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while presented_certificate(&bed) == old {
            assert!(Instant::now() < deadline, "the new certificate is never presented");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!transfer.is_finished(), "the transfer should still be running (make it longer)");
        let (sent, received, count) = transfer.join().expect("transfer");
        assert_eq!((count, sent), (TOTAL, received), "the transfer completed intact");
    });
    assert_eq!(presented_certificate(&bed), first_certificate(&bed.server_cert.cert));
}

#[test]
fn a_corrupt_certificate_on_reload_keeps_the_old_one_serving() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    let old = presented_certificate(&bed);
    std::fs::write(&bed.server_cert.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n")
        .expect("corrupt");
    let output = bed.testbed.cli(&["reload"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(stdout.contains("listener `edge`: kept previous: `cert`"), "{stdout}");
    assert_eq!(presented_certificate(&bed), old);
    assert_eq!(bed.exchange(0, Some(&bed.client), b"still").expect("exchange"), b"still");
    // SIGHUP behaves the same, and says so in the log.
    bed.testbed.signal_daemon(Signal::SIGHUP);
    bed.testbed.await_log("SIGHUP: reloading");
    bed.testbed.await_log("reload: kept previous");
    assert_eq!(presented_certificate(&bed), old);
}

#[test]
fn sigterm_drains_open_connections_then_exits() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "drain_timeout = \"5s\"");
    bed.testbed.start_daemon();
    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    std::thread::scope(|scope| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let slow = scope.spawn(|| {
            bed.in_client(0, || async move {
                let mut tls = connect_tls(address, server, config, &[]).await.expect("connect");
                tls.write_all(b"first").await.expect("write");
                let mut echo = [0u8; 5];
                tls.read_exact(&mut echo).await.expect("echo");
                ready_tx.send(()).expect("ready");
                // Keep talking after SIGTERM: the connection must be served.
                go_rx.recv().expect("go");
                tls.write_all(b"after").await.expect("write after SIGTERM");
                tls.shutdown().await.expect("close");
                let mut rest = Vec::new();
                tls.read_to_end(&mut rest).await.expect("read after SIGTERM");
                rest
            })
        });
        ready_rx.recv().expect("connection up");
        bed.testbed.signal_daemon(Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        // No new connections once draining.
        assert!(
            bed.exchange(0, Some(&bed.client), b"new").is_err(),
            "a new connection was accepted"
        );
        assert!(
            bed.testbed.wait_for_exit(Duration::from_millis(100)).is_none(),
            "exited before the drain"
        );
        go_tx.send(()).expect("go");
        assert_eq!(slow.join().expect("slow client"), b"after");
    });
    let status = bed.testbed.wait_for_exit(Duration::from_secs(5)).expect("exits after the drain");
    assert!(status.success(), "{status}");
}

#[test]
fn the_drain_timeout_closes_what_is_left() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "drain_timeout = \"1s\"");
    bed.testbed.start_daemon();
    let config = bed.client_config(Some(&bed.client));
    let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
    let testbed = &bed.testbed;
    let closed_after = bed.in_client(0, || async move {
        let mut tls = connect_tls(address, server, config, &[]).await.expect("connect");
        tls.write_all(b"x").await.expect("write");
        let mut echo = [0u8; 1];
        tls.read_exact(&mut echo).await.expect("echo");
        testbed.signal_daemon(Signal::SIGTERM);
        let started = Instant::now();
        let mut buffer = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        started.elapsed()
    });
    assert!(
        closed_after >= Duration::from_millis(800) && closed_after < Duration::from_secs(4),
        "{closed_after:?}"
    );
    assert!(bed.testbed.wait_for_exit(Duration::from_secs(5)).expect("exit").success());
}

#[test]
fn check_reports_every_broken_file_with_its_key() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let other = bed.server_ca.issue("other", &Leaf::server(&["other"]));
    // A key that belongs to another certificate, and an empty CA bundle.
    let empty_ca = bed.testbed.dir.join("empty-ca.pem");
    std::fs::write(&empty_ca, "").expect("empty CA");
    let second = format!(
        "[[listener]]\nname = \"second\"\nbind = \"0.0.0.0:8444\"\nbackend = \"127.0.0.1:1\"\n\
         cert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        bed.server_cert.cert.display(),
        other.key.display(),
        bed.client_ca.cert.display()
    );
    let third = format!(
        "[[listener]]\nname = \"third\"\nbind = \"0.0.0.0:8445\"\nbackend = \"127.0.0.1:1\"\n\
         cert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        bed.server_cert.cert.display(),
        bed.server_cert.key.display(),
        empty_ca.display()
    );
    bed.testbed.write_config_with("", &format!("{}{second}{third}", bed.listener_toml("")));
    let output = bed.testbed.check();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("listener `second`: `key`"), "{stderr}");
    assert!(stderr.contains("this private key does not belong to the certificate"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "listener `third`: `client_ca` {}: holds no certificate",
            empty_ca.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s) found"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains("listener `edge`: certificates, key, CAs and CRLs OK")
    );
}

#[test]
fn an_unreachable_backend_is_given_up_at_the_connect_timeout() {
    let bed = MtlsBed::new(BackendMode::Echo);
    // An address on client 1's link where nobody answers ARP: connect hangs.
    let silent = std::net::Ipv4Addr::from(u32::from(bed.testbed.server_ipv4[1]) + 98);
    let tail = bed.listener_toml("connect_timeout = \"500ms\"").replace(
        &format!("127.0.0.1:{}", edgegate_tests::mtls::BACKEND_PORT),
        &format!("{silent}:80"),
    );
    bed.testbed.write_config_with("", &tail);
    bed.testbed.start_daemon();
    let started = Instant::now();
    let answer = bed.exchange(0, Some(&bed.client), b"anyone?");
    let waited = started.elapsed();
    assert!(answer.as_deref().is_err_or_empty(), "{answer:?}");
    assert!(waited >= Duration::from_millis(450) && waited < Duration::from_secs(3), "{waited:?}");
    bed.testbed.await_log("no connection within 500ms");
}
