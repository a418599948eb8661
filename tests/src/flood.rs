//! For `bench flood`: two namespaces joined by a veth pair, a live-frames
//! traffic generator in one and, in the other, the filter under test
//! (edgegate's XDP program with and without its drop sample, nftables,
//! iptables with ipset, none, or an XDP drop-all floor), installed, counted
//! and removed; and the CPU time a flood takes. Removed on drop.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
    sync::Barrier,
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    programs::{ProgramError, TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
    sys::SyscallError,
};
use edgegate::{
    allowlist::Allowlist,
    config::{AttachMode, Scope},
    demo::netns::{Netns, ip},
    filter::{Filter, FilterOptions},
};

use crate::{
    bench::clock_ticks_per_second,
    packet::{self, ETHERTYPE_IPV4, ETHERTYPE_IPV6},
    reference, unique_name,
};

const GENERATOR_IF: &str = "egfgen";
const SINK_IF: &str = "egfsink";
const SINK_MAC: [u8; 6] = [0x02, 0xe9, 0, 0, 0, 0x02];
const GENERATOR_MAC: [u8; 6] = [0x02, 0xe9, 0, 0, 0, 0x01];
pub const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const SINK_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);
const PORT: u16 = 443;

/// The most CPUs that flood at once: the veth has a receive queue for each.
pub const MAX_CPUS: usize = 2;
/// Frames per live-frames batch: the kernel flushes redirects (and the veth
/// peer polls them) once per batch.
const BATCH: u32 = 64;

/// The address family of the flood and of the allowlist.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// The generator's programs: (send the frame on, drop it).
    pub fn programs(self) -> (&'static str, &'static str) {
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
    pub fn prefix_len(self, listed: Listed) -> u8 {
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
pub enum Listed {
    /// A partner's ranges: IPv4 /24s, IPv6 /48s.
    Networks,
    /// Single addresses: IPv4 /32s, IPv6 /128s.
    Hosts,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Edgegate,
    EdgegateWithoutSample,
    Nftables,
    Ipset,
    NoFilter,
    DropOnly,
}

impl Kind {
    pub const ALL: [Self; 6] = [
        Self::Edgegate,
        Self::EdgegateWithoutSample,
        Self::Nftables,
        Self::Ipset,
        Self::NoFilter,
        Self::DropOnly,
    ];

    pub fn is_edgegate(self) -> bool {
        matches!(self, Self::Edgegate | Self::EdgegateWithoutSample)
    }

    pub fn name(self) -> &'static str {
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
pub struct Bed {
    generator_ns: Netns,
    sink: Netns,
    generator: aya::Ebpf,
    bpffs_dir: std::path::PathBuf,
}

impl Default for Bed {
    fn default() -> Self {
        Self::new()
    }
}

impl Bed {
    pub fn new() -> Self {
        crate::require_root();
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
    /// in a container, `EINVAL` before Linux 5.18, which added live frames);
    /// any other failure is this bench's own and panics.
    pub fn live_frames_refused(&self) -> Option<String> {
        let name = Family::V4.programs().0;
        let program: &Xdp = self.generator.program(name).expect(name).try_into().expect("XDP");
        let frame = syn_frame(Family::V4);
        let error = self
            .generator_ns
            .run(|| {
                program.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    repeat: 1,
                    attrs: TestRunAttrs::new().xdp_live_frames(1),
                    ..TestRunOptions::new()
                })
            })
            .err()?;
        let refused = matches!(
            &error,
            ProgramError::SyscallError(SyscallError { io_error, .. })
                if matches!(io_error.raw_os_error(), Some(libc::EPERM | libc::EINVAL))
        );
        assert!(refused, "a live-frames test run failed: {error:?}");
        // aya says which call failed; its source says why.
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Some(text)
    }

    /// Runs `program` for `packets` frames on each of the first `cpus` CPUs
    /// at once: the time the run took (until every CPU was done), and those
    /// CPUs' busy time over it (a cross-check that the receive path ran
    /// within the run, on them).
    pub fn flood(&self, program: &str, family: Family, cpus: usize, packets: u32) -> Run {
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

    /// Installs `kind` with `list` (of `family`'s prefixes) on the sink's interface.
    pub fn install(&self, kind: Kind, family: Family, list: &[String]) -> Installed {
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
    pub fn dropped(&self, installed: &Installed, family: Family) -> u64 {
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

    pub fn remove(&self, installed: Installed, family: Family) {
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

pub struct Run {
    pub elapsed: Duration,
    pub busy: Duration,
}

pub enum Installed {
    Edgegate(Box<Filter>),
    Nftables,
    Ipset,
    NoFilter,
    /// Detached when dropped.
    DropOnly(aya::Ebpf),
}

/// A TCP SYN from the generator to the sink's port 443 with valid checksums.
fn syn_frame(family: Family) -> Vec<u8> {
    let (ethertype, source, destination) = match family {
        Family::V4 => {
            (ETHERTYPE_IPV4, IpAddr::from(Ipv4Addr::new(198, 18, 0, 1)), IpAddr::from(SINK_ADDR))
        }
        Family::V6 => (
            ETHERTYPE_IPV6,
            IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            IpAddr::from(SINK_ADDR6),
        ),
    };
    let syn = packet::tcp_syn(source, destination, PORT);
    packet::ethernet_to(SINK_MAC, GENERATOR_MAC, ethertype, &syn)
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
