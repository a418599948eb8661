//! What `check` and start-up find, case by case: certificate and CRL
//! lifetimes, an unsigned fleet, empty or bad lists, missing files, binds and
//! backends.

use super::*;

const DAY: i64 = 86_400;
const NOW: i64 = 1_800_000_000;

fn judge(kind: LifetimeKind, not_before: i64, not_after: i64) -> Option<(Severity, String)> {
    let lifetime = Lifetime {
        kind,
        path: "/etc/edgegate/x.pem".into(),
        subject: "CN=x".into(),
        not_before,
        not_after,
    };
    judge_lifetime("`cert`", &lifetime, NOW).map(|f| (f.severity, f.text))
}

#[test]
fn an_expired_or_future_server_certificate_is_an_error() {
    let (severity, text) = judge(LifetimeKind::Server, NOW - 90 * DAY, NOW - DAY).unwrap();
    assert_eq!(severity, Severity::Error);
    assert!(text.contains("expired on") && text.contains("clients refuse it"), "{text}");
    let (severity, text) = judge(LifetimeKind::Server, NOW + DAY, NOW + 90 * DAY).unwrap();
    assert_eq!(severity, Severity::Error);
    assert!(text.contains("is not valid before"), "{text}");
}

#[test]
fn nearing_expiry_is_a_warning_with_the_days_left() {
    let (severity, text) = judge(LifetimeKind::Server, NOW - DAY, NOW + 12 * DAY + 5).unwrap();
    assert_eq!(severity, Severity::Warning);
    assert!(text.contains("expires in 12 days"), "{text}");
    let (severity, _) = judge(LifetimeKind::ClientCa, NOW - DAY, NOW + DAY).unwrap();
    assert_eq!(severity, Severity::Warning);
    assert_eq!(judge(LifetimeKind::Server, NOW - DAY, NOW + 31 * DAY), None);
}

#[test]
fn a_crl_is_news_only_when_overdue() {
    assert_eq!(judge(LifetimeKind::Crl, NOW - DAY, NOW + DAY), None, "due tomorrow: normal");
    let (severity, text) = judge(LifetimeKind::Crl, NOW - 8 * DAY, NOW - DAY).unwrap();
    assert_eq!(severity, Severity::Warning);
    assert!(text.contains("due for renewal"), "{text}");
    let (severity, _) = judge(LifetimeKind::ClientCa, NOW - 900 * DAY, NOW - DAY).unwrap();
    assert_eq!(severity, Severity::Warning, "an expired client CA does not stop the start");
}

/// `check` says who decides a fleet's list when nothing is signed.
#[test]
fn an_unsigned_fleet_is_a_warning_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("edgegate.toml");
    let fleet = "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ngroup = \"g\"\n";
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!("[filter]\ninterfaces = [\"lo\"]\nports = [1]\n{fleet}{extra}"),
        )
        .expect("write");
    };
    let warned =
        |report: &Report| report.warnings().any(|w| w.text.contains("`fleet.trusted_keys`: unset"));
    write("");
    assert!(warned(&inspect(&config, &Overrides::default())));
    write(&format!("trusted_keys = [\"ed25519:{}=\"]\n", "A".repeat(43)));
    assert!(!warned(&inspect(&config, &Overrides::default())));
}

/// `check` of `config` (a `[filter]` table's keys first) written into a
/// fresh directory, whose allowlist holds `list`; the findings' texts.
fn check(config: &str, list: Option<&str>) -> (tempfile::TempDir, Vec<Finding>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "[filter]\ninterfaces = [\"lo\"]\nmode = \"skb\"\n{config}\n\n[daemon]\n\
         allow_unconfined_egress = true\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n",
        dir.path().join("state").display(),
        dir.path().join("control.sock").display()
    );
    let path = dir.path().join("edgegate.toml");
    std::fs::write(&path, text).expect("write config");
    if let Some(list) = list {
        std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
        std::fs::write(dir.path().join("state/allowlist"), list).expect("write list");
    }
    let report = inspect(&path, &Overrides::default());
    (dir, report.findings)
}

