//! The dataset pipeline: turns committed raw landing into training datasets.
//!
//! The raw landing is the durable record (what Acks cover); datasets are derived from it after
//! each commit point, so a slow or full dataset target never holds up Acks and never loses data:
//! whatever was not published is regenerated from the raw landing. Per dataset there is at most
//! one open shard; shards rotate at chunk boundaries by size or age, each on the next target
//! (round robin, or the one with most free space), and the manifest is replaced after each
//! publish with the shard and the consumed position of every (device, lane).
//!
//! Exactly once: a chunk is in a published shard iff its seq is at or below the manifest's
//! consumed `through_seq`; reading resumes from the manifest's raw position; on start, in-progress
//! files and published files the manifest does not list (a crash between rename and manifest)
//! are deleted.
//!
//! Bucket targets (`targets.rs`): the local manifest stays the checkpoint and is written only
//! after the shard's create-only publish succeeded; the bucket's copy of the manifest and its
//! wids index are put after it (stale ones again every step), and unlisted keys of this node are
//! deleted by the target's recovery before it gets a shard (on start, after a failed publish).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{ChunkHeader, Lane, decode_records};

use super::manifest::{Consumed, Manifest, QUARANTINE_LISTED_MAX, QuarantinedChunk, SeqRange, ShardEntry};
use super::targets::{ShardFormat, Target};
use super::typed::{self, CONFLICTS_LISTED_MAX, TypedColumn};
use super::{DatasetsConfig, Placement};
use crate::dictionaries::{DECOMPRESSOR_CACHE_BYTES_MAX, DecompressorCache, DictionaryStore};
use crate::landing::{CommittedLanding, ReadPosition};

/// Raw bytes read per (device, lane) per step (overshot by at most one record), so one huge
/// backlog cannot hold the whole pipeline.
const READ_STEP_BYTES: u64 = 16 * 1024 * 1024;
/// One log line per repeating condition (a failing step, quarantined chunks) per this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct DatasetMetrics {
    pub shards_published: AtomicU64,
    pub samples_published: AtomicU64,
    pub shard_failures: AtomicU64,
    pub undecodable_chunks: AtomicU64,
    /// Chunks whose records fail validation (keys that would break WebDataset, bad layout):
    /// quarantined, i.e. left out of the dataset and listed in its manifest.
    pub rejected_chunks: AtomicU64,
    /// Pipeline steps that failed (a dataset target or the raw landing could not be read).
    pub step_failures: AtomicU64,
    /// Dictionary bytes loaded in the pipeline's decompressors (bounded by
    /// `DECOMPRESSOR_CACHE_BYTES_MAX`), and devices dropped from them to stay within it.
    pub dictionary_cache_bytes: AtomicU64,
    pub dictionary_cache_evictions: AtomicU64,
    /// Values in published shards that did not fit their typed column (cell null, raw JSON kept).
    pub type_conflicts: AtomicU64,
    /// Bucket targets: shard bytes and parts uploaded (retried uploads count again), shard
    /// uploads that failed (the records go into a shard again later), and manifest or wids index
    /// puts that failed (retried every step; the bucket's manifest lags the local one meanwhile).
    pub upload_bytes: AtomicU64,
    pub upload_parts: AtomicU64,
    pub upload_failures: AtomicU64,
    pub bucket_manifest_failures: AtomicU64,
}

struct OpenShard {
    id: u64,
    target: usize,
    shard_seq: u64,
    name: String,
    published_path: PathBuf,
    /// The published path below the target directory.
    relative_path: String,
    /// The `date=` partition (UTC date of the shard's first record), for partitioned datasets.
    date: Option<String>,
    opened_at: Instant,
    bytes: u64,
    samples: u64,
    ranges: BTreeMap<(String, Lane), (u64, u64)>,
    time_range_us: [u64; 2],
}

struct Dataset {
    name: &'static str,
    format: ShardFormat,
    lanes: &'static [Lane],
    /// Shards go under `date=YYYY-MM-DD/` by their first record's UTC date.
    partition_by_date: bool,
    /// Typed columns every shard has (`[datasets.sensor.schema]`).
    declared_columns: Vec<TypedColumn>,
    manifest: Manifest,
    manifest_path: PathBuf,
    /// Read positions, ahead of the manifest while a shard is open.
    positions: BTreeMap<(String, Lane), ReadPosition>,
    /// Chunks quarantined since the manifest was written (the newest `QUARANTINE_LISTED_MAX`
    /// listed, all counted); the next manifest takes them.
    quarantined: Vec<QuarantinedChunk>,
    quarantined_count: u64,
    open: Option<OpenShard>,
    /// The bucket targets' copies of the manifest (and wids index) are behind the local one.
    bucket_manifest_stale: bool,
}

