//! Loads the XDP program, owns its maps, attaches it to interfaces and pins
//! everything under the bpffs directory so that filtering outlives the daemon.
//!
//! Pin layout under `bpffs_dir`:
//! - `maps/EG_*`: the program's maps (aya re-opens them by name on load);
//! - `links/<mode>-<interface>`: one XDP link per interface; the mode is in the
//!   name because the kernel does not report it for links.
//!
//! A restarting daemon loads a fresh program against the pinned maps and swaps
//! it into each pinned link with `bpf_link_update`: the interface is never
//! without a program, and never has two.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs, io,
    net::IpAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, MapInfo, PerCpuArray, lpm_trie::Key},
    pin::PinError,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use ipnet::IpNet;
use proxy_common::{
    Counter, Family, FilterConfig as KernelConfig, Lookup, PORT_BITMAP_WORDS, Reason, Rule,
    counter_index, map,
};
use serde::{Deserialize, Serialize};

use crate::{
    allowlist::{Action, Allowlist},
    config::{AttachMode, Scope},
};

/// The compiled XDP program, built by `build.rs` from `proxy-ebpf`.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edgegate.bpf.o"));

/// Reference programs the benchmarks compare the filter with, and drive it with.
pub mod reference {
    /// Returns XDP_DROP and nothing else: the cost floor of running any program.
    pub static DROP_ONLY: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-drop.bpf.o"));
    /// One LPM-trie lookup of the source address (maps `BENCH_V4_TRIE`,
    /// `BENCH_V6_TRIE`; any value means allowed).
    pub static PLAIN_LPM: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-lpm.bpf.o"));
    /// `cargo xtask bench flood`'s traffic generator: programs `flood_redirect`
    /// (random IPv4 source, out of the global `TARGET_IFINDEX`) and
    /// `flood_drop` (the same rewrite, then dropped).
    pub static FLOOD_GENERATOR: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-flood.bpf.o"));
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the filter could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The pin directory is not on a BPF filesystem, and it is not the standard one we could mount.
    #[error(
        "{} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf`",
        dir.display()
    )]
    BpffsNotMounted { dir: PathBuf },
    /// Mounting the standard bpffs failed.
    #[error("cannot mount bpffs on /sys/fs/bpf: {0}")]
    MountBpffs(#[source] nix::Error),
    /// A configured interface does not exist.
    #[error("interface `{name}` does not exist (see `ip link`)")]
    UnknownInterface { name: String },
    /// The object file or its maps could not be loaded (or the pinned maps opened).
    #[error("cannot load the XDP program: {0}")]
    Load(#[source] aya::EbpfError),
    /// The verifier rejected the program; the message holds its log.
    #[error("the kernel refused the XDP program: {0}")]
    Verify(#[source] ProgramError),
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// `mode = "native"` on an interface whose driver cannot run XDP.
    #[error(
        "`{interface}` has no native XDP support in its driver; use mode = \"auto\" (falls back \
         to skb mode) or mode = \"skb\""
    )]
    NativeUnsupported { interface: String },
    /// Attaching failed for another reason.
    #[error("cannot attach XDP to `{interface}` in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: AttachedMode,
        #[source]
        source: ProgramError,
    },
    /// A pinned link exists but could not be opened or updated.
    #[error("cannot take over the pinned XDP link {}: {source}", path.display())]
    Adopt {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    /// The kernel attached through netlink, without an XDP link that could be pinned.
    #[error(
        "the kernel attached XDP to `{interface}` without a BPF link (Linux < 5.9?); edgegate \
         needs XDP links so that filtering survives restarts"
    )]
    NoLinkSupport { interface: String },
    /// Pinning a new link failed.
    #[error("cannot pin the XDP link at {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    /// A file-system operation on the pin directory failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The list (while replacing: old and new together) would not fit in the maps.
    #[error(
        "the {family} rules need room for {needed} entries while they change, but the maps hold \
         {capacity}; raise `filter.max_entries` (and run `edgegate detach` before restarting, so \
         the maps are recreated)"
    )]
    Capacity { family: &'static str, needed: usize, capacity: u32 },
}

/// The mode an interface's program actually runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Native,
    Skb,
}

