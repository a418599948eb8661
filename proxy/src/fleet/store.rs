//! The group's list in etcd: reading it whole, committing a change with a
//! compare-and-swap, and the hosts' records. Every request has a deadline
//! and requires a leader, so a member cut off from quorum fails instead of
//! answering with stale data.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

use super::layout::{self, CorruptGeneration, HostRecord, Keys, Pointer};
use crate::{
    allowlist::{Allowlist, Change, Diff, Refusal},
    config::FleetConfig,
};

/// A commit that keeps losing the race to other writers gives up after this many tries.
const COMMIT_ATTEMPTS: usize = 20;
/// How long a commit rides out a leader election or a dead member before
/// saying etcd is unreachable (a few election timeouts).
const COMMIT_PATIENCE: Duration = Duration::from_secs(5);
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What start-up reads (as root) for the etcd connection.
#[derive(Clone)]
pub struct Credentials {
    pub ca: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Credentials {
    /// Reads `ca`, `cert` and `key`; errors name the key.
    pub fn read(config: &FleetConfig) -> Result<Self, (&'static str, std::io::Error)> {
        let read = |key, path: &Option<std::path::PathBuf>| {
            path.as_ref().map(|p| std::fs::read(p).map_err(|e| (key, e))).transpose()
        };
        let ca = read("fleet.ca", &config.ca)?;
        let cert = read("fleet.cert", &config.cert)?;
        let key = read("fleet.key", &config.key)?;
        Ok(Self { ca, identity: cert.zip(key) })
    }
}

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer from a member with a leader within the deadline.
    #[error("etcd is unreachable ({0})")]
    Unreachable(#[from] etcd_client::Error),
    /// `list/current` is not a pointer this version understands.
    #[error("`{key}` in etcd is not an edgegate pointer: {source}")]
    Pointer {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The chunks do not add up to the list the pointer describes.
    #[error("the group's list in etcd is corrupt: {0}")]
    Corrupt(#[from] CorruptGeneration),
}

/// Why a change was not committed. Nothing changed in etcd.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{0}; nothing changed")]
    Store(#[from] StoreError),
    /// The change does not apply to the group's list as it now is.
    #[error("{0}")]
    Refused(#[source] Refusal),
    /// The change conflicts with one another writer committed first.
    #[error(
        "another change (generation {generation}) was committed first, and this one now conflicts with it: {source}"
    )]
    Conflict {
        generation: u64,
        #[source]
        source: Refusal,
    },
    /// The result would be empty, which drops every partner on every host.
    #[error(
        "this would leave the group's list empty, dropping every source on every host; \
         nothing changed (pass --force if that is what you want)"
    )]
    Empty,
    /// The result does not fit the maps.
    #[error(
        "the list would hold {ipv4} IPv4 and {ipv6} IPv6 entries, more than `max_entries` = \
         {capacity} per family; nothing changed"
    )]
    Capacity { ipv4: usize, ipv6: usize, capacity: u32 },
    /// Other writers won every compare-and-swap.
    #[error(
        "other writers committed first {COMMIT_ATTEMPTS} times in a row; nothing changed, try again"
    )]
    Contention,
}

/// The pointer as read, with the revisions a watch and a compare-and-swap need.
pub struct Current {
    pub pointer: Option<Pointer>,
    /// `list/current`'s mod revision (0: absent).
    pub mod_revision: i64,
    /// The store's revision when it was read.
    pub revision: i64,
}

/// A committed change.
#[derive(Debug, Clone)]
pub struct Committed {
    pub generation: u64,
    pub diff: Diff,
    pub entries: usize,
}

/// One host as `edgegate fleet status` shows it.
#[derive(Debug, Clone)]
pub struct HostEntry {
    pub record: HostRecord,
    pub alive: bool,
}

/// A connection to etcd for one group.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    host: String,
}

