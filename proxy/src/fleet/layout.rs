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
//!
//! Everything read from etcd is hostile until checked: a pointer is parsed
//! from a bounded value and validated ([`Pointer::parse`]) before any field
//! is used, against [`Limits`] derived from this host's map capacity.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::trust::Signature;
use crate::allowlist::{Allowlist, ParseError};

/// Largest chunk value: well under etcd's default 1.5 MiB request limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Largest pointer value read: a real one is about 600 bytes.
pub const MAX_POINTER_BYTES: usize = 4096;

/// Text budget per entry: a CIDR, its action and a comment of a few hundred bytes.
const BYTES_PER_ENTRY: usize = 512;
/// The list file's header comment.
const HEADER_BYTES: usize = 4096;
/// `committed_by` is logged and shown: a short, printable name.
const MAX_COMMITTER_BYTES: usize = 128;

/// What a host accepts from etcd, derived from its maps' capacity: a list
/// larger than these could not be enforced anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries of both families.
    pub max_entries: usize,
    /// Bytes of all chunks together.
    pub max_bytes: usize,
    pub max_chunks: usize,
}

impl Limits {
    /// For maps of `capacity` entries per family (`filter.max_entries`).
    pub fn for_capacity(capacity: u32) -> Self {
        let max_entries = 2 * capacity as usize;
        let max_bytes = HEADER_BYTES + max_entries * BYTES_PER_ENTRY;
        // Chunks are cut at line boundaries so that two neighbours together
        // exceed CHUNK_BYTES: at most two chunks per CHUNK_BYTES, plus one.
        Self { max_entries, max_bytes, max_chunks: 2 * max_bytes.div_ceil(CHUNK_BYTES) + 1 }
    }
}

/// The keys of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    group: String,
    root: String,
}

impl Keys {
    pub fn new(prefix: &str, group: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            root: format!("{prefix}/{group}"),
            prefix: prefix.to_owned(),
            group: group.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn group(&self) -> &str {
        &self.group
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

    /// Where the chunks of `generation` start: every key of an older
    /// generation sorts below this, and above [`Self::generations`].
    pub fn generations_from(&self, generation: u64) -> String {
        format!("{}{generation:020}-", self.generations())
    }

    /// Whether `dir` is a chunk directory of `generation` in this group,
    /// exactly as [`Self::generation_dir`] writes one.
    fn is_generation_dir(&self, dir: &str, generation: u64) -> bool {
        dir.strip_prefix(&self.generations_from(generation))
            .and_then(|rest| rest.strip_suffix('/'))
            .is_some_and(|nonce| {
                nonce.len() == 16 && nonce.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
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
    /// Counts up per committed change; hosts never go back to a lower one.
    pub generation: u64,
    /// The generation this one was computed from (0: none).
    #[serde(default)]
    pub previous: u64,
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
    /// Required by hosts with `trusted_keys` ([`super::trust`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

/// Why a value in `list/current` is not a pointer this host may act on.
#[derive(Debug, thiserror::Error)]
pub enum InvalidPointer {
    #[error("the pointer is {bytes} bytes, more than the {MAX_POINTER_BYTES} a pointer may have")]
    TooLarge { bytes: usize },
    #[error("the pointer is not an edgegate pointer: {0}")]
    Syntax(#[from] serde_json::Error),
    #[error("the pointer names generation 0, which no commit writes")]
    ZeroGeneration,
    #[error("generation {generation}: its chunk directory {dir:?} is not one of this group's")]
    Dir { generation: u64, dir: String },
    #[error("generation {generation}: {chunks} chunks, where this host accepts 1 to {max}")]
    Chunks { generation: u64, chunks: usize, max: usize },
    #[error(
        "generation {generation}: {entries} entries, more than the {max} this host's maps hold"
    )]
    Entries { generation: u64, entries: usize, max: usize },
    #[error("generation {generation}: its SHA-256 is not 64 hex digits")]
    Digest { generation: u64 },
    #[error("generation {generation}: `committed_by` is not a short printable name")]
    Committer { generation: u64 },
    #[error("generation {generation}: an empty list with {entries} entries")]
    Empty { generation: u64, entries: usize },
}

impl InvalidPointer {
    /// The label of `edgegate_fleet_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } | Self::Syntax(_) => "malformed",
            _ => "out_of_bounds",
        }
    }
}

impl Pointer {
    /// Parses and validates `value`, bounded before anything is allocated
    /// from it, so that a hostile writer of etcd can make a host refuse a
    /// generation but never make it allocate, loop or delete from a number
    /// or a key it chose.
    pub fn parse(value: &[u8], keys: &Keys, limits: &Limits) -> Result<Self, InvalidPointer> {
        if value.len() > MAX_POINTER_BYTES {
            return Err(InvalidPointer::TooLarge { bytes: value.len() });
        }
        let pointer: Self = serde_json::from_slice(value)?;
        pointer.validate(keys, limits)?;
        Ok(pointer)
    }

    fn validate(&self, keys: &Keys, limits: &Limits) -> Result<(), InvalidPointer> {
        let generation = self.generation;
        if generation == 0 {
            return Err(InvalidPointer::ZeroGeneration);
        }
        if !keys.is_generation_dir(&self.dir, generation) {
            let dir = self.dir.chars().take(120).collect();
            return Err(InvalidPointer::Dir { generation, dir });
        }
        if !(1..=limits.max_chunks).contains(&self.chunks) {
            let max = limits.max_chunks;
            return Err(InvalidPointer::Chunks { generation, chunks: self.chunks, max });
        }
        if self.entries > limits.max_entries {
            let max = limits.max_entries;
            return Err(InvalidPointer::Entries { generation, entries: self.entries, max });
        }
        if self.empty_forced && self.entries != 0 {
            return Err(InvalidPointer::Empty { generation, entries: self.entries });
        }
        if self.sha256.len() != 64
            || !self.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(InvalidPointer::Digest { generation });
        }
        if !valid_committer(&self.committed_by) {
            return Err(InvalidPointer::Committer { generation });
        }
        Ok(())
    }

    /// The key of chunk `index`.
    pub fn chunk_key(&self, index: usize) -> String {
        format!("{}{index:06}", self.dir)
    }
}

/// Whether `name` may stand in `committed_by`: it is logged, shown and signed
/// one per line.
pub fn valid_committer(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_COMMITTER_BYTES && name.chars().all(committer_char)
}

/// `name` reduced to what [`valid_committer`] accepts (possibly empty).
pub fn committer_from(name: &str) -> String {
    name.chars().filter(|c| committer_char(*c)).take(MAX_COMMITTER_BYTES).collect()
}

fn committer_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.@:".contains(c)
}

/// A list cut into chunks at line boundaries, with what its pointer records.
pub struct Encoded {
    pub chunks: Vec<String>,
    pub sha256: String,
    pub entries: usize,
}

impl Encoded {
    /// Bytes of all chunks together.
    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(String::len).sum()
    }
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
    #[error("generation {generation}: its chunks hold more than the {max} bytes this host accepts")]
    TooLarge { generation: u64, max: usize },
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
            previous: 6,
            dir: Keys::new("/edgegate", "g").generation_dir(7, 1),
            chunks: encoded.chunks.len(),
            entries: encoded.entries,
            sha256: encoded.sha256.clone(),
            committed_at_ms: 0,
            committed_by: "a".into(),
            empty_forced: false,
            signature: None,
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

