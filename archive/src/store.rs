//! Objects in an object store through the `object_store` crate: S3-compatible servers in
//! production, `InMemory` in tests; the same code path for both.
//!
//! Keys: `<prefix>/sha256/<hex 0..2>/<hex 2..4>/<64 hex>`, the local fan-out layout under a prefix.
//!
//! Sync over async: the archive is synchronous (its callers are plain threads and the audit CLI)
//! and `object_store` is async. Each store owns one I/O thread running a current-thread tokio
//! runtime; calls send a job over a bounded channel and block on its reply. A dedicated thread
//! rather than `Runtime::block_on` on the caller's thread because the sink opens the archive
//! from inside its own tokio runtime, where `block_on` (and dropping a runtime) panics; here the
//! caller only blocks, like any file I/O the archive does. No tokio type appears in the archive's
//! API. The runtime drives one job at a time; a flush's uploads run concurrently inside one job
//! (at most `uploads_in_flight_max`).
//!
//! Durability: an object is durable when its PUT returned success — S3 answers 200 only after
//! the object is stored redundantly, and reads after a successful write see it (strong
//! read-after-write consistency). The PUT carries `x-amz-checksum-sha256`, so the server refuses
//! a body damaged on the way; a HEAD afterwards must then report the same size (and, when both
//! carry one, the same ETag as the PUT: otherwise someone replaced the object in between).
//! Objects are immutable: a key that exists is never overwritten. `put` first HEADs the key; a
//! missing key is written with `PutMode::Create` (`If-None-Match: *`), so a concurrent writer
//! cannot be overwritten either; an existing key (or one created concurrently) is read back and
//! must hash to its address, otherwise `put` fails with [`ObjectError::Conflict`] and the
//! archive's flush fails: a damaged object in the bucket needs an operator, never a silent
//! overwrite.
//!
//! Limits: every request has a connect and a total timeout and at most `retries_max` retries with
//! exponential backoff within `retry_timeout_ms` (object_store's `ClientOptions` and
//! `RetryConfig`, set explicitly from [`ObjectsConfig`]); reads stop at
//! [`OBJECT_BYTES_MAX`] bytes; queued uploads hold at most `upload_batch_bytes_max` bytes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use protocol::evidence::{Sha256Digest, sha256_hex};
use sha2::{Digest as _, Sha256};

use crate::objects::{OBJECT_BYTES_MAX, ObjectError, PutOutcome};
use crate::objects_config::{DEFAULT_REGION, ObjectsConfig, ObjectsKind, object_key};

/// Credentials are read from these, never from a config file.
pub const ACCESS_KEY_ID_VARIABLE: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_ACCESS_KEY_VARIABLE: &str = "AWS_SECRET_ACCESS_KEY";
pub const SESSION_TOKEN_VARIABLE: &str = "AWS_SESSION_TOKEN";

type Job = Box<dyn FnOnce(&tokio::runtime::Runtime) + Send>;

/// One thread with a current-thread runtime; see the module doc.
struct IoThread {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IoThread {
    fn start() -> Result<IoThread, String> {
        let (jobs, receiver) = mpsc::sync_channel::<Job>(1);
        let (ready, started) = mpsc::sync_channel::<Result<(), String>>(1);
        let thread = std::thread::Builder::new()
            .name("archive-objects".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(format!("start the object store's runtime: {error}")));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                while let Ok(job) = receiver.recv() {
                    job(&runtime);
                }
            })
            .map_err(|error| format!("start the object store's I/O thread: {error}"))?;
        started.recv().map_err(|_| "the object store's I/O thread exited".to_string())??;
        Ok(IoThread { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Runs `future` on the I/O thread and waits for it.
    fn run<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> Result<T, String> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |runtime| {
            let _ = reply.send(runtime.block_on(future));
        });
        let gone = || "the object store's I/O thread is gone".to_string();
        self.jobs.as_ref().expect("set until drop").send(job).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the archive's object store I/O thread panicked");
        }
    }
}

/// An object store holding the archive's objects, with uploads queued until [`StoreObjects::sync`].
pub(crate) struct StoreObjects {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket` or `memory://`: what locations start with (a `/` is added when missing).
    base_url: String,
    prefix: String,
    io: IoThread,
    queued: BTreeMap<Sha256Digest, Bytes>,
    queued_bytes: u64,
    uploads_in_flight_max: usize,
    upload_batch_bytes_max: u64,
}

