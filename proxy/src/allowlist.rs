//! The allowlist: its model, its text format, the changes the CLI makes to it,
//! and its atomic persistence.
//!
//! Defined behaviour for the inputs people get wrong:
//! - a bare address means a host route (`/32`, `/128`);
//! - a CIDR with host bits set (`203.0.113.7/24`) is refused, naming the network
//!   it probably meant: silently widening or narrowing a security rule is worse;
//! - IPv4-mapped IPv6 (`::ffff:203.0.113.7`) is refused: such packets arrive as
//!   IPv4 on the wire, so the entry would never match; the message names the IPv4 form;
//! - the same CIDR twice with the same action collapses into one entry; with
//!   both actions it is a conflict (a file) or must be removed first (the CLI);
//! - overlapping entries are fine: the longest matching prefix decides.

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    net::IpAddr,
    ops::ControlFlow,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// What an entry does to the sources it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn to_kernel(self) -> proxy_common::Action {
        match self {
            Self::Allow => proxy_common::Action::Allow,
            Self::Deny => proxy_common::Action::Deny,
        }
    }

    pub fn from_kernel(action: proxy_common::Action) -> Self {
        match action {
            proxy_common::Action::Allow => Self::Allow,
            proxy_common::Action::Deny => Self::Deny,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// One line of the list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub cidr: IpNet,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Why a single CIDR argument or list entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Neither `ADDRESS/PREFIX` nor a bare address.
    #[error(
        "`{input}` is not an IP address or CIDR (expected e.g. 203.0.113.0/24 or 2001:db8::/32)"
    )]
    Unparsable { input: String },
    /// The address parses but the prefix length does not fit its family.
    #[error("`{input}`: the prefix length must be a number from 0 to {max} for IPv{}", if *max == 32 { 4 } else { 6 })]
    PrefixLength { input: String, max: u8 },
    /// Bits beyond the prefix length are set, so the intent is ambiguous.
    #[error("`{input}` has host bits set; the network is `{network}`")]
    HostBitsSet { input: String, network: IpNet },
    /// An IPv4-mapped IPv6 prefix, which no packet on the wire carries.
    #[error(
        "`{input}` is an IPv4-mapped IPv6 address, which never appears as a packet source; write {}",
        ipv4.map_or_else(|| "the IPv4 CIDR instead".to_owned(), |n| format!("`{n}`"))
    )]
    Ipv4Mapped { input: String, ipv4: Option<Ipv4Net> },
    /// A blank in the text (a quoted argument, a config string): no CIDR has
    /// one, and naming the prefix length or the syntax would mislead.
    #[error(
        "`{}` has {}: {}",
        input.escape_debug(),
        Blank(input),
        without.as_ref().map_or_else(|e| format!("and without it, {e}"), |n| format!("write `{n}`"))
    )]
    Whitespace { input: String, without: Result<IpNet, Box<CidrError>> },
}

/// Which blank `input` has, and where: "a trailing space".
struct Blank<'a>(&'a str);

impl fmt::Display for Blank<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(blank) = self.0.chars().find(|c| c.is_whitespace()) else {
            return f.write_str("no blank");
        };
        let place = if self.0.starts_with(blank) {
            "a leading"
        } else if self.0.ends_with(blank) {
            "a trailing"
        } else {
            "a"
        };
        match blank {
            ' ' => write!(f, "{place} space"),
            '\t' => write!(f, "{place} tab"),
            // What a file written on Windows leaves at the end of each line.
            '\r' => write!(f, "{place} carriage return (\\r, a Windows line end)"),
            '\n' => write!(f, "{place} line break"),
            other => write!(f, "{place} blank (U+{:04X})", u32::from(other)),
        }
    }
}

