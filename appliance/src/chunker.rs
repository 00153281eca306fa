//! The chunker: batches one source's records into chunks by size or age, compresses each chunk
//! once with zstd, and for sources of small records trains a zstd dictionary from the first
//! records and retrains it when the compression ratio degrades.
//!
//! Time is an argument (`now`), never read here, so tests drive it.
//!
//! Dictionary life: `dictionary_sample_records` records are sampled as runs of consecutive
//! encoded records shaped like small chunks (`DICTIONARY_SAMPLE_RUN_BYTES`);
//! if the records are small (mean payload ≤ `SMALL_RECORD_BYTES_MAX`) a dictionary is trained,
//! stored durably in the appliance's `DictionaryStore` and only then used; the ratio of the first
//! chunks compressed with it is its baseline, and when the running ratio falls below
//! `retrain_below` × baseline a new one is trained the same way. Large records (JPEG) never get a
//! dictionary and are stored raw when zstd cannot shrink them.
//!
//! Invariant: a sealed chunk names a dictionary only after that dictionary is durable in the
//! store (so the uplink can always send it ahead of the chunk).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protocol::{
    CHUNK_RAW_BYTES_MAX, ChunkBuilder, ChunkCompressor, EncodeError, Lane, NO_DICTIONARY, RecordRef,
    SealedChunk, train_dictionary,
};
use serde::Deserialize;

use crate::dictionaries::{DictionaryStore, DictionaryStoreError};
use crate::source::SourceRecord;

/// Records whose mean payload is at most this many bytes get a dictionary.
pub const SMALL_RECORD_BYTES_MAX: usize = 2048;
/// Chunks larger than this are compressed without the dictionary: zstd finds the repetition
/// inside a large chunk by itself, and on the demo's sensor records a dictionary makes 128 KiB
/// chunks 0.3 % larger (measured in tests/compression.rs), so only small (time-bound) chunks
/// use it.
pub const DICTIONARY_CHUNK_RAW_BYTES_MAX: usize = 16 * 1024;
/// Smallest allowed chunk size bound.
pub const CHUNK_RAW_BYTES_MIN: usize = 1024;
/// Chunks compressed with a new dictionary that make up its baseline ratio.
const BASELINE_CHUNKS: u32 = 4;
/// Weight of the newest chunk in the running ratio.
const RATIO_SMOOTHING: f64 = 0.2;
/// Largest number of records sampled for training.
pub const DICTIONARY_SAMPLES_MAX: usize = 100_000;
/// Training samples are runs of consecutive encoded records, cycling through these sizes (each
/// capped at `chunk_raw_bytes`), rather than single records: zstd's trainer picks the
/// dictionary's content and fits its entropy tables to the samples, and what the dictionary
/// compresses is a small chunk (records back to back), not one record. On the demo's sensor
/// records, with the 4 KiB default `dictionary_bytes`, this raised the gain at 1/2/4/16 KiB from
/// 1.66/1.39/1.18/0.98× to 1.84/1.55/1.32/1.09×; runs of mixed sizes did slightly better at 4
/// and 16 KiB than runs of 1 KiB alone (docs/benchmarks.md).
pub const DICTIONARY_SAMPLE_RUN_BYTES: [usize; 3] = [1024, 2048, 4096];

const _: () = assert!(DICTIONARY_SAMPLE_RUN_BYTES[0] == CHUNK_RAW_BYTES_MIN);
const _: () = assert!(DICTIONARY_SAMPLE_RUN_BYTES[2] <= DICTIONARY_CHUNK_RAW_BYTES_MAX);

/// How a source's records are batched and compressed. TOML keys under `[sources.NAME.chunker]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkerConfig {
    /// A chunk is sealed once its raw record block reaches this many bytes (64–256 KiB is the
    /// sweet spot: large enough for zstd, small enough to keep latency and loss windows short).
    pub chunk_raw_bytes: usize,
    /// A chunk is sealed when its first record is this old, so a slow sensor still flows.
    pub chunk_age_max_ms: u64,
    /// zstd level (1 = fastest; the field notes measured ≈ 290 MB/s at level 1 on sensor JSON).
    pub zstd_level: i32,
    /// Train a dictionary for small records.
    pub dictionary: bool,
    /// Largest dictionary trained, in bytes. Small records want a small dictionary: on the
    /// demo's sensor records 2–8 KiB beat 16 KiB by 2–3 % on 1–4 KiB chunks (content far back
    /// in a dictionary costs long offsets), so the default is 4 KiB.
    pub dictionary_bytes: usize,
    /// Records sampled before (re)training; zstd wants ~100× the dictionary size in samples.
    pub dictionary_sample_records: usize,
    /// Retrain when the running ratio drops below this fraction of the ratio the dictionary had
    /// when it was new.
    pub retrain_below: f64,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        ChunkerConfig {
            chunk_raw_bytes: 128 * 1024,
            chunk_age_max_ms: 1000,
            zstd_level: 3,
            dictionary: true,
            dictionary_bytes: 4 * 1024,
            dictionary_sample_records: 4000,
            retrain_below: 0.8,
        }
    }
}

