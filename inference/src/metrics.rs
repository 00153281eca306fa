//! Counters of the inference API: plain atomics, read with [`InferenceMetrics::snapshot`] or
//! rendered with [`InferenceMetrics::render_prometheus`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the evidence batch-size histogram (records per appended chunk); a last bucket
/// counts everything larger.
pub const BATCH_SIZE_BUCKETS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Why a request was refused with a 4xx status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    UnsupportedMediaType,
    NotAnImage,
    MalformedTensor,
    ShapeMismatch,
    BodyTooLarge,
    UnknownModel,
    BadRequest,
}

impl RejectReason {
    pub const ALL: [RejectReason; 7] = [
        RejectReason::UnsupportedMediaType,
        RejectReason::NotAnImage,
        RejectReason::MalformedTensor,
        RejectReason::ShapeMismatch,
        RejectReason::BodyTooLarge,
        RejectReason::UnknownModel,
        RejectReason::BadRequest,
    ];

    /// The machine-readable reason, as in the JSON error body and the metric label.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::UnsupportedMediaType => "unsupported_media_type",
            RejectReason::NotAnImage => "not_an_image",
            RejectReason::MalformedTensor => "malformed_tensor",
            RejectReason::ShapeMismatch => "shape_mismatch",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::UnknownModel => "unknown_model",
            RejectReason::BadRequest => "bad_request",
        }
    }
}

/// Why a request was answered 503 (no decision, nothing recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnavailableReason {
    /// The audit lane's reservation is full until the sink acks.
    AuditFull,
    /// The evidence queue is at its bound.
    QueueFull,
    /// The ring failed or is closing.
    RingFailed,
}

impl UnavailableReason {
    pub const ALL: [UnavailableReason; 3] =
        [UnavailableReason::AuditFull, UnavailableReason::QueueFull, UnavailableReason::RingFailed];

    pub fn name(self) -> &'static str {
        match self {
            UnavailableReason::AuditFull => "audit_full",
            UnavailableReason::QueueFull => "evidence_queue_full",
            UnavailableReason::RingFailed => "ring_failed",
        }
    }
}

#[derive(Debug, Default)]
pub struct InferenceMetrics {
    /// Every `POST /v1/infer` received.
    pub requests: AtomicU64,
    /// Decisions answered (each with its durable evidence record).
    pub decisions: AtomicU64,
    /// 4xx answers, indexed like [`RejectReason::ALL`].
    pub rejected: [AtomicU64; RejectReason::ALL.len()],
    /// 503 answers, indexed like [`UnavailableReason::ALL`].
    pub unavailable: [AtomicU64; UnavailableReason::ALL.len()],
    /// 500 answers (model failed at run time).
    pub internal_errors: AtomicU64,
    /// Evidence record payload bytes appended durably.
    pub evidence_bytes: AtomicU64,
    /// Model records appended durably.
    pub model_records: AtomicU64,
    /// Chunks appended to the audit lane (one per batch).
    pub evidence_batches: AtomicU64,
    /// Evidence records in those chunks.
    pub evidence_batch_records: AtomicU64,
    /// Batches by size: `batch_size_buckets[i]` counts batches of at most `BATCH_SIZE_BUCKETS[i]`
    /// records and more than the bucket before; the last counts larger ones.
    pub batch_size_buckets: [AtomicU64; BATCH_SIZE_BUCKETS.len() + 1],
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    pub requests: u64,
    pub decisions: u64,
    pub rejected: Vec<(&'static str, u64)>,
    pub unavailable: Vec<(&'static str, u64)>,
    pub internal_errors: u64,
    pub evidence_bytes: u64,
    pub model_records: u64,
    pub evidence_batches: u64,
    pub evidence_batch_records: u64,
    pub batch_size_buckets: Vec<u64>,
}

impl MetricsSnapshot {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected.iter().find(|(name, _)| *name == reason.name()).map_or(0, |(_, count)| *count)
    }

    pub fn unavailable(&self, reason: UnavailableReason) -> u64 {
        self.unavailable.iter().find(|(name, _)| *name == reason.name()).map_or(0, |(_, count)| *count)
    }
}

fn add(counter: &AtomicU64, value: u64) {
    counter.fetch_add(value, Ordering::Relaxed);
}

impl InferenceMetrics {
    pub fn reject(&self, reason: RejectReason) {
        let index = RejectReason::ALL.iter().position(|&known| known == reason).expect("listed");
        add(&self.rejected[index], 1);
    }

