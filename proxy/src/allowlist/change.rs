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
