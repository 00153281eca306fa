//! The archive feed: turns the committed audit lane of the raw landing into the core archive of
//! AI decisions (`archive` crate) and a `review` WebDataset of low-score decisions.
//!
//! Like the dataset pipeline, it reads only what the lander committed, in seq order per device,
//! and never holds up Acks: whatever it has not consumed is read again from the raw landing.
//!
//! Exactly once: the feed's consumed position per device (raw file, offset, last seq) is written
//! to `<archive root>/feed/positions.json` (temporary file, fsync, rename, fsync directory) only
//! after the archive flushed (entries durable, checkpoint signed) and the review shard holding the
//! same chunks was published. After a crash, reading resumes at the persisted position; the
//! records replayed are already in the log and the archive's idempotence (one entry per device,
//! kind and id) drops them, while the review shard they went into was never published and is
//! rebuilt. Review shards are `<review_dir>/review-<shard seq, 8 digits>.tar`; at start, the
//! in-progress `.review-*.tar.partial` and any shard numbered at or above the persisted next shard
//! seq (published after the last positions write) are removed.
//!
//! Review sample: `<device>_<decision id>.<jpg|png|webp|bin>` (the original input) and
//! `<device>_<decision id>.json` (the prediction), for decisions with `score < review_score_max`.
//! Dots in a device id become '-' so WebDataset groups the two members into one sample.
//!
//! Limits: `READ_STEP_BYTES` of raw landing per device per step; `POSITIONS_BYTES_MAX` for the
//! positions file; at most `checkpoint_every_entries` entries or `flush_interval_ms` between
//! persists.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use archive::{Archive, ArchiveError, IngestOutcome, IngestedRecord};
use protocol::evidence::{Evidence, sha256_hex};
use protocol::{ChunkHeader, Lane, decode_records};
use serde::{Deserialize, Serialize};

use crate::datasets::tar::TarShardWriter;
use crate::dictionaries::{DECOMPRESSOR_CACHE_BYTES_MAX, DecompressorCache, DictionaryStore};
use crate::landing::{CommittedLanding, ReadPosition};

/// Raw bytes read per device per step (overshot by at most one record), so one huge backlog
/// cannot hold the feed.
const READ_STEP_BYTES: u64 = 16 * 1024 * 1024;
/// Largest positions file (about 150 bytes per device).
const POSITIONS_BYTES_MAX: u64 = 16 * 1024 * 1024;
const POSITIONS_FORMAT_VERSION: u32 = 1;
const REVIEW_PREFIX: &str = "review-";

/// `[archive]` in sink.toml.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// The archive's directory (objects, log, keys, feed positions).
    pub root: PathBuf,
    /// The log's name in every signed checkpoint; also the signing key's name.
    #[serde(default = "default_origin")]
    pub origin: String,
    /// Most entries between two signed checkpoints.
    #[serde(default = "default_checkpoint_every_entries")]
    pub checkpoint_every_entries: u64,
    /// Longest time consumed records wait before a flush, checkpoint and positions write.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Decisions scoring below this go to the review dataset; 0 disables it.
    #[serde(default = "default_review_score_max")]
    pub review_score_max: f32,
    /// Where review shards are published.
    pub review_dir: PathBuf,
    /// Where originals, modified inputs and models are stored: `[archive.objects]`, `kind =
    /// "local"` (under `root`, the default) or `"s3"` (see `archive::ObjectsConfig`).
    #[serde(default)]
    pub objects: archive::ObjectsConfig,
}

fn default_origin() -> String {
    "tributary/core-archive".to_string()
}
fn default_checkpoint_every_entries() -> u64 {
    1000
}
fn default_flush_interval_ms() -> u64 {
    1000
}
fn default_review_score_max() -> f32 {
    0.5
}

impl ArchiveConfig {
    /// Defaults for everything but the directories.
    pub fn new(root: PathBuf, review_dir: PathBuf) -> ArchiveConfig {
        ArchiveConfig {
            root,
            origin: default_origin(),
            checkpoint_every_entries: default_checkpoint_every_entries(),
            flush_interval_ms: default_flush_interval_ms(),
            review_score_max: default_review_score_max(),
            review_dir,
            objects: archive::ObjectsConfig::local(),
        }
    }

