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
    config::{AttachMode, Config, FleetConfig, Loaded, Overrides, Scope},
    filter::{self, Capacity},
    privileges,
    tls::{self, FileProblem, Lifetime, LifetimeKind, ListenerTls},
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
/// every finding, and a line for each part that is fine. [`inspect_admin`]
/// fills `admin` instead of `loaded`.
#[derive(Debug, Default)]
pub struct Report {
    pub loaded: Option<(Config, Allowlist)>,
    pub admin: Option<FleetConfig>,
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
    let mut report = Report::default();
    let config = match Config::load_with_problems(path, overrides) {
        Ok(Loaded { config, problems, relative, base }) => {
            for problem in problems {
                report.error(format!("config {}: {problem}", path.display()));
            }
            if let (Some(base), false) = (base, relative.is_empty()) {
                report.passed.push(format!(
                    "relative paths are read from {}, the config's directory: `{}`",
                    base.display(),
                    relative.join("`, `")
                ));
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
        inspect_fleet(&mut report, fleet, path);
    }
    if let Err(e) = local_address(config.metrics.bind.ip()) {
        report.error(format!(
            "{}: {} is not an address of this host ({e}): use one `ip address` shows",
            at("metrics.bind"),
            config.metrics.bind.ip()
        ));
    }
    let list = inspect_allowlist(&mut report, path, &config, &at);
    let now = crate::clock::unix_seconds();
    for listener in &config.listeners {
        let at = |key: &str| at(&format!("listener.{}.{key}", listener.name));
        // Every file that cannot be read, not just the first.
        let unreadable: Vec<String> = listener
            .files()
            .into_iter()
            .filter_map(|(key, file)| {
                let error = std::fs::File::open(file).err()?;
                Some(format!("{} {}: cannot be read: {error}", at(key), file.display()))
            })
            .collect();
        if let Err(e) = crate::daemon::listeners::resolve(&listener.backend) {
            report.error(format!(
                "{}: `{}` does not resolve here: {e}",
                at("backend"),
                listener.backend
            ));
        }
        if let Err(e) = local_address(listener.bind.ip()) {
            report.error(format!(
                "{}: {} is not an address of this host ({e}): use one `ip address` shows, or \
                 the wildcard {}",
                at("bind"),
                listener.bind.ip(),
                if listener.bind.is_ipv4() { "0.0.0.0" } else { "[::]" }
            ));
        }
        if !unreadable.is_empty() {
            unreadable.into_iter().for_each(|problem| report.error(problem));
            continue;
        }
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

/// `check` of a file with a `[fleet]` table and no `[filter]`: the config
/// an operator's machine or an admin host gives `--signing-key` changes and
/// `fleet status`, not `run`. `None` when the file is not one.
pub fn inspect_admin(path: &Path) -> Option<Report> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    if table.contains_key("filter") || !table.contains_key("fleet") {
        return None;
    }
    let mut report = Report::default();
    match crate::config::load_fleet(path) {
        Ok((fleet, _)) => {
            inspect_fleet(&mut report, &fleet, path);
            report.passed.push(format!(
                "fleet admin config: group `{}` at {}; with no `[filter]` it serves \
                 `--signing-key` changes and `fleet status`, not `edgegate run`",
                fleet.group,
                fleet.endpoints.join(", ")
            ));
            report.admin = Some(fleet);
        }
        Err(e) => report.error(e.to_string()),
    }
    Some(report)
}

/// What a `[fleet]` table needs beyond its syntax: its TLS files, and who
/// may decide the list.
fn inspect_fleet(report: &mut Report, fleet: &FleetConfig, config_path: &Path) {
    let at = |key: &str| format!("config {}: `{key}`", config_path.display());
    inspect_fleet_files(report, fleet, config_path);
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

/// The etcd client's TLS files, read as a start reads them, and parsed as
/// the first connection would: a typo must not wait for that.
fn inspect_fleet_files(report: &mut Report, fleet: &FleetConfig, config_path: &Path) {
    let files = [("fleet.ca", &fleet.ca), ("fleet.cert", &fleet.cert), ("fleet.key", &fleet.key)];
    for (key, path) in files {
        let Some(path) = path else { continue };
        let parsed = match std::fs::read(path) {
            Err(e) => Err(tls::TlsError::File {
                key,
                path: path.clone(),
                problem: FileProblem::Unreadable(e),
            }),
            Ok(pem) if key == "fleet.key" => tls::parse_private_key(key, path, &pem).map(drop),
            Ok(pem) => tls::parse_certificates(key, path, &pem).map(drop),
        };
        if let Err(e) = parsed {
            report.error(format!("config {}: {e}", config_path.display()));
        }
    }
}

/// Whether a socket can be bound to `address` here: an address of the host
/// (or a wildcard). Port 0 keeps a running daemon's sockets out of the way.
fn local_address(address: std::net::IpAddr) -> std::io::Result<()> {
    std::net::TcpListener::bind((address, 0)).map(drop)
}

/// Every problem a list file has is reported, up to this many lines.
const LIST_PROBLEMS_SHOWN: usize = 50;

/// Loads the list; problems with it (a missing file at an explicit path, the
/// lines that do not parse, more entries than the maps hold, an empty list
/// that locks the operator out) are errors.
fn inspect_allowlist(
    report: &mut Report,
    config_path: &Path,
    config: &Config,
    at: &dyn Fn(&str) -> String,
) -> Option<Allowlist> {
    let list_path = config.allowlist_path();
    let seed = format!("`edgegate allow add --offline --config {} CIDR...`", config_path.display());
    // In fleet mode the file only caches the group's list: a start creates it.
    if config.filter.allowlist.is_some() && !list_path.exists() && config.fleet.is_none() {
        report.error(format!(
            "{}: {} does not exist (an explicit path is never created empty): seed it with \
             {seed}, or remove the key to use {}",
            at("filter.allowlist"),
            list_path.display(),
            config.daemon.state_dir.join("allowlist").display()
        ));
        return None;
    }
    let text = match allowlist::read(&list_path, config.filter.max_entries) {
        Ok(text) => text.unwrap_or_default(),
        Err(e) => {
            report.error(e.to_string());
            return None;
        }
    };
    let Ok(list) = Allowlist::parse(&text) else {
        // Every bad line at once: `parse` stops at the first.
        let problems = Allowlist::problems(&text, LIST_PROBLEMS_SHOWN + 1);
        for problem in problems.iter().take(LIST_PROBLEMS_SHOWN) {
            report.error(format!("{}: {problem}", list_path.display()));
        }
        if problems.len() > LIST_PROBLEMS_SHOWN {
            report.error(format!("{}: and more lines like these", list_path.display()));
        }
        return None;
    };
    let (ipv4, ipv6) = list.family_sizes();
    let cidrs = list.entries().map(|entry| entry.cidr);
    if let Err(too_many) = Capacity(config.filter.max_entries).check([], cidrs) {
        let at = at("filter.max_entries");
        report.error(format!("{at}: {}: {too_many}", list_path.display()));
    }
    if list.is_empty() && !config.filter.audit && config.fleet.is_none() {
        inspect_empty_list(report, config, &list_path, &seed, at);
    }
    report
        .passed
        .push(format!("allowlist {}: {ipv4} IPv4 and {ipv6} IPv6 entries", list_path.display()));
    Some(list)
}

/// An empty list in enforcing mode drops every client. Where that includes
/// the operator's own way in (host scope, or SSH's port protected), it is an
/// error unless `filter.allow_empty` says it is meant; elsewhere a warning.
fn inspect_empty_list(
    report: &mut Report,
    config: &Config,
    list_path: &Path,
    seed: &str,
    at: &dyn Fn(&str) -> String,
) {
    const SSH_PORT: u16 = 22;
    let ports = config.protected_ports();
    let lockout = match config.filter.scope {
        Scope::Host => Some(
            "`scope = \"host\"` drops every inbound packet from an unlisted source, SSH included",
        ),
        Scope::Ports if ports.contains(&SSH_PORT) => Some("port 22 (SSH) is protected"),
        Scope::Ports => None,
    };
    match lockout {
        Some(_) if config.filter.allow_empty => {}
        Some(why) => report.error(format!(
            "{}: {} is empty and {why}: starting would lock you out. Seed it first with \
             {seed}; or set `filter.audit = true` to watch before enforcing; or set \
             `filter.allow_empty = true` if an empty list is meant",
            at("filter.allow_empty"),
            list_path.display()
        )),
        None => {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            report.warning(format!(
                "allowlist {}: empty: every client of the protected ports ({}) is dropped \
                 until `edgegate allow add`; to seed it before the start: {seed}",
                list_path.display(),
                ports.join(", ")
            ));
        }
    }
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
mod tests;
