//! The appliance's Prometheus text endpoint: `GET /metrics` on `metrics_listen`.
//!
//! Per stage: source records and errors (the sources' own families), pipeline records received,
//! filter records in/out and drops by reason, chunker records and bytes in, chunk raw and body
//! bytes (their quotient is the compression ratio), dictionaries trained; ring fill, chunks and
//! evictions per lane; uplink connects, chunks and bytes sent, acked watermark, lag in chunks and
//! in seconds (age of the oldest unacked record) and ack latency (histogram) per lane.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use buffer::Ring;
use protocol::Lane;

use crate::filters::DropReason;
use crate::lag::LagProbe;
use crate::pipeline::SourcePipeline;
use crate::sources::SourceMetrics;
use crate::uplink::UplinkMetrics;

/// What the endpoint reads.
pub struct MetricsView {
    pub ring: Ring,
    pub pipelines: Vec<PipelineView>,
    pub uplink: Option<Arc<UplinkMetrics>>,
    /// Uplink lag in seconds per lane.
    pub lag: LagProbe,
    /// The onboarding agent's certificate renewals (when `[onboarding]` is configured).
    pub renewal: Option<Arc<onboarding::RenewalMetrics>>,
}

pub struct PipelineView {
    pub name: String,
    pub source: Arc<SourceMetrics>,
    pub pipeline: Arc<crate::pipeline::PipelineMetrics>,
    pub filters: Arc<crate::filters::FilterMetrics>,
    pub chunkers:
        Arc<std::sync::Mutex<std::collections::BTreeMap<Lane, Arc<crate::chunker::ChunkerMetrics>>>>,
}

