//! Following the group's list: read the whole state, apply it, watch the
//! pointer from the revision read, apply each new generation. Any gap — a
//! compaction, a cancelled or broken stream, a lost leader, etcd down —
//! ends the watch; after a jittered backoff the whole state is read again,
//! so no change is ever missed and a broken cluster is never hammered.
//! The pointer is also re-read every `resync_interval`, in case a watch
//! looks healthy but is not.
//!
//! Nothing here clears or shrinks the list because etcd is unreachable:
//! failing reads leave the list in force as it is.
//!
//! A generation is put in force only if its pointer is valid, it is newer
//! than the one in force (never back: a replayed pointer is refused), a
//! trusted key signed it (with `trusted_keys`), and its chunks verify.
//! Each refusal is counted by reason and shown; the list in force stays.
//! The follower itself is supervised: if it ever ends or panics, that is
//! reported and it starts again after a backoff.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;

use super::{
    layout::Pointer,
    source::{Source, Watch as _},
    store::StoreError,
    trust::TrustedKeys,
};
use crate::{
    allowlist::{Allowlist, Diff},
    status::FleetStatus,
};

/// The first pause before re-reading after a failure; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Puts a verified generation in force (the daemon: maps and local file).
pub trait Enforcer: Send + Sync + 'static {
    /// Why a generation could not be put in force here.
    type Error: std::error::Error + Send;
    fn enforce(
        &self,
        list: Allowlist,
        pointer: &Pointer,
    ) -> impl Future<Output = Result<Diff, Self::Error>> + Send;
}

/// What the sync loop publishes: `status`, `/metrics` and the commit path read it.
pub struct Health {
    group: String,
    host: String,
    inner: Mutex<Inner>,
    /// The generation in force here; commits wait on it.
    applied: watch::Sender<u64>,
    /// Refusals so far: this host's record is republished on each.
    refused: watch::Sender<u64>,
    trusted_keys: Vec<String>,
    propagation: Histogram,
}

#[derive(Default)]
struct Inner {
    connected: bool,
    refusals: BTreeMap<&'static str, u64>,
    last_refusal: Option<String>,
    follower_restarts: u64,
    applied_entries: usize,
    applied_at_ms: Option<u64>,
    current: Option<u64>,
    last_contact: Option<Instant>,
    restarts: BTreeMap<&'static str, u64>,
    resyncs: u64,
    apply_errors: u64,
    last_error: Option<String>,
}

impl Health {
    /// `applied`: the generation the local file holds (0: none), of
    /// `entries` entries; `trusted`: whose signatures generations need.
    pub fn new(
        group: &str,
        host: &str,
        applied: u64,
        entries: usize,
        trusted: &TrustedKeys,
    ) -> Self {
        let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        Self {
            group: group.to_owned(),
            host: host.to_owned(),
            inner: Mutex::new(Inner { applied_entries: entries, ..Inner::default() }),
            applied: watch::Sender::new(applied),
            refused: watch::Sender::new(0),
            trusted_keys: trusted.fingerprints(),
            propagation: Histogram::new(buckets),
        }
    }

