//! Where the worker may connect to: its backends' resolved addresses and
//! ports, and nothing else, on every kernel the gate runs on.
//!
//! The gate makes a cgroup (v2) for its workers, a child of its own
//! (`edgegate-worker.<gate pid>`; the systemd unit delegates the service's
//! cgroup for it), and attaches the `egress` programs at `connect4` and
//! `connect6` there: a `connect()` or TCP Fast Open send to any destination
//! not in their map fails with `EPERM`. Workers are put in the cgroup
//! between fork and exec, before they read a byte. This holds with or without
//! Landlock's network rules (Linux 6.7, ports only), which stay as a second
//! layer.
//!
//! The programs are attached with `BPF_PROG_ATTACH`, not a link: the
//! attachment lives as long as the cgroup, so a worker handed over at a
//! restart stays confined after this gate exits. The cgroup is removed once
//! empty, by this gate at its end or by the next one at its start.

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError},
    programs::{CgroupSockAddr, ProgramError},
};
use proxy_common::{EgressKey, egress};

use crate::status::EgressStatus;

/// The compiled egress programs, built by `build.rs` from `proxy-ebpf`.
static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress.bpf.o"));

/// The prefix of the workers' cgroups; the gate's pid follows the dot.
const CGROUP_PREFIX: &str = "edgegate-worker.";

/// Why the worker's egress cannot be confined. Without
/// `daemon.allow_unconfined_egress` the gate refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// No cgroup v2 file system is mounted.
    #[error(
        "no cgroup v2 file system is mounted (mount one: `mount -t cgroup2 none /sys/fs/cgroup`)"
    )]
    NoCgroup2,
    /// `/proc/self/cgroup` or `/proc/self/mountinfo` could not be read.
    #[error("cannot read {path}: {source}")]
    Proc {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    /// The gate's own cgroup v2 entry is missing from `/proc/self/cgroup`.
    #[error("this process has no cgroup v2 entry in /proc/self/cgroup")]
    NoOwnCgroup,
    /// The workers' cgroup could not be made or opened.
    #[error("cannot set up the workers' cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The programs did not load (a kernel without `cgroup/connect*`).
    #[error("cannot load the egress programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("egress program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach the egress programs to the workers' cgroup: {0}")]
    Attach(#[source] io::Error),
    #[error("egress map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// More backend addresses than the map holds.
    #[error(
        "the backends resolve to {0} destinations; the worker's egress filter holds at most {max}",
        max = egress::MAX_DESTINATIONS
    )]
    TooManyDestinations(usize),
}

/// The workers' cgroup, as the spawner needs it: its `cgroup.procs`, open
/// for writing, to which a new worker writes `0` (itself) before exec.
#[derive(Clone)]
pub struct WorkerCgroup {
    pub procs: Arc<File>,
    /// Its path inside the hierarchy, as `/proc/<pid>/cgroup` shows it.
    pub path_in_hierarchy: String,
}

/// The egress filter in force.
pub struct Egress {
    cgroup: WorkerCgroup,
    dir: PathBuf,
    allowed: HashMap<MapData, EgressKey, u8>,
    refused: Array<MapData, u64>,
    destinations: BTreeSet<SocketAddr>,
    /// Keeps the programs loaded (the cgroup holds their attachments).
    _ebpf: Ebpf,
}

