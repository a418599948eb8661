//! What the gate keeps of root after start-up, and who the proxy worker
//! runs as (`[daemon] user`).
//!
//! The gate never parses a byte from the internet (the worker does, see
//! `privsep`), but it holds the filter, so it stays uid 0 with only what
//! its work needs after start-up ([`GATE_CAPABILITIES`]); everything else
//! leaves the bounding set, and `no_new_privs` is set.

use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::prctl::set_no_new_privs;
use nix::unistd::{Gid, Uid, User, chown};

use crate::privsep::spawn::Account;

/// The account the worker runs as without `daemon.user`, when it exists
/// (the packages create it); otherwise a transient uid (see
/// [`TRANSIENT_UIDS`]).
pub const DEFAULT_WORKER_USER: &str = "edgegate";
/// `nobody`'s conventional uid: shared by every daemon that has no account
/// of its own, so never the worker's.
const NOBODY_ID: u32 = 65534;
/// Where a transient worker uid comes from when there is no `edgegate`
/// account: a range systemd's uid scheme leaves unused (its `DynamicUser=`
/// range is 61184–65519), of which the gate takes one that no account names
/// and no process uses, as systemd's `DynamicUser=` does.
const TRANSIENT_UIDS: std::ops::RangeInclusive<u32> = 60578..=61183;

/// The capabilities the gate keeps after start-up, and why:
pub const GATE_CAPABILITIES: [Capability; 7] = [
    // Map updates and reads through the descriptors it holds (kernels
    // before 6.5 with `unprivileged_bpf_disabled` want it for every call).
    Capability::CAP_BPF,
    // A reload may bind a listener below port 1024.
    Capability::CAP_NET_BIND_SERVICE,
    // Reloads read TLS files, and changes write the list, wherever the
    // config puts them, whoever owns them.
    Capability::CAP_DAC_OVERRIDE,
    // Starting a worker: leaving uid 0 for `daemon.user` and emptying the
    // worker's bounding set.
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_SETPCAP,
    // Killing a worker that misbehaves (it runs as another user).
    Capability::CAP_KILL,
];

/// Why privileges could not be given up. The daemon refuses to run on.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `[daemon] user` names no account.
    #[error("`daemon.user`: no user `{0}` (create it, e.g. `adduser --system {0}`)")]
    UnknownUser(String),
    /// `[daemon] user` is root: the worker never runs as root.
    #[error("`daemon.user`: `{0}` has uid 0; the proxy worker never runs as root")]
    RootUser(String),
    /// `[daemon] user` is `nobody`, whose processes could read the worker.
    #[error(
        "`daemon.user`: `{0}` (uid {NOBODY_ID}) is shared with other daemons, which could \
         then read the worker's memory; remove the key (a uid of the worker's own) or name an \
         account only edgegate uses"
    )]
    SharedNobody(String),
    /// Other processes run as the worker's account.
    #[error(
        "the proxy worker's account `{user}` (uid {uid}) is in use by {processes}: they could \
         read the worker's memory; give edgegate an account of its own"
    )]
    InUse { user: String, uid: u32, processes: String },
    /// No transient uid is free.
    #[error(
        "no `edgegate` account, and no free uid in {}–{} for the proxy worker: create the \
         account (`adduser --system edgegate`)",
        TRANSIENT_UIDS.start(),
        TRANSIENT_UIDS.end()
    )]
    NoTransientUid,
    /// Looking the user up failed.
    #[error("`daemon.user`: cannot look up `{user}`: {source}")]
    Lookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    /// Giving a state path back to root failed.
    #[error("cannot give {} back to root: {source}", path.display())]
    Chown {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// Threads run already, which would keep every privilege.
    #[error("cannot drop privileges: {0} threads run already (a bug: start none before)")]
    Threads(usize),
    /// A capability call failed.
    #[error("cannot drop privileges ({step}): {source}")]
    Drop {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The worker's account: `user`, or the default; done first at start-up, so
/// that a typo stops the daemon before it touches anything. Its uid is
/// never shared: not root, not `nobody`, and no process but edgegate's
/// workers runs as it (those a previous gate handed over at a restart
/// included).
pub fn worker_account(user: Option<&str>) -> Result<Account, PrivilegeError> {
    let lookup = |name: &str| {
        User::from_name(name)
            .map_err(|source| PrivilegeError::Lookup { user: name.to_owned(), source })
    };
    let found = match user {
        Some(name) => lookup(name)?.ok_or_else(|| PrivilegeError::UnknownUser(name.to_owned()))?,
        // A host without an account database (no /etc/passwd: the lookup
        // fails) has no `edgegate` account either.
        None => match lookup(DEFAULT_WORKER_USER).ok().flatten() {
            Some(user) => user,
            None => return transient_account(),
        },
    };
    if found.uid.is_root() {
        return Err(PrivilegeError::RootUser(found.name));
    }
    if found.uid.as_raw() == NOBODY_ID {
        return Err(PrivilegeError::SharedNobody(found.name));
    }
    let others = processes_of(found.uid.as_raw());
    if !others.is_empty() {
        return Err(PrivilegeError::InUse {
            user: found.name,
            uid: found.uid.as_raw(),
            processes: others.join(", "),
        });
    }
    Ok(Account { name: found.name, uid: found.uid, gid: found.gid })
}

/// A uid (and the same gid) that no account names and no process uses,
/// picked from [`TRANSIENT_UIDS`] starting at a point of this gate's own,
/// so that two gates starting together rarely try the same one.
fn transient_account() -> Result<Account, PrivilegeError> {
    let in_use = uids_in_use();
    let span = TRANSIENT_UIDS.end() - TRANSIENT_UIDS.start() + 1;
    let offset = std::process::id() % span;
    (0..span)
        .map(|step| TRANSIENT_UIDS.start() + (offset + step) % span)
        .find(|&uid| {
            // A failed lookup (no account database) names no one either.
            !in_use.contains(&uid)
                && !matches!(User::from_uid(Uid::from_raw(uid)), Ok(Some(_)))
                && !matches!(nix::unistd::Group::from_gid(Gid::from_raw(uid)), Ok(Some(_)))
        })
        .map(|uid| Account {
            name: format!("transient uid {uid}"),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(uid),
        })
        .ok_or(PrivilegeError::NoTransientUid)
}

/// Every process's real, effective, saved and file-system uids, from `/proc`.
fn process_uids() -> Vec<(u32, String, [u32; 4])> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let uids: Vec<u32> = status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))?
                .split_whitespace()
                .filter_map(|uid| uid.parse().ok())
                .collect();
            let name = status.lines().find_map(|line| line.strip_prefix("Name:"))?.trim();
            Some((pid, name.to_owned(), uids.try_into().ok()?))
        })
        .collect()
}

