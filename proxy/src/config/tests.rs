//! The config file's schema, defaults, validation and messages, case by case.

use std::{path::Path, time::Duration};

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("edgegate.toml"), &Overrides::default())
}

#[test]
fn minimal_config_gets_defaults() {
    let config = parse("[filter]\ninterfaces = [\"eth0\"]\nports = [8443]\n").unwrap();
    assert_eq!(config.filter.mode, AttachMode::Auto);
    assert_eq!(config.filter.scope, Scope::Ports);
    assert_eq!(config.allowlist_path(), Path::new("/var/lib/edgegate/allowlist"));
    assert_eq!(config.daemon.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
    assert_eq!(config.daemon.drain_timeout, Duration::from_secs(30));
    assert_eq!(config.tunnels(), Tunnels::standard());
    assert_eq!(config.tunnels().to_string(), "ipip, sit, gre, UDP ports 4789, 6081, 8472");
}

#[test]
fn tunnels_can_be_narrowed_or_turned_off() {
    let base = "[filter]\ninterfaces = [\"eth0\"]\nports = [8443]\n";
    let config =
        parse(&format!("{base}tunnel_protocols = [\"gre\"]\ntunnel_ports = [4789]\n")).unwrap();
    assert_eq!(config.tunnels().to_string(), "gre, UDP ports 4789");
    let config = parse(&format!("{base}tunnel_protocols = []\ntunnel_ports = []\n")).unwrap();
    assert_eq!(config.tunnels().to_string(), "none");
    let error = parse(&format!("{base}tunnel_protocols = [\"esp\"]\n")).unwrap_err();
    assert!(error.to_string().contains("unknown variant `esp`"), "{error}");
}

#[test]
fn overrides_win_and_move_the_default_allowlist() {
    let overrides = Overrides { state_dir: Some("/tmp/eg".into()), ..Overrides::default() };
    let config = Config::parse(
        "[filter]\ninterfaces = [\"eth0\"]\nscope = \"host\"\n",
        Path::new("x.toml"),
        &overrides,
    )
    .unwrap();
    assert_eq!(config.allowlist_path(), Path::new("/tmp/eg/allowlist"));
}

#[test]
fn a_fleet_table_gets_defaults() {
    let config = parse(
        "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[fleet]\n\
         endpoints = [\"http://127.0.0.1:2379\"]\ngroup = \"partner-gate\"\n",
    )
    .unwrap();
    let fleet = config.fleet.expect("fleet mode");
    assert_eq!(fleet.prefix, "/edgegate");
    assert_eq!(fleet.resync_interval, Duration::from_secs(60));
    assert_eq!(fleet.host_id, None);
    assert!(fleet.trusted_keys.is_empty() && !fleet.insecure_plaintext);
}

/// Plaintext only on loopback, or when the config accepts the risk by name.
#[test]
fn plaintext_etcd_beyond_loopback_needs_consent() {
    let fleet = |endpoint: &str, extra: &str| {
        parse(&format!(
            "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[fleet]\n\
             endpoints = [\"{endpoint}\"]\ngroup = \"g\"\n{extra}"
        ))
    };
    for loopback in [
        "http://127.0.0.1:2379",
        "http://127.9.0.1:2379",
        "http://[::1]:2379",
        "http://localhost:2379",
    ] {
        assert!(fleet(loopback, "").is_ok(), "{loopback}");
    }
    let error = fleet("http://10.0.1.10:2379", "").expect_err("plaintext").to_string();
    assert!(error.contains("insecure_plaintext") && error.contains("https://"), "{error}");
    assert!(fleet("http://10.0.1.10:2379", "insecure_plaintext = true").is_ok());
}

#[test]
fn trusted_keys_must_be_ed25519_public_keys() {
    let text = |key: &str| {
        format!(
            "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[fleet]\n\
             endpoints = [\"http://127.0.0.1:2379\"]\ngroup = \"g\"\ntrusted_keys = [\"{key}\"]\n"
        )
    };
    let good = format!("ed25519:{}", "A".repeat(43) + "=");
    let config = parse(&text(&good)).expect("a key");
    assert!(config.fleet.expect("fleet").trusted_keys().expect("parses").required());
    let error = parse(&text("ssh-ed25519 AAAA")).expect_err("not a key").to_string();
    assert!(error.contains("`fleet.trusted_keys`") && error.contains("fleet keygen"), "{error}");
}

#[test]
fn an_admin_file_needs_only_a_fleet_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("admin.toml");
    std::fs::write(
        &path,
        "[fleet]\nendpoints = [\"https://10.0.1.10:2379\"]\ngroup = \"g\"\nca = \"/ca\"\n",
    )
    .expect("write");
    let (fleet, capacity) = load_fleet(&path).expect("admin file");
    assert_eq!((fleet.group.as_str(), capacity), ("g", DEFAULT_MAX_ENTRIES));
    std::fs::write(&path, "[filter]\ninterfaces = [\"eth0\"]\n").expect("write");
    let error = load_fleet(&path).expect_err("no fleet").to_string();
    assert!(error.contains("`fleet`"), "{error}");
}