fn errors_about<'a>(findings: &'a [Finding], words: &str) -> Vec<&'a str> {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Error && f.text.contains(words))
        .map(|f| f.text.as_str())
        .collect()
}

#[test]
fn an_empty_list_that_locks_the_operator_out_is_an_error_unless_meant() {
    for (case, filter) in
        [("host scope", "scope = \"host\""), ("SSH protected", "ports = [22, 8443]")]
    {
        let (_dir, findings) = check(filter, None);
        let lockout = errors_about(&findings, "lock you out");
        assert_eq!(lockout.len(), 1, "{case}: {findings:?}");
        for words in ["allow add --offline --config", "filter.audit = true", "allow_empty"] {
            assert!(lockout[0].contains(words), "{case}: {}", lockout[0]);
        }
        for intent in ["audit = true", "allow_empty = true"] {
            let (_dir, findings) = check(&format!("{filter}\n{intent}"), None);
            assert!(errors_about(&findings, "lock you out").is_empty(), "{case}, {intent}");
        }
        let (_dir, findings) = check(filter, Some("192.0.2.0/24\n"));
        assert!(errors_about(&findings, "lock you out").is_empty(), "{case}, listed");
    }
}

#[test]
fn an_empty_list_on_service_ports_is_a_warning_naming_them() {
    let (_dir, findings) = check("ports = [8443]", Some(""));
    assert!(errors_about(&findings, "empty").is_empty(), "{findings:?}");
    let warning = findings
        .iter()
        .find(|f| f.severity == Severity::Warning && f.text.contains("empty"))
        .unwrap_or_else(|| panic!("no warning: {findings:?}"));
    assert!(warning.text.contains("(8443)") && warning.text.contains("allow add"), "{warning}");
}

#[test]
fn every_bad_line_of_the_list_is_reported_in_one_run() {
    let list = "192.0.2.0/24\n10.0.0.0/33\nallow\n198.51.100.0/24\nfoo bar\n\
                deny 192.0.2.0/24\n2001:db8::/129\n";
    let (_dir, findings) = check("ports = [8443]", Some(list));
    let lines: Vec<&str> = ["line 2:", "line 3:", "line 5:", "line 6:", "line 7:"].into();
    for line in &lines {
        assert_eq!(errors_about(&findings, line).len(), 1, "{line}: {findings:?}");
    }
    assert_eq!(errors_about(&findings, "allowlist").len(), lines.len(), "{findings:?}");
}

#[test]
fn every_missing_file_of_a_listener_is_reported() {
    let listener = "ports = [8443]\n\n[[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:8443\"\n\
                    backend = \"127.0.0.1:8080\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\
                    client_ca = \"/nonexistent/ca.pem\"\ncrl = [\"a.crl\", \"b.crl\"]";
    let (dir, findings) = check(listener, Some("192.0.2.0/24\n"));
    let unreadable = errors_about(&findings, "cannot be read");
    assert_eq!(unreadable.len(), 5, "{findings:?}");
    for (key, file) in [
        ("cert", dir.path().join("server.pem")),
        ("key", dir.path().join("server.key")),
        ("client_ca", "/nonexistent/ca.pem".into()),
        ("crl", dir.path().join("a.crl")),
        ("crl", dir.path().join("b.crl")),
    ] {
        let named = format!("listener.edge.{key}` {}", file.display());
        assert!(unreadable.iter().any(|e| e.contains(&named)), "{named}: {unreadable:?}");
    }
}

