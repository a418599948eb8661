//! `cargo xtask bench flood`: how many packets per second each filter drops
//! per core under a flood of random IPv4 sources, and the CPU it spends per
//! million packets: edgegate's XDP program, nftables (netdev ingress, an
//! interval set), iptables (raw PREROUTING, an ipset hash:net) and no filter
//! at all, with the same allowlist of 10, 10k and 100k /24 prefixes.
//!
//! Traffic: a generator XDP program run by BPF_PROG_TEST_RUN in live-frames
//! mode rewrites the source of a TCP SYN to a random address and redirects
//! it into a veth pair whose other end, in a second namespace, carries the
//! filter. edgegate also runs built without its drop sample (a bench-only
//! build), to show what the sample costs: the two builds take turns round
//! by round, and the cost is the median of the pairs' ratios. The generator
//! thread is pinned to one CPU; the receiving side runs
//! in the softirq that the same CPU raises when the batch is flushed, within
//! the run, so the run's time is that CPU's time for generator and filter
//! (its busy time from /proc/stat is printed as a cross-check). A run of the
//! generator that drops its frames itself measures its own share, which is
//! subtracted: what remains is the receive path (veth, filter, freeing).
//!
//! Results also go to `target/bench/flood.json`.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use edgegate::{
    allowlist::Allowlist,
    config::{AttachMode, Scope},
    demo::netns::{Netns, veth_pair},
    filter::{Filter, FilterOptions},
};
use edgegate_tests::{
    Lcg,
    bench::{clock_ticks_per_second, median, print_heading, save, spread, tool_version},
    reference, unique_name,
};

const GENERATOR_IF: &str = "egfgen";
const SINK_IF: &str = "egfsink";
const SINK_MAC: [u8; 6] = [0x02, 0xe9, 0, 0, 0, 0x02];
const GENERATOR_MAC: [u8; 6] = [0x02, 0xe9, 0, 0, 0, 0x01];
const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const PORT: u16 = 443;
/// The CPU the generator, and so the receive path, runs on.
const CPU: usize = 0;
/// Frames per live-frames batch: the kernel flushes redirects (and the veth
/// peer polls them) once per batch.
const BATCH: u32 = 64;
/// edgegate and its build without the drop sample get this many times the
/// rounds of the peers: the difference between them is small.
const PAIRED_ROUNDS_FACTOR: usize = 3;

struct Settings {
    packets: u32,
    rounds: usize,
    sizes: Vec<usize>,
}

impl Settings {
    fn from_args() -> Self {
        let mut settings = Self { packets: 3_000_000, rounds: 5, sizes: vec![10, 10_000, 100_000] };
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
                "--bench" => {}
                other => {
                    panic!("unknown argument {other} (--packets N, --rounds N, --sizes N,N,..)")
                }
            }
        }
        settings
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Edgegate,
    EdgegateWithoutSample,
    Nftables,
    Ipset,
    NoFilter,
    DropOnly,
}

impl Kind {
    const ALL: [Self; 6] = [
        Self::Edgegate,
        Self::EdgegateWithoutSample,
        Self::Nftables,
        Self::Ipset,
        Self::NoFilter,
        Self::DropOnly,
    ];

    fn is_edgegate(self) -> bool {
        matches!(self, Self::Edgegate | Self::EdgegateWithoutSample)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Edgegate => "edgegate (XDP)",
            Self::EdgegateWithoutSample => "edgegate built without its drop sample",
            Self::Nftables => "nftables netdev ingress, interval set",
            Self::Ipset => "iptables raw PREROUTING, ipset hash:net",
            Self::NoFilter => "no filter (the stack discards)",
            Self::DropOnly => "XDP program that drops everything (floor)",
        }
    }
}

/// The two namespaces, the veth pair between them and the generator.
struct Bed {
    generator_ns: Netns,
    sink: Netns,
    generator: aya::Ebpf,
    frame: Vec<u8>,
    bpffs_dir: std::path::PathBuf,
}

