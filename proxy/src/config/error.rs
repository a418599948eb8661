//! Why a configuration file is refused: messages name the file and the key.

use std::path::{Path, PathBuf};

/// Why a configuration file is refused. Messages name the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or a key has the wrong type or an unknown name (the message has the line).
    #[error("config {}: {source}", path.display())]
    Syntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// Values are well-formed but unusable: every such problem, one per line.
    #[error("{}", problems.iter().map(|p| format!("config {}: {p}", path.display())).collect::<Vec<_>>().join("\n"))]
    Invalid { path: PathBuf, problems: Vec<Invalid> },
    /// `[listener]` where the file takes a list of tables, `[[listener]]`.
    #[error(
        "config {}: line {line}: `[{name}]` makes one table, but `{name}` is a list of tables: \
         write `[[{name}]]` (double brackets) above each one",
        path.display()
    )]
    SingleBrackets { path: PathBuf, line: usize, name: String },
    /// `[[filter]]` where the file takes one table, `[filter]`.
    #[error(
        "config {}: line {line}: `[[{name}]]` starts a list of tables, but `{name}` is a single \
         table: write `[{name}]` (single brackets), once",
        path.display()
    )]
    DoubleBrackets { path: PathBuf, line: usize, name: String },
}

/// A TOML error as the operator can act on it: toml's own text (it has the
/// line), except for a table header with the wrong brackets, of which toml
/// says only "invalid type: map, expected a sequence".
pub(super) fn syntax_error(path: &Path, text: &str, error: toml::de::Error) -> ConfigError {
    let span = error.span().filter(|_| error.message().starts_with("invalid type:"));
    let header = span.clone().and_then(|span| text.get(span)).map(str::trim);
    let before = span.and_then(|span| text.get(..span.start)).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let path = path.to_owned();
    let table_name = |inner: &str| {
        let name = inner.trim();
        (!name.is_empty() && !name.contains(['[', ']'])).then(|| name.to_owned())
    };
    if let Some(header) = header {
        if let Some(name) =
            header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")).and_then(table_name)
        {
            return ConfigError::DoubleBrackets { path, line, name };
        }
        if let Some(name) =
            header.strip_prefix('[').and_then(|h| h.strip_suffix(']')).and_then(table_name)
            && error.message().contains("expected a sequence")
        {
            return ConfigError::SingleBrackets { path, line, name };
        }
    }
    ConfigError::Syntax { path, source: Box::new(error) }
}

/// One unusable value: the key it is under, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {problem}")]
pub struct Invalid {
    pub key: String,
    pub problem: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { key: key.into(), problem: problem.into() }
    }
}
