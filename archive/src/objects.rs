//! Content-addressed objects: originals, modified inputs and model files, in the store the
//! archive's `objects.toml` names (`objects_config.rs`): local files (this module) or an object
//! store (`store.rs`). [`Objects`] is the one interface the archive and the audit use.
//!
//! Local layout: `<root>/objects/sha256/<hex 0..2>/<hex 2..4>/<64 hex>`. An object is written to a
//! hidden temporary name in its final directory and renamed; [`LocalObjects::sync`] fsyncs every
//! object written since the last call and then every directory that gained an entry, and the
//! archive calls it before any log entry that names them is written. Deferring the fsyncs to one
//! batch per flush is what makes ingest fast (one fsync per object costs a journal commit each);
//! it is safe because an object that is not yet synced is named by no entry, and a copy damaged
//! by a crash before its sync is found by the hash check of the next `put` and replaced.
//! Putting an object that exists re-hashes the file; a damaged copy is replaced (the bytes in hand
//! match the address) and reported. An object store is different: its objects are immutable and
//! a damaged one is refused, never overwritten (see `store.rs`).
//!
//! Durable, for both: [`Objects::sync`] returned. Locally that is file and directory fsynced; in
//! an object store, the PUT succeeded and a HEAD confirmed the size (`store.rs`).
//!
//! Limits: an object is at most [`OBJECT_BYTES_MAX`] bytes (one record payload); a larger file
//! under the store is refused before it is read.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use protocol::evidence::{Sha256Digest, sha256, sha256_hex};
use sha2::{Digest as _, Sha256};

use crate::objects_config::{ObjectsConfig, ObjectsKind, ObjectsRecord};

/// Above this many objects to sync at once, one `syncfs` replaces their fsyncs.
pub const OBJECT_FSYNCS_PER_SYNC_MAX: usize = 16;

/// Largest object: objects arrive inside one record.
pub const OBJECT_BYTES_MAX: u64 = protocol::RECORD_PAYLOAD_BYTES_MAX as u64;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("object {sha256} is missing ({location})")]
    Missing { sha256: String, location: String },
    #[error("object {sha256} has {bytes} bytes, above the limit of {OBJECT_BYTES_MAX}")]
    TooLarge { sha256: String, bytes: u64 },
    #[error("object {sha256} does not match its address: its bytes hash to {actual}")]
    Mismatch { sha256: String, actual: String },
    /// A request to the object store failed (after its retries).
    #[error("object {sha256} at {location}: {reason}")]
    Store { sha256: String, location: String, reason: String },
    /// The store holds other bytes under the object's key; they are left alone.
    #[error("object {sha256} at {location}: {reason}")]
    Conflict { sha256: String, location: String, reason: String },
    /// The store cannot be set up: config, credentials, `objects.toml`.
    #[error("object store: {0}")]
    Config(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ObjectError + '_ {
    move |source| ObjectError::Io { path: path.to_path_buf(), source }
}

/// What `put` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Written,
    /// Already there with the right bytes.
    Existing,
    /// Was there with the wrong bytes and has been replaced (local objects only).
    Repaired,
    /// Held for the next sync, which uploads it (object stores).
    Queued,
}

/// The path of `digest` under the archive root `root`.
pub fn object_path(root: &Path, digest: &Sha256Digest) -> PathBuf {
    let hex = sha256_hex(digest);
    root.join("objects").join("sha256").join(&hex[..2]).join(&hex[2..4]).join(hex)
}

/// Hashes the object file of `digest` and checks it matches; returns its size.
pub fn check_object(root: &Path, digest: &Sha256Digest) -> Result<u64, ObjectError> {
    let path = object_path(root, digest);
    let hex = sha256_hex(digest);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(ObjectError::Missing { sha256: hex, location: path.display().to_string() });
        }
        Err(error) => return Err(ObjectError::Io { path, source: error }),
    };
    let bytes = file.metadata().map_err(io_error(&path))?.len();
    if bytes > OBJECT_BYTES_MAX {
        return Err(ObjectError::TooLarge { sha256: hex, bytes });
    }
    let mut hasher = Sha256::new();
    let mut reader = io::BufReader::new(file).take(OBJECT_BYTES_MAX + 1);
    io::copy(&mut reader, &mut hasher).map_err(io_error(&path))?;
    let actual: Sha256Digest = hasher.finalize().into();
    if actual != *digest {
        return Err(ObjectError::Mismatch { sha256: hex, actual: sha256_hex(&actual) });
    }
    Ok(bytes)
}

/// Reads the object of `digest`, checked against its address.
pub fn read_object(root: &Path, digest: &Sha256Digest) -> Result<Vec<u8>, ObjectError> {
    let path = object_path(root, digest);
    let hex = sha256_hex(digest);
    let bytes = fs::read(&path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => {
            ObjectError::Missing { sha256: hex.clone(), location: path.display().to_string() }
        }
        _ => ObjectError::Io { path: path.clone(), source: error },
    })?;
    let actual = sha256(&bytes);
    if actual != *digest {
        return Err(ObjectError::Mismatch { sha256: hex, actual: sha256_hex(&actual) });
    }
    Ok(bytes)
}

