//! The gate's state files (the allowlist, its fleet generation, learned
//! sources), written as root in directories others may reach: every write
//! goes through [`replace`], so that neither a crash, nor a link planted by
//! another user, nor a second writer can leave a wrong file behind.
//!
//! [`IoError`] is the one I/O error with its context (what was done, on
//! which path) that every module's error enum holds, so that each failure
//! reads the same: "cannot {op} {path}: {cause}".

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// A file operation that failed, and on what.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {source}", path.display())]
pub struct IoError {
    /// What was done, as a verb: "read", "create directory", "bind".
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl IoError {
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self { op, path: path.into(), source }
    }
}

/// `.at(op, path)` on an [`io::Result`]: its error as an [`IoError`].
pub trait IoContext<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, IoError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, IoError> {
        self.map_err(|source| IoError::new(op, path, source))
    }
}

/// Replaces `path` with `contents` atomically: a new temporary file of a
/// random name (created exclusively, never through a link, mode 0600),
/// synced, renamed over `path` (a link there is replaced, not followed),
/// then the directory synced. The directory is created if need be.
pub fn replace(path: &Path, contents: &[u8]) -> Result<(), IoError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).at("create directory", dir)?;
    let (temp, mut file) = create_temporary(dir, path)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .at("write", &temp)
        .and_then(|()| fs::rename(&temp, path).at("rename into place", path));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    File::open(dir).and_then(|d| d.sync_all()).at("sync directory", dir)
}

/// The contents of `path`, refused (`InvalidData`) if longer than `max`
/// bytes: a state file is read without trusting its size.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut contents = Vec::new();
    File::open(path)?.take(max + 1).read_to_end(&mut contents)?;
    if contents.len() as u64 > max {
        let message = format!("longer than the {max} bytes such a file may have");
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    Ok(contents)
}

/// As [`read_bounded`], for a text file: not UTF-8 is `InvalidData` too.
pub fn read_bounded_text(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()))
}

/// A new file at `path` with `mode`: created exclusively (`O_EXCL`), never
/// through a link (`O_NOFOLLOW`), so nothing that was there is written.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// `.{name}.{random}.tmp` next to `path`, from [`create_new`].
fn create_temporary(dir: &Path, path: &Path) -> Result<(PathBuf, File), IoError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    loop {
        let temp = dir.join(format!(".{name}.{}.tmp", random_hex()));
        match create_new(&temp, 0o600) {
            Ok(file) => return Ok((temp, file)),
            // Someone else's file by that name: draw another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(IoError::new("create", temp, e)),
        }
    }
}

/// A directory of a random name under the system's temporary directory,
/// created fresh (never an existing one) and private (0700).
pub fn private_dir(prefix: &str) -> io::Result<PathBuf> {
    loop {
        let dir = std::env::temp_dir().join(format!("{prefix}{}", random_hex()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system's random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An exclusive lock on the state beside `path` (`{path}.lock`), held for
/// as long as the value lives: the daemon holds it while it runs, and
/// `--offline` changes take it, so the two never write at once.
pub struct StateLock {
    _file: File,
}

/// Why the state lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (a running daemon, or another `--offline` change) holds it.
    #[error("{} is held by another edgegate process (a running daemon?)", path.display())]
    Held { path: PathBuf },
    #[error(transparent)]
    Io(#[from] IoError),
}

impl StateLock {
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let lock = PathBuf::from(name);
        if let Some(dir) = lock.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).at("create directory", dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock)
            .at("open", &lock)?;
        // SAFETY: flock on a descriptor this function owns.
        let locked = unsafe {
            libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB)
        };
        if locked < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EWOULDBLOCK) => LockError::Held { path: lock },
                _ => IoError::new("lock", lock, source).into(),
            });
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt as _, symlink};

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).expect("stat").permissions().mode() & 0o777
    }

    /// A link planted at the old fixed temporary name, or at the file
    /// itself, never makes the writer touch what it points to.
    #[test]
    fn planted_links_are_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let canary = dir.path().join("canary");
        fs::write(&canary, "untouched").expect("write canary");
        let path = dir.path().join("allowlist");
        symlink(&canary, dir.path().join("allowlist.tmp")).expect("plant");
        replace(&path, b"10.0.0.0/8\n").expect("replace");
        assert_eq!(fs::read_to_string(&path).expect("read"), "10.0.0.0/8\n");
        assert_eq!(mode(&path), 0o600);
        let link = dir.path().join("learned.json");
        symlink(&canary, &link).expect("plant");
        replace(&link, b"{}").expect("replace over a link");
        assert!(!fs::symlink_metadata(&link).expect("stat").file_type().is_symlink());
        assert_eq!(fs::read_to_string(&canary).expect("read"), "untouched");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".tmp") && name != "allowlist.tmp")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn an_oversized_file_is_refused_not_read_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        fs::write(&path, [b'x'; 11]).expect("write");
        assert_eq!(read_bounded(&path, 11).expect("fits").len(), 11);
        let error = read_bounded(&path, 10).expect_err("too long");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn private_dirs_are_new_and_0700() {
        let a = private_dir("edgegate-test-").expect("dir");
        let b = private_dir("edgegate-test-").expect("dir");
        assert_ne!(a, b);
        assert_eq!(mode(&a), 0o700);
        fs::remove_dir(a).expect("remove");
        fs::remove_dir(b).expect("remove");
    }

    /// The one text of an I/O failure, with the cause kept as the source.
    #[test]
    fn io_errors_name_the_operation_and_the_path() {
        use std::error::Error as _;
        let cause = || io::Error::from_raw_os_error(libc::ENOSPC);
        let error = Err::<(), _>(cause()).at("write", Path::new("/var/lib/x")).unwrap_err();
        assert_eq!(error.to_string(), format!("cannot write /var/lib/x: {}", cause()));
        let source = error.source().expect("a source");
        assert_eq!(
            source.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error),
            Some(libc::ENOSPC)
        );
    }

    #[test]
    fn the_state_lock_is_exclusive_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("allowlist");
        let held = StateLock::acquire(&path).expect("first");
        assert!(matches!(StateLock::acquire(&path), Err(LockError::Held { .. })));
        drop(held);
        StateLock::acquire(&path).expect("after release");
    }
}