impl Store {
    /// Sets up the connection. It is made lazily: etcd being down at start
    /// shows up in the first request, not here.
    pub async fn connect(
        config: &FleetConfig,
        credentials: &Credentials,
        host: &str,
    ) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_require_leader(true)
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            // A silent peer (a partition, a dead member) ends the streams
            // within seconds instead of after TCP's minutes.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(ca) = &credentials.ca {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca));
            if let Some((cert, key)) = &credentials.identity {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        let client = Client::connect(&config.endpoints, Some(options)).await?;
        Ok(Self { client, keys: Keys::new(&config.prefix, &config.group), host: host.to_owned() })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Reads the pointer (linearizable: through the leader).
    pub async fn current(&self) -> Result<Current, StoreError> {
        let key = self.keys.current();
        let response = self.client.clone().get(key.as_str(), None).await?;
        let revision = response.header().map_or(0, etcd_client::ResponseHeader::revision);
        let Some(kv) = response.kvs().first() else {
            return Ok(Current { pointer: None, mod_revision: 0, revision });
        };
        let pointer = self.parse_pointer(kv.value())?;
        Ok(Current { pointer: Some(pointer), mod_revision: kv.mod_revision(), revision })
    }

    pub fn parse_pointer(&self, value: &[u8]) -> Result<Pointer, StoreError> {
        serde_json::from_slice(value)
            .map_err(|source| StoreError::Pointer { key: self.keys.current(), source })
    }

    /// The list `pointer` names, verified whole.
    pub async fn fetch(&self, pointer: &Pointer) -> Result<Allowlist, StoreError> {
        let mut client = self.client.clone();
        let mut chunks = Vec::with_capacity(pointer.chunks);
        // One chunk per request: each answer stays far below gRPC's 4 MiB.
        for index in 0..pointer.chunks {
            let response = client.get(pointer.chunk_key(index), None).await?;
            match response.kvs().first() {
                Some(kv) => chunks.push(kv.value().to_vec()),
                None => break,
            }
        }
        Ok(layout::decode(pointer, &chunks)?)
    }

    /// Watches the pointer from `revision` on.
    pub async fn watch_current(&self, revision: i64) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new().with_start_revision(revision).with_progress_notify();
        Ok(self.client.clone().watch(self.keys.current(), Some(options)).await?)
    }

