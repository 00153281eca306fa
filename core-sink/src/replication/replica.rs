//! Where replicas live: a directory tree (a second file system) or an S3-compatible bucket, behind
//! one synchronous [`Replica`] interface of keys (`/`-separated, relative to the replica's root).
//!
//! Directory: a key is a file under the root; every write goes to a hidden temporary file, is
//! fsynced and then renamed (overwrite) or hard-linked (create-only) into place, and the directory
//! is fsynced (`durable`), so no partial object is ever visible under its
//! name, even after a SIGKILL or a power cut; names starting with '.' are never keys, so the
//! temporary files of a killed run are not listed. S3: `PutMode::Create` (`If-None-Match: *`) for
//! create-only writes, uploads carry `x-amz-checksum-sha256` (the server checks what landed) and a
//! HEAD after each PUT confirms the size. Both check what landed: a directory write is read back
//! and hashed.
//!
//! Limits: one object is at most the caller's `bytes_max` in memory; a listing at most
//! `LIST_KEYS_MAX` keys.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use sha2::{Digest as _, Sha256};

/// Most keys one listing returns (the archive's log segments and objects of one replica).
pub const LIST_KEYS_MAX: usize = 1 << 22;
/// Longest key.
pub const KEY_BYTES_MAX: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Never replaces an existing key (immutable objects: shards, archive objects, log segments).
    Create,
    /// Replaces atomically (manifests, and repairs of damaged objects).
    Overwrite,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Written,
    /// `Create` found the key taken; nothing was written.
    AlreadyThere,
}

#[derive(Debug, thiserror::Error)]
#[error("replica {replica}: {operation} {key}: {reason}")]
pub struct ReplicaError {
    pub replica: String,
    pub operation: &'static str,
    pub key: String,
    pub reason: String,
}

/// A key is `/`-separated components of printable ASCII without spaces, none empty, none
/// starting with '.' (so no `..`, and temporary files are never keys).
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(format!("key of {} bytes: expected 1..={KEY_BYTES_MAX}", key.len()));
    }
    for component in key.split('/') {
        if component.is_empty() || component.starts_with('.') {
            return Err(format!("key {key:?}: empty component or one starting with '.'"));
        }
        if !component.bytes().all(|byte| byte.is_ascii_graphic() && byte != b'\\') {
            return Err(format!("key {key:?}: only printable ASCII without spaces"));
        }
    }
    Ok(())
}

/// Hashes what passes through, and refuses more or fewer than `length` bytes (a source that
/// changed under the copy).
struct HashingReader<'a> {
    inner: &'a mut dyn Read,
    hasher: Sha256,
    bytes: u64,
    length: u64,
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.bytes += read as u64;
        if self.bytes > self.length {
            return Err(std::io::Error::other(format!("more than the {} bytes expected", self.length)));
        }
        if read == 0 && !buffer.is_empty() && self.bytes < self.length {
            return Err(std::io::Error::other(format!(
                "ended after {} bytes, {} expected",
                self.bytes, self.length
            )));
        }
        self.hasher.update(&buffer[..read]);
        Ok(read)
    }
}

/// One replica. Every method is synchronous and bounded by the backend's timeouts.
pub trait Replica: Send {
    /// `dir:/path` or `s3://bucket/prefix`, for logs and errors.
    fn describe(&self) -> &str;
    /// The size of the object at `key`, `None` when there is none.
    fn head(&self, key: &str) -> Result<Option<u64>, ReplicaError>;
    /// The object at `key` (at most `bytes_max` bytes, else an error), `None` when there is none.
    fn get(&self, key: &str, bytes_max: u64) -> Result<Option<Vec<u8>>, ReplicaError>;
    /// Writes `bytes` at `key`; returns after what landed was checked.
    fn put(&self, key: &str, bytes: &[u8], mode: WriteMode) -> Result<PutOutcome, ReplicaError>;
    /// Every key under `prefix` (which ends with '/') with its size, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ReplicaError>;

