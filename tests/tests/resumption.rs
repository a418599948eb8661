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
