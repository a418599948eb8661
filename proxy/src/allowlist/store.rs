//! The list file: read (a missing file is an empty list) and replaced
//! atomically through [`crate::files::replace`].

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{Allowlist, format::ParseError};
use crate::files::IoError;

/// Why the list file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The file does not parse.
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
}

/// Bytes a list file may have per entry the maps can hold (both families):
/// far more than an entry and its comment take, so that only a file that
/// could never be enforced (or is not a list at all) is refused unread.
const MAX_BYTES_PER_ENTRY: u64 = 512;

/// Reads the list file's text, at most what a list of `max_entries` per
/// family can take; `None` for a missing file (an empty list).
pub fn read(path: &Path, max_entries: u32) -> Result<Option<String>, StoreError> {
    let max = 2 * u64::from(max_entries) * MAX_BYTES_PER_ENTRY + MAX_BYTES_PER_ENTRY;
    match crate::files::read_bounded_text(path, max) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IoError::new("read", path, source).into()),
    }
}

/// Reads and parses the list file (see [`read`]); a missing file is an empty list.
pub fn load(path: &Path, max_entries: u32) -> Result<Allowlist, StoreError> {
    let Some(text) = read(path, max_entries)? else {
        return Ok(Allowlist::default());
    };
    Allowlist::parse(&text).map_err(|source| StoreError::Parse { path: path.to_owned(), source })
}

/// Replaces the list file atomically: after a crash, the file holds either
/// the old list or the new one, never a mix or nothing.
pub fn store(path: &Path, list: &Allowlist) -> Result<(), StoreError> {
    Ok(crate::files::replace(path, list.render().as_bytes())?)
}