/// Parses a CIDR or bare address as the list and the CLI accept it.
pub fn parse_cidr(input: &str) -> Result<IpNet, CidrError> {
    if input.contains(char::is_whitespace) {
        let without: String = input.chars().filter(|c| !c.is_whitespace()).collect();
        let without = parse_cidr(&without).map_err(Box::new);
        return Err(CidrError::Whitespace { input: input.to_owned(), without });
    }
    let cidr = match IpNet::from_str(input) {
        Ok(cidr) => cidr,
        Err(_) => match input.split_once('/').map(|(address, _)| IpAddr::from_str(address)) {
            Some(Ok(address)) => {
                let max = if address.is_ipv4() { 32 } else { 128 };
                return Err(CidrError::PrefixLength { input: input.to_owned(), max });
            }
            Some(Err(_)) => return Err(CidrError::Unparsable { input: input.to_owned() }),
            None => IpAddr::from_str(input)
                .map(IpNet::from)
                .map_err(|_| CidrError::Unparsable { input: input.to_owned() })?,
        },
    };
    if cidr.trunc() != cidr {
        return Err(CidrError::HostBitsSet { input: input.to_owned(), network: cidr.trunc() });
    }
    if let IpNet::V6(v6) = cidr
        && v6.prefix_len() >= 96
        && v6.network().to_ipv4_mapped().is_some()
    {
        let ipv4 = v6
            .network()
            .to_ipv4_mapped()
            .and_then(|addr| Ipv4Net::new(addr, v6.prefix_len() - 96).ok());
        return Err(CidrError::Ipv4Mapped { input: input.to_owned(), ipv4 });
    }
    Ok(cidr)
}

/// Why a list text (a file, or `allow replace` input) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line's CIDR is refused.
    #[error("line {line}: {source}")]
    Cidr {
        line: usize,
        #[source]
        source: CidrError,
    },
    /// A line is not `[allow|deny] CIDR [# comment]`.
    #[error("line {line}: expected `[allow|deny] CIDR [# comment]`, found `{text}`")]
    Syntax { line: usize, text: String },
    /// The same CIDR is listed with both actions.
    #[error("line {line}: {cidr} is listed as {action} here but as {other} on line {other_line}")]
    Conflict { line: usize, cidr: IpNet, action: Action, other: Action, other_line: usize },
}

/// Why a change requested through the CLI is refused. Nothing changes when it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// `del` of an entry that is not there (or is there with the other action).
    #[error("{cidr} is not on the list as {action}")]
    NotListed { cidr: IpNet, action: Action },
    /// `add` of a CIDR that is listed with the other action.
    #[error(
        "{cidr} is already listed as {existing}; remove it first with `edgegate {existing} del {cidr}`"
    )]
    OtherAction { cidr: IpNet, existing: Action },
}

/// The whole list, ordered by network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    entries: BTreeMap<IpNet, Entry>,
}

impl Allowlist {
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Self {
        Self { entries: entries.into_iter().map(|e| (e.cidr, e)).collect() }
    }

