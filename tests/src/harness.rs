//! The real XDP program, loaded (not attached) with its maps pinned in a
//! private bpffs directory, for BPF_PROG_TEST_RUN.

use std::{collections::BTreeSet, path::PathBuf};

use aya::programs::{TestRun as _, TestRunOptions};
use edgegate::{
    allowlist::Allowlist,
    config::{AttachMode, DEFAULT_MAX_ENTRIES, Scope, Tunnels},
    filter::{Filter, FilterOptions},
};
use proxy_common::{Framing, Verdict};

use crate::unique_name;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub struct XdpHarness {
    pub filter: Filter,
    options: FilterOptions,
    // Dropped after `filter`, whose file descriptors must close first.
    _pins: PinDir,
}

/// Removes a bpffs pin directory on drop, also when loading failed.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = edgegate::filter::detach_pinned(&self.0, None) {
            eprintln!("cleanup of {}: {e}", self.0.display());
        }
    }
}

impl XdpHarness {
    /// Loads the program with `list` (the text format), `scope` and extra protected `ports`.
    pub fn new(list: &str, scope: Scope, ports: &[u16]) -> Self {
        Self::with_capacity(list, scope, ports, DEFAULT_MAX_ENTRIES)
    }

    pub fn with_capacity(list: &str, scope: Scope, ports: &[u16], max_entries: u32) -> Self {
        Self::with_object(edgegate::filter::PROGRAM_OBJECT, list, scope, ports, max_entries)
    }

    /// As [`Self::new`], judging only the tunnels in `tunnels` (the others
    /// have the defaults a config without tunnel keys gets).
    pub fn with_tunnels(list: &str, scope: Scope, ports: &[u16], tunnels: Tunnels) -> Self {
        let object = edgegate::filter::PROGRAM_OBJECT;
        Self::with_options(object, list, scope, ports, DEFAULT_MAX_ENTRIES, tunnels)
    }

    /// As [`Self::with_capacity`], with another build of the program (see
    /// [`crate::reference::FILTER_WITHOUT_DROP_SAMPLE`]).
    pub fn with_object(
        object: &[u8],
        list: &str,
        scope: Scope,
        ports: &[u16],
        max_entries: u32,
    ) -> Self {
        Self::with_options(object, list, scope, ports, max_entries, Tunnels::standard())
    }

    fn with_options(
        object: &[u8],
        list: &str,
        scope: Scope,
        ports: &[u16],
        max_entries: u32,
        tunnels: Tunnels,
    ) -> Self {
        crate::require_root();
        let options = FilterOptions {
            interfaces: Vec::new(),
            mode: AttachMode::Auto,
            scope,
            ports: ports.iter().copied().collect::<BTreeSet<u16>>(),
            tunnels,
            max_entries,
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(unique_name("egxdp")),
            audit: false,
        };
        let pins = PinDir(options.bpffs_dir.clone());
        let list = Allowlist::parse(list).expect("a valid test list");
        let filter = Filter::open_object(object, &options, &list).expect("load the XDP program");
        Self { filter, options, _pins: pins }
    }

    /// A second, independent instance of the program sharing this one's
    /// pinned maps: what a restarted daemon loads.
    pub fn reopen(&self, list: &Allowlist) -> Filter {
        Filter::open(&self.options, list).expect("reload the XDP program")
    }

    /// Where the maps and links are pinned.
    pub fn bpffs_dir(&self) -> &std::path::Path {
        &self.options.bpffs_dir
    }

    /// The Ethernet program's verdict for one frame.
    pub fn run(&self, frame: &[u8]) -> u32 {
        run(&self.filter, frame)
    }

    /// The verdict of the program for `framing` (a layer-3 device's frames
    /// start with the IP header) for one frame.
    pub fn run_framed(&self, framing: Framing, frame: &[u8]) -> u32 {
        run_program(&self.filter, framing, frame)
    }

    /// Packets counted per (family, reason), in a fixed order; audit mode's
    /// would-be drops are not among them (see [`Self::would_drop_counters`]).
    pub fn counters(&self) -> Vec<((String, String), u64)> {
        self.counters_as(|verdict| verdict != Verdict::WouldDrop)
    }

    /// Packets audit mode passed per (family, reason) that it would have dropped.
    pub fn would_drop_counters(&self) -> Vec<((String, String), u64)> {
        self.counters_as(|verdict| verdict == Verdict::WouldDrop)
    }

    fn counters_as(&self, counted: impl Fn(Verdict) -> bool) -> Vec<((String, String), u64)> {
        self.filter
            .counters()
            .expect("read counters")
            .into_iter()
            .filter(|c| counted(c.verdict))
            .map(|c| ((c.family.name().to_owned(), c.reason.name().to_owned()), c.packets))
            .collect()
    }
}

/// `filter`'s Ethernet program's verdict for one frame.
pub fn run(filter: &Filter, frame: &[u8]) -> u32 {
    run_program(filter, Framing::Ethernet, frame)
}

fn run_program(filter: &Filter, framing: Framing, frame: &[u8]) -> u32 {
    let mut options = TestRunOptions::new();
    options.data_in = Some(frame);
    filter.program(framing).test_run(options).expect("BPF_PROG_TEST_RUN").return_value
}
