//! Small, careful file operations shared by the CA, issued certificates, the revocation list and
//! the core sink's replication (its watermarks and directory replicas).
//!
//! Every write goes to a hidden temporary file in the same directory, is fsynced, then renamed
//! (or hard-linked, when an existing file must not be replaced) into place, and the directory is
//! fsynced: a reader sees the old file or the new one, never a torn one, even across a power
//! loss. Every read is bounded by a named maximum before anything is allocated.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::FleetError;

/// Mode of private key files: readable and writable by the owner only.
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode of certificates and the revocation list (before the umask): world-readable.
pub const PUBLIC_MODE: u32 = 0o644;

/// What to do when the destination already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    Replace,
    /// Fail with `ErrorKind::AlreadyExists`, atomically (a hard link never replaces its target).
    Keep,
}

/// Distinguishes temporary files of concurrent writers within one process.
static TEMPORARY_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(crate) fn io_error(operation: &'static str, path: &Path, source: std::io::Error) -> FleetError {
    FleetError::Io { operation, path: path.to_path_buf(), source }
}

pub(crate) fn create_directory(directory: &Path) -> Result<(), FleetError> {
    fs::create_dir_all(directory).map_err(|source| io_error("create directory", directory, source))
}

/// The directory holding `path`; "." for a bare file name.
pub(crate) fn parent_directory(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to `path` atomically with `mode` (the process umask may clear bits further).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> Result<(), FleetError> {
    let directory = parent_directory(path);
    let file_name = path.file_name().ok_or_else(|| {
        io_error("write", path, std::io::Error::new(ErrorKind::InvalidInput, "path has no file name"))
    })?;
    let temporary = directory.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_then_install(&temporary, path, bytes, mode, existing);
    if result.is_err() || existing == Existing::Keep {
        // After a rename the temporary name is gone; after a hard link (or a failure) it is
        // still there and only clutter now. Failing to remove it loses nothing.
        let _ = fs::remove_file(&temporary);
    }
    result?;
    sync_directory(&directory)
}

fn write_then_install(
    temporary: &Path,
    path: &Path,
    bytes: &[u8],
    mode: u32,
    existing: Existing,
) -> Result<(), FleetError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(temporary)
        .map_err(|source| io_error("create", temporary, source))?;
    file.write_all(bytes).map_err(|source| io_error("write", temporary, source))?;
    file.sync_all().map_err(|source| io_error("fsync", temporary, source))?;
    drop(file);
    match existing {
        Existing::Replace => {
            fs::rename(temporary, path).map_err(|source| io_error("rename into place", path, source))
        }
        Existing::Keep => fs::hard_link(temporary, path).map_err(|source| io_error("create", path, source)),
    }
}

pub fn sync_directory(directory: &Path) -> Result<(), FleetError> {
    File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| io_error("fsync directory", directory, source))
}

/// Reads a whole file of at most `bytes_max` bytes; `Ok(None)` if it does not exist.
pub fn read_bounded(path: &Path, bytes_max: u64) -> Result<Option<Vec<u8>>, FleetError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error("open", path, source)),
    };
    let length = file.metadata().map_err(|source| io_error("stat", path, source))?.len();
    if length > bytes_max {
        return Err(FleetError::FileTooLarge { path: path.to_path_buf(), length, max: bytes_max });
    }
    let mut bytes = Vec::with_capacity(length as usize);
    // take() guards against a file that grows between the stat and the read.
    file.take(bytes_max + 1).read_to_end(&mut bytes).map_err(|source| io_error("read", path, source))?;
    if bytes.len() as u64 > bytes_max {
        return Err(FleetError::FileTooLarge {
            path: path.to_path_buf(),
            length: bytes.len() as u64,
            max: bytes_max,
        });
    }
    Ok(Some(bytes))
}

/// Reads a text file that must exist, naming `hint` (what creates it) when it does not.
pub(crate) fn read_required_text(path: &Path, bytes_max: u64, hint: &str) -> Result<String, FleetError> {
    let bytes = read_bounded(path, bytes_max)?.ok_or_else(|| {
        io_error("read", path, std::io::Error::new(ErrorKind::NotFound, format!("file not found ({hint})")))
    })?;
    String::from_utf8(bytes).map_err(|error| {
        io_error(
            "read",
            path,
            std::io::Error::new(ErrorKind::InvalidData, format!("not UTF-8 text: {error}")),
        )
    })
}

/// Warns when a private key file is readable by anyone but its owner: the key still works, but
/// the operator should know.
pub(crate) fn warn_if_exposed(path: &Path) {
    if let Ok(metadata) = fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "private key file is accessible to group or others (run chmod 600 on it)"
            );
        }
    }
}
