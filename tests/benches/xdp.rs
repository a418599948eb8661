//! `cargo xtask bench xdp`: nanoseconds per packet of the XDP filter under
//! BPF_PROG_TEST_RUN, against a DROP-only baseline and a plain LPM-trie
//! program loaded with the same list, all measured in this one run.
//!
//! Each figure is the median over distinct source addresses (half of them
//! matching the list, half not) of the kernel's per-run average over
//! `--repeat` runs; `pass` and `drop` are the medians over each half alone.
//! The drop sample's cost, a fraction of a nanosecond, is read from the
//! kernel's run-time statistics instead (see [`Clock`]).
//! Results also go to `target/bench/xdp.json`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{LpmTrie, lpm_trie::Key},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use edgegate::config::Scope;
use edgegate_tests::{
    Lcg,
    bench::{machine, median, print_heading, save, spread},
    harness::XdpHarness,
    packet::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, Fragment, Transport, ethernet, ipv4, ipv6},
    reference,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proxy_common::Framing;

const PORT: u16 = 443;

struct Settings {
    repeat: u32,
    /// How often the filter and its build without the drop sample each see
    /// every frame by the kernel's clock (the fastest round counts).
    rounds: usize,
    sources: usize,
    sizes: Vec<usize>,
}

impl Settings {
    fn from_args() -> Self {
        let mut settings = Self {
            repeat: 1_000_000,
            rounds: 3,
            sources: 32,
            sizes: vec![10, 1_000, 100_000, 1_000_000],
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
            match arg.as_str() {
                "--repeat" => settings.repeat = value().parse().expect("--repeat N"),
                "--rounds" => settings.rounds = value().parse().expect("--rounds N"),
                "--sources" => settings.sources = value().parse().expect("--sources N"),
                "--sizes" => {
                    settings.sizes =
                        value().split(',').map(|s| s.parse().expect("--sizes N,N,..")).collect();
                }
                // cargo bench passes --bench to every bench binary.
                "--bench" => {}
                other => {
                    panic!(
                        "unknown argument {other} (--repeat N, --rounds N, --sources N, --sizes N,N,..)"
                    )
                }
            }
        }
        settings
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy)]
enum Shape {
    /// Host routes: /32 or /128.
    Hosts,
    /// Networks: /24 or /48.
    Networks,
    /// Every length from /8 (/16) to /32 (/128).
    Mixed,
}

impl Shape {
    fn name(self, family: Family) -> &'static str {
        match (self, family) {
            (Self::Hosts, Family::V4) => "/32s",
            (Self::Hosts, Family::V6) => "/128s",
            (Self::Networks, Family::V4) => "/24s",
            (Self::Networks, Family::V6) => "/48s",
            (Self::Mixed, _) => "mixed",
        }
    }
}

fn prefix(rng: &mut Lcg, family: Family, shape: Shape) -> IpNet {
    match family {
        Family::V4 => {
            let len = match shape {
                Shape::Hosts => 32,
                Shape::Networks => 24,
                Shape::Mixed => 8 + (rng.next_u64() % 25) as u8,
            };
            // 1.0.0.0 - 223.255.255.255: unicast space.
            let addr = Ipv4Addr::from(0x0100_0000 + (rng.next_u64() % 0xde00_0000) as u32);
            IpNet::V4(Ipv4Net::new(addr, len).expect("len").trunc())
        }
        Family::V6 => {
            let len = match shape {
                Shape::Hosts => 128,
                Shape::Networks => 48,
                Shape::Mixed => 16 + (rng.next_u64() % 113) as u8,
            };
            let bits = (0x2000u128 << 112)
                | (u128::from(rng.next_u64()) << 64)
                | u128::from(rng.next_u64());
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(bits), len).expect("len").trunc())
        }
    }
}

fn list(family: Family, shape: Shape, size: usize) -> Vec<IpNet> {
    let mut rng = Lcg::new(size as u64 * 31 + shape as u64 * 7 + family as u64);
    let mut set = BTreeSet::new();
    while set.len() < size {
        set.insert(prefix(&mut rng, family, shape));
    }
    set.into_iter().collect()
}