impl PipelineView {
    pub fn new(pipeline: &SourcePipeline, source: Arc<SourceMetrics>) -> PipelineView {
        PipelineView {
            name: pipeline.name.clone(),
            source,
            pipeline: pipeline.metrics.clone(),
            filters: pipeline.filter_metrics.clone(),
            chunkers: pipeline.chunker_metrics.clone(),
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

pub fn render(view: &MetricsView) -> String {
    let mut out = String::new();
    let sources: Vec<(&str, &SourceMetrics)> =
        view.pipelines.iter().map(|pipeline| (pipeline.name.as_str(), &*pipeline.source)).collect();
    crate::sources::render_prometheus(&sources, &mut out);

    type PipelineValue = fn(&crate::pipeline::PipelineMetrics) -> u64;
    let pipeline_families: [(&str, &str, PipelineValue); 6] = [
        ("tributary_pipeline_records_received_total", "Records the pipeline took from its source.", |m| {
            get(&m.records_received)
        }),
        ("tributary_pipeline_chunks_appended_total", "Chunks appended to the ring.", |m| {
            get(&m.chunks_appended)
        }),
        ("tributary_pipeline_bytes_appended_total", "Encoded chunk bytes appended to the ring.", |m| {
            get(&m.bytes_appended)
        }),
        ("tributary_pipeline_append_retries_total", "Appends retried because a block lane was full.", |m| {
            get(&m.append_retries)
        }),
        ("tributary_pipeline_append_failures_total", "Chunks the ring refused (lost, logged).", |m| {
            get(&m.append_failures)
        }),
        ("tributary_pipeline_records_refused_total", "Records the chunker refused (bad key or type).", |m| {
            get(&m.records_refused)
        }),
    ];
    for (name, help, value) in pipeline_families {
        family(&mut out, name, "counter", help);
        for pipeline in &view.pipelines {
            let _ = writeln!(out, "{name}{{source=\"{}\"}} {}", pipeline.name, value(&pipeline.pipeline));
        }
    }

    family(&mut out, "tributary_filter_records_in_total", "counter", "Records entering the filters.");
    for pipeline in &view.pipelines {
        let _ = writeln!(
            out,
            "tributary_filter_records_in_total{{source=\"{}\"}} {}",
            pipeline.name,
            get(&pipeline.filters.records_in)
        );
    }
    family(&mut out, "tributary_filter_records_out_total", "counter", "Records the filters kept.");
    for pipeline in &view.pipelines {
        let _ = writeln!(
            out,
            "tributary_filter_records_out_total{{source=\"{}\"}} {}",
            pipeline.name,
            get(&pipeline.filters.records_out)
        );
    }
    family(&mut out, "tributary_filter_dropped_total", "counter", "Records the filters dropped, by reason.");
    for pipeline in &view.pipelines {
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "tributary_filter_dropped_total{{source=\"{}\",reason=\"{}\"}} {}",
                pipeline.name,
                reason.as_str(),
                pipeline.filters.dropped(reason)
            );
        }
    }

    type ChunkerValue = fn(&crate::chunker::ChunkerMetrics) -> u64;
    let chunker_families: [(&str, &str, ChunkerValue); 7] = [
        ("tributary_chunker_records_total", "Records added to chunks.", |m| get(&m.records_in)),
        ("tributary_chunker_payload_bytes_total", "Record payload bytes added to chunks.", |m| {
            get(&m.raw_bytes_in)
        }),
        ("tributary_chunker_chunks_total", "Chunks sealed.", |m| get(&m.chunks_sealed)),
        ("tributary_chunker_raw_bytes_total", "Raw record-block bytes of sealed chunks.", |m| {
            get(&m.chunk_raw_bytes)
        }),
        ("tributary_chunker_body_bytes_total", "Chunk body bytes after compression.", |m| {
            get(&m.chunk_body_bytes)
        }),
        ("tributary_chunker_dictionary_chunks_total", "Chunks compressed with a dictionary.", |m| {
            get(&m.chunks_with_dictionary)
        }),
        ("tributary_chunker_dictionaries_trained_total", "Dictionaries trained.", |m| {
            get(&m.dictionaries_trained)
        }),
    ];
    let chunkers: Vec<(String, Lane, Arc<crate::chunker::ChunkerMetrics>)> = view
        .pipelines
        .iter()
        .flat_map(|pipeline| {
            let chunkers = pipeline.chunkers.lock().expect("chunker metrics lock").clone();
            chunkers
                .into_iter()
                .map(|(lane, metrics)| (pipeline.name.clone(), lane, metrics))
                .collect::<Vec<_>>()
        })
        .collect();
    for (name, help, value) in chunker_families {
        family(&mut out, name, "counter", help);
        for (source, lane, metrics) in &chunkers {
            let _ = writeln!(out, "{name}{{source=\"{source}\",lane=\"{lane}\"}} {}", value(metrics));
        }
    }
    family(
        &mut out,
        "tributary_chunker_compression_ratio",
        "gauge",
        "Raw bytes / body bytes of all sealed chunks.",
    );
    for (source, lane, metrics) in &chunkers {
        let ratio = get(&metrics.chunk_raw_bytes) as f64 / get(&metrics.chunk_body_bytes).max(1) as f64;
        let _ = writeln!(
            out,
            "tributary_chunker_compression_ratio{{source=\"{source}\",lane=\"{lane}\"}} {ratio:.3}"
        );
    }

    let stats = view.ring.stats();
    type LaneValue = fn(&buffer::LaneStats) -> u64;
    let lane_families: [(&str, &str, &str, LaneValue); 7] = [
        ("tributary_ring_bytes_used", "gauge", "Bytes the lane holds in the ring.", |s| s.bytes_used),
        ("tributary_ring_budget_bytes", "gauge", "Bytes the lane's pool may hold.", |s| s.budget_bytes),
        ("tributary_ring_chunks", "gauge", "Chunks the lane holds (not yet acked).", |s| s.chunk_count),
        ("tributary_ring_evicted_chunks_total", "counter", "Chunks evicted unacked (drop_oldest).", |s| {
            s.evicted_chunks
        }),
        ("tributary_ring_evicted_records_total", "counter", "Records in chunks evicted unacked.", |s| {
            s.evicted_records
        }),
        ("tributary_ring_quarantined_chunks_total", "counter", "Damaged chunks quarantined.", |s| {
            s.quarantined_chunks
        }),
        ("tributary_ring_lag_chunks", "gauge", "Chunks appended but not yet acked by the sink.", |s| {
            (s.next_seq - 1).saturating_sub(s.acked_through)
        }),
    ];
    for (name, kind, help, value) in lane_families {
        family(&mut out, name, kind, help);
        for lane in Lane::ALL {
            let _ = writeln!(out, "{name}{{lane=\"{lane}\"}} {}", value(stats.lane(lane)));
        }
    }
    family(
        &mut out,
        "tributary_uplink_lag_seconds",
        "gauge",
        "Age of the oldest record the sink has not acked as durable (0 when all is acked).",
    );
    let now = std::time::SystemTime::now();
    for lane in Lane::ALL {
        match view.lag.lag(lane, now) {
            Ok(lag) => {
                let _ =
                    writeln!(out, "tributary_uplink_lag_seconds{{lane=\"{lane}\"}} {:.3}", lag.as_secs_f64());
            }
            // A chunk that cannot be read is quarantined by the ring and counted there.
            Err(error) => tracing::warn!(%lane, %error, "uplink lag unknown"),
        }
    }
    family(&mut out, "tributary_ring_capacity_bytes", "gauge", "Configured ring capacity.");
    let _ = writeln!(out, "tributary_ring_capacity_bytes {}", stats.capacity_bytes);

    if let Some(uplink) = &view.uplink {
        type UplinkValue = fn(&UplinkMetrics) -> u64;
        let uplink_families: [(&str, &str, UplinkValue); 9] = [
            ("tributary_uplink_connects_total", "Sessions established with the sink.", |m| get(&m.connects)),
            ("tributary_uplink_connect_failures_total", "Connection attempts that failed.", |m| {
                get(&m.connect_failures)
            }),
            ("tributary_uplink_sessions_ended_total", "Sessions that ended (and were retried).", |m| {
                get(&m.sessions_ended)
            }),
            (
                "tributary_uplink_chunks_sent_total",
                "Chunks sent (resends included).",
                |m| get(&m.chunks_sent),
            ),
            ("tributary_uplink_bytes_sent_total", "Chunk bytes sent.", |m| get(&m.bytes_sent)),
            ("tributary_uplink_acks_total", "Acks received.", |m| get(&m.acks_received)),
            ("tributary_uplink_dictionaries_sent_total", "Dictionaries sent ahead of chunks.", |m| {
                get(&m.dictionaries_sent)
            }),
            (
                "tributary_uplink_undeliverable_chunks_total",
                "Chunks skipped because they can never be delivered (logged with lane and seq).",
                |m| get(&m.undeliverable_chunks),
            ),
            (
                "tributary_uplink_ring_identity_renewals_total",
                "Times the ring took a new identity because the sink held seqs it had not written.",
                |m| get(&m.ring_identity_renewals),
            ),
        ];
        for (name, help, value) in uplink_families {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value(uplink));
        }
        family(
            &mut out,
            "tributary_uplink_acked_through_seq",
            "gauge",
            "The sink's durable watermark per lane.",
        );
        for lane in Lane::ALL {
            let _ = writeln!(
                out,
                "tributary_uplink_acked_through_seq{{lane=\"{lane}\"}} {}",
                uplink.acked_through(lane)
            );
        }
        let series: Vec<(String, &telemetry::LatencyHistogram)> = Lane::ALL
            .iter()
            .map(|lane| (format!("lane=\"{lane}\""), &uplink.ack_latency[lane.index()]))
            .collect();
        telemetry::render_histograms(
            &mut out,
            "tributary_uplink_ack_latency_seconds",
            "From a chunk handed to QUIC to the sink's durable Ack covering it.",
            &series,
        );
    }
    if let Some(renewal) = &view.renewal {
        render_renewal(&mut out, renewal);
    }
    out
}