impl AttachedMode {
    const ALL: [Self; 2] = [Self::Native, Self::Skb];

    fn xdp_mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Skb => XdpMode::Skb,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Skb => "skb",
        }
    }
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a configured interface came to be filtered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachedMode,
    /// The link was pinned by an earlier daemon and taken over.
    pub adopted: bool,
}

/// Everything the loader needs from the configuration.
#[derive(Debug, Clone)]
pub struct FilterOptions {
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub scope: Scope,
    pub ports: BTreeSet<u16>,
    pub max_entries: u32,
    pub bpffs_dir: PathBuf,
}

/// Sums of the per-CPU counters for one (family, reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub family: String,
    pub reason: String,
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Hits of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHits {
    pub cidr: IpNet,
    pub action: Action,
    pub hits: u64,
}

/// The loaded program, its maps and its links.
pub struct Filter {
    ebpf: Ebpf,
    kernel_config: Array<MapData, KernelConfig>,
    v4_rules: HashMap<MapData, Key<[u8; 4]>, Rule>,
    v4_trie: LpmTrie<MapData, [u8; 4], Rule>,
    v6_rules: HashMap<MapData, Key<[u8; 16]>, Rule>,
    v6_trie: LpmTrie<MapData, [u8; 16], Rule>,
    counters: PerCpuArray<MapData, Counter>,
    /// What the rule maps hold, mirrored so that changes can be diffed.
    installed: BTreeMap<IpNet, Action>,
    /// Entries per family the maps can hold.
    capacity: u32,
    attachments: Vec<Attachment>,
    /// One descriptor per attachment, opened at start-up (with the
    /// privileges the pins need) to check the link's state later.
    links: Vec<OwnedFd>,
    /// The program's aya-log records, until `forward_logs` takes them.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Next value of the config map; scope and ports never change while running.
    config: KernelConfig,
}

impl Filter {
    /// Loads the program against the pinned maps (creating them the first
    /// time), installs `list`, then attaches or adopts every interface.
    /// Rules are in place before any new attachment, so a fresh interface
    /// never passes through a moment with an empty list.
    pub fn load(options: &FilterOptions, list: &Allowlist) -> Result<Self, FilterError> {
        let if_indexes = options
            .interfaces
            .iter()
            .map(|name| if_index(name).map(|index| (name.clone(), index)))
            .collect::<Result<Vec<_>, _>>()?;
        let first_start = !options.bpffs_dir.exists();
        let loaded = Self::open(options, list).and_then(|mut filter| {
            let links_dir = options.bpffs_dir.join("links");
            create_dir(&links_dir)?;
            for (name, index) in &if_indexes {
                let attachment =
                    attach(filter.program_mut(), &links_dir, name, *index, options.mode)?;
                let pin = links_dir.join(link_pin_name(attachment.mode, name));
                let link = open_pinned(&pin).map_err(|source| FilterError::Io {
                    op: "open",
                    path: pin,
                    source,
                })?;
                filter.links.push(link);
                filter.attachments.push(attachment);
            }
            release_unconfigured_links(&links_dir, &options.interfaces)?;
            Ok(filter)
        });
        // A first start that fails leaves nothing behind. A restart that fails
        // keeps what was pinned: filtering with the last list beats none.
        if loaded.is_err()
            && first_start
            && let Err(e) = detach_pinned(&options.bpffs_dir, None)
        {
            tracing::warn!("cannot clean up {}: {e}", options.bpffs_dir.display());
        }
        loaded
    }

