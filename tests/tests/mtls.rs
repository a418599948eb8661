//! The mutual-TLS proxy of the real daemon, in network namespaces: good and
//! bad clients (rustls, curl, openssl), identity rules, revocation.

use std::ffi::OsStr;

use edgegate_tests::{
    mtls::{BackendMode, MtlsBed},
    pki::Leaf,
};
use time::{Duration, OffsetDateTime};

#[test]
fn a_good_client_reaches_the_backend() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    let answer = bed.exchange(0, Some(&bed.client), b"ping").expect("exchange");
    assert_eq!(answer, b"ping");
    assert_eq!(bed.backend.accepted(), 1);
    // The access line is written once the connection's counters are final.
    bed.testbed.await_log("subject=CN=partner");
    let status = bed.testbed.status();
    assert_eq!(status.listeners[0].handshakes_ok, 1);
    assert_eq!(status.listeners[0].bytes_from_clients, 4);
    // The listener's port is protected by XDP without being listed in `ports`.
    assert!(bed.exchange(1, Some(&bed.client), b"ping").is_err());
    assert!(bed.testbed.counted("ipv4", "unlisted") > 0);
}

/// Runs one bad client: it must fail, never reach the backend, and be
/// counted (and logged) with `reason`.
#[track_caller]
fn assert_rejected(bed: &MtlsBed, cert: Option<&edgegate_tests::pki::Issued>, reason: &str) {
    let result = bed.exchange(0, cert, b"ping");
    assert!(result.is_err(), "{reason}: the client got {result:?}");
    assert_eq!(bed.backend.accepted(), 0, "{reason}: the backend was reached");
    bed.await_rejected(reason, 1);
    bed.testbed.await_log(&format!("reason={reason}"));
}

#[test]
fn no_client_certificate_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    assert_rejected(&bed, None, "no_certificate");
}

#[test]
fn a_certificate_from_another_ca_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let stranger_ca =
        edgegate_tests::pki::Authority::new(&bed.testbed.dir.join("pki"), "stranger-ca");
    let cert = stranger_ca.issue("stranger", &Leaf::client("partner"));
    bed.start("");
    assert_rejected(&bed, Some(&cert), "unknown_ca");
}

#[test]
fn an_expired_certificate_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let now = OffsetDateTime::now_utc();
    let leaf = Leaf {
        not_before: now - Duration::days(30),
        not_after: now - Duration::days(1),
        ..Leaf::client("partner")
    };
    let cert = bed.client_ca.issue("expired", &leaf);
    bed.start("");
    assert_rejected(&bed, Some(&cert), "expired");
}

#[test]
fn a_not_yet_valid_certificate_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let now = OffsetDateTime::now_utc();
    let leaf = Leaf {
        not_before: now + Duration::days(1),
        not_after: now + Duration::days(30),
        ..Leaf::client("partner")
    };
    let cert = bed.client_ca.issue("future", &leaf);
    bed.start("");
    assert_rejected(&bed, Some(&cert), "not_yet_valid");
}

#[test]
fn a_revoked_certificate_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let revoked = bed.client_ca.issue("revoked", &Leaf::client("partner"));
    let crl = bed.client_ca.crl("client-ca", &[revoked.serial]);
    bed.start(&format!("crl = [\"{}\"]", crl.display()));
    // The CRL does not list the good client.
    assert_eq!(bed.exchange(0, Some(&bed.client), b"ok").expect("good client"), b"ok");
    let accepted = bed.backend.accepted();
    let result = bed.exchange(0, Some(&revoked), b"ping");
    assert!(result.is_err(), "{result:?}");
    assert_eq!(bed.backend.accepted(), accepted);
    bed.await_rejected("revoked", 1);
}

#[test]
fn a_server_auth_only_certificate_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let leaf = Leaf {
        usages: vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
        ..Leaf::client("partner")
    };
    let cert = bed.client_ca.issue("server-only", &leaf);
    bed.start("");
    assert_rejected(&bed, Some(&cert), "wrong_key_usage");
}

#[test]
fn a_wrong_common_name_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let cert = bed.client_ca.issue("intruder", &Leaf::client("intruder"));
    bed.start("allow_cn = [\"partner\", \"partner-*\"]");
    assert_rejected(&bed, Some(&cert), "identity_not_allowed");
}

#[test]
fn a_wrong_dns_name_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let leaf = Leaf { dns: vec!["api.other.example".into()], ..Leaf::client("partner") };
    let cert = bed.client_ca.issue("other-dns", &leaf);
    bed.start("allow_dns = [\"*.partner.example\"]");
    assert_rejected(&bed, Some(&cert), "identity_not_allowed");
}

