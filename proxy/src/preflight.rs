//! Everything `edgegate run` would load, checked before anything is touched.
//! `edgegate check` prints the report; `daemon::start` refuses to start on
//! any error in it and logs its warnings. One function serves both, so what
//! `check` accepts is what a start accepts.
//!
//! Errors are what would make the daemon refuse to start or misbehave at
//! once; warnings are what will bite later (a certificate about to expire, an
//! MTU that keeps native XDP off). Each names the file and the key or line.

use std::{fmt, path::Path};

use proxy_common::Framing;

use crate::{
    allowlist::{self, Allowlist},
    config::{AttachMode, Config, Overrides},
    filter, privileges,
    tls::{Lifetime, LifetimeKind, ListenerTls, unix_now},
};

/// Certificates expiring sooner than this are reported (and logged daily).
pub const EXPIRY_WARNING_SECONDS: i64 = 30 * 24 * 3600;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The daemon would refuse to start, or fail right away.
    Error,
    /// It starts, but this will cause trouble.
    Warning,
}

/// One problem, with the file and key it is about in `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// What [`inspect`] found: the loaded config and list when they are usable,
/// every finding, and a line for each part that is fine.
#[derive(Debug)]
pub struct Report {
    pub loaded: Option<(Config, Allowlist)>,
    pub findings: Vec<Finding>,
    pub passed: Vec<String>,
}

impl Report {
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.severity == Severity::Warning)
    }

    fn error(&mut self, text: String) {
        self.findings.push(Finding { severity: Severity::Error, text });
    }

    fn warning(&mut self, text: String) {
        self.findings.push(Finding { severity: Severity::Warning, text });
    }
}

/// Reads the config at `path` and everything it names; never stops at the
/// first problem (only a config that cannot be read or parsed as TOML of the
/// right shape ends the inspection).
pub fn inspect(path: &Path, overrides: &Overrides) -> Report {
    let mut report = Report { loaded: None, findings: Vec::new(), passed: Vec::new() };
    let config = match Config::load_with_problems(path, overrides) {
        Ok((config, problems)) => {
            for problem in problems {
                report.error(format!("config {}: {problem}", path.display()));
            }
            config
        }
        Err(e) => {
            report.error(e.to_string());
            return report;
        }
    };
    let at = |key: &str| format!("config {}: `{key}`", path.display());
    match privileges::worker_account(config.daemon.user.as_deref()) {
        Ok(account) => {
            report.passed.push(format!("proxy worker user `{}`: uid {}", account.name, account.uid))
        }
        Err(e) => report.error(format!("config {}: {e}", path.display())),
    }
    match crate::daemon::egress::workers_cgroup_parent() {
        Ok((parent, _)) => report.passed.push(format!(
            "proxy worker egress: limited to the backends by a cgroup under {}",
            parent.display()
        )),
        Err(e) if config.daemon.allow_unconfined_egress => report.warning(format!(
            "{}: the proxy worker may connect anywhere: {e}",
            at("daemon.allow_unconfined_egress")
        )),
        Err(e) => report.error(format!(
            "proxy worker egress: {e}; or set `daemon.allow_unconfined_egress = true` to run \
             without that limit"
        )),
    }
    for interface in &config.filter.interfaces {
        inspect_interface(&mut report, &at("filter.interfaces"), interface, config.filter.mode);
    }
    if config.filter.audit {
        report.warning(format!(
            "{}: audit mode: nothing is dropped and unlisted clients are served; set it to \
             false and reload to enforce (docs/operations.md: Audit first, then enforce)",
            at("filter.audit")
        ));
    }
    if let Some(fleet) = &config.fleet {
        if fleet.trusted_keys.is_empty() {
            report.warning(format!(
                "{}: unset: anyone who can write the group's keys in etcd (any gate host \
                 included) decides what every host enforces; sign the list (docs/fleet.md: \
                 Who decides the list)",
                at("fleet.trusted_keys")
            ));
        }
        if fleet.insecure_plaintext && fleet.endpoints.iter().any(|e| e.starts_with("http://")) {
            report.warning(format!(
                "{}: plaintext etcd beyond loopback: the list and the credentials cross the \
                 network unprotected",
                at("fleet.insecure_plaintext")
            ));
        }
    }
    let list = inspect_allowlist(&mut report, &config, &at);
    let now = unix_now();
    for listener in &config.listeners {
        let at = |key: &str| at(&format!("listener.{}.{key}", listener.name));
        match ListenerTls::load(listener) {
            Ok(tls) => {
                let before = report.findings.len();
                let findings = tls
                    .lifetimes
                    .iter()
                    .filter_map(|lifetime| judge_lifetime(&at(lifetime.kind.key()), lifetime, now));
                report.findings.extend(findings);
                if report.findings.len() == before {
                    report.passed.push(format!(
                        "listener `{}`: certificates, key, CAs and CRLs OK",
                        listener.name
                    ));
                }
            }
            Err(e) => report.error(format!(
                "config {}: listener `{}`: {e}",
                path.display(),
                listener.name
            )),
        }
    }
    if let Some(list) = list
        && report.errors().next().is_none()
    {
        report.loaded = Some((config, list));
    }
    report
}