    /// Loads the program and fills its maps without attaching it anywhere:
    /// what `load` does first, and what tests and benchmarks run packets through.
    pub fn open(options: &FilterOptions, list: &Allowlist) -> Result<Self, FilterError> {
        prepare_bpffs(&options.bpffs_dir)?;
        let maps_dir = options.bpffs_dir.join("maps");
        create_dir(&maps_dir)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(map::V4_RULES, options.max_entries)
            .map_max_entries(map::V4_TRIE, options.max_entries)
            .map_max_entries(map::V6_RULES, options.max_entries)
            .map_max_entries(map::V6_TRIE, options.max_entries)
            .load(PROGRAM_OBJECT)
            .map_err(FilterError::Load)?;
        let capacity = MapInfo::from_pin(maps_dir.join(map::V4_RULES))
            .map(|info| info.max_entries())
            .map_err(|source| FilterError::Map { name: map::V4_RULES, source })?;
        if capacity != options.max_entries {
            tracing::warn!(
                "the pinned rule maps hold {capacity} entries per family, not filter.max_entries = {}; \
                 run `edgegate detach` before starting to recreate them",
                options.max_entries
            );
        }

        let mut filter = Self {
            kernel_config: take_map(&mut ebpf, map::CONFIG)?,
            v4_rules: take_map(&mut ebpf, map::V4_RULES)?,
            v4_trie: take_map(&mut ebpf, map::V4_TRIE)?,
            v6_rules: take_map(&mut ebpf, map::V6_RULES)?,
            v6_trie: take_map(&mut ebpf, map::V6_TRIE)?,
            counters: take_map(&mut ebpf, map::COUNTERS)?,
            installed: BTreeMap::new(),
            capacity,
            attachments: Vec::new(),
            links: Vec::new(),
            logger: None,
            config: KernelConfig::EMPTY,
            ebpf,
        };
        filter.installed = filter.read_installed()?;
        filter.config = KernelConfig {
            scope: match options.scope {
                Scope::Ports => proxy_common::Scope::Ports as u32,
                Scope::Host => proxy_common::Scope::Host as u32,
            },
            ..lookup_config(&filter.installed, KernelConfig::EMPTY)
        };
        (filter.config.ephemeral_first, filter.config.ephemeral_last) = ephemeral_port_range();
        filter.write_config()?;
        filter.set_ports(&options.ports)?;
        filter.apply(list)?;
        filter.program_mut().load().map_err(FilterError::Verify)?;
        // After loading: the loaded program holds its own reference to the log
        // map, so the logger may be dropped when nobody forwards its records.
        filter.logger = aya_log::EbpfLogger::init(&mut filter.ebpf)
            .inspect_err(|e| tracing::warn!("XDP program diagnostics will not be logged: {e}"))
            .ok();
        Ok(filter)
    }

    /// The loaded XDP program.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(proxy_common::PROGRAM_NAME)
            .expect("the object defines the program")
            .try_into()
            .expect("the program is XDP")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(proxy_common::PROGRAM_NAME)
            .expect("the object defines the program")
            .try_into()
            .expect("the program is XDP")
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Forwards the program's diagnostics into the daemon's log (needs a runtime).
    pub fn forward_logs(&mut self) {
        if let Some(logger) = self.logger.take() {
            spawn_log_forwarder(logger);
        }
    }

