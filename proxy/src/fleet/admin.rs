//! Changes made where the signing key is: the CLI talks to etcd itself,
//! signs each generation, and never needs a gate host's help, so that gate
//! hosts can hold read-only etcd credentials and no key at all.

use std::path::Path;

use super::{
    Authority, Committed, Credentials, Store, StoreError, UnreadableCredential,
    layout::{committer_from, valid_committer},
    trust::{SigningKey, SigningKeyError},
};
use crate::{
    allowlist::Change,
    config::{self, ConfigError},
    fleet::CommitError,
    status::FleetView,
};

/// Why the CLI cannot reach the group as an admin.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    SigningKey(#[from] SigningKeyError),
    #[error(transparent)]
    Credentials(#[from] UnreadableCredential),
    #[error("`[fleet]`: {0}")]
    Connect(#[from] StoreError),
}

/// The group, as seen from an operator's machine or an admin host.
pub struct Admin {
    store: Store,
    capacity: u32,
}

impl Admin {
    /// Reads `[fleet]` (and `filter.max_entries`) from `config` and the
    /// signing key, and sets up the etcd connection as `committer`.
    pub async fn connect(
        config: &Path,
        signing_key: Option<&Path>,
        committer: &str,
    ) -> Result<Self, AdminError> {
        let (fleet, capacity) = config::load_fleet(config)?;
        let credentials = Credentials::read(&fleet)?;
        let signer = signing_key.map(SigningKey::load).transpose()?.map(std::sync::Arc::new);
        let trusted = fleet.trusted_keys().map_err(|e| ConfigError::Invalid {
            path: config.to_owned(),
            problems: vec![config::Invalid::new("fleet.trusted_keys", e.to_string())],
        })?;
        let authority = Authority { trusted, signer };
        let store = Store::connect(&fleet, &credentials, committer, capacity, authority).await?;
        Ok(Self { store, capacity })
    }

    /// Commits `change`, signed.
    pub async fn commit(&self, change: &Change, empty_ok: bool) -> Result<Committed, CommitError> {
        self.store.commit(change, self.capacity, empty_ok).await
    }

    pub async fn view(&self) -> Result<FleetView, StoreError> {
        self.store.view().await
    }
}

/// Who commits from this machine: `$USER@hostname`, reduced to what a
/// pointer's `committed_by` may hold.
pub fn committer_name() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "admin".into());
    let host =
        nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let name = committer_from(&format!("{user}@{host}"));
    if valid_committer(&name) { name } else { "admin".into() }
}