fn inspect_interface(report: &mut Report, at: &str, name: &str, mode: AttachMode) {
    // Through the kernel, not /sys: `nsenter --net` keeps the host's /sys.
    let Some(link_type) = filter::interface_link_type(name) else {
        report.error(format!(
            "{at}: interface `{name}` does not exist (this host has: {}; see `ip link`)",
            filter::interface_names().join(", ")
        ));
        return;
    };
    match filter::framing_of(link_type) {
        None => report.error(format!(
            "{at}: {}",
            filter::FilterError::UnsupportedLinkType { interface: name.to_owned(), link_type }
        )),
        Some(Framing::Ip) if mode == AttachMode::Native => report.error(format!(
            "{at}: {}",
            filter::FilterError::NativeOnLayer3 { interface: name.to_owned() }
        )),
        Some(Framing::Ip) => {}
        Some(Framing::Ethernet) if mode == AttachMode::Skb => {}
        Some(Framing::Ethernet) => {
            let consequence = match mode {
                AttachMode::Native => "mode = \"native\" will fail to attach",
                _ => "mode = \"auto\" falls back to generic (skb) XDP",
            };
            for obstacle in filter::ena_obstacles(name) {
                report.warning(format!("{at}: {obstacle}; until then {consequence}"));
            }
        }
    }
}

/// Loads the list; problems with it (a missing file at an explicit path, a
/// line that does not parse, more entries than the maps hold) are errors.
fn inspect_allowlist(
    report: &mut Report,
    config: &Config,
    at: &dyn Fn(&str) -> String,
) -> Option<Allowlist> {
    let list_path = config.allowlist_path();
    if config.filter.allowlist.is_some() && !list_path.exists() {
        report.error(format!(
            "{}: {} does not exist (an explicit path is never created empty): seed it with \
             `edgegate allow add --offline CIDR...`, or remove the key to use {}",
            at("filter.allowlist"),
            list_path.display(),
            config.daemon.state_dir.join("allowlist").display()
        ));
        return None;
    }
    let list = match allowlist::load(&list_path) {
        Ok(list) => list,
        Err(e) => {
            report.error(e.to_string());
            return None;
        }
    };
    let (ipv4, ipv6) = list.family_sizes();
    let capacity = config.filter.max_entries as usize;
    for (family, size) in [("IPv4", ipv4), ("IPv6", ipv6)] {
        if size > capacity {
            report.error(format!(
                "{}: {capacity} is less than the {size} {family} entries in {}",
                at("filter.max_entries"),
                list_path.display()
            ));
        }
    }
    report
        .passed
        .push(format!("allowlist {}: {ipv4} IPv4 and {ipv6} IPv6 entries", list_path.display()));
    Some(list)
}

/// What to say about a certificate or CRL at `now`, if anything: an
/// unusable server certificate is an error, nearing expiry a warning.
pub fn judge_lifetime(at: &str, lifetime: &Lifetime, now: i64) -> Option<Finding> {
    let Lifetime { kind, path, subject, not_before, not_after } = lifetime;
    let (file, left) = (path.display(), not_after - now);
    let (severity, text) = match kind {
        LifetimeKind::Server if left <= 0 => (
            Severity::Error,
            format!(
                "{at} {file}: the server certificate ({subject}) expired on {}: clients refuse it",
                date(*not_after)
            ),
        ),
        LifetimeKind::Server if *not_before > now => (
            Severity::Error,
            format!(
                "{at} {file}: the server certificate ({subject}) is not valid before {}: \
                 clients refuse it (is the clock right?)",
                date(*not_before)
            ),
        ),
        LifetimeKind::ClientCa if left <= 0 => (
            Severity::Warning,
            format!(
                "{at} {file}: the client CA {subject} expired on {}: partner certificates it \
                 issued are refused",
                date(*not_after)
            ),
        ),
        LifetimeKind::Server | LifetimeKind::ClientCa if left < EXPIRY_WARNING_SECONDS => (
            Severity::Warning,
            format!(
                "{at} {file}: {} ({subject}) expires in {} days, on {}",
                if *kind == LifetimeKind::Server {
                    "the server certificate"
                } else {
                    "the client CA"
                },
                left / 86_400,
                date(*not_after)
            ),
        ),
        // CRLs are reissued every few days: only an overdue one is news.
        LifetimeKind::Crl if left <= 0 => (
            Severity::Warning,
            format!(
                "{at} {file}: the CRL from {subject} was due for renewal on {}: install a fresh one",
                date(*not_after)
            ),
        ),
        _ => return None,
    };
    Some(Finding { severity, text })
}

/// A Unix time as a calendar date.
fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_or_else(|_| unix.to_string(), |d| d.date().to_string())
}

#[cfg(test)]
mod tests {
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
        let warned = |report: &Report| {
            report.warnings().any(|w| w.text.contains("`fleet.trusted_keys`: unset"))
        };
        write("");
        assert!(warned(&inspect(&config, &Overrides::default())));
        write(&format!("trusted_keys = [\"ed25519:{}=\"]\n", "A".repeat(43)));
        assert!(!warned(&inspect(&config, &Overrides::default())));
    }
}