/// Writes local objects; remembers directories to fsync before the log names what they hold.
#[derive(Debug)]
pub struct LocalObjects {
    root: PathBuf,
    unsynced_files: Vec<PathBuf>,
    unsynced_directories: BTreeSet<PathBuf>,
}

impl LocalObjects {
    pub fn new(root: &Path) -> LocalObjects {
        LocalObjects {
            root: root.to_path_buf(),
            unsynced_files: Vec::new(),
            unsynced_directories: BTreeSet::new(),
        }
    }

    /// Stores `bytes` under `digest`, which must be their sha256.
    pub fn put(&mut self, digest: &Sha256Digest, bytes: &[u8]) -> Result<PutOutcome, ObjectError> {
        assert_eq!(sha256(bytes), *digest, "an object is stored under its own sha256");
        assert!(bytes.len() as u64 <= OBJECT_BYTES_MAX);
        let path = object_path(&self.root, digest);
        let outcome = match check_object(&self.root, digest) {
            Ok(_) => return Ok(PutOutcome::Existing),
            Err(ObjectError::Missing { .. }) => PutOutcome::Written,
            Err(error @ (ObjectError::Mismatch { .. } | ObjectError::TooLarge { .. })) => {
                tracing::warn!(path = %path.display(), %error, "replacing a damaged object with the bytes of its address");
                PutOutcome::Repaired
            }
            Err(error) => return Err(error),
        };
        let directory = path.parent().expect("objects live in a directory").to_path_buf();
        if !directory.exists() {
            // Every directory on the way that is new must reach the disk too.
            let mut ancestor = directory.clone();
            while !ancestor.exists() && ancestor.starts_with(&self.root) {
                self.unsynced_directories.insert(ancestor.clone());
                ancestor = ancestor.parent().expect("inside the root").to_path_buf();
            }
            self.unsynced_directories.insert(ancestor);
            fs::create_dir_all(&directory).map_err(io_error(&directory))?;
        }
        let temporary = directory.join(format!(".{}.tmp", sha256_hex(digest)));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(io_error(&temporary))?;
        file.write_all(bytes).map_err(io_error(&temporary))?;
        drop(file);
        fs::rename(&temporary, &path).map_err(io_error(&path))?;
        self.unsynced_files.push(path);
        self.unsynced_directories.insert(directory);
        Ok(outcome)
    }

    /// Fsyncs every object written since the last call, then every directory that gained one.
    pub fn sync(&mut self) -> Result<(), ObjectError> {
        if self.unsynced_files.len() + self.unsynced_directories.len() > OBJECT_FSYNCS_PER_SYNC_MAX {
            // One syncfs writes back the whole file system, data and metadata: one journal
            // commit instead of one per object and directory. It also writes back others' dirty
            // data on that file system, which is cheaper than hundreds of commits for anything
            // but a very busy disk.
            let handle = File::open(&self.root).map_err(io_error(&self.root))?;
            // SAFETY: syncfs on a file descriptor we own; no memory is passed.
            if unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&handle)) } != 0 {
                return Err(ObjectError::Io { path: self.root.clone(), source: io::Error::last_os_error() });
            }
        } else {
            for path in &self.unsynced_files {
                File::open(path).and_then(|file| file.sync_all()).map_err(io_error(path))?;
            }
            // Deepest first, so a new directory is durable before the entry naming it in its
            // parent.
            for directory in self.unsynced_directories.iter().rev() {
                durable::sync_directory(directory).map_err(|error| io_error(directory)(error.source))?;
            }
        }
        self.unsynced_files.clear();
        self.unsynced_directories.clear();
        Ok(())
    }
}

enum Backend {
    Local(LocalObjects),
    Store(Box<crate::store::StoreObjects>),
}

/// The archive's objects, wherever `objects.toml` says they are.
pub struct Objects {
    root: PathBuf,
    backend: Backend,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Local(local) => local.fmt(formatter),
            Backend::Store(store) => store.fmt(formatter),
        }
    }
}

impl Objects {
    /// Objects under `<root>/objects/`.
    pub fn local(root: &Path) -> Objects {
        Objects { root: root.to_path_buf(), backend: Backend::Local(LocalObjects::new(root)) }
    }

    /// The store `config` names; an S3 store takes its credentials from `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`. Makes no request.
    pub fn connect(root: &Path, config: &ObjectsConfig) -> Result<Objects, ObjectError> {
        match config.kind {
            ObjectsKind::Local => Ok(Objects::local(root)),
            ObjectsKind::S3 => Ok(Objects {
                root: root.to_path_buf(),
                backend: Backend::Store(Box::new(crate::store::StoreObjects::connect_s3(config)?)),
            }),
        }
    }

    /// The store the archive at `root` records in `objects.toml` (local when it has none), with
    /// the default limits: what the audit commands read.
    pub fn for_audit(root: &Path) -> Result<Objects, ObjectError> {
        let record = ObjectsRecord::read_or_local(root).map_err(ObjectError::Config)?;
        Objects::connect(root, &ObjectsConfig::from_record(&record))
    }

