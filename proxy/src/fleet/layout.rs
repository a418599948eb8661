//! How a group's list is laid out in etcd, independent of any connection.
//!
//! ```text
//! {prefix}/{group}/list/current                  the pointer: generation, chunks, count, hash
//! {prefix}/{group}/list/gen/{generation}-{nonce}/{index}   immutable chunks of one list
//! {prefix}/{group}/hosts/{host}                  what a host enforces (no lease: outlives it)
//! {prefix}/{group}/alive/{host}                  on the host's lease: present while it runs
//! ```
//!
//! A list of 100k entries is several MiB, beyond etcd's 1.5 MiB request
//! limit, so it is written as chunks of at most [`CHUNK_BYTES`] under a key
//! no one else writes, and published by swapping the small pointer with a
//! compare-and-swap. Readers fetch the chunks the pointer names and verify
//! them whole (count and SHA-256) before applying anything. Daemons watch
//! only the pointer: chunk and host writes never wake them.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::allowlist::{Allowlist, ParseError};

/// Largest chunk value: well under etcd's default 1.5 MiB request limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The keys of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(prefix: &str, group: &str) -> Self {
        Self { root: format!("{}/{group}", prefix.trim_end_matches('/')) }
    }

    /// The pointer to the generation in force.
    pub fn current(&self) -> String {
        format!("{}/list/current", self.root)
    }

    /// Where every generation's chunks live.
    pub fn generations(&self) -> String {
        format!("{}/list/gen/", self.root)
    }

    /// The chunk directory of one write attempt: zero-padded, so that keys
    /// sort by generation and older ones are one key range.
    pub fn generation_dir(&self, generation: u64, nonce: u64) -> String {
        format!("{}{generation:020}-{nonce:016x}/", self.generations())
    }

    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.root)
    }

    pub fn host(&self, host: &str) -> String {
        format!("{}{host}", self.hosts())
    }

    pub fn alive_hosts(&self) -> String {
        format!("{}/alive/", self.root)
    }

    pub fn alive(&self, host: &str) -> String {
        format!("{}{host}", self.alive_hosts())
    }
}

/// The value of `list/current`: which chunks make up the list in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// Counts up by one per committed change.
    pub generation: u64,
    /// The chunks' key directory ([`Keys::generation_dir`]).
    pub dir: String,
    pub chunks: usize,
    pub entries: usize,
    /// SHA-256 of the chunks' concatenation, hex.
    pub sha256: String,
    /// When it was committed (the writer's clock, Unix milliseconds).
    pub committed_at_ms: u64,
    pub committed_by: String,
    /// An empty list is applied only when its writer said so (`--force`).
    #[serde(default)]
    pub empty_forced: bool,
}

impl Pointer {
    /// The key of chunk `index`.
    pub fn chunk_key(&self, index: usize) -> String {
        format!("{}{index:06}", self.dir)
    }
}

/// A list cut into chunks at line boundaries, with what its pointer records.
pub struct Encoded {
    pub chunks: Vec<String>,
    pub sha256: String,
    pub entries: usize,
}

/// Cuts `list`'s text format into chunks of at most [`CHUNK_BYTES`].
pub fn encode(list: &Allowlist) -> Encoded {
    encode_with(list, CHUNK_BYTES)
}

fn encode_with(list: &Allowlist, chunk_bytes: usize) -> Encoded {
    let text = list.render();
    let mut chunks = Vec::new();
    let mut chunk = String::new();
    // A line is at most a CIDR and a comment: far below any chunk size.
    for line in text.split_inclusive('\n') {
        if !chunk.is_empty() && chunk.len() + line.len() > chunk_bytes {
            chunks.push(std::mem::take(&mut chunk));
        }
        chunk.push_str(line);
    }
    chunks.push(chunk);
    Encoded { sha256: digest(chunks.iter().map(String::as_bytes)), chunks, entries: list.len() }
}

/// Why fetched chunks are not the list their pointer describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptGeneration {
    #[error("generation {generation}: {found} of its {expected} chunks are in etcd")]
    Chunks { generation: u64, expected: usize, found: usize },
    #[error("generation {generation}: its chunks do not match its SHA-256")]
    Digest { generation: u64 },
    #[error("generation {generation}: {source}")]
    Parse {
        generation: u64,
        #[source]
        source: ParseError,
    },
    #[error("generation {generation}: {found} entries where the pointer says {expected}")]
    Entries { generation: u64, expected: usize, found: usize },
}

