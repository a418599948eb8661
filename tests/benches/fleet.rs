//! `cargo xtask bench fleet`: how fast a change made on one host of a fleet
//! is enforced on all of them, against a real 3-member etcd cluster.
//!
//! - propagation: from starting `edgegate allow add|del` on host 0 until a
//!   real TCP connection from the changed source succeeds (add) or is
//!   dropped (del) on all three hosts; p50/p99 over `--rounds` changes;
//! - the same with `--watchers` (default 50) extra followers of the group:
//!   the real sync loop (watch, fetch, verify) with an enforcer that only
//!   records the time, to show how fan-out grows;
//! - a 100k-entry `allow replace` (IPv4 and IPv6), from starting the CLI
//!   until every host's status says it enforces the new generation;
//! - the cost of signed generations: the same changes committed by one
//!   long-lived admin connection, unsigned (hosts without `trusted_keys`)
//!   and signed (hosts verifying the admin's Ed25519 signature), in
//!   alternating blocks of the same run.
//!
//! Anchor: an AWS security group rule change takes seconds to apply.
//! Results also go to `target/bench/fleet.json`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use edgegate::{
    allowlist::{Allowlist, Change, Diff},
    config::Config,
    fleet::{Admin, Authority, Credentials, Enforcer, Health, Store, follow, layout::Pointer},
};
use edgegate_tests::{
    bench::{percentile, print_heading, save},
    fleet::{ALLOWED, Fleet, HOSTS, stranger_alias},
};

/// A probe that has not connected within this long counts as dropped.
const PROBE_TIMEOUT: Duration = Duration::from_millis(5);

/// Records when each generation arrived.
struct Recorder(Mutex<Vec<(u64, Instant)>>);

impl Enforcer for Recorder {
    type Error = std::convert::Infallible;

    async fn enforce(&self, _: Allowlist, pointer: &Pointer) -> Result<Diff, Self::Error> {
        self.0.lock().expect("lock").push((pointer.generation, Instant::now()));
        Ok(Diff::default())
    }
}

fn main() {
    edgegate_tests::require_root();
    let (mut rounds, mut watchers) = (100usize, 50usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--watchers" => {
                watchers = args.next().and_then(|v| v.parse().ok()).expect("--watchers N");
            }
            "--bench" => {}
            other => panic!("unknown argument {other} (--rounds N, --watchers N)"),
        }
    }
    let aliases = 50;
    let fleet = Fleet::new(aliases);
    for host in 0..HOSTS {
        fleet.write_config(host, "");
    }
    fleet.start_daemons();
    fleet.cli_ok(0, &["allow", "add", &ALLOWED.to_string(), "--wait"]);

    let alone = propagation(&fleet, rounds, aliases, &[], &mut |source, adding| {
        cli(&fleet, source, adding)
    });
    let recorders = start_watchers(&fleet, watchers);
    let with_watchers =
        propagation(&fleet, rounds, aliases, &recorders.0, &mut |source, adding| {
            cli(&fleet, source, adding)
        });
    drop(recorders);
    let replace = big_replace(&fleet);
    // Twice the rounds, in eight alternating blocks: the two are compared
    // on the tail, which needs samples.
    let (unsigned, signed) = signing_cost(&fleet, 2 * rounds, aliases);

    print_heading("fleet");
    println!("3 hosts, 3-member etcd {}", edgegate_tests::bench::tool_version("etcd", "--version"));
    println!("\n| change → enforced on every host | p50 | p99 | max |");
    println!("|---|---|---|---|");
    let row = |name: &str, samples: &[f64]| {
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms |",
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            percentile(samples, 1.0)
        );
    };
    row(&format!("3 hosts ({} changes)", alone.len()), &alone);
    row(
        &format!("3 hosts + {watchers} watchers ({} changes)", with_watchers.len()),
        &with_watchers,
    );
    println!("\n100k-entry `allow replace` enforced on all 3 hosts: {replace:.2} s");
    println!("(anchor: an AWS security group change takes seconds)");
    println!("\n| one admin connection commits → enforced on every host | p50 | p99 | max |");
    println!("|---|---|---|---|");
    row(&format!("unsigned ({} changes)", unsigned.len()), &unsigned);
    row(&format!("signed, verified by every host ({} changes)", signed.len()), &signed);
    let (sign_us, verify_us) = signature_cost(&fleet);
    println!(
        "\nper generation: signing {sign_us:.1} µs (once, by the admin), verifying {verify_us:.1} µs (on each host)"
    );
    let ratio = |q| percentile(&signed, q) / percentile(&unsigned, q);
    println!(
        "\nsigned ÷ unsigned: p50 {:.3}, p99 {:.3} (target: within 10%, i.e. ≤ 1.10)",
        ratio(0.5),
        ratio(0.99)
    );
    save(
        "fleet",
        &serde_json::json!({
            "propagation_ms": { "p50": percentile(&alone, 0.5), "p99": percentile(&alone, 0.99) },
            "with_watchers": { "watchers": watchers, "p50": percentile(&with_watchers, 0.5), "p99": percentile(&with_watchers, 0.99) },
            "replace_100k_seconds": replace,
            "unsigned_ms": { "p50": percentile(&unsigned, 0.5), "p99": percentile(&unsigned, 0.99) },
            "signed_ms": { "p50": percentile(&signed, 0.5), "p99": percentile(&signed, 0.99) },
            "sign_us": sign_us,
            "verify_us": verify_us,
        }),
    );
}