/// Whether `pid` is an edgegate worker (`edgegate worker …`).
fn is_worker(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let mut words = cmdline.split(|&byte| byte == 0);
        words.next().is_some_and(|program| program.ends_with(b"edgegate"))
            && words.next() == Some(b"worker")
    })
}

/// The uids processes run as.
fn uids_in_use() -> std::collections::BTreeSet<u32> {
    process_uids().into_iter().flat_map(|(_, _, uids)| uids).collect()
}

/// Processes other than edgegate's workers that run as `uid`, described.
fn processes_of(uid: u32) -> Vec<String> {
    process_uids()
        .into_iter()
        .filter(|(pid, _, uids)| uids.contains(&uid) && !is_worker(*pid))
        .map(|(pid, name, _)| format!("pid {pid} ({})", crate::status::quoted(&name)))
        .collect()
}

/// Gives `paths` (the state directory and the list) back to root where
/// they belong to someone else: only the gate writes them.
pub fn reclaim(paths: &[&Path]) -> Result<(), PrivilegeError> {
    use std::os::unix::fs::MetadataExt as _;
    for path in paths {
        let Ok(metadata) = std::fs::metadata(path) else { continue };
        if metadata.uid() != 0 || metadata.gid() != 0 {
            chown(*path, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
                .map_err(|source| PrivilegeError::Chown { path: path.to_path_buf(), source })?;
        }
    }
    Ok(())
}

/// Keeps only [`GATE_CAPABILITIES`] in every set, with `no_new_privs`. Must
/// run while the process has a single thread: capabilities are per thread,
/// and threads started later inherit the main thread's.
pub fn confine_gate() -> Result<(), PrivilegeError> {
    // A thread started before would keep everything: refuse, not hope.
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, Iterator::count);
    if threads != 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    let caps_error = |step| {
        move |e: caps::errors::CapsError| PrivilegeError::Drop {
            step,
            source: std::io::Error::other(e.to_string()),
        }
    };
    // A service manager may have withheld some (systemd's
    // CapabilityBoundingSet): keep what there is, and say what is missing.
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_error("permitted set"))?;
    let (kept, missing): (CapsHashSet, CapsHashSet) =
        GATE_CAPABILITIES.into_iter().partition(|c| permitted.contains(c));
    if !missing.is_empty() {
        tracing::warn!("gate: started without {missing:?}; what needs them will fail");
    }
    for capability in caps::all().difference(&kept) {
        caps::drop(None, CapSet::Bounding, *capability).map_err(caps_error("bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_error("ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_error("inheritable set"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(caps_error("effective set"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(caps_error("permitted set"))?;
    set_no_new_privs()
        .map_err(|e| PrivilegeError::Drop { step: "no_new_privs", source: e.into() })?;
    let mut names: Vec<String> = kept.iter().map(ToString::to_string).collect();
    names.sort();
    tracing::info!("gate: uid 0 keeping only {}", names.join(", "));
    Ok(())
}
