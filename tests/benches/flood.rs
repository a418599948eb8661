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
    process::{Command, Stdio},
    sync::Barrier,
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use edgegate::{
    allowlist::Allowlist,
    config::{AttachMode, Scope},
    demo::netns::{Netns, ip},
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
const SINK_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);
const PORT: u16 = 443;
/// The most CPUs that flood at once: the veth has a receive queue for each.
const MAX_CPUS: usize = 2;
/// Frames per live-frames batch: the kernel flushes redirects (and the veth
/// peer polls them) once per batch.
const BATCH: u32 = 64;
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

/// The address family of the flood and of the allowlist.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// The generator's programs: (send the frame on, drop it).
    fn programs(self) -> (&'static str, &'static str) {
        match self {
            Self::V4 => ("flood_redirect", "flood_drop"),
            Self::V6 => ("flood6_redirect", "flood6_drop"),
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// The length of the listed prefixes.
    fn prefix_len(self, listed: Listed) -> u8 {
        match (self, listed) {
            (Self::V4, Listed::Networks) => 24,
            (Self::V6, Listed::Networks) => 48,
            (Self::V4, Listed::Hosts) => 32,
            (Self::V6, Listed::Hosts) => 128,
        }
    }
}

/// What the allowlist holds. Its share of the address space is the share
/// of a random-source flood that every filter must pass up the stack:
/// 1M IPv4 /24s are 6% of it, 1M /32s 0.02%.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// A partner's ranges: IPv4 /24s, IPv6 /48s.
    Networks,
    /// Single addresses: IPv4 /32s, IPv6 /128s.
    Hosts,
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
    bpffs_dir: std::path::PathBuf,
}