impl std::fmt::Debug for StoreObjects {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The store itself stays out: its configuration holds the credentials.
        formatter
            .debug_struct("StoreObjects")
            .field("base_url", &self.base_url)
            .field("prefix", &self.prefix)
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

fn ms(milliseconds: u64) -> Duration {
    Duration::from_millis(milliseconds)
}

impl StoreObjects {
    /// Connects to the S3-compatible store `config` names, credentials from the environment.
    pub(crate) fn connect_s3(config: &ObjectsConfig) -> Result<StoreObjects, ObjectError> {
        let store = s3_client(config)?;
        let bucket = config.bucket.clone().expect("validated: s3 has a bucket");
        StoreObjects::new(store, &format!("s3://{bucket}"), &config.prefix, config)
    }

    /// Objects in `store` under `prefix`, with `config`'s upload limits.
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        base_url: &str,
        prefix: &str,
        config: &ObjectsConfig,
    ) -> Result<StoreObjects, ObjectError> {
        Ok(StoreObjects {
            store,
            base_url: base_url.to_string(),
            prefix: prefix.to_string(),
            io: IoThread::start().map_err(ObjectError::Config)?,
            queued: BTreeMap::new(),
            queued_bytes: 0,
            uploads_in_flight_max: config.uploads_in_flight_max.max(1) as usize,
            upload_batch_bytes_max: config.upload_batch_bytes_max.max(OBJECT_BYTES_MAX),
        })
    }

    fn key(&self, digest: &Sha256Digest) -> String {
        object_key(&self.prefix, &sha256_hex(digest))
    }

    pub(crate) fn location(&self, digest: &Sha256Digest) -> String {
        let separator = if self.base_url.ends_with('/') { "" } else { "/" };
        format!("{}{separator}{}", self.base_url, self.key(digest))
    }

    /// Queues `bytes` for the next [`StoreObjects::sync`]; uploads the queue first when it would
    /// exceed `upload_batch_bytes_max`.
    pub(crate) fn put(&mut self, digest: &Sha256Digest, bytes: &[u8]) -> Result<PutOutcome, ObjectError> {
        if self.queued.contains_key(digest) {
            return Ok(PutOutcome::Queued);
        }
        if self.queued_bytes + bytes.len() as u64 > self.upload_batch_bytes_max {
            self.sync()?;
        }
        self.queued.insert(*digest, Bytes::copy_from_slice(bytes));
        self.queued_bytes += bytes.len() as u64;
        assert!(self.queued_bytes <= self.upload_batch_bytes_max);
        Ok(PutOutcome::Queued)
    }

    /// Uploads every queued object (see the module doc); returns once all are durable.
    pub(crate) fn sync(&mut self) -> Result<Vec<PutOutcome>, ObjectError> {
        if self.queued.is_empty() {
            return Ok(Vec::new());
        }
        let queued = std::mem::take(&mut self.queued);
        self.queued_bytes = 0;
        let uploads: Vec<_> = queued
            .into_iter()
            .map(|(digest, bytes)| {
                let (store, key, location) = (self.store.clone(), self.key(&digest), self.location(&digest));
                upload(store, key, location, digest, bytes)
            })
            .collect();
        let in_flight = self.uploads_in_flight_max;
        let results = self
            .io
            .run(async move {
                futures::stream::iter(uploads).buffer_unordered(in_flight).collect::<Vec<_>>().await
            })
            .map_err(ObjectError::Config)?;
        results.into_iter().collect()
    }

    /// Reads the object and checks it hashes to its address; returns its size.
    pub(crate) fn check(&self, digest: &Sha256Digest) -> Result<u64, ObjectError> {
        self.read(digest).map(|bytes| bytes.len() as u64)
    }

    /// Reads the object, checked against its address.
    pub(crate) fn read(&self, digest: &Sha256Digest) -> Result<Vec<u8>, ObjectError> {
        let (store, key, location, digest) =
            (self.store.clone(), self.key(digest), self.location(digest), *digest);
        let bytes = self.io.run(async move { read_checked(&*store, &key, &location, &digest).await });
        bytes.map_err(ObjectError::Config)?.map(|bytes| bytes.to_vec())
    }

