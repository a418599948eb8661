//! `cargo xtask bench flood`: how many packets per second each filter drops
//! per core under a flood of random sources, IPv4 and IPv6, on one core and
//! on two, and the CPU it spends per million packets: edgegate's XDP
//! program, nftables (netdev ingress, an interval set), iptables/ip6tables
//! (raw PREROUTING, an ipset hash:net) and no filter at all, with the same
//! allowlist of 10, 10k and 100k prefixes (IPv4 /24s, IPv6 /48s; with
//! `--hosts`, /32s and /128s, as in a partner list of single addresses).
//!
//! Traffic: a generator XDP program run by BPF_PROG_TEST_RUN in live-frames
//! mode rewrites the source of a TCP SYN to a random address and redirects
//! it into a veth pair whose other end, in a second namespace, carries the
//! filter. edgegate also runs built without its drop sample (a bench-only
//! build), to show what the sample costs (IPv4, one core): the two builds
//! take turns round by round, and the cost is the median of the pairs'
//! ratios. Each generator thread is pinned to its CPU; the receiving side
//! runs in the softirq that the same CPU raises when the batch is flushed
//! (into the veth's receive queue of that CPU), within the run, so the
//! run's time is those CPUs' time for generator and filter (their busy time
//! from /proc/stat is printed as a cross-check). A run of the generator
//! that drops its frames itself measures its own share, which is
//! subtracted: what remains is the receive path (veth, filter, freeing).
//!
//! Results also go to `target/bench/flood.json`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use edgegate_tests::{
    Lcg,
    bench::{exit_not_measurable_here, median, print_heading, save, spread, tool_version},
    flood::{Bed, Family, Kind, Listed, MAX_CPUS, Run, SINK_ADDR, SINK_ADDR6},
};

/// edgegate and its build without the drop sample get this many times the
/// rounds of the peers: the difference between them is small.
const PAIRED_ROUNDS_FACTOR: usize = 3;

struct Settings {
    /// Per flooding CPU and round.
    packets: u32,
    rounds: usize,
    sizes: Vec<usize>,
    families: Vec<Family>,
    /// How many CPUs flood at once, for each configuration in turn.
    cpus: Vec<usize>,
    listed: Listed,
}

impl Settings {
    fn from_args() -> Self {
        let mut settings = Self {
            packets: 3_000_000,
            rounds: 5,
            sizes: vec![10, 10_000, 100_000],
            families: vec![Family::V4, Family::V6],
            cpus: vec![1, MAX_CPUS],
            listed: Listed::Networks,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
            match arg.as_str() {
                "--packets" => settings.packets = value().parse().expect("--packets N"),
                "--rounds" => settings.rounds = value().parse().expect("--rounds N"),
                "--sizes" => {
                    settings.sizes =
                        value().split(',').map(|s| s.parse().expect("--sizes N,N,..")).collect();
                }
                "--families" => {
                    settings.families = value()
                        .split(',')
                        .map(|f| match f {
                            "4" => Family::V4,
                            "6" => Family::V6,
                            other => panic!("--families 4,6: not a family: {other}"),
                        })
                        .collect();
                }
                "--cpus" => {
                    settings.cpus = value()
                        .split(',')
                        .map(|n| match n.parse() {
                            Ok(n @ 1..=MAX_CPUS) => n,
                            _ => panic!("--cpus N,N: each 1 to {MAX_CPUS}, not {n}"),
                        })
                        .collect();
                }
                "--hosts" => settings.listed = Listed::Hosts,
                "--bench" => {}
                other => panic!(
                    "unknown argument {other} (--packets N, --rounds N, --sizes N,N,.., \
                     --families 4,6, --cpus 1,2, --hosts)"
                ),
            }
        }
        let available = std::thread::available_parallelism().map_or(1, usize::from);
        settings.cpus.retain(|&cpus| {
            let fits = cpus <= available;
            if !fits {
                eprintln!(
                    "bench flood: skipping {cpus} flooding CPUs, this machine has {available}"
                );
            }
            fits
        });
        assert!(!settings.cpus.is_empty(), "no flooding CPU count fits this machine");
        settings
    }
}

