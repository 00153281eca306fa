//! Replication: continuous, incremental copies of the sink's published datasets and its archive to
//! one or more replicas (a directory tree on a second file system, or an S3-compatible bucket).
//!
//! Replica layout (keys, `replica.rs`):
//! ```text
//! datasets/<dataset>/<shard name>                     every shard a manifest lists (create-only)
//! datasets/<dataset>/manifest.json                    the manifest, replaced after its shards
//! archive/objects/sha256/<2 hex>/<2 hex>/<64 hex>     objects the log's entries name (create-only)
//! archive/log/<entries|index|checkpoints>/<start>-<end>
//!                                                     byte ranges of the three append-only log
//!                                                     files, 20-digit offsets (create-only)
//! archive/keys/checkpoint.vkey                        the verifier key
//! review/review-<8 digits>.tar                        the archive feed's review shards (create-only)
//! landing/raw/<device>/<lane>/<first seq, 20 digits>/<start>-<end>
//!                                                     byte ranges of committed raw landing files
//!                                                     (create-only)
//! archive/keys/checkpoint-signing.pk8                 only with copy_signing_key = true
//! ```
//!
//! What drives it (never a scan of the data): the review shards the archive feed's positions file
//! counts as published (`archive_feed::published_review_shards`); the raw landing through
//! `landing::committed` from the lander's checkpoint (only when one is given,
//! `with_landing_checkpoint`: `serve`), segment by segment per (device, lane) from the watermark's
//! read position; per dataset the manifest (its shard list only grows;
//! a manifest whose sha256 equals the one last copied is skipped), and for the archive the
//! checkpoints file read from the last copied offset: the newest signed checkpoint's tree size is
//! the cut; entries and index through it are copied in segments of at most `SEGMENT_BYTES_MAX`,
//! each entry's objects before the segment holding the entry, then the checkpoints. A checkpoint
//! is written by the archive only after the entries it covers are fsynced, so everything up to the
//! cut is durable at the source and a replica is always a consistent prefix.
//!
//! The watermark (`<state_dir>/<replica>.json`, `Watermark`) records, per replica, how far each
//! source was copied; it is written atomically with fsync after each shard, manifest and log
//! segment (`durable`). After a crash the pass resumes there; what landed
//! after the last watermark write is found by a HEAD and not copied again. A key already present
//! with the expected size is taken as copied (puts are atomic, so it is whole); a key present with
//! another size is replaced from the source (counted as a repair). `verify` reads the whole replica
//! back and names every difference; `pass(repair = true)` re-copies what verify names.
//!
//! Pacing and memory: every object is copied in chunks of `chunk_bytes`, each waiting for its
//! share of the bandwidth budget (`Paced`); shards and log segments are streamed from their files
//! (one chunk in memory), archive objects, manifests and keys are read whole first.
//!
//! Limits: `SEGMENT_BYTES_MAX` per log segment, `object_bytes_max` per archive object in memory
//! (one object at a time), `CHECKPOINTS_PER_PASS_MAX` checkpoints read per pass, `DATASETS_MAX` datasets,
//! `WATERMARK_BYTES_MAX` per watermark file.

pub mod adaptive;
pub mod replica;
pub mod restore;
pub mod throttle;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Seek as _, SeekFrom};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use archive::checkpoint::CHECKPOINT_BYTES_MAX;
use archive::frame::{FRAME_HEADER_BYTES, FrameRead, MAGIC_BYTES, read_frame};
use archive::leaf::LeafEntry;
use archive::log::{
    CHECKPOINTS_MAGIC, ENTRIES_MAGIC, INDEX_MAGIC, INDEX_RECORD_BYTES, IndexRecord, checkpoints_path,
    entries_path, index_path, open_checked, read_entry,
};
use protocol::evidence::{Sha256Digest, sha256, sha256_hex};
use serde::{Deserialize, Serialize};

use crate::datasets::manifest::{MANIFEST_BYTES_MAX, Manifest};
use replica::{DirectoryReplica, PutOutcome, Replica, ReplicaError, S3Replica, WriteMode, validate_key};
use throttle::Throttle;

/// Largest log segment (one PUT, held in memory).
pub const SEGMENT_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Checkpoints read per pass (the cut moves at most this many checkpoints per pass).
pub const CHECKPOINTS_PER_PASS_MAX: usize = 4096;
/// Datasets under `manifest_dir`.
pub const DATASETS_MAX: usize = 1024;
pub const WATERMARK_BYTES_MAX: u64 = 64 * 1024 * 1024;
pub const REPLICAS_MAX: usize = 16;
/// Bounds of `chunk_bytes`.
pub const CHUNK_BYTES_MIN: u64 = 4 * 1024;
pub const CHUNK_BYTES_MAX: u64 = 64 * 1024 * 1024;
const WATERMARK_FORMAT: &str = "tributary-replication/1";
/// A failing replica is logged at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Sleeps (throttle, pass interval) wake at least this often to see a stop request.
const STOP_POLL: Duration = Duration::from_millis(50);

const _: () = assert!(SEGMENT_BYTES_MAX as usize >= archive::leaf::LEAF_BYTES_MAX + FRAME_HEADER_BYTES);

/// `[replication]` in sink.toml.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Where each replica's watermark is kept; absent = `<state_dir>/replication`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Pause between two passes over the sources.
    #[serde(default = "default_pass_interval_ms")]
    pub pass_interval_ms: u64,
    /// Bandwidth budget of all replicas together (bytes written per second, one-second burst).
    #[serde(default = "default_bytes_per_second_max")]
    pub bytes_per_second_max: u64,
    /// Operations budget of all replicas together (objects written per second).
    #[serde(default = "default_objects_per_second_max")]
    pub objects_per_second_max: u64,
    /// Largest archive object copied (archive objects are read whole from the archive's store;
    /// shards and log segments are streamed in chunks and have no such limit); larger ones fail
    /// the pass, named. Also bounds what `verify` and `restore` read of one object.
    #[serde(default = "default_object_bytes_max")]
    pub object_bytes_max: u64,
    /// Objects are copied in chunks of this size, each waiting for its share of the bandwidth
    /// budget; one chunk of a shard or segment is in memory at a time (an S3 replica also holds
    /// one upload part, `replica::S3_PART_BYTES`).
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u64,
    /// Also copy the archive's private checkpoint signing key. Off by default: a replica then
    /// holds no secret; a restored archive verifies, and keeps being written only with the key
    /// restored from wherever the operator keeps it.
    #[serde(default)]
    pub copy_signing_key: bool,
    /// Adaptive mode (`adaptive.rs`): the bandwidth budget moves between `bytes_per_second_min`
    /// and `bytes_per_second_max`, halved while the sink's ingest latency (the lander's ack
    /// latency) is above its threshold, raised step by step while it is healthy. Needs the
    /// latency of an in-process lander: `serve` has it; standalone `core-sink replicate` has none
    /// and runs at `bytes_per_second_max` (it says so in its log).
    #[serde(default)]
    pub adaptive: bool,
    /// The adaptive budget's floor; absent = `bytes_per_second_max` / 16 (at least 1024).
    #[serde(default)]
    pub bytes_per_second_min: Option<u64>,
    /// An absolute ingest latency threshold (mean ack latency over an interval); absent = the
    /// lowest latency of the last 10 minutes × `ingest_latency_factor`.
    #[serde(default)]
    pub ingest_latency_target_ms: Option<u64>,
    #[serde(default = "default_ingest_latency_factor")]
    pub ingest_latency_factor: f64,
    /// Time between two decisions of the adaptive budget.
    #[serde(default = "default_adaptive_interval_ms")]
    pub adaptive_interval_ms: u64,
    pub replicas: Vec<ReplicaConfig>,
}

/// `[[replication.replicas]]`: exactly one of `directory` and `s3`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// `[A-Za-z0-9_-]`, 1..=64 bytes; names the watermark file and the metrics label.
    pub name: String,
    /// A directory that must exist (a mounted second file system).
    #[serde(default)]
    pub directory: Option<PathBuf>,
    /// An S3-compatible bucket: the keys of `[archive.objects]` (bucket, endpoint, region,
    /// allow_http, prefix, timeouts, retries); `kind` is implied.
    #[serde(default)]
    pub s3: Option<archive::ObjectsConfig>,
}

fn default_pass_interval_ms() -> u64 {
    1_000
}
fn default_bytes_per_second_max() -> u64 {
    64 * 1024 * 1024
}
fn default_objects_per_second_max() -> u64 {
    500
}
fn default_object_bytes_max() -> u64 {
    512 * 1024 * 1024
}
fn default_chunk_bytes() -> u64 {
    1024 * 1024
}
fn default_ingest_latency_factor() -> f64 {
    2.0
}
fn default_adaptive_interval_ms() -> u64 {
    500
}

