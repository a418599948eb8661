//! This host in `edgegate fleet status`: an `alive/{host}` key on a lease
//! (it disappears ~30 s after the daemon or its link to etcd dies) and a
//! `hosts/{host}` record of what it enforces, rewritten after every apply.
//! Both live outside the watched pointer, so they never wake the watchers.

use std::{sync::Arc, time::Duration};

use super::{Health, Store, layout::HostRecord};

const LEASE_TTL: Duration = Duration::from_secs(30);
/// Keep-alives go out three times per TTL: one lost is not a lost lease.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(10);
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Keeps the lease and the record up until the task is dropped. A lost
/// lease (etcd down longer than the TTL) is granted anew.
pub async fn announce(store: Store, health: Arc<Health>) {
    let mut applied = health.subscribe();
    // A refusal republishes the record, so that a committer sees the
    // generation in force here even after etcd lost it (a restored backup).
    let mut refused = health.subscribe_refusals();
    loop {
        let lease = match store.announce(LEASE_TTL).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::debug!("fleet: cannot announce this host: {e}");
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        let (mut keeper, mut answers) = match store.keep_alive(lease).await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!("fleet: cannot keep the lease alive: {e}");
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        let mut published = publish(&store, &health).await;
        let mut tick = tokio::time::interval(KEEP_ALIVE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let renewed = match keeper.keep_alive().await {
                        Ok(()) => answers.message().await.ok().flatten().is_some_and(|a| a.ttl() > 0),
                        Err(_) => false,
                    };
                    if !renewed {
                        tracing::warn!("fleet: this host's lease lapsed; granting a new one");
                        break;
                    }
                    if !published {
                        published = publish(&store, &health).await;
                    }
                }
                changed = applied.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    published = publish(&store, &health).await;
                }
                changed = refused.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    published = publish(&store, &health).await;
                }
            }
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// Writes the record; a failure is retried at the next keep-alive.
async fn publish(store: &Store, health: &Health) -> bool {
    let status = health.snapshot();
    let record = HostRecord {
        host: store.host().to_owned(),
        generation: status.applied_generation,
        applied_at_ms: status.applied_at_ms.unwrap_or(0),
        entries: status.applied_entries,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    match store.publish(&record).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("fleet: cannot publish this host's record: {e}");
            false
        }
    }
}