/// Frames from `count` sources: even ones inside listed prefixes, odd ones random.
fn frames(family: Family, prefixes: &[IpNet], count: usize) -> Vec<Vec<u8>> {
    let mut rng = Lcg::new(0xfeed);
    (0..count)
        .map(|i| {
            let source = if i % 2 == 0 {
                let net = prefixes[(rng.next_u64() as usize) % prefixes.len()];
                match net {
                    IpNet::V4(net) => IpNet::V4(Ipv4Net::new(net.broadcast(), 32).expect("/32")),
                    IpNet::V6(net) => IpNet::V6(Ipv6Net::new(net.broadcast(), 128).expect("/128")),
                }
            } else {
                prefix(&mut rng, family, Shape::Hosts)
            };
            let tcp = Transport::Tcp { dst_port: PORT };
            match source.addr() {
                std::net::IpAddr::V4(a) => {
                    ethernet(&[], ETHERTYPE_IPV4, ipv4(a, tcp, &[], Fragment::default())).bytes
                }
                std::net::IpAddr::V6(a) => ethernet(&[], ETHERTYPE_IPV6, ipv6(a, &[], tcp)).bytes,
            }
        })
        .collect()
}

/// Medians of ns/packet of `program` over `frames`, by the kernel's clock.
fn measure(program: &Xdp, frames: &[Vec<u8>], repeat: u32) -> Paths {
    let [ns] = times([program], frames, repeat, 1, Clock::Kernel);
    Paths::of(&ns)
}

/// How a run is timed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// The duration BPF_PROG_TEST_RUN reports: the whole per-packet loop,
    /// in whole nanoseconds (the kernel divides integers).
    Kernel,
    /// The program alone, from the kernel's run-time statistics
    /// (BPF_ENABLE_STATS): nanosecond totals over every run, so fractions
    /// of a nanosecond show. Each run carries two clock reads too, the same
    /// for every program, so only differences between programs mean anything.
    ProgramStats,
}

/// ns per run of each program for each frame: each frame runs through each
/// program in turn, `rounds` times, and counts with its fastest round, so
/// that the machine's drift and preemptions (which only ever add time)
/// touch neither side more than the other.
fn times<const N: usize>(
    programs: [&Xdp; N],
    frames: &[Vec<u8>],
    repeat: u32,
    rounds: usize,
    clock: Clock,
) -> [Vec<f64>; N] {
    // Statistics cost two clock reads per run, so they are on only while
    // they are the clock; the handle switches them off when dropped.
    let _stats = (clock == Clock::ProgramStats)
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS"));
    let run_time = |program: &Xdp| {
        let info = program.info().expect("program info");
        (info.run_time().as_nanos() as f64, info.run_count())
    };
    let mut ns = [(); N].map(|()| vec![f64::INFINITY; frames.len()]);
    for round in 0..rounds {
        for (index, frame) in frames.iter().enumerate() {
            // Each program goes first in turn: the one run right after
            // another frame's runs is not always the same one.
            let mut order: [usize; N] = std::array::from_fn(|i| i);
            order.rotate_left((round + index) % N);
            for program in order {
                let mut options = TestRunOptions::new();
                options.data_in = Some(frame);
                options.repeat = repeat;
                let before = (clock == Clock::ProgramStats).then(|| run_time(programs[program]));
                let result = programs[program].test_run(options).expect("BPF_PROG_TEST_RUN");
                let per_run = match before {
                    None => result.duration.as_nanos() as f64,
                    Some((time_before, count_before)) => {
                        let (time_after, count_after) = run_time(programs[program]);
                        (time_after - time_before) / (count_after - count_before) as f64
                    }
                };
                ns[program][index] = ns[program][index].min(per_run);
            }
        }
    }
    ns
}