    /// Applies `change` to the group's list: computed on the generation
    /// read, written as new chunks, published by a compare-and-swap of the
    /// pointer. Losing the race re-reads and recomputes, so concurrent
    /// writers all land.
    pub async fn commit(
        &self,
        change: &Change,
        capacity: u32,
        empty_ok: bool,
    ) -> Result<Committed, CommitError> {
        let deadline = Instant::now() + COMMIT_PATIENCE;
        let mut conflicts = 0;
        loop {
            match self.try_commit(change, capacity, empty_ok, conflicts > 0).await {
                Ok(Some(committed)) => return Ok(committed),
                Ok(None) => {
                    conflicts += 1;
                    if conflicts == COMMIT_ATTEMPTS {
                        return Err(CommitError::Contention);
                    }
                }
                Err(CommitError::Store(StoreError::Unreachable(e)))
                    if transient(&e) && Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tracing::debug!("fleet: commit: {e}; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: `None` when another writer won the compare-and-swap.
    async fn try_commit(
        &self,
        change: &Change,
        capacity: u32,
        empty_ok: bool,
        lost_before: bool,
    ) -> Result<Option<Committed>, CommitError> {
        let mut client = self.client.clone();
        let current = self.current().await?;
        let generation = current.pointer.as_ref().map_or(0, |p| p.generation);
        let base = match &current.pointer {
            Some(pointer) => match self.fetch(pointer).await {
                Ok(list) => list,
                // A replacement does not build on the list: it is how an
                // operator repairs a corrupt generation.
                Err(StoreError::Corrupt(e)) if matches!(change, Change::Replace { .. }) => {
                    tracing::warn!("fleet: replacing a corrupt list: {e}");
                    Allowlist::default()
                }
                Err(e) => return Err(e.into()),
            },
            None => Allowlist::default(),
        };
        let next = change.apply_to(&base).map_err(|source| match lost_before {
            false => CommitError::Refused(source),
            true => CommitError::Conflict { generation, source },
        })?;
        if next.is_empty() && !empty_ok {
            return Err(CommitError::Empty);
        }
        let (ipv4, ipv6) = next.family_sizes();
        if ipv4.max(ipv6) > capacity as usize {
            return Err(CommitError::Capacity { ipv4, ipv6, capacity });
        }
        let encoded = layout::encode(&next);
        let pointer = Pointer {
            generation: generation + 1,
            dir: self.keys.generation_dir(generation + 1, super::random_u64()),
            chunks: encoded.chunks.len(),
            entries: encoded.entries,
            sha256: encoded.sha256,
            committed_at_ms: super::unix_now_ms(),
            committed_by: self.host.clone(),
            empty_forced: next.is_empty(),
        };
        for (index, chunk) in encoded.chunks.into_iter().enumerate() {
            client.put(pointer.chunk_key(index), chunk, None).await.map_err(StoreError::from)?;
        }
        let key = self.keys.current();
        let unchanged = match current.mod_revision {
            0 => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            revision => Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
        };
        let value = serde_json::to_vec(&pointer).expect("a pointer serializes");
        let swap = Txn::new().when([unchanged]).and_then([TxnOp::put(key.as_str(), value, None)]);
        let swapped = match client.txn(swap).await {
            Ok(response) => response.succeeded(),
            // The answer was lost, not necessarily the swap: the pointer says.
            Err(e) => match self.current().await {
                Ok(now) if now.pointer.as_ref().is_some_and(|p| p.dir == pointer.dir) => true,
                Ok(_) => false,
                Err(_) => return Err(StoreError::from(e).into()),
            },
        };
        if !swapped {
            // Another writer won: drop this attempt's chunks.
            let own = DeleteOptions::new().with_prefix();
            if let Err(e) = client.delete(pointer.dir.as_str(), Some(own)).await {
                tracing::warn!("fleet: cannot remove the chunks of a lost commit: {e}");
            }
            return Ok(None);
        }
        if let Some(previous) = &current.pointer {
            self.forget_before(&previous.dir).await;
        }
        Ok(Some(Committed {
            generation: pointer.generation,
            diff: base.diff(&next),
            entries: next.len(),
        }))
    }

    /// Deletes every generation older than the one in `dir` (which a reader
    /// may still be fetching). Failing only leaves garbage for the next commit.
    async fn forget_before(&self, dir: &str) {
        let range = DeleteOptions::new().with_range(dir);
        if let Err(e) = self.client.clone().delete(self.keys.generations(), Some(range)).await {
            tracing::warn!("fleet: cannot remove old generations: {e}");
        }
    }

    /// Records what this host enforces (kept after the host is gone).
    pub async fn publish(&self, record: &HostRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).expect("a record serializes");
        self.client.clone().put(self.keys.host(&self.host), value, None).await?;
        Ok(())
    }

    /// Grants a lease of `ttl` and puts this host's `alive` key on it.
    pub async fn announce(&self, ttl: Duration) -> Result<i64, StoreError> {
        let mut client = self.client.clone();
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl, None).await?.id();
        let on_lease = PutOptions::new().with_lease(lease);
        client.put(self.keys.alive(&self.host), self.host.as_str(), Some(on_lease)).await?;
        Ok(lease)
    }

    pub async fn keep_alive(
        &self,
        lease: i64,
    ) -> Result<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream), StoreError> {
        Ok(self.client.clone().lease_keep_alive(lease).await?)
    }

    /// Every host that ever reported, and whether its lease is alive.
    pub async fn hosts(&self) -> Result<Vec<HostEntry>, StoreError> {
        let mut client = self.client.clone();
        let prefix = || Some(GetOptions::new().with_prefix());
        let records = client.get(self.keys.hosts(), prefix()).await?;
        let alive = client.get(self.keys.alive_hosts(), prefix()).await?;
        let alive: std::collections::BTreeSet<&[u8]> =
            alive.kvs().iter().map(etcd_client::KeyValue::value).collect();
        Ok(records
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<HostRecord>(kv.value()).ok())
            .map(|record| HostEntry { alive: alive.contains(record.host.as_bytes()), record })
            .collect())
    }
}

/// An error that a retry may not see: no leader for a moment, a member down.
fn transient(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                true
            }
            // A connection that a restarted member closed surfaces as
            // Unknown, with the I/O error (a broken pipe) as its cause.
            tonic::Code::Unknown => caused_by_io(status),
            _ => false,
        },
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

fn caused_by_io(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(error.source(), |e| e.source()).any(|e| e.is::<std::io::Error>())
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn status(status: tonic::Status) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(status)
    }

    #[test]
    fn a_lost_connection_is_retried_and_a_refusal_is_not() {
        let broken_pipe =
            tonic::Status::from_error(Box::new(io::Error::from(io::ErrorKind::BrokenPipe)));
        assert_eq!(broken_pipe.code(), tonic::Code::Unknown);
        assert!(transient(&status(broken_pipe)));
        assert!(transient(&status(tonic::Status::unavailable("no leader"))));
        assert!(transient(&status(tonic::Status::deadline_exceeded("slow"))));

        assert!(!transient(&status(tonic::Status::unknown("a server bug"))));
        assert!(!transient(&status(tonic::Status::invalid_argument("too large"))));
        assert!(!transient(&status(tonic::Status::permission_denied("no role"))));
    }
}