impl ChunkerConfig {
    /// Checks every field; the error names the key and what was expected.
    pub fn validate(&self) -> Result<(), String> {
        if !(CHUNK_RAW_BYTES_MIN..=CHUNK_RAW_BYTES_MAX).contains(&self.chunk_raw_bytes) {
            return Err(format!(
                "chunk_raw_bytes: expected {CHUNK_RAW_BYTES_MIN}..={CHUNK_RAW_BYTES_MAX}, got {}",
                self.chunk_raw_bytes
            ));
        }
        if self.chunk_age_max_ms == 0 || self.chunk_age_max_ms > 3_600_000 {
            return Err(format!("chunk_age_max_ms: expected 1..=3600000, got {}", self.chunk_age_max_ms));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(format!("zstd_level: expected 1..=19, got {}", self.zstd_level));
        }
        if !(1024..=protocol::DICTIONARY_BYTES_MAX).contains(&self.dictionary_bytes) {
            return Err(format!(
                "dictionary_bytes: expected 1024..={}, got {}",
                protocol::DICTIONARY_BYTES_MAX,
                self.dictionary_bytes
            ));
        }
        if !(100..=DICTIONARY_SAMPLES_MAX).contains(&self.dictionary_sample_records) {
            return Err(format!(
                "dictionary_sample_records: expected 100..={DICTIONARY_SAMPLES_MAX}, got {}",
                self.dictionary_sample_records
            ));
        }
        if !(self.retrain_below > 0.0 && self.retrain_below < 1.0) {
            return Err(format!("retrain_below: expected a fraction in (0, 1), got {}", self.retrain_below));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct ChunkerMetrics {
    pub records_in: AtomicU64,
    pub raw_bytes_in: AtomicU64,
    pub chunks_sealed: AtomicU64,
    /// Raw record-block bytes of sealed chunks.
    pub chunk_raw_bytes: AtomicU64,
    /// Body bytes of sealed chunks as stored and sent.
    pub chunk_body_bytes: AtomicU64,
    pub chunks_with_dictionary: AtomicU64,
    pub dictionaries_trained: AtomicU64,
    pub dictionary_failures: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkerError {
    #[error("record {key}: {source}")]
    Record { key: String, source: EncodeError },
    #[error("seal a chunk: {0}")]
    Seal(EncodeError),
}

#[derive(Debug)]
enum DictionaryPhase {
    Off,
    Sampling,
    /// Compressing with a dictionary: baseline ratio (after `BASELINE_CHUNKS`) and running ratio.
    Using {
        baseline: f64,
        baseline_chunks: u32,
        running: f64,
    },
}

pub struct Chunker {
    source: String,
    config: ChunkerConfig,
    builder: ChunkBuilder,
    opened_at: Option<Instant>,
    compressor: ChunkCompressor,
    dictionaries: Option<Arc<DictionaryStore>>,
    dict_id: u32,
    phase: DictionaryPhase,
    /// Runs of consecutive encoded records (see `DICTIONARY_SAMPLE_RUN_BYTES`), the last one open.
    samples: Vec<Vec<u8>>,
    sampled_records: usize,
    samples_bytes: usize,
    metrics: Arc<ChunkerMetrics>,
}

impl Chunker {
    /// A chunker for `source` on `lane`. With a dictionary store, it resumes the dictionary the
    /// source used before a restart, else it starts sampling.
    pub fn new(
        source: &str,
        lane: Lane,
        config: ChunkerConfig,
        dictionaries: Option<Arc<DictionaryStore>>,
    ) -> Chunker {
        assert!(config.validate().is_ok(), "chunker config must be validated first");
        let mut chunker = Chunker {
            source: source.to_string(),
            builder: ChunkBuilder::new(lane, config.chunk_raw_bytes),
            opened_at: None,
            compressor: ChunkCompressor::new(config.zstd_level),
            phase: if config.dictionary && dictionaries.is_some() {
                DictionaryPhase::Sampling
            } else {
                DictionaryPhase::Off
            },
            config,
            dict_id: NO_DICTIONARY,
            samples: Vec::new(),
            sampled_records: 0,
            samples_bytes: 0,
            metrics: Arc::new(ChunkerMetrics::default()),
            dictionaries,
        };
        let current = match (&chunker.phase, &chunker.dictionaries) {
            (DictionaryPhase::Sampling, Some(store)) => store.current(source),
            _ => None,
        };
        if let Some((id, bytes)) = current {
            chunker.use_dictionary(id, &bytes);
        }
        chunker
    }

    pub fn metrics(&self) -> Arc<ChunkerMetrics> {
        self.metrics.clone()
    }

    /// The dictionary new chunks are compressed with (0 = none).
    pub fn dictionary_id(&self) -> u32 {
        self.dict_id
    }

    fn use_dictionary(&mut self, id: u32, bytes: &[u8]) {
        let mut compressor = ChunkCompressor::new(self.config.zstd_level);
        compressor.add_dictionary(id, bytes).expect("a stored dictionary registers with a new compressor");
        self.compressor = compressor;
        self.dict_id = id;
        self.phase = DictionaryPhase::Using { baseline: 0.0, baseline_chunks: 0, running: 0.0 };
    }

    /// Adds a record; returns the chunks it completed (at most two: the open chunk when the
    /// record does not fit it, and the record's own chunk when the record alone fills one).
    pub fn push(&mut self, record: &SourceRecord, now: Instant) -> Result<Vec<SealedChunk>, ChunkerError> {
        let payload = payload_with_tags(record);
        let record_ref = RecordRef {
            key: &record.key,
            timestamp_us: record.timestamp_us,
            content_type: &record.content_type,
            payload: &payload,
        };
        let mut sealed = Vec::new();
        if !self.builder.is_empty()
            && self.builder.raw_len() + record_ref.encoded_len() > self.config.chunk_raw_bytes
        {
            sealed.extend(self.seal()?);
        }
        self.builder
            .push(record_ref)
            .map_err(|source| ChunkerError::Record { key: record.key.clone(), source })?;
        self.opened_at.get_or_insert(now);
        self.metrics.records_in.fetch_add(1, Ordering::Relaxed);
        self.metrics.raw_bytes_in.fetch_add(payload.len() as u64, Ordering::Relaxed);
        if matches!(self.phase, DictionaryPhase::Sampling) {
            // Train on whole encoded records: keys, timestamps and content types repeat too.
            let encoded = record_ref.encode().expect("the builder accepted the record");
            self.sample(&encoded);
        }
        if self.builder.is_full() {
            sealed.extend(self.seal()?);
        }
        Ok(sealed)
    }

    /// Seals the open chunk when its first record is older than `chunk_age_max_ms`.
    pub fn poll(&mut self, now: Instant) -> Result<Option<SealedChunk>, ChunkerError> {
        match self.opened_at {
            Some(opened) if now.duration_since(opened) >= self.age_max() => self.seal(),
            _ => Ok(None),
        }
    }

    /// When the open chunk must be sealed by age, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|opened| opened + self.age_max())
    }

    fn age_max(&self) -> Duration {
        Duration::from_millis(self.config.chunk_age_max_ms)
    }

    /// Seals whatever is open (shutdown, reconfiguration).
    pub fn flush(&mut self) -> Result<Option<SealedChunk>, ChunkerError> {
        self.seal()
    }

    fn seal(&mut self) -> Result<Option<SealedChunk>, ChunkerError> {
        if self.builder.is_empty() {
            return Ok(None);
        }
        self.opened_at = None;
        let raw_len = self.builder.raw_len();
        let dict_id = if raw_len <= DICTIONARY_CHUNK_RAW_BYTES_MAX { self.dict_id } else { NO_DICTIONARY };
        let chunk = self.builder.seal(&mut self.compressor, dict_id).map_err(ChunkerError::Seal)?;
        let body_len = chunk.body.len();
        self.metrics.chunks_sealed.fetch_add(1, Ordering::Relaxed);
        self.metrics.chunk_raw_bytes.fetch_add(raw_len as u64, Ordering::Relaxed);
        self.metrics.chunk_body_bytes.fetch_add(body_len as u64, Ordering::Relaxed);
        if dict_id != NO_DICTIONARY {
            self.metrics.chunks_with_dictionary.fetch_add(1, Ordering::Relaxed);
            self.observe_ratio(raw_len as f64 / body_len.max(1) as f64);
        }
        Ok(Some(chunk))
    }

    fn observe_ratio(&mut self, ratio: f64) {
        let retrain_below = self.config.retrain_below;
        if let DictionaryPhase::Using { baseline, baseline_chunks, running } = &mut self.phase {
            if *baseline_chunks < BASELINE_CHUNKS {
                *baseline_chunks += 1;
                *baseline += (ratio - *baseline) / f64::from(*baseline_chunks);
                *running = *baseline;
            } else {
                *running += RATIO_SMOOTHING * (ratio - *running);
                if *running < retrain_below * *baseline {
                    tracing::info!(
                        source = %self.source,
                        running = *running,
                        baseline = *baseline,
                        "compression ratio degraded; sampling to retrain the dictionary"
                    );
                    self.phase = DictionaryPhase::Sampling;
                }
            }
        }
    }

    fn sample(&mut self, encoded_record: &[u8]) {
        let run_bytes_max = match self.samples.len() {
            0 => 0,
            runs => DICTIONARY_SAMPLE_RUN_BYTES[(runs - 1) % DICTIONARY_SAMPLE_RUN_BYTES.len()]
                .min(self.config.chunk_raw_bytes),
        };
        match self.samples.last_mut() {
            Some(run) if run.len() + encoded_record.len() <= run_bytes_max => {
                run.extend_from_slice(encoded_record);
            }
            _ => self.samples.push(encoded_record.to_vec()),
        }
        self.sampled_records += 1;
        self.samples_bytes += encoded_record.len();
        if self.sampled_records < self.config.dictionary_sample_records {
            return;
        }
        let samples = std::mem::take(&mut self.samples);
        let mean = std::mem::take(&mut self.samples_bytes) / std::mem::take(&mut self.sampled_records);
        if mean > SMALL_RECORD_BYTES_MAX + protocol::RECORD_OVERHEAD_BYTES_MAX {
            tracing::debug!(source = %self.source, mean, "records too large for a dictionary");
            self.phase = DictionaryPhase::Off;
            return;
        }
        match self.train(&samples) {
            Ok(()) => {}
            Err(error) => {
                self.metrics.dictionary_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.source, %error, "dictionary training failed; compressing without");
                // Keep the dictionary in use, if any; never retry in a tight loop.
                self.phase = if self.dict_id == NO_DICTIONARY {
                    DictionaryPhase::Off
                } else {
                    DictionaryPhase::Using { baseline: 0.0, baseline_chunks: 0, running: 0.0 }
                };
            }
        }
    }

    fn train(&mut self, samples: &[Vec<u8>]) -> Result<(), TrainError> {
        let store = self.dictionaries.clone().expect("sampling only with a store");
        let dictionary =
            train_dictionary(samples, self.config.dictionary_bytes).map_err(TrainError::Train)?;
        let id = store.put(dictionary.clone()).map_err(TrainError::Store)?;
        store.set_current(&self.source, id).map_err(TrainError::Store)?;
        // The open chunk's records were added under the old dictionary; seal order does not
        // matter for correctness since the dictionary is chosen at seal time and is durable.
        self.use_dictionary(id, &dictionary);
        self.metrics.dictionaries_trained.fetch_add(1, Ordering::Relaxed);
        tracing::info!(source = %self.source, dict_id = id, bytes = dictionary.len(), "trained a dictionary");
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum TrainError {
    #[error("{0}")]
    Train(protocol::CodecError),
    #[error("{0}")]
    Store(DictionaryStoreError),
}

/// The payload as it travels: JSON objects get the record's tags under "tags"; other payloads
/// travel unchanged (their tags are not carried: WebDataset samples keep metadata in the sink's
/// own `.json`).
pub fn payload_with_tags(record: &SourceRecord) -> std::borrow::Cow<'_, [u8]> {
    if record.tags.is_empty() || !record.content_type.starts_with("application/json") {
        return std::borrow::Cow::Borrowed(&record.payload);
    }
    match serde_json::from_slice::<serde_json::Value>(&record.payload) {
        Ok(serde_json::Value::Object(mut object)) => {
            let tags = record
                .tags
                .iter()
                .map(|(key, value)| (key.clone(), serde_json::Value::String(value.clone())))
                .collect();
            object.insert("tags".to_string(), serde_json::Value::Object(tags));
            std::borrow::Cow::Owned(serde_json::to_vec(&object).expect("a JSON object serialises"))
        }
        _ => std::borrow::Cow::Borrowed(&record.payload),
    }
}