impl Bed {
    fn new() -> Self {
        edgegate_tests::require_root();
        let generator_ns = Netns::new("egfg");
        let sink = Netns::new("egfs");
        veth_pair(&generator_ns, GENERATOR_IF, &sink, SINK_IF);
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        generator_ns.ip(&["link", "set", GENERATOR_IF, "address", &mac(GENERATOR_MAC), "up"]);
        generator_ns.ip(&["addr", "add", "10.99.0.1/24", "dev", GENERATOR_IF]);
        sink.ip(&["link", "set", SINK_IF, "address", &mac(SINK_MAC), "up"]);
        sink.ip(&["addr", "add", &format!("{SINK_ADDR}/24"), "dev", SINK_IF]);
        // A veth accepts redirected frames only with NAPI on: an XDP program
        // on the receiving end (edgegate's) or GRO (for everything else).
        run(sink.command("ethtool").args(["-K", SINK_IF, "gro", "on"]));

        let ifindex = generator_ns
            .run(|| nix::net::if_::if_nametoindex(GENERATOR_IF))
            .expect("generator interface");
        let mut generator = EbpfLoader::new()
            .override_global("TARGET_IFINDEX", &ifindex, true)
            .load(reference::FLOOD_GENERATOR)
            .expect("load the generator");
        for name in ["flood_redirect", "flood_drop"] {
            let program: &mut Xdp =
                generator.program_mut(name).expect(name).try_into().expect("an XDP program");
            program.load().expect("load the generator program");
        }
        let bpffs_dir = std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("egflood"));
        Self { generator_ns, sink, generator, frame: syn_frame(), bpffs_dir }
    }

    /// Runs `program` for `packets` frames on [`CPU`]: the time the run
    /// took, and that CPU's busy time over it (a cross-check that the
    /// receive path ran within the run, on that CPU).
    fn flood(&self, program: &str, packets: u32) -> Run {
        let program: &Xdp =
            self.generator.program(program).expect(program).try_into().expect("XDP");
        self.generator_ns.run(|| {
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(CPU).expect("CPU");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).expect("pin");
            let busy_before = cpu_busy(CPU);
            let started = Instant::now();
            program
                .test_run(TestRunOptions {
                    data_in: Some(&self.frame),
                    repeat: packets,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..TestRunOptions::new()
                })
                .expect("live-frames test run");
            let elapsed = started.elapsed();
            // Let the scheduler tick account for the end of the run.
            std::thread::sleep(Duration::from_millis(20));
            Run { elapsed, busy: cpu_busy(CPU) - busy_before }
        })
    }

    /// Installs `row`'s filter with `prefixes`, floods it for `rounds`
    /// rounds of `packets` and removes it, adding to `row` and `totals`.
    fn measure(
        &self,
        row: &mut Row,
        prefixes: &[Ipv4Addr],
        rounds: usize,
        packets: u32,
        totals: &mut Totals,
    ) {
        let per_packet = |run: &Run| run.elapsed.as_secs_f64() * 1e9 / f64::from(packets);
        let installed = self.install(row.kind, prefixes);
        self.flood("flood_redirect", 100_000); // warm-up
        let dropped_before = self.dropped(&installed);
        for _ in 0..rounds {
            let own = self.flood("flood_drop", packets);
            let total = self.flood("flood_redirect", packets);
            let path = per_packet(&total) - per_packet(&own);
            assert!(
                path > 0.0,
                "{}: the run that delivers cost no more than the generator alone; rerun on a quieter machine",
                row.kind.name()
            );
            totals.generator_ns.push(per_packet(&own));
            totals.elapsed += total.elapsed;
            totals.busy += total.busy;
            row.total_ns.push(per_packet(&total));
            row.path_ns.push(path);
        }
        row.dropped += self.dropped(&installed) - dropped_before;
        row.sent += u64::from(packets) * rounds as u64;
        self.remove(installed);
    }

    /// Installs `kind` with `prefixes` on the sink's interface.
    fn install(&self, kind: Kind, prefixes: &[Ipv4Addr]) -> Installed {
        let dir = std::env::temp_dir().join(unique_name("edgegate-flood-"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let list: Vec<String> = prefixes.iter().map(|p| format!("{p}/24")).collect();
        let installed = match kind {
            Kind::Edgegate | Kind::EdgegateWithoutSample => {
                let object = if kind == Kind::Edgegate {
                    edgegate::filter::PROGRAM_OBJECT
                } else {
                    reference::FILTER_WITHOUT_DROP_SAMPLE
                };
                let options = FilterOptions {
                    interfaces: vec![SINK_IF.to_owned()],
                    mode: AttachMode::Native,
                    scope: Scope::Host,
                    ports: BTreeSet::new(),
                    max_entries: (prefixes.len() as u32 * 2).next_power_of_two().max(1024),
                    bpffs_dir: self.bpffs_dir.clone(),
                    audit: false,
                };
                let allowlist = Allowlist::parse(&list.join("\n")).expect("allowlist");
                let filter = self.sink.run(|| Filter::load_object(object, &options, &allowlist));
                Installed::Edgegate(Box::new(filter.expect("load edgegate's filter")))
            }
            Kind::Nftables => {
                let rules = format!(
                    "table netdev edgegate_bench {{\n  set allowed {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n\
                     \x20 counter dropped {{ }}\n  chain ingress {{\n    type filter hook ingress device \"{SINK_IF}\" priority -500; policy accept;\n\
                     \x20   ip saddr != @allowed counter name \"dropped\" drop\n  }}\n}}\n",
                    list.join(", ")
                );
                let file = dir.join("rules.nft");
                std::fs::write(&file, rules).expect("nft rules");
                run(self.sink.command("nft").arg("-f").arg(&file));
                Installed::Nftables
            }
            Kind::Ipset => {
                let mut restore = format!(
                    "create edgegate_bench hash:net family inet hashsize {} maxelem {}\n",
                    prefixes.len().next_power_of_two().max(1024),
                    (prefixes.len() * 2).max(65_536)
                );
                for cidr in &list {
                    restore.push_str(&format!("add edgegate_bench {cidr}\n"));
                }
                let file = dir.join("ipset.restore");
                std::fs::write(&file, restore).expect("ipset file");
                run(self.sink.command("ipset").args(["restore", "-file"]).arg(&file));
                run(self.sink.command("iptables").args([
                    "-t",
                    "raw",
                    "-A",
                    "PREROUTING",
                    "-i",
                    SINK_IF,
                    "-m",
                    "set",
                    "!",
                    "--match-set",
                    "edgegate_bench",
                    "src",
                    "-j",
                    "DROP",
                ]));
                Installed::Ipset
            }
            Kind::NoFilter => Installed::NoFilter,
            Kind::DropOnly => {
                let mut ebpf = aya::Ebpf::load(reference::DROP_ONLY).expect("load DROP-only");
                let program: &mut Xdp = ebpf
                    .program_mut("bench_drop")
                    .expect("bench_drop")
                    .try_into()
                    .expect("an XDP program");
                program.load().expect("load DROP-only");
                self.sink
                    .run(|| program.attach(SINK_IF, aya::programs::XdpMode::Driver))
                    .expect("attach DROP-only");
                Installed::DropOnly(ebpf)
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        installed
    }

    /// Packets `installed` has dropped so far (for no filter: packets the
    /// IP layer received, all of which it discards).
    fn dropped(&self, installed: &Installed) -> u64 {
        match installed {
            Installed::Edgegate(filter) => filter
                .counters()
                .expect("counters")
                .iter()
                .filter(|c| c.verdict == proxy_common::Verdict::Drop)
                .map(|c| c.packets)
                .sum(),
            Installed::Nftables => {
                let json = output(self.sink.command("nft").args([
                    "-j",
                    "list",
                    "counter",
                    "netdev",
                    "edgegate_bench",
                    "dropped",
                ]));
                let value: serde_json::Value = serde_json::from_str(&json).expect("nft JSON");
                value["nftables"]
                    .as_array()
                    .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
                    .expect("the nft counter")
            }
            Installed::Ipset => {
                let text = output(self.sink.command("iptables").args([
                    "-t",
                    "raw",
                    "-nvxL",
                    "PREROUTING",
                ]));
                text.lines()
                    .nth(2)
                    .and_then(|rule| rule.split_whitespace().next())
                    .and_then(|packets| packets.parse().ok())
                    .expect("the iptables rule's packet count")
            }
            Installed::DropOnly(_) => {
                // The veth's own count of frames its XDP program dropped.
                let stats = output(self.sink.command("ethtool").args(["-S", SINK_IF]));
                stats
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("rx_queue_0_xdp_drops:"))
                    .map(|v| v.trim().parse::<u64>().expect("xdp_drops"))
                    .sum()
            }
            Installed::NoFilter => {
                let snmp = output(self.sink.command("cat").arg("/proc/net/snmp"));
                let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
                let (names, values) = (ip.next().expect("Ip names"), ip.next().expect("Ip values"));
                let index =
                    names.split_whitespace().position(|n| n == "InReceives").expect("InReceives");
                values
                    .split_whitespace()
                    .nth(index)
                    .and_then(|v| v.parse().ok())
                    .expect("InReceives value")
            }
        }
    }

    fn remove(&self, installed: Installed) {
        match installed {
            Installed::Edgegate(filter) => {
                drop(filter);
                edgegate::filter::detach_pinned(&self.bpffs_dir, None).expect("detach edgegate");
            }
            Installed::Nftables => {
                run(self.sink.command("nft").args(["delete", "table", "netdev", "edgegate_bench"]));
            }
            Installed::Ipset => {
                run(self.sink.command("iptables").args(["-t", "raw", "-F", "PREROUTING"]));
                run(self.sink.command("ipset").args(["destroy", "edgegate_bench"]));
            }
            Installed::NoFilter => {}
            Installed::DropOnly(ebpf) => drop(ebpf),
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // The namespaces take nftables, iptables and ipset state with them.
        let _ = edgegate::filter::detach_pinned(&self.bpffs_dir, None);
    }
}

struct Run {
    elapsed: Duration,
    busy: Duration,
}

enum Installed {
    Edgegate(Box<Filter>),
    Nftables,
    Ipset,
    NoFilter,
    /// Detached when dropped.
    DropOnly(aya::Ebpf),
}

/// A TCP SYN from the generator to the sink's port 443 with valid checksums.
fn syn_frame() -> Vec<u8> {
    let mut frame = Vec::with_capacity(54);
    frame.extend_from_slice(&SINK_MAC);
    frame.extend_from_slice(&GENERATOR_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let source = Ipv4Addr::new(198, 18, 0, 1);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&SINK_ADDR.octets());
    let checksum = internet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&source.octets());
    pseudo[4..8].copy_from_slice(&SINK_ADDR.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let checksum = internet_checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}

/// RFC 1071 over the concatenation of `parts` (each of even length).
fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = parts
        .iter()
        .flat_map(|part| part.chunks(2))
        .map(|word| u32::from(u16::from_be_bytes([word[0], word[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `n` distinct /24 networks, the same ones on every run, none of them the bed's own.
fn prefixes(n: usize) -> Vec<Ipv4Addr> {
    let mut lcg = Lcg::new(0x0f10_0d00);
    let mut seen = BTreeSet::from([u32::from(SINK_ADDR) & 0xffff_ff00]);
    let mut prefixes = Vec::with_capacity(n);
    while prefixes.len() < n {
        let network = (lcg.next_u64() as u32) & 0xffff_ff00;
        if seen.insert(network) {
            prefixes.push(Ipv4Addr::from(network));
        }
    }
    prefixes
}

/// Busy time (everything but idle and iowait) of one CPU so far.
fn cpu_busy(cpu: usize) -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let prefix = format!("cpu{cpu} ");
    let line = stat.lines().find(|l| l.starts_with(&prefix)).expect("the CPU's line");
    let ticks: Vec<u64> =
        line.split_whitespace().skip(1).map(|v| v.parse().expect("ticks")).collect();
    let busy: u64 = ticks.iter().take(8).sum::<u64>() - ticks[3] - ticks[4];
    Duration::from_micros(busy * 1_000_000 / clock_ticks_per_second())
}

fn run(command: &mut Command) {
    let result = command.stdin(Stdio::null()).output().expect("run a command");
    assert!(
        result.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&result.stderr).trim()
    );
}

fn output(command: &mut Command) -> String {
    let result = command.stdin(Stdio::null()).output().expect("run a command");
    assert!(result.status.success(), "{command:?}: {}", String::from_utf8_lossy(&result.stderr));
    String::from_utf8(result.stdout).expect("UTF-8")
}

/// One filter with one list size: per-round receive-path CPU ns per packet
/// and the packets it was sent and dropped.
struct Row {
    size: usize,
    kind: Kind,
    path_ns: Vec<f64>,
    total_ns: Vec<f64>,
    sent: u64,
    dropped: u64,
}

impl Row {
    fn new(size: usize, kind: Kind) -> Self {
        Self { size, kind, path_ns: Vec::new(), total_ns: Vec::new(), sent: 0, dropped: 0 }
    }

    fn dropped_share(&self) -> f64 {
        self.dropped as f64 / self.sent as f64
    }
}

/// What every round adds up to: the generator's own cost, and the flooding
/// CPU's busy time against the elapsed time.
#[derive(Default)]
struct Totals {
    generator_ns: Vec<f64>,
    elapsed: Duration,
    busy: Duration,
}

fn main() {
    let settings = Settings::from_args();
    let bed = Bed::new();
    let mut totals = Totals::default();
    let mut rows = Vec::new();
    for &size in &settings.sizes {
        let list = prefixes(size);
        // The sample's cost is a few percent of a noisy figure: its two
        // builds take turns, round by round, so drift hits both alike.
        let mut paired =
            [Kind::Edgegate, Kind::EdgegateWithoutSample].map(|kind| Row::new(size, kind));
        for _ in 0..settings.rounds * PAIRED_ROUNDS_FACTOR {
            for row in &mut paired {
                bed.measure(row, &list, 1, settings.packets, &mut totals);
            }
        }
        rows.extend(paired);
        for kind in Kind::ALL.into_iter().filter(|kind| !kind.is_edgegate()) {
            let mut row = Row::new(size, kind);
            bed.measure(&mut row, &list, settings.rounds, settings.packets, &mut totals);
            rows.push(row);
        }
        for row in rows.iter().filter(|row| row.size == size) {
            eprintln!(
                "{size:>7} prefixes, {:<45} {:>5.0} ns/packet",
                row.kind.name(),
                median(&row.path_ns)
            );
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
        "traffic: TCP SYNs from random IPv4 sources, {} per round, {} rounds ({} for edgegate's two builds, \
         taking turns), generator pinned to CPU {CPU} (its own {:.0} ns/packet subtracted); \
         allowlists of distinct /24s",
        settings.packets,
        settings.rounds,
        settings.rounds * PAIRED_ROUNDS_FACTOR,
        median(&totals.generator_ns)
    );
    println!(
        "figures are the flooding CPU's time per packet; its busy time (/proc/stat) was {:.1}% of that time",
        busy_share * 100.0
    );
    println!(
        "\n| prefixes | filter | Mpps per core (median) | min–max | CPU s per Mpkt | dropped / sent | edgegate ÷ this |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let mpps = |ns: f64| 1e3 / ns;
    for row in rows {
        let edgegate = rows
            .iter()
            .find(|r| r.size == row.size && r.kind == Kind::Edgegate)
            .map(|r| median(&r.path_ns))
            .expect("edgegate's row");
        // The fastest round has the fewest ns per packet.
        let (fastest, slowest) = spread(&row.path_ns);
        let (low, high) = (mpps(slowest), mpps(fastest));
        let ratio = if row.kind == Kind::Edgegate {
            "—".to_owned()
        } else {
            format!("{:.2}×", median(&row.path_ns) / edgegate)
        };
        println!(
            "| {} | {} | {:.2} | {low:.2}–{high:.2} | {:.3} | {:.1}% | {ratio} |",
            row.size,
            row.kind.name(),
            mpps(median(&row.path_ns)),
            median(&row.path_ns) / 1e3,
            row.dropped_share() * 100.0,
        );
    }
    for &size in &settings.sizes {
        let rounds = |kind: Kind| {
            &rows.iter().find(|r| r.size == size && r.kind == kind).expect("row").path_ns
        };
        let of = |kind: Kind| median(rounds(kind));
        let best_peer = of(Kind::Nftables).min(of(Kind::Ipset));
        let target = if size == 10_000 { " (target: ≥ 5×)" } else { "" };
        println!(
            "\n{size} prefixes: edgegate drops {:.1}× the packets/s of the best of nftables and ipset per core{target}",
            best_peer / of(Kind::Edgegate)
        );
        let ratios: Vec<f64> = rounds(Kind::Edgegate)
            .iter()
            .zip(rounds(Kind::EdgegateWithoutSample))
            .map(|(with, without)| with / without)
            .collect();
        let (low, high) = spread(&ratios);
        println!(
            "{size} prefixes: the drop sample costs {:+.1}% per packet, median of {} back-to-back pairs \
             ({:+.1}%..{:+.1}%; target: ≤ 5%)",
            (median(&ratios) - 1.0) * 100.0,
            ratios.len(),
            (low - 1.0) * 100.0,
            (high - 1.0) * 100.0,
        );
    }

    let json = serde_json::json!({
        "packets_per_round": settings.packets,
        "generator_ns_per_packet": totals.generator_ns,
        "busy_share_of_elapsed": busy_share,
        "rows": rows.iter().map(|r| serde_json::json!({
            "prefixes": r.size,
            "filter": r.kind.name(),
            "receive_path_ns_per_packet": r.path_ns,
            "total_ns_per_packet": r.total_ns,
            "dropped_share": r.dropped_share(),
        })).collect::<Vec<_>>(),
    });
    save("flood", &json);
}