impl Dataset {
    fn extension(&self) -> &'static str {
        self.format.extension()
    }

    fn published_positions(&self) -> BTreeMap<(String, Lane), ReadPosition> {
        self.manifest
            .consumed
            .iter()
            .filter_map(|consumed| {
                let lane: Lane = consumed.lane.parse().ok()?;
                Some((
                    (consumed.device.clone(), lane),
                    ReadPosition {
                        file_first_seq: consumed.raw_file_first_seq,
                        offset: consumed.raw_offset,
                        through_seq: consumed.through_seq,
                    },
                ))
            })
            .collect()
    }
}

pub struct Pipeline {
    config: DatasetsConfig,
    landing_dir: PathBuf,
    targets: Vec<Target>,
    unhealthy_until: Vec<Option<Instant>>,
    /// Per target: whether a bucket target's recovery (deleting keys its manifests do not list)
    /// is still to do; such a target gets no shard. Directory targets recover in `open`.
    recovery_pending: Vec<bool>,
    datasets: Vec<Dataset>,
    dictionaries: Arc<DictionaryStore>,
    /// Per device: its decompressor with its dictionaries loaded (bounded, least recently used
    /// devices dropped).
    decompressors: DecompressorCache,
    next_shard_id: u64,
    pub metrics: Arc<DatasetMetrics>,
    step_failure_log: telemetry::LogRateLimit,
    quarantine_log: telemetry::LogRateLimit,
}

impl Pipeline {
    pub fn open(
        config: DatasetsConfig,
        landing_dir: &Path,
        dictionaries: Arc<DictionaryStore>,
    ) -> anyhow::Result<Pipeline> {
        anyhow::ensure!(
            !config.targets.is_empty() || !config.buckets.is_empty(),
            "datasets.targets, datasets.buckets: at least one target is needed"
        );
        let metrics = Arc::new(DatasetMetrics::default());
        let mut targets = Vec::new();
        for (index, directory) in config.targets.iter().enumerate() {
            std::fs::create_dir_all(directory).map_err(|error| {
                anyhow::anyhow!("datasets.targets[{index}] {}: {error}", directory.display())
            })?;
            targets.push(Target::start(index, directory.clone())?);
        }
        for (number, bucket) in config.buckets.iter().enumerate() {
            std::fs::create_dir_all(&bucket.staging_dir).map_err(|error| {
                anyhow::anyhow!(
                    "datasets.buckets[{number}].staging_dir {}: {error}",
                    bucket.staging_dir.display()
                )
            })?;
            let index = targets.len();
            targets.push(
                Target::start_bucket(index, bucket, metrics.clone())
                    .map_err(|error| anyhow::anyhow!("datasets.buckets[{number}]: {error}"))?,
            );
        }
        let recovery_pending: Vec<bool> = targets.iter().map(|target| target.bucket_url.is_some()).collect();
        // The sensor dataset is partitioned by date only: a shard holds every device of its time
        // window (per-device shards would multiply small files by the fleet size), and Parquet
        // statistics on the dictionary-encoded `device` column let engines skip row groups.
        let definitions: [(&'static str, ShardFormat, &'static [Lane], bool, Vec<TypedColumn>); 2] = [
            ("media", ShardFormat::WebDataset, &[Lane::Media], false, Vec::new()),
            (
                "sensor",
                ShardFormat::Parquet { row_group_rows: config.parquet_row_group_rows },
                &[Lane::Sensor],
                true,
                config.sensor.declared_columns(),
            ),
        ];
        let mut datasets = Vec::new();
        for (name, format, lanes, partition_by_date, declared_columns) in definitions {
            let manifest_path = config.manifest_dir.join(name).join("manifest.json");
            let kind = format.manifest_kind();
            let manifest = Manifest::read(&manifest_path)?.unwrap_or_else(|| Manifest::empty(name, kind));
            let mut dataset = Dataset {
                name,
                format,
                lanes,
                partition_by_date,
                declared_columns,
                manifest,
                manifest_path,
                positions: BTreeMap::new(),
                quarantined: Vec::new(),
                quarantined_count: 0,
                open: None,
                bucket_manifest_stale: true,
            };
            dataset.positions = dataset.published_positions();
            remove_unlisted_files(&config, &dataset)?;
            // A crash between the manifest and the index leaves the index a shard behind.
            write_shard_index(&dataset)?;
            datasets.push(dataset);
        }
        let unhealthy_until = vec![None; targets.len()];
        Ok(Pipeline {
            config,
            landing_dir: landing_dir.to_path_buf(),
            targets,
            unhealthy_until,
            recovery_pending,
            datasets,
            dictionaries,
            decompressors: DecompressorCache::new(DECOMPRESSOR_CACHE_BYTES_MAX),
            next_shard_id: 1,
            metrics,
            step_failure_log: telemetry::LogRateLimit::new(LOG_INTERVAL),
            quarantine_log: telemetry::LogRateLimit::new(LOG_INTERVAL),
        })
    }

