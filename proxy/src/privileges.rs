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
/// (the packages create it); otherwise `nobody`.
pub const DEFAULT_WORKER_USER: &str = "edgegate";
const FALLBACK_WORKER_USER: &str = "nobody";
/// `nobody`'s ids where no account database names it (a minimal image).
const NOBODY_ID: u32 = 65534;

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
    /// A capability call failed.
    #[error("cannot drop privileges ({step}): {source}")]
    Drop {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The worker's account: `user`, or the default; done first at start-up, so
/// that a typo stops the daemon before it touches anything.
pub fn worker_account(user: Option<&str>) -> Result<Account, PrivilegeError> {
    let lookup = |name: &str| {
        User::from_name(name)
            .map_err(|source| PrivilegeError::Lookup { user: name.to_owned(), source })
    };
    let found = match user {
        Some(name) => lookup(name)?.ok_or_else(|| PrivilegeError::UnknownUser(name.to_owned()))?,
        // A host without an account database (no /etc/passwd) still gets
        // an unprivileged worker: nobody's conventional ids.
        None => match [DEFAULT_WORKER_USER, FALLBACK_WORKER_USER]
            .into_iter()
            .find_map(|name| lookup(name).ok().flatten())
        {
            Some(user) => user,
            None => {
                return Ok(Account {
                    name: FALLBACK_WORKER_USER.to_owned(),
                    uid: Uid::from_raw(NOBODY_ID),
                    gid: Gid::from_raw(NOBODY_ID),
                });
            }
        },
    };
    if found.uid.is_root() {
        return Err(PrivilegeError::RootUser(found.name));
    }
    Ok(Account { name: found.name, uid: found.uid, gid: found.gid })
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
