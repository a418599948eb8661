//! Learned partner sources: clients that proved who they are with a
//! certificate from an address the allowlist does not allow (audit mode lets
//! them that far), and the allow entries `edgegate allow suggest` makes of
//! them, grouped per certificate name into the narrowest CIDRs.
//!
//! The gate keeps them bounded ([`CAPACITY`], the least recently seen go
//! first) in the state directory, so that a restart loses nothing. They come
//! from the proxy worker, which parses everything from the internet: a
//! compromised worker can report what it likes. So the gate takes a sighting
//! only as evidence that other evidence backs ([`SightingRefusal`]), and
//! they stay suggestions: the list changes when an operator applies the set
//! they reviewed, named by its [`digest`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    net::IpAddr,
    path::PathBuf,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    allowlist::{Action, Allowlist, Entry, StoreError},
    files::{self, IoError},
    privsep::protocol::Sighting,
    tls::ClientName,
};

/// At most this many (address, name) pairs are kept.
pub const CAPACITY: usize = 4096;
/// The file in the state directory.
pub const FILE_NAME: &str = "learned-sources.json";
/// How the comment of an applied suggestion starts.
pub const COMMENT_TAG: &str = "learned from mTLS:";

/// A group of addresses no wider than this is suggested as one CIDR: a
/// partner's egress pool sits in one network, and a wider entry would let
/// in neighbours nobody has seen.
const WIDEST_V4: u8 = 24;
const WIDEST_V6: u8 = 64;

/// One (address, name) pair as kept, and as the file holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedSource {
    pub address: IpAddr,
    pub name: ClientName,
    pub listeners: BTreeSet<String>,
    pub connections: u64,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnedFile {
    sources: Vec<LearnedSource>,
}

/// An allow entry `allow suggest` proposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suggestion {
    pub cidr: IpNet,
    /// Every certificate name seen from inside `cidr`.
    pub names: Vec<ClientName>,
    /// The unallowed addresses it covers.
    pub addresses: Vec<IpAddr>,
    pub listeners: BTreeSet<String>,
    pub connections: u64,
    pub first_seen: u64,
    pub last_seen: u64,
}

impl Suggestion {
    /// The allow entry, its comment naming the identities.
    pub fn entry(&self) -> Entry {
        let names: Vec<String> = self.names.iter().map(ToString::to_string).collect();
        let comment = format!("{COMMENT_TAG} {}", names.join("; "));
        Entry { cidr: self.cidr, action: Action::Allow, comment: Some(comment) }
    }
}

/// Why the gate did not take a sighting the worker reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SightingRefusal {
    /// Not in audit mode: an unlisted client never gets to authenticate
    /// then, so the worker has nothing true to report.
    NotAuditing,
    /// The listener's identity rules do not allow the name (or there is
    /// no such listener): not a partner.
    IdentityNotAllowed,
    /// The XDP filter's drop sample never saw the address: nothing but the
    /// worker's word says a client came from there.
    NotSampled,
}

impl SightingRefusal {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::NotAuditing => "reported outside audit mode",
            Self::IdentityNotAllowed => "for an identity no listener rule allows",
            Self::NotSampled => "from an address the filter's drop sample never saw",
        }
    }
}

/// A short digest of `suggestions` as `allow suggest` shows them: what
/// `--apply` must name, so that it applies what was reviewed.
pub fn digest(suggestions: &[Suggestion]) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for suggestion in suggestions {
        let entry = suggestion.entry();
        hasher.update(format!("{} {}\n", entry.cidr, entry.comment.unwrap_or_default()));
    }
    hasher.finalize()[..8].iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Why the file of learned sources cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{} is not a file of learned sources: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The learned sources and where they are kept.
#[derive(Debug)]
pub struct LearnedSources {
    path: PathBuf,
    sources: HashMap<(IpAddr, ClientName), LearnedSource>,
    /// Whether there is anything the file does not hold yet.
    unsaved: bool,
}