/// Microseconds to sign and to verify one pointer (the median of 2000).
fn signature_cost(fleet: &Fleet) -> (f64, f64) {
    use edgegate::fleet::{
        layout::{Keys, Pointer},
        trust::{SigningKey, TrustedKeys},
    };
    let key = SigningKey::load(&fleet.signing_key).expect("signing key");
    let trusted = TrustedKeys::new(vec![key.public_key()]);
    let keys = Keys::new("/edgegate", "partner-gate");
    let mut pointer = Pointer {
        generation: 2,
        previous: 1,
        dir: keys.generation_dir(2, 7),
        chunks: 1,
        entries: 1,
        sha256: "ab".repeat(32),
        committed_at_ms: 0,
        committed_by: "bench".into(),
        empty_forced: false,
        signature: None,
    };
    let (mut signing, mut verifying) = (Vec::new(), Vec::new());
    for _ in 0..2000 {
        let started = Instant::now();
        key.sign("/edgegate", "partner-gate", &mut pointer);
        signing.push(started.elapsed().as_secs_f64() * 1e6);
        let started = Instant::now();
        trusted.check("/edgegate", "partner-gate", &pointer).expect("verifies");
        verifying.push(started.elapsed().as_secs_f64() * 1e6);
    }
    (percentile(&signing, 0.5), percentile(&verifying, 0.5))
}

/// Starts `edgegate allow add|del SOURCE` on host 0; the returned closure waits for it.
fn cli(fleet: &Fleet, source: std::net::Ipv4Addr, adding: bool) -> Box<dyn FnOnce() + '_> {
    let verb = if adding { "add" } else { "del" };
    let mut child = std::process::Command::new(edgegate_tests::testbed::edgegate_binary())
        .arg("--control-socket")
        .arg(&fleet.hosts[0].socket)
        .args(["allow", verb, &source.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("edgegate allow");
    Box::new(move || assert!(child.wait().expect("wait").success(), "allow {verb} failed"))
}

/// Propagation of `rounds` changes committed by one admin connection, half
/// unsigned and half signed, in alternating blocks (the hosts restarted
/// with or without `trusted_keys` between blocks).
fn signing_cost(fleet: &Fleet, rounds: usize, aliases: usize) -> (Vec<f64>, Vec<f64>) {
    let unsigned_config = fleet.dir.join("admin-unsigned.toml");
    let text = std::fs::read_to_string(&fleet.admin_config).expect("admin config");
    let text: String =
        text.lines().filter(|l| !l.starts_with("trusted_keys")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&unsigned_config, text).expect("write");
    let runtime = fleet.hosts[0].netns.run(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    });
    let connect = |config: &std::path::Path, key: Option<&std::path::Path>| {
        runtime.block_on(Admin::connect(config, key, "bench-admin")).expect("admin connection")
    };
    let unsigned_admin = connect(&unsigned_config, None);
    let signed_admin = connect(&fleet.admin_config, Some(&fleet.signing_key));
    const BLOCKS: usize = 8;
    let block = (rounds / BLOCKS).max(2) & !1;
    let (mut unsigned, mut signed) = (Vec::new(), Vec::new());
    for signing in (0..BLOCKS).map(|b| b % 2 == 1) {
        let trusted = if signing {
            format!("trusted_keys = [\"{}\"]", fleet.trusted_key)
        } else {
            String::new()
        };
        for host in 0..HOSTS {
            fleet.write_config(host, &trusted);
            fleet.kill_daemon(host);
            fleet.start_daemon(host);
        }
        let admin = if signing { &signed_admin } else { &unsigned_admin };
        // A replacement starts each block: it builds on no earlier list, so an
        // unsigned one is not refused as a base, and every block runs on the same list.
        let list = Allowlist::parse(&format!("{ALLOWED}/32\n")).expect("a list");
        let replace = Change::Replace { list };
        runtime.block_on(admin.commit(&replace, false)).expect("re-commit");
        let generation = fleet.view(0).current_generation.expect("a generation");
        fleet.await_generation(generation, Duration::from_secs(10));
        let samples = propagation(fleet, block, aliases, &[], &mut |source, adding| {
            let cidrs = vec![ipnet::IpNet::from(std::net::IpAddr::from(source))];
            let action = edgegate::allowlist::Action::Allow;
            let change = if adding {
                Change::Add { action, cidrs, comment: None }
            } else {
                Change::Remove { action, cidrs }
            };
            runtime.block_on(admin.commit(&change, false)).expect("commit");
            Box::new(|| {})
        });
        if signing { signed.extend(samples) } else { unsigned.extend(samples) }
    }
    for host in 0..HOSTS {
        fleet.write_config(host, "");
    }
    (unsigned, signed)
}

