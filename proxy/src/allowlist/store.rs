//! The list file: read (a missing file is an empty list) and replaced
//! atomically through [`crate::files::replace`].

use std::{
    fs, io,
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

/// Reads the list file; a missing file is an empty list.
pub fn load(path: &Path) -> Result<Allowlist, StoreError> {
    match fs::read_to_string(path) {
        Ok(text) => Allowlist::parse(&text)
            .map_err(|source| StoreError::Parse { path: path.to_owned(), source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Allowlist::default()),
        Err(source) => Err(IoError::new("read", path, source).into()),
    }
}

/// Replaces the list file atomically: after a crash, the file holds either
/// the old list or the new one, never a mix or nothing.
pub fn store(path: &Path, list: &Allowlist) -> Result<(), StoreError> {
    Ok(crate::files::replace(path, list.render().as_bytes())?)
}