impl LearnedSources {
    /// What `path` holds; nothing if it does not exist.
    pub fn load(path: PathBuf) -> Result<Self, LoadError> {
        let mut learned = Self::empty(path);
        let text = match fs::read_to_string(&learned.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(learned),
            Err(source) => return Err(IoError::new("read", learned.path, source).into()),
        };
        let file: LearnedFile = serde_json::from_str(&text)
            .map_err(|source| LoadError::Parse { path: learned.path.clone(), source })?;
        for mut source in file.sources {
            source.address = source.address.to_canonical();
            learned.sources.insert((source.address, source.name.clone()), source);
        }
        learned.evict();
        Ok(learned)
    }

    /// Empty, kept at `path` (after a file that could not be read).
    pub fn empty(path: PathBuf) -> Self {
        Self { path, sources: HashMap::new(), unsaved: false }
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Merges what the worker reported.
    pub fn record(&mut self, sightings: Vec<Sighting>) {
        for sighting in sightings {
            self.unsaved = true;
            // IPv4 clients of a dual-stack socket as IPv4, as the list knows them.
            let key = (sighting.address.to_canonical(), sighting.name);
            match self.sources.get_mut(&key) {
                Some(source) => {
                    source.listeners.insert(sighting.listener);
                    source.connections = source.connections.saturating_add(sighting.connections);
                    source.first_seen = source.first_seen.min(sighting.first_seen);
                    source.last_seen = source.last_seen.max(sighting.last_seen);
                }
                None => {
                    let source = LearnedSource {
                        address: key.0,
                        name: key.1.clone(),
                        listeners: BTreeSet::from([sighting.listener]),
                        connections: sighting.connections,
                        first_seen: sighting.first_seen,
                        last_seen: sighting.last_seen,
                    };
                    self.sources.insert(key, source);
                }
            }
        }
        self.evict();
    }

    /// Writes the file if anything changed since the last write.
    pub fn save(&mut self) -> Result<(), StoreError> {
        if !self.unsaved {
            return Ok(());
        }
        let mut sources: Vec<LearnedSource> = self.sources.values().cloned().collect();
        sources.sort_by(|a, b| (a.address, &a.name).cmp(&(b.address, &b.name)));
        let text = serde_json::to_string_pretty(&LearnedFile { sources })
            .expect("learned sources always serialize");
        files::replace(&self.path, text.as_bytes())?;
        self.unsaved = false;
        Ok(())
    }

    /// The allow entries that would let in every learned source `list`
    /// leaves unlisted, most used first. A source the list denies is left
    /// out: a deny is an operator's decision, and stays one.
    pub fn suggest(&self, list: &Allowlist) -> Vec<Suggestion> {
        let mut per_name: BTreeMap<&ClientName, Vec<&LearnedSource>> = BTreeMap::new();
        for source in self.sources.values() {
            if list.verdict(source.address).is_none() {
                per_name.entry(&source.name).or_default().push(source);
            }
        }
        let mut per_cidr: BTreeMap<IpNet, Suggestion> = BTreeMap::new();
        for (name, sources) in per_name {
            let mut networks: BTreeMap<IpNet, Vec<&LearnedSource>> = BTreeMap::new();
            for source in sources {
                networks.entry(widest(source.address)).or_default().push(source);
            }
            for sources in networks.into_values() {
                let addresses: Vec<IpAddr> = sources.iter().map(|s| s.address).collect();
                let suggestion =
                    per_cidr.entry(covering(&addresses)).or_insert_with_key(|&cidr| Suggestion {
                        cidr,
                        names: Vec::new(),
                        addresses: Vec::new(),
                        listeners: BTreeSet::new(),
                        connections: 0,
                        first_seen: u64::MAX,
                        last_seen: 0,
                    });
                suggestion.names.push(name.clone());
                for source in sources {
                    suggestion.addresses.push(source.address);
                    suggestion.listeners.extend(source.listeners.iter().cloned());
                    suggestion.connections =
                        suggestion.connections.saturating_add(source.connections);
                    suggestion.first_seen = suggestion.first_seen.min(source.first_seen);
                    suggestion.last_seen = suggestion.last_seen.max(source.last_seen);
                }
            }
        }
        let mut suggestions: Vec<Suggestion> = per_cidr.into_values().collect();
        for suggestion in &mut suggestions {
            suggestion.addresses.sort();
            suggestion.addresses.dedup();
        }
        suggestions.sort_by(|a, b| b.connections.cmp(&a.connections).then(a.cidr.cmp(&b.cidr)));
        suggestions
    }

    /// Keeps the [`CAPACITY`] most recently seen.
    fn evict(&mut self) {
        if self.sources.len() <= CAPACITY {
            return;
        }
        let mut by_age: Vec<(u64, (IpAddr, ClientName))> =
            self.sources.iter().map(|(key, s)| (s.last_seen, key.clone())).collect();
        by_age.sort_unstable();
        for (_, key) in &by_age[..self.sources.len() - CAPACITY] {
            self.sources.remove(key);
        }
        self.unsaved = true;
    }
}

/// The widest network one suggestion may cover around `address`.
fn widest(address: IpAddr) -> IpNet {
    let len = if address.is_ipv4() { WIDEST_V4 } else { WIDEST_V6 };
    IpNet::new(address, len).expect("a valid prefix length").trunc()
}

/// The narrowest CIDR covering `addresses` (all inside one [`widest`] network).
fn covering(addresses: &[IpAddr]) -> IpNet {
    let as_bits = |address: &IpAddr| match address {
        IpAddr::V4(v4) => u128::from(u32::from(*v4)),
        IpAddr::V6(v6) => u128::from(*v6),
    };
    let first = addresses[0];
    let differing = addresses.iter().fold(0u128, |acc, a| acc | (as_bits(a) ^ as_bits(&first)));
    let width = if first.is_ipv4() { 32 } else { 128 };
    let varying = 128 - differing.leading_zeros() as u8;
    IpNet::new(first, width - varying).expect("a valid prefix length").trunc()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(cn: &str) -> ClientName {
        ClientName { common_name: Some(cn.into()), ..ClientName::default() }
    }

    fn seen(address: &str, cn: &str, connections: u64, last_seen: u64) -> Sighting {
        Sighting {
            listener: "edge".into(),
            address: address.parse().unwrap(),
            name: name(cn),
            connections,
            first_seen: last_seen.saturating_sub(10),
            last_seen,
        }
    }

    fn learned(sightings: Vec<Sighting>) -> LearnedSources {
        let mut learned = LearnedSources::empty(PathBuf::from("/nonexistent"));
        learned.record(sightings);
        learned
    }

    fn cidrs(suggestions: &[Suggestion]) -> Vec<String> {
        suggestions.iter().map(|s| s.cidr.to_string()).collect()
    }

    #[test]
    fn the_narrowest_cidr_covers_each_network_of_a_name() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("one address", &["198.51.100.7"], &["198.51.100.7/32"]),
            ("two neighbours", &["198.51.100.6", "198.51.100.7"], &["198.51.100.6/31"]),
            ("spread in a /24", &["198.51.100.1", "198.51.100.200"], &["198.51.100.0/24"]),
            (
                "two networks stay two entries",
                &["198.51.100.7", "203.0.113.9"],
                &["198.51.100.7/32", "203.0.113.9/32"],
            ),
            ("IPv6 in a /64", &["2001:db8::1", "2001:db8::3"], &["2001:db8::/126"]),
            (
                "IPv6 in two /64s",
                &["2001:db8::1", "2001:db8:0:1::1"],
                &["2001:db8:0:1::1/128", "2001:db8::1/128"],
            ),
            ("IPv4-mapped is IPv4", &["::ffff:198.51.100.7"], &["198.51.100.7/32"]),
        ];
        for (case, addresses, expected) in cases {
            let suggestions =
                learned(addresses.iter().map(|a| seen(a, "partner", 1, 100)).collect())
                    .suggest(&Allowlist::default());
            let mut got = cidrs(&suggestions);
            got.sort();
            assert_eq!(got, *expected, "{case}");
        }
    }

    #[test]
    fn what_the_list_decides_is_not_suggested() {
        let list = Allowlist::parse("198.51.100.0/25\ndeny 203.0.113.9\n").unwrap();
        let suggestions = learned(vec![
            seen("198.51.100.7", "partner", 1, 100),
            seen("198.51.100.200", "partner", 1, 100),
            seen("203.0.113.9", "partner", 1, 100),
        ])
        .suggest(&list);
        assert_eq!(cidrs(&suggestions), ["198.51.100.200/32"]);
    }

    #[test]
    fn names_sharing_a_cidr_share_its_entry_and_its_comment() {
        let suggestions = learned(vec![
            seen("198.51.100.7", "partner-a", 2, 100),
            seen("198.51.100.7", "partner-b", 1, 100),
            seen("203.0.113.9", "partner-b", 9, 100),
        ])
        .suggest(&Allowlist::default());
        assert_eq!(cidrs(&suggestions), ["203.0.113.9/32", "198.51.100.7/32"], "busiest first");
        assert_eq!(suggestions[1].names, [name("partner-a"), name("partner-b")]);
        assert_eq!(suggestions[1].connections, 3);
        assert_eq!(
            suggestions[1].entry().comment.as_deref(),
            Some("learned from mTLS: CN=partner-a; CN=partner-b")
        );
    }

    #[test]
    fn a_hostile_name_makes_a_one_line_comment() {
        let mut sighting = seen("198.51.100.7", "x\n0.0.0.0/0", 1, 100);
        sighting.name.dns = vec!["a.example\r".into()];
        let entry = learned(vec![sighting]).suggest(&Allowlist::default())[0].entry();
        let text = Allowlist::from_entries([entry]).render();
        assert_eq!(Allowlist::parse(&text).unwrap().len(), 1, "{text}");
        assert!(text.contains("CN=x?0.0.0.0/0, DNS=a.example?"), "{text}");
    }

    #[test]
    fn the_digest_names_the_set_not_its_counts() {
        let list = Allowlist::default();
        let one = learned(vec![seen("198.51.100.7", "a", 1, 100)]).suggest(&list);
        let busier = learned(vec![seen("198.51.100.7", "a", 9, 200)]).suggest(&list);
        let more =
            learned(vec![seen("198.51.100.7", "a", 1, 100), seen("203.0.113.9", "b", 1, 100)])
                .suggest(&list);
        let renamed = learned(vec![seen("198.51.100.7", "c", 1, 100)]).suggest(&list);
        assert_eq!(digest(&one), digest(&busier), "more connections, the same entries");
        assert_ne!(digest(&one), digest(&more), "another source");
        assert_ne!(digest(&one), digest(&renamed), "another identity in the comment");
        assert_eq!(digest(&one).len(), 16);
    }

    #[test]
    fn repeated_sightings_add_up() {
        let mut sources = learned(vec![seen("198.51.100.7", "partner", 2, 100)]);
        sources.record(vec![seen("198.51.100.7", "partner", 3, 200)]);
        sources.record(vec![seen("::ffff:198.51.100.7", "partner", 1, 50)]);
        let suggestion = &sources.suggest(&Allowlist::default())[0];
        assert_eq!(sources.len(), 1);
        assert_eq!(
            (suggestion.connections, suggestion.first_seen, suggestion.last_seen),
            (6, 40, 200)
        );
    }

    #[test]
    fn beyond_capacity_the_least_recently_seen_go() {
        let sightings = (0..CAPACITY as u32 + 5)
            .map(|i| {
                let address = IpAddr::V4((0x0a00_0000 + i).into());
                seen(&address.to_string(), "partner", 1, u64::from(i) + 1000)
            })
            .collect();
        let sources = learned(sightings);
        assert_eq!(sources.len(), CAPACITY);
        let oldest = sources.sources.values().map(|s| s.last_seen).min();
        assert_eq!(oldest, Some(1005));
    }

    #[test]
    fn the_file_survives_a_restart_and_a_bad_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("edgegate-learned-{}", std::process::id()));
        let path = dir.join(FILE_NAME);
        let mut sources = LearnedSources::load(path.clone()).expect("no file yet");
        assert!(sources.is_empty());
        sources.record(vec![seen("198.51.100.7", "partner", 2, 100)]);
        sources.save().expect("saved");
        let reloaded = LearnedSources::load(path.clone()).expect("loads");
        assert_eq!(reloaded.suggest(&Allowlist::default()), sources.suggest(&Allowlist::default()));
        fs::write(&path, "{not json").unwrap();
        assert!(matches!(LearnedSources::load(path), Err(LoadError::Parse { .. })));
        fs::remove_dir_all(dir).unwrap();
    }
}
