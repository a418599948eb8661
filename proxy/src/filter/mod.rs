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

//!
//! One file per concern: this one loads and opens the program and holds its
//! errors; `rules` keeps the rule maps equal to the list (in an order that
//! never drops a source both lists allow); `pins` is the bpffs layout and
//! attaching, adopting and detaching links; `interface` reads how an
//! interface frames its packets and what keeps ENA off native XDP; `stats`
//! reads the counters;
//! `prefilter` keeps the bitmaps in front of the rule lookup; `sample`
//! reads the sample of dropped sources; `probe` runs one packet
//! through the loaded program (`allow explain`);
//! `sys` holds the raw system calls aya does not wrap, and with them every
//! `unsafe` of the module.

mod capacity;
mod interface;
mod pins;
mod prefilter;
mod probe;
mod rules;
mod sample;
mod stats;
pub(crate) mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, MapInfo, PerCpuArray, lpm_trie::Key},
    pin::PinError,
    programs::{ProgramError, Xdp, links::LinkError},
};
use ipnet::IpNet;
pub use proxy_common::Framing;
use proxy_common::{Counter, DroppedSource, FilterConfig as KernelConfig, Rule, SourceKey, map};

pub use capacity::{Capacity, Family, TooMany};
pub use interface::{EnaObstacle, Queues, ena_obstacles, framing_of};
pub use pins::{Detached, detach_pinned};
pub use sys::{interface_link_type, interface_names};

use pins::{attach, link_pin_name, prepare_bpffs, release_unconfigured_links};
use prefilter::Prefilter;
use rules::lookup_config;
use sys::{if_index, link_ifindex, open_pinned, spawn_log_forwarder};

use crate::{
    allowlist::{Action, Allowlist},
    config::{AttachMode, Scope, Tunnels},
    files::{IoContext as _, IoError},
    status::{AttachedMode, Attachment, NotReady},
};

/// The compiled XDP program, built by `build.rs` from `proxy-ebpf`.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edgegate.bpf.o"));

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
    /// A configured interface's frames have a layout the program cannot read.
    #[error(
        "`{interface}` is a link type {link_type} device, whose frames edgegate cannot read (it \
         reads Ethernet, loopback, and the IP-first frames of TUN, WireGuard, ipip, ip6tnl, sit, \
         GRE, ip6gre, PPP and raw-IP devices); filter the interface its traffic arrives on instead"
    )]
    UnsupportedLinkType { interface: String, link_type: u16 },
    /// The object file or its maps could not be loaded (or the pinned maps opened).
    #[error("cannot load the XDP program: {0}")]
    Load(#[source] aya::EbpfError),
    /// The verifier rejected the program; the message holds its log.
    #[error("the kernel refused the XDP program: {0}")]
    Verify(#[source] ProgramError),
    /// A map the daemon writes as memory could not be mapped.
    #[error("cannot map {name} into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: io::Error,
    },
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
    /// `mode = "native"` on an ENA interface set up in a way ENA refuses.
    #[error(
        "ENA refused native XDP on `{interface}`: {}; or use mode = \"auto\" (falls back to \
         skb mode)",
        obstacles.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    EnaNative { interface: String, obstacles: Vec<EnaObstacle> },
    /// `mode = "native"` on a layer-3 device: those run XDP only in skb mode.
    #[error(
        "`{interface}` is a layer-3 device (its frames start with the IP header), which runs XDP \
         only in skb (generic) mode; use mode = \"auto\" or mode = \"skb\""
    )]
    NativeOnLayer3 { interface: String },
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
    #[error(transparent)]
    Io(#[from] IoError),
    /// BPF_PROG_TEST_RUN of the loaded program failed.
    #[error("cannot run a test packet through the XDP program: {0}")]
    Probe(#[source] ProgramError),
    /// The list (while replacing: old and new together) would not fit in the maps.
    #[error(
        "{0}; raise `filter.max_entries` (and run `edgegate detach` before restarting, so the \
         maps are recreated)"
    )]
    Capacity(#[source] TooMany),
}

/// Everything the loader needs from the configuration.
#[derive(Debug, Clone)]
pub struct FilterOptions {
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub scope: Scope,
    pub ports: BTreeSet<u16>,
    pub tunnels: Tunnels,
    pub max_entries: u32,
    pub bpffs_dir: PathBuf,
    pub audit: bool,
}