    /// Objects in any `object_store` store under `prefix` (`object_store::memory::InMemory` in
    /// tests), with `config`'s upload limits; locations read `<base_url>/<key>`.
    pub fn from_store(
        root: &Path,
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        base_url: &str,
        prefix: &str,
        config: &ObjectsConfig,
    ) -> Result<Objects, ObjectError> {
        let store = crate::store::StoreObjects::new(store, base_url, prefix, config)?;
        Ok(Objects { root: root.to_path_buf(), backend: Backend::Store(Box::new(store)) })
    }

    /// Stores `bytes` under `digest`, which must be their sha256. Durable only after
    /// [`Objects::sync`].
    pub fn put(&mut self, digest: &Sha256Digest, bytes: &[u8]) -> Result<PutOutcome, ObjectError> {
        assert_eq!(sha256(bytes), *digest, "an object is stored under its own sha256");
        assert!(bytes.len() as u64 <= OBJECT_BYTES_MAX);
        match &mut self.backend {
            Backend::Local(local) => local.put(digest, bytes),
            Backend::Store(store) => store.put(digest, bytes),
        }
    }

    /// Makes every object put since the last call durable.
    pub fn sync(&mut self) -> Result<(), ObjectError> {
        match &mut self.backend {
            Backend::Local(local) => local.sync(),
            Backend::Store(store) => store.sync().map(|_| ()),
        }
    }

    /// Reads the object and checks it hashes to `digest`; returns its size.
    pub fn check(&self, digest: &Sha256Digest) -> Result<u64, ObjectError> {
        match &self.backend {
            Backend::Local(_) => check_object(&self.root, digest),
            Backend::Store(store) => store.check(digest),
        }
    }

    /// Reads the object, checked against `digest`.
    pub fn read(&self, digest: &Sha256Digest) -> Result<Vec<u8>, ObjectError> {
        match &self.backend {
            Backend::Local(_) => read_object(&self.root, digest),
            Backend::Store(store) => store.read(digest),
        }
    }

    /// Where the object is, for people: a path or a URL.
    pub fn location(&self, digest: &Sha256Digest) -> String {
        match &self.backend {
            Backend::Local(_) => object_path(&self.root, digest).display().to_string(),
            Backend::Store(store) => store.location(digest),
        }
    }
}

/// Checks that `config` names the store the archive at `root` records in `objects.toml` (an
/// archive without one whose log has entries, `has_entries`, predates it and keeps local
/// objects). Returns the recorded store, `None` for a new archive. Writes nothing.
pub fn check_recorded(
    root: &Path,
    config: &ObjectsConfig,
    has_entries: bool,
) -> Result<Option<ObjectsRecord>, ObjectError> {
    let configured = config.record();
    let recorded = match ObjectsRecord::read(root).map_err(ObjectError::Config)? {
        Some(recorded) => recorded,
        None if has_entries => ObjectsRecord::local(),
        None => return Ok(None),
    };
    if recorded != configured {
        let path = crate::objects_config::objects_record_path(root);
        return Err(ObjectError::Config(format!(
            "the archive at {} keeps its objects in {} ({}), but the config names {}; point \
             [archive.objects] at the archive's store (or move the objects and edit {})",
            root.display(),
            recorded.describe(),
            path.display(),
            configured.describe(),
            path.display()
        )));
    }
    Ok(Some(recorded))
}

/// At the archive's open, under its lock and before any entry is written: [`check_recorded`],
/// then records the store in `objects.toml` when the archive has none yet.
pub fn record_or_check(root: &Path, config: &ObjectsConfig, has_entries: bool) -> Result<(), ObjectError> {
    let path = crate::objects_config::objects_record_path(root);
    let record = check_recorded(root, config, has_entries)?.unwrap_or_else(|| config.record());
    if !path.exists() {
        record.write(root).map_err(ObjectError::Config)?;
        tracing::info!(path = %path.display(), objects = %record.describe(), "archive objects store recorded");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_is_idempotent_and_repairs() {
        let directory = tempfile::tempdir().unwrap();
        let mut store = LocalObjects::new(directory.path());
        let bytes = b"original image".to_vec();
        let digest = sha256(&bytes);
        let check = |expected: PutOutcome, store: &mut LocalObjects| {
            assert_eq!(store.put(&digest, &bytes).unwrap(), expected);
            store.sync().unwrap();
            assert_eq!(read_object(directory.path(), &digest).unwrap(), bytes);
        };
        check(PutOutcome::Written, &mut store);
        check(PutOutcome::Existing, &mut store);
        let path = object_path(directory.path(), &digest);
        assert!(path.ends_with(format!(
            "objects/sha256/{0}/{1}/{2}",
            &sha256_hex(&digest)[..2],
            &sha256_hex(&digest)[2..4],
            sha256_hex(&digest)
        )));
        fs::write(&path, b"tampered").unwrap();
        assert!(matches!(check_object(directory.path(), &digest), Err(ObjectError::Mismatch { .. })));
        check(PutOutcome::Repaired, &mut store);
        fs::remove_file(&path).unwrap();
        assert!(matches!(check_object(directory.path(), &digest), Err(ObjectError::Missing { .. })));
    }
}