    /// Checks that every attachment is still in force: its link is bound to
    /// the interface that now has that name. An interface deleted (and
    /// perhaps recreated) or a link detached by hand fails this.
    pub fn verify_attachments(&self) -> Result<(), String> {
        for (attachment, link) in self.attachments.iter().zip(&self.links) {
            let name = &attachment.interface;
            let attached_to = link_ifindex(link)
                .map_err(|e| format!("`{name}`: its XDP link cannot be read ({e})"))?;
            match if_index(name) {
                Ok(index) if index == attached_to => {}
                Ok(_) | Err(_) if attached_to == 0 => {
                    return Err(format!("`{name}`: the XDP program is no longer attached"));
                }
                Ok(_) => {
                    return Err(format!("`{name}` was recreated; the XDP program is not on it"));
                }
                Err(_) => return Err(format!("`{name}` no longer exists")),
            }
        }
        Ok(())
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Makes the rule maps hold exactly `list`.
    ///
    /// Ordered so that no source allowed by both the current and the new list
    /// is dropped at any instant: first every new or changed rule is written,
    /// longest prefixes first, then every stale rule is removed, shortest
    /// prefixes first. (Writing a short rule before a longer one of the new
    /// list, or removing a long rule before a shorter old one, could expose a
    /// deny in between.) The lookup configuration covers the union of both
    /// lists until the end.
    pub fn apply(&mut self, list: &Allowlist) -> Result<(), FilterError> {
        self.check_capacity(list)?;
        let desired: BTreeMap<IpNet, Action> = list.entries().map(|e| (e.cidr, e.action)).collect();

        let mut upserts: Vec<(IpNet, Action)> = desired
            .iter()
            .filter(|(cidr, action)| self.installed.get(cidr) != Some(action))
            .map(|(cidr, action)| (*cidr, *action))
            .collect();
        let mut removals: Vec<IpNet> =
            self.installed.keys().filter(|c| !desired.contains_key(c)).copied().collect();
        if upserts.is_empty() && removals.is_empty() {
            return Ok(());
        }
        upserts.sort_by_key(|(cidr, _)| std::cmp::Reverse(cidr.prefix_len()));
        removals.sort_by_key(IpNet::prefix_len);

        let mut union = self.installed.clone();
        union.extend(desired.iter().map(|(c, a)| (*c, *a)));
        self.config = lookup_config(&union, self.config);
        self.write_config()?;
        for (cidr, action) in upserts {
            self.insert_rule(cidr, action)?;
            self.installed.insert(cidr, action);
        }
        for cidr in removals {
            self.remove_rule(cidr)?;
            self.installed.remove(&cidr);
        }
        self.config = lookup_config(&self.installed, self.config);
        self.write_config()
    }

    /// Refuses, before touching any map, a list that would not fit while it replaces the current one.
    pub fn check_capacity(&self, list: &Allowlist) -> Result<(), FilterError> {
        for (family, is_family) in [
            ("IPv4", (|c: &IpNet| matches!(c, IpNet::V4(_))) as fn(&IpNet) -> bool),
            ("IPv6", |c: &IpNet| matches!(c, IpNet::V6(_))),
        ] {
            let kept = self.installed.keys().filter(|c| is_family(c)).count();
            let added = list
                .entries()
                .filter(|e| is_family(&e.cidr) && !self.installed.contains_key(&e.cidr))
                .count();
            if kept + added > self.capacity as usize {
                return Err(FilterError::Capacity {
                    family,
                    needed: kept + added,
                    capacity: self.capacity,
                });
            }
        }
        Ok(())
    }

    fn insert_rule(&mut self, cidr: IpNet, action: Action) -> Result<(), FilterError> {
        let rule = Rule::new(action.to_kernel());
        match cidr {
            IpNet::V4(net) => {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                self.v4_rules.insert(key, rule, 0).map_err(map_error(map::V4_RULES))?;
                self.v4_trie.insert(&key, rule, 0).map_err(map_error(map::V4_TRIE))
            }
            IpNet::V6(net) => {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                self.v6_rules.insert(key, rule, 0).map_err(map_error(map::V6_RULES))?;
                self.v6_trie.insert(&key, rule, 0).map_err(map_error(map::V6_TRIE))
            }
        }
    }

    fn remove_rule(&mut self, cidr: IpNet) -> Result<(), FilterError> {
        match cidr {
            IpNet::V4(net) => {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                ignore_missing(self.v4_rules.remove(&key)).map_err(map_error(map::V4_RULES))?;
                ignore_missing(self.v4_trie.remove(&key)).map_err(map_error(map::V4_TRIE))
            }
            IpNet::V6(net) => {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                ignore_missing(self.v6_rules.remove(&key)).map_err(map_error(map::V6_RULES))?;
                ignore_missing(self.v6_trie.remove(&key)).map_err(map_error(map::V6_TRIE))
            }
        }
    }

    /// The rules the (possibly adopted) maps hold. The hash maps are the
    /// reference; the tries always hold the same keys.
    fn read_installed(&self) -> Result<BTreeMap<IpNet, Action>, FilterError> {
        let mut installed = BTreeMap::new();
        for entry in self.v4_rules.iter() {
            let (key, rule) = entry.map_err(map_error(map::V4_RULES))?;
            if let Some(cidr) = cidr_of(IpAddr::from(key.data()), key.prefix_len()) {
                installed.insert(cidr, action_of(&rule));
            }
        }
        for entry in self.v6_rules.iter() {
            let (key, rule) = entry.map_err(map_error(map::V6_RULES))?;
            if let Some(cidr) = cidr_of(IpAddr::from(key.data()), key.prefix_len()) {
                installed.insert(cidr, action_of(&rule));
            }
        }
        Ok(installed)
    }

    fn write_config(&mut self) -> Result<(), FilterError> {
        self.kernel_config.set(0, self.config, 0).map_err(map_error(map::CONFIG))
    }

    /// Sets the protected ports (`filter.ports` and the listeners' ports).
    pub fn set_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), FilterError> {
        let mut ports_map: Array<&mut MapData, u64> = Array::try_from(
            self.ebpf.map_mut(map::PORTS).expect("the object defines the ports map"),
        )
        .map_err(map_error(map::PORTS))?;
        let mut words = [0u64; PORT_BITMAP_WORDS as usize];
        for &port in ports {
            words[usize::from(port / 64)] |= 1 << (port % 64);
        }
        for (index, word) in (0..).zip(words) {
            ports_map.set(index, word, 0).map_err(map_error(map::PORTS))?;
        }
        Ok(())
    }

