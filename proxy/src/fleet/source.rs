//! What the follower reads from etcd, as a seam: [`Store`] in the daemon, a
//! scripted fake in the follower's tests.

use std::future::Future;

use etcd_client::{EventType, WatchStream};

use super::{
    layout::Pointer,
    store::{Current, Store, StoreError},
    trust::Untrusted,
};
use crate::allowlist::Allowlist;

/// The group's list as the follower reads it.
pub trait Source: Clone + Send + Sync + 'static {
    type Watch: Watch;
    /// Reads the pointer, with the revision to watch from.
    fn current(&self) -> impl Future<Output = Result<Current, StoreError>> + Send;
    /// The list a validated pointer names, verified whole.
    fn fetch(
        &self,
        pointer: &Pointer,
    ) -> impl Future<Output = Result<Allowlist, StoreError>> + Send;
    /// Watches the pointer from `revision` on.
    fn watch(&self, revision: i64) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;
    /// A pointer value, validated against this group and this host's limits.
    fn parse_pointer(&self, value: &[u8]) -> Result<Pointer, StoreError>;
    /// Whether a trusted key signed `pointer`.
    fn check_trust(&self, pointer: &Pointer) -> Result<(), Untrusted>;
}

/// A watch on the pointer: one batch of events per message.
pub trait Watch: Send {
    /// The next batch; `None` when etcd closed the watch.
    fn next(&mut self) -> impl Future<Output = Result<Option<Batch>, etcd_client::Error>> + Send;
}

/// What one watch message says about the pointer.
#[derive(Debug, Default)]
pub struct Batch {
    /// The watch fell behind a compaction: changes were missed.
    pub compacted: bool,
    /// etcd cancelled the watch, with its reason.
    pub canceled: Option<String>,
    /// The value of the batch's last put: only the newest list matters.
    pub latest: Option<Vec<u8>>,
    /// The pointer was deleted.
    pub deleted: bool,
}

impl Source for Store {
    type Watch = WatchStream;

    async fn current(&self) -> Result<Current, StoreError> {
        Store::current(self).await
    }

    async fn fetch(&self, pointer: &Pointer) -> Result<Allowlist, StoreError> {
        Store::fetch(self, pointer).await
    }

    async fn watch(&self, revision: i64) -> Result<WatchStream, StoreError> {
        self.watch_current(revision).await
    }

    fn parse_pointer(&self, value: &[u8]) -> Result<Pointer, StoreError> {
        Store::parse_pointer(self, value)
    }

    fn check_trust(&self, pointer: &Pointer) -> Result<(), Untrusted> {
        Store::check_trust(self, pointer)
    }
}

impl Watch for WatchStream {
    async fn next(&mut self) -> Result<Option<Batch>, etcd_client::Error> {
        let Some(response) = self.message().await? else {
            return Ok(None);
        };
        let events = response.events();
        Ok(Some(Batch {
            compacted: response.compact_revision() > 0,
            canceled: response.canceled().then(|| response.cancel_reason().to_owned()),
            latest: events.iter().rev().find_map(|event| {
                let put = event.event_type() == EventType::Put;
                put.then(|| event.kv().map(|kv| kv.value().to_vec())).flatten()
            }),
            deleted: events.iter().any(|event| event.event_type() == EventType::Delete),
        }))
    }
}