/// The list `chunks` make up, verified whole against `pointer`.
pub fn decode(pointer: &Pointer, chunks: &[Vec<u8>]) -> Result<Allowlist, CorruptGeneration> {
    let generation = pointer.generation;
    if chunks.len() != pointer.chunks {
        return Err(CorruptGeneration::Chunks {
            generation,
            expected: pointer.chunks,
            found: chunks.len(),
        });
    }
    if digest(chunks.iter().map(Vec::as_slice)) != pointer.sha256 {
        return Err(CorruptGeneration::Digest { generation });
    }
    let text: String = chunks.iter().map(|c| String::from_utf8_lossy(c)).collect();
    let list = Allowlist::parse(&text)
        .map_err(|source| CorruptGeneration::Parse { generation, source })?;
    if list.len() != pointer.entries {
        return Err(CorruptGeneration::Entries {
            generation,
            expected: pointer.entries,
            found: list.len(),
        });
    }
    Ok(list)
}

fn digest<'a>(parts: impl Iterator<Item = &'a [u8]>) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of `hosts/{host}`: what one host enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host: String,
    /// The generation in force there (0: none from the group yet).
    pub generation: u64,
    /// When it was put in force (that host's clock, Unix milliseconds).
    pub applied_at_ms: u64,
    pub entries: usize,
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(n: u32) -> Allowlist {
        let text: String = (0..n)
            .map(|i| format!("10.{}.{}.0/24 # partner {i}\n", i >> 8 & 0xff, i & 0xff))
            .collect();
        Allowlist::parse(&text).expect("valid")
    }

    fn pointer(encoded: &Encoded) -> Pointer {
        Pointer {
            generation: 7,
            dir: Keys::new("/edgegate", "g").generation_dir(7, 1),
            chunks: encoded.chunks.len(),
            entries: encoded.entries,
            sha256: encoded.sha256.clone(),
            committed_at_ms: 0,
            committed_by: "a".into(),
            empty_forced: false,
        }
    }

    fn bytes(encoded: &Encoded) -> Vec<Vec<u8>> {
        encoded.chunks.iter().map(|c| c.clone().into_bytes()).collect()
    }

    #[test]
    fn chunks_respect_the_size_and_round_trip() {
        let original = list(5000);
        let encoded = encode_with(&original, 4096);
        assert!(encoded.chunks.len() > 30, "{} chunks", encoded.chunks.len());
        assert!(encoded.chunks.iter().all(|c| c.len() <= 4096 && c.ends_with('\n')));
        assert_eq!(decode(&pointer(&encoded), &bytes(&encoded)), Ok(original));
    }

    #[test]
    fn a_100k_list_fits_etcd_requests() {
        let encoded = encode(&list(65_536));
        assert!(encoded.chunks.iter().all(|c| c.len() <= CHUNK_BYTES));
        assert!(encoded.chunks.len() >= 2);
    }

    #[test]
    fn an_empty_list_is_one_chunk() {
        let encoded = encode(&Allowlist::default());
        assert_eq!(encoded.chunks.len(), 1);
        assert_eq!(decode(&pointer(&encoded), &bytes(&encoded)), Ok(Allowlist::default()));
    }

    /// Every way the fetched chunks can differ from what the pointer says.
    #[test]
    fn corrupt_generations_are_refused() {
        let encoded = encode_with(&list(300), 2048);
        let good = pointer(&encoded);
        let chunks = bytes(&encoded);

        let missing = &chunks[..chunks.len() - 1];
        assert!(matches!(decode(&good, missing), Err(CorruptGeneration::Chunks { .. })));

        let mut flipped = chunks.clone();
        flipped[1][3] ^= 1;
        assert_eq!(decode(&good, &flipped), Err(CorruptGeneration::Digest { generation: 7 }));

        let mut swapped = chunks.clone();
        swapped.swap(0, 1);
        assert_eq!(decode(&good, &swapped), Err(CorruptGeneration::Digest { generation: 7 }));

        let wrong_count = Pointer { entries: 299, ..good.clone() };
        assert!(matches!(decode(&wrong_count, &chunks), Err(CorruptGeneration::Entries { .. })));

        let garbage = vec![b"not a cidr\n".to_vec()];
        let garbage_pointer =
            Pointer { chunks: 1, sha256: digest(garbage.iter().map(Vec::as_slice)), ..good };
        assert!(matches!(decode(&garbage_pointer, &garbage), Err(CorruptGeneration::Parse { .. })));
    }

    #[test]
    fn generation_dirs_sort_by_generation() {
        let keys = Keys::new("/edgegate/", "partner-gate");
        assert_eq!(keys.current(), "/edgegate/partner-gate/list/current");
        let (a, b) = (keys.generation_dir(9, u64::MAX), keys.generation_dir(10, 0));
        assert!(a < b && a.starts_with(&keys.generations()));
        assert!(keys.host("h1").starts_with(&keys.hosts()));
    }
}