/// Medians over all frames, the listed sources' (even frames: the pass
/// path) and the others' (the drop path). The median of all falls between
/// the two paths, so it moves with either: the per-path figures say which.
#[derive(Clone, Copy)]
struct Paths {
    all: f64,
    pass: f64,
    drop: f64,
}

impl Paths {
    fn of(ns: &[f64]) -> Self {
        let path = |parity| -> Vec<f64> { ns.iter().skip(parity).step_by(2).copied().collect() };
        Self { all: median(ns), pass: median(&path(0)), drop: median(&path(1)) }
    }
}

fn load_xdp(ebpf: &mut Ebpf, name: &str) {
    let program: &mut Xdp = ebpf.program_mut(name).expect("program").try_into().expect("XDP");
    program.load().expect("load the reference program");
}

fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
    ebpf.program(name).expect("program").try_into().expect("XDP")
}

struct Row {
    family: &'static str,
    shape: &'static str,
    entries: usize,
    edgegate: Paths,
    /// The same, built without the drop sample.
    unsampled: Paths,
    /// What the drop sample adds to the program's own time (see [`sample_cost`]).
    sample_ns: Paths,
    /// How far apart loads of one build are, the noise that figure stands on.
    load_spread_ns: Paths,
    lookup: &'static str,
    lpm_ns: f64,
    setup_s: f64,
}

fn main() {
    edgegate_tests::require_root();
    let settings = Settings::from_args();
    let mut drop_only = Ebpf::load(reference::DROP_ONLY).expect("load the DROP program");
    load_xdp(&mut drop_only, "bench_drop");
    let max_size = settings.sizes.iter().copied().max().unwrap_or(10);

    let mut rows = Vec::new();
    let mut baseline = Vec::new();
    for family in [Family::V4, Family::V6] {
        for shape in [Shape::Hosts, Shape::Networks, Shape::Mixed] {
            for &size in &settings.sizes {
                let prefixes = list(family, shape, size);
                let frames = frames(family, &prefixes, settings.sources);
                // The baseline is measured between rows, so that drift over
                // the run shows up in it rather than skewing the ratios.
                baseline.push(measure(xdp(&drop_only, "bench_drop"), &frames, settings.repeat).all);

                let text: String = prefixes.iter().map(|p| format!("{p}\n")).collect();
                let capacity = u32::try_from(max_size.next_power_of_two()).expect("capacity");
                let load = |object: &[u8]| {
                    XdpHarness::with_object(object, &text, Scope::Ports, &[PORT], capacity)
                };
                let started = Instant::now();
                let harness = load(edgegate::filter::PROGRAM_OBJECT);
                let setup_s = started.elapsed().as_secs_f64();
                let unsampled = load(reference::FILTER_WITHOUT_DROP_SAMPLE);
                let [edgegate, unsampled_ns] = times(
                    [
                        harness.filter.program(Framing::Ethernet),
                        unsampled.filter.program(Framing::Ethernet),
                    ],
                    &frames,
                    settings.repeat,
                    settings.rounds,
                    Clock::Kernel,
                )
                .map(|ns| Paths::of(&ns));
                let (v4, v6) = harness.filter.lookups();
                let lookup = if family == Family::V4 { v4.name() } else { v6.name() };
                drop((harness, unsampled));
                let (sample_ns, load_spread_ns) = sample_cost(load, &frames, &settings);

                let lpm_ns = measure_plain_lpm(&prefixes, &frames, settings.repeat).all;
                let row = Row {
                    family: if family == Family::V4 { "ipv4" } else { "ipv6" },
                    shape: shape.name(family),
                    entries: size,
                    edgegate,
                    unsampled: unsampled_ns,
                    sample_ns,
                    load_spread_ns,
                    lookup,
                    lpm_ns,
                    setup_s,
                };
                eprintln!(
                    "{} {} {}: edgegate {:.1} ns (pass {:.1}, drop {:.1}), lpm {:.1} ns",
                    row.family,
                    row.shape,
                    row.entries,
                    row.edgegate.all,
                    row.edgegate.pass,
                    row.edgegate.drop,
                    row.lpm_ns
                );
                rows.push(row);
            }
        }
    }
    report(&settings, &rows, &baseline);
}

