//! The revocation list: a text file of revoked device ids and revoked keys.
//!
//! Format: UTF-8, one entry per line: a device id (every certificate of that id is refused), or
//! `key:` and the fingerprint of one key (SHA-256 of its SubjectPublicKeyInfo, 64 lowercase hex
//! digits: every certificate for that key is refused, whatever its id; `fleet rebind` writes these
//! so a device id can be bound to a new key while the old key's certificates stay refused); `#` starts a comment that runs to the end of the line
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

/// What starts a revoked key's line; device ids cannot contain `:`, so the two never collide.
const KEY_ENTRY_PREFIX: &str = "key:";

/// Whether `text` is a key fingerprint: 64 lowercase hex digits (the onboarding topics' shape).
pub fn is_key_fingerprint(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

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
        add_entry(path, device_id)
    }

    /// Adds the key with fingerprint `key_sha256` (see the module doc) to the file at `path`,
    /// atomically; does nothing if it is already there.
    pub fn revoke_key(path: &Path, key_sha256: &str) -> Result<(), FleetError> {
        if !is_key_fingerprint(key_sha256) {
            return Err(FleetError::RevocationKey { path: path.to_path_buf(), line: 0 });
        }
        add_entry(path, &format!("{KEY_ENTRY_PREFIX}{key_sha256}"))
    }

    /// The file this list reads.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether the key with fingerprint `key_sha256` is revoked (a `key:` entry).
    pub fn is_key_revoked(&self, key_sha256: &str) -> bool {
        self.is_revoked(&format!("{KEY_ENTRY_PREFIX}{key_sha256}"))
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

/// Appends `entry` (already checked) to the file at `path` unless it is there; atomic.
fn add_entry(path: &Path, entry: &str) -> Result<(), FleetError> {
    let text = match files::read_bounded(path, REVOCATION_FILE_BYTES_MAX)? {
        Some(bytes) => to_text(path, bytes)?,
        None => String::new(),
    };
    if parse(path, &text)?.contains(entry) {
        return Ok(());
    }
    let mut updated = text;
    if !updated.is_empty() && !updated.ends_with('\n') {
        updated.push('\n');
    }
    updated.push_str(entry);
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
    tracing::info!(path = %path.display(), entry, "revoked");
    Ok(())
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
        if let Some(key) = entry.strip_prefix(KEY_ENTRY_PREFIX) {
            if !is_key_fingerprint(key) {
                return Err(FleetError::RevocationKey { path: path.to_path_buf(), line: index + 1 });
            }
            revoked.insert(entry.to_owned());
            continue;
        }
        if let Some(problem) = device_id_problem(entry) {
            return Err(FleetError::RevocationLine { path: path.to_path_buf(), line: index + 1, problem });
        }
        revoked.insert(entry.to_owned());
    }
    Ok(revoked)
}