    /// Runs until `stop` is set: after each commit (or every `poll`), reads what was committed
    /// and rotates shards that grew old; on stop, publishes open shards.
    pub fn run(mut self, checkpoint: Arc<Mutex<Vec<u8>>>, stop: Arc<AtomicBool>, poll: Duration) {
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let committed = checkpoint.lock().expect("checkpoint lock").clone();
            let progressed = match self.step(&committed) {
                Ok(progressed) => progressed,
                Err(error) => {
                    self.metrics.step_failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = self.step_failure_log.allow(Instant::now()) {
                        tracing::error!(error = %format!("{error:#}"), suppressed, "dataset pipeline step failed; will retry");
                    }
                    false
                }
            };
            if progressed {
                continue; // a backlog: keep going, one bounded step at a time
            }
            if stopping {
                self.publish_open_shards();
                return;
            }
            std::thread::sleep(poll);
        }
    }

    /// Publishes every open shard (what `run` does when it stops).
    pub fn publish_open_shards(&mut self) {
        for index in 0..self.datasets.len() {
            let _ = self.seal(index);
        }
    }

    /// One pass: consume what is committed (at most `READ_STEP_BYTES` per (device, lane)),
    /// rotate by age. Returns whether anything was consumed.
    pub fn step(&mut self, checkpoint: &[u8]) -> anyhow::Result<bool> {
        let committed = CommittedLanding::new(&self.landing_dir, checkpoint)?;
        self.recover_buckets();
        for index in 0..self.datasets.len() {
            self.sync_bucket_manifests(index);
        }
        let mut progressed = false;
        for index in 0..self.datasets.len() {
            let lanes = self.datasets[index].lanes;
            for (device, lane) in committed.lanes() {
                if lanes.contains(&lane) {
                    progressed |= self.consume(index, &committed, device, lane)? > 0;
                }
            }
            let age_max = Duration::from_millis(self.config.shard_age_max_ms);
            if self.datasets[index].open.as_ref().is_some_and(|open| open.opened_at.elapsed() >= age_max) {
                let _ = self.seal(index);
            }
        }
        Ok(progressed)
    }

    /// Reads committed raw chunks of (device, lane) into the dataset; returns the bytes read.
    fn consume(
        &mut self,
        dataset: usize,
        committed: &CommittedLanding,
        device: &str,
        lane: Lane,
    ) -> anyhow::Result<u64> {
        let key = (device.to_string(), lane);
        let from = self.datasets[dataset].positions.get(&key).copied().unwrap_or_default();
        let mut reader = committed.read(device, lane, from)?;
        while reader.bytes_read() < READ_STEP_BYTES {
            let Some(chunk) = reader.next_chunk()? else { break };
            if !self.consume_chunk(dataset, device, lane, &chunk.header, chunk.body())? {
                // Sealing the shard of the previous date failed: read again from the manifest.
                return Ok(reader.bytes_read());
            }
            // Rotate at chunk boundaries: the manifest records this position as consumed.
            self.datasets[dataset].positions.insert(key.clone(), chunk.position);
            if !self.rotate_if_full(dataset) {
                // The shard failed and the dataset rolled back to its manifest: the next step
                // reads again from there.
                return Ok(reader.bytes_read());
            }
        }
        // Past chunks consumed before (at or below the position's `through_seq`) too.
        if reader.position() != from {
            self.datasets[dataset].positions.insert(key, reader.position());
        }
        Ok(reader.bytes_read())
    }

    /// Adds a committed chunk's records to the dataset's open shard (sealing the open shard first
    /// when the chunk starts another date partition). Returns false if that seal failed and the
    /// dataset rolled back to its manifest.
    fn consume_chunk(
        &mut self,
        dataset: usize,
        device: &str,
        lane: Lane,
        header: &ChunkHeader,
        body: &[u8],
    ) -> anyhow::Result<bool> {
        let decompressed = self.decompressors.decompress(&self.dictionaries, device, header, body)?;
        self.metrics.dictionary_cache_bytes.store(self.decompressors.bytes(), Ordering::Relaxed);
        self.metrics.dictionary_cache_evictions.store(self.decompressors.evictions(), Ordering::Relaxed);
        let raw = match decompressed {
            Ok(raw) => raw,
            Err(error) => {
                // The sink refuses chunks whose dictionary it lacks, so this is damage at rest or
                // a dictionary zstd will not load; the raw landing keeps the chunk as received.
                self.metrics.undecodable_chunks.fetch_add(1, Ordering::Relaxed);
                self.quarantine(dataset, device, lane, header.seq, format!("cannot be decoded: {error}"));
                return Ok(true);
            }
        };
        let mut samples = Vec::new();
        // A chunk whose records do not all decode (a key with '.' or '/', which would split a
        // WebDataset sample, a truncated record, a wrong count) is rejected whole for datasets and
        // counted; the raw landing keeps it as received.
        let decoded = match decode_records(header, &raw) {
            Ok(decoded) => decoded,
            Err(error) => {
                self.metrics.rejected_chunks.fetch_add(1, Ordering::Relaxed);
                self.quarantine(dataset, device, lane, header.seq, format!("records refused: {error}"));
                return Ok(true);
            }
        };
        for (index, record) in decoded.into_iter().enumerate() {
            let sample = self.datasets[dataset].format.sample(device, lane, header.seq, index, &record);
            if let Some(problem) = sample.problem() {
                self.metrics.rejected_chunks.fetch_add(1, Ordering::Relaxed);
                self.quarantine(dataset, device, lane, header.seq, format!("record {index}: {problem}"));
                return Ok(true);
            }
            samples.push((record.timestamp_us, record.payload.len() as u64 + 1024, sample));
        }
        let Some(first_timestamp_us) = samples.first().map(|(timestamp_us, _, _)| *timestamp_us) else {
            return Ok(true);
        };
        // A chunk goes whole into the partition of its first record's date (a chunk spans
        // seconds, so at most one chunk per device and lane straddles midnight).
        let date = self.datasets[dataset].partition_by_date.then(|| utc_date(first_timestamp_us));
        if self.datasets[dataset].open.as_ref().is_some_and(|open| open.date != date) && !self.seal(dataset) {
            return Ok(false);
        }
        let open = self.ensure_open(dataset, date)?;
        let (target, shard) = (open.target, open.id);
        for (timestamp_us, bytes, _) in &samples {
            open.samples += 1;
            open.bytes += bytes;
            open.time_range_us[0] = open.time_range_us[0].min(*timestamp_us);
            open.time_range_us[1] = open.time_range_us[1].max(*timestamp_us);
        }
        for (_, _, sample) in samples {
            self.targets[target].append(shard, sample);
        }
        let open = self.datasets[dataset].open.as_mut().expect("opened above");
        let range = open.ranges.entry((device.to_string(), lane)).or_insert((header.seq, header.seq));
        range.1 = header.seq;
        Ok(true)
    }

    /// The target for `dataset`'s next shard. Round robin is per dataset (its shard seq, offset
    /// by the dataset's index), so every dataset is striped over every target whatever order the
    /// datasets' shards are opened in.
    fn choose_target(&self, dataset: usize) -> anyhow::Result<usize> {
        let now = Instant::now();
        let healthy: Vec<usize> = (0..self.targets.len())
            .filter(|index| self.unhealthy_until[*index].is_none_or(|until| now >= until))
            .filter(|index| !self.recovery_pending[*index])
            .collect();
        anyhow::ensure!(!healthy.is_empty(), "every dataset target failed recently; retrying later");
        Ok(match self.config.placement {
            Placement::RoundRobin => {
                let turn = self.datasets[dataset].manifest.next_shard_seq as usize + dataset;
                healthy[turn % healthy.len()]
            }
            Placement::LeastLoaded => *healthy
                .iter()
                .max_by_key(|index| free_bytes(&self.targets[**index].directory))
                .expect("non-empty"),
        })
    }

    fn ensure_open(&mut self, dataset: usize, date: Option<String>) -> anyhow::Result<&mut OpenShard> {
        if self.datasets[dataset].open.is_none() {
            let target = self.choose_target(dataset)?;
            let id = self.next_shard_id;
            self.next_shard_id += 1;
            let data = &self.datasets[dataset];
            let shard_seq = data.manifest.next_shard_seq;
            let name = format!(
                "{}-{}-t{target:02}-{shard_seq:08}.{}",
                data.name,
                self.config.node,
                data.extension()
            );
            let partition = date.as_ref().map(|date| format!("date={date}/")).unwrap_or_default();
            let relative_directory = format!("{}/{partition}", data.name);
            let relative_path = format!("{relative_directory}{name}");
            let (hidden, published_path) = match &self.targets[target].bucket_url {
                // Staged flat: one shard per dataset at a time.
                Some(url) => (
                    self.targets[target].directory.join(format!(".{name}.partial")),
                    PathBuf::from(format!("{url}/{relative_path}")),
                ),
                None => {
                    let directory = self.targets[target].directory.join(&relative_directory);
                    (directory.join(format!(".{name}.partial")), directory.join(&name))
                }
            };
            // Declared columns first, then every column the dataset had so far, so a column
            // never disappears from later shards.
            let known_columns = typed::merge_columns(&data.declared_columns, &data.manifest.columns);
            self.targets[target].open(
                id,
                hidden,
                published_path.clone(),
                relative_path.clone(),
                data.format,
                known_columns,
            );
            self.datasets[dataset].open = Some(OpenShard {
                id,
                target,
                shard_seq,
                name,
                published_path,
                relative_path,
                date,
                opened_at: Instant::now(),
                bytes: 0,
                samples: 0,
                ranges: BTreeMap::new(),
                time_range_us: [u64::MAX, 0],
            });
        }
        Ok(self.datasets[dataset].open.as_mut().expect("opened"))
    }

    /// Leaves a chunk out of the dataset: counted by the caller, listed in the next manifest,
    /// logged at most once per `LOG_INTERVAL`; the chunks after it keep flowing.
    fn quarantine(&mut self, dataset: usize, device: &str, lane: Lane, seq: u64, reason: String) {
        if let Some(suppressed) = self.quarantine_log.allow(Instant::now()) {
            tracing::error!(dataset = self.datasets[dataset].name, %device, %lane, seq, %reason, suppressed, "chunk quarantined: left out of the dataset (the raw landing keeps it)");
        }
        let data = &mut self.datasets[dataset];
        data.quarantined_count += 1;
        if data.quarantined.len() >= QUARANTINE_LISTED_MAX {
            data.quarantined.remove(0);
        }
        data.quarantined.push(QuarantinedChunk {
            device: device.to_string(),
            lane: lane.name().to_string(),
            seq,
            reason,
        });
    }

    /// Seals the open shard if it is full; false if sealing failed (the dataset rolled back).
    fn rotate_if_full(&mut self, dataset: usize) -> bool {
        let full = self.datasets[dataset]
            .open
            .as_ref()
            .is_some_and(|open| open.bytes >= self.config.shard_bytes_max);
        if full { self.seal(dataset) } else { true }
    }

    /// Publishes the open shard and records it in the manifest; on failure, rolls the dataset
    /// back to its manifest so the same records go into a new shard on another target.
    fn seal(&mut self, dataset: usize) -> bool {
        let Some(open) = self.datasets[dataset].open.take() else { return true };
        if open.samples == 0 {
            self.targets[open.target].abort(open.id);
            return true;
        }
        let result = self.targets[open.target].seal(open.id).and_then(|published| {
            let data = &mut self.datasets[dataset];
            let mut manifest = data.manifest.clone();
            manifest.next_shard_seq = open.shard_seq + 1;
            let report = &published.report;
            let learned = typed::merge_columns(&report.columns, &report.late_columns);
            manifest.columns = typed::merge_columns(&manifest.columns, &learned);
            manifest.type_conflicts_total += report.conflicts_total;
            manifest.type_conflicts.extend(report.conflicts.iter().cloned());
            let excess = manifest.type_conflicts.len().saturating_sub(CONFLICTS_LISTED_MAX);
            manifest.type_conflicts.drain(..excess);
            manifest.shards.push(ShardEntry {
                name: open.name.clone(),
                path: open.published_path.clone(),
                relative_path: open.relative_path.clone(),
                columns: report.columns.clone(),
                target: open.target,
                shard_seq: open.shard_seq,
                bytes: published.bytes,
                samples: open.samples,
                sha256: published.sha256,
                time_range_us: open.time_range_us,
                ranges: open
                    .ranges
                    .iter()
                    .map(|((device, lane), (first_seq, last_seq))| SeqRange {
                        device: device.clone(),
                        lane: lane.name().to_string(),
                        first_seq: *first_seq,
                        last_seq: *last_seq,
                    })
                    .collect(),
            });
            manifest.consumed = data
                .positions
                .iter()
                .map(|((device, lane), position)| Consumed {
                    device: device.clone(),
                    lane: lane.name().to_string(),
                    through_seq: position.through_seq,
                    raw_file_first_seq: position.file_first_seq,
                    raw_offset: position.offset,
                })
                .collect();
            manifest.quarantined_total += data.quarantined_count;
            manifest.quarantined.extend(data.quarantined.iter().cloned());
            let excess = manifest.quarantined.len().saturating_sub(QUARANTINE_LISTED_MAX);
            manifest.quarantined.drain(..excess);
            manifest.write(&data.manifest_path).map_err(|error| error.to_string())?;
            let conflicts = report.conflicts_total;
            data.manifest = manifest;
            data.quarantined.clear();
            data.quarantined_count = 0;
            // After the manifest, so the index never names a shard the manifest does not list.
            // A failure here is logged, not a shard failure: the shard is published, and the
            // index is written again with the next shard and on start.
            if let Err(error) = write_shard_index(data) {
                tracing::error!(dataset = data.name, error = %format!("{error:#}"), "shard index not updated");
            }
            data.bucket_manifest_stale = true;
            Ok(conflicts)
        });
        self.sync_bucket_manifests(dataset);
        match result {
            Ok(conflicts) => {
                self.metrics.type_conflicts.fetch_add(conflicts, Ordering::Relaxed);
                self.metrics.shards_published.fetch_add(1, Ordering::Relaxed);
                self.metrics.samples_published.fetch_add(open.samples, Ordering::Relaxed);
                tracing::info!(dataset = self.datasets[dataset].name, shard = %open.name, samples = open.samples, "shard published");
                true
            }
            Err(error) => {
                tracing::error!(dataset = self.datasets[dataset].name, target = open.target, %error, "shard failed; its records go to another target");
                self.metrics.shard_failures.fetch_add(1, Ordering::Relaxed);
                self.unhealthy_until[open.target] =
                    Some(Instant::now() + Duration::from_millis(self.config.target_retry_after_ms));
                if self.targets[open.target].bucket_url.is_none() {
                    let _ = std::fs::remove_file(&open.published_path);
                } else {
                    // The key may hold what the failed publish left (or another object, a
                    // conflict): unlisted, so recovery deletes it before the target's next shard.
                    self.recovery_pending[open.target] = true;
                }
                let data = &mut self.datasets[dataset];
                data.positions = data.published_positions();
                // Read again from the manifest's positions, so found again.
                data.quarantined.clear();
                data.quarantined_count = 0;
                false
            }
        }
    }
}

