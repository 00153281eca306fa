//! The evidence ledger: puts every decision's evidence on the ring's audit lane, durably, before
//! the decision is answered; finds recorded decisions again.
//!
//! Group commit: request handlers queue an [`EvidenceJob`] (bounded queue of
//! `evidence_queue_depth_max`, full → the request is answered 503) and wait. One writer thread
//! takes whatever is queued — up to `batch_records_max` records and one chunk's worth of bytes —
//! into one raw chunk (the inputs are mostly JPEG/PNG, which do not compress, and a zstd pass
//! would only add latency), appends it with one `Ring::append` (fsynced in `Sync` durability; in
//! `Periodic` durability followed by `Ring::sync`), then answers every job of the batch. If the
//! append fails, every job of the batch fails: no decision is answered without its record.
//!
//! Model records: before the first evidence that names a model version not yet recorded, the
//! writer appends a chunk holding only that version's [`ModelRecord`] and remembers it under the
//! state directory (see `state`), so each version travels once per device.
//!
//! Limits: a chunk holds at most [`chunk_raw_bytes_max`] bytes of records (the least of
//! `CHUNK_RAW_BYTES_MAX`, the ring's largest chunk and the audit lane's budget); a job whose
//! record would not fit alone is refused before it is queued. The recent-decision index keeps the
//! seq of the last [`RECENT_DECISIONS_MAX`] decisions; older ones are found by scanning the audit
//! lane [`SCAN_CHUNKS_PER_READ`] chunks at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use buffer::{Durability, ReadLimits, Ring, RingConfig, RingError};
use protocol::evidence::{
    EVIDENCE_CONTENT_TYPE, Evidence, MODEL_CONTENT_TYPE, ModelRecord, model_record_key,
};
use protocol::{CHUNK_HEADER_LEN, CHUNK_RAW_BYTES_MAX, ChunkBuilder, ChunkDecompressor, Lane, RecordRef};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::InferenceMetrics;
use crate::model::Model;
use crate::state::RecordedModels;

/// Seqs of this many recent decisions are kept in memory for `GET /v1/decisions/{id}`.
pub const RECENT_DECISIONS_MAX: usize = 65_536;
/// Chunks per read transaction when scanning the audit lane for a decision.
pub const SCAN_CHUNKS_PER_READ: usize = 64;
/// Bytes per read transaction when scanning (the first chunk is always returned).
pub const SCAN_BYTES_PER_READ: usize = 16 * 1024 * 1024;

/// The most record bytes one audit chunk of `config`'s ring may hold.
pub fn chunk_raw_bytes_max(config: &RingConfig) -> usize {
    let stored_max = config.chunk_stored_bytes_max().min(config.lane_budget_bytes(Lane::Audit));
    let fits = |raw: usize| buffer::layout::stored_bytes(raw + CHUNK_HEADER_LEN) <= stored_max;
    // stored_bytes grows with its argument: binary search the largest raw length that fits.
    let (mut low, mut high) = (0usize, CHUNK_RAW_BYTES_MAX);
    if fits(high) {
        return high;
    }
    while low + 1 < high {
        let middle = low + (high - low) / 2;
        if fits(middle) { low = middle } else { high = middle }
    }
    low
}

/// Bytes a record with this key, content type and payload length takes in a chunk.
pub fn record_bytes(key: &str, content_type: &str, payload_len: usize) -> usize {
    protocol::RECORD_FIXED_BYTES + key.len() + content_type.len() + payload_len
}

/// Why evidence could not be made durable. The request is answered 503 and nothing is decided.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommitError {
    #[error(
        "the audit lane is full ({used_bytes} of {budget_bytes} bytes) until the core acknowledges the \
         evidence it holds; no decision is made without a durable record"
    )]
    AuditFull { used_bytes: u64, budget_bytes: u64 },
    #[error("{depth} decisions are already waiting for their evidence to be written")]
    QueueFull { depth: usize },
    #[error("the evidence could not be written to the ring: {0}")]
    Ring(String),
}