    /// Removes an object (tests use it to stage damage).
    #[cfg(test)]
    pub(crate) fn delete(&self, digest: &Sha256Digest) -> Result<(), ObjectError> {
        let (store, key) = (self.store.clone(), self.key(digest));
        let result = self.io.run(async move { store.delete(&StorePath::from(key)).await });
        result.map_err(ObjectError::Config)?.map_err(|error| ObjectError::Config(error.to_string()))
    }
}

fn store_error(
    digest: &Sha256Digest,
    location: &str,
    what: &str,
    error: impl std::fmt::Display,
) -> ObjectError {
    ObjectError::Store {
        sha256: sha256_hex(digest),
        location: location.to_string(),
        reason: format!("{what}: {error}"),
    }
}

/// One object's upload: HEAD, then PUT if missing, then HEAD to confirm; see the module doc.
async fn upload(
    store: Arc<dyn ObjectStore>,
    key: String,
    location: String,
    digest: Sha256Digest,
    bytes: Bytes,
) -> Result<PutOutcome, ObjectError> {
    let path = StorePath::from(key.as_str());
    let size = bytes.len() as u64;
    let existing = |error: ObjectError| match error {
        ObjectError::Mismatch { .. } | ObjectError::TooLarge { .. } => ObjectError::Conflict {
            sha256: sha256_hex(&digest),
            location: location.clone(),
            reason: format!(
                "{error}; objects are immutable, so it is not overwritten (run `core-sink audit verify`)"
            ),
        },
        other => other,
    };
    match store.head(&path).await {
        Ok(_) => {
            read_checked(&*store, &key, &location, &digest).await.map_err(existing)?;
            return Ok(PutOutcome::Existing);
        }
        Err(object_store::Error::NotFound { .. }) => {}
        Err(error) => return Err(store_error(&digest, &location, "HEAD", error)),
    }
    let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
    let put = match store.put_opts(&path, PutPayload::from_bytes(bytes), options).await {
        Ok(put) => put,
        Err(object_store::Error::AlreadyExists { .. }) => {
            // Created by someone else since the HEAD: keep theirs if it is the same object.
            read_checked(&*store, &key, &location, &digest).await.map_err(existing)?;
            return Ok(PutOutcome::Existing);
        }
        Err(error) => return Err(store_error(&digest, &location, "PUT", error)),
    };
    let head =
        store.head(&path).await.map_err(|error| store_error(&digest, &location, "HEAD after PUT", error))?;
    if head.size != size {
        return Err(store_error(
            &digest,
            &location,
            "HEAD after PUT",
            format!("{} bytes stored, {size} sent", head.size),
        ));
    }
    if let (Some(put), Some(head)) = (&put.e_tag, &head.e_tag)
        && put != head
    {
        return Err(store_error(
            &digest,
            &location,
            "HEAD after PUT",
            format!("ETag {head} differs from the PUT's {put}: the object was replaced"),
        ));
    }
    Ok(PutOutcome::Written)
}

/// GETs an object, refusing more than [`OBJECT_BYTES_MAX`] bytes, and checks its sha256.
async fn read_checked(
    store: &dyn ObjectStore,
    key: &str,
    location: &str,
    digest: &Sha256Digest,
) -> Result<Bytes, ObjectError> {
    let hex = sha256_hex(digest);
    let result = match store.get(&StorePath::from(key)).await {
        Ok(result) => result,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ObjectError::Missing { sha256: hex, location: location.to_string() });
        }
        Err(error) => return Err(store_error(digest, location, "GET", error)),
    };
    if result.meta.size > OBJECT_BYTES_MAX {
        return Err(ObjectError::TooLarge { sha256: hex, bytes: result.meta.size });
    }
    let mut bytes = Vec::with_capacity(result.meta.size as usize);
    let mut stream = result.into_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|error| store_error(digest, location, "GET", error))?;
        if (bytes.len() + piece.len()) as u64 > OBJECT_BYTES_MAX {
            return Err(ObjectError::TooLarge { sha256: hex, bytes: (bytes.len() + piece.len()) as u64 });
        }
        bytes.extend_from_slice(&piece);
    }
    let actual: Sha256Digest = Sha256::digest(&bytes).into();
    if actual != *digest {
        return Err(ObjectError::Mismatch { sha256: hex, actual: sha256_hex(&actual) });
    }
    Ok(Bytes::from(bytes))
}