impl Bed {
    fn new() -> Self {
        edgegate_tests::require_root();
        let generator_ns = Netns::new("egfg");
        let sink = Netns::new("egfs");
        // One receive queue per flooding CPU: a redirect lands in the queue
        // of the CPU it runs on, and each queue is polled there.
        let queues = MAX_CPUS.to_string();
        let queues = ["numtxqueues", queues.as_str(), "numrxqueues", queues.as_str()];
        ip(&[
            &["link", "add", GENERATOR_IF, "netns", generator_ns.name()][..],
            &queues,
            &["type", "veth", "peer", "name", SINK_IF, "netns", sink.name()],
            &queues,
        ]
        .concat());
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        generator_ns.ip(&["link", "set", GENERATOR_IF, "address", &mac(GENERATOR_MAC), "up"]);
        generator_ns.ip(&["addr", "add", "10.99.0.1/24", "dev", GENERATOR_IF]);
        sink.ip(&["link", "set", SINK_IF, "address", &mac(SINK_MAC), "up"]);
        sink.ip(&["addr", "add", &format!("{SINK_ADDR}/24"), "dev", SINK_IF]);
        // No duplicate address detection: a tentative address takes no traffic.
        sink.ip(&["-6", "addr", "add", &format!("{SINK_ADDR6}/64"), "dev", SINK_IF, "nodad"]);
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
        for name in [Family::V4, Family::V6].into_iter().flat_map(|f| <[_; 2]>::from(f.programs()))
        {
            let program: &mut Xdp =
                generator.program_mut(name).expect(name).try_into().expect("an XDP program");
            program.load().expect("load the generator program");
        }
        let bpffs_dir = std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("egflood"));
        Self { generator_ns, sink, generator, bpffs_dir }
    }

    /// One live-frames run of one frame: whether this kernel and this
    /// process may generate traffic that way at all. Some hosts refuse it
    /// (`EPERM` where the process lacks `CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN`
    /// in a container, `EINVAL` before Linux 5.18, which added live frames).
    fn live_frames_refused(&self) -> Option<String> {
        let name = Family::V4.programs().0;
        let program: &Xdp = self.generator.program(name).expect(name).try_into().expect("XDP");
        let frame = syn_frame(Family::V4);
        self.generator_ns
            .run(|| {
                program.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    repeat: 1,
                    attrs: TestRunAttrs::new().xdp_live_frames(1),
                    ..TestRunOptions::new()
                })
            })
            .err()
            .map(|e| {
                // aya says which call failed; its source says why.
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    text.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                text
            })
    }

    /// Runs `program` for `packets` frames on each of the first `cpus` CPUs
    /// at once: the time the run took (until every CPU was done), and those
    /// CPUs' busy time over it (a cross-check that the receive path ran
    /// within the run, on them).
    fn flood(&self, program: &str, family: Family, cpus: usize, packets: u32) -> Run {
        let program: &Xdp =
            self.generator.program(program).expect(program).try_into().expect("XDP");
        let frame = syn_frame(family);
        let start = Barrier::new(cpus + 1);
        let busy_before: Duration = (0..cpus).map(cpu_busy).sum();
        let elapsed = std::thread::scope(|scope| {
            for cpu in 0..cpus {
                let (start, frame) = (&start, &frame);
                scope.spawn(move || {
                    self.generator_ns.run(|| {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(cpu).expect("CPU");
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                            .expect("pin");
                        start.wait();
                        program
                            .test_run(TestRunOptions {
                                data_in: Some(frame),
                                repeat: packets,
                                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                                ..TestRunOptions::new()
                            })
                            .expect("live-frames test run");
                    })
                });
            }
            start.wait();
            let started = Instant::now();
            // Leaving the scope joins every flooding thread.
            started
        })
        .elapsed();
        // Let the scheduler tick account for the end of the run.
        std::thread::sleep(Duration::from_millis(20));
        let busy_after: Duration = (0..cpus).map(cpu_busy).sum();
        Run { elapsed, busy: busy_after - busy_before }
    }

    /// Installs `row`'s filter with `prefixes`, floods it for `rounds`
    /// rounds of `packets` per CPU and removes it, adding to `row` and `totals`.
    fn measure(
        &self,
        row: &mut Row,
        prefixes: &[String],
        rounds: usize,
        packets: u32,
        totals: &mut Totals,
    ) {
        let per_packet = |run: &Run| run.elapsed.as_secs_f64() * 1e9 / f64::from(packets);
        let (redirect, drop) = row.family.programs();
        let installed = self.install(row.kind, row.family, prefixes);
        self.flood(redirect, row.family, row.cpus, 100_000); // warm-up
        let dropped_before = self.dropped(&installed, row.family);
        for _ in 0..rounds {
            let own = self.flood(drop, row.family, row.cpus, packets);
            let total = self.flood(redirect, row.family, row.cpus, packets);
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
        row.dropped += self.dropped(&installed, row.family) - dropped_before;
        row.sent += u64::from(packets) * (rounds * row.cpus) as u64;
        self.remove(installed, row.family);
    }

    /// Installs `kind` with `list` (of `family`'s prefixes) on the sink's interface.
    fn install(&self, kind: Kind, family: Family, list: &[String]) -> Installed {
        let dir = std::env::temp_dir().join(unique_name("edgegate-flood-"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (nft_type, nft_match, ipset_family) = match family {
            Family::V4 => ("ipv4_addr", "ip", "inet"),
            Family::V6 => ("ipv6_addr", "ip6", "inet6"),
        };
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
                    tunnels: edgegate::config::Tunnels::standard(),
                    max_entries: (list.len() as u32 * 2).next_power_of_two().max(1024),
                    bpffs_dir: self.bpffs_dir.clone(),
                    audit: false,
                };
                let allowlist = Allowlist::parse(&list.join("\n")).expect("allowlist");
                let filter = self.sink.run(|| Filter::load_object(object, &options, &allowlist));
                Installed::Edgegate(Box::new(filter.expect("load edgegate's filter")))
            }
            Kind::Nftables => {
                let rules = format!(
                    "table netdev edgegate_bench {{\n  set allowed {{ type {nft_type}; flags interval; elements = {{ {} }} }}\n\
                     \x20 counter dropped {{ }}\n  chain ingress {{\n    type filter hook ingress device \"{SINK_IF}\" priority -500; policy accept;\n\
                     \x20   {nft_match} saddr != @allowed counter name \"dropped\" drop\n  }}\n}}\n",
                    list.join(", ")
                );
                let file = dir.join("rules.nft");
                std::fs::write(&file, rules).expect("nft rules");
                run(self.sink.command("nft").arg("-f").arg(&file));
                Installed::Nftables
            }
            Kind::Ipset => {
                let mut restore = format!(
                    "create edgegate_bench hash:net family {ipset_family} hashsize {} maxelem {}\n",
                    list.len().next_power_of_two().max(1024),
                    (list.len() * 2).max(65_536)
                );
                for cidr in list {
                    restore.push_str(&format!("add edgegate_bench {cidr}\n"));
                }
                let file = dir.join("ipset.restore");
                std::fs::write(&file, restore).expect("ipset file");
                run(self.sink.command("ipset").args(["restore", "-file"]).arg(&file));
                run(self.sink.command(family.iptables()).args([
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
    fn dropped(&self, installed: &Installed, family: Family) -> u64 {
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
                let text = output(self.sink.command(family.iptables()).args([
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
                // The veth's own count of frames its XDP program dropped, per queue.
                let stats = output(self.sink.command("ethtool").args(["-S", SINK_IF]));
                stats
                    .lines()
                    .filter_map(|l| {
                        let (name, value) = l.trim().split_once(':')?;
                        let queue = name.strip_prefix("rx_queue_")?.strip_suffix("_xdp_drops")?;
                        queue.parse::<usize>().ok().map(|_| value)
                    })
                    .map(|v| v.trim().parse::<u64>().expect("xdp_drops"))
                    .sum()
            }
            Installed::NoFilter => match family {
                Family::V4 => {
                    let snmp = output(self.sink.command("cat").arg("/proc/net/snmp"));
                    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
                    let (names, values) =
                        (ip.next().expect("Ip names"), ip.next().expect("Ip values"));
                    let index = names
                        .split_whitespace()
                        .position(|n| n == "InReceives")
                        .expect("InReceives");
                    values
                        .split_whitespace()
                        .nth(index)
                        .and_then(|v| v.parse().ok())
                        .expect("InReceives value")
                }
                Family::V6 => {
                    let snmp = output(self.sink.command("cat").arg("/proc/net/snmp6"));
                    snmp.lines()
                        .find_map(|l| l.strip_prefix("Ip6InReceives"))
                        .and_then(|v| v.trim().parse().ok())
                        .expect("Ip6InReceives")
                }
            },
        }
    }

    fn remove(&self, installed: Installed, family: Family) {
        match installed {
            Installed::Edgegate(filter) => {
                drop(filter);
                edgegate::filter::detach_pinned(&self.bpffs_dir, None).expect("detach edgegate");
            }
            Installed::Nftables => {
                run(self.sink.command("nft").args(["delete", "table", "netdev", "edgegate_bench"]));
            }
            Installed::Ipset => {
                run(self.sink.command(family.iptables()).args(["-t", "raw", "-F", "PREROUTING"]));
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
fn syn_frame(family: Family) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let (ethertype, ip, pseudo) = match family {
        Family::V4 => {
            let source = Ipv4Addr::new(198, 18, 0, 1);
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&source.octets());
            ip[16..20].copy_from_slice(&SINK_ADDR.octets());
            let checksum = internet_checksum(&[&ip]);
            ip[10..12].copy_from_slice(&checksum.to_be_bytes());
            let mut pseudo = vec![0u8; 12];
            pseudo[0..4].copy_from_slice(&source.octets());
            pseudo[4..8].copy_from_slice(&SINK_ADDR.octets());
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
            (0x0800u16, ip, pseudo)
        }
        Family::V6 => {
            let source = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6; // TCP
            ip[7] = 64;
            ip[8..24].copy_from_slice(&source.octets());
            ip[24..40].copy_from_slice(&SINK_ADDR6.octets());
            let mut pseudo = vec![0u8; 40];
            pseudo[0..16].copy_from_slice(&source.octets());
            pseudo[16..32].copy_from_slice(&SINK_ADDR6.octets());
            pseudo[32..36].copy_from_slice(&20u32.to_be_bytes());
            pseudo[39] = 6;
            (0x86ddu16, ip, pseudo)
        }
    };
    let checksum = internet_checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = Vec::with_capacity(14 + ip.len() + tcp.len());
    frame.extend_from_slice(&SINK_MAC);
    frame.extend_from_slice(&GENERATOR_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
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
        eprintln!(
            "bench flood: not measured: the kernel refused a live-frames BPF_PROG_TEST_RUN, this \
             bench's traffic generator ({refusal}). It needs Linux 5.18 or newer and, for this \
             process, CAP_SYS_ADMIN and CAP_SYS_RESOURCE (a container may withhold them): run it \
             as root on the host."
        );
        drop(bed);
        std::process::exit(1);
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
                            bed.measure(row, &list, 1, settings.packets, &mut totals);
                        }
                    }
                    paired.sort_by_key(|row| row.kind != Kind::Edgegate);
                    rows.extend(paired);
                } else {
                    kinds.insert(0, Kind::Edgegate);
                }
                for kind in kinds {
                    let mut row = Row::new(family, cpus, size, kind);
                    bed.measure(&mut row, &list, settings.rounds, settings.packets, &mut totals);
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