impl CommitError {
    fn from_ring(error: &RingError) -> CommitError {
        match error {
            RingError::Backpressure { used_bytes, budget_bytes, .. } => {
                CommitError::AuditFull { used_bytes: *used_bytes, budget_bytes: *budget_bytes }
            }
            other => CommitError::Ring(other.to_string()),
        }
    }
}

/// One decision's evidence, to be recorded.
pub struct PendingEvidence {
    pub decision_id: String,
    pub decided_at_us: u64,
    /// `Evidence::encode()` output.
    pub payload: Vec<u8>,
    /// The model that decided (its record goes first if this version was never recorded).
    pub model: Arc<Model>,
}

impl PendingEvidence {
    pub fn record_bytes(&self) -> usize {
        record_bytes(&self.decision_id, EVIDENCE_CONTENT_TYPE, self.payload.len())
    }
}

/// Pending evidence waiting in the queue for the writer, with where to send the outcome.
struct EvidenceJob {
    pending: PendingEvidence,
    reply: oneshot::Sender<Result<u64, CommitError>>,
}

impl EvidenceJob {
    fn record_bytes(&self) -> usize {
        self.pending.record_bytes()
    }
}

/// Where recently recorded decisions are: decision id → audit seq, bounded.
#[derive(Debug, Default)]
struct RecentDecisions {
    seqs: HashMap<String, u64>,
    order: VecDeque<String>,
}

impl RecentDecisions {
    fn insert(&mut self, decision_id: String, seq: u64) {
        if self.order.len() == RECENT_DECISIONS_MAX
            && let Some(oldest) = self.order.pop_front()
        {
            self.seqs.remove(&oldest);
        }
        self.order.push_back(decision_id.clone());
        self.seqs.insert(decision_id, seq);
        assert!(self.order.len() <= RECENT_DECISIONS_MAX);
    }
}

/// Limits of the ledger, from `InferenceConfig` and the ring.
#[derive(Clone, Copy, Debug)]
pub struct LedgerLimits {
    pub queue_depth_max: usize,
    pub batch_records_max: usize,
    pub chunk_raw_bytes_max: usize,
}

/// The handle request handlers use; the writer thread ends when the last handle is dropped.
pub struct Ledger {
    ring: Ring,
    jobs: mpsc::Sender<EvidenceJob>,
    limits: LedgerLimits,
    recent: Arc<Mutex<RecentDecisions>>,
    /// Only one full scan of the audit lane at a time: a flood of lookups for unknown ids must
    /// not become a flood of full-lane reads.
    scan: Mutex<()>,
}

impl Ledger {
    pub fn start(
        ring: Ring,
        recorded: RecordedModels,
        limits: LedgerLimits,
        metrics: Arc<InferenceMetrics>,
    ) -> std::io::Result<Ledger> {
        assert!(limits.queue_depth_max >= 1 && limits.batch_records_max >= 1);
        assert!(limits.chunk_raw_bytes_max <= CHUNK_RAW_BYTES_MAX);
        let (jobs, receiver) = mpsc::channel(limits.queue_depth_max);
        let recent = Arc::new(Mutex::new(RecentDecisions::default()));
        let writer = Writer { ring: ring.clone(), recorded, limits, metrics, recent: recent.clone() };
        std::thread::Builder::new()
            .name("evidence-writer".to_string())
            .spawn(move || writer.run(receiver))?;
        Ok(Ledger { ring, jobs, limits, recent, scan: Mutex::new(()) })
    }

    pub fn limits(&self) -> LedgerLimits {
        self.limits
    }