#[test]
fn relative_paths_are_read_from_the_config_directory_and_said_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = "[filter]\ninterfaces = [\"lo\"]\nports = [8443]\nallowlist = \"list\"\n\n\
                  [daemon]\nstate_dir = \"state\"\n";
    std::fs::write(dir.path().join("edgegate.toml"), config).expect("write config");
    std::fs::write(dir.path().join("list"), "192.0.2.0/24\n").expect("write list");
    // From elsewhere, as systemd starts it (in `/`).
    let report = inspect(&dir.path().join("edgegate.toml"), &Overrides::default());
    let (config, _) = report.loaded.as_ref().expect("loaded");
    assert_eq!(config.allowlist_path(), dir.path().join("list"));
    assert_eq!(config.daemon.state_dir, dir.path().join("state"));
    let said = report.passed.iter().find(|line| line.contains("relative paths"));
    let said = said.unwrap_or_else(|| panic!("{:?}", report.passed));
    assert!(said.contains("`filter.allowlist`, `daemon.state_dir`"), "{said}");
}

#[test]
fn a_missing_explicit_list_is_seeded_with_a_command_for_this_config() {
    let (dir, findings) = check("ports = [8443]\nallowlist = \"/nonexistent/list\"", None);
    let missing = errors_about(&findings, "does not exist");
    let config = dir.path().join("edgegate.toml");
    let command = format!("edgegate allow add --offline --config {} CIDR", config.display());
    assert!(missing.len() == 1 && missing[0].contains(&command), "{findings:?}");
}

#[test]
fn in_fleet_mode_a_missing_or_empty_list_file_is_only_the_cache() {
    let fleet = "scope = \"host\"\nallowlist = \"/nonexistent/list\"\n\n[fleet]\n\
                 endpoints = [\"http://127.0.0.1:2379\"]\ngroup = \"g\"";
    let (_dir, findings) = check(fleet, None);
    assert!(errors_about(&findings, "does not exist").is_empty(), "{findings:?}");
    assert!(errors_about(&findings, "lock you out").is_empty(), "{findings:?}");
}

#[test]
fn a_bind_address_the_host_lacks_and_a_backend_that_does_not_resolve_are_errors() {
    // 192.0.2.0/24 is TEST-NET-1: no host has it; `.invalid` never resolves (RFC 6761).
    let listener = "ports = [8443]\n\n[[listener]]\nname = \"edge\"\nbind = \"192.0.2.7:8443\"\n\
                    backend = \"backend.invalid:8080\"\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"a\"\n\n\
                    [metrics]\nbind = \"192.0.2.8:9901\"";
    let (_dir, findings) = check(listener, Some("192.0.2.0/24\n"));
    let bind = errors_about(&findings, "192.0.2.7 is not an address of this host");
    assert!(bind.len() == 1 && bind[0].contains("listener.edge.bind"), "{findings:?}");
    let metrics = errors_about(&findings, "192.0.2.8 is not an address of this host");
    assert!(metrics.len() == 1 && metrics[0].contains("metrics.bind"), "{findings:?}");
    let backend = errors_about(&findings, "`backend.invalid:8080` does not resolve");
    assert!(backend.len() == 1 && backend[0].contains("listener.edge.backend"), "{findings:?}");
}

#[test]
fn missing_and_garbage_fleet_tls_files_are_errors_naming_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").expect("write");
    let fleet = format!(
        "ports = [8443]\n\n[fleet]\nendpoints = [\"https://127.0.0.1:2379\"]\ngroup = \"g\"\n\
         ca = \"/nonexistent/ca.pem\"\ncert = \"{0}\"\nkey = \"{0}\"",
        garbage.display()
    );
    let (_dir, findings) = check(&fleet, None);
    for (key, file, problem) in [
        ("fleet.ca", "/nonexistent/ca.pem", "cannot be read"),
        ("fleet.cert", garbage.to_str().expect("UTF-8"), "holds no certificate"),
        ("fleet.key", garbage.to_str().expect("UTF-8"), "holds no private key"),
    ] {
        let named = format!("`{key}` {file}: {problem}");
        assert_eq!(errors_about(&findings, &named).len(), 1, "{named}: {findings:?}");
    }
}