impl Pipeline {
    /// Recovers bucket targets not recovered yet: deletes what their datasets' manifests do not
    /// list (a crash between an upload and the manifest, a failed delete). A bucket that cannot
    /// be reached stays without shards and is tried again next step.
    fn recover_buckets(&mut self) {
        let now = Instant::now();
        for index in 0..self.targets.len() {
            if !self.recovery_pending[index] || self.unhealthy_until[index].is_some_and(|until| now < until) {
                continue;
            }
            let mut result = Ok(0);
            for data in &self.datasets {
                let listed = data.manifest.shards.iter().map(|shard| shard.name.clone()).collect();
                let name_prefix = format!("{}-{}-", data.name, self.config.node);
                match self.targets[index].recover(data.name, name_prefix, listed) {
                    Ok(removed) => result = result.map(|total| total + removed),
                    Err(error) => {
                        result = Err(error);
                        break;
                    }
                }
            }
            match result {
                Ok(removed) => {
                    tracing::info!(target = index, removed, "bucket target recovered");
                    self.recovery_pending[index] = false;
                }
                Err(error) => {
                    self.metrics.upload_failures.fetch_add(1, Ordering::Relaxed);
                    self.unhealthy_until[index] =
                        Some(now + Duration::from_millis(self.config.target_retry_after_ms));
                    if let Some(suppressed) = self.step_failure_log.allow(Instant::now()) {
                        tracing::error!(target = index, %error, suppressed, "bucket target not reachable; retrying");
                    }
                }
            }
        }
    }