impl Egress {
    /// Makes the workers' cgroup, attaches the programs to it and allows
    /// `destinations`.
    fn confine(destinations: &BTreeSet<SocketAddr>) -> Result<Self, EgressError> {
        let (parent, own) = workers_cgroup_parent()?;
        remove_leftovers(&parent);
        let name = format!("{CGROUP_PREFIX}{}", std::process::id());
        let dir = parent.join(&name);
        let cgroup_error = |source| EgressError::Cgroup { path: dir.clone(), source };
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(cgroup_error(e)),
            _ => {}
        }
        let directory = File::open(&dir).map_err(cgroup_error)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(cgroup_error)?;
        let mut ebpf = EbpfLoader::new().load(PROGRAM_OBJECT).map_err(EgressError::Load)?;
        for (name, attach_type) in [
            (egress::CONNECT4, BPF_CGROUP_INET4_CONNECT),
            (egress::CONNECT6, BPF_CGROUP_INET6_CONNECT),
        ] {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .expect("the object defines both programs")
                .try_into()
                .map_err(|source| EgressError::Program { name, source })?;
            program.load().map_err(|source| EgressError::Program { name, source })?;
            let fd = program.fd().map_err(|source| EgressError::Program { name, source })?;
            attach(&directory, fd.as_fd().as_raw_fd(), attach_type).map_err(EgressError::Attach)?;
        }
        let map_error = |name| move |source| EgressError::Map { name, source };
        let allowed =
            HashMap::try_from(ebpf.take_map(egress::ALLOWED).expect("the object defines the map"))
                .map_err(map_error(egress::ALLOWED))?;
        let refused =
            Array::try_from(ebpf.take_map(egress::REFUSED).expect("the object defines the map"))
                .map_err(map_error(egress::REFUSED))?;
        let path_in_hierarchy = format!("{}/{name}", own.trim_end_matches('/'));
        let mut egress = Self {
            cgroup: WorkerCgroup { procs: Arc::new(procs), path_in_hierarchy },
            dir,
            allowed,
            refused,
            destinations: BTreeSet::new(),
            _ebpf: ebpf,
        };
        egress.permit(destinations)?;
        Ok(egress)
    }

    /// Allows exactly `destinations` from now on. Checked whole before any
    /// change: too many leaves the map as it was.
    pub fn permit(&mut self, destinations: &BTreeSet<SocketAddr>) -> Result<(), EgressError> {
        if destinations.len() > egress::MAX_DESTINATIONS as usize {
            return Err(EgressError::TooManyDestinations(destinations.len()));
        }
        let map_error = |source| EgressError::Map { name: egress::ALLOWED, source };
        for added in destinations.difference(&self.destinations) {
            self.allowed.insert(key(added), 1, 0).map_err(map_error)?;
        }
        for removed in self.destinations.difference(destinations) {
            match self.allowed.remove(&key(removed)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error(e)),
            }
        }
        self.destinations = destinations.clone();
        Ok(())
    }

    /// Connections refused since the programs were loaded.
    pub fn refused(&self) -> u64 {
        self.refused.get(&0, 0).unwrap_or(0)
    }

    pub fn status(&self) -> EgressStatus {
        EgressStatus {
            confined: true,
            cgroup: Some(self.cgroup.path_in_hierarchy.clone()),
            destinations: self.destinations.iter().map(ToString::to_string).collect(),
            refused: self.refused(),
            unconfined_reason: None,
        }
    }

    /// Removes the workers' cgroup if no worker is left in it (one handed
    /// over at a restart still is: the next gate removes it).
    fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The map key for `destination`.
fn key(destination: &SocketAddr) -> EgressKey {
    let port = destination.port().to_be_bytes();
    match destination.ip() {
        IpAddr::V4(v4) => EgressKey::v4(v4.octets(), port),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => EgressKey::v4(v4.octets(), port),
            None => EgressKey::v6(v6.octets(), port),
        },
    }
}

/// Where the workers' cgroup goes: this process's own cgroup (v2), as a
/// directory and as its path in the hierarchy.
pub(crate) fn workers_cgroup_parent() -> Result<(PathBuf, String), EgressError> {
    let read =
        |path| std::fs::read_to_string(path).map_err(|source| EgressError::Proc { path, source });
    let own = read("/proc/self/cgroup")?
        .lines()
        .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
        .ok_or(EgressError::NoOwnCgroup)?;
    let mount = cgroup2_mount(&read("/proc/self/mountinfo")?).ok_or(EgressError::NoCgroup2)?;
    Ok((mount.join(own.trim_start_matches('/')), own))
}

/// The first cgroup2 mount in `mountinfo` that shows the whole hierarchy
/// this process sees (its root is `/`).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, filesystem) = line.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        let whole = filesystem.split(' ').next() == Some("cgroup2") && fields.get(3) == Some(&"/");
        whole.then(|| fields.get(4).map(|point| PathBuf::from(unescape(point)))).flatten()
    })
}

/// `mountinfo` escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        match rest.get(at + 1..at + 4).and_then(|octal| u8::from_str_radix(octal, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Removes workers' cgroups that earlier gates left: those whose gate is
/// gone and in which no worker is left. One still busy (a handed-over
/// worker draining) is left for a later start.
fn remove_leftovers(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(CGROUP_PREFIX)) else {
            continue;
        };
        let gate_alive =
            pid.parse::<u32>().is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !gate_alive && std::fs::remove_dir(entry.path()).is_ok() {
            tracing::info!(
                "removed an earlier gate's empty worker cgroup {}",
                entry.path().display()
            );
        }
    }
}