    /// Queues `job` and waits until its evidence is durable; returns the audit seq.
    pub async fn commit(&self, pending: PendingEvidence) -> Result<u64, CommitError> {
        assert!(
            pending.record_bytes() <= self.limits.chunk_raw_bytes_max,
            "callers check the record size first"
        );
        let (reply, answer) = oneshot::channel();
        let job = EvidenceJob { pending, reply };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(CommitError::QueueFull { depth: self.limits.queue_depth_max });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(CommitError::Ring("the evidence writer has stopped".to_string()));
            }
        }
        answer.await.unwrap_or_else(|_| Err(CommitError::Ring("the evidence writer has stopped".to_string())))
    }

    /// The recorded evidence of `decision_id` and its audit seq, while it is still in the ring.
    /// Blocking (reads LMDB): call from a blocking context.
    pub fn find_blocking(&self, decision_id: &str) -> Result<Option<(u64, Evidence)>, RingError> {
        let known = self.recent.lock().expect("recent decisions lock").seqs.get(decision_id).copied();
        if let Some(seq) = known {
            let limits = ReadLimits { chunks_max: 1, bytes_max: usize::MAX };
            let chunks = self.ring.read_from(Lane::Audit, seq, limits)?;
            // Acknowledged and deleted: the next chunk comes back instead, or nothing.
            return Ok(chunks
                .first()
                .filter(|chunk| chunk.seq == seq)
                .and_then(|chunk| find_in_chunk(chunk, decision_id))
                .map(|evidence| (seq, evidence)));
        }
        // One scan at a time; later lookups wait their turn (they run on blocking threads).
        let _scan = self.scan.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.scan_lane(decision_id)
    }

    fn scan_lane(&self, decision_id: &str) -> Result<Option<(u64, Evidence)>, RingError> {
        let limits = ReadLimits { chunks_max: SCAN_CHUNKS_PER_READ, bytes_max: SCAN_BYTES_PER_READ };
        let mut from_seq = self.ring.oldest_seq(Lane::Audit)?.unwrap_or(1);
        // The lane holds at most its budget; a read returns at least one chunk, so this ends.
        loop {
            let chunks = self.ring.read_from(Lane::Audit, from_seq, limits)?;
            let Some(last) = chunks.last() else { return Ok(None) };
            for chunk in &chunks {
                if let Some(evidence) = find_in_chunk(chunk, decision_id) {
                    return Ok(Some((chunk.seq, evidence)));
                }
            }
            assert!(last.seq >= from_seq, "reads move forward");
            from_seq = last.seq + 1;
        }
    }
}

/// The evidence record keyed `decision_id` in `chunk`, if any. Damaged records are skipped (the
/// ring has validated the chunk's CRC; a record that does not decode was not written by us).
fn find_in_chunk(chunk: &buffer::StoredChunk, decision_id: &str) -> Option<Evidence> {
    let raw = ChunkDecompressor::new().decompress(&chunk.header, chunk.body()).ok()?;
    for record in protocol::records(&raw) {
        let Ok(record) = record else { break };
        if record.key == decision_id && record.content_type == EVIDENCE_CONTENT_TYPE {
            match Evidence::decode(record.payload) {
                Ok(evidence) => return Some(evidence),
                Err(error) => {
                    tracing::warn!(seq = chunk.seq, decision_id, %error, "evidence record does not decode")
                }
            }
        }
    }
    None
}