#[test]
fn a_wrong_spiffe_id_is_rejected() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let leaf =
        Leaf { uris: vec!["spiffe://other.example/gateway".into()], ..Leaf::client("partner") };
    let cert = bed.client_ca.issue("other-uri", &leaf);
    bed.start("allow_uri = [\"spiffe://partner.example/*\"]");
    assert_rejected(&bed, Some(&cert), "identity_not_allowed");
}

#[test]
fn identity_globs_match_cn_dns_and_uri() {
    for rule in [
        "allow_cn = [\"part*\"]",
        "allow_dns = [\"*.partner.example\"]",
        "allow_uri = [\"spiffe://partner.example/*\"]",
        "allow_cn = [\"nobody\"]\nallow_uri = [\"spiffe://partner.example/gateway\"]",
    ] {
        let bed = MtlsBed::new(BackendMode::Echo);
        bed.start(rule);
        assert_eq!(bed.exchange(0, Some(&bed.client), b"hi").expect(rule), b"hi", "{rule}");
    }
}

#[test]
fn curl_and_openssl_reach_an_http_backend() {
    let bed = MtlsBed::new(BackendMode::Http);
    bed.start("");
    let url =
        format!("https://{}:{}/", bed.testbed.server_ipv4[0], edgegate_tests::mtls::LISTENER_PORT);
    let curl = bed.testbed.clients[0]
        .netns
        .command("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(&bed.server_ca.cert)
        .arg("--cert")
        .arg(&bed.client.cert)
        .arg("--key")
        .arg(&bed.client.key)
        .arg(&url)
        .output()
        .expect("run curl");
    assert!(curl.status.success(), "curl: {}", String::from_utf8_lossy(&curl.stderr));
    assert_eq!(curl.stdout, b"ok\n");

    let without_cert = bed.testbed.clients[0]
        .netns
        .command("curl")
        .args(["--silent", "--max-time", "10", "--cacert"])
        .arg(&bed.server_ca.cert)
        .arg(&url)
        .output()
        .expect("run curl");
    assert!(!without_cert.status.success(), "curl without a client certificate got through");

    let openssl = |with_cert: bool| {
        let mut args = vec![OsStr::new("-quiet"), OsStr::new("-verify_return_error")];
        if with_cert {
            args.extend([OsStr::new("-cert"), bed.client.cert.as_os_str()]);
            args.extend([OsStr::new("-key"), bed.client.key.as_os_str()]);
        }
        bed.s_client_get(args)
    };
    let output = openssl(true);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("HTTP/1.1 200 OK") && stdout.ends_with("ok\n"), "openssl: {stdout}");
    let output = openssl(false);
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("200 OK"),
        "openssl without a certificate got an answer"
    );
    bed.await_rejected("no_certificate", 2);
}

#[test]
fn every_server_key_type_serves() {
    for algorithm in [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
        &rcgen::PKCS_RSA_SHA256,
    ] {
        let bed = MtlsBed::new(BackendMode::Echo);
        let key = if algorithm == &rcgen::PKCS_RSA_SHA256 {
            rcgen::KeyPair::generate_rsa_for(algorithm, rcgen::RsaKeySize::_2048).expect("RSA key")
        } else {
            rcgen::KeyPair::generate_for(algorithm).expect("key")
        };
        let names: Vec<String> = bed.testbed.server_ipv4.iter().map(ToString::to_string).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        bed.server_ca.issue_with_key("server", &Leaf::server(&names), key);
        bed.start("");
        let answer = bed.exchange(0, Some(&bed.client), b"key");
        assert_eq!(answer.as_deref(), Ok(&b"key"[..]), "{algorithm:?}");
    }
}

#[test]
fn tls_1_2_is_accepted_by_default_and_refused_with_a_1_3_minimum() {
    let tls12_only = |bed: &MtlsBed| {
        let config = edgegate_tests::mtls::client_config_for(
            &bed.server_ca.cert,
            Some(&bed.client),
            &[&rustls::version::TLS12],
        );
        let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
        bed.in_client(0, || async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut tls = edgegate_tests::mtls::connect_tls(address, server, config, &[]).await?;
            tls.write_all(b"12").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            tls.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(answer)
        })
    };
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    assert_eq!(tls12_only(&bed).expect("TLS 1.2"), b"12");
    bed.testbed.await_log("tls_version=TLSv1_2");

    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("min_tls_version = \"1.3\"");
    assert!(tls12_only(&bed).is_err());
    bed.await_rejected("handshake_failed", 1);
    assert_eq!(bed.backend.accepted(), 0);
}

