//! The follower against a scripted etcd: what it applies, what it refuses,
//! how it recovers from gaps, and how it backs off while etcd is down.
//! Time is tokio's paused clock, so the backoff is measured, not slept.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex as SyncMutex},
};

use tokio::{sync::mpsc, time::Instant};

use super::*;
use crate::fleet::{
    layout::CorruptGeneration,
    source::{Batch, Watch},
    store::Current,
    trust::Untrusted,
};

/// The group's state in the fake etcd, and what the follower asked of it.
#[derive(Default)]
struct Etcd {
    pointer: Option<Pointer>,
    lists: BTreeMap<u64, Allowlist>,
    /// Generations whose chunks fail verification.
    corrupt: Vec<u64>,
    down: bool,
    revision: i64,
    /// The open watch's sender: batches the test delivers.
    watch: Option<mpsc::UnboundedSender<Result<Batch, etcd_client::Error>>>,
    /// When each full read (`current`) was attempted.
    reads: Vec<Instant>,
}

#[derive(Clone, Default)]
struct FakeSource(Arc<SyncMutex<Etcd>>);

fn unreachable() -> StoreError {
    StoreError::Unreachable(etcd_client::Error::InvalidArgs("etcd is down (test)".into()))
}

impl FakeSource {
    fn etcd(&self) -> std::sync::MutexGuard<'_, Etcd> {
        self.0.lock().unwrap()
    }

    /// Commits `list` as `generation` (not announced on the watch).
    fn commit(&self, generation: u64, list: &str, empty_forced: bool) -> Pointer {
        let list = Allowlist::parse(list).unwrap();
        let pointer = Pointer {
            generation,
            previous: generation - 1,
            dir: format!("gen/{generation}"),
            chunks: 1,
            entries: list.len(),
            sha256: String::new(),
            committed_at_ms: crate::clock::unix_ms(),
            committed_by: "test".into(),
            empty_forced,
            signature: None,
        };
        let mut etcd = self.etcd();
        etcd.revision += 1;
        etcd.lists.insert(generation, list);
        etcd.pointer = Some(pointer.clone());
        pointer
    }

    /// Delivers a batch on the open watch.
    fn deliver(&self, batch: Result<Batch, etcd_client::Error>) {
        let etcd = self.etcd();
        let watch = etcd.watch.as_ref().expect("a watch is open");
        watch.send(batch).expect("the follower reads its watch");
    }

    /// Commits and announces `generation` on the watch, as etcd would.
    fn commit_and_announce(&self, generation: u64, list: &str) {
        let pointer = self.commit(generation, list, false);
        let latest = Some(serde_json::to_vec(&pointer).unwrap());
        self.deliver(Ok(Batch { latest, ..Batch::default() }));
    }

    fn watching(&self) -> bool {
        self.etcd().watch.as_ref().is_some_and(|watch| !watch.is_closed())
    }
}

struct FakeWatch(mpsc::UnboundedReceiver<Result<Batch, etcd_client::Error>>);

impl Watch for FakeWatch {
    async fn next(&mut self) -> Result<Option<Batch>, etcd_client::Error> {
        self.0.recv().await.transpose()
    }
}

impl Source for FakeSource {
    type Watch = FakeWatch;

    async fn current(&self) -> Result<Current, StoreError> {
        let mut etcd = self.etcd();
        etcd.reads.push(Instant::now());
        if etcd.down {
            return Err(unreachable());
        }
        let pointer = etcd.pointer.clone().map(Ok);
        Ok(Current { pointer, mod_revision: etcd.revision, revision: etcd.revision })
    }

    async fn fetch(&self, pointer: &Pointer) -> Result<Allowlist, StoreError> {
        let etcd = self.etcd();
        let generation = pointer.generation;
        if etcd.down {
            return Err(unreachable());
        }
        if etcd.corrupt.contains(&generation) {
            return Err(CorruptGeneration::Digest { generation }.into());
        }
        Ok(etcd.lists[&generation].clone())
    }