/// `enum bpf_attach_type` values.
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
/// Other programs on the cgroup (a parent's, a service manager's) run too:
/// each may refuse.
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
const BPF_PROG_ATTACH: libc::c_long = 8;

/// `BPF_PROG_ATTACH` of `program` to `cgroup`: the attachment belongs to
/// the cgroup, not to this process (see the module's comment).
fn attach(cgroup: &File, program: i32, attach_type: u32) -> io::Result<()> {
    /// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
    #[repr(C)]
    struct ProgAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }
    let attr = ProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: program as u32,
        attach_type,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: `attr` outlives the call and has the layout the kernel reads
    // for this command; the descriptors are open.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_ATTACH, &attr, size_of::<ProgAttach>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The worker's egress as the gate runs it.
pub enum WorkerEgress {
    Confined(Box<Egress>),
    /// It could not be confined, and `daemon.allow_unconfined_egress` lets
    /// the gate run anyway; `reason` says why.
    Unconfined {
        reason: String,
    },
}

impl WorkerEgress {
    /// Confines the worker's egress to `destinations`; where that cannot
    /// be done, fails unless `allow_unconfined`.
    pub fn set_up(
        destinations: &BTreeSet<SocketAddr>,
        allow_unconfined: bool,
    ) -> Result<Self, EgressError> {
        match Egress::confine(destinations) {
            Ok(egress) => Ok(Self::Confined(Box::new(egress))),
            Err(e) if allow_unconfined => {
                tracing::warn!(
                    "the proxy worker's connections are NOT limited to its backends: {e} \
                     (daemon.allow_unconfined_egress = true)"
                );
                Ok(Self::Unconfined { reason: e.to_string() })
            }
            Err(e) => Err(e),
        }
    }

    /// The cgroup new workers go into, when confined.
    pub fn cgroup(&self) -> Option<WorkerCgroup> {
        match self {
            Self::Confined(egress) => Some(egress.cgroup.clone()),
            Self::Unconfined { .. } => None,
        }
    }

    /// Allows exactly `destinations` (logged if the map refuses them).
    pub fn permit(&mut self, destinations: &BTreeSet<SocketAddr>) {
        if let Self::Confined(egress) = self
            && let Err(e) = egress.permit(destinations)
        {
            tracing::error!("the proxy worker's egress filter: {e}; it allows what it did");
        }
    }

    /// Allows `destinations` as well as what is allowed now.
    pub fn also_permit(&mut self, destinations: &BTreeSet<SocketAddr>) {
        if let Self::Confined(egress) = self {
            let both = egress.destinations.union(destinations).copied().collect();
            self.permit(&both);
        }
    }

    pub fn status(&self) -> EgressStatus {
        match self {
            Self::Confined(egress) => egress.status(),
            Self::Unconfined { reason } => EgressStatus {
                confined: false,
                cgroup: None,
                destinations: Vec::new(),
                refused: 0,
                unconfined_reason: Some(reason.clone()),
            },
        }
    }

    /// At the gate's end: removes the workers' cgroup if it is empty.
    pub fn remove(&self) {
        if let Self::Confined(egress) = self {
            egress.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_beside_v1_hierarchies() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        // A bind mount of a sub-tree does not show the process's own path.
        let partial = "30 23 0:26 /some/where /mnt/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(partial), None);
        let v1_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(v1_only), None);
        let spaced = "30 23 0:26 / /mnt/cgroup\\040v2 rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(spaced), Some(PathBuf::from("/mnt/cgroup v2")));
    }

    #[test]
    fn destinations_are_keyed_as_the_kernel_sees_them() {
        let v4: SocketAddr = "192.0.2.7:18080".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:18080".parse().unwrap();
        assert_eq!(key(&v4), key(&mapped), "an IPv6 socket reaches IPv4 through the mapped form");
        assert_eq!(key(&v4).address[10..], [0xff, 0xff, 192, 0, 2, 7]);
        assert_eq!(key(&v4).port, [0x46, 0xa0]);
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(key(&v6).address, "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_ne!(key(&v4), key(&"192.0.2.7:18081".parse().unwrap()));
    }
}