    /// Per-(family, reason) counters summed over CPUs.
    pub fn counters(&self) -> Result<Vec<CounterSnapshot>, FilterError> {
        let mut snapshots = Vec::new();
        for family in Family::ALL {
            for reason in Reason::ALL {
                let per_cpu = self
                    .counters
                    .get(&counter_index(family, reason), 0)
                    .map_err(map_error(map::COUNTERS))?;
                snapshots.push(CounterSnapshot {
                    family: family.name().to_owned(),
                    reason: reason.name().to_owned(),
                    verdict: if reason.passes() { "pass" } else { "drop" }.to_owned(),
                    packets: per_cpu.iter().map(|c| c.packets).sum(),
                    bytes: per_cpu.iter().map(|c| c.bytes).sum(),
                });
            }
        }
        Ok(snapshots)
    }

    /// Hits per rule (both lookup structures count), busiest first.
    pub fn rule_hits(&self, limit: usize) -> Result<Vec<RuleHits>, FilterError> {
        let mut hits: BTreeMap<IpNet, (Action, u64)> = BTreeMap::new();
        let mut add = |addr: IpAddr, len: u32, rule: Rule| {
            if let Some(cidr) = cidr_of(addr, len) {
                let slot = hits.entry(cidr).or_insert((action_of(&rule), 0));
                slot.1 += rule.hits;
            }
        };
        for entry in self.v4_rules.iter() {
            let (key, rule) = entry.map_err(map_error(map::V4_RULES))?;
            add(IpAddr::from(key.data()), key.prefix_len(), rule);
        }
        for entry in self.v4_trie.iter() {
            let (key, rule) = entry.map_err(map_error(map::V4_TRIE))?;
            add(IpAddr::from(key.data()), key.prefix_len(), rule);
        }
        for entry in self.v6_rules.iter() {
            let (key, rule) = entry.map_err(map_error(map::V6_RULES))?;
            add(IpAddr::from(key.data()), key.prefix_len(), rule);
        }
        for entry in self.v6_trie.iter() {
            let (key, rule) = entry.map_err(map_error(map::V6_TRIE))?;
            add(IpAddr::from(key.data()), key.prefix_len(), rule);
        }
        let mut rules: Vec<RuleHits> = hits
            .into_iter()
            .filter(|(_, (_, hits))| *hits > 0)
            .map(|(cidr, (action, hits))| RuleHits { cidr, action, hits })
            .collect();
        rules.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.cidr.cmp(&b.cidr)));
        rules.truncate(limit);
        Ok(rules)
    }

    /// The lookup strategy in force per family: (IPv4, IPv6).
    pub fn lookups(&self) -> (Lookup, Lookup) {
        let lookup = |raw| {
            if raw == Lookup::Trie as u32 { Lookup::Trie } else { Lookup::PerLength }
        };
        (lookup(self.config.v4_lookup), lookup(self.config.v6_lookup))
    }
}

