//! `[metrics] bind`: an HTTP endpoint for Prometheus and load-balancer health
//! checks.
//!
//! - `/metrics`: Prometheus text format (via `prometheus-client`), built from
//!   an observation of the daemon taken after the request arrived (or, while
//!   the daemon is busy, the newest one there is: a scrape never waits more
//!   than a fraction of a second), so there is no second set of counters to
//!   keep in step;
//! - `/healthz`: 200 while the process serves HTTP at all;
//! - `/readyz`: 200 when XDP is attached on every configured interface and
//!   every listener accepts; 503 with the reason otherwise. Point an NLB
//!   target group's HTTP health check here.
//!
//! Hardened for a port other hosts may reach: at most 64 connections at
//! once, 5 s to send a request's headers, and (`accept_proxy_protocol`) a
//! PROXY header in front of a request is read and ignored.

use std::{convert::Infallible, future::Future, pin::Pin, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{
    accept::accept_loop,
    config::ProxyProtocol,
    proxy::proxy_protocol,
    status::{FleetStatus, NotReady, Observation},
};

/// The daemon's newest observation (or why none could be taken). The daemon
/// bounds how long this waits (a fraction of a second) and lets one caller
/// at a time refresh it, so no number of probes can slow a change down.
pub type Observe = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Arc<Result<Observation, NotReady>>> + Send>>
        + Send
        + Sync,
>;

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send a request's headers (a PROXY header too).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Serves until the task is dropped. With `accept_proxy_header`, a
/// connection may start with a PROXY v1/v2 header (an NLB target group with
/// proxy protocol on sends one on its health checks too): it is read and
/// ignored.
pub async fn serve(listener: TcpListener, observe: Observe, accept_proxy_header: bool) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let handle = |(stream, _): (TcpStream, _)| {
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("metrics: {MAX_CONNECTIONS} connections already; closing a new one");
            return;
        };
        let observe = Arc::clone(&observe);
        tokio::spawn(async move {
            let _slot = slot;
            let served = tokio::time::timeout(
                CONNECTION_LIFETIME,
                serve_connection(stream, observe, accept_proxy_header),
            );
            if let Ok(Err(e)) = served.await {
                tracing::debug!("metrics connection: {e}");
            }
        });
    };
    accept_loop("metrics", || listener.accept(), handle).await;
}

