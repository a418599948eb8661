//! Fleet mode in the daemon: the CLI's changes become commits to the
//! group's list in etcd, and the generations the watch delivers go through
//! [`State::adopt`] like any other change (capacity, file, maps, rollback).
//! The allowlist file is the cache: a daemon started while etcd is down
//! enforces it before touching the network.

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{State, transaction::ChangeRefused};
use crate::{
    allowlist::{Allowlist, Change, Diff},
    config::FleetConfig,
    control::{ErrorKind, FleetCommit, Response},
    fleet::{
        self, Authority, Credentials, Enforcer, Health, Store, UnreadableCredential,
        layout::Pointer,
        trust::{BadPublicKey, TrustedKeys},
    },
};

/// How long a commit waits for this host to enforce it before answering anyway.
const ENFORCE_WAIT: Duration = Duration::from_secs(10);

/// What start-up prepares for fleet mode, with root (the TLS files).
pub struct Setup {
    pub config: FleetConfig,
    pub credentials: Credentials,
    pub host: String,
    /// The generation the local file holds, per its marker.
    pub cached: u64,
    /// Whose signatures a generation needs.
    pub trusted: TrustedKeys,
}

/// Why fleet mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Credentials(#[from] UnreadableCredential),
    #[error("`fleet.host_id`: unset, and the hostname is unreadable: {0}")]
    Hostname(#[source] nix::Error),
    #[error(
        "`fleet.host_id`: the hostname {0:?} does not fit an etcd key; set `host_id` (letters, \
         digits, `-`, `_`, `.`)"
    )]
    HostId(String),
    #[error("`fleet.trusted_keys`: {0}")]
    TrustedKeys(#[source] BadPublicKey),
}

impl Setup {
    pub fn new(config: FleetConfig, list_path: &std::path::Path) -> Result<Self, SetupError> {
        let credentials = Credentials::read(&config)?;
        let host = match &config.host_id {
            Some(host) => host.clone(),
            None => nix::unistd::gethostname()
                .map_err(SetupError::Hostname)?
                .to_string_lossy()
                .into_owned(),
        };
        if !fleet::layout::valid_committer(&host) {
            return Err(SetupError::HostId(host));
        }
        let trusted = config.trusted_keys().map_err(SetupError::TrustedKeys)?;
        let cached = Marker::read(list_path).filter(|m| m.group == config.group);
        Ok(Self { config, credentials, host, cached: cached.map_or(0, |m| m.generation), trusted })
    }
}

/// Next to the list file: which group generation it holds.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Marker {
    pub group: String,
    pub generation: u64,
}

impl Marker {
    pub fn path(list_path: &std::path::Path) -> PathBuf {
        let mut name = list_path.file_name().unwrap_or_default().to_owned();
        name.push(".generation");
        list_path.with_file_name(name)
    }

    fn read(list_path: &std::path::Path) -> Option<Self> {
        // A real marker is a few dozen bytes.
        let text = crate::files::read_bounded(&Self::path(list_path), 4096).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Written after the list: a crash in between leaves an older marker,
    /// and the list is fetched again, which changes nothing.
    pub fn write(&self, list_path: &std::path::Path) -> Result<(), crate::files::IoError> {
        let text = serde_json::to_vec(self).expect("a marker serializes");
        crate::files::replace(&Self::path(list_path), &text)
    }
}

/// The daemon's side of its group: commits, and the view for `fleet status`.
pub struct Member {
    store: Store,
    health: Arc<Health>,
    capacity: u32,
    group: String,
    /// Generations need a signature this host cannot make.
    signatures_required: bool,
}

/// Applies the watched generations to the daemon's state.
struct StateEnforcer(Arc<Mutex<State>>);

impl Enforcer for StateEnforcer {
    type Error = ChangeRefused;

    async fn enforce(&self, list: Allowlist, pointer: &Pointer) -> Result<Diff, ChangeRefused> {
        let mut state = self.0.lock().await;
        let diff = tokio::task::block_in_place(|| state.adopt(list, pointer.generation))?;
        let caught_up = state.worker.caught_up();
        drop(state);
        // This host's record (and so `--wait` on any host) says "in force"
        // only once the proxy checks clients against it too, as a local change.
        caught_up.await;
        Ok(diff)
    }
}

impl Member {
    /// Connects and starts following the group: the watch and this host's
    /// lease run as tasks until the returned handles are aborted.
    pub async fn start(
        setup: Setup,
        health: Arc<Health>,
        state: Arc<Mutex<State>>,
        capacity: u32,
    ) -> Result<(Self, Vec<tokio::task::JoinHandle<()>>), fleet::StoreError> {
        let Setup { config, credentials, host, cached: _, trusted } = setup;
        let signatures_required = trusted.required();
        let authority = Authority { trusted, signer: None };
        let store = Store::connect(&config, &credentials, &host, capacity, authority).await?;
        let tasks = vec![
            tokio::spawn(fleet::follow(
                store.clone(),
                Arc::new(StateEnforcer(state)),
                Arc::clone(&health),
                config.resync_interval,
            )),
            tokio::spawn(fleet::announce(store.clone(), Arc::clone(&health))),
        ];
        Ok((Self { store, health, capacity, group: config.group, signatures_required }, tasks))
    }

    /// Commits `change` to the group's list, then waits (briefly) for this
    /// host to enforce it, so that the CLI's "ok" means "in force here".
    pub async fn commit(&self, change: Change, empty_ok: bool) -> Response {
        if self.signatures_required {
            // The hosts hold no signing key: a change is made where the key is.
            return Response::error(
                ErrorKind::Refused,
                format!(
                    "group `{}` accepts only lists signed by its `trusted_keys`, and gate hosts \
                     hold no signing key; nothing changed. Make the change where the key is: \
                     the same command with `--signing-key FILE --config FILE` (the file with \
                     this `[fleet]` table and an admin's etcd credentials)",
                    self.group
                ),
            );
        }
        match self.store.commit(&change, self.capacity, empty_ok).await {
            Ok(committed) => {
                let enforced_here = self.health.wait_for(committed.generation, ENFORCE_WAIT).await;
                Response::Changed {
                    diff: committed.diff,
                    entries: committed.entries,
                    fleet: Some(FleetCommit { generation: committed.generation, enforced_here }),
                }
            }
            Err(e) => Response::error(ErrorKind::from(&e), e),
        }
    }

    /// The group's generation and every host's, read from etcd.
    pub async fn view(&self) -> Response {
        match self.store.view().await {
            Ok(view) => Response::Fleet(view),
            Err(e) => {
                let here = self.health.snapshot();
                let message = format!(
                    "{e}: this host enforces generation {}{}",
                    here.applied_generation,
                    here.staleness().map(|s| format!(" ({s})")).unwrap_or_default()
                );
                Response::error(ErrorKind::from(&e), message)
            }
        }
    }
}
