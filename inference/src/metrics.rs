//! Counters of the inference API: plain atomics, read with [`InferenceMetrics::snapshot`] or
//! rendered with [`InferenceMetrics::render_prometheus`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::http_server::{ConnectionEvent, ConnectionObserver};

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
    /// An image whose header declares more pixels a side than the model's bound; refused before
    /// its pixels are decoded.
    ImageTooLarge,
    /// The body did not arrive within `body_timeout_ms` (408).
    BodyTimeout,
    UnknownModel,
    BadRequest,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::UnsupportedMediaType,
        RejectReason::NotAnImage,
        RejectReason::MalformedTensor,
        RejectReason::ShapeMismatch,
        RejectReason::BodyTooLarge,
        RejectReason::ImageTooLarge,
        RejectReason::BodyTimeout,
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
            RejectReason::ImageTooLarge => "image_too_large",
            RejectReason::BodyTimeout => "body_timeout",
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
    /// Connection events of the API's server, indexed like [`ConnectionEvent::ALL`].
    pub connections: [AtomicU64; ConnectionEvent::ALL.len()],
    /// Requests that found every decode slot taken and waited for one.
    pub decodes_waited: AtomicU64,
    /// Decodes (and model runs) on blocking threads now; at most `decodes_max`.
    pub decodes_in_progress: AtomicU64,
    /// The most `decodes_in_progress` has been since start.
    pub decodes_in_progress_peak: AtomicU64,
}

impl ConnectionObserver for InferenceMetrics {
    fn connection_event(&self, event: ConnectionEvent) {
        let index = ConnectionEvent::ALL.iter().position(|&known| known == event).expect("listed");
        add(&self.connections[index], 1);
    }
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
    pub connections: Vec<(&'static str, u64)>,
    pub decodes_waited: u64,
    pub decodes_in_progress: u64,
    pub decodes_in_progress_peak: u64,
}

impl MetricsSnapshot {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected.iter().find(|(name, _)| *name == reason.name()).map_or(0, |(_, count)| *count)
    }

    pub fn unavailable(&self, reason: UnavailableReason) -> u64 {
        self.unavailable.iter().find(|(name, _)| *name == reason.name()).map_or(0, |(_, count)| *count)
    }

    pub fn connections(&self, event: ConnectionEvent) -> u64 {
        self.connections.iter().find(|(name, _)| *name == event.name()).map_or(0, |(_, count)| *count)
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
            rejected: named_counts(RejectReason::ALL.map(RejectReason::name), &self.rejected),
            unavailable: named_counts(UnavailableReason::ALL.map(UnavailableReason::name), &self.unavailable),
            internal_errors: load(&self.internal_errors),
            evidence_bytes: load(&self.evidence_bytes),
            model_records: load(&self.model_records),
            evidence_batches: load(&self.evidence_batches),
            evidence_batch_records: load(&self.evidence_batch_records),
            batch_size_buckets: self.batch_size_buckets.iter().map(load).collect(),
            connections: named_counts(ConnectionEvent::ALL.map(ConnectionEvent::name), &self.connections),
            decodes_waited: load(&self.decodes_waited),
            decodes_in_progress: load(&self.decodes_in_progress),
            decodes_in_progress_peak: load(&self.decodes_in_progress_peak),
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
        let events = snapshot
            .connections
            .iter()
            .map(|(event, value)| (format!("{{event=\"{event}\"}}"), *value))
            .collect::<Vec<_>>();
        counter(
            "connections_total",
            "Connections to the API by event: accepted, queued, refused (503 at the limits), \
             header_timeout, idle_timeout, closed.",
            &events,
        );
        counter(
            "decodes_waited_total",
            "Requests that waited for a decode slot (all decodes_max busy).",
            &plain(snapshot.decodes_waited),
        );
        let open = snapshot
            .connections(ConnectionEvent::Accepted)
            .saturating_sub(snapshot.connections(ConnectionEvent::Closed));
        for (name, help, value) in [
            ("connections_open", "Connections being served now.", open),
            ("decodes_in_progress", "Inputs being decoded and run now.", snapshot.decodes_in_progress),
            (
                "decodes_in_progress_peak",
                "The most inputs decoded at once since start (at most decodes_max).",
                snapshot.decodes_in_progress_peak,
            ),
        ] {
            let _ = writeln!(out, "# HELP tributary_inference_{name} {help}");
            let _ = writeln!(out, "# TYPE tributary_inference_{name} gauge");
            let _ = writeln!(out, "tributary_inference_{name} {value}");
        }
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

/// Each counter's value with its name (`names` in the order of `counts`).
fn named_counts(
    names: impl IntoIterator<Item = &'static str>,
    counts: &[AtomicU64],
) -> Vec<(&'static str, u64)> {
    names.into_iter().zip(counts).map(|(name, count)| (name, count.load(Ordering::Relaxed))).collect()
}