    /// Parses the text format: one `[allow|deny] CIDR [# comment]` per line.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut first = None;
        let list = Self::parse_each(text, |problem| {
            first = Some(problem);
            ControlFlow::Break(())
        });
        first.map_or(Ok(list), Err)
    }

    /// The problems of `text` in line order, at most `limit` of them: what
    /// `check` reports at once, where [`Self::parse`] stops at the first.
    pub fn problems(text: &str, limit: usize) -> Vec<ParseError> {
        let mut problems = Vec::new();
        Self::parse_each(text, |problem| {
            problems.push(problem);
            if problems.len() < limit { ControlFlow::Continue(()) } else { ControlFlow::Break(()) }
        });
        problems
    }

    /// Parses `text`, handing each problem to `problem`, which says whether
    /// to go on; the lines without one make the list.
    fn parse_each(text: &str, mut problem: impl FnMut(ParseError) -> ControlFlow<()>) -> Self {
        let mut entries: BTreeMap<IpNet, (Entry, usize)> = BTreeMap::new();
        for parsed in parse_lines(text) {
            let flow = match parsed {
                Err(e) => problem(e),
                Ok((line, entry)) => match entries.get(&entry.cidr) {
                    Some((existing, other_line)) if existing.action != entry.action => {
                        problem(ParseError::Conflict {
                            line,
                            cidr: entry.cidr,
                            action: entry.action,
                            other: existing.action,
                            other_line: *other_line,
                        })
                    }
                    _ => {
                        entries.insert(entry.cidr, (entry, line));
                        ControlFlow::Continue(())
                    }
                },
            };
            if flow.is_break() {
                break;
            }
        }
        Self::from_entries(entries.into_values().map(|(entry, _)| entry))
    }

    /// The text format, with a header saying who owns the file.
    pub fn render(&self) -> String {
        let mut text = String::from(
            "# edgegate allowlist: written by the daemon; change it with `edgegate allow|deny ...`.\n\
             # One entry per line: `CIDR` (allow) or `deny CIDR`, optional `# comment`.\n",
        );
        for entry in self.entries.values() {
            let mut line = match entry.action {
                Action::Allow => entry.cidr.to_string(),
                Action::Deny => format!("deny {}", entry.cidr),
            };
            if let Some(comment) = &entry.comment {
                line = format!("{line:<43} # {comment}");
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    }

    pub fn entries(&self) -> impl ExactSizeIterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn get(&self, cidr: &IpNet) -> Option<&Entry> {
        self.entries.get(cidr)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries per family: (IPv4, IPv6).
    pub fn family_sizes(&self) -> (usize, usize) {
        let v4 = self.entries.keys().filter(|c| matches!(c, IpNet::V4(_))).count();
        (v4, self.len() - v4)
    }

    /// The list with `cidrs` added as `action`. Adding an existing entry again
    /// updates its comment (when one is given); adding a CIDR that is listed
    /// with the other action is refused.
    pub fn with_added(
        &self,
        cidrs: &[IpNet],
        action: Action,
        comment: Option<&str>,
    ) -> Result<Self, ChangeError> {
        let mut next = self.clone();
        for &cidr in cidrs {
            match next.entries.get_mut(&cidr) {
                Some(existing) if existing.action != action => {
                    return Err(ChangeError::OtherAction { cidr, existing: existing.action });
                }
                Some(existing) => {
                    if let Some(comment) = comment {
                        existing.comment = Some(comment.to_owned());
                    }
                }
                None => {
                    let comment = comment.map(str::to_owned);
                    next.entries.insert(cidr, Entry { cidr, action, comment });
                }
            }
        }
        Ok(next)
    }

    /// The list without `cidrs`, each of which must be listed as `action`.
    pub fn with_removed(&self, cidrs: &[IpNet], action: Action) -> Result<Self, ChangeError> {
        let mut next = self.clone();
        for &cidr in cidrs {
            match next.entries.get(&cidr) {
                Some(existing) if existing.action == action => {
                    next.entries.remove(&cidr);
                }
                _ => return Err(ChangeError::NotListed { cidr, action }),
            }
        }
        Ok(next)
    }

    /// The list with `imported` allow entries merged in. With `replace`,
    /// entries whose comment starts with `tag` (an earlier import) go first.
    /// An imported CIDR that is listed as deny is refused: an import never
    /// overrides an operator's deny.
    pub fn with_imported(
        &self,
        imported: &[Entry],
        tag: &str,
        replace: bool,
    ) -> Result<Self, ChangeError> {
        let mut next = self.clone();
        if replace {
            next.entries.retain(|_, e| !e.comment.as_deref().is_some_and(|c| c.starts_with(tag)));
        }
        for entry in imported {
            match next.entries.get(&entry.cidr) {
                Some(existing) if existing.action == Action::Deny => {
                    return Err(ChangeError::OtherAction {
                        cidr: entry.cidr,
                        existing: Action::Deny,
                    });
                }
                // Already allowed, by the operator or an earlier import: keep that entry.
                Some(_) => {}
                None => {
                    next.entries.insert(entry.cidr, entry.clone());
                }
            }
        }
        Ok(next)
    }

    /// The longest matching entry's action for `addr`, or `None` if nothing matches.
    pub fn verdict(&self, addr: IpAddr) -> Option<Action> {
        self.deciding_entry(addr).map(|e| e.action)
    }

    /// The entry that decides for `addr`: the longest matching prefix.
    pub fn deciding_entry(&self, addr: IpAddr) -> Option<&Entry> {
        let max_len = if addr.is_ipv4() { 32 } else { 128 };
        (0..=max_len).rev().find_map(|len| self.entries.get(&IpNet::new(addr, len).ok()?.trunc()))
    }
}

/// The entries of the text format with their line numbers, in file order.
fn parse_lines(text: &str) -> impl Iterator<Item = Result<(usize, Entry), ParseError>> {
    text.lines().enumerate().filter_map(|(index, raw)| {
        let line = index + 1;
        let (body, comment) = match raw.split_once('#') {
            Some((body, comment)) => (body, Some(comment.trim()).filter(|c| !c.is_empty())),
            None => (raw, None),
        };
        let words: Vec<&str> = body.split_whitespace().collect();
        let (action, cidr) = match words.as_slice() {
            [] => return None,
            [cidr] if *cidr != "allow" && *cidr != "deny" => (Action::Allow, *cidr),
            ["allow", cidr] => (Action::Allow, *cidr),
            ["deny", cidr] => (Action::Deny, *cidr),
            _ => return Some(Err(ParseError::Syntax { line, text: raw.trim().to_owned() })),
        };
        Some(match parse_cidr(cidr) {
            Ok(cidr) => Ok((line, Entry { cidr, action, comment: comment.map(str::to_owned) })),
            Err(source) => Err(ParseError::Cidr { line, source }),
        })
    })
}

/// The line of `text` (the list file) where `cidr` is listed; the last one
/// when it is listed twice, as that line's comment is the one in force.
pub fn line_of(text: &str, cidr: &IpNet) -> Option<usize> {
    parse_lines(text)
        .filter_map(Result::ok)
        .filter(|(_, entry)| entry.cidr == *cidr)
        .map(|(line, _)| line)
        .last()
}

/// A change the CLI asks for: sent to the daemon, or applied to the file
/// directly (`--offline`). CIDRs stay as typed, so that errors quote them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Add entries with `action` (again: update the comment).
    Add { action: Action, cidrs: Vec<String>, comment: Option<String> },
    /// Remove entries listed with `action`.
    Remove { action: Action, cidrs: Vec<String> },
    /// Merge allow entries (`allow import-aws`); with `replace`, first drop
    /// entries whose comment starts with `tag`.
    Import { entries: Vec<Entry>, tag: String, replace: bool },
    /// Replace the whole list with one in the file format.
    Replace { text: String },
}

/// Why a change is refused; nothing changes.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// An argument is not a usable CIDR.
    #[error(transparent)]
    Cidr(#[from] CidrError),
    /// The entries clash with the list (listed with the other action, not listed).
    #[error(transparent)]
    Conflict(#[from] ChangeError),
    /// A replacement list does not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A comment would break the file's one-entry-per-line format.
    #[error("the comment {0:?} holds a line break or another control character")]
    Comment(String),
}

impl Change {
    /// Checks what does not depend on the list: every CIDR, the replacement's text.
    pub fn validate(&self) -> Result<(), Refusal> {
        self.check_comments()?;
        match self {
            Self::Add { cidrs, .. } | Self::Remove { cidrs, .. } => {
                cidrs.iter().try_for_each(|c| parse_cidr(c).map(drop))?;
            }
            Self::Import { .. } => {}
            Self::Replace { text } => drop(Allowlist::parse(text)?),
        }
        Ok(())
    }

    /// The list `list` becomes; validated whole.
    pub fn apply_to(&self, list: &Allowlist) -> Result<Allowlist, Refusal> {
        self.check_comments()?;
        let parse_all = |cidrs: &[String]| -> Result<Vec<IpNet>, CidrError> {
            cidrs.iter().map(|c| parse_cidr(c)).collect()
        };
        Ok(match self {
            Self::Add { action, cidrs, comment } => {
                list.with_added(&parse_all(cidrs)?, *action, comment.as_deref())?
            }
            Self::Remove { action, cidrs } => list.with_removed(&parse_all(cidrs)?, *action)?,
            Self::Import { entries, tag, replace } => list.with_imported(entries, tag, *replace)?,
            Self::Replace { text } => Allowlist::parse(text)?,
        })
    }
}

impl Change {
    /// A comment is the rest of its entry's line: a line break in one would
    /// put whatever follows it on the list as an entry of its own.
    fn check_comments(&self) -> Result<(), Refusal> {
        let comments: Vec<&str> = match self {
            Self::Add { comment, .. } => comment.as_deref().into_iter().collect(),
            Self::Import { entries, .. } => {
                entries.iter().filter_map(|e| e.comment.as_deref()).collect()
            }
            Self::Remove { .. } | Self::Replace { .. } => Vec::new(),
        };
        match comments.into_iter().find(|c| c.chars().any(char::is_control)) {
            Some(bad) => Err(Refusal::Comment(bad.to_owned())),
            None => Ok(()),
        }
    }
}

/// How one list differs from the next, as the CLI reports a change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub added: usize,
    pub removed: usize,
    /// Listed in both, with another action or comment.
    pub updated: usize,
}

impl Allowlist {
    /// What changes from `self` to `next`.
    pub fn diff(&self, next: &Allowlist) -> Diff {
        let mut diff = Diff::default();
        for entry in next.entries() {
            match self.get(&entry.cidr) {
                None => diff.added += 1,
                Some(old) if old != entry => diff.updated += 1,
                Some(_) => {}
            }
        }
        diff.removed = self.entries().filter(|e| next.get(&e.cidr).is_none()).count();
        diff
    }
}

/// Why the list file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file does not parse.
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
}

