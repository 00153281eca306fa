//! One writer thread per storage target. A target is a directory standing for a mount point (a
//! Lustre OST pool, a disk, an NFS/BeeGFS path) or a bucket (S3 through `object_store`); its
//! thread owns the shards open on it, writes them sequentially through a 1 MiB buffer, and
//! publishes a finished shard.
//!
//! Directory: fsync, sha256 read back, atomic rename from its hidden in-progress name, fsync of
//! the directory. Bucket: the shard is written to `<staging_dir>/.<name>.partial` (at most one
//! shard per dataset, each at most `shard_bytes_max` plus one chunk), then uploaded in parts of
//! `part_bytes` (one part in memory) with its sha256 computed on the way, published create-only
//! under `<prefix>/<relative path>` (`S3Replica::publish_file`: staging key, `If-None-Match: *`
//! copy, HEAD) and the staging file deleted. A key holding the same bytes already counts as
//! published; other bytes there fail the shard. After a failed publish the pipeline runs the
//! target's recovery again, which deletes whatever was left under the key: the manifest does not
//! list it, so no reader was told of it. The bucket's
//! manifest and wids index are put by the same thread (`publish`), after the shards they list,
//! and its recovery (`recover`) deletes what the manifest does not list, before the target gets
//! a shard.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use sha2::{Digest as _, Sha256};

use super::BucketTargetConfig;
pub use super::format::{OwnedSeriesRow, Sample, SeriesReport, ShardFormat};
use super::format::{ShardWriter, WRITE_BUFFER_BYTES};
use super::pipeline::DatasetMetrics;
use super::typed::TypedColumn;
use crate::replication::replica::{Replica as _, S3Replica, STAGING_PREFIX, WriteMode};

/// Commands queued per target; the coordinator waits when a target falls behind.
const TARGET_QUEUE_MAX: usize = 1024;

pub struct Published {
    pub bytes: u64,
    pub sha256: String,
    pub report: SeriesReport,
}

enum Command {
    Open {
        shard: u64,
        hidden: PathBuf,
        published: PathBuf,
        /// The published path below the target (a bucket's key below its prefix).
        relative_path: String,
        format: ShardFormat,
        known_columns: Vec<TypedColumn>,
    },
    Append {
        shard: u64,
        sample: Sample,
    },
    Seal {
        shard: u64,
        reply: SyncSender<Result<Published, String>>,
    },
    Abort {
        shard: u64,
    },
    /// Buckets: puts each (key, bytes) in order, replacing what is there.
    Publish {
        objects: Vec<(String, Vec<u8>)>,
        reply: SyncSender<Result<(), String>>,
    },
    /// Buckets: deletes the staging objects and keys below `<dataset>/` whose name starts with
    /// `name_prefix` (`<dataset>-<node>-`: this node's shards) that `listed` lacks; answers how
    /// many keys were deleted.
    Recover {
        dataset: &'static str,
        name_prefix: String,
        listed: BTreeSet<String>,
        reply: SyncSender<Result<u64, String>>,
    },
}

struct OpenShard {
    hidden: PathBuf,
    published: PathBuf,
    relative_path: String,
    writer: Option<Box<dyn ShardWriter>>,
    /// The first error; the shard is then failed and sealing reports it.
    error: Option<String>,
}

/// A bucket target's client, on its writer thread.
struct Bucket {
    replica: S3Replica,
    part_bytes: u64,
    metrics: Arc<DatasetMetrics>,
}