/// Every `[fleet]` mistake, each named by its key.
#[test]
fn fleet_mistakes_are_refused_by_key() {
    let cases = [
        ("endpoints = []\ngroup = \"g\"", "fleet.endpoints"),
        ("endpoints = [\"10.0.1.10:2379\"]\ngroup = \"g\"", "fleet.endpoints"),
        ("endpoints = [\"http://10.0.1.10\"]\ngroup = \"g\"", "fleet.endpoints"),
        ("endpoints = [\"ftp://a:1\"]\ngroup = \"g\"", "fleet.endpoints"),
        (
            "endpoints = [\"http://a:1\", \"https://b:1\"]\ngroup = \"g\"\nca = \"/ca\"",
            "fleet.endpoints",
        ),
        ("endpoints = [\"https://a:1\"]\ngroup = \"g\"", "fleet.ca"),
        ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\nca = \"/ca\"", "fleet.endpoints"),
        ("endpoints = [\"https://a:1\"]\ngroup = \"g\"\nca = \"/ca\"\ncert = \"/c\"", "fleet.cert"),
        ("endpoints = [\"http://a:1\"]\ngroup = \"a/b\"", "fleet.group"),
        ("endpoints = [\"http://a:1\"]\ngroup = \"\"", "fleet.group"),
        ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\nhost_id = \"x y\"", "fleet.host_id"),
        ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\nprefix = \"edgegate\"", "fleet.prefix"),
        ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\nprefix = \"/e/\"", "fleet.prefix"),
        ("endpoints = [\"http://a:1\"]\ngroup = \"g\"\ntimeout = \"0s\"", "fleet.timeout"),
    ];
    for (fleet, key) in cases {
        let text = format!("[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[fleet]\n{fleet}\n");
        let error = parse(&text).expect_err(fleet).to_string();
        assert!(error.contains(&format!("`{key}`")), "{fleet}: {error}");
    }
}