#[test]
fn json_logs_carry_the_access_fields() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "");
    bed.testbed.start_daemon_with(&["--log-format", "json"]);
    bed.exchange(0, Some(&bed.client), b"json").expect("exchange");
    assert!(bed.exchange(0, None, b"x").is_err());
    bed.testbed.await_log("no_certificate");
    let lines: Vec<serde_json::Value> = bed
        .testbed
        .daemon_log()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let closed =
        lines.iter().find(|l| l["fields"]["message"] == "connection closed").expect("access line");
    assert_eq!(closed["fields"]["listener"], "edge");
    assert_eq!(closed["fields"]["bytes_in"], 4);
    assert_eq!(closed["fields"]["close"], "completed");
    assert!(closed["fields"]["subject"].as_str().is_some_and(|s| s.contains("CN=partner")));
    let rejected =
        lines.iter().find(|l| l["fields"]["reason"] == "no_certificate").expect("rejection line");
    assert_eq!(rejected["level"], "WARN");
}

/// The packaged unit passes no flag: `daemon.log_format` sets the format,
/// and `EDGEGATE_LOG_FORMAT` (a drop-in's `Environment=`) wins over it.
#[test]
fn the_log_format_comes_from_the_config_or_the_environment() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "log_format = \"json\"");
    bed.testbed.start_daemon();
    bed.exchange(0, Some(&bed.client), b"json").expect("exchange");
    bed.testbed.await_log("connection closed");
    let log = bed.testbed.daemon_log();
    for line in log.lines() {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(parsed["fields"]["message"].is_string(), "{line}");
    }
    bed.testbed.stop_daemon();

    let text = std::ffi::OsStr::new("text");
    bed.testbed.start_daemon_with_env(&[], &[("EDGEGATE_LOG_FORMAT", text)]);
    bed.exchange(0, Some(&bed.client), b"text").expect("exchange");
    // The log holds both runs, the first one's line in JSON: wait for the
    // text one (its fields follow the message as `key=value`).
    bed.testbed.await_log("connection closed listener=");
    let log = bed.testbed.daemon_log();
    let text_lines = log
        .lines()
        .filter(|line| line.contains("connection closed"))
        .filter(|line| serde_json::from_str::<serde_json::Value>(line).is_err());
    assert_eq!(text_lines.count(), 1, "{log}");
}

#[test]
fn reload_starts_and_stops_listeners() {
    use edgegate_tests::mtls::{LISTENER_PORT, connect_tls};
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    let second = bed
        .listener_toml("")
        .replace("name = \"edge\"", "name = \"second\"")
        .replace(&format!("0.0.0.0:{LISTENER_PORT}"), "0.0.0.0:8444");
    let connects_to = |index: usize, port: u16| {
        let config = bed.client_config(Some(&bed.client));
        let address = std::net::SocketAddr::new(bed.testbed.server_v4(index), port);
        let server = bed.testbed.server_v4(index);
        bed.in_client(
            index,
            || async move { connect_tls(address, server, config, &[]).await.is_ok() },
        )
    };
    bed.testbed.write_config_with("", &format!("{}{second}", bed.listener_toml("")));
    let output = bed.testbed.cli_ok(&["reload"]);
    assert!(
        output.contains("listener `second`: started")
            && output.contains("listener `edge`: reloaded"),
        "{output}"
    );
    assert!(connects_to(0, 8444));
    // The new port is protected by XDP at once.
    assert!(!connects_to(1, 8444));

    bed.testbed.write_config_with("", &second);
    let output = bed.testbed.cli_ok(&["reload"]);
    assert!(output.contains("listener `edge`: stopped"), "{output}");
    assert!(!connects_to(0, LISTENER_PORT));
    assert!(connects_to(0, 8444));
}

/// The server chooses the suite, cheapest strong one first: a client that
/// lists AES-256-GCM first (rustls's order, and OpenSSL's) gets AES-128-GCM,
/// in TLS 1.3 and in TLS 1.2.
#[test]
fn the_server_picks_aes_128_gcm_over_the_clients_preference() {
    use rustls::CipherSuite;
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.start("");
    for (version, preferred, expected) in [
        (
            &rustls::version::TLS13,
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ] {
        let config = edgegate_tests::mtls::client_config_for(
            &bed.server_ca.cert,
            Some(&bed.client),
            &[version],
        );
        let offered: Vec<CipherSuite> = config
            .crypto_provider()
            .cipher_suites
            .iter()
            .filter(|s| s.version() == version)
            .map(|s| s.suite())
            .collect();
        assert_eq!(offered.first(), Some(&preferred), "the client prefers AES-256");
        let (address, server) = (bed.listener_address(0), bed.testbed.server_v4(0));
        let negotiated = bed.in_client(0, || async move {
            let tls = edgegate_tests::mtls::connect_tls(address, server, config, &[])
                .await
                .expect("handshake");
            tls.get_ref().1.negotiated_cipher_suite().expect("a suite").suite()
        });
        assert_eq!(negotiated, expected);
    }
}
