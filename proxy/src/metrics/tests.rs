//! `/metrics` as rendered from an observation: every metric with its labels,
//! fleet metrics in fleet mode only, and readiness.

use proxy_common::{Family, Lookup, Reason};

use super::*;
use crate::{
    allowlist::Action,
    clock::unix_seconds,
    config::Scope,
    status::{AttachedMode, Attachment, CounterSnapshot, ListenerStatus, RuleHits, Status},
    tls::{Lifetime, LifetimeKind},
};

fn observation(ready: Result<(), NotReady>) -> Observation {
    let listener = ListenerStatus {
        name: "edge".into(),
        bind: "0.0.0.0:8443".parse().unwrap(),
        backend: "127.0.0.1:8080".into(),
        active: 2,
        handshakes_ok: 7,
        rejected: [("unknown_ca".to_owned(), 3)].into(),
        bytes_from_clients: 100,
        bytes_to_clients: 200,
        backend_failures: 1,
        relay_errors: 0,
        lifetimes: vec![Lifetime {
            kind: LifetimeKind::Server,
            path: "/etc/edgegate/server.pem".into(),
            subject: "CN=edge".into(),
            not_before: 0,
            not_after: unix_seconds() + 86_400,
        }],
    };
    Observation {
        status: Status {
            audit: false,
            dropped_sources: Vec::new(),
            interfaces: vec![Attachment {
                interface: "eth0".into(),
                mode: AttachedMode::Native,
                framing: proxy_common::Framing::Ethernet,
                adopted: false,
            }],
            scope: Scope::Ports,
            protected_ports: [8443].into(),
            tunnels: crate::config::Tunnels::default(),
            allowlist: "/var/lib/edgegate/allowlist".into(),
            ipv4_entries: 4,
            ipv6_entries: 1,
            ipv4_lookup: Lookup::PerLength,
            ipv6_lookup: Lookup::Trie,
            capacity_per_family: 1024,
            counters: vec![CounterSnapshot {
                family: Family::Ipv4,
                reason: Reason::Unlisted,
                verdict: Reason::Unlisted.verdict(),
                packets: 5,
                bytes: 300,
            }],
            top_rules: vec![RuleHits {
                cidr: "203.0.113.0/24".parse().unwrap(),
                action: Action::Allow,
                hits: 9,
            }],
            listeners: vec![listener],
            fleet: None,
            gate_pid: 1,
            worker: crate::status::WorkerStatus {
                pid: Some(2),
                user: "edgegate".into(),
                down: None,
                restarts: 3,
                sandbox: None,
                egress: crate::status::EgressStatus {
                    confined: true,
                    cgroup: Some("/edgegate-worker.1".into()),
                    destinations: vec!["127.0.0.1:8080".into()],
                    refused: 4,
                    unconfined_reason: None,
                },
            },
        },
        ready,
        reloads_ok: 2,
        reloads_failed: 1,
        fleet_propagation: None,
    }
}

/// The sample lines of `text` (no comments), to compare exactly.
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

#[test]
fn every_metric_is_rendered_with_its_labels() {
    let text = render(&observation(Ok(())));
    let samples = samples(&text);
    for expected in [
        "edgegate_xdp_packets_total{family=\"ipv4\",verdict=\"drop\",reason=\"unlisted\"} 5",
        "edgegate_xdp_bytes_total{family=\"ipv4\",verdict=\"drop\",reason=\"unlisted\"} 300",
        "edgegate_xdp_attached{interface=\"eth0\",mode=\"native\"} 1",
        "edgegate_allowlist_entries{family=\"ipv4\"} 4",
        "edgegate_allowlist_entries{family=\"ipv6\"} 1",
        "edgegate_rule_hits_total{cidr=\"203.0.113.0/24\",action=\"allow\"} 9",
        "edgegate_tls_handshakes_total{listener=\"edge\",result=\"ok\"} 7",
        "edgegate_tls_handshakes_total{listener=\"edge\",result=\"unknown_ca\"} 3",
        "edgegate_connections_active{listener=\"edge\"} 2",
        "edgegate_relay_bytes_total{listener=\"edge\",direction=\"from_client\"} 100",
        "edgegate_relay_bytes_total{listener=\"edge\",direction=\"to_client\"} 200",
        "edgegate_relay_errors_total{listener=\"edge\",kind=\"backend\"} 1",
        "edgegate_reloads_total{result=\"ok\"} 2",
        "edgegate_reloads_total{result=\"failed\"} 1",
        "edgegate_ready 1",
        "edgegate_worker_restarts_total 3",
        "edgegate_worker_egress_confined 1",
        "edgegate_worker_egress_refused_total 4",
        "edgegate_worker_up 1",
    ] {
        assert!(samples.contains(&expected), "missing {expected} in:\n{text}");
    }
    let expiry = samples
        .iter()
        .find(|l| {
            l.starts_with("edgegate_certificate_expiry_seconds{listener=\"edge\",kind=\"server\"}")
        })
        .unwrap_or_else(|| panic!("no expiry in:\n{text}"));
    let seconds: i64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((86_390..=86_400).contains(&seconds), "{expiry}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
}

#[test]
fn fleet_metrics_are_rendered_in_fleet_mode_only() {
    assert!(!render(&observation(Ok(()))).contains("edgegate_fleet"));
    let mut observation = observation(Ok(()));
    observation.status.fleet = Some(crate::status::FleetStatus {
        group: "g".into(),
        host: "h".into(),
        connected: false,
        applied_generation: 41,
        applied_entries: 5,
        applied_at_ms: Some(1),
        current_generation: Some(42),
        stale_seconds: Some(12.5),
        watch_restarts: [("compacted".to_owned(), 2)].into(),
        resyncs: 1,
        apply_errors: 3,
        last_error: None,
        refusals: [("unsigned".to_owned(), 2)].into(),
        last_refusal: Some("generation 43: unsigned".into()),
        trusted_keys: vec!["0011223344556677".into()],
        follower_restarts: 1,
    });
    let histogram = Histogram::new([0.01, 0.1]);
    histogram.observe(0.004);
    observation.fleet_propagation = Some(histogram);
    let text = render(&observation);
    let samples = samples(&text);
    for expected in [
        "edgegate_fleet_connected 0",
        "edgegate_fleet_generation{kind=\"applied\"} 41",
        "edgegate_fleet_generation{kind=\"current\"} 42",
        "edgegate_fleet_stale_seconds 12",
        "edgegate_fleet_watch_restarts_total{reason=\"compacted\"} 2",
        "edgegate_fleet_resyncs_total 1",
        "edgegate_fleet_apply_errors_total 3",
        "edgegate_fleet_refusals_total{reason=\"unsigned\"} 2",
        "edgegate_fleet_signatures_required 1",
        "edgegate_fleet_follower_restarts_total 1",
        "edgegate_fleet_propagation_seconds_bucket{le=\"0.01\"} 1",
        "edgegate_fleet_propagation_seconds_count 1",
    ] {
        assert!(samples.contains(&expected), "missing {expected} in:\n{text}");
    }
}

#[test]
fn not_ready_shows_as_zero() {
    let text = render(&observation(Err(NotReady::Gone { interface: "eth0".into() })));
    assert!(samples(&text).contains(&"edgegate_ready 0"), "{text}");
}