/// How often each build is loaded to measure the drop sample's cost.
const SAMPLE_LOADS: usize = 3;

/// What the drop sample adds to the program's own time
/// ([`Clock::ProgramStats`]), per frame, and how far apart loads of one build
/// are. Where the JIT places an image moves its time by up to a nanosecond,
/// as much as the sample costs (a build measured against a second load of
/// itself shows it), so each build is loaded [`SAMPLE_LOADS`] times and
/// counts with its median over loads.
fn sample_cost(
    load: impl Fn(&[u8]) -> XdpHarness,
    frames: &[Vec<u8>],
    settings: &Settings,
) -> (Paths, Paths) {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLE_LOADS {
        let sampled = load(edgegate::filter::PROGRAM_OBJECT);
        let unsampled = load(reference::FILTER_WITHOUT_DROP_SAMPLE);
        let [with_ns, without_ns] = times(
            [
                sampled.filter.program(Framing::Ethernet),
                unsampled.filter.program(Framing::Ethernet),
            ],
            frames,
            settings.repeat,
            // The statistics leave out the time between runs, where
            // preemptions land, so the loads are the rounds here.
            1,
            Clock::ProgramStats,
        );
        with.push(with_ns);
        without.push(without_ns);
    }
    let over_loads = |loads: &[Vec<f64>], frame: usize| -> Vec<f64> {
        loads.iter().map(|ns| ns[frame]).collect()
    };
    let (cost, spread): (Vec<f64>, Vec<f64>) = (0..frames.len())
        .map(|frame| {
            let (with, without) = (over_loads(&with, frame), over_loads(&without, frame));
            let (low, high) = spread(&with);
            (median(&with) - median(&without), high - low)
        })
        .unzip();
    (Paths::of(&cost), Paths::of(&spread))
}

fn measure_plain_lpm(prefixes: &[IpNet], frames: &[Vec<u8>], repeat: u32) -> Paths {
    let mut ebpf = Ebpf::load(reference::PLAIN_LPM).expect("load the LPM program");
    load_xdp(&mut ebpf, "bench_lpm");
    fill_trie(
        &mut ebpf,
        "BENCH_V4_TRIE",
        prefixes.iter().filter_map(|p| match p {
            IpNet::V4(n) => Some(Key::new(u32::from(n.prefix_len()), n.network().octets())),
            IpNet::V6(_) => None,
        }),
    );
    fill_trie(
        &mut ebpf,
        "BENCH_V6_TRIE",
        prefixes.iter().filter_map(|p| match p {
            IpNet::V6(n) => Some(Key::new(u32::from(n.prefix_len()), n.network().octets())),
            IpNet::V4(_) => None,
        }),
    );
    measure(xdp(&ebpf, "bench_lpm"), frames, repeat)
}

fn fill_trie<K: aya::Pod>(ebpf: &mut Ebpf, name: &str, keys: impl Iterator<Item = Key<K>>) {
    let mut trie: LpmTrie<_, K, u32> =
        LpmTrie::try_from(ebpf.map_mut(name).expect("map")).expect("trie");
    for key in keys {
        trie.insert(&key, 1, 0).expect("insert");
    }
}