struct Writer {
    ring: Ring,
    recorded: RecordedModels,
    limits: LedgerLimits,
    metrics: Arc<InferenceMetrics>,
    recent: Arc<Mutex<RecentDecisions>>,
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::Receiver<EvidenceJob>) {
        let mut carried: Option<EvidenceJob> = None;
        loop {
            let first = match carried.take() {
                Some(job) => job,
                None => match receiver.blocking_recv() {
                    Some(job) => job,
                    None => break,
                },
            };
            let mut bytes = first.record_bytes();
            let mut batch = vec![first];
            while batch.len() < self.limits.batch_records_max {
                let Ok(job) = receiver.try_recv() else { break };
                if bytes + job.record_bytes() > self.limits.chunk_raw_bytes_max {
                    carried = Some(job);
                    break;
                }
                bytes += job.record_bytes();
                batch.push(job);
            }
            self.commit(batch);
        }
        tracing::debug!("evidence writer stopped: every handle was dropped");
    }

    fn durable_append(&self, chunk: protocol::SealedChunk) -> Result<u64, CommitError> {
        // Not retried: a full audit reservation is answered with 503 at once, and the refused
        // chunk the ring hands back is dropped here.
        let seq = self.ring.append(chunk).map_err(|refused| CommitError::from_ring(&refused.error))?;
        if let Durability::Periodic { .. } = self.ring.config().durability {
            self.ring.sync().map_err(|error| CommitError::from_ring(&error))?;
        }
        Ok(seq)
    }

    /// Appends the model records this batch needs, then the batch's evidence, and answers.
    fn commit(&mut self, batch: Vec<EvidenceJob>) {
        let result = self.record_models(&batch).and_then(|model_records| {
            let mut builder = ChunkBuilder::new(Lane::Audit, self.limits.chunk_raw_bytes_max.max(1));
            let mut evidence_bytes = 0u64;
            for job in &batch {
                builder
                    .push(RecordRef {
                        key: &job.pending.decision_id,
                        timestamp_us: job.pending.decided_at_us,
                        content_type: EVIDENCE_CONTENT_TYPE,
                        payload: &job.pending.payload,
                    })
                    .map_err(|error| CommitError::Ring(format!("evidence record refused: {error}")))?;
                evidence_bytes += job.pending.payload.len() as u64;
            }
            assert!(builder.raw_len() <= self.limits.chunk_raw_bytes_max);
            let seq = self.durable_append(builder.seal_raw())?;
            self.metrics.batch(batch.len() as u64, evidence_bytes, model_records);
            Ok(seq)
        });
        if let Err(error) = &result {
            tracing::warn!(%error, jobs = batch.len(), "evidence batch not recorded; answering 503");
        }
        if let Ok(seq) = result {
            let mut recent = self.recent.lock().expect("recent decisions lock");
            for job in &batch {
                recent.insert(job.pending.decision_id.clone(), seq);
            }
        }
        for job in batch {
            // The handler may have gone (client hung up); the record stands either way.
            let _ = job.reply.send(result.clone());
        }
    }

    /// Appends a record for each model version of `batch` not yet recorded; returns how many.
    fn record_models(&mut self, batch: &[EvidenceJob]) -> Result<u64, CommitError> {
        let mut appended = 0;
        for job in batch {
            let digest = *job.pending.model.sha256();
            if self.recorded.contains(&digest) {
                continue;
            }
            let record = ModelRecord::new(job.pending.model.name(), job.pending.model.onnx_bytes().to_vec());
            let payload = record
                .encode()
                .map_err(|error| CommitError::Ring(format!("model record refused: {error}")))?;
            let key = model_record_key(&digest);
            let mut builder = ChunkBuilder::new(Lane::Audit, self.limits.chunk_raw_bytes_max.max(1));
            builder
                .push(RecordRef {
                    key: &key,
                    timestamp_us: job.pending.decided_at_us,
                    content_type: MODEL_CONTENT_TYPE,
                    payload: &payload,
                })
                .map_err(|error| CommitError::Ring(format!("model record refused: {error}")))?;
            if builder.raw_len() > self.limits.chunk_raw_bytes_max {
                return Err(CommitError::Ring(format!(
                    "model {} record of {} bytes exceeds one audit chunk ({} bytes)",
                    job.pending.model.name(),
                    builder.raw_len(),
                    self.limits.chunk_raw_bytes_max
                )));
            }
            let seq = self.durable_append(builder.seal_raw())?;
            tracing::info!(model = job.pending.model.name(), sha256 = %job.pending.model.sha256_hex(), seq, "model record appended to the audit lane");
            self.recorded.insert(digest);
            appended += 1;
        }
        Ok(appended)
    }
}