/// Installs `row`'s filter with `prefixes`, floods it for `rounds`
/// rounds of `packets` per CPU and removes it, adding to `row` and `totals`.
fn measure(
    bed: &Bed,
    row: &mut Row,
    prefixes: &[String],
    rounds: usize,
    packets: u32,
    totals: &mut Totals,
) {
    let per_packet = |run: &Run| run.elapsed.as_secs_f64() * 1e9 / f64::from(packets);
    let (redirect, drop) = row.family.programs();
    let installed = bed.install(row.kind, row.family, prefixes);
    bed.flood(redirect, row.family, row.cpus, 100_000); // warm-up
    let dropped_before = bed.dropped(&installed, row.family);
    for _ in 0..rounds {
        let own = bed.flood(drop, row.family, row.cpus, packets);
        let total = bed.flood(redirect, row.family, row.cpus, packets);
        let path = per_packet(&total) - per_packet(&own);
        assert!(
            path > 0.0,
            "{}: the run that delivers cost no more than the generator alone; rerun on a quieter machine",
            row.kind.name()
        );
        totals.generator_ns.push(per_packet(&own));
        totals.elapsed += total.elapsed * row.cpus as u32;
        totals.busy += total.busy;
        row.total_ns.push(per_packet(&total));
        row.path_ns.push(path);
    }
    row.dropped += bed.dropped(&installed, row.family) - dropped_before;
    row.sent += u64::from(packets) * (rounds * row.cpus) as u64;
    bed.remove(installed, row.family);
}

/// `n` distinct networks of `family`'s prefix length for `listed`, the same
/// ones on every run, none of them the bed's own.
fn prefixes(family: Family, listed: Listed, n: usize) -> Vec<String> {
    let mut lcg = Lcg::new(0x0f10_0d00);
    let length = family.prefix_len(listed);
    let own = match family {
        Family::V4 => u128::from(u32::from(SINK_ADDR)) << 96,
        Family::V6 => u128::from(SINK_ADDR6),
    };
    // Checked: a /0 would shift by 128.
    let mask = u128::MAX.checked_shl(128 - u32::from(length)).unwrap_or(0);
    let mut seen = BTreeSet::from([own & mask]);
    let mut prefixes = Vec::with_capacity(n);
    while prefixes.len() < n {
        let random = lcg.next_u64();
        let network = match family {
            Family::V4 => u128::from(random as u32) << 96,
            // The generator's 53 bits, at the top, cover the /48.
            Family::V6 => u128::from(random) << 75,
        } & mask;
        if seen.insert(network) {
            prefixes.push(match family {
                Family::V4 => format!("{}/{length}", Ipv4Addr::from((network >> 96) as u32)),
                Family::V6 => format!("{}/{length}", Ipv6Addr::from(network)),
            });
        }
    }
    prefixes
}

/// One filter with one list size, family and number of flooding CPUs:
/// per-round receive-path CPU ns per packet and the packets it was sent and
/// dropped.
struct Row {
    family: Family,
    cpus: usize,
    size: usize,
    kind: Kind,
    path_ns: Vec<f64>,
    total_ns: Vec<f64>,
    sent: u64,
    dropped: u64,
}

impl Row {
    fn new(family: Family, cpus: usize, size: usize, kind: Kind) -> Self {
        Self {
            family,
            cpus,
            size,
            kind,
            path_ns: Vec::new(),
            total_ns: Vec::new(),
            sent: 0,
            dropped: 0,
        }
    }

    fn dropped_share(&self) -> f64 {
        self.dropped as f64 / self.sent as f64
    }

    fn is(&self, family: Family, cpus: usize, size: usize, kind: Kind) -> bool {
        (self.family, self.cpus, self.size, self.kind) == (family, cpus, size, kind)
    }

    /// Median receive-path CPU ns per packet.
    fn ns(&self) -> f64 {
        median(&self.path_ns)
    }
}

/// What every round adds up to: the generator's own cost, and the flooding
/// CPUs' busy time against the time they had.
#[derive(Default)]
struct Totals {
    generator_ns: Vec<f64>,
    elapsed: Duration,
    busy: Duration,
}