/// Handle to a target's writer thread.
pub struct Target {
    pub index: usize,
    /// The target directory, or a bucket's staging directory (where its free space is measured).
    pub directory: PathBuf,
    /// `s3://bucket/prefix` for a bucket target.
    pub bucket_url: Option<String>,
    commands: SyncSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Target {
    pub fn start(index: usize, directory: PathBuf) -> std::io::Result<Target> {
        let (commands, receiver) = sync_channel(TARGET_QUEUE_MAX);
        let thread =
            std::thread::Builder::new().name(format!("target-{index}")).spawn(move || run(receiver, None))?;
        Ok(Target { index, directory, bucket_url: None, commands, thread: Some(thread) })
    }

    /// A bucket target. Builds the client (config and credentials checked, no request made);
    /// its runtime lives on the target's thread, so this may be called inside a tokio runtime.
    pub fn start_bucket(
        index: usize,
        config: &BucketTargetConfig,
        metrics: Arc<DatasetMetrics>,
    ) -> Result<Target, String> {
        let objects = config.objects_config();
        let store = archive::s3_client(&objects).map_err(|error| error.to_string())?;
        let bucket_name = objects.bucket.clone().unwrap_or_default();
        let (prefix, part_bytes) = (objects.prefix.clone(), config.part_bytes);
        let (ready, started) = sync_channel::<Result<(), String>>(1);
        let (commands, receiver) = sync_channel(TARGET_QUEUE_MAX);
        let thread = std::thread::Builder::new()
            .name(format!("target-{index}"))
            .spawn(move || match S3Replica::new(store, &format!("s3://{bucket_name}"), &prefix) {
                Ok(replica) => {
                    let _ = ready.send(Ok(()));
                    run(receiver, Some(Bucket { replica, part_bytes, metrics }));
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                }
            })
            .map_err(|error| format!("start the target's thread: {error}"))?;
        started.recv().map_err(|_| "the target's thread exited".to_string())??;
        Ok(Target {
            index,
            directory: config.staging_dir.clone(),
            bucket_url: Some(config.base_url()),
            commands,
            thread: Some(thread),
        })
    }

    fn send(&self, command: Command) {
        // The thread only exits when this handle is dropped.
        let _ = self.commands.send(command);
    }

    pub fn open(
        &self,
        shard: u64,
        hidden: PathBuf,
        published: PathBuf,
        relative_path: String,
        format: ShardFormat,
        known_columns: Vec<TypedColumn>,
    ) {
        self.send(Command::Open { shard, hidden, published, relative_path, format, known_columns });
    }

    pub fn append(&self, shard: u64, sample: Sample) {
        self.send(Command::Append { shard, sample });
    }

    /// Finishes, syncs and publishes the shard; blocks until done.
    pub fn seal(&self, shard: u64) -> Result<Published, String> {
        let (reply, answer) = sync_channel(1);
        self.send(Command::Seal { shard, reply });
        answer.recv().unwrap_or_else(|_| Err("target thread stopped".into()))
    }

    /// Drops the shard and its in-progress file.
    pub fn abort(&self, shard: u64) {
        self.send(Command::Abort { shard });
    }

    /// Buckets: puts `objects` in order (manifests, indexes), replacing what is there.
    pub fn publish(&self, objects: Vec<(String, Vec<u8>)>) -> Result<(), String> {
        let (reply, answer) = sync_channel(1);
        self.send(Command::Publish { objects, reply });
        answer.recv().unwrap_or_else(|_| Err("target thread stopped".into()))
    }

    /// Buckets: deletes staging objects and the dataset's shard keys `listed` lacks (left by a
    /// crash between an upload and the manifest); returns how many were deleted.
    pub fn recover(
        &self,
        dataset: &'static str,
        name_prefix: String,
        listed: BTreeSet<String>,
    ) -> Result<u64, String> {
        let (reply, answer) = sync_channel(1);
        self.send(Command::Recover { dataset, name_prefix, listed, reply });
        answer.recv().unwrap_or_else(|_| Err("target thread stopped".into()))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let (dead, _) = sync_channel(1);
        drop(std::mem::replace(&mut self.commands, dead));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(commands: Receiver<Command>, bucket: Option<Bucket>) {
    let mut shards: HashMap<u64, OpenShard> = HashMap::new();
    while let Ok(command) = commands.recv() {
        match command {
            Command::Open { shard, hidden, published, relative_path, format, known_columns } => {
                let opened = open_writer(&hidden, format, &known_columns);
                let (writer, error) = match opened {
                    Ok(writer) => (Some(writer), None),
                    Err(error) => (None, Some(format!("create {}: {error}", hidden.display()))),
                };
                shards.insert(shard, OpenShard { hidden, published, relative_path, writer, error });
            }
            Command::Append { shard, sample } => {
                if let Some(open) = shards.get_mut(&shard)
                    && open.error.is_none()
                    && let Err(error) = open.writer.as_mut().expect("no error means a writer").append(sample)
                {
                    open.error = Some(format!("write {}: {error}", open.hidden.display()));
                }
            }
            Command::Seal { shard, reply } => {
                let result = match shards.remove(&shard) {
                    Some(open) => seal(open, bucket.as_ref()),
                    None => Err(format!("shard {shard} is not open")),
                };
                let _ = reply.send(result);
            }
            Command::Abort { shard } => {
                if let Some(open) = shards.remove(&shard) {
                    drop(open.writer);
                    let _ = std::fs::remove_file(&open.hidden);
                }
            }
            Command::Publish { objects, reply } => {
                let result = match &bucket {
                    Some(bucket) => objects.iter().try_for_each(|(key, bytes)| {
                        bucket
                            .replica
                            .put(key, bytes, WriteMode::Overwrite)
                            .map(drop)
                            .map_err(|error| error.to_string())
                    }),
                    None => Err("publish is for bucket targets".into()),
                };
                let _ = reply.send(result);
            }
            Command::Recover { dataset, name_prefix, listed, reply } => {
                let result = match &bucket {
                    Some(bucket) => recover(bucket, dataset, &name_prefix, &listed),
                    None => Err("recover is for bucket targets".into()),
                };
                let _ = reply.send(result);
            }
        }
    }
    for (_, open) in shards {
        drop(open.writer);
        let _ = std::fs::remove_file(&open.hidden);
    }
}

fn open_writer(
    hidden: &Path,
    format: ShardFormat,
    known_columns: &[TypedColumn],
) -> Result<Box<dyn ShardWriter>, String> {
    if let Some(directory) = hidden.parent() {
        std::fs::create_dir_all(directory).map_err(|error| error.to_string())?;
    }
    let file = File::create(hidden).map_err(|error| error.to_string())?;
    format.create(file, known_columns)
}

/// Publishes a finished shard: into its directory (fsync, read back, rename), or, with `bucket`,
/// into the bucket from its staging file (see the module doc).
fn seal(mut open: OpenShard, bucket: Option<&Bucket>) -> Result<Published, String> {
    let result = (|| {
        if let Some(error) = open.error.take() {
            return Err(error);
        }
        let (file, report) = open
            .writer
            .take()
            .expect("no error means a writer")
            .finish()
            .map_err(|error| format!("finish {}: {error}", open.hidden.display()))?;
        let Some(bucket) = bucket else {
            durable::sync_file(&file, &open.hidden).map_err(|error| error.to_string())?;
            drop(file);
            let (bytes, sha256) = digest(&open.hidden)
                .map_err(|error| format!("read back {}: {error}", open.hidden.display()))?;
            durable::rename_into_place(&open.hidden, &open.published).map_err(|error| error.to_string())?;
            return Ok(Published { bytes, sha256, report });
        };
        // No fsync: a staging file lost in a crash is derived again from the raw landing.
        drop(file);
        let metrics = &bucket.metrics;
        let on_part = |bytes: u64| {
            metrics.upload_bytes.fetch_add(bytes, Ordering::Relaxed);
            metrics.upload_parts.fetch_add(1, Ordering::Relaxed);
        };
        let published = bucket
            .replica
            .publish_file(&open.relative_path, &open.hidden, bucket.part_bytes, &on_part)
            .map_err(|error| error.to_string())?;
        if published.existing {
            tracing::info!(key = %open.relative_path, "shard already in the bucket with the same sha256");
        }
        Ok(Published { bytes: published.bytes, sha256: published.sha256, report })
    })();
    // A directory shard's hidden file was renamed if it succeeded; a staging file goes either way.
    if result.is_err() || bucket.is_some() {
        let _ = std::fs::remove_file(&open.hidden);
    }
    if let (Err(_), Some(bucket)) = (&result, bucket) {
        // What the publish may have left under the key is unlisted: the pipeline runs the
        // target's recovery before its next shard.
        bucket.metrics.upload_failures.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// See [`Target::recover`].
fn recover(
    bucket: &Bucket,
    dataset: &str,
    name_prefix: &str,
    listed: &BTreeSet<String>,
) -> Result<u64, String> {
    let mut removed = 0;
    let staging =
        bucket.replica.list(&format!("{STAGING_PREFIX}/{dataset}/")).map_err(|error| error.to_string())?;
    let shards = bucket.replica.list(&format!("{dataset}/")).map_err(|error| error.to_string())?;
    for (key, _) in staging.into_iter().chain(shards) {
        let name = key.rsplit('/').next().unwrap_or_default();
        // Only this node's names: other nodes may share the prefix (their names differ).
        let staging = key.starts_with(&format!("{STAGING_PREFIX}/"));
        if name.starts_with(name_prefix) && (staging || !listed.contains(name)) {
            tracing::info!(key, "removing an object of a bucket target its manifest does not list");
            bucket.replica.delete(&key).map_err(|error| error.to_string())?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn digest(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; WRITE_BUFFER_BYTES];
    let mut bytes = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    let _ = file.flush();
    Ok((bytes, hex(&hasher.finalize())))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
