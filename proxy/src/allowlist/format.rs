//! The list's text format: one `[allow|deny] CIDR [# comment]` per line,
//! parsed (stopping at the first problem, or collecting them for `check`)
//! and rendered.

use std::{collections::BTreeMap, ops::ControlFlow};

use ipnet::IpNet;

use super::{
    Action, Allowlist, Entry,
    cidr::{CidrError, parse_cidr},
};

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

impl Allowlist {
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