fn create_dir(dir: &Path) -> Result<(), FilterError> {
    fs::create_dir_all(dir).map_err(|source| FilterError::Io {
        op: "create",
        path: dir.to_owned(),
        source,
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FilterError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).expect("the object defines every map in proxy_common::map");
    T::try_from(map).map_err(|source| FilterError::Map { name, source })
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> FilterError {
    move |source| FilterError::Map { name, source }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn action_of(rule: &Rule) -> Action {
    if rule.action == proxy_common::Action::Allow as u32 { Action::Allow } else { Action::Deny }
}

fn cidr_of(addr: IpAddr, prefix_len: u32) -> Option<IpNet> {
    IpNet::new(addr, u8::try_from(prefix_len).ok()?).ok()
}

/// Lookup strategy and prefix-length masks for the rules in `rules`.
fn lookup_config(rules: &BTreeMap<IpNet, Action>, base: KernelConfig) -> KernelConfig {
    let mut v4_lengths = 0u64;
    let mut v6_lengths = [0u64; 3];
    for cidr in rules.keys() {
        let len = cidr.prefix_len();
        match cidr {
            IpNet::V4(_) => v4_lengths |= 1 << len,
            IpNet::V6(_) => v6_lengths[usize::from(len / 64)] |= 1 << (len % 64),
        }
    }
    let choose = |distinct: u32| {
        if distinct > proxy_common::MAX_PER_LENGTH_LOOKUPS {
            Lookup::Trie as u32
        } else {
            Lookup::PerLength as u32
        }
    };
    KernelConfig {
        v4_lookup: choose(v4_lengths.count_ones()),
        v6_lookup: choose(v6_lengths.iter().map(|w| w.count_ones()).sum()),
        v4_lengths,
        v6_lengths,
        ..base
    }
}

/// Opens a pinned BPF object (BPF_OBJ_GET). aya opens pins too, but does not
/// hand out the descriptor, which [`link_ifindex`] needs.
fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    /// `union bpf_attr` for BPF_OBJ_GET.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attribute whose path outlives the call.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &raw const attr, size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
}

/// The interface an XDP link is bound to (0 once detached), from
/// BPF_OBJ_GET_INFO_BY_FD: aya's `LinkInfo` does not expose it.
fn link_ifindex(link: &OwnedFd) -> io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    /// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // `struct bpf_link_info`: type, id, prog_id, then an 8-byte aligned union
    // whose `xdp.ifindex` is its first u32: the fifth u32.
    let mut info = [0u32; 16];
    let attr = GetInfo {
        bpf_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        info_len: u32::try_from(size_of_val(&info)).expect("small"),
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points at `info`, a writable buffer of the length given.
    let result = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw const attr, size_of::<GetInfo>())
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[4])
}

fn if_index(name: &str) -> Result<u32, FilterError> {
    let unknown = || FilterError::UnknownInterface { name: name.to_owned() };
    let c_name = CString::new(name).map_err(|_| unknown())?;
    // SAFETY: `c_name` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(unknown()),
        index => Ok(index),
    }
}

/// The MTU of interface `name` in the caller's network namespace, if it exists.
pub fn interface_mtu(name: &str) -> Option<u32> {
    use std::os::fd::AsRawFd as _;
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads `ifr_name` (NUL-terminated: the name is shorter
    // than the zeroed array) and writes `ifr_ifru.ifru_mtu` of a request we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &raw mut request) } != 0 {
        return None;
    }
    // SAFETY: the ioctl succeeded, so it wrote the MTU member of the union.
    u32::try_from(unsafe { request.ifr_ifru.ifru_mtu }).ok()
}

/// Every interface in the caller's network namespace, by name.
pub fn interface_names() -> Vec<String> {
    let mut names: Vec<String> = nix::net::if_::if_nameindex()
        .map(|interfaces| {
            interfaces.iter().map(|i| i.name().to_string_lossy().into_owned()).collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The ephemeral port range replies to the host's own connections arrive on.
fn ephemeral_port_range() -> (u16, u16) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut ports = text.split_whitespace().map(|p| p.parse::<u16>());
            Some((ports.next()?.ok()?, ports.next()?.ok()?))
        })
        // The kernel's default.
        .unwrap_or((32768, 60999))
}

/// Makes sure `dir`'s parent is a bpffs, mounting the standard one if needed.
fn prepare_bpffs(dir: &Path) -> Result<(), FilterError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        tracing::info!("mounting bpffs on /sys/fs/bpf");
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(FilterError::MountBpffs)?;
        if is_bpffs(parent) {
            return Ok(());
        }
    }
    Err(FilterError::BpffsNotMounted { dir: dir.to_owned() })
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// A pin name for an interface: bpffs refuses names with dots, which
/// interface names (`eth0.100`) may contain.
fn link_pin_name(mode: AttachedMode, interface: &str) -> String {
    let escaped = interface.replace('%', "%25").replace('.', "%2e");
    format!("{}-{escaped}", mode.name())
}

