//! The group's list in etcd: reading it whole, committing a change with a
//! compare-and-swap, and the hosts' records. Every request has a deadline
//! and requires a leader, so a member cut off from quorum fails instead of
//! answering with stale data.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

use super::{
    layout::{self, CorruptGeneration, HostRecord, InvalidPointer, Keys, Limits, Pointer},
    trust::{SigningKey, TrustedKeys, Untrusted},
};
use crate::{
    allowlist::{Allowlist, Change, ChangeError, Diff},
    config::FleetConfig,
    filter::{Capacity, TooMany},
    status::{FleetHost, FleetView},
};

/// Largest host record read; a real one is about 150 bytes.
const MAX_RECORD_BYTES: usize = 4096;

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

/// A file `[fleet]` names that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("`{key}`: cannot read it: {source}")]
pub struct UnreadableCredential {
    pub key: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl Credentials {
    /// Reads `ca`, `cert` and `key`; errors name the key.
    pub fn read(config: &FleetConfig) -> Result<Self, UnreadableCredential> {
        let read = |key, path: &Option<std::path::PathBuf>| {
            let read =
                |path| std::fs::read(path).map_err(|source| UnreadableCredential { key, source });
            path.as_ref().map(read).transpose()
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
    /// `list/current` is not a pointer this host may act on.
    #[error("`{key}` in etcd is refused: {source}")]
    Pointer {
        key: String,
        #[source]
        source: InvalidPointer,
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
    Refused(#[source] ChangeError),
    /// The change conflicts with one another writer committed first.
    #[error(
        "another change (generation {generation}) was committed first, and this one now conflicts with it: {source}"
    )]
    Conflict {
        generation: u64,
        #[source]
        source: ChangeError,
    },
    /// The result would be empty, which drops every partner on every host.
    #[error(
        "this would leave the group's list empty, dropping every source on every host; \
         nothing changed (pass --force if that is what you want)"
    )]
    Empty,
    /// The result does not fit the hosts' maps while it replaces the group's list.
    #[error("{0} (the hosts' `filter.max_entries`); nothing changed")]
    Capacity(#[source] TooMany),
    /// The list in etcd is not one a trusted key signed: a change must not build on it.
    #[error(
        "the group's list in etcd (generation {generation}) is refused: {source}; nothing \
         changed. Check what the hosts enforce (`edgegate allow list` on one), then write the \
         list whole with `allow replace --file … --signing-key …`"
    )]
    Untrusted {
        generation: u64,
        #[source]
        source: Untrusted,
    },
    /// The pointer in etcd is not usable: only a replacement repairs it.
    #[error("{0}; nothing changed: write the list whole with `allow replace --file …`")]
    Invalid(#[source] StoreError),
    /// The list's text would exceed what the hosts accept.
    #[error(
        "the list's text would be {bytes} bytes, more than the {max} hosts accept for this \
         `max_entries` (shorter comments fit more); nothing changed"
    )]
    TooLarge { bytes: usize, max: usize },
    /// A host reports a generation no later one can follow.
    #[error(
        "host `{host}` reports generation {generation}, and no generation can follow it; \
         delete its record (`etcdctl del {key}`) if that host is not yours; nothing changed"
    )]
    GenerationExhausted { host: String, generation: u64, key: String },
    /// Other writers won every compare-and-swap.
    #[error(
        "other writers committed first {COMMIT_ATTEMPTS} times in a row; nothing changed, try again"
    )]
    Contention,
}

/// The pointer as read, with the revisions a watch and a compare-and-swap need.
pub struct Current {
    /// `None`: no list yet; `Some(Err(_))`: a value this host refuses.
    pub pointer: Option<Result<Pointer, StoreError>>,
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

impl Current {
    /// The generation of a valid pointer.
    pub fn generation(&self) -> Option<u64> {
        match &self.pointer {
            Some(Ok(pointer)) => Some(pointer.generation),
            _ => None,
        }
    }
}

/// Who may decide the list, as this side of the connection sees it.
#[derive(Clone, Default)]
pub struct Authority {
    /// Whose signatures a generation needs (empty: none).
    pub trusted: TrustedKeys,
    /// Signs this side's commits (only where changes are made, never on a gate host).
    pub signer: Option<std::sync::Arc<SigningKey>>,
}

/// A connection to etcd for one group.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    limits: Limits,
    authority: Authority,
    host: String,
}