/// Reads the list file; a missing file is an empty list.
pub fn load(path: &Path) -> Result<Allowlist, StoreError> {
    match fs::read_to_string(path) {
        Ok(text) => Allowlist::parse(&text)
            .map_err(|source| StoreError::Parse { path: path.to_owned(), source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Allowlist::default()),
        Err(source) => Err(StoreError::Io { op: "read", path: path.to_owned(), source }),
    }
}

/// Replaces the list file atomically: after a crash, the file holds either
/// the old list or the new one, never a mix or nothing.
pub fn store(path: &Path, list: &Allowlist) -> Result<(), StoreError> {
    replace_file(path, list.render().as_bytes())
}

/// Replaces `path` with `contents` atomically ([`crate::files::replace`]).
pub fn replace_file(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    crate::files::replace(path, contents)
        .map_err(|crate::files::FileError { op, path, source }| StoreError::Io { op, path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn bare_addresses_are_host_routes() {
        assert_eq!(parse_cidr("203.0.113.7"), Ok(net("203.0.113.7/32")));
        assert_eq!(parse_cidr("2001:db8::1"), Ok(net("2001:db8::1/128")));
    }

    #[test]
    fn diff_counts_added_removed_and_updated_entries() {
        let old = Allowlist::parse("10.0.0.0/8\n192.0.2.0/24 # a\ndeny 198.51.100.7\n").unwrap();
        let new = Allowlist::parse("10.0.0.0/8\n192.0.2.0/24 # b\n2001:db8::/32\n203.0.113.0/24\n")
            .unwrap();
        assert_eq!(old.diff(&new), Diff { added: 2, removed: 1, updated: 1 });
        assert_eq!(new.diff(&new), Diff::default());
        assert_eq!(Allowlist::default().diff(&old), Diff { added: 3, removed: 0, updated: 0 });
    }

    #[test]
    fn changes_are_validated_whole_and_refused_with_the_cause() {
        let list = Allowlist::parse("203.0.113.0/24\n").unwrap();
        let add = |cidrs: &[&str], action| Change::Add {
            action,
            cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
            comment: None,
        };
        let next = add(&["198.51.100.7", "2001:db8::/32"], Action::Allow).apply_to(&list).unwrap();
        assert_eq!(next.len(), 3);
        assert!(matches!(
            add(&["198.51.100.7", "10.0.0.1/8"], Action::Allow).apply_to(&list),
            Err(Refusal::Cidr(CidrError::HostBitsSet { .. }))
        ));
        assert!(matches!(
            add(&["203.0.113.0/24"], Action::Deny).apply_to(&list),
            Err(Refusal::Conflict(ChangeError::OtherAction { .. }))
        ));
        let remove = Change::Remove { action: Action::Deny, cidrs: vec!["203.0.113.0/24".into()] };
        assert!(matches!(
            remove.apply_to(&list),
            Err(Refusal::Conflict(ChangeError::NotListed { .. }))
        ));
        let replace = Change::Replace { text: "allow\n".into() };
        assert!(matches!(replace.apply_to(&list), Err(Refusal::Parse(ParseError::Syntax { .. }))));
    }

    #[test]
    fn a_comment_cannot_smuggle_an_entry_onto_the_next_line() {
        let list = Allowlist::default();
        for comment in ["partner\n0.0.0.0/0", "partner\r", "tab\there", "nul\0"] {
            let add = Change::Add {
                action: Action::Allow,
                cidrs: vec!["198.51.100.7".into()],
                comment: Some(comment.into()),
            };
            assert!(matches!(add.validate(), Err(Refusal::Comment(_))), "{comment:?}");
            assert!(matches!(add.apply_to(&list), Err(Refusal::Comment(_))), "{comment:?}");
            let import = Change::Import {
                entries: vec![Entry {
                    cidr: net("198.51.100.7/32"),
                    action: Action::Allow,
                    comment: Some(comment.into()),
                }],
                tag: "learned".into(),
                replace: false,
            };
            assert!(matches!(import.apply_to(&list), Err(Refusal::Comment(_))), "{comment:?}");
        }
        let fine = Change::Add {
            action: Action::Allow,
            cidrs: vec!["198.51.100.7".into()],
            comment: Some("partner # ünïcode is fine".into()),
        };
        let next = fine.apply_to(&list).expect("a one-line comment");
        assert_eq!(Allowlist::parse(&next.render()).unwrap(), next);
    }

    #[test]
    fn a_prefix_length_beyond_the_family_says_prefix_length() {
        for (input, max) in
            [("10.0.0.0/33", 32), ("10.0.0.0/", 32), ("10.0.0.0/x", 32), ("2001:db8::/129", 128)]
        {
            let err = parse_cidr(input).unwrap_err();
            assert_eq!(err, CidrError::PrefixLength { input: input.into(), max });
            assert!(err.to_string().contains("prefix length"), "{err}");
        }
        assert_eq!(
            parse_cidr("10.0.0/8"),
            Err(CidrError::Unparsable { input: "10.0.0/8".into() }),
            "the address itself is broken"
        );
    }

    /// A blank is named as such (it used to be blamed on the prefix length),
    /// with the fix, or with what is wrong besides.
    #[test]
    fn a_blank_says_blank_not_prefix_length() {
        let cases = [
            ("10.0.0.0/8 ", "a trailing space: write `10.0.0.0/8`"),
            (" 10.0.0.0/8", "a leading space: write `10.0.0.0/8`"),
            ("10.0.0.0 /8", "a space: write `10.0.0.0/8`"),
            ("10.0.0.0/8\t", "a trailing tab"),
            ("10.0.0.0/8\r", "`10.0.0.0/8\\r` has a trailing carriage return"),
            ("2001:db8::/32\n", "a trailing line break: write `2001:db8::/32`"),
            ("203.0.113.7/24 ", "and without it, `203.0.113.7/24` has host bits set"),
        ];
        for (input, expected) in cases {
            let err = parse_cidr(input).unwrap_err();
            assert!(matches!(err, CidrError::Whitespace { .. }), "{input:?}: {err:?}");
            let message = err.to_string();
            assert!(message.contains(expected), "{input:?}: {message}");
            assert!(!message.contains("prefix length"), "{input:?}: {message}");
        }
        // CLI arguments and config values reach the same parser; list file
        // lines are split on blanks first, so theirs never get this far.
        let change =
            Change::Add { action: Action::Allow, cidrs: vec!["10.0.0.0/8 ".into()], comment: None };
        assert!(matches!(change.validate(), Err(Refusal::Cidr(CidrError::Whitespace { .. }))));
        assert_eq!(Allowlist::parse("10.0.0.0/8 \r\n").map(|l| l.len()), Ok(1));
    }

    #[test]
    fn host_bits_are_refused_naming_the_network() {
        assert_eq!(
            parse_cidr("203.0.113.7/24"),
            Err(CidrError::HostBitsSet {
                input: "203.0.113.7/24".into(),
                network: net("203.0.113.0/24")
            })
        );
    }

    #[test]
    fn ipv4_mapped_is_refused_naming_the_ipv4_form() {
        let err = parse_cidr("::ffff:203.0.113.0/120").unwrap_err();
        assert_eq!(
            err,
            CidrError::Ipv4Mapped {
                input: "::ffff:203.0.113.0/120".into(),
                ipv4: Some("203.0.113.0/24".parse().unwrap())
            }
        );
        assert!(err.to_string().contains("`203.0.113.0/24`"));
    }

    #[test]
    fn garbage_is_refused() {
        // Bad prefix lengths have their own error (see above).
        for input in ["", "example.com", "203.0.113/24", "1.2.3.4.5"] {
            assert_eq!(
                parse_cidr(input),
                Err(CidrError::Unparsable { input: input.into() }),
                "{input}"
            );
        }
    }

    #[test]
    fn file_format_round_trips() {
        let text =
            "# header\n203.0.113.0/24  # partner\n\ndeny 203.0.113.66/32\nallow 2001:db8::/32\n";
        let list = Allowlist::parse(text).unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list.get(&net("203.0.113.0/24")).unwrap().comment.as_deref(), Some("partner"));
        assert_eq!(list.get(&net("203.0.113.66/32")).unwrap().action, Action::Deny);
        assert_eq!(Allowlist::parse(&list.render()).unwrap(), list);
    }

    #[test]
    fn file_errors_name_the_line() {
        let err = Allowlist::parse("10.0.0.0/8\n\nallow 10.0.0.300/32\n").unwrap_err();
        assert!(matches!(err, ParseError::Cidr { line: 3, .. }), "{err}");
        let err = Allowlist::parse("permit 10.0.0.0/8\n").unwrap_err();
        assert_eq!(err, ParseError::Syntax { line: 1, text: "permit 10.0.0.0/8".into() });
        let err = Allowlist::parse("10.0.0.0/8\ndeny 10.0.0.0/8\n").unwrap_err();
        assert!(matches!(err, ParseError::Conflict { line: 2, other_line: 1, .. }), "{err}");
    }

    #[test]
    fn explanations_find_the_deciding_entry_and_its_line() {
        let text = "# partners\n10.0.0.0/8 # corp\ndeny 10.1.0.0/16\n\n2001:db8::/32\n10.0.0.0/8 # again\n";
        let list = Allowlist::parse(text).unwrap();
        let decide = |addr: &str| list.deciding_entry(addr.parse().unwrap()).map(|e| e.cidr);
        assert_eq!(decide("10.2.3.4"), Some(net("10.0.0.0/8")));
        assert_eq!(decide("10.1.3.4"), Some(net("10.1.0.0/16")), "deny inside allow");
        assert_eq!(decide("2001:db8::1"), Some(net("2001:db8::/32")));
        assert_eq!(decide("192.0.2.1"), None);
        assert_eq!(
            line_of(text, &net("10.0.0.0/8")),
            Some(6),
            "the later line's comment is in force"
        );
        assert_eq!(line_of(text, &net("10.1.0.0/16")), Some(3));
        assert_eq!(line_of(text, &net("2001:db8::/32")), Some(5));
        assert_eq!(line_of(text, &net("192.0.2.0/24")), None);
    }

    #[test]
    fn duplicates_with_the_same_action_collapse() {
        let list = Allowlist::parse("10.0.0.0/8\n10.0.0.0/8 # again\n").unwrap();
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn adding_over_the_other_action_is_refused() {
        let list = Allowlist::parse("deny 10.0.0.1/32\n").unwrap();
        assert_eq!(
            list.with_added(&[net("10.0.0.1/32")], Action::Allow, None),
            Err(ChangeError::OtherAction { cidr: net("10.0.0.1/32"), existing: Action::Deny })
        );
    }

    #[test]
    fn removing_what_is_not_listed_changes_nothing() {
        let list = Allowlist::parse("10.0.0.0/8\n").unwrap();
        let err = list.with_removed(&[net("10.0.0.0/8"), net("10.1.0.0/16")], Action::Allow);
        assert_eq!(
            err,
            Err(ChangeError::NotListed { cidr: net("10.1.0.0/16"), action: Action::Allow })
        );
        assert_eq!(
            list.with_removed(&[net("10.0.0.0/8")], Action::Deny),
            Err(ChangeError::NotListed { cidr: net("10.0.0.0/8"), action: Action::Deny })
        );
    }

    #[test]
    fn imports_merge_and_replace_their_own_entries_only() {
        let list =
            Allowlist::parse("10.0.0.0/8 # operator\n3.0.0.0/8 # aws-ip-ranges old\n").unwrap();
        let imported = [Entry {
            cidr: net("3.5.0.0/16"),
            action: Action::Allow,
            comment: Some("aws-ip-ranges new".into()),
        }];
        let merged = list.with_imported(&imported, "aws-ip-ranges", false).unwrap();
        assert_eq!(merged.len(), 3);
        let replaced = list.with_imported(&imported, "aws-ip-ranges", true).unwrap();
        let cidrs: Vec<String> = replaced.entries().map(|e| e.cidr.to_string()).collect();
        assert_eq!(cidrs, ["3.5.0.0/16", "10.0.0.0/8"]);
        let denied = Allowlist::parse("deny 3.5.0.0/16\n").unwrap();
        assert_eq!(
            denied.with_imported(&imported, "aws-ip-ranges", false),
            Err(ChangeError::OtherAction { cidr: net("3.5.0.0/16"), existing: Action::Deny })
        );
    }

    #[test]
    fn longest_prefix_decides() {
        let list =
            Allowlist::parse("203.0.113.0/24\ndeny 203.0.113.64/26\n203.0.113.66/32\n").unwrap();
        assert_eq!(list.verdict("203.0.113.1".parse().unwrap()), Some(Action::Allow));
        assert_eq!(list.verdict("203.0.113.65".parse().unwrap()), Some(Action::Deny));
        assert_eq!(list.verdict("203.0.113.66".parse().unwrap()), Some(Action::Allow));
        assert_eq!(list.verdict("198.51.100.1".parse().unwrap()), None);
    }

    #[test]
    fn store_replaces_the_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/allowlist");
        assert!(load(&path).unwrap().is_empty(), "a missing file is an empty list");
        let list = Allowlist::parse("10.0.0.0/8 # lab\n").unwrap();
        store(&path, &list).unwrap();
        assert_eq!(load(&path).unwrap(), list);
        assert!(!dir.path().join("state/allowlist.tmp").exists());
    }
}