fn parse_link_pin_name(name: &str) -> Option<(AttachedMode, String)> {
    let (mode, escaped) = name.split_once('-')?;
    let mode = AttachedMode::ALL.into_iter().find(|m| m.name() == mode)?;
    Some((mode, escaped.replace("%2e", ".").replace("%25", "%")))
}

fn attach(
    program: &mut Xdp,
    links_dir: &Path,
    interface: &str,
    if_index: u32,
    wanted: AttachMode,
) -> Result<Attachment, FilterError> {
    for mode in AttachedMode::ALL {
        let pin = links_dir.join(link_pin_name(mode, interface));
        if !pin.exists() {
            continue;
        }
        let mismatch = matches!(
            (wanted, mode),
            (AttachMode::Native, AttachedMode::Skb) | (AttachMode::Skb, AttachedMode::Native)
        );
        if mismatch {
            tracing::warn!(
                "`{interface}` keeps its pinned {mode} attachment although mode = {wanted:?}: the \
                 kernel cannot run both modes at once, so switching needs a gap in filtering; run \
                 `edgegate detach --interface {interface}` and restart to switch"
            );
        }
        let adopt = |source| FilterError::Adopt { path: pin.clone(), source };
        let link = PinnedLink::from_pin(&pin).map_err(adopt)?;
        let link = XdpLink::try_from(FdLink::from(link)).map_err(adopt)?;
        program.attach_to_link(link).map_err(|source| FilterError::Attach {
            interface: interface.to_owned(),
            mode,
            source,
        })?;
        tracing::info!("`{interface}`: took over the pinned {mode}-mode XDP link");
        return Ok(Attachment { interface: interface.to_owned(), mode, adopted: true });
    }

    let modes: &[AttachedMode] = match wanted {
        AttachMode::Auto => &[AttachedMode::Native, AttachedMode::Skb],
        AttachMode::Native => &[AttachedMode::Native],
        AttachMode::Skb => &[AttachedMode::Skb],
    };
    let mut last_error = None;
    for &mode in modes {
        match program.attach_to_if_index(if_index, mode.xdp_mode()) {
            Ok(link_id) => {
                let link = program.take_link(link_id).map_err(|source| FilterError::Attach {
                    interface: interface.to_owned(),
                    mode,
                    source,
                })?;
                let pin = links_dir.join(link_pin_name(mode, interface));
                let fd_link = FdLink::try_from(link)
                    .map_err(|_| FilterError::NoLinkSupport { interface: interface.to_owned() })?;
                let pinned = fd_link
                    .pin(&pin)
                    .map_err(|source| FilterError::Pin { path: pin.clone(), source })?;
                // The pin keeps the link (and so the attachment) alive; our fd can go.
                drop(pinned);
                if mode == AttachedMode::Skb && wanted == AttachMode::Auto {
                    let why = match interface_mtu(interface) {
                        Some(mtu) if mtu > crate::preflight::ENA_XDP_MAX_MTU => format!(
                            "native XDP was refused (MTU {mtu}: ENA, EC2's NIC, runs native XDP \
                             only up to {}; lower it with `ip link set dev {interface} mtu {}` \
                             and make that persistent, see the README's EC2 section)",
                            crate::preflight::ENA_XDP_MAX_MTU,
                            crate::preflight::ENA_XDP_MAX_MTU
                        ),
                        _ => "the driver has no native XDP support".to_owned(),
                    };
                    tracing::warn!(
                        "`{interface}`: {why}; attached in skb (generic) mode, which filters \
                         after the kernel has allocated the packet"
                    );
                }
                tracing::info!("`{interface}`: attached in {mode} mode");
                return Ok(Attachment { interface: interface.to_owned(), mode, adopted: false });
            }
            Err(source) => last_error = Some((mode, source)),
        }
    }
    let (mode, source) = last_error.expect("at least one mode was tried");
    if let ProgramError::SyscallError(e) = &source
        && mode == AttachedMode::Native
        && e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP)
    {
        return Err(FilterError::NativeUnsupported { interface: interface.to_owned() });
    }
    Err(FilterError::Attach { interface: interface.to_owned(), mode, source })
}