    /// Wakes on every refusal.
    pub fn subscribe_refusals(&self) -> watch::Receiver<u64> {
        self.refused.subscribe()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Waits up to `timeout` for `generation` (or a later one) to be in force here.
    pub async fn wait_for(&self, generation: u64, timeout: Duration) -> bool {
        let mut applied = self.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|g| *g >= generation)).await.is_ok()
    }

    pub fn propagation(&self) -> Histogram {
        self.propagation.clone()
    }

    pub fn snapshot(&self) -> FleetStatus {
        let inner = self.inner();
        let stale_seconds = match (inner.connected, inner.last_contact) {
            (true, _) => Some(0.0),
            (false, contact) => contact.map(|at| at.elapsed().as_secs_f64()),
        };
        FleetStatus {
            group: self.group.clone(),
            host: self.host.clone(),
            connected: inner.connected,
            applied_generation: self.applied(),
            applied_entries: inner.applied_entries,
            applied_at_ms: inner.applied_at_ms,
            current_generation: inner.current,
            stale_seconds,
            watch_restarts: inner.restarts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            resyncs: inner.resyncs,
            apply_errors: inner.apply_errors,
            last_error: inner.last_error.clone(),
            refusals: inner.refusals.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            last_refusal: inner.last_refusal.clone(),
            trusted_keys: self.trusted_keys.clone(),
            follower_restarts: inner.follower_restarts,
        }
    }

    fn contact(&self, connected: bool) {
        let mut inner = self.inner();
        inner.last_contact = Some(Instant::now());
        inner.connected = connected;
    }

    fn disconnected(&self, restart: &Restart) {
        let mut inner = self.inner();
        if inner.connected {
            inner.last_contact = Some(Instant::now());
        }
        inner.connected = false;
        *inner.restarts.entry(restart.reason()).or_default() += 1;
    }

    fn failed(&self, error: String) {
        tracing::error!("fleet: {error}; the list in force stays");
        let mut inner = self.inner();
        inner.apply_errors += 1;
        inner.last_error = Some(error);
    }

    /// A generation in etcd that this host will not put in force.
    fn refused(&self, reason: &'static str, error: String) {
        self.failed(error.clone());
        let mut inner = self.inner();
        *inner.refusals.entry(reason).or_default() += 1;
        inner.last_refusal = Some(error);
        drop(inner);
        self.refused.send_modify(|count| *count += 1);
    }

    /// The follower ended (it never should): reported until it is back.
    fn follower_stopped(&self, why: &str) {
        tracing::error!("fleet: the watch on the group's list stopped ({why}); restarting it");
        let mut inner = self.inner();
        inner.connected = false;
        inner.follower_restarts += 1;
        inner.last_error = Some(format!("the watch on the group's list stopped: {why}"));
    }

    fn enforced(&self, pointer: &Pointer) {
        let now = crate::clock::unix_ms();
        // Clocks of different hosts: a negative delay is skew, not speed.
        let delay = now.saturating_sub(pointer.committed_at_ms);
        self.propagation.observe(delay as f64 / 1000.0);
        let mut inner = self.inner();
        inner.applied_at_ms = Some(now);
        inner.applied_entries = pointer.entries;
        inner.last_error = None;
        inner.last_refusal = None;
        drop(inner);
        self.applied.send_replace(pointer.generation);
    }
}

/// Why a watch ended; the label of `edgegate_fleet_watch_restarts_total`.
#[derive(Debug, thiserror::Error)]
enum Restart {
    #[error("{0}")]
    Unreachable(#[from] StoreError),
    #[error("the watch fell behind a compaction")]
    Compacted,
    #[error("etcd cancelled the watch: {0}")]
    Canceled(String),
    #[error("the watch failed: {0}")]
    Stream(etcd_client::Error),
    #[error("etcd closed the watch")]
    Closed,
}

impl Restart {
    fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Compacted => "compacted",
            Self::Canceled(_) => "canceled",
            Self::Stream(_) => "stream_error",
            Self::Closed => "closed",
        }
    }
}

/// Follows the group's list until the task is dropped. The follower runs
/// as a task of its own: should it end or panic, that is counted and shown
/// (`connected` false, `last_error`), and it starts again after a backoff.
pub async fn follow<S: Source, E: Enforcer>(
    store: S,
    enforcer: Arc<E>,
    health: Arc<Health>,
    resync_interval: Duration,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let follower = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(follow_forever(
            store.clone(),
            Arc::clone(&enforcer),
            Arc::clone(&health),
            resync_interval,
        )));
        let why = match follower.await {
            Ok(()) => "it ended".to_owned(),
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("it panicked: {message}")
            }
            Err(_) => return,
        };
        health.follower_stopped(&why);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The follower: watch sessions one after another, never returning.
