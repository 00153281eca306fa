//! The revocation list: a text file of revoked device ids.
//!
//! Format: UTF-8, one device id per line; `#` starts a comment that runs to the end of the line
//! (device ids cannot contain `#`); blank lines and surrounding whitespace are ignored; a
//! repeated id is harmless. Any other line is an error naming the file and line, because a typo
//! there would otherwise leave a device the operator meant to revoke able to connect. At most
//! `REVOCATION_FILE_BYTES_MAX` (16 MiB, about 120 000 ids of the longest kind).
//!
//! The file is written only by [`RevocationList::revoke`], atomically (temporary file, fsync,
//! rename, fsync of the directory), so a reader sees the old list or the new one. Two processes
//! revoking at the same moment can lose one of the two additions: revoke from one place (the
//! operator's tool) at a time.
//!
//! A [`RevocationList`] keeps the parsed set in memory behind an `Arc`; its clones (the TLS
//! verifier's and the sink's sessions') share it, so one `reload_if_changed` updates them all.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use crate::device_id::device_id_problem;
use crate::files::{self, PUBLIC_MODE};
use crate::{FleetError, validate_device_id};

/// Longest revocation file this crate reads.
pub const REVOCATION_FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// File systems stamp modification times with a coarse clock (a jiffy, 1 to 10 ms, on Linux; 2 s
/// on FAT), so two same-length writes in quick succession can leave identical stamps. A file
/// modified less than this long before it was read is read again at the next reload (the "racy
/// clean" rule of git's index).
const MODIFICATION_TIME_MARGIN: Duration = Duration::from_secs(2);

/// The set of revoked device ids, read from a file and re-read when it changes.
#[derive(Clone, Debug)]
pub struct RevocationList {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    state: RwLock<State>,
}

#[derive(Debug)]
struct State {
    revoked: BTreeSet<String>,
    /// What the file looked like when `revoked` was read; `None` if it did not exist.
    stamp: Option<FileStamp>,
    /// The file had been modified within `MODIFICATION_TIME_MARGIN` of that read, so it may have
    /// changed again since without its stamp changing: the next reload reads it regardless.
    racy: bool,
}

/// Enough of a file's metadata to notice a change: `revoke` replaces the file (new inode), and
/// an editor that rewrites it in place changes its length or modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: SystemTime,
    length: u64,
    device: u64,
    inode: u64,
}

impl RevocationList {
    /// Reads the list at `path`; a missing file is an empty list (no device revoked yet).
    pub fn open(path: &Path) -> Result<RevocationList, FleetError> {
        let stamp = stamp(path)?;
        let revoked = read(path)?.unwrap_or_default();
        let racy = is_racy(stamp);
        Ok(RevocationList {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                state: RwLock::new(State { revoked, stamp, racy }),
            }),
        })
    }

    /// Adds `device_id` to the file at `path` (created if missing), atomically; does nothing if
    /// it is already there. Comments and other lines are kept as they are.
    pub fn revoke(path: &Path, device_id: &str) -> Result<(), FleetError> {
        validate_device_id(device_id)?;
        let text = match files::read_bounded(path, REVOCATION_FILE_BYTES_MAX)? {
            Some(bytes) => to_text(path, bytes)?,
            None => String::new(),
        };
        if parse(path, &text)?.contains(device_id) {
            return Ok(());
        }
        let mut updated = text;
        if !updated.is_empty() && !updated.ends_with('\n') {
            updated.push('\n');
        }
        updated.push_str(device_id);
        updated.push('\n');
        if updated.len() as u64 > REVOCATION_FILE_BYTES_MAX {
            return Err(FleetError::FileTooLarge {
                path: path.to_path_buf(),
                length: updated.len() as u64,
                max: REVOCATION_FILE_BYTES_MAX,
            });
        }
        let mode = match fs::metadata(path) {
            Ok(metadata) => metadata.permissions().mode() & 0o777,
            Err(_) => PUBLIC_MODE,
        };
        files::create_directory(&durable::parent_directory(path))?;
        files::write_replacing(path, updated.as_bytes(), mode)?;
        tracing::info!(path = %path.display(), device_id, "revoked device");
        Ok(())
    }

    /// The file this list reads.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn is_revoked(&self, device_id: &str) -> bool {
        self.shared.state.read().unwrap_or_else(PoisonError::into_inner).revoked.contains(device_id)
    }

    /// Re-reads the file if its modification time, length or identity changed (or it had been
    /// modified just before the last read, see `MODIFICATION_TIME_MARGIN`); returns whether the
    /// set of revoked ids changed. On an error the previous set stays in force.
    pub fn reload_if_changed(&self) -> Result<bool, FleetError> {
        let path = &self.shared.path;
        // The stamp is taken before reading: if the file changes during the read, the next call
        // sees a stamp different from the stored one and reads again.
        let stamp = stamp(path)?;
        {
            let state = self.shared.state.read().unwrap_or_else(PoisonError::into_inner);
            if stamp == state.stamp && !state.racy {
                return Ok(false);
            }
        }
        let revoked = read(path)?.unwrap_or_default();
        let mut state = self.shared.state.write().unwrap_or_else(PoisonError::into_inner);
        let changed = state.revoked != revoked;
        state.stamp = stamp;
        state.racy = is_racy(stamp);
        if changed {
            tracing::info!(path = %path.display(), revoked_count = revoked.len(), "revocation list reloaded");
            state.revoked = revoked;
        }
        Ok(changed)
    }

    /// A copy of the revoked ids.
    pub fn revoked(&self) -> BTreeSet<String> {
        self.shared.state.read().unwrap_or_else(PoisonError::into_inner).revoked.clone()
    }
}

fn stamp(path: &Path) -> Result<Option<FileStamp>, FleetError> {
    match fs::metadata(path) {
        Ok(metadata) => Ok(Some(FileStamp {
            modified: metadata.modified().map_err(|source| files::io_error("stat", path, source))?,
            length: metadata.len(),
            device: metadata.dev(),
            inode: metadata.ino(),
        })),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(files::io_error("stat", path, source)),
    }
}

/// Whether a file with this stamp, read now, could change again without its stamp changing.
fn is_racy(stamp: Option<FileStamp>) -> bool {
    stamp.is_some_and(|stamp| match SystemTime::now().duration_since(stamp.modified) {
        Ok(age) => age < MODIFICATION_TIME_MARGIN,
        // Modified "in the future" (the clock was stepped back): cannot tell, so keep looking.
        Err(_) => true,
    })
}

fn read(path: &Path) -> Result<Option<BTreeSet<String>>, FleetError> {
    match files::read_bounded(path, REVOCATION_FILE_BYTES_MAX)? {
        Some(bytes) => Ok(Some(parse(path, &to_text(path, bytes)?)?)),
        None => Ok(None),
    }
}

fn to_text(path: &Path, bytes: Vec<u8>) -> Result<String, FleetError> {
    String::from_utf8(bytes).map_err(|error| {
        files::io_error(
            "read",
            path,
            std::io::Error::new(ErrorKind::InvalidData, format!("not UTF-8 text: {error}")),
        )
    })
}

/// The ids in a revocation file's text; `path` only names the file in errors.
fn parse(path: &Path, text: &str) -> Result<BTreeSet<String>, FleetError> {
    let mut revoked = BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.split_once('#').map_or(line, |(before, _)| before).trim();
        if entry.is_empty() {
            continue;
        }
        if let Some(problem) = device_id_problem(entry) {
            return Err(FleetError::RevocationLine { path: path.to_path_buf(), line: index + 1, problem });
        }
        revoked.insert(entry.to_owned());
    }
    Ok(revoked)
}