    async fn watch(&self, _revision: i64) -> Result<FakeWatch, StoreError> {
        let mut etcd = self.etcd();
        if etcd.down {
            return Err(unreachable());
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        etcd.watch = Some(sender);
        Ok(FakeWatch(receiver))
    }

    fn parse_pointer(&self, value: &[u8]) -> Result<Pointer, StoreError> {
        Ok(serde_json::from_slice(value).expect("the tests write valid pointers"))
    }

    fn check_trust(&self, _: &Pointer) -> Result<(), Untrusted> {
        Ok(())
    }
}

/// Records what was put in force; fails the generations it is told to.
#[derive(Default)]
struct FakeEnforcer {
    enforced: SyncMutex<Vec<(u64, Allowlist)>>,
    failing: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("the maps refused generation {0} (test)")]
struct Refused(u64);

impl Enforcer for FakeEnforcer {
    type Error = Refused;

    async fn enforce(&self, list: Allowlist, pointer: &Pointer) -> Result<Diff, Refused> {
        if self.failing.contains(&pointer.generation) {
            return Err(Refused(pointer.generation));
        }
        let mut enforced = self.enforced.lock().unwrap();
        let previous = enforced.last().map(|(_, list)| list.clone()).unwrap_or_default();
        let diff = previous.diff(&list);
        enforced.push((pointer.generation, list));
        Ok(diff)
    }
}

impl FakeEnforcer {
    fn generations(&self) -> Vec<u64> {
        self.enforced.lock().unwrap().iter().map(|(generation, _)| *generation).collect()
    }
}

/// A follower of `source` with a resync every `resync`; stops when dropped.
struct Follower {
    health: Arc<Health>,
    enforcer: Arc<FakeEnforcer>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

fn start(source: &FakeSource, enforcer: FakeEnforcer, resync: Duration) -> Follower {
    let health = Arc::new(Health::new("edge", "host-a", 0, 0, &TrustedKeys::default()));
    let enforcer = Arc::new(enforcer);
    let task =
        tokio::spawn(follow(source.clone(), Arc::clone(&enforcer), Arc::clone(&health), resync));
    Follower { health, enforcer, _task: tokio_util::task::AbortOnDropHandle::new(task) }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Waits (in paused time: the runtime jumps ahead when idle) until `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn each_committed_generation_is_put_in_force_in_order() {
    let source = FakeSource::default();
    source.commit(1, "allow 192.0.2.0/24\n", false);
    let follower = start(&source, FakeEnforcer::default(), HOUR);
    assert!(follower.health.wait_for(1, Duration::from_secs(5)).await);
    until("the watch is open", || source.watching()).await;

    source.commit_and_announce(2, "allow 192.0.2.0/24\nallow 198.51.100.0/24\n");
    assert!(follower.health.wait_for(2, Duration::from_secs(5)).await);
    assert_eq!(follower.enforcer.generations(), [1, 2]);
    let status = follower.health.snapshot();
    assert!(status.connected);
    assert_eq!((status.applied_entries, status.current_generation), (2, Some(2)));
    assert_eq!(status.resyncs, 0, "a watched change is not a resync");
}

#[tokio::test(start_paused = true)]
async fn a_compacted_watch_reads_the_whole_state_again() {
    let source = FakeSource::default();
    source.commit(1, "allow 192.0.2.0/24\n", false);
    let follower = start(&source, FakeEnforcer::default(), HOUR);
    until("the watch is open", || source.watching()).await;

    // Generation 2 lands while the watch has fallen behind: only the
    // re-read after the compaction can find it.
    source.commit(2, "allow 203.0.113.0/24\n", false);
    source.deliver(Ok(Batch { compacted: true, ..Batch::default() }));
    assert!(follower.health.wait_for(2, Duration::from_secs(10)).await);
    let status = follower.health.snapshot();
    assert_eq!(status.watch_restarts.get("compacted"), Some(&1));
    assert_eq!(status.resyncs, 1, "found by a re-read");
}

#[tokio::test(start_paused = true)]
async fn a_watch_that_misses_a_change_is_caught_by_the_resync() {
    let source = FakeSource::default();
    source.commit(1, "allow 192.0.2.0/24\n", false);
    let follower = start(&source, FakeEnforcer::default(), Duration::from_secs(30));
    until("the watch is open", || source.watching()).await;
    let committed = Instant::now();
    source.commit(2, "allow 203.0.113.0/24\n", false);
    assert!(follower.health.wait_for(2, Duration::from_secs(60)).await);
    assert!(committed.elapsed() <= Duration::from_secs(31), "{:?}", committed.elapsed());
    assert_eq!(follower.health.snapshot().watch_restarts.len(), 0, "the watch stays");
}

#[tokio::test(start_paused = true)]
async fn etcd_down_keeps_the_list_and_backs_off_with_jitter_then_resets() {
    let source = FakeSource::default();
    source.commit(1, "allow 192.0.2.0/24\n", false);
    let follower = start(&source, FakeEnforcer::default(), HOUR);
    until("the watch is open", || source.watching()).await;

    source.etcd().down = true;
    source.deliver(Err(etcd_client::Error::WatchError("connection reset (test)".into())));
    until("eleven failed reads", || source.etcd().reads.len() >= 12).await;
    let status = follower.health.snapshot();
    assert!(!status.connected);
    assert_eq!(status.applied_generation, 1, "a failing etcd never clears the list");
    assert_eq!(follower.enforcer.generations(), [1]);
    assert!(status.watch_restarts["unreachable"] >= 9, "{:?}", status.watch_restarts);

    // Each pause is the backoff (doubling from 100 ms, at most 5 s) times a
    // jitter in [0.5, 1]. reads[1] followed the first pause (100 ms), so
    // the pauses measured start at the second.
    let reads = source.etcd().reads.clone();
    let mut backoff = MIN_BACKOFF * 2;
    for (after_stream_error, pair) in (0..).zip(reads[1..].windows(2)) {
        let pause = pair[1] - pair[0];
        let bounds = (backoff / 2, backoff);
        assert!(
            pause >= bounds.0 && pause <= bounds.1,
            "pause {after_stream_error}: {pause:?} is not within {bounds:?}"
        );
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    assert_eq!(backoff, MAX_BACKOFF, "the backoff reached its cap");

    // etcd returns: the follower reconnects, and a later gap starts from
    // the smallest backoff again.
    source.etcd().down = false;
    until("the watch is open again", || source.watching()).await;
    assert!(follower.health.snapshot().connected);
    let reads_before = source.etcd().reads.len();
    let canceled = Instant::now();
    source.deliver(Ok(Batch { canceled: Some("test".into()), ..Batch::default() }));
    until("the next read", || source.etcd().reads.len() > reads_before).await;
    let pause = source.etcd().reads[reads_before] - canceled;
    assert!(pause <= MIN_BACKOFF, "after a success the backoff starts over: {pause:?}");
    assert_eq!(follower.health.snapshot().watch_restarts.get("canceled"), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn generations_this_host_must_not_apply_are_refused_and_counted() {
    let source = FakeSource::default();
    source.commit(2, "allow 192.0.2.0/24\n", false);
    let enforcer = FakeEnforcer { failing: vec![5], ..FakeEnforcer::default() };
    let follower = start(&source, enforcer, HOUR);
    assert!(follower.health.wait_for(2, Duration::from_secs(5)).await);
    until("the watch is open", || source.watching()).await;

    // A replayed older pointer, an empty list nobody forced, a generation
    // whose chunks do not verify, one the maps refuse: none goes in force.
    source.commit_and_announce(1, "allow 203.0.113.0/24\n");
    source.commit_and_announce(3, "");
    source.etcd().corrupt.push(4);
    source.commit_and_announce(4, "allow 203.0.113.0/24\n");
    source.commit_and_announce(5, "allow 203.0.113.0/24\n");
    // Every refusal is an apply error too; the maps' failure is only that.
    until("four failures", || follower.health.snapshot().apply_errors >= 4).await;
    let status = follower.health.snapshot();
    let refusals: Vec<(&str, u64)> =
        status.refusals.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(refusals, [("corrupt", 1), ("empty", 1), ("rollback", 1)]);
    assert!(status.last_error.as_deref().unwrap().contains("generation 5"), "{status:?}");
    assert_eq!(status.applied_generation, 2);
    assert_eq!(follower.enforcer.generations(), [2]);

    // A good generation after them is applied: the refusals stop nothing.
    let list = "allow 198.51.100.0/24\n";
    source.commit_and_announce(6, list);
    assert!(follower.health.wait_for(6, Duration::from_secs(5)).await);
    let status = follower.health.snapshot();
    assert_eq!((status.last_error, status.last_refusal), (None, None));

    // An empty list its writer forced is a list like any other.
    let pointer = source.commit(7, "", true);
    let latest = Some(serde_json::to_vec(&pointer).unwrap());
    source.deliver(Ok(Batch { latest, ..Batch::default() }));
    assert!(follower.health.wait_for(7, Duration::from_secs(5)).await);
    assert_eq!(follower.enforcer.generations(), [2, 6, 7]);
}