fn main() {
    let settings = Settings::from_args();
    let bed = Bed::new();
    if let Some(refusal) = bed.live_frames_refused() {
        drop(bed);
        exit_not_measurable_here(
            "flood",
            &format!(
                "the kernel refused a live-frames BPF_PROG_TEST_RUN, this bench's traffic \
                 generator ({refusal}). It needs Linux 5.18 or newer and, for this process, \
                 CAP_SYS_ADMIN and CAP_SYS_RESOURCE (a container may withhold them): run it as \
                 root on the host."
            ),
        );
    }
    let mut totals = Totals::default();
    let mut rows = Vec::new();
    for &family in &settings.families {
        for &cpus in &settings.cpus {
            for &size in &settings.sizes {
                let list = prefixes(family, settings.listed, size);
                let mut kinds: Vec<Kind> =
                    Kind::ALL.into_iter().filter(|k| !k.is_edgegate()).collect();
                if (family, cpus) == (Family::V4, 1) {
                    // The sample's cost is a few percent of a noisy figure: its
                    // two builds take turns, round by round, so drift hits both
                    // alike, and go first in turn, so neither always runs first.
                    let mut paired = [Kind::Edgegate, Kind::EdgegateWithoutSample]
                        .map(|kind| Row::new(family, cpus, size, kind));
                    for round in 0..settings.rounds * PAIRED_ROUNDS_FACTOR {
                        paired.rotate_left(round % 2);
                        for row in &mut paired {
                            measure(&bed, row, &list, 1, settings.packets, &mut totals);
                        }
                    }
                    paired.sort_by_key(|row| row.kind != Kind::Edgegate);
                    rows.extend(paired);
                } else {
                    kinds.insert(0, Kind::Edgegate);
                }
                for kind in kinds {
                    let mut row = Row::new(family, cpus, size, kind);
                    measure(&bed, &mut row, &list, settings.rounds, settings.packets, &mut totals);
                    rows.push(row);
                }
                for row in rows
                    .iter()
                    .filter(|row| (row.family, row.cpus, row.size) == (family, cpus, size))
                {
                    eprintln!(
                        "{} on {cpus} CPU(s), {size:>7} prefixes, {:<45} {:>5.0} ns/packet",
                        family.name(),
                        row.kind.name(),
                        row.ns()
                    );
                }
            }
        }
    }
    drop(bed);
    report(&settings, &totals, &rows);
}

