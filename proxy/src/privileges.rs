//! Giving up root once start-up is done (`[daemon] user`).
//!
//! Loading and attaching XDP, mounting bpffs, pinning and binding sockets need
//! root; parsing TLS and PROXY headers from the internet does not. After
//! start-up, and before any other thread exists, the daemon becomes `user`
//! and keeps only:
//!
//! - `CAP_BPF`: map updates (allowlist changes) and reads (counters, link
//!   state) through the descriptors it already holds; kernels before 6.5 with
//!   `kernel.unprivileged_bpf_disabled` refuse every `bpf()` call without it;
//! - `CAP_NET_BIND_SERVICE`: a reload may start a listener on a port < 1024.
//!
//! Everything else leaves the bounding set, and `no_new_privs` is set, so no
//! later `exec` can regain anything. The control socket stays root-only: it
//! was created by root with mode 0600 (root clients pass, others cannot).

use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::prctl::{set_keepcaps, set_no_new_privs};
use nix::unistd::{Gid, Uid, User, chown, setfsgid, setfsuid, setgid, setgroups, setuid};

/// The capabilities the daemon keeps after start-up.
pub const RETAINED: [Capability; 2] = [Capability::CAP_BPF, Capability::CAP_NET_BIND_SERVICE];

/// Why privileges could not be dropped. The daemon refuses to run on.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `[daemon] user` names no account.
    #[error("`daemon.user`: no user `{0}` (create it, e.g. `adduser --system {0}`)")]
    UnknownUser(String),
    /// Looking the user up failed.
    #[error("`daemon.user`: cannot look up `{user}`: {source}")]
    Lookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    /// Handing a state path over to the user failed.
    #[error("cannot hand {} over to `{user}`: {source}", path.display())]
    Chown {
        user: String,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The user could not keep the allowlist where the config puts it.
    #[error(
        "`daemon.user` `{user}` cannot update the allowlist in {}: {source}{}",
        dir.display(),
        match blocked_at {
            Some(parent) => format!(
                "; `{user}` may not enter {}: make it searchable (e.g. `chmod o+x {}`) \
                 or move `daemon.state_dir` (or `filter.allowlist`) elsewhere",
                parent.display(),
                parent.display()
            ),
            None => format!(
                "; let `{user}` create and rename files there, or move `daemon.state_dir` \
                 (or `filter.allowlist`) elsewhere"
            ),
        }
    )]
    StateAccess {
        user: String,
        dir: PathBuf,
        /// The first ancestor of `dir` the user cannot search, if that is the cause.
        blocked_at: Option<PathBuf>,
        #[source]
        source: Box<crate::allowlist::StoreError>,
    },
    /// A credential or capability call failed.
    #[error("cannot drop privileges ({step}): {source}")]
    Drop {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Looks `user` up; done first at start-up, so that a typo stops the
/// daemon before it touches anything.
pub fn lookup(user: &str) -> Result<User, PrivilegeError> {
    User::from_name(user)
        .map_err(|source| PrivilegeError::Lookup { user: user.to_owned(), source })?
        .ok_or_else(|| PrivilegeError::UnknownUser(user.to_owned()))
}

/// Gives `account` the paths the daemon writes later (the state directory,
/// the allowlist), then proves, with the account's file-system identity,
/// that it can rewrite the list in `list_dir` as every change does (create,
/// write, fsync, rename): a daemon that would refuse every `allow add` with
/// "Permission denied" must not start. Runs while still root.
pub fn hand_over(account: &User, owned: &[&Path], list_dir: &Path) -> Result<(), PrivilegeError> {
    let user = account.name.as_str();
    for path in owned.iter().filter(|p| p.exists()) {
        chown(*path, Some(account.uid), Some(account.gid)).map_err(|source| {
            PrivilegeError::Chown { user: user.to_owned(), path: path.to_path_buf(), source }
        })?;
    }
    // The groups `drop_to` leaves: root's own could grant access the user lacks.
    setgroups(&[]).map_err(|e| PrivilegeError::Drop { step: "setgroups", source: e.into() })?;
    let probed = {
        let _identity = FileIdentity::assume(account);
        let probe = list_dir.join(".edgegate-access-check");
        crate::allowlist::store(&probe, &crate::allowlist::Allowlist::default())
            .and_then(|()| {
                std::fs::remove_file(&probe).map_err(|source| crate::allowlist::StoreError::Io {
                    op: "remove",
                    path: probe.clone(),
                    source,
                })
            })
            .map_err(|source| (source, first_unsearchable(list_dir)))
    };
    probed.map_err(|(source, blocked_at)| PrivilegeError::StateAccess {
        user: user.to_owned(),
        dir: list_dir.to_owned(),
        blocked_at,
        source: Box::new(source),
    })
}

/// The first directory on the way to `dir` (itself included) that the
/// current file-system identity cannot search.
fn first_unsearchable(dir: &Path) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = dir.ancestors().collect();
    ancestors.reverse();
    // `stat("a/.")` needs search permission on `a` and on everything above it.
    ancestors
        .into_iter()
        .find(|a| {
            std::fs::metadata(a.join("."))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        })
        .map(Path::to_owned)
}

/// Root's file-system identity set to an account's for permission checks
/// (setfsuid: root's capabilities that bypass file permissions are off while
/// it is set), restored on drop.
struct FileIdentity;

impl FileIdentity {
    fn assume(account: &User) -> Self {
        setfsgid(account.gid);
        setfsuid(account.uid);
        Self
    }
}

impl Drop for FileIdentity {
    fn drop(&mut self) {
        setfsuid(Uid::from_raw(0));
        setfsgid(Gid::from_raw(0));
    }
}

/// Becomes `account`, keeping only [`RETAINED`]; [`hand_over`] has given it
/// what it writes. Must run while the process has a single thread:
/// credentials and capabilities are per thread, and threads started later
/// inherit the main thread's.
pub fn drop_to(account: &User) -> Result<(), PrivilegeError> {
    let user = account.name.as_str();
    let retained: CapsHashSet = RETAINED.into_iter().collect();
    let caps_error = |step| {
        move |e: caps::errors::CapsError| PrivilegeError::Drop {
            step,
            source: std::io::Error::other(e.to_string()),
        }
    };
    let os_error = |step| move |e: nix::Error| PrivilegeError::Drop { step, source: e.into() };

    // While still root: shrink the bounding set (needs CAP_SETPCAP).
    for capability in caps::all().difference(&retained) {
        caps::drop(None, CapSet::Bounding, *capability).map_err(caps_error("bounding set"))?;
    }
    // Keep the permitted set across the change of user; the effective set is
    // cleared by it and restored to just the retained capabilities below.
    set_keepcaps(true).map_err(os_error("keepcaps"))?;
    setgroups(&[]).map_err(os_error("setgroups"))?;
    setgid(Gid::from_raw(account.gid.as_raw())).map_err(os_error("setgid"))?;
    setuid(Uid::from_raw(account.uid.as_raw())).map_err(os_error("setuid"))?;
    set_keepcaps(false).map_err(os_error("keepcaps"))?;
    caps::set(None, CapSet::Permitted, &retained).map_err(caps_error("permitted set"))?;
    caps::set(None, CapSet::Effective, &retained).map_err(caps_error("effective set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_error("inheritable set"))?;
    set_no_new_privs().map_err(os_error("no_new_privs"))?;
    tracing::info!(
        "running as `{user}` (uid {}), keeping only CAP_BPF and CAP_NET_BIND_SERVICE",
        account.uid
    );
    Ok(())
}