fn report(settings: &Settings, rows: &[Row], baseline: &[f64]) {
    let base = median(baseline);
    let (base_min, base_max) = spread(baseline);
    print_heading("xdp");
    println!(
        "BPF_PROG_TEST_RUN, repeat {} per source, median over {} sources (half listed, half not)",
        settings.repeat, settings.sources
    );
    println!(
        "DROP-only baseline: {base:.1} ns/packet (min {base_min:.1}, max {base_max:.1} across rows)\n"
    );
    println!(
        "| family | list | entries | lookup | edgegate ns | pass ns | drop ns | ÷ baseline | ÷ own 10-entry | plain LPM ns | edgegate ÷ LPM | load s |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let own_10 = rows
            .iter()
            .find(|r| r.family == row.family && r.shape == row.shape && r.entries == 10)
            // Without a 10-entry run (`--sizes` left it out) there is no ratio.
            .map_or_else(
                || "—".to_owned(),
                |r| format!("{:.2}", row.edgegate.all / r.edgegate.all),
            );
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {:.1} | {:.2} | {:.2} |",
            row.family,
            row.shape,
            row.entries,
            row.lookup,
            row.edgegate.all,
            row.edgegate.pass,
            row.edgegate.drop,
            row.edgegate.all / base,
            own_10,
            row.lpm_ns,
            row.edgegate.all / row.lpm_ns,
            row.setup_s
        );
    }
    println!(
        "\ntargets: ≤ 3× baseline at 10 entries; ≤ 2× own 10-entry cost at 100k /32s or /24s; mixed ≤ plain LPM"
    );

    println!(
        "\nthe drop sample's cost: the filter against its build without the sample \
         (feature `without-drop-sample`), same list, same frames. ns per packet by the \
         kernel's clock (whole ns); Δ is the program's own time with the sample minus \
         without, by the run-time statistics (fractions of a ns), each side the median of \
         {SAMPLE_LOADS} loads; ± is how far apart those loads of the sampled build are; \
         cost is Δ over the packet's ns without the sample\n"
    );
    println!(
        "| family | list | entries | pass ns with / without | pass Δ ns | ± | pass cost | drop ns with / without | drop Δ ns | ± | drop cost |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cost =
        |row: &Row, path: fn(&Paths) -> f64| path(&row.sample_ns) / path(&row.unsampled) * 100.0;
    let pass = |paths: &Paths| paths.pass;
    let drop = |paths: &Paths| paths.drop;
    for row in rows {
        println!(
            "| {} | {} | {} | {:.0} / {:.0} | {:+.2} | {:.2} | {:+.1}% | {:.0} / {:.0} | {:+.2} | {:.2} | {:+.1}% |",
            row.family,
            row.shape,
            row.entries,
            row.edgegate.pass,
            row.unsampled.pass,
            row.sample_ns.pass,
            row.load_spread_ns.pass,
            cost(row, pass),
            row.edgegate.drop,
            row.unsampled.drop,
            row.sample_ns.drop,
            row.load_spread_ns.drop,
            cost(row, drop)
        );
    }
    let median_cost = |path: fn(&Paths) -> f64| {
        median(&rows.iter().map(|row| cost(row, path)).collect::<Vec<_>>())
    };
    println!(
        "\nmedian sample cost over the rows: pass path {:+.1}%, drop path {:+.1}% \
         (targets: nothing measurable on the pass path; ≤ 5% on the drop path)",
        median_cost(pass),
        median_cost(drop)
    );

    let json = serde_json::json!({
        "machine": machine(),
        "repeat": settings.repeat,
        "sources": settings.sources,
        "baseline_ns": base,
        "rows": rows.iter().map(|r| serde_json::json!({
            "family": r.family, "list": r.shape, "entries": r.entries, "lookup": r.lookup,
            "edgegate_ns": r.edgegate.all, "edgegate_pass_ns": r.edgegate.pass,
            "edgegate_drop_ns": r.edgegate.drop,
            "without_drop_sample_pass_ns": r.unsampled.pass,
            "without_drop_sample_drop_ns": r.unsampled.drop,
            "drop_sample_pass_delta_ns": r.sample_ns.pass,
            "drop_sample_drop_delta_ns": r.sample_ns.drop,
            "load_spread_pass_ns": r.load_spread_ns.pass,
            "load_spread_drop_ns": r.load_spread_ns.drop, "plain_lpm_ns": r.lpm_ns,
            "load_seconds": r.setup_s,
        })).collect::<Vec<_>>(),
    });
    save("xdp", &json);
}