impl ReplicationConfig {
    /// A config with one directory replica and the defaults.
    pub fn directory(name: &str, directory: &Path) -> ReplicationConfig {
        ReplicationConfig {
            state_dir: None,
            pass_interval_ms: default_pass_interval_ms(),
            bytes_per_second_max: default_bytes_per_second_max(),
            objects_per_second_max: default_objects_per_second_max(),
            object_bytes_max: default_object_bytes_max(),
            chunk_bytes: default_chunk_bytes(),
            copy_signing_key: false,
            adaptive: false,
            bytes_per_second_min: None,
            ingest_latency_target_ms: None,
            ingest_latency_factor: default_ingest_latency_factor(),
            adaptive_interval_ms: default_adaptive_interval_ms(),
            replicas: vec![ReplicaConfig { name: name.into(), directory: Some(directory.into()), s3: None }],
        }
    }

    /// Errors name the key under `[replication]` and what was expected.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, message: String| if ok { Ok(()) } else { Err(message) };
        check(
            (10..=3_600_000).contains(&self.pass_interval_ms),
            format!("replication.pass_interval_ms = {}: expected 10..=3600000", self.pass_interval_ms),
        )?;
        check(
            self.bytes_per_second_max >= 1024,
            format!(
                "replication.bytes_per_second_max = {}: expected at least 1024",
                self.bytes_per_second_max
            ),
        )?;
        check(
            self.objects_per_second_max >= 1,
            format!(
                "replication.objects_per_second_max = {}: expected at least 1",
                self.objects_per_second_max
            ),
        )?;
        check(
            (1024..=self.bytes_per_second_max).contains(&self.bytes_per_second_min()),
            format!(
                "replication.bytes_per_second_min = {}: expected 1024..=bytes_per_second_max ({})",
                self.bytes_per_second_min(),
                self.bytes_per_second_max
            ),
        )?;
        if let Some(target) = self.ingest_latency_target_ms {
            check(
                (1..=60_000).contains(&target),
                format!("replication.ingest_latency_target_ms = {target}: expected 1..=60000"),
            )?;
        }
        check(
            (1.1..=100.0).contains(&self.ingest_latency_factor),
            format!(
                "replication.ingest_latency_factor = {}: expected 1.1..=100 (a multiple of the baseline latency)",
                self.ingest_latency_factor
            ),
        )?;
        check(
            (50..=60_000).contains(&self.adaptive_interval_ms),
            format!("replication.adaptive_interval_ms = {}: expected 50..=60000", self.adaptive_interval_ms),
        )?;
        check(
            (SEGMENT_BYTES_MAX..=(4 << 30)).contains(&self.object_bytes_max),
            format!(
                "replication.object_bytes_max = {}: expected {SEGMENT_BYTES_MAX}..={}",
                self.object_bytes_max,
                4u64 << 30
            ),
        )?;
        check(
            (CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&self.chunk_bytes),
            format!(
                "replication.chunk_bytes = {}: expected {CHUNK_BYTES_MIN}..={CHUNK_BYTES_MAX}",
                self.chunk_bytes
            ),
        )?;
        check(
            (1..=REPLICAS_MAX).contains(&self.replicas.len()),
            format!("replication.replicas: {} given, expected 1..={REPLICAS_MAX}", self.replicas.len()),
        )?;
        let mut names = HashSet::new();
        for (number, replica) in self.replicas.iter().enumerate() {
            let key = format!("replication.replicas[{number}]");
            check(
                !replica.name.is_empty()
                    && replica.name.len() <= 64
                    && replica
                        .name
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'),
                format!("{key}.name = {:?}: expected 1..=64 bytes of [A-Za-z0-9_-]", replica.name),
            )?;
            check(names.insert(&replica.name), format!("{key}.name = {:?}: used twice", replica.name))?;
            match (&replica.directory, &replica.s3) {
                (Some(_), None) => {}
                (None, Some(s3)) => {
                    let s3 = archive::ObjectsConfig { kind: archive::ObjectsKind::S3, ..s3.clone() };
                    s3.validate().map_err(|message| format!("{key}.s3: {message}"))?;
                }
                _ => return Err(format!("{key}: expected exactly one of `directory` and `s3`")),
            }
        }
        Ok(())
    }

    /// The adaptive budget's floor (`bytes_per_second_min`, or its default).
    pub fn bytes_per_second_min(&self) -> u64 {
        self.bytes_per_second_min.unwrap_or((self.bytes_per_second_max / 16).max(1024))
    }

    /// The controller's config, when `adaptive` is on.
    pub fn adaptive_config(&self) -> Option<adaptive::AdaptiveConfig> {
        self.adaptive.then(|| adaptive::AdaptiveConfig {
            bytes_per_second_min: self.bytes_per_second_min(),
            bytes_per_second_max: self.bytes_per_second_max,
            latency_target_us: self.ingest_latency_target_ms.map(|ms| ms * 1_000),
            latency_factor: self.ingest_latency_factor,
            interval: Duration::from_millis(self.adaptive_interval_ms),
        })
    }

    /// Relative paths are relative to `base` (the config file's directory).
    pub fn resolve_relative(&mut self, base: &Path) {
        if let Some(state_dir) = &mut self.state_dir
            && state_dir.is_relative()
        {
            *state_dir = base.join(&*state_dir);
        }
        for replica in &mut self.replicas {
            if let Some(directory) = &mut replica.directory
                && directory.is_relative()
            {
                *directory = base.join(&*directory);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("source {path}: {reason}")]
    Source { path: PathBuf, reason: String },
    #[error("watermark {path}: {reason}")]
    Watermark { path: PathBuf, reason: String },
    #[error("replication config: {0}")]
    Config(String),
    #[error("stopped")]
    Stopped,
}

fn source_error(path: &Path, reason: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::Source { path: path.to_path_buf(), reason: reason.to_string() }
}

/// How far each source was copied to one replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    pub format: String,
    pub datasets: BTreeMap<String, DatasetMark>,
    pub archive: ArchiveMark,
    /// Review shards `0..review_copied` are on the replica.
    #[serde(default)]
    pub review_copied: u64,
    /// Per `<device>/<lane>`: the committed raw landing read position on the replica.
    #[serde(default)]
    pub landing: BTreeMap<String, LandingMark>,
}

/// Where the copy of one (device, lane) of the raw landing stands (a `landing::ReadPosition`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandingMark {
    pub file_first_seq: u64,
    pub offset: u64,
    pub through_seq: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetMark {
    /// The manifest's first `shards_copied` shards are on the replica.
    pub shards_copied: u64,
    /// The name of the last of them (a manifest whose list changed is checked from the start).
    pub last_shard: Option<String>,
    /// sha256 of the manifest bytes last put on the replica.
    pub manifest_sha256: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveMark {
    pub keys_copied: bool,
    /// Entries whose bytes (and objects) are on the replica, and where the next one starts.
    pub entries_copied: u64,
    pub entries_bytes: u64,
    /// Index records on the replica.
    pub index_copied: u64,
    /// Bytes of the checkpoints file on the replica, and the tree size of the last one.
    pub checkpoints_bytes: u64,
    pub checkpoint_tree_size: u64,
}

impl Watermark {
    fn read(path: &Path) -> Result<Watermark, ReplicationError> {
        let error = |reason: String| ReplicationError::Watermark { path: path.to_path_buf(), reason };
        match fleet::files::read_bounded(path, WATERMARK_BYTES_MAX).map_err(|e| error(e.to_string()))? {
            None => Ok(Watermark { format: WATERMARK_FORMAT.into(), ..Watermark::default() }),
            Some(bytes) => {
                let watermark: Watermark =
                    serde_json::from_slice(&bytes).map_err(|e| error(e.to_string()))?;
                if watermark.format != WATERMARK_FORMAT {
                    return Err(error(format!(
                        "format {:?}, this build reads {WATERMARK_FORMAT:?}",
                        watermark.format
                    )));
                }
                Ok(watermark)
            }
        }
    }

    fn write(&self, path: &Path) -> Result<(), ReplicationError> {
        let bytes = serde_json::to_vec_pretty(self).expect("watermarks serialize");
        durable::Options::default().mode(fleet::files::PUBLIC_MODE).write(path, &bytes).map_err(|error| {
            ReplicationError::Watermark { path: path.to_path_buf(), reason: error.to_string() }
        })
    }
}

/// Counters of one replica, on `/metrics` with the label `replica="<name>"`.
#[derive(Debug, Default)]
pub struct ReplicaMetrics {
    pub objects_copied: AtomicU64,
    pub bytes_copied: AtomicU64,
    /// Objects found already on the replica (after a crash, or copied by an earlier run).
    pub objects_present: AtomicU64,
    pub repairs: AtomicU64,
    pub errors: AtomicU64,
    pub passes: AtomicU64,
    /// Bytes of the sources not on the replica yet, measured after each pass.
    pub lag_bytes: AtomicU64,
    /// Unix milliseconds since which the replica has been behind; 0 when it is caught up.
    pub behind_since_unix_ms: AtomicU64,
}

impl ReplicaMetrics {
    /// Seconds the replica has been behind the sources (0 when caught up at the last pass).
    pub fn lag_seconds(&self, now_unix_ms: u64) -> u64 {
        match self.behind_since_unix_ms.load(Ordering::Relaxed) {
            0 => 0,
            since => now_unix_ms.saturating_sub(since) / 1000,
        }
    }
}

/// Every replica's counters, and the budget they share.
#[derive(Debug, Default)]
pub struct ReplicationMetrics {
    pub replicas: Vec<(String, Arc<ReplicaMetrics>)>,
    /// The bandwidth budget in force: `bytes_per_second_max`, or the adaptive budget.
    pub budget_bytes_per_second: AtomicU64,
    /// The adaptive mode's signal: the mean ingest latency of its last interval with acked
    /// chunks, and the threshold it was compared with (0 without the adaptive mode).
    pub ingest_latency_us: AtomicU64,
    pub ingest_latency_threshold_us: AtomicU64,
    /// Times the adaptive mode cut the budget.
    pub budget_cuts: AtomicU64,
}

/// One reading of the ingest latency signal: the cumulative sum (microseconds) and count of a
/// latency measure, and the age of what waits for it now (microseconds; 0 when nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyReading {
    pub sum_us: u64,
    pub count: u64,
    pub pending_us: u64,
}