    fn parse(value: &serde_json::Value) -> Result<Pointer, InvalidPointer> {
        let keys = Keys::new("/edgegate", "g");
        Pointer::parse(value.to_string().as_bytes(), &keys, &Limits::for_capacity(1000))
    }

    /// Every hostile pointer the audit wrote, and more: each refused before
    /// any field is used.
    #[test]
    fn hostile_pointers_are_refused_before_use() {
        let good = serde_json::to_value(pointer(&encode(&list(3)))).expect("JSON");
        assert!(parse(&good).is_ok());
        let with = |field: &str, value: serde_json::Value| {
            let mut pointer = good.clone();
            pointer[field] = value;
            parse(&pointer)
        };
        let dir_of = |generation: u64| Keys::new("/edgegate", "g").generation_dir(generation, 1);
        let cases: Vec<(&str, Result<Pointer, InvalidPointer>)> = vec![
            ("2^40 chunks", with("chunks", (1u64 << 40).into())),
            ("2^64-1 chunks", with("chunks", u64::MAX.into())),
            ("0 chunks", with("chunks", 0.into())),
            ("huge entries", with("entries", u64::MAX.into())),
            ("entries over capacity", with("entries", 2001.into())),
            ("NUL dir", with("dir", "\u{0}".into())),
            ("other app's dir", with("dir", "/zzz-other-app/".into())),
            ("group root", with("dir", "/edgegate/g/".into())),
            ("other group", with("dir", dir_of(7).replace("/g/", "/h/").into())),
            ("other generation's dir", with("dir", dir_of(6).into())),
            ("dir with a suffix", with("dir", format!("{}x/", dir_of(7)).into())),
            ("upper-case nonce", with("dir", dir_of(7).to_uppercase().into())),
            ("generation 0", with("generation", 0.into())),
            ("short digest", with("sha256", "ab".into())),
            ("non-hex digest", with("sha256", "zz".repeat(32).into())),
            ("committer with a line break", with("committed_by", "a\nprevious 9".into())),
            ("long committer", with("committed_by", "a".repeat(200).into())),
            ("forced empty with entries", with("empty_forced", true.into())),
            ("negative chunks", with("chunks", (-1).into())),
            (
                "2^64 chunks",
                with("chunks", serde_json::from_str("18446744073709551616").expect("n")),
            ),
        ];
        for (name, result) in cases {
            assert!(result.is_err(), "{name}: accepted");
        }
        for garbage in [&b"not json"[..], b"{}", b"[]", b"null", &[b' '; MAX_POINTER_BYTES + 1]] {
            let keys = Keys::new("/edgegate", "g");
            assert!(Pointer::parse(garbage, &keys, &Limits::for_capacity(1)).is_err());
        }
    }

    #[test]
    fn limits_admit_a_full_list() {
        let limits = Limits::for_capacity(5000);
        let encoded = encode_with(&list(5000), 4096);
        assert!(encoded.entries <= limits.max_entries && encoded.bytes() <= limits.max_bytes);
        let full = encode(&list(10_000));
        assert!(full.chunks.len() <= limits.max_chunks);
        let keys = Keys::new("/edgegate", "g");
        assert!(keys.generations_from(10) > keys.generation_dir(9, u64::MAX));
        assert!(keys.generations_from(10) < keys.generation_dir(10, 0));
    }
}