async fn follow_forever<S: Source, E: Enforcer>(
    store: S,
    enforcer: Arc<E>,
    health: Arc<Health>,
    resync_interval: Duration,
) {
    let mut backoff = MIN_BACKOFF;
    let mut first = true;
    loop {
        let restart =
            watch_once(&store, &*enforcer, &health, resync_interval, first, &mut backoff).await;
        first = false;
        health.disconnected(&restart);
        // Full jitter: hosts that lost etcd together do not return together.
        let pause = backoff.mul_f64(0.5 + rand_unit() / 2.0);
        tracing::warn!("fleet: {restart}; reading the whole list again in {pause:.1?}");
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One session: read everything, then watch from there until something breaks.
async fn watch_once(
    store: &impl Source,
    enforcer: &impl Enforcer,
    health: &Health,
    resync_interval: Duration,
    first: bool,
    backoff: &mut Duration,
) -> Restart {
    let current = match store.current().await {
        Ok(current) => current,
        Err(e) => return e.into(),
    };
    *backoff = MIN_BACKOFF;
    health.contact(false);
    // After a gap, a newer generation found here is one the watch missed.
    let via = if first { Via::Start } else { Via::Reread };
    if let Err(e) = catch_up(store, enforcer, health, current.pointer, via).await {
        return e.into();
    }
    let mut stream = match store.watch(current.revision + 1).await {
        Ok(stream) => stream,
        Err(e) => return e.into(),
    };
    health.contact(true);
    let start = tokio::time::Instant::now() + resync_interval;
    let mut resync = tokio::time::interval_at(start, resync_interval);
    loop {
        tokio::select! {
            batch = stream.next() => {
                let batch = match batch {
                    Ok(Some(batch)) => batch,
                    Ok(None) => return Restart::Closed,
                    Err(e) => return Restart::Stream(e),
                };
                if batch.compacted {
                    return Restart::Compacted;
                }
                if let Some(reason) = batch.canceled {
                    return Restart::Canceled(reason);
                }
                health.contact(true);
                if batch.deleted {
                    tracing::error!("fleet: the group's list was deleted from etcd; the list in force stays");
                }
                let Some(value) = batch.latest else { continue };
                let pointer = store.parse_pointer(&value);
                if let Err(e) = catch_up(store, enforcer, health, Some(pointer), Via::Watch).await {
                    return e.into();
                }
            }
            _ = resync.tick() => {
                let current = match store.current().await {
                    Ok(current) => current,
                    Err(e) => return e.into(),
                };
                health.contact(true);
                if let Err(e) = catch_up(store, enforcer, health, current.pointer, Via::Reread).await {
                    return e.into();
                }
            }
        }
    }
}

/// How a pointer was found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Start,
    Watch,
    Reread,
}

/// Puts `pointer`'s generation in force if this host may: the pointer is
/// valid, newer than the generation in force, signed by a trusted key (when
/// keys are configured), and its chunks verify; an empty list only when its
/// writer forced it. Anything else is refused and counted, and the list in
/// force stays. Only an unreachable etcd is an error: the session restarts.
async fn catch_up(
    store: &impl Source,
    enforcer: &impl Enforcer,
    health: &Health,
    pointer: Option<Result<Pointer, StoreError>>,
    via: Via,
) -> Result<(), StoreError> {
    let pointer = match pointer {
        // A group with no list yet: keep the local one.
        None => return Ok(()),
        Some(Ok(pointer)) => pointer,
        Some(Err(e)) => {
            let reason = match &e {
                StoreError::Pointer { source, .. } => source.reason(),
                _ => "malformed",
            };
            health.refused(reason, format!("{e}; refused"));
            return Ok(());
        }
    };
    let generation = pointer.generation;
    health.inner().current = Some(generation);
    let applied = health.applied();
    if generation <= applied {
        if generation < applied {
            health.refused(
                "rollback",
                format!(
                    "generation {generation} in etcd is older than generation {applied} in force \
                     here (a replayed pointer, or etcd restored from a backup); refused"
                ),
            );
        }
        return Ok(());
    }
    if let Err(e) = store.check_trust(&pointer) {
        health.refused(e.reason(), format!("generation {generation}: {e}; refused"));
        return Ok(());
    }
    let list = match store.fetch(&pointer).await {
        Ok(list) => list,
        Err(e @ StoreError::Unreachable(_)) => return Err(e),
        Err(e) => {
            health.refused("corrupt", e.to_string());
            return Ok(());
        }
    };
    if list.is_empty() && !pointer.empty_forced {
        health.refused(
            "empty",
            format!("generation {generation} is an empty list its writer did not force; refused"),
        );
        return Ok(());
    }
    match enforcer.enforce(list, &pointer).await {
        Ok(diff) => {
            health.enforced(&pointer);
            // Counted once in force: a fetch cut short by etcd retries the
            // same generation and must not count twice.
            if via == Via::Reread {
                health.inner().resyncs += 1;
            }
            tracing::info!(
                "fleet: generation {generation} in force ({} added, {} removed, {} updated; {} \
                 entries), committed by {}{}",
                diff.added,
                diff.removed,
                diff.updated,
                pointer.entries,
                pointer.committed_by,
                pointer
                    .signature
                    .as_ref()
                    .and_then(|s| s.key.parse::<super::trust::PublicKey>().ok())
                    .map(|key| format!(", signed by key {}", key.fingerprint()))
                    .unwrap_or_default()
            );
        }
        Err(e) => health.failed(format!("generation {generation}: {e}")),
    }
    Ok(())
}

/// A number in [0, 1) that differs between hosts and calls (for jitter).
fn rand_unit() -> f64 {
    (super::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;