/// The ingest latency the adaptive mode follows, read at each decision (in `serve`: the lander's
/// ack latency histogram and its oldest unacked chunk).
pub type LatencySignal = Arc<dyn Fn() -> LatencyReading + Send + Sync>;

/// The adaptive budget and the signal it follows.
struct Adaptation {
    budget: adaptive::AdaptiveBudget,
    signal: LatencySignal,
}

/// Feeds the signal to the adaptive budget (when there is one) and applies its decision to the
/// throttle; publishes the budget in force.
fn adapt(adaptation: Option<&mut Adaptation>, throttle: &mut Throttle, metrics: &ReplicationMetrics) {
    let Some(adaptation) = adaptation else { return };
    let now = Instant::now();
    let reading = (adaptation.signal)();
    let Some(decision) = adaptation.budget.tick(now, reading.sum_us, reading.count, reading.pending_us)
    else {
        return;
    };
    let budget = adaptation.budget.bytes_per_second();
    if budget != throttle.bytes_per_second() {
        throttle.set_bytes_per_second(now, budget);
    }
    if decision == adaptive::Decision::Cut {
        metrics.budget_cuts.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            budget,
            latency_us = adaptation.budget.latency_us,
            threshold_us = adaptation.budget.threshold_us,
            "ingest latency above its threshold: replication budget cut"
        );
    }
    metrics.budget_bytes_per_second.store(budget, Ordering::Relaxed);
    metrics.ingest_latency_us.store(adaptation.budget.latency_us, Ordering::Relaxed);
    metrics.ingest_latency_threshold_us.store(adaptation.budget.threshold_us, Ordering::Relaxed);
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// What the replicator copies from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// `[datasets] manifest_dir`: `<dir>/<dataset>/manifest.json`.
    pub manifest_dir: Option<PathBuf>,
    /// `[archive] root`.
    pub archive_root: Option<PathBuf>,
    /// `[archive] review_dir` (its shards are copied when `archive_root` is set too).
    pub review_dir: Option<PathBuf>,
    /// The sink's `landing_dir` (copied only with a checkpoint, `with_landing_checkpoint`).
    pub landing_dir: Option<PathBuf>,
}

impl Sources {
    pub fn of(config: &crate::SinkConfig) -> Sources {
        Sources {
            manifest_dir: config.datasets.as_ref().map(|datasets| datasets.manifest_dir.clone()),
            archive_root: config.archive.as_ref().map(|archive| archive.root.clone()),
            review_dir: config.archive.as_ref().map(|archive| archive.review_dir.clone()),
            landing_dir: Some(config.landing_dir.clone()),
        }
    }
}

/// One difference between a replica and the sources, named by its replica key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub key: String,
    pub problem: String,
    repair: Repair,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}: {}", self.key, self.problem)
    }
}

/// Where the right bytes for a difference come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Repair {
    /// `length` bytes of a source file at `offset`.
    File {
        path: PathBuf,
        offset: u64,
        length: u64,
    },
    ArchiveObject(Sha256Digest),
}

struct ReplicaState {
    name: String,
    backend: Box<dyn Replica>,
    watermark: Watermark,
    watermark_path: PathBuf,
    metrics: Arc<ReplicaMetrics>,
    last_error_logged: Option<Instant>,
    /// Whether this process compared the watermark with the replica's log segments yet.
    reconciled: bool,
}

/// Copies the sources to every replica, pass after pass.
pub struct Replicator {
    sources: Sources,
    config: ReplicationConfig,
    replicas: Vec<ReplicaState>,
    throttle: Throttle,
    adaptation: Option<Adaptation>,
    /// The lander's newest raw landing checkpoint (what is committed); `None`: the raw landing
    /// is not replicated.
    landing_checkpoint: Option<LandingCheckpoint>,
    pub metrics: Arc<ReplicationMetrics>,
    stop: Arc<AtomicBool>,
}

/// The raw landing checkpoint the lander publishes after each commit.
pub type LandingCheckpoint = Arc<std::sync::Mutex<Vec<u8>>>;

fn segment_key(file: &str, start: u64, end: u64) -> String {
    format!("archive/log/{file}/{start:020}-{end:020}")
}

fn parse_segment_key(key: &str, file: &str) -> Option<(u64, u64)> {
    parse_range_name(key.strip_prefix(&format!("archive/log/{file}/"))?)
}

/// `<start, 20 digits>-<end, 20 digits>`, start below end: a segment's name.
fn parse_range_name(name: &str) -> Option<(u64, u64)> {
    let (start, end) = name.split_once('-')?;
    if start.len() != 20 || end.len() != 20 {
        return None;
    }
    let (start, end) = (start.parse().ok()?, end.parse().ok()?);
    (start < end).then_some((start, end))
}

pub fn object_key(digest: &Sha256Digest) -> String {
    let hex = sha256_hex(digest);
    format!("archive/objects/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4])
}

/// The contiguous chain of segments from offset 0 (at each offset the longest segment starting
/// there; overlapping segments of a resumed pass hold the same bytes), and where it stops.
fn segment_chain(segments: &[(u64, u64, String, u64)]) -> (Vec<(u64, u64, String, u64)>, u64) {
    let mut chain = Vec::new();
    let mut offset = 0;
    loop {
        let next = segments.iter().filter(|segment| segment.0 == offset).max_by_key(|segment| segment.1);
        match next {
            Some(segment) => {
                offset = segment.1;
                chain.push(segment.clone());
            }
            None => return (chain, offset),
        }
    }
}

/// Lists the segments of one log file on a replica: (start, end, key, size).
fn list_segments(replica: &dyn Replica, file: &str) -> Result<Vec<(u64, u64, String, u64)>, ReplicaError> {
    Ok(replica
        .list(&format!("archive/log/{file}/"))?
        .into_iter()
        .filter_map(|(key, size)| parse_segment_key(&key, file).map(|(start, end)| (start, end, key, size)))
        .collect())
}

fn read_range(path: &Path, offset: u64, length: u64) -> Result<Vec<u8>, ReplicationError> {
    let file = File::open(path).map_err(|error| source_error(path, error))?;
    let mut bytes = vec![0u8; length as usize];
    file.read_exact_at(&mut bytes, offset)
        .map_err(|error| source_error(path, format!("read {length} bytes at {offset}: {error}")))?;
    Ok(bytes)
}

fn file_length(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |metadata| metadata.len())
}

fn read_index_records(root: &Path, from: u64, to: u64) -> Result<Vec<IndexRecord>, ReplicationError> {
    if from >= to {
        return Ok(Vec::new());
    }
    let path = index_path(root);
    let bytes = read_range(
        &path,
        MAGIC_BYTES as u64 + from * INDEX_RECORD_BYTES as u64,
        (to - from) * INDEX_RECORD_BYTES as u64,
    )?;
    Ok(bytes
        .chunks_exact(INDEX_RECORD_BYTES)
        .map(|chunk| IndexRecord::decode(chunk.try_into().expect("exact chunks")))
        .collect())
}

fn index_bytes(records: u64) -> u64 {
    if records == 0 { 0 } else { MAGIC_BYTES as u64 + records * INDEX_RECORD_BYTES as u64 }
}

/// The archive's durable cut read from `offset` of its checkpoints file: (end offset, tree size)
/// of each whole checkpoint after it, at most `CHECKPOINTS_PER_PASS_MAX`, each verified.
fn read_checkpoints_after(root: &Path, offset: u64) -> Result<Vec<(u64, u64)>, ReplicationError> {
    let path = checkpoints_path(root);
    let verifier = archive::audit::read_verifier(root).map_err(|error| source_error(&path, error))?;
    let Some(mut file) =
        open_checked(&path, CHECKPOINTS_MAGIC).map_err(|error| source_error(&path, error))?
    else {
        return Ok(Vec::new());
    };
    let mut position = offset.max(MAGIC_BYTES as u64);
    file.seek(SeekFrom::Start(position)).map_err(|error| source_error(&path, error))?;
    let mut reader = BufReader::new(file);
    let mut found = Vec::new();
    while found.len() < CHECKPOINTS_PER_PASS_MAX {
        match read_frame(&mut reader, CHECKPOINT_BYTES_MAX).map_err(|error| source_error(&path, error))? {
            FrameRead::Frame(note) => {
                position += (FRAME_HEADER_BYTES + note.len()) as u64;
                let checkpoint = verifier.open(&note).map_err(|error| {
                    source_error(&path, format!("checkpoint ending at {position}: {error}"))
                })?;
                found.push((position, checkpoint.tree_size));
            }
            // A torn note is a flush in progress: the cut stays at the last whole one.
            FrameRead::End | FrameRead::Torn { .. } => break,
        }
    }
    Ok(found)
}

