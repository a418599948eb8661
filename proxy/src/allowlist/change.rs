//! The changes the CLI asks for (add, remove, import, replace), applied to
//! a list whole or refused with the cause, and how two lists differ.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    Action, Allowlist, Entry,
    cidr::{CidrError, parse_cidr},
    format::ParseError,
};

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

impl Allowlist {
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
}

/// A change to the list, parsed once: where it is made (the CLI's
/// arguments, [`ChangeText::parse`]) and where it arrives (the control
/// socket deserializes the text form through the same parse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ChangeText", into = "ChangeText")]
pub enum Change {
    /// Add entries with `action` (again: update the comment).
    Add { action: Action, cidrs: Vec<IpNet>, comment: Option<String> },
    /// Remove entries listed with `action`.
    Remove { action: Action, cidrs: Vec<IpNet> },
    /// Merge allow entries (`allow import-aws`); with `replace`, first drop
    /// entries whose comment starts with `tag`.
    Import { entries: Vec<Entry>, tag: String, replace: bool },
    /// Replace the whole list.
    Replace { list: Allowlist },
}

/// A change as written: CIDRs as typed (so that errors quote them), a
/// replacement in the file format. The control protocol carries this form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum ChangeText {
    Add { action: Action, cidrs: Vec<String>, comment: Option<String> },
    Remove { action: Action, cidrs: Vec<String> },
    Import { entries: Vec<Entry>, tag: String, replace: bool },
    Replace { text: String },
}

/// Why a change is refused before it meets the list; nothing changes.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// An argument is not a usable CIDR.
    #[error(transparent)]
    Cidr(#[from] CidrError),
    /// A replacement list does not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A comment would break the file's one-entry-per-line format.
    #[error("the comment {0:?} holds a line break or another control character")]
    Comment(String),
}

impl ChangeText {
    /// Every CIDR, the replacement's text and every comment, checked once.
    pub fn parse(self) -> Result<Change, Refusal> {
        let parse_all = |cidrs: Vec<String>| -> Result<Vec<IpNet>, CidrError> {
            cidrs.iter().map(|cidr| parse_cidr(cidr)).collect()
        };
        Ok(match self {
            Self::Add { action, cidrs, comment } => {
                if let Some(comment) = &comment {
                    check_comment(comment)?;
                }
                Change::Add { action, cidrs: parse_all(cidrs)?, comment }
            }
            Self::Remove { action, cidrs } => Change::Remove { action, cidrs: parse_all(cidrs)? },
            Self::Import { entries, tag, replace } => {
                for entry in &entries {
                    // Deserialized entries meet the rules typed CIDRs meet.
                    parse_cidr(&entry.cidr.to_string())?;
                    entry.comment.as_deref().map_or(Ok(()), check_comment)?;
                }
                Change::Import { entries, tag, replace }
            }
            Self::Replace { text } => Change::Replace { list: Allowlist::parse(&text)? },
        })
    }
}

impl TryFrom<ChangeText> for Change {
    type Error = Refusal;

    fn try_from(text: ChangeText) -> Result<Self, Refusal> {
        text.parse()
    }
}

impl From<Change> for ChangeText {
    fn from(change: Change) -> Self {
        let texts = |cidrs: Vec<IpNet>| cidrs.iter().map(ToString::to_string).collect();
        match change {
            Change::Add { action, cidrs, comment } => {
                Self::Add { action, cidrs: texts(cidrs), comment }
            }
            Change::Remove { action, cidrs } => Self::Remove { action, cidrs: texts(cidrs) },
            Change::Import { entries, tag, replace } => Self::Import { entries, tag, replace },
            Change::Replace { list } => Self::Replace { text: list.render() },
        }
    }
}

impl Change {
    /// The list `list` becomes, or why the change clashes with it.
    pub fn apply_to(&self, list: &Allowlist) -> Result<Allowlist, ChangeError> {
        match self {
            Self::Add { action, cidrs, comment } => {
                list.with_added(cidrs, *action, comment.as_deref())
            }
            Self::Remove { action, cidrs } => list.with_removed(cidrs, *action),
            Self::Import { entries, tag, replace } => list.with_imported(entries, tag, *replace),
            Self::Replace { list } => Ok(list.clone()),
        }
    }
}

/// A comment is the rest of its entry's line: a line break in one would
/// put whatever follows it on the list as an entry of its own.
fn check_comment(comment: &str) -> Result<(), Refusal> {
    match comment.chars().any(char::is_control) {
        true => Err(Refusal::Comment(comment.to_owned())),
        false => Ok(()),
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
