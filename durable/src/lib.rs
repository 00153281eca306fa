//! Durable files: the one place that writes a file so a crash or power cut leaves the old
//! content or the new content under its name, never a torn or empty file.
//!
//! A write goes to a hidden temporary file in the destination's directory
//! (`.<name>.<pid>-<counter>.partial`, created with its final mode), is fsynced, is renamed into
//! place (`Existing::Replace`) or hard-linked (`Existing::Keep`: a link never replaces its
//! target, so an existing file is refused atomically), and then the directory is fsynced so the
//! new name itself survives a power cut. Without the last step the rename can be lost after a
//! power cut even though the data reached the disk: the classic "renamed but empty" file.
//!
//! Writers that stream into their own hidden file (dataset and review shards) use `sync_file`
//! and `rename_into_place` for the same steps. `is_temporary` lets a store that lists its
//! directory remove what an interrupted write left behind.
//!
//! This crate depends on nothing but std, does no logging and spawns nothing, so every crate
//! that writes state (fleet, onboarding, landing, archive, inference, appliance, core-sink) can
//! depend on it without pulling anything else in.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix of every temporary file this crate creates (after a hidden `.<name>.<pid>-<n>`).
pub const TEMPORARY_SUFFIX: &str = ".partial";

/// The mode `File::create` uses (before the process umask): what the call sites used before
/// they shared this helper.
pub const DEFAULT_MODE: u32 = 0o666;

/// Distinguishes temporary files of concurrent writers within one process.
static TEMPORARY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What failed, on which path, and why. Displayed as `<operation> <path>: <why>`.
#[derive(Debug)]
pub struct Error {
    pub operation: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

impl Error {
    fn new(operation: &'static str, path: &Path, source: io::Error) -> Error {
        Error { operation, path: path.to_path_buf(), source }
    }

    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} {}: {}", self.operation, self.path.display(), self.source)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<Error> for io::Error {
    /// Keeps the kind (callers test for `AlreadyExists`, `NotFound`) and names the path.
    fn from(error: Error) -> io::Error {
        io::Error::new(error.source.kind(), error.to_string())
    }
}

/// What to do when the destination already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Replace it atomically (rename).
    Replace,
    /// Fail with `io::ErrorKind::AlreadyExists`, atomically (a hard link never replaces its
    /// target), leaving the existing file untouched.
    Keep,
}

/// How `write` creates the file. `Options::default()`: mode 0o666 (less the umask), replace an
/// existing file, the directory must exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub mode: u32,
    pub existing: Existing,
    /// Create missing directories on the way (they are not fsynced into their parents).
    pub create_directory: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { mode: DEFAULT_MODE, existing: Existing::Replace, create_directory: false }
    }
}

impl Options {
    pub fn mode(self, mode: u32) -> Options {
        assert!(mode <= 0o7777, "file mode {mode:o} has bits beyond the permission bits");
        Options { mode, ..self }
    }

    pub fn keep_existing(self) -> Options {
        Options { existing: Existing::Keep, ..self }
    }

    pub fn create_directory(self) -> Options {
        Options { create_directory: true, ..self }
    }

    /// Writes `bytes` to `path` durably with these options.
    pub fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), Error> {
        self.write_from(path, &mut &bytes[..]).map(|_| ())
    }

    /// Writes what `source` yields up to its end to `path` durably with these options, streamed
    /// (the caller's reader decides how much is in memory); returns the bytes written. An error
    /// from `source` (operation `read source`, its kind kept) leaves nothing under `path`.
    pub fn write_from(&self, path: &Path, source: &mut dyn io::Read) -> Result<u64, Error> {
        let directory = parent_directory(path);
        let file_name = path.file_name().ok_or_else(|| {
            Error::new("write", path, io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))
        })?;
        if self.create_directory {
            fs::create_dir_all(&directory)
                .map_err(|source| Error::new("create directory", &directory, source))?;
        }
        let temporary = directory.join(format!(
            ".{}.{}-{}{TEMPORARY_SUFFIX}",
            file_name.to_string_lossy(),
            std::process::id(),
            TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        assert!(is_temporary(&temporary), "a temporary name must be recognisable: {}", temporary.display());
        let result = self.write_then_install(&temporary, path, source);
        if result.is_err() || self.existing == Existing::Keep {
            // After a rename the temporary name is gone; after a hard link (or a failure) it is
            // still there and only clutter now. Failing to remove it loses nothing.
            let _ = fs::remove_file(&temporary);
        }
        let written = result?;
        step(Step::Installed);
        sync_directory(&directory)?;
        step(Step::DirectorySynced);
        Ok(written)
    }

    fn write_then_install(
        &self,
        temporary: &Path,
        path: &Path,
        source: &mut dyn io::Read,
    ) -> Result<u64, Error> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.mode)
            .open(temporary)
            .map_err(|source| Error::new("create", temporary, source))?;
        step(Step::TemporaryCreated);
        let written = copy(source, &mut file, temporary)?;
        step(Step::TemporaryWritten);
        sync_file(&file, temporary)?;
        drop(file);
        step(Step::TemporarySynced);
        match self.existing {
            Existing::Replace => {
                fs::rename(temporary, path).map_err(|source| Error::new("rename into place", path, source))
            }
            Existing::Keep => {
                fs::hard_link(temporary, path).map_err(|source| Error::new("create", path, source))
            }
        }
        .map(|()| written)
    }
}

/// Bytes moved from a source to a temporary file at a time.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Copies `source` to its end into `file`; a read error is `read source`, a write error `write`.
fn copy(source: &mut dyn io::Read, file: &mut File, temporary: &Path) -> Result<u64, Error> {
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut written = 0u64;
    loop {
        let read = match source.read(&mut buffer) {
            Ok(0) => return Ok(written),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(Error::new("read source", temporary, error)),
        };
        file.write_all(&buffer[..read]).map_err(|source| Error::new("write", temporary, source))?;
        written += read as u64;
    }
}

/// Writes `bytes` to `path` durably, replacing what is there (`Options::default()`).
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    Options::default().write(path, bytes)
}

/// Fsyncs a file a caller wrote itself (`path` names it in the error).
pub fn sync_file(file: &File, path: &Path) -> Result<(), Error> {
    file.sync_all().map_err(|source| Error::new("fsync", path, source))
}

/// Renames a complete, already fsynced `temporary` to `path` and fsyncs `path`'s directory:
/// the second half of a durable write for writers that stream into their own hidden file.
pub fn rename_into_place(temporary: &Path, path: &Path) -> Result<(), Error> {
    fs::rename(temporary, path).map_err(|source| Error::new("rename into place", path, source))?;
    step(Step::Installed);
    sync_directory(&parent_directory(path))?;
    step(Step::DirectorySynced);
    Ok(())
}

/// Fsyncs a directory, so the names created, renamed or removed in it survive a power cut.
pub fn sync_directory(directory: &Path) -> Result<(), Error> {
    File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| Error::new("fsync directory", directory, source))
}

/// The directory holding `path`; "." for a bare file name.
pub fn parent_directory(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `path` names a temporary file this crate creates (hidden, ending in `.partial`): what
/// an interrupted write leaves, safe to remove when nothing is writing.
pub fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with('.') && name.ends_with(TEMPORARY_SUFFIX))
}

/// The steps of a durable write, in order; the crash tests stop a child process after each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum Step {
    TemporaryCreated,
    TemporaryWritten,
    TemporarySynced,
    Installed,
    DirectorySynced,
}

#[cfg(not(test))]
fn step(_step: Step) {}

#[cfg(test)]
fn step(step: Step) {
    tests::record(step);
}

#[cfg(test)]
mod tests;
