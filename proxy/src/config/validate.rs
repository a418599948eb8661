//! What serde cannot check: uniqueness, coherence, patterns, binds that
//! clash, fleet URLs and names. Every problem is reported, not just the first.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use globset::Glob;

use super::{FleetConfig, ListenerConfig, MAX_SESSION_LIFETIME, ProxyProtocol, error::Invalid};

/// Whether two sockets would clash: the same port on the same address, or
/// on an address and the wildcard of its family.
pub(super) fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// Whether a socket bound to `wide` also takes `narrow`: an unspecified
/// address takes its family's addresses, and IPv6's (dual-stack, as the
/// listeners bind) IPv4's too.
fn covers(wide: IpAddr, narrow: IpAddr) -> bool {
    match wide {
        IpAddr::V4(wide) => wide.is_unspecified() && narrow.is_ipv4(),
        IpAddr::V6(wide) => wide.is_unspecified(),
    }
}

/// Checks `[fleet]`: usable URLs, one scheme, TLS files that belong together,
/// names that fit in an etcd key.
pub(super) fn validate_fleet(fleet: &FleetConfig) -> Vec<Invalid> {
    let mut problems = Vec::new();
    if fleet.endpoints.is_empty() {
        problems.push(Invalid::new(
            "fleet.endpoints",
            "name at least one etcd member, e.g. [\"https://10.0.1.10:2379\"]",
        ));
    }
    let mut schemes = BTreeSet::new();
    for endpoint in &fleet.endpoints {
        match endpoint.split_once("://") {
            Some((scheme @ ("http" | "https"), authority))
                if authority.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                }) =>
            {
                schemes.insert(scheme);
            }
            _ => problems.push(Invalid::new(
                "fleet.endpoints",
                format!("`{endpoint}` is not an etcd URL such as https://10.0.1.10:2379"),
            )),
        }
    }
    if schemes.len() > 1 {
        problems.push(Invalid::new(
            "fleet.endpoints",
            "mixes http:// and https://: use https:// for every member",
        ));
    }
    let tls = schemes.contains("https");
    if tls && fleet.ca.is_none() {
        problems.push(Invalid::new(
            "fleet.ca",
            "https:// endpoints need the CA that issued the members' certificates",
        ));
    }
    let beyond_loopback = |endpoint: &&String| {
        let host = endpoint
            .strip_prefix("http://")
            .and_then(|authority| authority.rsplit_once(':'))
            .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'));
        host.is_some_and(|host| {
            host != "localhost" && !host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        })
    };
    if let Some(endpoint) = fleet.endpoints.iter().find(beyond_loopback)
        && !fleet.insecure_plaintext
    {
        problems.push(Invalid::new(
            "fleet.endpoints",
            format!(
                "`{endpoint}` is plaintext beyond loopback: anyone on the path could read the \
                 credentials and change what every host enforces. Use https:// with `ca` (and \
                 `cert`/`key`), or set `insecure_plaintext = true` to accept that risk"
            ),
        ));
    }
    for key in &fleet.trusted_keys {
        if let Err(e) = key.parse::<crate::fleet::trust::PublicKey>() {
            problems.push(Invalid::new("fleet.trusted_keys", e.to_string()));
        }
    }
    if !tls && (fleet.ca.is_some() || fleet.cert.is_some()) {
        problems.push(Invalid::new(
            "fleet.endpoints",
            "`ca`/`cert` are set but the endpoints are http://: use https://",
        ));
    }
    if fleet.cert.is_some() != fleet.key.is_some() {
        problems.push(Invalid::new("fleet.cert", "`cert` and `key` go together"));
    }
    let key_safe = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !key_safe(&fleet.group) {
        problems.push(Invalid::new(
            "fleet.group",
            format!("`{}` must be letters, digits, `-`, `_` or `.`", fleet.group),
        ));
    }
    if let Some(host) = fleet.host_id.as_deref().filter(|h| !key_safe(h)) {
        problems.push(Invalid::new(
            "fleet.host_id",
            format!("`{host}` must be letters, digits, `-`, `_` or `.`"),
        ));
    }
    if !fleet.prefix.starts_with('/') || fleet.prefix.ends_with('/') && fleet.prefix.len() > 1 {
        problems.push(Invalid::new(
            "fleet.prefix",
            format!(
                "`{}` must start with `/` and not end with one, e.g. \"/edgegate\"",
                fleet.prefix
            ),
        ));
    }
    if fleet.timeout.is_zero() || fleet.resync_interval < Duration::from_secs(1) {
        problems.push(Invalid::new(
            "fleet.timeout",
            "`timeout` must be positive and `resync_interval` at least 1s",
        ));
    }
    problems
}