#[test]
fn errors_name_file_and_key() {
    let cases = [
        ("[filter]\ninterfaces = []\nports = [1]\n", "filter.interfaces"),
        ("[filter]\ninterfaces = [\"eth0\"]\n", "filter.ports"),
        ("[filter]\ninterfaces = [\"eth0\"]\nports = [0]\n", "filter.ports"),
        ("[filter]\ninterfaces = [\"a/b\"]\nports = [1]\n", "filter.interfaces"),
        (
            "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\ntunnel_ports = [0]\n",
            "filter.tunnel_ports",
        ),
        ("[filter]\ninterfaces = [\"eth0\", \"eth0\"]\nports = [1]\n", "filter.interfaces"),
        (
            "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\ntunnel_ports = [1,2,3,4,5,6,7,8,9]\n",
            "filter.tunnel_ports",
        ),
    ];
    let listener_cases = [
        ("proxy_protocol = \"v2\"", "listener.edge.trusted_proxies"),
        ("allow_cn = [\"partner-[\"]", "listener.edge.allow_cn"),
        ("handshake_timeout = \"0s\"", "listener.edge.handshake_timeout"),
        ("max_connections = 0", "listener.edge.max_connections"),
        ("session_lifetime = \"8d\"", "listener.edge.session_lifetime"),
        ("session_lifetime = \"0s\"\ntls_ticket_keys = \"keys\"", "listener.edge.tls_ticket_keys"),
        (
            "[listener.backend_tls]\nca = \"ca.pem\"\nserver_name = \"db\"\ncert = \"c.pem\"",
            "listener.edge.backend_tls",
        ),
    ];
    let listener_texts: Vec<(String, &str)> = listener_cases
        .iter()
        .map(|(extra, key)| {
            (
                format!("[filter]\ninterfaces = [\"eth0\"]\n{}{extra}\n", listener("edge", 8443)),
                *key,
            )
        })
        .chain([(
            format!(
                "[filter]\ninterfaces = [\"eth0\"]\n{}{}",
                listener("edge", 8443),
                listener("edge", 8444)
            ),
            "listener.name",
        )])
        .chain([(
            format!(
                "[filter]\ninterfaces = [\"eth0\"]\n{}{}",
                listener("a", 8443),
                listener("b", 8443)
            ),
            "listener.b.bind",
        )])
        .collect();
    let cases = cases.iter().map(|(t, k)| ((*t).to_owned(), *k)).chain(listener_texts);
    for (text, key) in cases {
        let err = parse(&text).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { problems, .. } if problems.len() == 1 && problems[0].key == key),
            "{text}: {err}"
        );
        assert!(err.to_string().starts_with("config edgegate.toml: "), "{err}");
    }
}

fn listener(name: &str, port: u16) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"0.0.0.0:{port}\"\nbackend = \"127.0.0.1:8080\"\n\
         cert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n"
    )
}

#[test]
fn listeners_whose_binds_overlap_are_refused() {
    let base = "[filter]\ninterfaces = [\"eth0\"]\n";
    let loopback = listener("second", 8443).replace("0.0.0.0:8443", "127.0.0.1:8443");
    for second in [listener("second", 8443), loopback.clone()] {
        let text = format!("{base}{}{second}", listener("edge", 8443));
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("`listener.second.bind`"), "{error}");
        assert!(error.contains("overlaps another listener's 0.0.0.0:8443"), "{error}");
    }
    let other_port = format!("{base}{}{}", listener("edge", 8443), listener("second", 8444));
    parse(&other_port).expect("different ports");
    let ipv6 = listener("second", 8443).replace("0.0.0.0:8443", "[::1]:8443");
    parse(&format!("{base}{}{ipv6}", listener("edge", 8443))).expect("the other family");
    // `[::]` is dual-stack: it takes IPv4's 0.0.0.0 too.
    let dual = listener("second", 8443).replace("0.0.0.0:8443", "[::]:8443");
    let error = parse(&format!("{base}{}{dual}", listener("edge", 8443))).unwrap_err();
    assert!(error.to_string().contains("`listener.second.bind`"), "{error}");
}

#[test]
fn listeners_get_defaults_and_protect_their_ports() {
    let text =
        format!("[filter]\ninterfaces = [\"eth0\"]\nports = [22]\n{}", listener("edge", 8443));
    let config = parse(&text).unwrap();
    let edge = &config.listeners[0];
    assert_eq!(edge.handshake_timeout, Duration::from_secs(10));
    assert_eq!(edge.connect_timeout, Duration::from_secs(5));
    assert_eq!(edge.idle_timeout, Duration::from_secs(3600));
    assert_eq!(edge.max_connections, 10_000);
    assert_eq!(edge.min_tls_version, TlsVersion::Tls12);
    assert_eq!(edge.proxy_protocol, ProxyProtocol::Off);
    assert_eq!(config.protected_ports(), BTreeSet::from([22, 8443]));
}