    /// Puts the dataset's manifest, then (WebDataset) its wids index, into every bucket target
    /// after the shards they list (the local manifest, written first, lists only published
    /// shards). A failure keeps them stale, to be put again next step.
    fn sync_bucket_manifests(&mut self, dataset: usize) {
        let data = &self.datasets[dataset];
        if !data.bucket_manifest_stale {
            return;
        }
        let manifest = serde_json::to_vec_pretty(&data.manifest).expect("manifests serialize");
        let mut synced = true;
        let now = Instant::now();
        for (index, target) in self.targets.iter().enumerate() {
            if target.bucket_url.is_none() {
                continue;
            }
            if self.recovery_pending[index] || self.unhealthy_until[index].is_some_and(|until| now < until) {
                synced = false;
                continue;
            }
            // Beside the datasets, not in them (`<dataset>/` holds only shards, so a reader
            // listing it finds data files only): the local manifest_dir's layout.
            let manifest_key = format!("{BUCKET_MANIFEST_PREFIX}/{}/manifest.json", data.name);
            let mut objects = vec![(manifest_key, manifest.clone())];
            if data.format == ShardFormat::WebDataset {
                let shardlist = data
                    .manifest
                    .shards
                    .iter()
                    .filter(|shard| shard.target == index)
                    .map(|shard| (format!("../../{}", shard.relative_path), shard.samples, shard.bytes))
                    .collect();
                objects.push((
                    format!("{BUCKET_MANIFEST_PREFIX}/{}/{SHARD_INDEX_FILE}", data.name),
                    shard_index_bytes(data.name, shardlist),
                ));
            }
            if let Err(error) = target.publish(objects) {
                synced = false;
                self.metrics.bucket_manifest_failures.fetch_add(1, Ordering::Relaxed);
                self.unhealthy_until[index] =
                    Some(now + Duration::from_millis(self.config.target_retry_after_ms));
                if let Some(suppressed) = self.step_failure_log.allow(Instant::now()) {
                    tracing::error!(dataset = data.name, target = index, %error, suppressed, "bucket manifest not updated; retrying");
                }
            }
        }
        self.datasets[dataset].bucket_manifest_stale = !synced;
    }
}