async fn serve_connection(
    stream: TcpStream,
    observe: Observe,
    accept_proxy_header: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let stream = if accept_proxy_header
        && tokio::time::timeout(HEADER_TIMEOUT, starts_with_proxy_header(&stream)).await??
    {
        let reading = proxy_protocol::read_header(stream, ProxyProtocol::Any);
        tokio::time::timeout(HEADER_TIMEOUT, reading).await??.1
    } else {
        proxy_protocol::Prefixed::plain(stream)
    };
    let service = service_fn(move |request| {
        let observe = Arc::clone(&observe);
        async move {
            // `/healthz` answers without the daemon's state.
            let observation = match request.uri().path() {
                "/healthz" => Arc::new(Err(NotReady::Unobservable { reason: String::new() })),
                _ => observe().await,
            };
            Ok::<_, Infallible>(respond(&request, &observation))
        }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}

/// Whether the connection starts with a PROXY header (v2's 12-byte
/// signature, or v1's `PROXY `): no HTTP request starts like either.
async fn starts_with_proxy_header(stream: &TcpStream) -> std::io::Result<bool> {
    const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    const V1: &[u8] = b"PROXY ";
    let mut first = [0u8; 12];
    loop {
        let seen = stream.peek(&mut first).await?;
        if seen == 0 {
            return Ok(false);
        }
        let seen = &first[..seen];
        let could_be =
            |signature: &[u8]| signature.starts_with(&seen[..seen.len().min(signature.len())]);
        if seen.starts_with(V2) || seen.starts_with(V1) {
            return Ok(true);
        }
        if !could_be(V2) && !could_be(V1) {
            return Ok(false);
        }
        // A signature's beginning: wait for the rest (bounded by the caller).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn respond(
    request: &Request<hyper::body::Incoming>,
    observation: &Result<Observation, NotReady>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    match request.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        // Stale fleet data is still ready: the host filters with the last
        // list it knew. The body says how stale.
        "/readyz" => match observation
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|o| o.ready.clone().map(|()| o.status.fleet.as_ref()))
        {
            Ok(fleet) => {
                let mut body = String::from("ready");
                if let Some(fleet) = fleet {
                    if let Some(stale) = fleet.staleness() {
                        body += &format!("; stale: {stale}");
                        if let Some(error) = &fleet.last_error {
                            body += &format!(" ({error})");
                        }
                    }
                    if let Some(refusal) = &fleet.last_refusal {
                        body += &format!("; refusing etcd's list: {refusal}");
                    }
                }
                reply(StatusCode::OK, "text/plain", body + "\n")
            }
            Err(reason) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        "/metrics" => match observation {
            Ok(observation) => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                render(observation),
            ),
            Err(reason) => {
                reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{reason}\n"))
            }
        },
        _ => {
            reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n".into())
        }
    }
}

type Labels = Vec<(&'static str, String)>;

fn counters(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauges(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The observation in the Prometheus/OpenMetrics text format.
pub fn render(observation: &Observation) -> String {
    let status = &observation.status;
    let mut registry = Registry::with_prefix("edgegate");

    let packets = counters(&mut registry, "xdp_packets", "Packets seen by the XDP program");
    let bytes = counters(&mut registry, "xdp_bytes", "Bytes seen by the XDP program");
    for counter in &status.counters {
        let labels = vec![
            ("family", counter.family.name().to_owned()),
            ("verdict", counter.verdict.name().to_owned()),
            ("reason", counter.reason.name().to_owned()),
        ];
        packets.get_or_create(&labels).inc_by(counter.packets);
        bytes.get_or_create(&labels).inc_by(counter.bytes);
    }
    let attached =
        gauges(&mut registry, "xdp_attached", "XDP program attached (by interface and mode)");
    for attachment in &status.interfaces {
        let labels = vec![
            ("interface", attachment.interface.clone()),
            ("mode", attachment.mode.to_string()),
        ];
        attached.get_or_create(&labels).set(1);
    }
    let entries = gauges(&mut registry, "allowlist_entries", "Allowlist entries by address family");
    entries
        .get_or_create(&vec![("family", "ipv4".into())])
        .set(gauge_value(status.ipv4_entries as u64));
    entries
        .get_or_create(&vec![("family", "ipv6".into())])
        .set(gauge_value(status.ipv6_entries as u64));
    let hits = counters(&mut registry, "rule_hits", "Packets matched, for the busiest rules");
    for rule in &status.top_rules {
        let labels = vec![("cidr", rule.cidr.to_string()), ("action", rule.action.to_string())];
        hits.get_or_create(&labels).inc_by(rule.hits);
    }

    let handshakes = counters(&mut registry, "tls_handshakes", "Client connections by outcome");
    let active = gauges(&mut registry, "connections_active", "Open client connections");
    let relayed = counters(&mut registry, "relay_bytes", "Bytes relayed, by direction");
    let errors =
        counters(&mut registry, "relay_errors", "Connections ended by a backend or relay error");
    for listener in &status.listeners {
        let name = || ("listener", listener.name.clone());
        handshakes
            .get_or_create(&vec![name(), ("result", "ok".into())])
            .inc_by(listener.handshakes_ok);
        for (reason, count) in &listener.rejected {
            handshakes.get_or_create(&vec![name(), ("result", reason.clone())]).inc_by(*count);
        }
        active.get_or_create(&vec![name()]).set(gauge_value(listener.active));
        relayed
            .get_or_create(&vec![name(), ("direction", "from_client".into())])
            .inc_by(listener.bytes_from_clients);
        relayed
            .get_or_create(&vec![name(), ("direction", "to_client".into())])
            .inc_by(listener.bytes_to_clients);
        errors
            .get_or_create(&vec![name(), ("kind", "backend".into())])
            .inc_by(listener.backend_failures);
        errors.get_or_create(&vec![name(), ("kind", "relay".into())]).inc_by(listener.relay_errors);
    }
    let expiry = gauges(
        &mut registry,
        "certificate_expiry_seconds",
        "Seconds until the server certificate, the first client CA or the first CRL update \
         expires (negative: expired)",
    );
    let now = crate::clock::unix_seconds();
    for listener in &status.listeners {
        for lifetime in &listener.lifetimes {
            let labels = vec![
                ("listener", listener.name.clone()),
                ("kind", lifetime.kind.as_str().to_owned()),
            ];
            expiry.get_or_create(&labels).set(lifetime.not_after - now);
        }
    }

    let reloads =
        counters(&mut registry, "reloads", "Reloads (SIGHUP or `edgegate reload`) by outcome");
    reloads.get_or_create(&vec![("result", "ok".into())]).inc_by(observation.reloads_ok);
    reloads.get_or_create(&vec![("result", "failed".into())]).inc_by(observation.reloads_failed);
    let ready = gauges(&mut registry, "ready", "1 when /readyz answers 200");
    ready.get_or_create(&vec![]).set(i64::from(observation.ready.is_ok()));
    let worker = &status.worker;
    let restarts = counters(
        &mut registry,
        "worker_restarts",
        "Proxy workers started again after one died or misbehaved",
    );
    restarts.get_or_create(&vec![]).inc_by(worker.restarts);
    let up = gauges(&mut registry, "worker_up", "1 while a sandboxed proxy worker serves");
    up.get_or_create(&vec![]).set(i64::from(worker.pid.is_some()));
    let confined = gauges(
        &mut registry,
        "worker_egress_confined",
        "1 when the worker may connect only to its backends",
    );
    confined.get_or_create(&vec![]).set(i64::from(worker.egress.confined));
    let refused = counters(
        &mut registry,
        "worker_egress_refused",
        "Worker connections to a destination other than a backend, refused",
    );
    refused.get_or_create(&vec![]).inc_by(worker.egress.refused);
    if let Some(fleet) = &status.fleet {
        render_fleet(&mut registry, fleet, observation.fleet_propagation.clone());
    }
    let build = gauges(&mut registry, "build_info", "The running version");
    build.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").into())]).set(1);

    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

/// `edgegate_fleet_*`: the watch, the generations, and how fast they arrive.
fn render_fleet(registry: &mut Registry, fleet: &FleetStatus, propagation: Option<Histogram>) {
    let connected =
        gauges(registry, "fleet_connected", "1 while the watch on the group's list is up");
    connected.get_or_create(&vec![]).set(i64::from(fleet.connected));
    let generation =
        gauges(registry, "fleet_generation", "The group's generation: in force here, and in etcd");
    generation
        .get_or_create(&vec![("kind", "applied".into())])
        .set(gauge_value(fleet.applied_generation));
    if let Some(current) = fleet.current_generation {
        generation.get_or_create(&vec![("kind", "current".into())]).set(gauge_value(current));
    }
    if let Some(stale) = fleet.stale_seconds {
        let staleness = gauges(
            registry,
            "fleet_stale_seconds",
            "Seconds since etcd last answered (0 while connected)",
        );
        staleness.get_or_create(&vec![]).set(stale as i64);
    }
    let restarts = counters(registry, "fleet_watch_restarts", "Watch restarts, by reason");
    for (reason, count) in &fleet.watch_restarts {
        restarts.get_or_create(&vec![("reason", reason.clone())]).inc_by(*count);
    }
    let resyncs = counters(
        registry,
        "fleet_resyncs",
        "Newer generations found by re-reading, not by the watch",
    );
    resyncs.get_or_create(&vec![]).inc_by(fleet.resyncs);
    let errors =
        counters(registry, "fleet_apply_errors", "Generations refused or not applied here");
    errors.get_or_create(&vec![]).inc_by(fleet.apply_errors);
    let refusals = counters(
        registry,
        "fleet_refusals",
        "Generations in etcd refused here, by reason (unsigned, untrusted_key, rollback, …)",
    );
    for (reason, count) in &fleet.refusals {
        refusals.get_or_create(&vec![("reason", reason.clone())]).inc_by(*count);
    }
    let signed = gauges(
        registry,
        "fleet_signatures_required",
        "1 when generations need a signature by a trusted key; 0: any etcd writer decides",
    );
    signed.get_or_create(&vec![]).set(i64::from(!fleet.trusted_keys.is_empty()));
    let follower = counters(
        registry,
        "fleet_follower_restarts",
        "Times the follower of the group's list stopped and was started again",
    );
    follower.get_or_create(&vec![]).inc_by(fleet.follower_restarts);
    if let Some(histogram) = propagation {
        registry.register(
            "fleet_propagation_seconds",
            "From a commit (the writer's clock) to its enforcement here",
            histogram,
        );
    }
}

#[cfg(test)]
mod tests;
