//! `cargo xtask bench xdp`: nanoseconds per packet of the XDP filter under
//! BPF_PROG_TEST_RUN, against a DROP-only baseline and a plain LPM-trie
//! program loaded with the same list, all measured in this one run.
//!
//! Each figure is the median over distinct source addresses (half of them
//! matching the list, half not) of the kernel's per-run average over
//! `--repeat` runs; `pass` and `drop` are the medians over each half alone.
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

const PORT: u16 = 443;

struct Settings {
    repeat: u32,
    /// How often the filter and its build without the drop sample each see
    /// every frame (the fastest round counts).
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

/// Medians of ns/packet of `program` over `frames`: all of them, the
/// listed sources' (even frames: the pass path) and the others' (the drop
/// path). The median of all falls between the two paths, so it moves with
/// either: the per-path figures say which.
fn measure(program: &Xdp, frames: &[Vec<u8>], repeat: u32) -> Paths {
    let [paths] = measure_side_by_side([program], frames, repeat, 1);
    paths
}

/// As [`measure`], for programs compared with each other: each frame runs
/// through each in turn, `rounds` times, and counts with its fastest round,
/// so that the machine's drift and preemptions (which only ever add time)
/// touch neither side more than the other.
fn measure_side_by_side<const N: usize>(
    programs: [&Xdp; N],
    frames: &[Vec<u8>],
    repeat: u32,
    rounds: usize,
) -> [Paths; N] {
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
                let result = programs[program].test_run(options).expect("BPF_PROG_TEST_RUN");
                ns[program][index] = ns[program][index].min(result.duration.as_nanos() as f64);
            }
        }
    }
    ns.map(|ns| {
        let path = |parity| -> Vec<f64> { ns.iter().skip(parity).step_by(2).copied().collect() };
        Paths { all: median(&ns), pass: median(&path(0)), drop: median(&path(1)) }
    })
}

#[derive(Clone, Copy)]
struct Paths {
    all: f64,
    pass: f64,
    drop: f64,
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

                let started = Instant::now();
                let text: String = prefixes.iter().map(|p| format!("{p}\n")).collect();
                let capacity = u32::try_from(max_size.next_power_of_two()).expect("capacity");
                let harness = XdpHarness::with_capacity(&text, Scope::Ports, &[PORT], capacity);
                let setup_s = started.elapsed().as_secs_f64();
                let unsampled = XdpHarness::with_object(
                    reference::FILTER_WITHOUT_DROP_SAMPLE,
                    &text,
                    Scope::Ports,
                    &[PORT],
                    capacity,
                );
                let [edgegate, unsampled_ns] = measure_side_by_side(
                    [harness.filter.program(), unsampled.filter.program()],
                    &frames,
                    settings.repeat,
                    settings.rounds,
                );
                let (v4, v6) = harness.filter.lookups();
                let lookup = if family == Family::V4 { v4.name() } else { v6.name() };
                drop((harness, unsampled));

                let lpm_ns = measure_plain_lpm(&prefixes, &frames, settings.repeat).all;
                let row = Row {
                    family: if family == Family::V4 { "ipv4" } else { "ipv6" },
                    shape: shape.name(family),
                    entries: size,
                    edgegate,
                    unsampled: unsampled_ns,
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
        "DROP-only baseline: {base:.1} ns/packet (min {base_min:.0}, max {base_max:.0} across rows)\n"
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
         (feature `without-drop-sample`), same list, same frames\n"
    );
    println!(
        "| family | list | entries | pass ns | without sample | pass cost | drop ns | without sample | drop cost |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let cost = |with: f64, without: f64| (with / without - 1.0) * 100.0;
    for row in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:+.0}% | {:.1} | {:.1} | {:+.0}% |",
            row.family,
            row.shape,
            row.entries,
            row.edgegate.pass,
            row.unsampled.pass,
            cost(row.edgegate.pass, row.unsampled.pass),
            row.edgegate.drop,
            row.unsampled.drop,
            cost(row.edgegate.drop, row.unsampled.drop)
        );
    }
    let median_cost = |path: fn(&Row) -> (f64, f64)| {
        let costs: Vec<f64> = rows
            .iter()
            .map(|r| {
                let (a, b) = path(r);
                cost(a, b)
            })
            .collect();
        median(&costs)
    };
    println!(
        "\nmedian sample cost over the rows: pass path {:+.1}%, drop path {:+.1}% \
         (targets: nothing measurable on the pass path; ≤ 5% on the drop path)",
        median_cost(|r| (r.edgegate.pass, r.unsampled.pass)),
        median_cost(|r| (r.edgegate.drop, r.unsampled.drop))
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
            "without_drop_sample_drop_ns": r.unsampled.drop, "plain_lpm_ns": r.lpm_ns,
            "load_seconds": r.setup_s,
        })).collect::<Vec<_>>(),
    });
    save("xdp", &json);
}
