//! An operator's first week: `check` reports every mistake that bites on
//! EC2, the list can be seeded and hand-edited without a running daemon,
//! and the CLI refuses bad arguments before it talks to one.

use edgegate_tests::{
    mtls::{BackendMode, MtlsBed},
    pki::Leaf,
    testbed::{CONNECT_TIMEOUT, PROTECTED_PORT, Testbed, edgegate_binary},
};
use time::{Duration, OffsetDateTime};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One config with four unrelated mistakes: `check` names each with its key,
/// in one run, and a start refuses with the same four.
#[test]
fn check_reports_every_problem_at_once() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let now = OffsetDateTime::now_utc();
    let server_ip = bed.testbed.server_ipv4[0].to_string();
    let expired = bed.server_ca.issue(
        "expired-server",
        &Leaf {
            not_before: now - Duration::days(60),
            not_after: now - Duration::days(1),
            ..Leaf::server(&[&server_ip])
        },
    );
    let listener = bed
        .listener_toml("")
        .replace(&bed.server_cert.cert.display().to_string(), &expired.cert.display().to_string())
        .replace(&bed.server_cert.key.display().to_string(), &expired.key.display().to_string());
    bed.testbed.write_config_with(
        "max_entries = 1",
        &format!("\n[metrics]\nbind = \"0.0.0.0:8443\"\n\n{listener}"),
    );
    let config = std::fs::read_to_string(&bed.testbed.config).expect("config");
    let interfaces = format!("interfaces = [\"{}\", \"ens5\"]", bed.testbed.interfaces[0]);
    let config: String = config
        .lines()
        .map(|line| if line.starts_with("interfaces") { interfaces.clone() } else { line.into() })
        .map(|line| line + "\n")
        .collect();
    std::fs::write(&bed.testbed.config, config).expect("config");
    // Two IPv4 entries where the maps hold one per family.
    std::fs::write(bed.testbed.allowlist_path(), "192.0.2.1\n192.0.2.2\n").expect("list");

    let output = bed.testbed.check();
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    for expected in [
        "`filter.interfaces`: interface `ens5` does not exist (this host has: ",
        "`metrics.bind`: 0.0.0.0:8443 is also listener `edge`'s address",
        "the IPv4 rules need room for 2 entries, but the maps hold 1 per family",
        "`listener.edge.cert`",
        "the server certificate (CN=",
        "expired on",
        "clients refuse it",
    ] {
        assert!(message.contains(expected), "missing `{expected}` in:\n{message}");
    }
    assert!(message.contains("4 problem(s) found"), "{message}");
    let refused = stderr(&bed.testbed.refused_start(&[]));
    assert!(refused.contains("interface `ens5` does not exist"), "{refused}");
    assert!(refused.contains("expired on"), "{refused}");
    assert!(!bed.testbed.bpffs_dir.exists(), "nothing attached");
}

/// A missing file at an explicit `filter.allowlist` is a typo, not an empty list.
#[test]
fn check_refuses_a_missing_allowlist_at_an_explicit_path() {
    let testbed = Testbed::new(1);
    let missing = testbed.dir.join("no-such-list");
    testbed.write_config(&format!("allowlist = \"{}\"", missing.display()));
    let output = testbed.check();
    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(
        message.contains(&format!("`filter.allowlist`: {} does not exist", missing.display())),
        "{message}"
    );
    assert!(message.contains("edgegate allow add --offline"), "{message}");
}

/// `trusted_proxies` refuses what the allowlist refuses, in the same words.
#[test]
fn check_refuses_host_bits_and_bad_prefix_lengths_in_trusted_proxies() {
    let bed = MtlsBed::new(BackendMode::Echo);
    for (proxies, expected) in [
        ("10.0.0.1/16", "`10.0.0.1/16` has host bits set; the network is `10.0.0.0/16`"),
        ("10.0.0.0/33", "`10.0.0.0/33`: the prefix length must be a number from 0 to 32"),
    ] {
        bed.write(&format!("proxy_protocol = \"v2\"\ntrusted_proxies = [\"{proxies}\"]"), "");
        let output = bed.testbed.check();
        let message = stderr(&output);
        assert!(!output.status.success());
        assert!(message.contains(expected) && message.contains("trusted_proxies"), "{message}");
    }
    bed.write("handshake_timeout = \"10\"", "");
    let message = stderr(&bed.testbed.check());
    assert!(message.contains("`10` is not a duration"), "{message}");
    assert!(message.contains("e.g. \"10s\", \"5m\" or \"1h\""), "{message}");
}