    fn library_config(&self) -> archive::ArchiveConfig {
        archive::ArchiveConfig {
            root: self.root.clone(),
            origin: self.origin.clone(),
            checkpoint_every_entries: self.checkpoint_every_entries,
            objects: self.objects.clone(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        // `objects.bucket: …` becomes `archive.objects.bucket: …`, the key as written in sink.toml.
        self.objects.validate().map_err(|message| format!("archive.{message}"))?;
        self.library_config().validate().map_err(|message| format!("archive: {message}"))?;
        if !(10..=3_600_000).contains(&self.flush_interval_ms) {
            return Err(format!(
                "archive.flush_interval_ms = {}: expected 10..=3600000",
                self.flush_interval_ms
            ));
        }
        if !self.review_score_max.is_finite() || !(0.0..=1.0).contains(&self.review_score_max) {
            return Err(format!("archive.review_score_max = {}: expected 0..=1", self.review_score_max));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct ArchiveFeedMetrics {
    pub decisions_archived: AtomicU64,
    pub models_archived: AtomicU64,
    /// Records already in the log (replayed after a crash).
    pub duplicates: AtomicU64,
    /// Records the archive refuses (not evidence, invalid evidence); the raw landing keeps them.
    pub rejected_records: AtomicU64,
    pub undecodable_chunks: AtomicU64,
    pub review_samples: AtomicU64,
    pub review_shards_published: AtomicU64,
    /// Steps that failed and made the feed reopen the archive.
    pub failures: AtomicU64,
}

/// A `ReadPosition` as the positions file spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Position {
    raw_file_first_seq: u64,
    raw_offset: u64,
    through_seq: u64,
}

impl From<Position> for ReadPosition {
    fn from(position: Position) -> ReadPosition {
        ReadPosition {
            file_first_seq: position.raw_file_first_seq,
            offset: position.raw_offset,
            through_seq: position.through_seq,
        }
    }
}

impl From<ReadPosition> for Position {
    fn from(position: ReadPosition) -> Position {
        Position {
            raw_file_first_seq: position.file_first_seq,
            raw_offset: position.offset,
            through_seq: position.through_seq,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedState {
    version: u32,
    next_review_shard_seq: u64,
    consumed: BTreeMap<String, Position>,
}

fn positions_path(root: &Path) -> PathBuf {
    root.join("feed").join("positions.json")
}

fn read_state(root: &Path) -> anyhow::Result<FeedState> {
    let path = positions_path(root);
    let length = match fs::metadata(&path) {
        Ok(metadata) => metadata.len(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FeedState { version: POSITIONS_FORMAT_VERSION, ..FeedState::default() });
        }
        Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
    };
    anyhow::ensure!(
        length <= POSITIONS_BYTES_MAX,
        "{}: {length} bytes exceed {POSITIONS_BYTES_MAX}",
        path.display()
    );
    let bytes = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    let state: FeedState =
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    anyhow::ensure!(
        state.version == POSITIONS_FORMAT_VERSION,
        "{}: format version {} is not supported (this build reads {POSITIONS_FORMAT_VERSION})",
        path.display(),
        state.version
    );
    Ok(state)
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(durable::Options::default().create_directory().write(path, bytes)?)
}

/// The review shards the feed published durably (their positions write is done): seqs
/// `0..published_review_shards(root)`, named by `review_shard_name`. Replication reads this
/// instead of listing the review directory.
pub fn published_review_shards(root: &Path) -> anyhow::Result<u64> {
    Ok(read_state(root)?.next_review_shard_seq)
}

/// The file name of review shard `seq` in `review_dir`.
pub fn review_shard_name(seq: u64) -> String {
    format!("{REVIEW_PREFIX}{seq:08}.tar")
}

fn review_shard_seq(name: &str) -> Option<u64> {
    name.strip_prefix(REVIEW_PREFIX)?.strip_suffix(".tar")?.parse().ok()
}

struct OpenReview {
    writer: TarShardWriter<BufWriter<File>>,
    partial_path: PathBuf,
    samples: u64,
}

/// Reads the committed audit lane into the archive; see the module doc.
pub struct ArchiveFeed {
    config: ArchiveConfig,
    landing_dir: PathBuf,
    archive: Archive,
    dictionaries: Arc<DictionaryStore>,
    /// Per device: its decompressor with its dictionaries loaded (bounded, least recently used
    /// devices dropped).
    decompressors: DecompressorCache,
    /// Read positions, ahead of `persisted` between persists.
    positions: BTreeMap<String, Position>,
    persisted: FeedState,
    review: Option<OpenReview>,
    /// Records consumed since the last persist.
    unpersisted_records: u64,
    last_persist: Instant,
    pub metrics: Arc<ArchiveFeedMetrics>,
}

impl ArchiveFeed {
    /// Opens the archive (recovering it) and the feed's positions; removes review files a crash
    /// left unlisted.
    pub fn open(
        config: ArchiveConfig,
        landing_dir: &Path,
        dictionaries: Arc<DictionaryStore>,
        metrics: Arc<ArchiveFeedMetrics>,
    ) -> anyhow::Result<ArchiveFeed> {
        config.validate().map_err(|message| anyhow::anyhow!("invalid archive config: {message}"))?;
        let archive = Archive::open(config.library_config())
            .with_context(|| format!("open the archive at {}", config.root.display()))?;
        let persisted = read_state(&config.root)?;
        fs::create_dir_all(&config.review_dir)
            .with_context(|| format!("create review_dir {}", config.review_dir.display()))?;
        for entry in fs::read_dir(&config.review_dir)
            .with_context(|| format!("list {}", config.review_dir.display()))?
        {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else { continue };
            let in_progress =
                name.starts_with(&format!(".{REVIEW_PREFIX}")) && name.ends_with(".tar.partial");
            let unlisted = review_shard_seq(name).is_some_and(|seq| seq >= persisted.next_review_shard_seq);
            if in_progress || unlisted {
                tracing::info!(path = %path.display(), "removing a review shard published after the last positions write");
                fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
            }
        }
        Ok(ArchiveFeed {
            positions: persisted.consumed.clone(),
            persisted,
            landing_dir: landing_dir.to_path_buf(),
            archive,
            dictionaries,
            decompressors: DecompressorCache::new(DECOMPRESSOR_CACHE_BYTES_MAX),
            review: None,
            unpersisted_records: 0,
            last_persist: Instant::now(),
            metrics,
            config,
        })
    }

    /// Runs until `stop` is set: after each commit (or every `poll`) consumes what is committed;
    /// on stop, persists. A failed step drops the archive and reopens it (recovery), resuming
    /// from the persisted positions.
    pub fn run(self, checkpoint: Arc<Mutex<Vec<u8>>>, stop: Arc<AtomicBool>, poll: Duration) {
        let (config, landing_dir) = (self.config.clone(), self.landing_dir.clone());
        let (dictionaries, metrics) = (self.dictionaries.clone(), self.metrics.clone());
        let mut feed = Some(self);
        loop {
            let current = match feed.take() {
                Some(current) => current,
                None => match ArchiveFeed::open(
                    config.clone(),
                    &landing_dir,
                    dictionaries.clone(),
                    metrics.clone(),
                ) {
                    Ok(reopened) => reopened,
                    Err(error) => {
                        tracing::error!(error = %format!("{error:#}"), "archive feed cannot reopen the archive; will retry");
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(poll.max(Duration::from_secs(1)));
                        continue;
                    }
                },
            };
            match current.run_until_error(&checkpoint, &stop, poll) {
                Ok(()) => return,
                Err(error) => {
                    metrics.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %format!("{error:#}"), "archive feed step failed; reopening from the persisted positions");
                    std::thread::sleep(poll);
                }
            }
        }
    }

    fn run_until_error(
        mut self,
        checkpoint: &Mutex<Vec<u8>>,
        stop: &AtomicBool,
        poll: Duration,
    ) -> anyhow::Result<()> {
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let committed = checkpoint.lock().expect("checkpoint lock").clone();
            let progressed = self.step(&committed)?;
            let interval = Duration::from_millis(self.config.flush_interval_ms);
            if self.unpersisted_records > 0
                && (self.unpersisted_records >= self.config.checkpoint_every_entries
                    || self.last_persist.elapsed() >= interval)
            {
                self.persist()?;
            }
            if progressed {
                continue; // a backlog: keep going, one bounded step at a time
            }
            if stopping {
                return self.persist();
            }
            std::thread::sleep(poll);
        }
    }

    /// The archive this feed writes.
    pub fn archive(&self) -> &Archive {
        &self.archive
    }

    /// One pass over every device's committed audit lane (at most `READ_STEP_BYTES` each).
    /// Returns whether anything was consumed. Nothing is durable until [`ArchiveFeed::persist`].
    pub fn step(&mut self, checkpoint: &[u8]) -> anyhow::Result<bool> {
        let committed = CommittedLanding::new(&self.landing_dir, checkpoint)?;
        let mut progressed = false;
        for (device, lane) in committed.lanes() {
            if lane == Lane::Audit {
                progressed |= self.consume(&committed, device)? > 0;
            }
        }
        Ok(progressed)
    }

    /// Reads committed audit chunks of `device`; returns the bytes read.
    fn consume(&mut self, committed: &CommittedLanding, device: &str) -> anyhow::Result<u64> {
        let from: ReadPosition = self.positions.get(device).copied().unwrap_or_default().into();
        let mut reader = committed.read(device, Lane::Audit, from)?;
        while reader.bytes_read() < READ_STEP_BYTES {
            let Some(chunk) = reader.next_chunk()? else { break };
            self.consume_chunk(device, &chunk.header, chunk.body())?;
        }
        if reader.position() != from {
            self.positions.insert(device.to_string(), reader.position().into());
        }
        Ok(reader.bytes_read())
    }

    /// Ingests a committed chunk's records.
    fn consume_chunk(&mut self, device: &str, header: &ChunkHeader, body: &[u8]) -> anyhow::Result<()> {
        let raw = match self.decompressors.decompress(&self.dictionaries, device, header, body)? {
            Ok(raw) => raw,
            Err(error) => {
                tracing::error!(%device, seq = header.seq, %error, "audit chunk cannot be decoded for the archive");
                self.metrics.undecodable_chunks.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        };
        let records = match decode_records(header, &raw) {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(%device, seq = header.seq, %error, "audit chunk's records do not decode");
                self.metrics.undecodable_chunks.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        };
        for (index, record) in records.iter().enumerate() {
            let record_index = u32::try_from(index).expect("records per chunk fit u32");
            let ingested = match self.archive.ingest_record(device, header.seq, record_index, record) {
                Ok(ingested) => ingested,
                Err(ArchiveError::Rejected { key, reason }) => {
                    tracing::warn!(%device, seq = header.seq, %key, %reason, "audit record not archived");
                    self.metrics.rejected_records.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let counter = match (&ingested.outcome, &ingested.record) {
                (IngestOutcome::Duplicate { .. }, _) => &self.metrics.duplicates,
                (_, IngestedRecord::Decision(_)) => &self.metrics.decisions_archived,
                (_, IngestedRecord::Model { .. }) => &self.metrics.models_archived,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            // Review follows the feed's positions, not the log: a replayed decision whose shard
            // was never published goes into the new one.
            if let IngestedRecord::Decision(evidence) = &ingested.record
                && evidence.decision.score < self.config.review_score_max
            {
                self.add_review_sample(device, header.seq, record_index, evidence)?;
            }
        }
        self.unpersisted_records += records.len() as u64;
        Ok(())
    }

    fn add_review_sample(
        &mut self,
        device: &str,
        seq: u64,
        record_index: u32,
        evidence: &Evidence,
    ) -> anyhow::Result<()> {
        if self.review.is_none() {
            let name = format!(".{REVIEW_PREFIX}{:08}.tar.partial", self.persisted.next_review_shard_seq);
            let partial_path = self.config.review_dir.join(name);
            let file =
                File::create(&partial_path).with_context(|| format!("create {}", partial_path.display()))?;
            self.review = Some(OpenReview {
                writer: TarShardWriter::new(BufWriter::new(file)),
                partial_path,
                samples: 0,
            });
        }
        let review = self.review.as_mut().expect("opened above");
        let decision = &evidence.decision;
        let key = format!("{}_{}", device.replace('.', "-"), decision.decision_id);
        let extension = match evidence.original.content_type.as_str() {
            "image/jpeg" => "jpg",
            "image/png" => "png",
            "image/webp" => "webp",
            _ => "bin",
        };
        let metadata = serde_json::json!({
            "device": device,
            "decision_id": decision.decision_id,
            "decided_at_us": decision.decided_at_us,
            "label": decision.label,
            "label_index": decision.label_index,
            "score": decision.score,
            "scores": decision.scores,
            "model_name": decision.model_name,
            "model_sha256": sha256_hex(&decision.model_sha256),
            "original_content_type": evidence.original.content_type,
            "original_sha256": sha256_hex(&evidence.original.sha256),
            "audit_seq": seq,
            "record_index": record_index,
        });
        let mtime_seconds = decision.decided_at_us / 1_000_000;
        let original_name = format!("{key}.{extension}");
        match review.writer.append_file(&original_name, mtime_seconds, &evidence.original.bytes) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::InvalidInput => {
                // A name ustar cannot hold (device and id both near their limits): the decision
                // is archived, only its review sample is skipped.
                tracing::warn!(%device, decision = %decision.decision_id, %error, "decision left out of the review dataset");
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        }
        let json = serde_json::to_vec(&metadata).expect("json");
        review.writer.append_file(&format!("{key}.json"), mtime_seconds, &json)?;
        review.samples += 1;
        self.metrics.review_samples.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes everything consumed durable: archive flush (entries and a signed checkpoint), then
    /// the review shard, then the positions.
    pub fn persist(&mut self) -> anyhow::Result<()> {
        self.archive.flush()?;
        let mut next_review_shard_seq = self.persisted.next_review_shard_seq;
        if let Some(review) = self.review.take() {
            let file = review.writer.finish()?.into_inner().map_err(|error| {
                anyhow::anyhow!("flush {}: {}", review.partial_path.display(), error.error())
            })?;
            durable::sync_file(&file, &review.partial_path)?;
            drop(file);
            let published = self.config.review_dir.join(review_shard_name(next_review_shard_seq));
            durable::rename_into_place(&review.partial_path, &published)?;
            tracing::info!(shard = %published.display(), samples = review.samples, "review shard published");
            self.metrics.review_shards_published.fetch_add(1, Ordering::Relaxed);
            next_review_shard_seq += 1;
        }
        let state = FeedState {
            version: POSITIONS_FORMAT_VERSION,
            next_review_shard_seq,
            consumed: self.positions.clone(),
        };
        if state != self.persisted {
            let bytes = serde_json::to_vec_pretty(&state).expect("json");
            write_synced(&positions_path(&self.config.root), &bytes)?;
            self.persisted = state;
        }
        self.unpersisted_records = 0;
        self.last_persist = Instant::now();
        Ok(())
    }
}

/// The feed's thread, as the sink starts and stops it.
pub struct FeedRunner {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    pub metrics: Arc<ArchiveFeedMetrics>,
}

impl FeedRunner {
    /// Opens the archive (so configuration and recovery errors fail the sink's start) and starts
    /// the feed on its own thread, reading `checkpoint` (the lander's latest committed landing).
    pub fn start(
        config: ArchiveConfig,
        landing_dir: &Path,
        dictionaries: Arc<DictionaryStore>,
        checkpoint: Arc<Mutex<Vec<u8>>>,
        poll: Duration,
    ) -> anyhow::Result<FeedRunner> {
        let metrics = Arc::new(ArchiveFeedMetrics::default());
        let feed = ArchiveFeed::open(config, landing_dir, dictionaries, metrics.clone())?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("sink-archive".into()).spawn({
            let stop = stop.clone();
            move || feed.run(checkpoint, stop, poll)
        })?;
        Ok(FeedRunner { stop, thread, metrics })
    }

    /// Asks the feed to consume what is committed, persist and stop.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the feed and waits for its last persist. Blocking.
    pub fn stop_and_join(self) {
        self.request_stop();
        if self.thread.join().is_err() {
            tracing::error!("the archive feed thread panicked");
        }
    }
}