/// Calls `each` once per object the entries of `records` name (an object named twice, once), with
/// the entry naming it and its role there.
fn for_each_entry_object(
    entries_file: &File,
    entries_file_path: &Path,
    records: &[IndexRecord],
    mut each: impl FnMut(&LeafEntry, &'static str, Sha256Digest) -> Result<(), ReplicationError>,
) -> Result<(), ReplicationError> {
    let mut seen = HashSet::new();
    for record in records {
        let leaf =
            read_entry(entries_file, record).map_err(|reason| source_error(entries_file_path, reason))?;
        let leaf = LeafEntry::decode(&leaf).map_err(|error| source_error(entries_file_path, error))?;
        for (role, digest) in leaf.objects() {
            if seen.insert(digest) {
                each(&leaf, role, digest)?;
            }
        }
    }
    Ok(())
}

/// The dataset names under `manifest_dir` that have a manifest, sorted.
fn dataset_names(manifest_dir: &Path) -> Result<Vec<String>, ReplicationError> {
    let entries = match std::fs::read_dir(manifest_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(source_error(manifest_dir, error)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| source_error(manifest_dir, error))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if validate_key(&name).is_ok() && !name.contains('/') && entry.path().join("manifest.json").is_file()
        {
            names.push(name);
            if names.len() > DATASETS_MAX {
                return Err(source_error(manifest_dir, format!("more than {DATASETS_MAX} datasets")));
            }
        }
    }
    names.sort();
    Ok(names)
}

fn read_manifest(path: &Path) -> Result<(Vec<u8>, Manifest), ReplicationError> {
    let bytes = fleet::files::read_bounded(path, MANIFEST_BYTES_MAX)
        .map_err(|error| source_error(path, error))?
        .ok_or_else(|| source_error(path, "missing"))?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|error| source_error(path, error))?;
    for shard in &manifest.shards {
        validate_key(&shard.name)
            .map_err(|reason| source_error(path, format!("shard {:?}: {reason}", shard.name)))?;
    }
    Ok((bytes, manifest))
}

/// One pass over one replica: the borrowed pieces of the replicator it needs.
struct Pass<'a> {
    state: &'a mut ReplicaState,
    throttle: &'a mut Throttle,
    adaptation: Option<&'a mut Adaptation>,
    metrics: &'a ReplicationMetrics,
    stop: &'a AtomicBool,
    chunk_bytes: u64,
}

/// What one put copies.
enum Source<'a> {
    /// `length` bytes of the file at `path` from `offset`, streamed; with `sha256`, refused
    /// (nothing lands) unless they hash to it.
    File { path: &'a Path, offset: u64, length: u64, sha256: Option<&'a str> },
    /// Bytes in memory (archive objects, manifests, keys).
    Bytes(Vec<u8>),
}

/// Waits until the budgets' debt is paid. The adaptive budget keeps deciding meanwhile, so a
/// budget raised (or cut) during a wait applies to the rest of it.
fn wait_for_budget(
    throttle: &mut Throttle,
    mut adaptation: Option<&mut Adaptation>,
    metrics: &ReplicationMetrics,
    stop: &AtomicBool,
) -> Result<(), ReplicationError> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(ReplicationError::Stopped);
        }
        adapt(adaptation.as_deref_mut(), throttle, metrics);
        let remaining = throttle.debt(Instant::now());
        if remaining.is_zero() {
            return Ok(());
        }
        std::thread::sleep(remaining.min(STOP_POLL));
    }
}

/// A source read in chunks of at most `chunk_bytes`, each reserved from the bandwidth budget
/// and waited for before the replica sees it; checks the source's sha256 at its end (refusing
/// the end, so the replica installs nothing). Why it failed is kept in `failure`.
struct Paced<'a> {
    inner: Box<dyn std::io::Read + 'a>,
    /// Names the source in errors.
    path: &'a Path,
    chunk: Vec<u8>,
    position: usize,
    chunk_bytes: u64,
    hasher: sha2::Sha256,
    sha256: Option<&'a str>,
    ended: bool,
    throttle: &'a mut Throttle,
    adaptation: Option<&'a mut Adaptation>,
    metrics: &'a ReplicationMetrics,
    stop: &'a AtomicBool,
    failure: Option<ReplicationError>,
}

impl Paced<'_> {
    fn fail(&mut self, failure: ReplicationError) -> std::io::Error {
        let error = std::io::Error::other(failure.to_string());
        self.failure = Some(failure);
        error
    }
}

impl std::io::Read for Paced<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        if self.position == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            self.chunk.clear();
            self.position = 0;
            if let Err(error) = (&mut self.inner).take(self.chunk_bytes).read_to_end(&mut self.chunk) {
                return Err(self.fail(source_error(self.path, error)));
            }
            if self.chunk.is_empty() {
                self.ended = true;
                if let Some(expected) = self.sha256 {
                    let found = crate::datasets::targets::hex(&self.hasher.clone().finalize());
                    if found != expected {
                        let failure =
                            source_error(self.path, format!("sha256 {found}, the manifest says {expected}"));
                        return Err(self.fail(failure));
                    }
                }
                return Ok(0);
            }
            self.hasher.update(&self.chunk);
            self.throttle.reserve_bytes(Instant::now(), self.chunk.len() as u64);
            if let Err(failure) =
                wait_for_budget(self.throttle, self.adaptation.as_deref_mut(), self.metrics, self.stop)
            {
                return Err(self.fail(failure));
            }
        }
        let count = buffer.len().min(self.chunk.len() - self.position);
        buffer[..count].copy_from_slice(&self.chunk[self.position..self.position + count]);
        self.position += count;
        Ok(count)
    }
}

