//! Session resumption, tried with OpenSSL's own client: tickets sealed with
//! the shared key file survive a restart (as they would a move to another
//! host), expire with `session_lifetime`, and a resumed session still has to
//! satisfy the identity rules in force now.

use std::{ffi::OsStr, os::unix::fs::PermissionsExt as _, path::Path};

use edgegate_tests::mtls::{BackendMode, MtlsBed};

const KEYS: &str = "\
# edgegate session-ticket keys: the first seals, all open
q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJCrze8SNFZ4kKvN7xI0VniQ
";

fn write_keys(bed: &MtlsBed, text: &str, mode: u32) -> String {
    let path = bed.testbed.dir.join("ticket-keys");
    std::fs::write(&path, text).expect("key file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    format!("tls_ticket_keys = \"{}\"", path.display())
}

/// One HTTP request through `openssl s_client` from client 0, saving the
/// session to `session` (and offering it, once it exists): whether the
/// handshake was a resumption, and whether the backend answered.
fn request(bed: &MtlsBed, session: &Path, tls: &str) -> (bool, bool) {
    let mut args = vec![OsStr::new(tls), OsStr::new("-verify_return_error")];
    args.extend([OsStr::new("-cert"), bed.client.cert.as_os_str()]);
    args.extend([OsStr::new("-key"), bed.client.key.as_os_str()]);
    args.extend([OsStr::new("-sess_out"), session.as_os_str()]);
    if session.exists() {
        args.extend([OsStr::new("-sess_in"), session.as_os_str()]);
    }
    let output = bed.s_client_get(args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let resumed = stdout.lines().any(|l| l.starts_with("Reused, TLSv1."));
    let new = stdout.lines().any(|l| l.starts_with("New, TLSv1."));
    assert!(resumed != new, "neither new nor reused: {stdout}");
    (resumed, stdout.contains("HTTP/1.1 200 OK"))
}

#[test]
fn shared_keys_resume_across_a_restart_in_tls13_and_tls12() {
    let bed = MtlsBed::new(BackendMode::Http);
    bed.start(&write_keys(&bed, KEYS, 0o600));
    for tls in ["-tls1_3", "-tls1_2"] {
        let session = bed.testbed.dir.join(format!("session{tls}"));
        assert_eq!(request(&bed, &session, tls), (false, true), "{tls}: first connection");
        assert_eq!(request(&bed, &session, tls), (true, true), "{tls}: resumed");
    }
    // A new process with the same file opens the same tickets, as another
    // host behind the load balancer would.
    bed.testbed.stop_daemon();
    bed.testbed.start_daemon();
    for tls in ["-tls1_3", "-tls1_2"] {
        let session = bed.testbed.dir.join(format!("session{tls}"));
        assert_eq!(request(&bed, &session, tls), (true, true), "{tls}: after a restart");
    }
}

#[test]
fn without_shared_keys_a_restart_ends_resumption() {
    let bed = MtlsBed::new(BackendMode::Http);
    bed.start("");
    let session = bed.testbed.dir.join("session");
    assert_eq!(request(&bed, &session, "-tls1_3"), (false, true));
    assert_eq!(request(&bed, &session, "-tls1_3"), (true, true), "resumed on the same process");
    bed.testbed.stop_daemon();
    bed.testbed.start_daemon();
    assert_eq!(request(&bed, &session, "-tls1_3"), (false, true), "a new process's own key");
}

#[test]
fn a_ticket_is_refused_after_the_session_lifetime() {
    let bed = MtlsBed::new(BackendMode::Http);
    bed.start(&format!("{}\nsession_lifetime = \"2s\"", write_keys(&bed, KEYS, 0o600)));
    let session = bed.testbed.dir.join("session");
    assert_eq!(request(&bed, &session, "-tls1_3"), (false, true));
    assert_eq!(request(&bed, &session, "-tls1_3"), (true, true));
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(request(&bed, &session, "-tls1_3"), (false, true), "expired ticket");
}

#[test]
fn a_resumed_session_obeys_the_identity_rules_in_force_now() {
    let bed = MtlsBed::new(BackendMode::Http);
    let keys = write_keys(&bed, KEYS, 0o600);
    bed.start(&keys);
    let sessions: Vec<_> = ["-tls1_3", "-tls1_2"]
        .map(|tls| (tls, bed.testbed.dir.join(format!("session{tls}"))))
        .into();
    for (tls, session) in &sessions {
        assert_eq!(request(&bed, session, tls), (false, true), "{tls}");
    }
    // The partner's CN is no longer allowed: its tickets still open (the
    // keys did not change), but the proxy turns the session away.
    bed.write(&format!("{keys}\nallow_cn = [\"someone-else\"]"), "");
    let reloaded = bed.testbed.cli_ok(&["reload"]);
    assert!(reloaded.contains("reloaded"), "{reloaded}");
    for (tls, session) in &sessions {
        let (resumed, answered) = request(&bed, session, tls);
        assert!(!answered, "{tls}: a resumed session got past a rule that refuses it");
        assert!(resumed, "{tls}: the ticket should still open, so the recheck is what refused");
    }
    bed.await_rejected("identity_not_allowed", 2);
    assert!(bed.testbed.daemon_log().contains("resumed session refused"));
}

#[test]
fn a_key_file_others_can_read_or_without_keys_is_refused() {
    let bed = MtlsBed::new(BackendMode::Http);
    for (text, mode, expected) in [
        (KEYS, 0o644, "`tls_ticket_keys`"),
        ("# no key yet\n", 0o600, "holds no key"),
        ("c2hvcnQ=\n", 0o600, "line 1: 5 bytes"),
    ] {
        bed.write(&write_keys(&bed, text, mode), "");
        let output = bed.testbed.check();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "check accepted {text:?} ({mode:o})");
        assert!(stderr.contains(expected), "{text:?} ({mode:o}): {stderr}");
    }
}

