//! The listener's TLS policy as a public scanner sees it: `testssl.sh` (from
//! Debian) against a listener with default settings must report nothing of
//! severity MEDIUM or above, except findings about the test certificate
//! itself (a private CA, a short validity, no CRL or OCSP address).

use edgegate_tests::mtls::{BackendMode, LISTENER_PORT, MtlsBed};

/// Findings about the throwaway test certificate, not about the server's
/// TLS: a production certificate from a public CA does not raise them.
const ABOUT_THE_TEST_CERTIFICATE: [&str; 1] = [
    // "Neither CRL nor OCSP URI provided": the test CA publishes neither.
    "cert_revocation",
];

/// One line of testssl's flat JSON report.
#[derive(Debug)]
struct Finding {
    id: String,
    severity: String,
    finding: String,
}

impl Finding {
    fn from_json(value: &serde_json::Value) -> Self {
        let field = |name: &str| value[name].as_str().unwrap_or_default().to_owned();
        Self { id: field("id"), severity: field("severity"), finding: field("finding") }
    }
}

#[test]
fn testssl_finds_nothing_of_medium_severity_or_above() {
    let bed = MtlsBed::new(BackendMode::Http);
    bed.start("");
    let report = bed.testbed.dir.join("testssl.json");
    let target = format!("{}:{LISTENER_PORT}", bed.testbed.server_v4(0));
    let output = bed.testbed.clients[0]
        .netns
        .command("testssl")
        .args(["--quiet", "--color", "0", "--warnings", "off", "--nodns", "none"])
        .args(["--connect-timeout", "5", "--openssl-timeout", "5"])
        // The test PKI's root, so that the chain itself is judged.
        .arg("--add-ca")
        .arg(&bed.server_ca.cert)
        .arg("--jsonfile")
        .arg(&report)
        .arg(&target)
        .output()
        .expect("run testssl (apt-get install testssl.sh)");
    let text = String::from_utf8_lossy(&output.stdout);
    let report = std::fs::read(&report).unwrap_or_else(|e| panic!("no report ({e}):\n{text}"));
    let findings: Vec<Finding> = serde_json::from_slice::<Vec<serde_json::Value>>(&report)
        .expect("testssl's JSON report")
        .iter()
        .map(Finding::from_json)
        .collect();
    assert!(findings.iter().any(|f| f.id == "TLS1_3"), "the scan ran: {findings:?}");
    let serious: Vec<&Finding> = findings
        .iter()
        .filter(|f| matches!(f.severity.as_str(), "MEDIUM" | "HIGH" | "CRITICAL"))
        .filter(|f| !ABOUT_THE_TEST_CERTIFICATE.contains(&f.id.as_str()))
        .collect();
    for f in &findings {
        eprintln!("{:<10} {:<40} {}", f.severity, f.id, f.finding);
    }
    assert!(serious.is_empty(), "testssl findings: {serious:#?}\n{text}");
}