/// Milliseconds per change until every host (and every recorder) has it;
/// `start` makes the change and returns what waits for its maker.
fn propagation<'a>(
    fleet: &Fleet,
    rounds: usize,
    aliases: usize,
    recorders: &[Arc<Recorder>],
    start: &mut dyn FnMut(std::net::Ipv4Addr, bool) -> Box<dyn FnOnce() + 'a>,
) -> Vec<f64> {
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let source = stranger_alias((round / 2) % aliases);
        let adding = round % 2 == 0;
        let started = Instant::now();
        let finish = start(source, adding);
        let mut pending: Vec<usize> = (0..HOSTS).collect();
        let deadline = started + Duration::from_secs(10);
        while !pending.is_empty() {
            pending.retain(|&host| {
                let target = std::net::SocketAddr::from((
                    edgegate_tests::fleet::host_address(host),
                    edgegate_tests::testbed::PROTECTED_PORT,
                ));
                let passes = fleet
                    .stranger
                    .run(|| edgegate_tests::fleet::connect_from(source, target, PROBE_TIMEOUT));
                passes != adding
            });
            assert!(Instant::now() < deadline, "round {round}: hosts {pending:?} never changed");
        }
        let generation = fleet.view(0).current_generation.expect("a generation");
        for recorder in recorders {
            while !recorder.0.lock().expect("lock").iter().any(|(g, _)| *g >= generation) {
                assert!(Instant::now() < deadline, "a watcher never got generation {generation}");
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let last = recorders
            .iter()
            .filter_map(|r| {
                r.0.lock().expect("lock").iter().find(|(g, _)| *g >= generation).map(|(_, at)| *at)
            })
            .max()
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(started));
        samples.push(started.elapsed().max(last).as_secs_f64() * 1e3);
        finish();
    }
    samples
}

/// `count` followers of the group in host 0's namespace, each with its own
/// etcd connection; they run until the returned runtime is dropped.
fn start_watchers(fleet: &Fleet, count: usize) -> (Vec<Arc<Recorder>>, tokio::runtime::Runtime) {
    let config = Config::load(&fleet.hosts[0].config, &Default::default()).expect("config");
    let fleet_config = config.fleet.expect("fleet");
    let credentials = Credentials::read(&fleet_config).expect("credentials");
    fleet.hosts[0].netns.run(|| {
        // Threads of a runtime built here inherit the namespace.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let recorders: Vec<Arc<Recorder>> = (0..count)
            .map(|n| {
                let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
                let store = runtime
                    .block_on(Store::connect(
                        &fleet_config,
                        &credentials,
                        &format!("watcher{n}"),
                        config.filter.max_entries,
                        Authority::default(),
                    ))
                    .expect("connect");
                let health = Arc::new(Health::new(
                    &fleet_config.group,
                    "watcher",
                    0,
                    0,
                    &Default::default(),
                ));
                runtime.spawn(follow(
                    store,
                    Arc::clone(&recorder),
                    health,
                    Duration::from_secs(60),
                ));
                recorder
            })
            .collect();
        (recorders, runtime)
    })
}

/// Seconds from starting a 100k-entry replace until all hosts enforce it.
fn big_replace(fleet: &Fleet) -> f64 {
    let mut text = format!("{ALLOWED}/32\n");
    for i in 0..50_000u32 {
        let [_, b, c, d] = i.to_be_bytes();
        text.push_str(&format!(
            "11.{b}.{c}.{d}/32\n2001:db8::{:x}:{:x}/128\n",
            i >> 16,
            i & 0xffff
        ));
    }
    let file = fleet.dir.join("replace.list");
    std::fs::write(&file, text).expect("write list");
    let before = fleet.view(0).current_generation.expect("a generation");
    let started = Instant::now();
    fleet.cli_ok(0, &["allow", "replace", "--file", file.to_str().expect("UTF-8")]);
    fleet.await_generation(before + 1, Duration::from_secs(60));
    started.elapsed().as_secs_f64()
}