    /// Writes the `length` bytes `source` yields (read to its end: a source may refuse there,
    /// e.g. when its bytes do not hash as expected, and then nothing is written) at `key`,
    /// streamed; returns after what landed was checked. No partial object is visible under `key`
    /// at any time. The directory and S3 replicas hold at most a buffer (a directory) or one part
    /// (a bucket) in memory; this default, for wrappers, reads the whole source and calls `put`.
    fn put_stream(
        &self,
        key: &str,
        length: u64,
        source: &mut dyn Read,
        mode: WriteMode,
    ) -> Result<PutOutcome, ReplicaError> {
        let mut bytes = Vec::new();
        source.read_to_end(&mut bytes).map_err(|error| self.stream_error(key, &error))?;
        if bytes.len() as u64 != length {
            return Err(self.stream_error(key, &format!("{} bytes, {length} expected", bytes.len())));
        }
        self.put(key, &bytes, mode)
    }

    /// The error of a source that failed while streamed to `key`.
    fn stream_error(&self, key: &str, reason: &dyn std::fmt::Display) -> ReplicaError {
        ReplicaError {
            replica: self.describe().to_string(),
            operation: "read source for",
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// An error of this replica, naming the operation and the key.
    fn error(&self, operation: &'static str, key: &str, reason: impl std::fmt::Display) -> ReplicaError
    where
        Self: Sized,
    {
        ReplicaError {
            replica: self.describe().to_string(),
            operation,
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A replica in a directory tree.
pub struct DirectoryReplica {
    root: PathBuf,
    description: String,
}

impl DirectoryReplica {
    pub fn new(root: &Path) -> DirectoryReplica {
        DirectoryReplica { root: root.to_path_buf(), description: format!("dir:{}", root.display()) }
    }

    fn path(&self, operation: &'static str, key: &str) -> Result<PathBuf, ReplicaError> {
        validate_key(key).map_err(|reason| self.error(operation, key, reason))?;
        Ok(self.root.join(key))
    }

    /// Creates the directories above `path` and fsyncs the parent of each one created, so a new
    /// directory survives a power cut with the object written into it.
    fn create_parents(&self, key: &str, path: &Path) -> Result<(), ReplicaError> {
        let directory = path.parent().expect("keys have a file name");
        let mut missing = Vec::new();
        let mut probe = directory;
        while !probe.exists() {
            missing.push(probe.to_path_buf());
            match probe.parent() {
                Some(parent) => probe = parent,
                None => break,
            }
        }
        std::fs::create_dir_all(directory).map_err(|error| self.error("create directory", key, error))?;
        for created in missing.iter().rev() {
            let parent = created.parent().unwrap_or(Path::new("/"));
            durable::sync_directory(parent).map_err(|error| self.error("fsync directory", key, error))?;
        }
        Ok(())
    }
}

impl Replica for DirectoryReplica {
    fn describe(&self) -> &str {
        &self.description
    }

    fn head(&self, key: &str) -> Result<Option<u64>, ReplicaError> {
        let path = self.path("stat", key)?;
        match std::fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => Ok(Some(metadata.len())),
            Ok(_) => Err(self.error("stat", key, "not a regular file")),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(self.error("stat", key, error)),
        }
    }

    fn get(&self, key: &str, bytes_max: u64) -> Result<Option<Vec<u8>>, ReplicaError> {
        let path = self.path("read", key)?;
        fleet::files::read_bounded(&path, bytes_max).map_err(|error| self.error("read", key, error))
    }

    fn put(&self, key: &str, bytes: &[u8], mode: WriteMode) -> Result<PutOutcome, ReplicaError> {
        self.put_stream(key, bytes.len() as u64, &mut &bytes[..], mode)
    }

    /// Streams into a hidden temporary file, fsync, rename or hard link, directory fsync
    /// (`durable::Options::write_from`); then reads the file back in pieces and compares hashes.
    fn put_stream(
        &self,
        key: &str,
        length: u64,
        source: &mut dyn Read,
        mode: WriteMode,
    ) -> Result<PutOutcome, ReplicaError> {
        let path = self.path("write", key)?;
        if mode == WriteMode::Create && self.head(key)?.is_some() {
            return Ok(PutOutcome::AlreadyThere);
        }
        self.create_parents(key, &path)?;
        let options = durable::Options::default().mode(fleet::files::PUBLIC_MODE);
        let options = match mode {
            WriteMode::Create => options.keep_existing(),
            WriteMode::Overwrite => options,
        };
        let mut hashing = HashingReader { inner: source, hasher: Sha256::new(), bytes: 0, length };
        match options.write_from(&path, &mut hashing) {
            Ok(_) => {}
            Err(error) if mode == WriteMode::Create && error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok(PutOutcome::AlreadyThere);
            }
            Err(error) if error.operation == "read source" => {
                return Err(self.stream_error(key, &error.source));
            }
            Err(error) => return Err(self.error("write", key, error)),
        }
        // Check what landed: read back and hash, a buffer at a time.
        let written = hashing.hasher.finalize();
        let mut landed = std::fs::File::open(&path).map_err(|error| self.error("check", key, error))?;
        let mut check = HashingReader { inner: &mut landed, hasher: Sha256::new(), bytes: 0, length };
        std::io::copy(&mut check, &mut std::io::sink()).map_err(|error| self.error("check", key, error))?;
        if check.hasher.finalize() != written {
            return Err(self.error("check", key, "the bytes read back do not hash to what was written"));
        }
        Ok(PutOutcome::Written)
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ReplicaError> {
        let mut keys = Vec::new();
        let start = self.root.join(prefix.trim_end_matches('/'));
        let mut pending = vec![start];
        while let Some(directory) = pending.pop() {
            let entries = match std::fs::read_dir(&directory) {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(self.error("list", prefix, error)),
            };
            for entry in entries {
                let entry = entry.map_err(|error| self.error("list", prefix, error))?;
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let metadata = entry.metadata().map_err(|error| self.error("list", prefix, error))?;
                let path = entry.path();
                if metadata.is_dir() {
                    pending.push(path);
                } else if metadata.is_file() {
                    let relative = path.strip_prefix(&self.root).expect("under the root");
                    keys.push((relative.to_string_lossy().into_owned(), metadata.len()));
                    if keys.len() > LIST_KEYS_MAX {
                        return Err(self.error("list", prefix, format!("more than {LIST_KEYS_MAX} keys")));
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

/// A replica in an S3-compatible bucket, under `prefix`. Runs its requests on a current-thread
/// runtime of its own: the replicator is a plain thread.
pub struct S3Replica {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    description: String,
    runtime: tokio::runtime::Runtime,
    /// `put_stream`: larger objects go up in parts of this size, smaller ones in one PUT.
    part_bytes: u64,
}

/// `S3Replica`'s default part size, and the largest object it PUTs in one request: above the
/// 5 MiB that S3 requires of every part but the last.
pub const S3_PART_BYTES: u64 = 8 * 1024 * 1024;

impl S3Replica {
    /// The bucket `config` names (`kind` is taken to be `s3`).
    pub fn connect(config: &archive::ObjectsConfig) -> Result<S3Replica, String> {
        let config = archive::ObjectsConfig { kind: archive::ObjectsKind::S3, ..config.clone() };
        let store = archive::s3_client(&config).map_err(|error| error.to_string())?;
        let bucket = config.bucket.clone().unwrap_or_default();
        S3Replica::new(store, &format!("s3://{bucket}"), &config.prefix)
    }

    /// Any `object_store` store (tests; dataset bucket targets, which build their client first).
    pub fn new(store: Arc<dyn ObjectStore>, base_url: &str, prefix: &str) -> Result<S3Replica, String> {
        let prefix = prefix.trim_matches('/').to_string();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| format!("start the replica's I/O runtime: {error}"))?;
        let description =
            if prefix.is_empty() { base_url.to_string() } else { format!("{base_url}/{prefix}") };
        Ok(S3Replica { store, prefix, description, runtime, part_bytes: S3_PART_BYTES })
    }

    /// Another part size for `put_stream` (tests against a store without the 5 MiB minimum).
    pub fn with_part_bytes(self, part_bytes: u64) -> S3Replica {
        assert!(part_bytes >= 1, "parts hold at least one byte");
        S3Replica { part_bytes, ..self }
    }

    fn location(&self, key: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{key}", self.prefix))
        }
    }
}

/// What [`S3Replica::publish_file`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePublished {
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the file, computed while it was read for the upload.
    pub sha256: String,
    /// Parts uploaded.
    pub parts: u64,
    /// The key held these bytes already (a publish repeated after a lost reply); nothing new.
    pub existing: bool,
}

/// Where [`S3Replica::publish_file`] uploads before the create-only copy into place; never a
/// dataset key (readers list below `<dataset>/`).
pub const STAGING_PREFIX: &str = "_staging";

impl S3Replica {
    /// Deletes `key` (a missing key is not an error).
    pub fn delete(&self, key: &str) -> Result<(), ReplicaError> {
        validate_key(key).map_err(|reason| self.error("DELETE", key, reason))?;
        match self.runtime.block_on(self.store.delete(&self.location(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.error("DELETE", key, error)),
        }
    }

    /// Publishes the file at `path` under `key`, create-only: a multipart upload in parts of
    /// `part_bytes` (one part in memory at a time) to `_staging/<key>`, the SHA-256 computed while
    /// reading, then a create-only copy into place (`If-None-Match: *` on completion), a HEAD
    /// that must report the file's size, and the staging object deleted. A key that exists
    /// already counts as published when its bytes hash the same, and is an error otherwise
    /// (left alone). `on_part` is called with each part's size once it is uploaded.
    pub fn publish_file(
        &self,
        key: &str,
        path: &Path,
        part_bytes: u64,
        on_part: &dyn Fn(u64),
    ) -> Result<FilePublished, ReplicaError> {
        let mut file = std::fs::File::open(path)
            .map_err(|error| self.error("PUT", key, format!("open {}: {error}", path.display())))?;
        self.publish_reader(
            key,
            &mut file,
            &path.display().to_string(),
            part_bytes,
            WriteMode::Create,
            on_part,
        )
    }

    /// `publish_file` from any reader (`source` names it in errors); `WriteMode::Overwrite`
    /// replaces what is at `key` (the copy into place is unconditional), `Create` never does.
    fn publish_reader(
        &self,
        key: &str,
        file: &mut dyn Read,
        source: &str,
        part_bytes: u64,
        mode: WriteMode,
        on_part: &dyn Fn(u64),
    ) -> Result<FilePublished, ReplicaError> {
        use futures::StreamExt as _;
        assert!(part_bytes >= 1, "parts hold at least one byte");
        validate_key(key).map_err(|reason| self.error("PUT", key, reason))?;
        let staging_key = format!("{STAGING_PREFIX}/{key}");
        let (staging, location) = (self.location(&staging_key), self.location(key));
        let copy_mode = match mode {
            WriteMode::Create => object_store::CopyMode::Create,
            WriteMode::Overwrite => object_store::CopyMode::Overwrite,
        };
        self.runtime.block_on(async {
            let mut hasher = Sha256::new();
            let (mut bytes, mut parts) = (0u64, 0u64);
            let mut upload = self
                .store
                .put_multipart_opts(&staging, object_store::PutMultipartOptions::default())
                .await
                .map_err(|error| self.error("CreateMultipartUpload", &staging_key, error))?;
            let uploaded: Result<(), ReplicaError> = async {
                loop {
                    let mut part = Vec::with_capacity(part_bytes as usize);
                    (&mut *file)
                        .take(part_bytes)
                        .read_to_end(&mut part)
                        .map_err(|error| self.stream_error(key, &format!("read {source}: {error}")))?;
                    if part.is_empty() {
                        break;
                    }
                    hasher.update(&part);
                    let size = part.len() as u64;
                    upload
                        .put_part(PutPayload::from(part))
                        .await
                        .map_err(|error| self.error("UploadPart", &staging_key, error))?;
                    bytes += size;
                    parts += 1;
                    on_part(size);
                }
                upload.complete().await.map_err(|error| self.error("CompleteMultipartUpload", &staging_key, error))?;
                Ok(())
            }
            .await;
            if let Err(error) = uploaded {
                let _ = upload.abort().await;
                return Err(error);
            }
            let sha256 = crate::datasets::targets::hex(&hasher.finalize());
            let copied = self
                .store
                .copy_opts(&staging, &location, object_store::CopyOptions::new().with_mode(copy_mode))
                .await;
            let existing = match copied {
                Ok(()) => false,
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    let result =
                        self.store.get(&location).await.map_err(|error| self.error("GET", key, error))?;
                    let mut stream = result.into_stream();
                    let mut there = Sha256::new();
                    while let Some(piece) = stream.next().await {
                        there.update(piece.map_err(|error| self.error("GET", key, error))?);
                    }
                    let found = crate::datasets::targets::hex(&there.finalize());
                    if found != sha256 {
                        return Err(self.error(
                            "PUT",
                            key,
                            format!("the key exists with sha256 {found}, this file has {sha256}; published objects are never replaced"),
                        ));
                    }
                    true
                }
                Err(error) => return Err(self.error("COPY", key, error)),
            };
            // The staging object is garbage either way; one left behind (a failed DELETE) is
            // removed by the next recovery of the target.
            match self.store.delete(&staging).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(self.error("DELETE", &staging_key, error)),
            }
            let meta = self.store.head(&location).await.map_err(|error| self.error("HEAD after PUT", key, error))?;
            if meta.size != bytes {
                return Err(self.error("HEAD after PUT", key, format!("{} bytes landed, {bytes} were sent", meta.size)));
            }
            Ok(FilePublished { bytes, sha256, parts, existing })
        })
    }
}

impl Replica for S3Replica {
    fn describe(&self) -> &str {
        &self.description
    }

    fn head(&self, key: &str) -> Result<Option<u64>, ReplicaError> {
        validate_key(key).map_err(|reason| self.error("HEAD", key, reason))?;
        match self.runtime.block_on(self.store.head(&self.location(key))) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(self.error("HEAD", key, error)),
        }
    }

    fn get(&self, key: &str, bytes_max: u64) -> Result<Option<Vec<u8>>, ReplicaError> {
        validate_key(key).map_err(|reason| self.error("GET", key, reason))?;
        self.runtime.block_on(async {
            let result = match self.store.get(&self.location(key)).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(error) => return Err(self.error("GET", key, error)),
            };
            if result.meta.size > bytes_max {
                return Err(self.error(
                    "GET",
                    key,
                    format!("{} bytes, more than {bytes_max}", result.meta.size),
                ));
            }
            let bytes = result.bytes().await.map_err(|error| self.error("GET", key, error))?;
            Ok(Some(bytes.to_vec()))
        })
    }

    fn put(&self, key: &str, bytes: &[u8], mode: WriteMode) -> Result<PutOutcome, ReplicaError> {
        validate_key(key).map_err(|reason| self.error("PUT", key, reason))?;
        let location = self.location(key);
        let options = PutOptions {
            mode: match mode {
                WriteMode::Create => PutMode::Create,
                WriteMode::Overwrite => PutMode::Overwrite,
            },
            ..PutOptions::default()
        };
        self.runtime.block_on(async {
            let payload = PutPayload::from(bytes.to_vec());
            match self.store.put_opts(&location, payload, options).await {
                Ok(_) => {}
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. })
                    if mode == WriteMode::Create =>
                {
                    return Ok(PutOutcome::AlreadyThere);
                }
                Err(error) => return Err(self.error("PUT", key, error)),
            }
            let meta =
                self.store.head(&location).await.map_err(|error| self.error("HEAD after PUT", key, error))?;
            if meta.size != bytes.len() as u64 {
                return Err(self.error(
                    "HEAD after PUT",
                    key,
                    format!("{} bytes landed, {} were sent", meta.size, bytes.len()),
                ));
            }
            Ok(PutOutcome::Written)
        })
    }

    /// Up to `part_bytes`: one PUT of the bytes read into memory. Above: `publish_reader`'s
    /// multipart upload to a staging key and a copy into place (create-only for `Create`).
    fn put_stream(
        &self,
        key: &str,
        length: u64,
        source: &mut dyn Read,
        mode: WriteMode,
    ) -> Result<PutOutcome, ReplicaError> {
        let mut checked = HashingReader { inner: source, hasher: Sha256::new(), bytes: 0, length };
        if length <= self.part_bytes {
            let mut bytes = Vec::with_capacity(length as usize);
            checked.read_to_end(&mut bytes).map_err(|error| self.stream_error(key, &error))?;
            return self.put(key, &bytes, mode);
        }
        let published =
            self.publish_reader(key, &mut checked, "the source", self.part_bytes, mode, &|_| {})?;
        Ok(if published.existing { PutOutcome::AlreadyThere } else { PutOutcome::Written })
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ReplicaError> {
        use futures::StreamExt as _;
        let base = self.location(prefix.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        self.runtime.block_on(async {
            let mut stream = self.store.list(Some(&base));
            let mut keys = Vec::new();
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(|error| self.error("LIST", prefix, error))?;
                let key =
                    meta.location.as_ref().strip_prefix(&strip).unwrap_or(meta.location.as_ref()).to_string();
                keys.push((key, meta.size));
                if keys.len() > LIST_KEYS_MAX {
                    return Err(self.error("LIST", prefix, format!("more than {LIST_KEYS_MAX} keys")));
                }
            }
            keys.sort();
            Ok(keys)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, valid: bool) {
        assert_eq!(validate_key(key).is_ok(), valid, "{key:?}: {:?}", validate_key(key));
    }

    #[test]
    fn keys_stay_inside_the_replica() {
        check("datasets/media/media-n-t0-00000001.tar", true);
        check("archive/log/entries/00000000000000000000-00000000000000000100", true);
        for bad in ["", "/etc/passwd", "a//b", "../x", "a/../b", "a/.hidden", "a b", "a\\b", "a/"] {
            check(bad, false);
        }
    }

    #[test]
    fn publish_file_uploads_in_parts_is_create_only_and_takes_the_same_bytes_as_published() {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let bucket = S3Replica::new(memory, "memory://", "site/datasets").unwrap();
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("shard");
        let bytes: Vec<u8> = (0..2_500u32).map(|index| (index * 7) as u8).collect();
        std::fs::write(&file, &bytes).unwrap();
        let parts = std::cell::Cell::new(0u64);
        let count = |size: u64| {
            assert!(size <= 1_000);
            parts.set(parts.get() + 1);
        };
        let key = "media/media-node0-t00-00000000.tar";
        let published = bucket.publish_file(key, &file, 1_000, &count).unwrap();
        let sha256 = crate::datasets::targets::hex(&Sha256::digest(&bytes));
        assert_eq!(
            published,
            FilePublished { bytes: 2_500, sha256: sha256.clone(), parts: 3, existing: false }
        );
        assert_eq!(parts.get(), 3);
        assert_eq!(bucket.get(key, 4_096).unwrap(), Some(bytes.clone()));
        assert_eq!(bucket.list("_staging/").unwrap(), Vec::new(), "the staging object is deleted");
        // The same bytes again (a publish repeated after a lost reply): already published.
        let again = bucket.publish_file(key, &file, 1_000, &|_| {}).unwrap();
        assert_eq!(again, FilePublished { bytes: 2_500, sha256, parts: 3, existing: true });
        // Other bytes under the key: an error, and what is there stays.
        std::fs::write(&file, b"other bytes").unwrap();
        let error = bucket.publish_file(key, &file, 1_000, &|_| {}).unwrap_err();
        assert!(error.to_string().contains("never replaced"), "{error}");
        assert_eq!(bucket.get(key, 4_096).unwrap(), Some(bytes));
    }

    /// Yields `total` bytes in reads of at most `piece`; before each read after the first calls
    /// `inspect` (what the replica shows meanwhile); refuses its end when `refuse_end`.
    struct Pieces<'a> {
        total: usize,
        piece: usize,
        given: usize,
        reads: usize,
        refuse_end: bool,
        inspect: &'a dyn Fn(usize),
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
            if self.reads > 0 {
                (self.inspect)(self.given);
            }
            self.reads += 1;
            let count = buffer.len().min(self.piece).min(self.total - self.given);
            if count == 0 && self.refuse_end {
                return Err(std::io::Error::other("sha256 differs"));
            }
            for (offset, byte) in buffer[..count].iter_mut().enumerate() {
                *byte = ((self.given + offset) % 253) as u8;
            }
            self.given += count;
            Ok(count)
        }
    }

    fn pieces(total: usize, piece: usize, refuse_end: bool, inspect: &dyn Fn(usize)) -> Pieces<'_> {
        Pieces { total, piece, given: 0, reads: 0, refuse_end, inspect }
    }

    fn expected(total: usize) -> Vec<u8> {
        (0..total).map(|index| (index % 253) as u8).collect()
    }

    #[test]
    fn a_streamed_directory_put_writes_piece_by_piece_and_shows_nothing_before_the_end() {
        let directory = tempfile::tempdir().unwrap();
        let replica = DirectoryReplica::new(directory.path());
        let key = "datasets/media/shard.tar";
        let hidden_sizes = |_: usize| -> Vec<u64> {
            std::fs::read_dir(directory.path().join("datasets/media"))
                .unwrap()
                .map(|entry| entry.unwrap())
                .filter(|entry| entry.file_name().to_string_lossy().starts_with('.'))
                .map(|entry| entry.metadata().unwrap().len())
                .collect()
        };
        let inspect = |given: usize| {
            // While the source is read, the bytes given so far are in the hidden temporary file
            // and nothing is under the key.
            assert_eq!(replica.head(key).unwrap(), None);
            if given < 10_000 {
                assert_eq!(hidden_sizes(given), vec![given as u64]);
            }
        };
        let mut source = pieces(10_000, 1_000, false, &inspect);
        assert_eq!(
            replica.put_stream(key, 10_000, &mut source, WriteMode::Create).unwrap(),
            PutOutcome::Written
        );
        assert!(source.reads >= 11, "{} reads", source.reads);
        assert_eq!(replica.get(key, 10_000).unwrap(), Some(expected(10_000)));
        assert_eq!(hidden_sizes(0), Vec::<u64>::new());

        // A source that refuses its end, or ends early, leaves nothing under its key.
        for (length, refuse_end) in [(10_000, true), (12_000, false)] {
            let other = "datasets/media/other.tar";
            let error = replica
                .put_stream(other, length, &mut pieces(10_000, 1_000, refuse_end, &|_| {}), WriteMode::Create)
                .unwrap_err();
            assert_eq!(error.operation, "read source for", "{error}");
            assert_eq!(replica.head(other).unwrap(), None);
            assert_eq!(hidden_sizes(0), Vec::<u64>::new(), "no temporary file left");
        }
    }

    #[test]
    fn a_streamed_s3_put_above_the_part_size_goes_in_parts_through_staging() {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let bucket = S3Replica::new(memory, "memory://", "site-b").unwrap().with_part_bytes(1_000);
        let key = "datasets/media/shard.tar";
        let staged = std::cell::Cell::new(false);
        // (Read inside the upload's runtime: the bucket cannot be asked from here.)
        let inspect = |_: usize| staged.set(true);
        let mut source = pieces(2_500, 300, false, &inspect);
        assert_eq!(
            bucket.put_stream(key, 2_500, &mut source, WriteMode::Create).unwrap(),
            PutOutcome::Written
        );
        assert!(staged.get());
        assert_eq!(bucket.get(key, 4_096).unwrap(), Some(expected(2_500)));
        assert_eq!(bucket.list("_staging/").unwrap(), Vec::new());
        // Create-only: the same bytes again are already there; a refused end leaves the key alone.
        let mut again = pieces(2_500, 300, false, &|_| {});
        assert_eq!(
            bucket.put_stream(key, 2_500, &mut again, WriteMode::Create).unwrap(),
            PutOutcome::AlreadyThere
        );
        let other = "datasets/media/other.tar";
        assert!(
            bucket
                .put_stream(other, 2_500, &mut pieces(2_500, 300, true, &|_| {}), WriteMode::Create)
                .is_err()
        );
        assert_eq!(bucket.head(other).unwrap(), None);
        // Overwrite (a repair) replaces; below the part size it is one PUT.
        bucket.put("datasets/media/small", b"old", WriteMode::Create).unwrap();
        let mut small = pieces(500, 100, false, &|_| {});
        bucket.put_stream("datasets/media/small", 500, &mut small, WriteMode::Overwrite).unwrap();
        assert_eq!(bucket.get("datasets/media/small", 4_096).unwrap(), Some(expected(500)));
        let mut large = pieces(2_600, 300, false, &|_| {});
        bucket.put_stream(key, 2_600, &mut large, WriteMode::Overwrite).unwrap();
        assert_eq!(bucket.get(key, 4_096).unwrap(), Some(expected(2_600)));
    }

    #[test]
    fn a_directory_replica_writes_create_only_and_lists_no_temporary_files() {
        let directory = tempfile::tempdir().unwrap();
        let replica = DirectoryReplica::new(directory.path());
        assert_eq!(replica.put("a/b/c", b"one", WriteMode::Create).unwrap(), PutOutcome::Written);
        assert_eq!(replica.put("a/b/c", b"two", WriteMode::Create).unwrap(), PutOutcome::AlreadyThere);
        assert_eq!(replica.get("a/b/c", 16).unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(replica.put("a/b/c", b"three", WriteMode::Overwrite).unwrap(), PutOutcome::Written);
        assert_eq!(replica.head("a/b/c").unwrap(), Some(5));
        std::fs::write(directory.path().join("a/b/.c.tmp-1-1"), b"torn").unwrap();
        assert_eq!(replica.list("a/").unwrap(), vec![("a/b/c".to_string(), 5)]);
        assert!(replica.get("a/b/c", 4).is_err(), "bounded reads");
        assert_eq!(replica.head("a/b/missing").unwrap(), None);
    }
}