/// Detaches interfaces that an earlier daemon attached but the config no longer names.
fn release_unconfigured_links(links_dir: &Path, configured: &[String]) -> Result<(), FilterError> {
    for (path, mode, interface) in pinned_links(links_dir)? {
        if !configured.contains(&interface) {
            tracing::info!(
                "`{interface}` is no longer configured: detaching its {mode}-mode XDP link"
            );
            remove_pin(&path)?;
        }
    }
    Ok(())
}

fn pinned_links(links_dir: &Path) -> Result<Vec<(PathBuf, AttachedMode, String)>, FilterError> {
    let entries = match fs::read_dir(links_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(FilterError::Io { op: "list", path: links_dir.to_owned(), source });
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let (mode, interface) = parse_link_pin_name(entry.file_name().to_str()?)?;
            Some((entry.path(), mode, interface))
        })
        .collect())
}

fn remove_pin(path: &Path) -> Result<(), FilterError> {
    fs::remove_file(path).map_err(|source| FilterError::Io {
        op: "remove",
        path: path.to_owned(),
        source,
    })
}

/// What `detach` removed.
#[derive(Debug, Default)]
pub struct Detached {
    pub interfaces: Vec<(String, AttachedMode)>,
    pub maps_removed: bool,
}

/// Removes the pinned links (of one interface, or all) and, when none is
/// left, the pinned maps and the directory. Must not run while a daemon
/// holds the program: its own link references would keep it attached.
pub fn detach_pinned(bpffs_dir: &Path, interface: Option<&str>) -> Result<Detached, FilterError> {
    let links_dir = bpffs_dir.join("links");
    let mut detached = Detached::default();
    for (path, mode, name) in pinned_links(&links_dir)? {
        if interface.is_none_or(|wanted| wanted == name) {
            remove_pin(&path)?;
            detached.interfaces.push((name, mode));
        }
    }
    if pinned_links(&links_dir)?.is_empty() {
        let maps_dir = bpffs_dir.join("maps");
        for name in map::PINNED {
            let path = maps_dir.join(name);
            if path.exists() {
                remove_pin(&path)?;
                detached.maps_removed = true;
            }
        }
        for dir in [&maps_dir, &links_dir, &bpffs_dir.to_path_buf()] {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(FilterError::Io { op: "remove", path: dir.clone(), source });
                }
            }
        }
    }
    Ok(detached)
}

/// Forwards the program's aya-log records into the daemon's log.
fn spawn_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, keeps it open and
        // never swaps it while the AsyncFd holds the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("XDP program diagnostics will not be logged: {e}");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip_dotted_interfaces() {
        for name in ["eth0", "eth0.100", "a%b.c", "veth-x"] {
            let pin = link_pin_name(AttachedMode::Skb, name);
            assert!(!pin.contains('.'), "{pin}");
            assert_eq!(parse_link_pin_name(&pin), Some((AttachedMode::Skb, name.to_owned())));
        }
    }

    #[test]
    fn few_lengths_use_per_length_lookup_many_use_the_trie() {
        let few: BTreeMap<IpNet, Action> =
            [("10.0.0.0/8", Action::Allow), ("10.1.2.3/32", Action::Deny)]
                .map(|(c, a)| (c.parse().unwrap(), a))
                .into();
        let config = lookup_config(&few, KernelConfig::EMPTY);
        assert_eq!(config.v4_lookup, Lookup::PerLength as u32);
        assert_eq!(config.v4_lengths, (1 << 8) | (1 << 32));

        let many: BTreeMap<IpNet, Action> = (8..=30u8)
            .map(|len| (IpNet::new("10.0.0.0".parse().unwrap(), len).unwrap(), Action::Allow))
            .chain([("2001:db8::/128".parse().unwrap(), Action::Allow)])
            .collect();
        let config = lookup_config(&many, KernelConfig::EMPTY);
        assert_eq!(config.v4_lookup, Lookup::Trie as u32);
        assert_eq!(config.v6_lookup, Lookup::PerLength as u32);
        assert_eq!(config.v6_lengths, [0, 0, 1]);
    }
}