impl Store {
    /// Sets up the connection. It is made lazily: etcd being down at start
    /// shows up in the first request, not here.
    /// `capacity`: `filter.max_entries`, which bounds what is read; `host`:
    /// this side's name in host records and `committed_by`.
    pub async fn connect(
        config: &FleetConfig,
        credentials: &Credentials,
        host: &str,
        capacity: u32,
        authority: Authority,
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
        Ok(Self {
            client,
            keys: Keys::new(&config.prefix, &config.group),
            limits: Limits::for_capacity(capacity),
            authority,
            host: host.to_owned(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether a trusted key signed `pointer` (always, without `trusted_keys`).
    pub fn check_trust(&self, pointer: &Pointer) -> Result<(), Untrusted> {
        self.authority.trusted.check(self.keys.prefix(), self.keys.group(), pointer)
    }

    /// Reads the pointer (linearizable: through the leader).
    pub async fn current(&self) -> Result<Current, StoreError> {
        let key = self.keys.current();
        let response = self.client.clone().get(key.as_str(), None).await?;
        let revision = response.header().map_or(0, etcd_client::ResponseHeader::revision);
        let Some(kv) = response.kvs().first() else {
            return Ok(Current { pointer: None, mod_revision: 0, revision });
        };
        let pointer = self.parse_pointer(kv.value());
        Ok(Current { pointer: Some(pointer), mod_revision: kv.mod_revision(), revision })
    }

    /// A pointer value, validated against this group and these limits.
    pub fn parse_pointer(&self, value: &[u8]) -> Result<Pointer, StoreError> {
        Pointer::parse(value, &self.keys, &self.limits)
            .map_err(|source| StoreError::Pointer { key: self.keys.current(), source })
    }

    /// The list a validated `pointer` names, verified whole. Nothing is
    /// allocated ahead from the pointer's numbers, and reading stops at
    /// this host's byte limit.
    pub async fn fetch(&self, pointer: &Pointer) -> Result<Allowlist, StoreError> {
        let mut client = self.client.clone();
        let mut chunks = Vec::new();
        let mut bytes = 0usize;
        // One chunk per request: each answer stays far below gRPC's 4 MiB.
        for index in 0..pointer.chunks {
            let response = client.get(pointer.chunk_key(index), None).await?;
            let Some(kv) = response.kvs().first() else { break };
            bytes = bytes.saturating_add(kv.value().len());
            if bytes > self.limits.max_bytes {
                let (generation, max) = (pointer.generation, self.limits.max_bytes);
                return Err(CorruptGeneration::TooLarge { generation, max }.into());
            }
            chunks.push(kv.value().to_vec());
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
        // A replacement does not build on the list: it is how an operator
        // repairs an invalid, corrupt or untrusted generation.
        let replacing = matches!(change, Change::Replace { .. });
        let repair = |problem: &dyn std::fmt::Display| -> Option<(Pointer, Allowlist)> {
            tracing::warn!("fleet: replacing a list that is refused: {problem}");
            None
        };
        let base: Option<(Pointer, Allowlist)> = match current.pointer {
            None => None,
            Some(Err(e)) if replacing => repair(&e),
            Some(Err(e)) => return Err(CommitError::Invalid(e)),
            Some(Ok(pointer)) => match self.check_trust(&pointer) {
                Err(e) if replacing => repair(&e),
                Err(source) => {
                    return Err(CommitError::Untrusted { generation: pointer.generation, source });
                }
                Ok(()) => match self.fetch(&pointer).await {
                    Ok(list) => Some((pointer, list)),
                    Err(e @ StoreError::Corrupt(_)) if replacing => repair(&e),
                    Err(e) => return Err(e.into()),
                },
            },
        };
        let previous = base.as_ref().map_or(0, |(pointer, _)| pointer.generation);
        let empty = Allowlist::default();
        let base_list = base.as_ref().map_or(&empty, |(_, list)| list);
        let next = change.apply_to(base_list).map_err(|source| match lost_before {
            false => CommitError::Refused(source),
            true => CommitError::Conflict { generation: previous, source },
        })?;
        if next.is_empty() && !empty_ok {
            return Err(CommitError::Empty);
        }
        // The hosts replace the list they hold, the base, with this one.
        let (base, new) = (base_list.entries(), next.entries());
        Capacity(capacity)
            .check(base.map(|entry| entry.cidr), new.map(|entry| entry.cidr))
            .map_err(CommitError::Capacity)?;
        let encoded = layout::encode(&next);
        if encoded.bytes() > self.limits.max_bytes {
            return Err(CommitError::TooLarge {
                bytes: encoded.bytes(),
                max: self.limits.max_bytes,
            });
        }
        let generation = self.next_generation(previous).await?;
        let mut pointer = Pointer {
            generation,
            previous,
            dir: self.keys.generation_dir(generation, super::random_u64()),
            chunks: encoded.chunks.len(),
            entries: encoded.entries,
            sha256: encoded.sha256,
            committed_at_ms: crate::clock::unix_ms(),
            committed_by: self.host.clone(),
            empty_forced: next.is_empty(),
            signature: None,
        };
        if let Some(signer) = &self.authority.signer {
            signer.sign(self.keys.prefix(), self.keys.group(), &mut pointer);
        }
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
                Ok(now) => now.pointer.is_some_and(|p| p.is_ok_and(|p| p.dir == pointer.dir)),
                Err(_) => return Err(StoreError::from(e).into()),
            },
        };
        if !swapped {
            // Another writer won: drop this attempt's chunks (a directory
            // this attempt named itself).
            let own = DeleteOptions::new().with_prefix();
            if let Err(e) = client.delete(pointer.dir.as_str(), Some(own)).await {
                tracing::warn!("fleet: cannot remove the chunks of a lost commit: {e}");
            }
            return Ok(None);
        }
        if previous > 0 {
            self.forget_below(previous).await;
        }
        Ok(Some(Committed {
            generation: pointer.generation,
            diff: base_list.diff(&next),
            entries: next.len(),
        }))
    }

    /// The generation a commit on `previous` gets: above it and above every
    /// generation a host reports, so that after etcd is restored from an
    /// older backup the next change is one the hosts move forward to.
    async fn next_generation(&self, previous: u64) -> Result<u64, CommitError> {
        let highest = self
            .hosts()
            .await?
            .into_iter()
            .map(|entry| entry.record)
            .max_by_key(|record| record.generation);
        let floor = highest.as_ref().map_or(0, |record| record.generation).max(previous);
        floor.checked_add(1).ok_or_else(|| {
            let host = highest.map(|r| r.host).unwrap_or_default();
            CommitError::GenerationExhausted { key: self.keys.host(&host), host, generation: floor }
        })
    }

    /// Deletes every generation older than `generation` (which a reader may
    /// still be fetching): a key range computed from a number, strictly
    /// inside `list/gen/`. Failing only leaves garbage for the next commit.
    async fn forget_below(&self, generation: u64) {
        let range = DeleteOptions::new().with_range(self.keys.generations_from(generation));
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

    /// The group's generation and every host's, for `edgegate fleet status`.
    pub async fn view(&self) -> Result<FleetView, StoreError> {
        let current = self.current().await?;
        let hosts = self.hosts().await?;
        let generation = current.generation();
        let pointer = current.pointer.and_then(Result::ok);
        let hosts = hosts
            .into_iter()
            .map(|entry| FleetHost {
                lag: generation.unwrap_or(0).saturating_sub(entry.record.generation),
                host: entry.record.host,
                alive: entry.alive,
                generation: entry.record.generation,
                applied_at_ms: entry.record.applied_at_ms,
                version: entry.record.version,
            })
            .collect();
        Ok(FleetView {
            group: self.keys.group().to_owned(),
            current_generation: generation,
            committed_at_ms: pointer.as_ref().map(|p| p.committed_at_ms),
            committed_by: pointer.map(|p| p.committed_by),
            hosts,
        })
    }

    /// Every host that ever reported, and whether its lease is alive.
    pub async fn hosts(&self) -> Result<Vec<HostEntry>, StoreError> {
        let mut client = self.client.clone();
        let prefix = || Some(GetOptions::new().with_prefix());
        let records = client.get(self.keys.hosts(), prefix()).await?;
        let alive = client.get(self.keys.alive_hosts(), prefix()).await?;
        let alive: std::collections::BTreeSet<&[u8]> =
            alive.kvs().iter().map(etcd_client::KeyValue::value).collect();
        // Records are other hosts' words: bounded, and only under their own key.
        Ok(records
            .kvs()
            .iter()
            .filter(|kv| kv.value().len() <= MAX_RECORD_BYTES)
            .filter_map(|kv| {
                let record = serde_json::from_slice::<HostRecord>(kv.value()).ok()?;
                (layout::valid_committer(&record.host)
                    && kv.key() == self.keys.host(&record.host).as_bytes()
                    && record.version.len() <= 64
                    && record.version.chars().all(|c| c.is_ascii_graphic()))
                .then_some(record)
            })
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