/// The S3 client `config` names (kind `s3`), with its timeouts, retries, conditional puts
/// (`PutMode::Create` as `If-None-Match: *`), create-only copies and SHA-256 checksums on uploads; credentials from
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` only. Makes no request.
/// The archive's objects, the sink's replicas (core-sink `replication`) and dataset bucket
/// targets share it.
pub fn s3_client(config: &ObjectsConfig) -> Result<Arc<dyn ObjectStore>, ObjectError> {
    assert_eq!(config.kind, ObjectsKind::S3);
    config.validate().map_err(ObjectError::Config)?;
    let variable = |name: &str| match std::env::var(name) {
        Ok(value) if !value.is_empty() => Ok(Some(value)),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(ObjectError::Config(format!("{name} is not UTF-8"))),
    };
    let missing = |name: &str| {
        ObjectError::Config(format!(
            "the s3 object store takes its credentials from {ACCESS_KEY_ID_VARIABLE} and \
             {SECRET_ACCESS_KEY_VARIABLE} (and {SESSION_TOKEN_VARIABLE} when temporary); {name} is not set"
        ))
    };
    let access_key_id = variable(ACCESS_KEY_ID_VARIABLE)?.ok_or_else(|| missing(ACCESS_KEY_ID_VARIABLE))?;
    let secret_access_key =
        variable(SECRET_ACCESS_KEY_VARIABLE)?.ok_or_else(|| missing(SECRET_ACCESS_KEY_VARIABLE))?;
    let bucket = config.bucket.clone().expect("validated: s3 has a bucket");
    let client_options = object_store::ClientOptions::new()
        .with_allow_http(config.allow_http)
        .with_connect_timeout(ms(config.connect_timeout_ms))
        .with_timeout(ms(config.request_timeout_ms));
    let retry = object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: ms(config.backoff_initial_ms),
            max_backoff: ms(config.backoff_max_ms),
            base: 2.0,
        },
        max_retries: config.retries_max as usize,
        retry_timeout: ms(config.retry_timeout_ms),
    };
    // `AmazonS3Builder::new`, not `from_env`: only the credential variables are read, so no
    // other AWS_* variable changes behaviour behind the config's back.
    let mut builder = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_region(config.region.as_deref().unwrap_or(DEFAULT_REGION))
        .with_access_key_id(access_key_id)
        .with_secret_access_key(secret_access_key)
        .with_client_options(client_options)
        .with_retry(retry)
        .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
        // Create-only copies (`CopyMode::Create`) as a one-part multipart copy completed with
        // `If-None-Match: *`: how dataset shards uploaded in parts are published create-only.
        .with_copy_if_not_exists(object_store::aws::S3CopyIfNotExists::Multipart)
        .with_checksum_algorithm(object_store::aws::Checksum::SHA256);
    if let Some(token) = variable(SESSION_TOKEN_VARIABLE)? {
        builder = builder.with_token(token);
    }
    if let Some(endpoint) = &config.endpoint {
        // Path-style requests (`endpoint/bucket/key`), which every S3-compatible server takes.
        builder = builder.with_endpoint(endpoint).with_virtual_hosted_style_request(false);
    }
    // reqwest is built without a crypto provider of its own (see Cargo.toml): make ring the
    // process default unless one is installed already (then that one stays).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store = builder
        .build()
        .map_err(|error| ObjectError::Config(format!("s3 object store for bucket {bucket:?}: {error}")))?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;
    use protocol::evidence::sha256;

    use super::*;

    fn connect(memory: &Arc<InMemory>) -> StoreObjects {
        StoreObjects::new(memory.clone(), "memory://", "tenant/archive", &ObjectsConfig::local()).unwrap()
    }

    /// What the store holds under `digest`'s key, read around the archive's code.
    fn stored(objects: &StoreObjects, memory: &Arc<InMemory>, digest: &Sha256Digest) -> Option<Vec<u8>> {
        let (memory, key) = (memory.clone(), objects.key(digest));
        let result = objects.io.run(async move {
            match memory.get(&StorePath::from(key)).await {
                Ok(result) => Some(result.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(error) => panic!("{error}"),
            }
        });
        result.unwrap()
    }

    fn overwrite(
        objects: &StoreObjects,
        memory: &Arc<InMemory>,
        digest: &Sha256Digest,
        bytes: &'static [u8],
    ) {
        let (memory, key) = (memory.clone(), objects.key(digest));
        let result =
            objects.io.run(async move { memory.put(&StorePath::from(key), bytes.to_vec().into()).await });
        result.unwrap().unwrap();
    }

    #[test]
    fn put_is_idempotent_and_never_overwrites_other_bytes() {
        let memory = Arc::new(InMemory::new());
        let mut objects = connect(&memory);
        let bytes = b"original image".to_vec();
        let digest = sha256(&bytes);
        let hex = sha256_hex(&digest);
        assert!(matches!(objects.put(&digest, &bytes), Ok(PutOutcome::Queued)));
        assert!(matches!(objects.put(&digest, &bytes), Ok(PutOutcome::Queued)), "queued once");
        assert_eq!(stored(&objects, &memory, &digest), None, "nothing is written before sync");
        assert_eq!(objects.sync().unwrap(), [PutOutcome::Written]);
        assert_eq!(objects.key(&digest), format!("tenant/archive/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4]));
        assert_eq!(
            objects.location(&digest),
            format!("memory://tenant/archive/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4])
        );
        assert_eq!(stored(&objects, &memory, &digest), Some(bytes.clone()));
        assert_eq!(objects.read(&digest).unwrap(), bytes);
        assert_eq!(objects.check(&digest).unwrap(), bytes.len() as u64);

        // Again, from another connection to the same store: found, checked, not rewritten.
        let mut again = connect(&memory);
        again.put(&digest, &bytes).unwrap();
        assert_eq!(again.sync().unwrap(), [PutOutcome::Existing]);

        // Other bytes under an object's key: refused and left as they are; check names them.
        let intended = b"intended bytes".to_vec();
        let intended_digest = sha256(&intended);
        overwrite(&objects, &memory, &intended_digest, b"someone else's bytes");
        objects.put(&intended_digest, &intended).unwrap();
        let error = objects.sync().unwrap_err();
        assert!(
            matches!(&error, ObjectError::Conflict { reason, .. } if reason.contains("immutable")),
            "{error}"
        );
        assert_eq!(
            stored(&objects, &memory, &intended_digest).as_deref(),
            Some(&b"someone else's bytes"[..])
        );
        assert!(matches!(objects.check(&intended_digest), Err(ObjectError::Mismatch { .. })));

        // Tampered and deleted objects are found by check (which verify uses).
        overwrite(&objects, &memory, &digest, b"tampered");
        assert!(matches!(objects.check(&digest), Err(ObjectError::Mismatch { .. })));
        objects.delete(&digest).unwrap();
        assert!(
            matches!(objects.read(&digest), Err(ObjectError::Missing { location, .. }) if location.ends_with(&hex))
        );
    }

    #[test]
    fn queued_uploads_stay_within_the_batch_bound() {
        let memory = Arc::new(InMemory::new());
        let config = ObjectsConfig { upload_batch_bytes_max: OBJECT_BYTES_MAX, ..ObjectsConfig::local() };
        let mut objects = StoreObjects::new(memory.clone(), "memory://", "", &config).unwrap();
        let blobs: Vec<Vec<u8>> =
            (0..3u8).map(|index| vec![index; (OBJECT_BYTES_MAX / 2) as usize]).collect();
        let digests: Vec<Sha256Digest> = blobs.iter().map(|blob| sha256(blob)).collect();
        for (blob, digest) in blobs.iter().zip(&digests) {
            objects.put(digest, blob).unwrap();
            assert!(objects.queued_bytes <= objects.upload_batch_bytes_max);
        }
        // The third put uploaded the first two to make room.
        assert!(
            stored(&objects, &memory, &digests[0]).is_some()
                && stored(&objects, &memory, &digests[1]).is_some()
        );
        assert_eq!(stored(&objects, &memory, &digests[2]), None);
        assert_eq!(objects.sync().unwrap(), [PutOutcome::Written]);
        assert_eq!(stored(&objects, &memory, &digests[2]).as_deref(), Some(&blobs[2][..]));
    }
}