impl Pass<'_> {
    fn persist(&self) -> Result<(), ReplicationError> {
        self.state.watermark.write(&self.state.watermark_path)
    }

    /// Writes `source` at `key` within the budgets (one object, then its bytes chunk by chunk);
    /// counts what was written.
    fn put(
        &mut self,
        key: &str,
        source: Source<'_>,
        mode: WriteMode,
    ) -> Result<PutOutcome, ReplicationError> {
        adapt(self.adaptation.as_deref_mut(), self.throttle, self.metrics);
        self.throttle.reserve(Instant::now(), 0);
        wait_for_budget(self.throttle, self.adaptation.as_deref_mut(), self.metrics, self.stop)?;
        let (inner, path, length, sha256): (Box<dyn std::io::Read>, &Path, u64, Option<&str>) = match source {
            Source::File { path, offset, length, sha256 } => {
                let mut file = File::open(path).map_err(|error| source_error(path, error))?;
                file.seek(SeekFrom::Start(offset)).map_err(|error| source_error(path, error))?;
                (Box::new(std::io::Read::take(file, length)), path, length, sha256)
            }
            Source::Bytes(bytes) => {
                let length = bytes.len() as u64;
                (Box::new(std::io::Cursor::new(bytes)), Path::new(key), length, None)
            }
        };
        let mut paced = Paced {
            inner,
            path,
            chunk: Vec::new(),
            position: 0,
            chunk_bytes: self.chunk_bytes,
            hasher: sha2::Digest::new(),
            sha256,
            ended: false,
            throttle: &mut *self.throttle,
            adaptation: self.adaptation.as_deref_mut(),
            metrics: self.metrics,
            stop: self.stop,
            failure: None,
        };
        let result = self.state.backend.put_stream(key, length, &mut paced, mode);
        let outcome = match (result, paced.failure) {
            (Ok(outcome), _) => outcome,
            // The source (or a stop) failed the put: that is the error, not the replica's.
            (Err(_), Some(failure)) => return Err(failure),
            (Err(error), None) => return Err(error.into()),
        };
        let metrics = &self.state.metrics;
        match outcome {
            PutOutcome::Written => {
                metrics.objects_copied.fetch_add(1, Ordering::Relaxed);
                metrics.bytes_copied.fetch_add(length, Ordering::Relaxed);
            }
            PutOutcome::AlreadyThere => {
                metrics.objects_present.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(outcome)
    }

    /// Replaces a mutable object (a manifest, a key) unless the replica holds these bytes already
    /// (put before a crash took the watermark write).
    fn replace(&mut self, key: &str, bytes: &[u8]) -> Result<(), ReplicationError> {
        if self.state.backend.get(key, MANIFEST_BYTES_MAX)?.as_deref() == Some(bytes) {
            self.state.metrics.objects_present.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.put(key, Source::Bytes(bytes.to_vec()), WriteMode::Overwrite).map(|_| ())
    }

    /// Copies an immutable object unless the replica has it: a key present with `expected_bytes`
    /// (or any size when unknown) is whole already; one of another size is replaced.
    fn copy<'s>(
        &mut self,
        key: &str,
        expected_bytes: Option<u64>,
        source: impl FnOnce() -> Result<Source<'s>, ReplicationError>,
    ) -> Result<(), ReplicationError> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(ReplicationError::Stopped);
        }
        match self.state.backend.head(key)? {
            Some(size) if expected_bytes.is_none_or(|expected| expected == size) => {
                self.state.metrics.objects_present.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Some(size) => {
                tracing::warn!(replica = %self.state.name, key, size, expected = ?expected_bytes, "replica object has the wrong size; replacing it from the source");
                self.put(key, source()?, WriteMode::Overwrite)?;
                self.state.metrics.repairs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            None => {
                self.put(key, source()?, WriteMode::Create)?;
                Ok(())
            }
        }
    }

    fn datasets(&mut self, manifest_dir: &Path) -> Result<(), ReplicationError> {
        for dataset in dataset_names(manifest_dir)? {
            let manifest_path = manifest_dir.join(&dataset).join("manifest.json");
            let (bytes, manifest) = read_manifest(&manifest_path)?;
            let digest = sha256_hex(&sha256(&bytes));
            let mark = self.state.watermark.datasets.entry(dataset.clone()).or_default().clone();
            if mark.manifest_sha256.as_deref() == Some(digest.as_str()) {
                continue;
            }
            let copied = mark.shards_copied as usize;
            let prefix_holds = copied <= manifest.shards.len()
                && (copied == 0 || Some(&manifest.shards[copied - 1].name) == mark.last_shard.as_ref());
            let start = if prefix_holds { copied } else { 0 };
            for (number, shard) in manifest.shards.iter().enumerate().skip(start) {
                let key = format!("datasets/{dataset}/{}", shard.name);
                self.copy(&key, Some(shard.bytes), || {
                    let size = std::fs::metadata(&shard.path).map_err(|error| {
                        source_error(&shard.path, format!("listed in the manifest but unreadable: {error}"))
                    })?;
                    if size.len() != shard.bytes {
                        return Err(source_error(
                            &shard.path,
                            format!("{} bytes, the manifest says {}", size.len(), shard.bytes),
                        ));
                    }
                    Ok(Source::File {
                        path: &shard.path,
                        offset: 0,
                        length: shard.bytes,
                        sha256: Some(&shard.sha256),
                    })
                })?;
                let mark = self.state.watermark.datasets.get_mut(&dataset).expect("inserted above");
                mark.shards_copied = number as u64 + 1;
                mark.last_shard = Some(shard.name.clone());
                self.persist()?;
            }
            // After its shards: a manifest on the replica never lists a shard it lacks. One that is
            // there already (put before a crash took the watermark write) is not written again.
            self.replace(&format!("datasets/{dataset}/manifest.json"), &bytes)?;
            let mark = self.state.watermark.datasets.get_mut(&dataset).expect("inserted above");
            mark.manifest_sha256 = Some(digest);
            self.persist()?;
        }
        Ok(())
    }

    /// Once per process and replica, before the first archive pass: adopts the log segments the
    /// replica holds beyond the watermark (written before a crash took the watermark write, or
    /// with the watermark lost), so that they are not copied again under other boundaries. Only
    /// boundaries the source confirms are adopted: an entry's end, a whole index record, a
    /// checkpoint whose entries and index are adopted too. Segments are put after the objects of
    /// their entries, so adopted entries' objects are on the replica.
    fn reconcile(&mut self, root: &Path) -> Result<(), ReplicationError> {
        let backend = self.state.backend.as_ref();
        let chain_end = |file: &str| -> Result<u64, ReplicationError> {
            Ok(segment_chain(&list_segments(backend, file)?).1)
        };
        let (entries_end, index_end, checkpoints_end) =
            (chain_end("entries")?, chain_end("index")?, chain_end("checkpoints")?);
        let before = self.state.watermark.archive.clone();
        let mut mark = before.clone();
        let checkpoints = read_checkpoints_after(root, mark.checkpoints_bytes)?;
        let cut = checkpoints.last().map_or(mark.checkpoint_tree_size, |&(_, tree_size)| tree_size);
        if entries_end > mark.entries_bytes {
            let records = read_index_records(root, mark.entries_copied, cut)?;
            if let Some(position) = records.iter().position(|record| record.end() == entries_end) {
                mark.entries_copied += position as u64 + 1;
                mark.entries_bytes = entries_end;
            }
        }
        if index_end > index_bytes(mark.index_copied) && index_end >= MAGIC_BYTES as u64 {
            let body = index_end - MAGIC_BYTES as u64;
            let records = body / INDEX_RECORD_BYTES as u64;
            if body % INDEX_RECORD_BYTES as u64 == 0 && records <= cut {
                mark.index_copied = records;
            }
        }
        if checkpoints_end > mark.checkpoints_bytes
            && let Some(&(end, tree_size)) = checkpoints.iter().find(|(end, _)| *end == checkpoints_end)
            && tree_size <= mark.entries_copied.min(mark.index_copied)
        {
            mark.checkpoints_bytes = end;
            mark.checkpoint_tree_size = tree_size;
        }
        if mark != before {
            tracing::info!(replica = %self.state.name, entries = mark.entries_copied, index = mark.index_copied, checkpoint_tree_size = mark.checkpoint_tree_size, "adopted archive log segments the replica holds beyond its watermark");
            self.state.watermark.archive = mark;
            self.persist()?;
        }
        Ok(())
    }

    fn archive(&mut self, root: &Path, copy_signing_key: bool) -> Result<(), ReplicationError> {
        if !self.state.watermark.archive.keys_copied {
            let mut keys = vec![("checkpoint.vkey", archive::checkpoint::verifier_key_path(root))];
            if copy_signing_key {
                keys.push(("checkpoint-signing.pk8", archive::checkpoint::signing_key_path(root)));
            }
            for (name, path) in keys {
                let Some(bytes) = fleet::files::read_bounded(&path, 64 * 1024)
                    .map_err(|error| source_error(&path, error))?
                else {
                    // No key yet: the archive has not been opened; nothing to copy.
                    return Ok(());
                };
                self.replace(&format!("archive/keys/{name}"), &bytes)?;
            }
            self.state.watermark.archive.keys_copied = true;
            self.persist()?;
        }
        if !self.state.reconciled {
            self.reconcile(root)?;
            self.state.reconciled = true;
        }
        let mark = self.state.watermark.archive.clone();
        let checkpoints = read_checkpoints_after(root, mark.checkpoints_bytes)?;
        let Some(&(checkpoints_end, cut)) = checkpoints.last() else { return Ok(()) };
        if cut < mark.entries_copied {
            return Err(source_error(
                &checkpoints_path(root),
                format!(
                    "the newest checkpoint covers {cut} entries but the replica holds {}: the source log went back (restored from an older copy?); replication of the archive stops here",
                    mark.entries_copied
                ),
            ));
        }
        let objects = archive::Objects::for_audit(root).map_err(|error| source_error(root, error))?;
        let entries_file_path = entries_path(root);
        let entries_file = open_checked(&entries_file_path, ENTRIES_MAGIC)
            .map_err(|error| source_error(&entries_file_path, error))?
            .ok_or_else(|| source_error(&entries_file_path, "missing"))?;
        // Entries (with their objects first), segment by segment.
        while self.state.watermark.archive.entries_copied < cut {
            let first = self.state.watermark.archive.entries_copied;
            let start = self.state.watermark.archive.entries_bytes;
            // Records of this segment: at most SEGMENT_BYTES_MAX of entries, at least one.
            let candidates = read_index_records(root, first, cut.min(first + 65_536))?;
            let mut end = start;
            let mut records = Vec::new();
            for record in candidates {
                if !records.is_empty() && record.end() - start > SEGMENT_BYTES_MAX {
                    break;
                }
                end = record.end();
                records.push(record);
            }
            for_each_entry_object(&entries_file, &entries_file_path, &records, |_, _, digest| {
                self.copy(&object_key(&digest), None, || {
                    objects.read(&digest).map(Source::Bytes).map_err(|error| source_error(root, error))
                })
            })?;
            let segment =
                Source::File { path: &entries_file_path, offset: start, length: end - start, sha256: None };
            self.copy(&segment_key("entries", start, end), Some(end - start), || Ok(segment))?;
            let archive = &mut self.state.watermark.archive;
            archive.entries_copied = first + records.len() as u64;
            archive.entries_bytes = end;
            self.persist()?;
        }
        // The index through the cut.
        let index_file_path = index_path(root);
        open_checked(&index_file_path, INDEX_MAGIC).map_err(|error| source_error(&index_file_path, error))?;
        while self.state.watermark.archive.index_copied < cut {
            let first = self.state.watermark.archive.index_copied;
            let last = cut.min(first + SEGMENT_BYTES_MAX / INDEX_RECORD_BYTES as u64);
            let (start, end) = (index_bytes(first), index_bytes(last));
            let segment =
                Source::File { path: &index_file_path, offset: start, length: end - start, sha256: None };
            self.copy(&segment_key("index", start, end), Some(end - start), || Ok(segment))?;
            self.state.watermark.archive.index_copied = last;
            self.persist()?;
        }
        // Then the checkpoints that cover them.
        let start = mark.checkpoints_bytes;
        let checkpoints_file_path = checkpoints_path(root);
        let segment = Source::File {
            path: &checkpoints_file_path,
            offset: start,
            length: checkpoints_end - start,
            sha256: None,
        };
        self.copy(
            &segment_key("checkpoints", start, checkpoints_end),
            Some(checkpoints_end - start),
            || Ok(segment),
        )?;
        let archive = &mut self.state.watermark.archive;
        archive.checkpoints_bytes = checkpoints_end;
        archive.checkpoint_tree_size = cut;
        self.persist()
    }
}

impl Pass<'_> {
    /// The review shards the archive feed published, in seq order, from the watermark on.
    fn review(&mut self, root: &Path, review_dir: &Path) -> Result<(), ReplicationError> {
        let published = crate::archive_feed::published_review_shards(root)
            .map_err(|error| source_error(root, format!("{error:#}")))?;
        while self.state.watermark.review_copied < published {
            let name = crate::archive_feed::review_shard_name(self.state.watermark.review_copied);
            let path = review_dir.join(&name);
            let length = std::fs::metadata(&path)
                .map_err(|error| source_error(&path, format!("published but unreadable: {error}")))?
                .len();
            self.copy(&format!("review/{name}"), Some(length), || {
                Ok(Source::File { path: &path, offset: 0, length, sha256: None })
            })?;
            self.state.watermark.review_copied += 1;
            self.persist()?;
        }
        Ok(())
    }

    /// The committed raw landing of every (device, lane) the checkpoint names, from the
    /// watermark's position, in segments of whole records of one file (at most
    /// `SEGMENT_BYTES_MAX`, or one record), read and verified by `landing::committed`.
    fn landing(&mut self, landing_dir: &Path, checkpoint: &[u8]) -> Result<(), ReplicationError> {
        use crate::landing::{CommittedLanding, ReadPosition, raw_file_path};
        let committed = CommittedLanding::new(landing_dir, checkpoint)
            .map_err(|error| source_error(landing_dir, error))?;
        let lanes: Vec<_> = committed.lanes().map(|(device, lane)| (device.to_string(), lane)).collect();
        for (device, lane) in lanes {
            let name = format!("{device}/{}", lane.name());
            let mark = self.state.watermark.landing.get(&name).copied().unwrap_or_default();
            let from = ReadPosition {
                file_first_seq: mark.file_first_seq,
                offset: mark.offset,
                through_seq: mark.through_seq,
            };
            let mut reader =
                committed.read(&device, lane, from).map_err(|error| source_error(landing_dir, error))?;
            // The segment being gathered: its file, its start, the position after its last record.
            let mut segment: Option<(u64, u64, ReadPosition)> = None;
            loop {
                let before = reader.position();
                let next = reader
                    .next_chunk()
                    .map_err(|error| source_error(landing_dir, error))?
                    .map(|chunk| chunk.position);
                if let Some((file, start, end)) = segment {
                    let continues = next.is_some_and(|position| {
                        position.file_first_seq == file && position.offset - start <= SEGMENT_BYTES_MAX
                    });
                    if !continues {
                        let path = raw_file_path(landing_dir, &device, lane, file);
                        let length = end.offset - start;
                        let key = format!("landing/raw/{name}/{file:020}/{start:020}-{:020}", end.offset);
                        self.copy(&key, Some(length), || {
                            Ok(Source::File { path: &path, offset: start, length, sha256: None })
                        })?;
                        self.state.watermark.landing.insert(
                            name.clone(),
                            LandingMark {
                                file_first_seq: file,
                                offset: end.offset,
                                through_seq: end.through_seq,
                            },
                        );
                        self.persist()?;
                        segment = None;
                    }
                }
                let Some(position) = next else { break };
                segment = Some(match segment {
                    Some((file, start, _)) => (file, start, position),
                    None if before.file_first_seq == position.file_first_seq => {
                        (position.file_first_seq, before.offset, position)
                    }
                    None => (position.file_first_seq, 0, position),
                });
            }
        }
        Ok(())
    }
}