/// Warnings do not fail `check`, but say what will bite: a server
/// certificate about to expire. ENA's MTU rule is ENA's: a jumbo MTU on
/// another driver (veth here) is no warning.
#[test]
fn check_warns_of_near_expiry_and_only_ena_of_a_jumbo_mtu() {
    let bed = MtlsBed::new(BackendMode::Echo);
    let server_ip = bed.testbed.server_ipv4[0].to_string();
    let now = OffsetDateTime::now_utc();
    let soon = bed.server_ca.issue(
        "soon",
        &Leaf { not_after: now + Duration::hours(10 * 24 + 12), ..Leaf::server(&[&server_ip]) },
    );
    let listener = bed
        .listener_toml("")
        .replace(&bed.server_cert.cert.display().to_string(), &soon.cert.display().to_string())
        .replace(&bed.server_cert.key.display().to_string(), &soon.key.display().to_string());
    bed.testbed.write_config_with("", &listener);
    let interface = &bed.testbed.interfaces[0];
    bed.testbed.server.ip(&["link", "set", "dev", interface, "mtu", "9001"]);

    let output = bed.testbed.check();
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert!(message.contains("warning: ") && message.contains("expires in 10 days"), "{message}");
    assert!(!message.contains("MTU"), "{message}");

    // The daemon starts, logs the expiry, and exports it.
    bed.testbed.start_daemon();
    let log = bed.testbed.daemon_log();
    assert!(log.contains("expires in 10 days") && !log.contains("MTU"), "{log}");
    let (_, metrics) = bed.testbed.http_get("/metrics");
    let expiry = metrics
        .lines()
        .find(|l| l.starts_with("edgegate_certificate_expiry_seconds{") && l.contains("server"))
        .unwrap_or_else(|| panic!("no server expiry in:\n{metrics}"));
    let seconds: f64 = expiry.rsplit(' ').next().expect("value").parse().expect("a number");
    assert!((10.0 * 86_400.0..11.0 * 86_400.0).contains(&seconds), "{expiry}");
    assert!(metrics.contains("kind=\"client_ca\""), "{metrics}");
}