/// The loaded program, its maps and its links.
pub struct Filter {
    ebpf: Ebpf,
    kernel_config: Array<MapData, KernelConfig>,
    v4_rules: HashMap<MapData, Key<[u8; 4]>, Rule>,
    v4_trie: LpmTrie<MapData, [u8; 4], Rule>,
    v6_rules: HashMap<MapData, Key<[u8; 16]>, Rule>,
    v6_trie: LpmTrie<MapData, [u8; 16], Rule>,
    v4_prefilter: Prefilter,
    v6_prefilter: Prefilter,
    counters: PerCpuArray<MapData, Counter>,
    dropped: HashMap<MapData, SourceKey, DroppedSource>,
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
        Self::load_object(PROGRAM_OBJECT, options, list)
    }

    /// As [`Self::load`], with another build of the program (a benchmark's
    /// variant, compared with [`PROGRAM_OBJECT`] in the same run).
    pub fn load_object(
        object: &[u8],
        options: &FilterOptions,
        list: &Allowlist,
    ) -> Result<Self, FilterError> {
        let interfaces = options
            .interfaces
            .iter()
            .map(|name| Ok((name.clone(), if_index(name)?, interface::framing(name)?)))
            .collect::<Result<Vec<_>, FilterError>>()?;
        let first_start = !options.bpffs_dir.exists();
        let loaded = Self::open_object(object, options, list).and_then(|mut filter| {
            let links_dir = options.bpffs_dir.join("links");
            create_dir(&links_dir)?;
            for (name, index, framing) in &interfaces {
                let program = filter.program_mut(*framing);
                let attachment = attach(program, *framing, &links_dir, name, *index, options.mode)?;
                let pin = links_dir.join(link_pin_name(attachment.mode, name));
                let link = open_pinned(&pin).at("open", &pin)?;
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
        Self::open_object(PROGRAM_OBJECT, options, list)
    }

    /// As [`Self::open`], with another build of the program (see [`Self::load_object`]).
    pub fn open_object(
        object: &[u8],
        options: &FilterOptions,
        list: &Allowlist,
    ) -> Result<Self, FilterError> {
        prepare_bpffs(&options.bpffs_dir)?;
        let maps_dir = options.bpffs_dir.join("maps");
        create_dir(&maps_dir)?;
        discard_outdated(&maps_dir)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(map::V4_RULES, options.max_entries)
            .map_max_entries(map::V4_TRIE, options.max_entries)
            .map_max_entries(map::V6_RULES, options.max_entries)
            .map_max_entries(map::V6_TRIE, options.max_entries)
            .load(object)
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
            v4_prefilter: take_prefilter(&mut ebpf, map::V4_PREFILTER)?,
            v6_prefilter: take_prefilter(&mut ebpf, map::V6_PREFILTER)?,
            counters: take_map(&mut ebpf, map::COUNTERS)?,
            dropped: take_map(&mut ebpf, map::DROPPED)?,
            installed: BTreeMap::new(),
            capacity,
            attachments: Vec::new(),
            links: Vec::new(),
            logger: None,
            config: KernelConfig::EMPTY,
            ebpf,
        };
        filter.installed = filter.read_installed()?;
        // Maps pinned by an older edgegate come without prefilters: the new
        // ones start empty and must cover the installed rules before this
        // program can replace the running one.
        filter.write_prefilters(&filter.installed);
        filter.config = KernelConfig {
            scope: match options.scope {
                Scope::Ports => proxy_common::Scope::Ports as u32,
                Scope::Host => proxy_common::Scope::Host as u32,
            },
            audit: u32::from(options.audit),
            tunnel_protocols: options
                .tunnels
                .protocols
                .iter()
                .fold(0, |bits, protocol| bits | 1 << protocol.number()),
            tunnel_udp_ports: tunnel_udp_ports(&options.tunnels.udp_ports),
            ..lookup_config(&filter.installed, KernelConfig::EMPTY)
        };
        (filter.config.ephemeral_first, filter.config.ephemeral_last) = ephemeral_port_range();
        filter.write_config()?;
        filter.set_ports(&options.ports)?;
        filter.apply(list)?;
        for framing in Framing::ALL {
            filter.program_mut(framing).load().map_err(FilterError::Verify)?;
        }
        // After loading: the loaded program holds its own reference to the log
        // map, so the logger may be dropped when nobody forwards its records.
        filter.logger = aya_log::EbpfLogger::init(&mut filter.ebpf)
            .inspect_err(|e| tracing::warn!("XDP program diagnostics will not be logged: {e}"))
            .ok();
        Ok(filter)
    }

    /// The loaded XDP program for frames laid out as `framing` says.
    pub fn program(&self, framing: Framing) -> &Xdp {
        self.ebpf
            .program(framing.program_name())
            .expect("the object defines a program per framing")
            .try_into()
            .expect("the program is XDP")
    }

    fn program_mut(&mut self, framing: Framing) -> &mut Xdp {
        self.ebpf
            .program_mut(framing.program_name())
            .expect("the object defines a program per framing")
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
    pub fn verify_attachments(&self) -> Result<(), NotReady> {
        for (attachment, link) in self.attachments.iter().zip(&self.links) {
            let interface = attachment.interface.clone();
            let attached_to = link_ifindex(link).map_err(|e| NotReady::Unreadable {
                interface: interface.clone(),
                reason: e.to_string(),
            })?;
            match if_index(&interface) {
                Ok(index) if index == attached_to => {}
                Ok(_) | Err(_) if attached_to == 0 => return Err(NotReady::Detached { interface }),
                Ok(_) => return Err(NotReady::Recreated { interface }),
                Err(_) => return Err(NotReady::Gone { interface }),
            }
        }
        Ok(())
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// Maps an older edgegate pinned with another shape are replaced rather than
/// reused (the verifier would refuse the program against them): the config
/// map, which the daemon rewrites whole at every start, the counters, which
/// then start again from 0, and the prefilters, which `open_object` fills
/// from the installed rules before the new program runs. The program still
/// attached keeps its own references until it is swapped.
fn discard_outdated(maps_dir: &Path) -> Result<(), FilterError> {
    let prefilter = (size_of::<u64>(), proxy_common::PREFILTER_WORDS);
    let shapes = [
        (map::CONFIG, size_of::<KernelConfig>(), 1),
        (map::COUNTERS, size_of::<Counter>(), proxy_common::COUNTER_SLOTS),
        (map::V4_PREFILTER, prefilter.0, prefilter.1),
        (map::V6_PREFILTER, prefilter.0, prefilter.1),
    ];
    for (name, value_size, max_entries) in shapes {
        let pin = maps_dir.join(name);
        let Ok(info) = MapInfo::from_pin(&pin) else { continue };
        if info.value_size() as usize == value_size && info.max_entries() == max_entries {
            continue;
        }
        tracing::warn!("replacing {} pinned by an older edgegate", pin.display());
        remove_pin(pin)?;
    }
    for name in map::RETIRED {
        let pin = maps_dir.join(name);
        if pin.exists() {
            tracing::info!(
                "removing {}, pinned by an older edgegate and no longer used",
                pin.display()
            );
            remove_pin(pin)?;
        }
    }
    Ok(())
}

fn remove_pin(pin: PathBuf) -> Result<(), FilterError> {
    Ok(fs::remove_file(&pin).at("remove", &pin)?)
}

fn create_dir(dir: &Path) -> Result<(), FilterError> {
    Ok(fs::create_dir_all(dir).at("create", dir)?)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FilterError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).expect("the object defines every map in proxy_common::map");
    T::try_from(map).map_err(|source| FilterError::Map { name, source })
}

/// A prefilter map, mapped into this process.
fn take_prefilter(ebpf: &mut Ebpf, name: &'static str) -> Result<Prefilter, FilterError> {
    let Some(aya::maps::Map::Array(data)) = ebpf.take_map(name) else {
        panic!("the object defines {name} as an array");
    };
    let mapped = sys::MappedWords::new(data, proxy_common::PREFILTER_WORDS as usize)
        .map_err(|source| FilterError::Mmap { name, source })?;
    Ok(Prefilter::new(mapped))
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> FilterError {
    move |source| FilterError::Map { name, source }
}

/// The tunnel ports in the program's fixed slots (the config allows no
/// more ports than slots; 0 marks an unused one).
fn tunnel_udp_ports(ports: &BTreeSet<u16>) -> [u16; proxy_common::tunnel::MAX_UDP_PORTS] {
    let mut slots = [0; proxy_common::tunnel::MAX_UDP_PORTS];
    for (slot, &port) in slots.iter_mut().zip(ports) {
        *slot = port;
    }
    slots
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
