//! `status`: the daemon's mode, interfaces, lists, counters and busiest
//! rules, as text or JSON.

use edgegate::{
    config::Scope,
    control::{Request, Response},
    status::Status,
};
use proxy_common::Framing;

use super::{args::Global, ask::ask};

pub fn status(global: &Global, json: bool, top: usize, dropped: bool) -> anyhow::Result<()> {
    let request =
        Request::Status { top_rules: top, dropped_sources: if dropped { top } else { 0 } };
    let status = ask(global, &request, |answer| match answer {
        Response::Status(status) => Some(status),
        _ => None,
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status, dropped);
    }
    Ok(())
}

fn print_status(status: &Status, dropped: bool) {
    if status.audit {
        println!(
            "mode:       AUDIT: nothing is dropped; packets the list would drop are counted as \
             would_drop and passed (filter.audit = true)"
        );
    } else {
        println!("mode:       enforcing");
    }
    println!("scope:      {}", status.scope);
    let ports: Vec<String> = status.protected_ports.iter().map(u16::to_string).collect();
    println!("protected:  ports {}", ports.join(", "));
    if status.scope == Scope::Ports {
        if status.tunnels.is_empty() {
            println!("tunnels:    none judged");
        } else {
            println!("tunnels:    {} (judged by their outer source)", status.tunnels);
        }
    }
    for attachment in &status.interfaces {
        let framing = match attachment.framing {
            Framing::Ethernet => "",
            Framing::Ip => ", layer 3: frames start with the IP header",
        };
        let how = if attachment.adopted { ", taken over from a previous daemon" } else { "" };
        println!("interface:  {} ({} mode{framing}{how})", attachment.interface, attachment.mode);
    }
    println!("allowlist:  {}", status.allowlist.display());
    let worker = &status.worker;
    let serving = match (worker.pid, &worker.down) {
        (Some(pid), _) => format!("worker pid {pid} (as `{}`)", worker.user),
        (None, down) => format!("NO WORKER ({})", down.as_deref().unwrap_or("unknown")),
    };
    println!(
        "processes:  gate pid {} (filter, maps, list); {serving}; {} restart(s)",
        status.gate_pid, worker.restarts
    );
    if let Some(sandbox) = &worker.sandbox {
        let on = |yes: bool| if yes { "yes" } else { "no" };
        let landlock = if sandbox.landlock_abi == 0 {
            "Landlock absent".to_owned()
        } else {
            format!(
                "Landlock ABI {}: no files {}, network restricted {}, scoped {}",
                sandbox.landlock_abi,
                on(sandbox.file_system_denied),
                on(sandbox.network_restricted),
                on(sandbox.scoped)
            )
        };
        println!(
            "sandbox:    no capabilities, no_new_privs, seccomp {}; {landlock}",
            on(sandbox.seccomp)
        );
    }
    let egress = &worker.egress;
    match &egress.unconfined_reason {
        None => println!(
            "egress:     only to {} (cgroup {}); {} connection(s) refused",
            egress.destinations.join(", "),
            egress.cgroup.as_deref().unwrap_or("?"),
            egress.refused
        ),
        Some(reason) => println!(
            "egress:     UNCONFINED: the worker may connect anywhere ({reason}; \
             daemon.allow_unconfined_egress = true)"
        ),
    }
    println!(
        "entries:    {} IPv4 ({} lookup), {} IPv6 ({} lookup); capacity {} per family",
        status.ipv4_entries,
        status.ipv4_lookup,
        status.ipv6_entries,
        status.ipv6_lookup,
        status.capacity_per_family
    );
    println!(
        "\n{:<7} {:<10} {:<20} {:>14} {:>16}",
        "family", "verdict", "reason", "packets", "bytes"
    );
    for counter in status.counters.iter().filter(|c| c.packets > 0) {
        println!(
            "{:<7} {:<10} {:<20} {:>14} {:>16}",
            counter.family, counter.verdict, counter.reason, counter.packets, counter.bytes
        );
    }
    if let Some(fleet) = &status.fleet {
        let current = fleet.current_generation.map_or_else(|| "none yet".into(), |g| g.to_string());
        println!(
            "fleet:      group {} as {}: generation {} in force (etcd's: {current})",
            fleet.group, fleet.host, fleet.applied_generation
        );
        match fleet.staleness() {
            Some(stale) => println!("            STALE: {stale}"),
            None => println!("            connected to etcd"),
        }
        if let Some(error) = &fleet.last_error {
            println!("            last error: {error}");
        }
        if let Some(refusal) = &fleet.last_refusal {
            println!("            REFUSING etcd's list: {refusal}");
        }
        if !fleet.refusals.is_empty() {
            let counts: Vec<String> =
                fleet.refusals.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
            println!("            refused generations: {}", counts.join(", "));
        }
        match fleet.trust_warning() {
            Some(warning) => println!("            WARNING: {warning}"),
            None => println!(
                "            generations need a signature by a trusted key ({})",
                fleet.trusted_keys.join(", ")
            ),
        }
    }
    for listener in &status.listeners {
        let rejected: Vec<String> =
            listener.rejected.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        println!(
            "\nlistener {} on {} → {}: {} active, {} handshakes ok, rejected: {}",
            listener.name,
            listener.bind,
            listener.backend,
            listener.active,
            listener.handshakes_ok,
            if rejected.is_empty() { "none".to_owned() } else { rejected.join(", ") }
        );
    }
    if !status.top_rules.is_empty() {
        println!("\nbusiest rules:");
        for rule in &status.top_rules {
            println!("  {:<5} {:<43} {:>14} hits", rule.action, rule.cidr, rule.hits);
        }
    }
    if dropped {
        print_dropped_sources(status);
    }
}

fn print_dropped_sources(status: &Status) {
    let verb = if status.audit { "would-be dropped" } else { "dropped" };
    if status.dropped_sources.is_empty() {
        println!(
            "
no {verb} sources sampled"
        );
        return;
    }
    let now_ms = edgegate::clock::unix_ms();
    let ago = |ms: u64| format!("{}s ago", now_ms.saturating_sub(ms) / 1000);
    println!(
        "
sources {verb} most (sampled; counts are estimates under floods):"
    );
    println!("  {:<40} {:<9} {:>14} {:>12} {:>12}", "source", "reason", "packets", "first", "last");
    for source in &status.dropped_sources {
        println!(
            "  {:<40} {:<9} {:>14} {:>12} {:>12}",
            source.source,
            source.reason,
            source.packets,
            ago(source.first_seen_ms),
            ago(source.last_seen_ms)
        );
    }
}