/// A ticket key of its own: the name `edgegate-tstname`, then the AES key
/// [`MEMORY_TICKET_KEY`].
const MEMORY_KEYS: &str = "ZWRnZWdhdGUtdHN0bmFtZQswVXqfxOkOM1h9osfsETZbgKXK7xQ5XoOozfIXPGGG\n";
const MEMORY_TICKET_KEY: [u8; 32] = {
    let mut key = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        key[i] = (i as u8).wrapping_mul(37).wrapping_add(11);
        i += 1;
    }
    key
};

/// Everything `pid` has mapped readable and writable (where keys live:
/// heap, stacks, anonymous memory), read through `/proc/<pid>/mem` (root
/// may, the process being not dumpable or not).
fn memory(pid: u32) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut all = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(permissions)) = (fields.next(), fields.next()) else { continue };
        let Some((start, end)) = range.split_once('-') else { continue };
        let start = u64::from_str_radix(start, 16).expect("hex");
        let end = u64::from_str_radix(end, 16).expect("hex");
        if !permissions.starts_with("rw") {
            continue;
        }
        let mut region = vec![0u8; usize::try_from(end - start).expect("fits")];
        if mem.read_exact_at(&mut region, start).is_ok() {
            all.extend_from_slice(&region);
        }
    }
    all
}

fn holds(memory: &[u8], needle: &[u8]) -> bool {
    let first = needle[0];
    memory
        .iter()
        .enumerate()
        .filter(|(_, byte)| **byte == first)
        .any(|(at, _)| memory[at..].starts_with(needle))
}

/// The 32-byte scalar of a P-256 PKCS#8 key (its `ECPrivateKey`'s octet
/// string), big-endian as the file holds it.
fn ec_scalar(pkcs8: &[u8]) -> [u8; 32] {
    let at = pkcs8
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("a P-256 ECPrivateKey");
    pkcs8[at + 5..at + 37].try_into().expect("32 bytes")
}

/// The worker parses every byte from the internet; a compromise must not
/// give away the server's private key or the fleet's ticket keys. Searched
/// in its memory after full and resumed handshakes: neither is there (in
/// any byte order), while the gate, which signs and seals, holds both; and
/// the same search finds them in a worker that holds the keys itself.
#[test]
fn the_worker_holds_neither_the_private_key_nor_the_ticket_keys() {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
    let bed = MtlsBed::new(BackendMode::Http);
    let keys = write_keys(&bed, MEMORY_KEYS, 0o600);
    let pkcs8 = PrivateKeyDer::from_pem_file(&bed.server_cert.key).expect("server key");
    let scalar = ec_scalar(pkcs8.secret_der());
    let mut reversed = scalar;
    reversed.reverse();
    let key_text = std::fs::read(&bed.server_cert.key).expect("key file");
    let key_line = &key_text[28..92];
    let secrets: [(&str, &[u8]); 5] = [
        ("the private key's scalar", &scalar),
        ("the private key's scalar, little-endian", &reversed),
        ("the PKCS#8 key", pkcs8.secret_der()),
        ("the key file's text", key_line),
        ("the ticket key", &MEMORY_TICKET_KEY),
    ];
    let exercise = |bed: &MtlsBed| {
        for tls in ["-tls1_3", "-tls1_2"] {
            let session = bed.testbed.dir.join(format!("memory-session{tls}"));
            let _ = std::fs::remove_file(&session);
            assert_eq!(request(bed, &session, tls), (false, true), "{tls}: first connection");
            assert_eq!(request(bed, &session, tls), (true, true), "{tls}: resumed");
        }
    };

    bed.start(&keys);
    exercise(&bed);
    let status = bed.testbed.status();
    let worker = memory(status.worker.pid.expect("a worker serves"));
    for (what, secret) in secrets {
        assert!(!holds(&worker, secret), "the worker's memory holds {what}");
    }
    let gate = memory(status.gate_pid);
    assert!(holds(&gate, &MEMORY_TICKET_KEY), "the search misses the gate's ticket key");
    assert!(
        holds(&gate, &scalar) || holds(&gate, &reversed),
        "the search misses the gate's private key"
    );

    // Control: a worker given the keys (the benchmarks' comparison mode).
    bed.testbed.stop_daemon();
    bed.testbed.start_daemon_with(&["--keys-in-worker"]);
    exercise(&bed);
    let worker = memory(bed.testbed.status().worker.pid.expect("a worker serves"));
    assert!(holds(&worker, &MEMORY_TICKET_KEY), "the search misses a worker's ticket key");
    assert!(holds(&worker, &scalar) || holds(&worker, &reversed), "… and its private key");
}