/// Removes in-progress files of `dataset` and published files its manifest does not list.
fn remove_unlisted_files(config: &DatasetsConfig, dataset: &Dataset) -> anyhow::Result<()> {
    let listed: BTreeSet<&str> = dataset.manifest.shards.iter().map(|shard| shard.name.as_str()).collect();
    for bucket in &config.buckets {
        let Ok(entries) = std::fs::read_dir(&bucket.staging_dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            if name.starts_with(&format!(".{}-", dataset.name)) && name.ends_with(".partial") {
                std::fs::remove_file(&path)?;
            }
        }
    }
    for target in &config.targets {
        let directory = target.join(dataset.name);
        let Ok(entries) = std::fs::read_dir(&directory) else { continue };
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry?.path();
            // Partition directories (`date=…`) hold shards one level down.
            let partition =
                path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with("date="));
            if partition && path.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    paths.push(entry?.path());
                }
            } else {
                paths.push(path);
            }
        }
        for path in paths {
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else { continue };
            let in_progress = name.starts_with('.') && name.ends_with(".partial");
            let orphan = !name.starts_with('.') && !listed.contains(name) && name.starts_with(dataset.name);
            if in_progress || orphan {
                tracing::info!(path = %path.display(), "removing a shard file the manifest does not list");
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

fn free_bytes(directory: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(path) = std::ffi::CString::new(directory.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) == 0 {
            stat.f_bavail as u64 * stat.f_frsize as u64
        } else {
            0
        }
    }
}

/// The UTC calendar date (`YYYY-MM-DD`) of a timestamp in microseconds since the Unix epoch
/// (Howard Hinnant's `civil_from_days`).
pub fn utc_date(timestamp_us: u64) -> String {
    let days = (timestamp_us / 86_400_000_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The `wids` shard index of a WebDataset dataset, beside its manifest: every shard the manifest
/// lists, in manifest order, with its sample count and its path relative to the index (so the
/// tree can move as a whole). Replaced atomically; written after the manifest, so it never names
/// a shard the manifest does not list. Other formats have none.
pub const SHARD_INDEX_FILE: &str = "wids-index.json";
/// Where a bucket target holds the copies of the manifests and wids index, below its prefix:
/// `manifests/<dataset>/manifest.json`, `manifests/media/wids-index.json` (URLs `../../media/…`).
pub const BUCKET_MANIFEST_PREFIX: &str = "manifests";

fn write_shard_index(dataset: &Dataset) -> anyhow::Result<()> {
    if dataset.format != ShardFormat::WebDataset {
        return Ok(());
    }
    let directory = dataset.manifest_path.parent().expect("a manifest path has a directory");
    let shardlist = dataset
        .manifest
        .shards
        .iter()
        .map(|shard| (relative_url(directory, &shard.path), shard.samples, shard.bytes))
        .collect();
    let bytes = shard_index_bytes(dataset.name, shardlist);
    let path = directory.join(SHARD_INDEX_FILE);
    durable::Options::default()
        .create_directory()
        .write(&path, &bytes)
        .map_err(|error| anyhow::anyhow!("{}: {}", path.display(), error.source))
}

/// A wids index of (url, samples, bytes) per shard.
fn shard_index_bytes(name: &str, shardlist: Vec<(String, u64, u64)>) -> Vec<u8> {
    let shardlist: Vec<serde_json::Value> = shardlist
        .into_iter()
        .map(|(url, samples, bytes)| serde_json::json!({"url": url, "nsamples": samples, "filesize": bytes}))
        .collect();
    let index = serde_json::json!({
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": shardlist,
    });
    serde_json::to_vec_pretty(&index).expect("json")
}

/// `to` as seen from `directory`: `../../targets/0/media/x.tar` when both are absolute or both
/// relative to the same place, `to` unchanged otherwise.
fn relative_url(directory: &Path, to: &Path) -> String {
    use std::path::Component;
    if directory.is_absolute() != to.is_absolute()
        || directory.components().chain(to.components()).any(|part| part == Component::ParentDir)
    {
        return to.display().to_string();
    }
    let from: Vec<Component> = directory.components().filter(|part| *part != Component::CurDir).collect();
    let target: Vec<Component> = to.components().filter(|part| *part != Component::CurDir).collect();
    let common = from.iter().zip(&target).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_string(); from.len() - common];
    parts.extend(target[common..].iter().map(|part| part.as_os_str().to_string_lossy().into_owned()));
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_of_timestamps() {
        for (timestamp_us, date) in [
            (0, "1970-01-01"),
            (86_399_999_999, "1970-01-01"),
            (86_400_000_000, "1970-01-02"),
            (951_782_400_000_000, "2000-02-29"),
            (1_796_342_399_999_999, "2026-12-03"),
            (1_796_342_400_000_000, "2026-12-04"),
        ] {
            assert_eq!(utc_date(timestamp_us), date, "{timestamp_us}");
        }
    }

    #[test]
    fn relative_urls_from_the_index_directory() {
        assert_eq!(
            relative_url(Path::new("/d/manifests/media"), Path::new("/d/t0/media/x.tar")),
            "../../t0/media/x.tar"
        );
        assert_eq!(relative_url(Path::new("/d/m"), Path::new("/d/m/x.tar")), "x.tar");
        assert_eq!(relative_url(Path::new("m"), Path::new("/d/x.tar")), "/d/x.tar");
    }
}
