//! Fleet mode: every host of a group enforces one allowlist, kept in etcd.
//!
//! - `layout`: the keys, the pointer and the chunks, and their verification;
//! - `store`: etcd requests: read, fetch, compare-and-swap commits, host records;
//! - `source`: what the follower reads from etcd, as a seam for its tests;
//! - `sync`: the watch that puts each committed generation in force here,
//!   re-reading the whole state after any gap, and the [`Health`] it publishes;
//! - `presence`: this host's lease and record, for `edgegate fleet status`;
//! - `trust`: who may decide the list: signatures by `trusted_keys`;
//! - `admin`: changes made where the signing key is, straight to etcd.
//!
//! The daemon plugs in through [`Enforcer`]; the local allowlist file stays
//! the cache that a host enforces while etcd is unreachable.

mod admin;
pub mod layout;
mod presence;
mod source;
mod store;
mod sync;
pub mod trust;

pub use admin::{Admin, AdminError, committer_name};
pub use presence::announce;
pub use source::{Batch, Source, Watch};
pub use store::{
    Authority, CommitError, Committed, Credentials, HostEntry, Store, StoreError,
    UnreadableCredential,
};
pub use sync::{Enforcer, Health, follow};

/// 64 bits that differ between processes and calls: chunk-key nonces and
/// backoff jitter (not secrets).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(crate::clock::unix_ms());
    hasher.finish()
}