/// Bytes of the sources beyond `watermark` (shards and manifests not copied, log bytes).
/// The raw landing counts only with a checkpoint: per (device, lane) what its newest committed
/// file holds beyond the watermark (files between them are not counted).
fn lag_bytes(sources: &Sources, watermark: &Watermark, landing_checkpoint: Option<&[u8]>) -> u64 {
    let mut lag = 0u64;
    if let Some(manifest_dir) = &sources.manifest_dir {
        for dataset in dataset_names(manifest_dir).unwrap_or_default() {
            let Ok((bytes, manifest)) = read_manifest(&manifest_dir.join(&dataset).join("manifest.json"))
            else {
                continue;
            };
            let mark = watermark.datasets.get(&dataset).cloned().unwrap_or_default();
            if mark.manifest_sha256.as_deref() == Some(sha256_hex(&sha256(&bytes)).as_str()) {
                continue;
            }
            lag += bytes.len() as u64;
            lag += manifest
                .shards
                .iter()
                .skip(mark.shards_copied as usize)
                .map(|shard| shard.bytes)
                .sum::<u64>();
        }
    }
    if let Some(root) = &sources.archive_root {
        let archive = &watermark.archive;
        lag += file_length(&entries_path(root)).saturating_sub(archive.entries_bytes);
        lag += file_length(&index_path(root)).saturating_sub(index_bytes(archive.index_copied));
        lag += file_length(&checkpoints_path(root)).saturating_sub(archive.checkpoints_bytes);
        if let Some(review_dir) = &sources.review_dir {
            let published = crate::archive_feed::published_review_shards(root).unwrap_or(0);
            lag += (watermark.review_copied..published)
                .map(|seq| file_length(&review_dir.join(crate::archive_feed::review_shard_name(seq))))
                .sum::<u64>();
        }
    }
    if let (Some(landing_dir), Some(checkpoint)) = (&sources.landing_dir, landing_checkpoint)
        && let Ok(committed) = crate::landing::CommittedLanding::new(landing_dir, checkpoint)
    {
        for (device, lane) in committed.lanes() {
            let end = committed.end(device, lane).expect("a lane it names");
            let mark =
                watermark.landing.get(&format!("{device}/{}", lane.name())).copied().unwrap_or_default();
            lag += if mark.file_first_seq == end.first_seq {
                end.length.saturating_sub(mark.offset)
            } else {
                end.length
            };
        }
    }
    lag
}

/// Measures the replica's lag and publishes it (bytes, and since when it is behind).
fn record_lag(
    sources: &Sources,
    state: &ReplicaState,
    landing_checkpoint: Option<&LandingCheckpoint>,
) -> u64 {
    let checkpoint = landing_checkpoint.map(|checkpoint| checkpoint.lock().expect("checkpoint lock").clone());
    let lag = lag_bytes(sources, &state.watermark, checkpoint.as_deref());
    let metrics = &state.metrics;
    metrics.lag_bytes.store(lag, Ordering::Relaxed);
    if lag == 0 {
        metrics.behind_since_unix_ms.store(0, Ordering::Relaxed);
    } else if metrics.behind_since_unix_ms.load(Ordering::Relaxed) == 0 {
        metrics.behind_since_unix_ms.store(unix_ms().max(1), Ordering::Relaxed);
    }
    lag
}

/// What one pass over one replica did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassReport {
    pub replica: String,
    pub error: Option<String>,
    pub repaired: u64,
}