#[test]
fn a_metrics_port_other_hosts_can_reach_is_protected() {
    let with_metrics = |bind: &str| {
        parse(&format!(
            "[filter]\ninterfaces = [\"eth0\"]\nports = [8443]\n[metrics]\nbind = \"{bind}\"\n"
        ))
    };
    for (bind, protected) in [
        ("127.0.0.1:9901", BTreeSet::from([8443])),
        ("[::1]:9901", BTreeSet::from([8443])),
        ("0.0.0.0:9901", BTreeSet::from([8443, 9901])),
        ("[::]:9901", BTreeSet::from([8443, 9901])),
        ("10.0.1.5:9902", BTreeSet::from([8443, 9902])),
    ] {
        assert_eq!(with_metrics(bind).unwrap().protected_ports(), protected, "{bind}");
    }
    let err = with_metrics("0.0.0.0:0").unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { problems, .. } if problems[0].key == "metrics.bind"),
        "{err}"
    );
    assert!(with_metrics("127.0.0.1:0").is_ok(), "loopback needs no protection");
}

#[test]
fn durations_say_the_accepted_format() {
    let err = parse(&format!(
        "[filter]\ninterfaces = [\"eth0\"]\n{}idle_timeout = \"10\"\n",
        listener("edge", 8443)
    ))
    .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { .. }));
    assert!(
        message.contains("`10` is not a duration") && message.contains("\"10s\", \"5m\" or \"1h\""),
        "{message}"
    );
}

#[test]
fn every_unusable_value_is_reported_not_just_the_first() {
    let text = format!(
        "[filter]\ninterfaces = [\"a/b\"]\nports = [0]\nmax_entries = 0\n[metrics]\nbind = \"0.0.0.0:8443\"\n{}max_connections = 0\n",
        listener("edge", 8443)
    );
    let Err(ConfigError::Invalid { problems, .. }) = parse(&text) else {
        panic!("refused as invalid");
    };
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "listener.edge.max_connections",
            "filter.interfaces",
            "filter.ports",
            "metrics.bind",
            "filter.max_entries"
        ]
    );
}

#[test]
fn syntax_errors_point_at_the_key() {
    let err = parse("[filter]\ninterfaces = [\"eth0\"]\nmode = \"turbo\"\n").unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { .. }));
    assert!(message.contains("line 3") && message.contains("turbo"), "{message}");
    let err = parse("[filter]\ninterfaces = [\"eth0\"]\nport = [1]\n").unwrap_err();
    assert!(err.to_string().contains("unknown field `port`"), "{err}");
}

/// toml says "invalid type: map, expected a sequence" of a header with
/// the wrong brackets; the message says which brackets to write.
#[test]
fn table_headers_with_the_wrong_brackets_say_which_to_write() {
    let base = "[filter]\ninterfaces = [\"eth0\"]\n";
    let single = format!("{base}{}", listener("edge", 8443).replace("[[listener]]", "[listener]"));
    let double = base.replace("[filter]", "[[filter]]");
    let cases = [
        (single, "line 3: `[listener]` makes one table", "write `[[listener]]`"),
        (double, "line 1: `[[filter]]` starts a list of tables", "write `[filter]`"),
    ];
    for (text, cause, fix) in cases {
        let message = parse(&text).unwrap_err().to_string();
        assert!(message.contains("edgegate.toml"), "{message}");
        assert!(message.contains(cause) && message.contains(fix), "{message}");
        assert!(!message.contains("invalid type"), "{message}");
    }
    // Other type errors keep toml's own text.
    let err = parse(&format!("{base}ports = 22\n")).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
}