fn report(settings: &Settings, totals: &Totals, rows: &[Row]) {
    let busy_share = totals.busy.as_secs_f64() / totals.elapsed.as_secs_f64();
    print_heading("flood");
    println!(
        "peers: {}; {}; {}",
        tool_version("nft", "--version"),
        tool_version("iptables", "--version"),
        tool_version("ipset", "--version")
    );
    println!(
        "traffic: TCP SYNs from random sources, {} per flooding CPU and round, {} rounds ({} for edgegate's \
         two builds, taking turns, IPv4 on one CPU), each generator thread pinned to its CPU (its own \
         {:.0} ns/packet subtracted); allowlists of distinct IPv4 /{}s or IPv6 /{}s",
        settings.packets,
        settings.rounds,
        settings.rounds * PAIRED_ROUNDS_FACTOR,
        median(&totals.generator_ns),
        Family::V4.prefix_len(settings.listed),
        Family::V6.prefix_len(settings.listed),
    );
    println!(
        "figures are the flooding CPUs' time per packet; their busy time (/proc/stat) was {:.1}% of that time",
        busy_share * 100.0
    );
    println!(
        "\n| family | CPUs | prefixes | filter | Mpps per core (median) | min–max | Mpps, all CPUs | CPU s per Mpkt | dropped / sent | edgegate ÷ this |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let mpps = |ns: f64| 1e3 / ns;
    let find = |family, cpus, size, kind| {
        rows.iter().find(|r| r.is(family, cpus, size, kind)).expect("a measured row")
    };
    for row in rows {
        let edgegate = find(row.family, row.cpus, row.size, Kind::Edgegate).ns();
        // The fastest round has the fewest ns per packet.
        let (fastest, slowest) = spread(&row.path_ns);
        let (low, high) = (mpps(slowest), mpps(fastest));
        let ratio = if row.kind == Kind::Edgegate {
            "—".to_owned()
        } else {
            format!("{:.2}×", row.ns() / edgegate)
        };
        println!(
            "| {} | {} | {} | {} | {:.2} | {low:.2}–{high:.2} | {:.2} | {:.3} | {:.1}% | {ratio} |",
            row.family.name(),
            row.cpus,
            row.size,
            row.kind.name(),
            mpps(row.ns()),
            mpps(row.ns()) * row.cpus as f64,
            row.ns() / 1e3,
            row.dropped_share() * 100.0,
        );
    }
    println!();
    for &family in &settings.families {
        for &cpus in &settings.cpus {
            let of = |size, kind| find(family, cpus, size, kind).ns();
            for &size in &settings.sizes {
                let best_peer = of(size, Kind::Nftables).min(of(size, Kind::Ipset));
                println!(
                    "{} on {cpus} CPU(s), {size} prefixes: edgegate drops {:.1}× the packets/s of the \
                     best of nftables and ipset per core (target: ≥ 5×)",
                    family.name(),
                    best_peer / of(size, Kind::Edgegate)
                );
            }
            let (smallest, largest) = (settings.sizes[0], settings.sizes[settings.sizes.len() - 1]);
            if smallest != largest {
                println!(
                    "{} on {cpus} CPU(s): edgegate at {largest} prefixes drops {:.2}× its packets/s at \
                     {smallest} (target at 1M against 10: ≥ 0.8×)",
                    family.name(),
                    of(smallest, Kind::Edgegate) / of(largest, Kind::Edgegate)
                );
            }
        }
        if let [one, .., many] = settings.cpus[..] {
            for &size in &settings.sizes {
                let all =
                    |cpus: usize, kind| mpps(find(family, cpus, size, kind).ns()) * cpus as f64;
                let scaling = |kind| all(many, kind) / all(one, kind);
                println!(
                    "{}, {size} prefixes: on {many} CPUs edgegate drops {:.2}× the packets/s of {one} \
                     (nftables {:.2}×, ipset {:.2}×)",
                    family.name(),
                    scaling(Kind::Edgegate),
                    scaling(Kind::Nftables),
                    scaling(Kind::Ipset)
                );
            }
        }
    }
    if settings.families.contains(&Family::V4) && settings.cpus.contains(&1) {
        for &size in &settings.sizes {
            let rounds = |kind| &find(Family::V4, 1, size, kind).path_ns;
            let ratios: Vec<f64> = rounds(Kind::Edgegate)
                .iter()
                .zip(rounds(Kind::EdgegateWithoutSample))
                .map(|(with, without)| with / without)
                .collect();
            let (low, high) = spread(&ratios);
            println!(
                "IPv4 on 1 CPU, {size} prefixes: the drop sample costs {:+.1}% per packet, median of {} \
                 back-to-back pairs ({:+.1}%..{:+.1}%; target: ≤ 5%)",
                (median(&ratios) - 1.0) * 100.0,
                ratios.len(),
                (low - 1.0) * 100.0,
                (high - 1.0) * 100.0,
            );
        }
    }

    let json = serde_json::json!({
        "packets_per_cpu_and_round": settings.packets,
        "listed_prefix_lengths": {
            "IPv4": Family::V4.prefix_len(settings.listed),
            "IPv6": Family::V6.prefix_len(settings.listed),
        },
        "generator_ns_per_packet": totals.generator_ns,
        "busy_share_of_elapsed": busy_share,
        "rows": rows.iter().map(|r| serde_json::json!({
            "family": r.family.name(),
            "flooding_cpus": r.cpus,
            "prefixes": r.size,
            "filter": r.kind.name(),
            "receive_path_ns_per_packet": r.path_ns,
            "total_ns_per_packet": r.total_ns,
            "dropped_share": r.dropped_share(),
        })).collect::<Vec<_>>(),
    });
    save("flood", &json);
}