fn render_renewal(out: &mut String, renewal: &onboarding::RenewalMetrics) {
    type RenewalValue = fn(&onboarding::RenewalMetrics) -> u64;
    let renewal_families: [(&str, &str, &str, RenewalValue); 7] = [
        ("tributary_certificate_renewed_total", "counter", "Certificates renewed and installed.", |m| {
            get(&m.renewed)
        }),
        ("tributary_certificate_renewal_requests_total", "counter", "Renewal requests sent.", |m| {
            get(&m.requests)
        }),
        ("tributary_certificate_renewal_refused_total", "counter", "Renewals the authority refused.", |m| {
            get(&m.refused)
        }),
        (
            "tributary_certificate_renewal_bad_answers_total",
            "counter",
            "Renewal answers that could not be used (wrong key, untrusted chain, unparsable).",
            |m| get(&m.bad_answers),
        ),
        (
            "tributary_certificate_untrusted_ca_offers_total",
            "counter",
            "Answers refused for offering a fleet CA no pinned CA vouches for.",
            |m| get(&m.untrusted_offers),
        ),
        ("tributary_certificate_trust_changes_total", "counter", "Changes of the pinned CA bundle.", |m| {
            get(&m.trust_changes)
        }),
        (
            "tributary_certificate_expires_unix_seconds",
            "gauge",
            "When the installed device certificate expires.",
            |m| get(&m.certificate_expires_unix_seconds),
        ),
    ];
    for (name, kind, help, value) in renewal_families {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {}", value(renewal));
    }
}

/// Serves `GET /metrics` until the listener's task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, view: Arc<MetricsView>) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let view = view.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || render(&view)).await.unwrap_or_default();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
            }
        }),
    );
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_counters_are_rendered_with_their_values() {
        let renewal = onboarding::RenewalMetrics::default();
        renewal.renewed.store(3, Ordering::Relaxed);
        renewal.requests.store(4, Ordering::Relaxed);
        renewal.refused.store(1, Ordering::Relaxed);
        renewal.untrusted_offers.store(2, Ordering::Relaxed);
        renewal.trust_changes.store(5, Ordering::Relaxed);
        renewal.certificate_expires_unix_seconds.store(1_800_000_000, Ordering::Relaxed);
        let mut page = String::new();
        render_renewal(&mut page, &renewal);
        for line in [
            "# TYPE tributary_certificate_renewed_total counter",
            "tributary_certificate_renewed_total 3",
            "tributary_certificate_renewal_requests_total 4",
            "tributary_certificate_renewal_refused_total 1",
            "tributary_certificate_renewal_bad_answers_total 0",
            "tributary_certificate_untrusted_ca_offers_total 2",
            "tributary_certificate_trust_changes_total 5",
            "# TYPE tributary_certificate_expires_unix_seconds gauge",
            "tributary_certificate_expires_unix_seconds 1800000000",
        ] {
            assert!(page.lines().any(|candidate| candidate == line), "missing {line:?} in\n{page}");
        }
    }
}