impl Replicator {
    /// Opens every replica of `config` and reads its watermark. A directory replica must exist; an
    /// S3 replica needs the credential variables; neither is contacted yet.
    pub fn open(sink: &crate::SinkConfig, stop: Arc<AtomicBool>) -> Result<Replicator, ReplicationError> {
        let config = sink
            .replication
            .clone()
            .ok_or_else(|| ReplicationError::Config("the config has no [replication] section".into()))?;
        let state_dir = config.state_dir.clone().unwrap_or_else(|| sink.state_dir.join("replication"));
        let backends = config
            .replicas
            .iter()
            .enumerate()
            .map(|(number, replica)| -> Result<Box<dyn Replica>, ReplicationError> {
                let key = format!("replication.replicas[{number}]");
                match (&replica.directory, &replica.s3) {
                    (Some(directory), None) => {
                        if !directory.is_dir() {
                            return Err(ReplicationError::Config(format!(
                                "{key}.directory = {}: not a directory (mount the replica's file system or create it)",
                                directory.display()
                            )));
                        }
                        Ok(Box::new(DirectoryReplica::new(directory)))
                    }
                    (None, Some(s3)) => Ok(Box::new(
                        S3Replica::connect(s3).map_err(|error| ReplicationError::Config(format!("{key}.s3: {error}")))?,
                    )),
                    _ => Err(ReplicationError::Config(format!("{key}: expected exactly one of `directory` and `s3`"))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let names: Vec<String> = config.replicas.iter().map(|replica| replica.name.clone()).collect();
        Replicator::with_backends(
            Sources::of(sink),
            config,
            &state_dir,
            names.into_iter().zip(backends).collect(),
            stop,
        )
    }

    /// The replicator over given backends (tests wrap one to inject faults).
    pub fn with_backends(
        sources: Sources,
        config: ReplicationConfig,
        state_dir: &Path,
        backends: Vec<(String, Box<dyn Replica>)>,
        stop: Arc<AtomicBool>,
    ) -> Result<Replicator, ReplicationError> {
        config.validate().map_err(ReplicationError::Config)?;
        std::fs::create_dir_all(state_dir).map_err(|error| ReplicationError::Watermark {
            path: state_dir.to_path_buf(),
            reason: error.to_string(),
        })?;
        let mut replicas = Vec::new();
        let mut metrics = ReplicationMetrics::default();
        for (name, backend) in backends {
            let watermark_path = state_dir.join(format!("{name}.json"));
            let watermark = Watermark::read(&watermark_path)?;
            let replica_metrics = Arc::new(ReplicaMetrics::default());
            metrics.replicas.push((name.clone(), replica_metrics.clone()));
            replicas.push(ReplicaState {
                name,
                backend,
                watermark,
                watermark_path,
                metrics: replica_metrics,
                last_error_logged: None,
                reconciled: false,
            });
        }
        for state in &replicas {
            record_lag(&sources, state, None);
        }
        metrics.budget_bytes_per_second.store(config.bytes_per_second_max, Ordering::Relaxed);
        Ok(Replicator {
            throttle: Throttle::new(config.bytes_per_second_max, config.objects_per_second_max),
            adaptation: None,
            landing_checkpoint: None,
            sources,
            config,
            replicas,
            metrics: Arc::new(metrics),
            stop,
        })
    }

    /// One pass over every replica: datasets, then the archive. With `repair`, each replica is
    /// verified first and every difference re-copied from the source. A failing replica does not
    /// hold up the others; its error is in its report, counted and logged.
    pub fn pass(&mut self, repair: bool) -> Vec<PassReport> {
        let mut reports = Vec::new();
        for index in 0..self.replicas.len() {
            // Measured before the work too: a scrape during a long first pass must not read 0.
            record_lag(&self.sources, &self.replicas[index], self.landing_checkpoint.as_ref());
            let mut repaired = 0;
            let result = (|| {
                if repair {
                    repaired = self.repair(index)?;
                }
                let landing_checkpoint = self
                    .landing_checkpoint
                    .as_ref()
                    .map(|checkpoint| checkpoint.lock().expect("checkpoint lock").clone());
                let (mut pass, sources, config) = self.pass_over(index);
                if let Some(manifest_dir) = &sources.manifest_dir {
                    pass.datasets(manifest_dir)?;
                }
                if let Some(root) = &sources.archive_root {
                    pass.archive(root, config.copy_signing_key)?;
                    if let Some(review_dir) = &sources.review_dir {
                        pass.review(root, review_dir)?;
                    }
                }
                if let (Some(landing_dir), Some(checkpoint)) = (&sources.landing_dir, &landing_checkpoint) {
                    pass.landing(landing_dir, checkpoint)?;
                }
                Ok::<(), ReplicationError>(())
            })();
            let state = &mut self.replicas[index];
            state.metrics.passes.fetch_add(1, Ordering::Relaxed);
            let lag = record_lag(&self.sources, state, self.landing_checkpoint.as_ref());
            let error = match result {
                Ok(()) | Err(ReplicationError::Stopped) => None,
                Err(error) => {
                    state.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    if state.last_error_logged.is_none_or(|at| at.elapsed() >= ERROR_LOG_INTERVAL) {
                        state.last_error_logged = Some(Instant::now());
                        tracing::warn!(replica = %state.name, lag_bytes = lag, "replication pass failed (retried every pass): {error}");
                    }
                    Some(error.to_string())
                }
            };
            reports.push(PassReport { replica: state.name.clone(), error, repaired });
        }
        reports
    }

    /// With `adaptive = true`, the bandwidth budget follows `signal` from now on (starting at
    /// the floor); without it the signal is not read and the budget stays fixed.
    pub fn with_latency_signal(mut self, signal: LatencySignal) -> Replicator {
        if let Some(config) = self.config.adaptive_config() {
            let budget = adaptive::AdaptiveBudget::new(config);
            self.throttle.set_bytes_per_second(Instant::now(), budget.bytes_per_second());
            self.metrics.budget_bytes_per_second.store(budget.bytes_per_second(), Ordering::Relaxed);
            self.adaptation = Some(Adaptation { budget, signal });
            adapt(self.adaptation.as_mut(), &mut self.throttle, &self.metrics);
        }
        self
    }

    /// Replicates the committed raw landing too, as `checkpoint` (the lander's) says it stands.
    pub fn with_landing_checkpoint(mut self, checkpoint: LandingCheckpoint) -> Replicator {
        self.landing_checkpoint = Some(checkpoint);
        self
    }

    /// Whether the bandwidth budget follows an ingest latency signal.
    pub fn is_adaptive(&self) -> bool {
        self.adaptation.is_some()
    }

    /// Passes every `pass_interval_ms` until `stop`.
    pub fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            self.pass(false);
            let deadline = Instant::now() + Duration::from_millis(self.config.pass_interval_ms);
            while !self.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                // Between passes too, so that the budget and its metrics follow ingest.
                adapt(self.adaptation.as_mut(), &mut self.throttle, &self.metrics);
                std::thread::sleep(STOP_POLL);
            }
        }
    }

    pub fn replica_names(&self) -> Vec<String> {
        self.replicas.iter().map(|replica| replica.name.clone()).collect()
    }

    /// Compares replica `index` with the sources (their current state through the archive's newest
    /// checkpoint) by reading every object back; names every difference.
    pub fn verify(&self, index: usize) -> Result<Vec<Difference>, ReplicationError> {
        let replica = self.replicas[index].backend.as_ref();
        let bytes_max = self.config.object_bytes_max;
        let mut differences = Vec::new();
        let mut differ = |key: String, problem: String, repair: Repair| {
            differences.push(Difference { key, problem, repair })
        };
        if let Some(manifest_dir) = &self.sources.manifest_dir {
            for dataset in dataset_names(manifest_dir)? {
                let manifest_path = manifest_dir.join(&dataset).join("manifest.json");
                let (bytes, manifest) = read_manifest(&manifest_path)?;
                for shard in &manifest.shards {
                    let key = format!("datasets/{dataset}/{}", shard.name);
                    let repair = Repair::File { path: shard.path.clone(), offset: 0, length: shard.bytes };
                    match replica.get(&key, bytes_max.max(shard.bytes + 1))? {
                        None => differ(key, "missing".into(), repair),
                        Some(found) if found.len() as u64 != shard.bytes => differ(
                            key,
                            format!("{} bytes, the source has {}", found.len(), shard.bytes),
                            repair,
                        ),
                        Some(found) => {
                            let hash = sha256_hex(&sha256(&found));
                            if hash != shard.sha256 {
                                differ(
                                    key,
                                    format!("sha256 {hash}, the source has {}", shard.sha256),
                                    repair,
                                );
                            }
                        }
                    }
                }
                let key = format!("datasets/{dataset}/manifest.json");
                let repair =
                    Repair::File { path: manifest_path.clone(), offset: 0, length: bytes.len() as u64 };
                match replica.get(&key, MANIFEST_BYTES_MAX)? {
                    None => differ(key, "missing".into(), repair),
                    Some(found) if found != bytes => {
                        differ(key, "differs from the source's manifest".into(), repair)
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(root) = &self.sources.archive_root {
            let checkpoints = read_all_checkpoints(root)?;
            let (checkpoints_end, cut) = checkpoints.last().copied().unwrap_or((0, 0));
            let records = read_index_records(root, 0, cut)?;
            let entries_end = records.last().map_or(0, IndexRecord::end);
            for (file, path, end) in [
                ("entries", entries_path(root), entries_end),
                ("index", index_path(root), index_bytes(cut)),
                ("checkpoints", checkpoints_path(root), checkpoints_end),
            ] {
                let segments = list_segments(replica, file)?;
                let (chain, chain_end) = segment_chain(&segments);
                for (start, segment_end, key, size) in &chain {
                    let repair =
                        Repair::File { path: path.clone(), offset: *start, length: segment_end - start };
                    if *segment_end > end {
                        differ(
                            key.clone(),
                            format!("reaches byte {segment_end}, the source's cut ends at {end}"),
                            repair,
                        );
                        continue;
                    }
                    let source = read_range(&path, *start, segment_end - start)?;
                    match replica.get(key, SEGMENT_BYTES_MAX.max(*size).max(segment_end - start))? {
                        None => differ(key.clone(), "missing".into(), repair),
                        Some(found) if found != source => differ(
                            key.clone(),
                            format!(
                                "{} bytes with sha256 {}, the source's bytes {start}..{segment_end} differ",
                                found.len(),
                                sha256_hex(&sha256(&found))
                            ),
                            repair,
                        ),
                        Some(_) => {}
                    }
                }
                if chain_end < end {
                    // A gap (a deleted segment) or a replica behind: the bytes from the chain's end
                    // to the next segment (or the cut) are missing.
                    let next = segments
                        .iter()
                        .map(|segment| segment.0)
                        .filter(|&start| start > chain_end)
                        .min()
                        .unwrap_or(end)
                        .min(end);
                    differ(
                        segment_key(file, chain_end, next),
                        format!(
                            "missing: the replica's {file} stop at byte {chain_end}, the source's at {end}"
                        ),
                        Repair::File { path: path.clone(), offset: chain_end, length: next - chain_end },
                    );
                }
            }
            let entries_file_path = entries_path(root);
            if let Some(entries_file) = open_checked(&entries_file_path, ENTRIES_MAGIC)
                .map_err(|error| source_error(&entries_file_path, error))?
            {
                for_each_entry_object(&entries_file, &entries_file_path, &records, |leaf, role, digest| {
                    let key = object_key(&digest);
                    match replica.get(&key, bytes_max)? {
                        None => differ(
                            key,
                            format!("missing ({role} of entry {}/{})", leaf.device, leaf.id()),
                            Repair::ArchiveObject(digest),
                        ),
                        Some(found) if sha256(&found) != digest => differ(
                            key,
                            format!(
                                "sha256 {} does not match its address ({role} of entry {}/{})",
                                sha256_hex(&sha256(&found)),
                                leaf.device,
                                leaf.id()
                            ),
                            Repair::ArchiveObject(digest),
                        ),
                        Some(_) => {}
                    }
                    Ok(())
                })?;
            }
            let path = archive::checkpoint::verifier_key_path(root);
            if let Some(source) =
                fleet::files::read_bounded(&path, 64 * 1024).map_err(|error| source_error(&path, error))?
            {
                let key = "archive/keys/checkpoint.vkey".to_string();
                let repair = Repair::File { path: path.clone(), offset: 0, length: source.len() as u64 };
                match replica.get(&key, 64 * 1024)? {
                    None => differ(key, "missing".into(), repair),
                    Some(found) if found != source => {
                        differ(key, "differs from the source's verifier key".into(), repair)
                    }
                    Some(_) => {}
                }
            }
            if let Some(review_dir) = &self.sources.review_dir {
                let published = crate::archive_feed::published_review_shards(root)
                    .map_err(|error| source_error(root, format!("{error:#}")))?;
                for seq in 0..published {
                    let name = crate::archive_feed::review_shard_name(seq);
                    let path = review_dir.join(&name);
                    let source = fleet::files::read_bounded(&path, bytes_max)
                        .map_err(|error| source_error(&path, error))?
                        .ok_or_else(|| source_error(&path, "published but missing"))?;
                    let key = format!("review/{name}");
                    let repair = Repair::File { path, offset: 0, length: source.len() as u64 };
                    match replica.get(&key, bytes_max)? {
                        None => differ(key, "missing".into(), repair),
                        Some(found) if found != source => {
                            differ(key, "differs from the source's review shard".into(), repair)
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        // The raw landing segments the replica holds, each against the landing file's bytes, and
        // gaps in a file's chain of segments (what lies beyond the chain is lag, not a difference).
        if let (Some(landing_dir), Some(_)) = (&self.sources.landing_dir, &self.landing_checkpoint) {
            let mut files: BTreeMap<String, Vec<(u64, u64, String, u64)>> = BTreeMap::new();
            for (key, size) in replica.list("landing/raw/")? {
                if let Some((file, range)) = key.rsplit_once('/')
                    && let Some((start, end)) = parse_range_name(range)
                {
                    files.entry(file.to_string()).or_default().push((start, end, key.clone(), size));
                }
            }
            for (file, segments) in files {
                let parts: Vec<&str> = file.split('/').collect();
                let [_, _, device, lane, first_seq] = parts[..] else { continue };
                let (Ok(lane), Ok(first_seq)) = (lane.parse::<protocol::Lane>(), first_seq.parse::<u64>())
                else {
                    continue;
                };
                let path = crate::landing::raw_file_path(landing_dir, device, lane, first_seq);
                let (chain, chain_end) = segment_chain(&segments);
                for (start, end, key, _) in &chain {
                    let repair = Repair::File { path: path.clone(), offset: *start, length: end - start };
                    let source = read_range(&path, *start, end - start)?;
                    match replica.get(key, SEGMENT_BYTES_MAX.max(end - start))? {
                        None => differ(key.clone(), "missing".into(), repair),
                        Some(found) if found != source => differ(
                            key.clone(),
                            format!("the landing file's bytes {start}..{end} differ"),
                            repair,
                        ),
                        Some(_) => {}
                    }
                }
                if let Some(next) =
                    segments.iter().map(|segment| segment.0).filter(|&start| start > chain_end).min()
                {
                    differ(
                        format!("{file}/{chain_end:020}-{next:020}"),
                        format!(
                            "missing: the replica's segments of {file} stop at byte {chain_end}, the next starts at {next}"
                        ),
                        Repair::File { path: path.clone(), offset: chain_end, length: next - chain_end },
                    );
                }
            }
        }
        Ok(differences)
    }

    /// A pass over replica `index`, with the sources and config it reads (borrowed alongside it).
    fn pass_over(&mut self, index: usize) -> (Pass<'_>, &Sources, &ReplicationConfig) {
        let pass = Pass {
            state: &mut self.replicas[index],
            throttle: &mut self.throttle,
            adaptation: self.adaptation.as_mut(),
            metrics: &self.metrics,
            stop: &self.stop,
            chunk_bytes: self.config.chunk_bytes,
        };
        (pass, &self.sources, &self.config)
    }

    /// Verifies replica `index` and re-copies every difference from the source; returns how many.
    fn repair(&mut self, index: usize) -> Result<u64, ReplicationError> {
        let differences = self.verify(index)?;
        let objects = match &self.sources.archive_root {
            Some(root) => Some(archive::Objects::for_audit(root).map_err(|error| source_error(root, error))?),
            None => None,
        };
        let (mut pass, _, _) = self.pass_over(index);
        for difference in &differences {
            let source = match &difference.repair {
                Repair::File { path, offset, length } => {
                    Source::File { path, offset: *offset, length: *length, sha256: None }
                }
                Repair::ArchiveObject(digest) => Source::Bytes(
                    objects
                        .as_ref()
                        .expect("archive objects differ only with an archive")
                        .read(digest)
                        .map_err(|error| source_error(Path::new(&difference.key), error))?,
                ),
            };
            tracing::info!(replica = %pass.state.name, key = %difference.key, problem = %difference.problem, "repairing the replica from the source");
            pass.put(&difference.key, source, WriteMode::Overwrite)?;
            pass.state.metrics.repairs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(differences.len() as u64)
    }
}

/// Every checkpoint of the archive at `root`: (end offset, tree size).
fn read_all_checkpoints(root: &Path) -> Result<Vec<(u64, u64)>, ReplicationError> {
    let mut all = Vec::new();
    let mut offset = 0;
    loop {
        let batch = read_checkpoints_after(root, offset)?;
        let full = batch.len() == CHECKPOINTS_PER_PASS_MAX;
        if let Some(&(end, _)) = batch.last() {
            offset = end;
        }
        all.extend(batch);
        if !full {
            return Ok(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_follows_the_longest_segment_and_stops_at_a_gap() {
        let segment = |start: u64, end: u64| (start, end, segment_key("entries", start, end), end - start);
        // A resumed pass wrote 0..150 after 0..100: both hold a prefix of the same file.
        let (chain, end) =
            segment_chain(&[segment(0, 100), segment(0, 150), segment(150, 200), segment(300, 400)]);
        assert_eq!(chain.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(), vec![(0, 150), (150, 200)]);
        assert_eq!(end, 200);
        assert_eq!(parse_segment_key(&segment_key("index", 8, 68), "index"), Some((8, 68)));
        assert_eq!(parse_segment_key("archive/log/index/8-68", "index"), None);
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut config = ReplicationConfig::directory("site-b", Path::new("/replica"));
        config.replicas[0].s3 = Some(archive::ObjectsConfig::s3("bucket", None, ""));
        let error = config.validate().unwrap_err();
        assert!(error.contains("replication.replicas[0]: expected exactly one of"), "{error}");
        let mut config = ReplicationConfig::directory("site b", Path::new("/replica"));
        assert!(config.validate().unwrap_err().contains("replication.replicas[0].name"));
        config.replicas[0].name = "b".into();
        config.bytes_per_second_max = 0;
        assert!(config.validate().unwrap_err().contains("replication.bytes_per_second_max = 0"));
        config.bytes_per_second_max = 1 << 20;
        config.bytes_per_second_min = Some(2 << 20);
        let error = config.validate().unwrap_err();
        assert!(
            error
                .contains("replication.bytes_per_second_min = 2097152: expected 1024..=bytes_per_second_max"),
            "{error}"
        );
        config.bytes_per_second_min = None;
        assert_eq!(config.bytes_per_second_min(), 65_536);
        config.ingest_latency_target_ms = Some(0);
        assert!(config.validate().unwrap_err().contains("replication.ingest_latency_target_ms = 0"));
        config.ingest_latency_target_ms = None;
        config.ingest_latency_factor = 0.5;
        assert!(config.validate().unwrap_err().contains("replication.ingest_latency_factor = 0.5"));
        config.ingest_latency_factor = 2.0;
        config.adaptive_interval_ms = 1;
        assert!(config.validate().unwrap_err().contains("replication.adaptive_interval_ms = 1"));
        config.adaptive_interval_ms = 500;
        assert_eq!(config.validate(), Ok(()));
    }
}