    pub fn unavailable(&self, reason: UnavailableReason) {
        let index = UnavailableReason::ALL.iter().position(|&known| known == reason).expect("listed");
        add(&self.unavailable[index], 1);
    }

    pub(crate) fn batch(&self, evidence_records: u64, evidence_bytes: u64, model_records: u64) {
        add(&self.evidence_batches, 1);
        add(&self.evidence_batch_records, evidence_records);
        add(&self.evidence_bytes, evidence_bytes);
        add(&self.model_records, model_records);
        let bucket = BATCH_SIZE_BUCKETS
            .iter()
            .position(|&bound| evidence_records <= bound)
            .unwrap_or(BATCH_SIZE_BUCKETS.len());
        add(&self.batch_size_buckets[bucket], 1);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            requests: load(&self.requests),
            decisions: load(&self.decisions),
            rejected: RejectReason::ALL
                .iter()
                .zip(&self.rejected)
                .map(|(reason, count)| (reason.name(), load(count)))
                .collect(),
            unavailable: UnavailableReason::ALL
                .iter()
                .zip(&self.unavailable)
                .map(|(reason, count)| (reason.name(), load(count)))
                .collect(),
            internal_errors: load(&self.internal_errors),
            evidence_bytes: load(&self.evidence_bytes),
            model_records: load(&self.model_records),
            evidence_batches: load(&self.evidence_batches),
            evidence_batch_records: load(&self.evidence_batch_records),
            batch_size_buckets: self.batch_size_buckets.iter().map(load).collect(),
        }
    }

    /// Prometheus text exposition, every name starting `tributary_inference_`.
    pub fn render_prometheus(&self) -> String {
        let snapshot = self.snapshot();
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP tributary_inference_{name} {help}");
            let _ = writeln!(out, "# TYPE tributary_inference_{name} counter");
            for (labels, value) in samples {
                let _ = writeln!(out, "tributary_inference_{name}{labels} {value}");
            }
        };
        let plain = |value: u64| vec![(String::new(), value)];
        let labelled = |pairs: &[(&'static str, u64)]| {
            pairs
                .iter()
                .map(|(reason, value)| (format!("{{reason=\"{reason}\"}}"), *value))
                .collect::<Vec<_>>()
        };
        counter("requests_total", "Inference requests received.", &plain(snapshot.requests));
        counter(
            "decisions_total",
            "Decisions answered, each with a durable evidence record.",
            &plain(snapshot.decisions),
        );
        counter("rejected_total", "Requests refused with a 4xx status.", &labelled(&snapshot.rejected));
        counter(
            "unavailable_total",
            "Requests answered 503, nothing decided.",
            &labelled(&snapshot.unavailable),
        );
        counter("internal_errors_total", "Requests answered 500.", &plain(snapshot.internal_errors));
        counter(
            "evidence_bytes_total",
            "Evidence payload bytes appended durably.",
            &plain(snapshot.evidence_bytes),
        );
        counter("model_records_total", "Model records appended durably.", &plain(snapshot.model_records));
        let _ = writeln!(
            out,
            "# HELP tributary_inference_evidence_batch_records Evidence records per appended chunk."
        );
        let _ = writeln!(out, "# TYPE tributary_inference_evidence_batch_records histogram");
        let mut cumulative = 0;
        for (index, count) in snapshot.batch_size_buckets.iter().enumerate() {
            cumulative += count;
            let bound = BATCH_SIZE_BUCKETS.get(index).map_or("+Inf".to_string(), u64::to_string);
            let _ = writeln!(
                out,
                "tributary_inference_evidence_batch_records_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "tributary_inference_evidence_batch_records_sum {}",
            snapshot.evidence_batch_records
        );
        let _ =
            writeln!(out, "tributary_inference_evidence_batch_records_count {}", snapshot.evidence_batches);
        out
    }
}