/// With no daemon running, the list is seeded with `--offline` (validated,
/// written atomically) and the first start enforces it; with a daemon
/// running, `--offline` is refused.
#[test]
fn the_list_is_seeded_offline_before_the_first_start() {
    let testbed = Testbed::new(2);
    let state = testbed.dir.join("state");
    let offline = |args: &[&str]| {
        let mut all = vec!["--state-dir", state.to_str().expect("UTF-8")];
        all.extend_from_slice(args);
        all.push("--offline");
        testbed.cli(&all)
    };
    let client0 = testbed.clients[0].ipv4.to_string();
    let output = offline(&["allow", "add", &client0, "--comment", "partner"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("1 added") && said.contains("applied when the daemon starts"), "{said}");
    let bad = offline(&["allow", "add", "10.0.0.1/8"]);
    assert!(!bad.status.success() && stderr(&bad).contains("host bits set"), "{}", stderr(&bad));
    let denied = offline(&["deny", "add", "192.0.2.66"]);
    assert!(denied.status.success(), "{}", stderr(&denied));

    testbed.start_daemon();
    assert!(testbed.connects(0, testbed.server_v4(0), PROTECTED_PORT, CONNECT_TIMEOUT));
    assert!(!testbed.connects(1, testbed.server_v4(1), PROTECTED_PORT, CONNECT_TIMEOUT));
    let listed = testbed.cli_ok(&["allow", "list"]);
    assert!(
        listed.contains(&format!("allow {client0}/32")) && listed.contains("# partner"),
        "{listed}"
    );
    assert!(listed.contains("deny  192.0.2.66/32"), "{listed}");
    let denies = testbed.cli_ok(&["deny", "list"]);
    assert_eq!(denies.trim(), "deny  192.0.2.66/32");

    let refused = offline(&["allow", "add", "198.51.100.7"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("the daemon is running"), "{}", stderr(&refused));
}

/// `reload` re-reads a hand-edited list file: a valid one is put in force
/// (and the file stays as edited), a broken one keeps the list in force and
/// says why.
#[test]
fn reload_rereads_a_hand_edited_list() {
    let testbed = Testbed::new(2);
    std::fs::create_dir_all(testbed.dir.join("state")).expect("state");
    std::fs::write(testbed.allowlist_path(), format!("{}\n", testbed.clients[0].ipv4))
        .expect("list");
    testbed.start_daemon();
    assert!(!testbed.connects(1, testbed.server_v4(1), PROTECTED_PORT, CONNECT_TIMEOUT));

    let edited =
        format!("{}\n{} # added by hand\n", testbed.clients[0].ipv4, testbed.clients[1].ipv4);
    std::fs::write(testbed.allowlist_path(), &edited).expect("edit");
    let reloaded = testbed.cli_ok(&["reload"]);
    assert!(reloaded.contains("allowlist: re-read: 1 added, 0 removed"), "{reloaded}");
    assert!(testbed.connects(1, testbed.server_v4(1), PROTECTED_PORT, CONNECT_TIMEOUT));
    assert_eq!(std::fs::read_to_string(testbed.allowlist_path()).expect("list"), edited);

    std::fs::write(testbed.allowlist_path(), "10.0.0.1/8\n").expect("break");
    let output = testbed.cli(&["reload"]);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(
        said.contains("kept the list in force") && said.contains("has host bits set"),
        "{said}"
    );
    assert!(testbed.connects(1, testbed.server_v4(1), PROTECTED_PORT, CONNECT_TIMEOUT));
    assert!(testbed.connects(0, testbed.server_v4(0), PROTECTED_PORT, CONNECT_TIMEOUT));
}

/// Arguments are checked by the CLI itself: a typo is named even when no
/// daemon runs (rather than "the daemon is not running").
#[test]
fn allow_add_validates_its_arguments_before_calling_the_daemon() {
    let testbed = Testbed::new(1);
    for (args, expected) in [
        (&["allow", "add", "10.0.0.1/8"][..], "has host bits set"),
        (&["deny", "add", "10.0.0.0/40"], "the prefix length must be a number from 0 to 32"),
        (&["allow", "del", "nonsense"], "`nonsense` is not an IP address or CIDR"),
    ] {
        let output = testbed.cli(args);
        let message = stderr(&output);
        assert!(!output.status.success());
        assert!(message.contains(expected) && !message.contains("not running"), "{message}");
    }
    assert!(stderr(&testbed.cli(&["allow", "add", "10.0.0.0/8"])).contains("not running"));
}

/// Every config in `examples/` passes `check` as written, but for what
/// differs on a test host: its files (test certificates of the same names),
/// its interface, its private address, and its state directory, where the
/// list is seeded the way the example's comment says.
#[test]
fn every_example_passes_check() {
    use edgegate_tests::pki::Authority;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let files = tempfile::tempdir().expect("temp dir");
    let partners = Authority::new(files.path(), "partner-ca");
    partners.issue("server", &Leaf::server(&["gate.example"]));
    let etcd = Authority::new(files.path(), "etcd-ca");
    etcd.issue("etcd-client", &Leaf::client("edgegate-gate-a"));
    etcd.issue("etcd-admin", &Leaf::client("edgegate-admin"));
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&examples).expect("examples/") {
        let example = entry.expect("entry").path();
        if example.extension() != Some("toml".as_ref()) {
            continue;
        }
        let name = example.file_name().expect("name").to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&example)
            .expect("example")
            .replace("/etc/edgegate/", &format!("{}/", files.path().display()))
            .replace("interfaces = [\"ens5\"]", "interfaces = [\"lo\"]")
            .replace("10.0.1.23:", "127.0.0.1:");
        let config = files.path().join(&name);
        std::fs::write(&config, text).expect("write");
        let state = files.path().join(format!("{name}.state"));
        let edgegate = |args: &[&str]| {
            std::process::Command::new(edgegate_binary())
                .arg("--state-dir")
                .arg(&state)
                .args(args)
                .arg("--config")
                .arg(&config)
                .output()
                .expect("run edgegate")
        };
        let report =
            |output: &std::process::Output| format!("{name}: {}{}", stdout(output), stderr(output));
        if !name.starts_with("fleet") {
            let seeded = edgegate(&["allow", "add", "203.0.113.0/24", "--offline"]);
            assert!(seeded.status.success(), "{}", report(&seeded));
        }
        let output = edgegate(&["check"]);
        assert!(output.status.success(), "{}", report(&output));
        let verdict = if name == "fleet-admin.toml" { "admin config OK" } else { "config OK" };
        assert!(stdout(&output).contains(verdict), "{}", report(&output));
        assert!(!stderr(&output).contains("warning"), "{}", report(&output));
        checked.push(name);
    }
    checked.sort();
    let expected = ["behind-nlb.toml", "fleet-admin.toml", "fleet-member.toml", "single-host.toml"];
    assert_eq!(checked, expected);
}