/// Checks what serde cannot: uniqueness, coherence, patterns. Keys are
/// `listener.<name>.<field>`.
pub(super) fn validate_listeners(listeners: &[ListenerConfig]) -> Vec<Invalid> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    let mut binds: Vec<SocketAddr> = Vec::new();
    for listener in listeners {
        let key = |field: &str| format!("listener.{}.{field}", listener.name);
        if listener.name.is_empty() || !names.insert(listener.name.as_str()) {
            problems.push(Invalid::new(
                "listener.name",
                format!("`{}` is empty or not unique", listener.name),
            ));
        }
        // `0.0.0.0:8443` also takes `127.0.0.1:8443`: the second bind fails.
        if let Some(other) = binds.iter().find(|&&bind| binds_overlap(bind, listener.bind)) {
            problems.push(Invalid::new(
                key("bind"),
                format!("{} overlaps another listener's {other}", listener.bind),
            ));
        }
        binds.push(listener.bind);
        if listener.bind.port() == 0 {
            problems.push(Invalid::new(key("bind"), "a listener needs a fixed port"));
        }
        if !listener.backend.contains(':') {
            problems.push(Invalid::new(
                key("backend"),
                format!("`{}` is not host:port", listener.backend),
            ));
        }
        for (field, patterns) in [
            ("allow_cn", &listener.allow_cn),
            ("allow_dns", &listener.allow_dns),
            ("allow_uri", &listener.allow_uri),
        ] {
            for error in patterns.iter().filter_map(|p| Glob::new(p).err()) {
                problems.push(Invalid::new(key(field), error.to_string()));
            }
        }
        if listener.proxy_protocol != ProxyProtocol::Off && listener.trusted_proxies.is_empty() {
            problems.push(Invalid::new(
                key("trusted_proxies"),
                "accepting PROXY headers needs the load balancer's addresses here; \
                 anyone else could claim any client address",
            ));
        }
        for (field, value) in [
            ("handshake_timeout", listener.handshake_timeout),
            ("connect_timeout", listener.connect_timeout),
            ("idle_timeout", listener.idle_timeout),
        ] {
            if value.is_zero() {
                problems.push(Invalid::new(key(field), "must be longer than 0s"));
            }
        }
        if listener.max_connections == 0 {
            problems.push(Invalid::new(key("max_connections"), "must be at least 1"));
        }
        if listener.session_lifetime > MAX_SESSION_LIFETIME {
            problems
                .push(Invalid::new(key("session_lifetime"), "must be at most 7 days (RFC 8446)"));
        }
        if listener.session_lifetime.is_zero() && listener.tls_ticket_keys.is_some() {
            problems.push(Invalid::new(
                key("tls_ticket_keys"),
                "session_lifetime = \"0s\" turns resumption off: remove one of the two",
            ));
        }
        if let Some(tls) = &listener.backend_tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            problems
                .push(Invalid::new(key("backend_tls"), "set both `cert` and `key`, or neither"));
        }
    }
    problems
}

pub(super) fn valid_interface_name(name: &str) -> bool {
    // IFNAMSIZ is 16 including the terminating NUL.
    !name.is_empty()
        && name.len() < 16
        && !name.contains(['/', ' ', '\0'])
        && name != "."
        && name != ".."
}
