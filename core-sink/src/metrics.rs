//! A Prometheus text endpoint for the sink (`metrics_listen` in the config): `GET /metrics`
//! answers the counters of `SinkMetrics`, the dataset pipeline's counters, and the in-flight
//! bytes against their bound. Deliberately tiny: one request per connection, the request line
//! and headers bounded to 8 KiB and read within 2 s, so a stuck scraper cannot hold the sink.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::datasets::pipeline::DatasetMetrics;
use crate::lander::SinkMetrics;

const REQUEST_BYTES_MAX: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the endpoint reports.
#[derive(Clone)]
pub struct MetricsSources {
    pub sink: Arc<SinkMetrics>,
    pub datasets: Option<Arc<DatasetMetrics>>,
    pub in_flight_available: Arc<tokio::sync::Semaphore>,
    pub in_flight_bytes_max: u64,
    /// The onboarding authority's counters, when `[onboarding]` is configured.
    pub onboarding: Option<Arc<onboarding_authority::authority::AuthorityMetrics>>,
    /// The replicator's counters per replica, when `[replication]` is configured.
    pub replication: Option<Arc<crate::replication::ReplicationMetrics>>,
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        value.load(Ordering::Relaxed)
    );
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// The exposition text.
pub fn render(sources: &MetricsSources) -> String {
    let mut out = String::new();
    let sink = &sources.sink;
    counter(
        &mut out,
        "tributary_sink_connections_accepted_total",
        "QUIC connections accepted.",
        &sink.connections_accepted,
    );
    counter(
        &mut out,
        "tributary_sink_connections_refused_total",
        "Connections refused (TLS, revocation, limits).",
        &sink.connections_refused,
    );
    gauge(
        &mut out,
        "tributary_sink_sessions_active",
        "Device sessions now.",
        sink.sessions_active.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "tributary_sink_chunks_landed_total",
        "Chunks written by the committer.",
        &sink.chunks_landed,
    );
    counter(
        &mut out,
        "tributary_sink_bytes_landed_total",
        "Encoded chunk bytes written.",
        &sink.bytes_landed,
    );
    counter(
        &mut out,
        "tributary_sink_duplicates_dropped_total",
        "Resent chunks at or below the landed watermark.",
        &sink.duplicates_dropped,
    );
    counter(
        &mut out,
        "tributary_sink_bad_chunks_total",
        "Connections closed for a chunk breaking the rules (CRC, header, lane, seq order, dictionary).",
        &sink.bad_chunks,
    );
    counter(
        &mut out,
        "tributary_sink_fenced_chunks_total",
        "Chunks refused because their lane was rolled back or the device's ring changed since their session began.",
        &sink.fenced_chunks,
    );
    counter(
        &mut out,
        "tributary_sink_ring_epochs_total",
        "New seq epochs: a device came back with a ring the sink had not seen (recreated or renewed).",
        &sink.ring_epochs_started,
    );
    counter(
        &mut out,
        "tributary_sink_dictionaries_stored_total",
        "Compression dictionaries received from appliances and stored durably.",
        &sink.dictionaries_stored,
    );
    counter(
        &mut out,
        "tributary_sink_dictionaries_refused_total",
        "Compression dictionaries refused (over the device's quota, or bytes zstd cannot load); the session is closed.",
        &sink.dictionaries_refused,
    );
    counter(
        &mut out,
        "tributary_sink_commits_total",
        "Commit points (fsync + state) completed.",
        &sink.commits,
    );
    counter(
        &mut out,
        "tributary_sink_commit_failures_total",
        "Commit points that failed and rolled back.",
        &sink.commit_failures,
    );
    counter(
        &mut out,
        "tributary_sink_landing_failures_total",
        "Chunk writes that failed.",
        &sink.landing_failures,
    );
    counter(&mut out, "tributary_sink_acks_sent_total", "Ack messages sent.", &sink.acks_sent);
    telemetry::render_histograms(
        &mut out,
        "tributary_sink_ack_latency_seconds",
        "From a chunk read off its stream to the commit that made it durable and acked.",
        &[(String::new(), &sink.ack_latency)],
    );
    let available = sources.in_flight_available.available_permits() as u64;
    gauge(
        &mut out,
        "tributary_sink_in_flight_bytes",
        "Verified chunk bytes waiting to be written.",
        sources.in_flight_bytes_max.saturating_sub(available),
    );
    gauge(
        &mut out,
        "tributary_sink_in_flight_bytes_max",
        "Bound on in-flight bytes.",
        sources.in_flight_bytes_max,
    );
    counter(
        &mut out,
        "tributary_sink_device_in_flight_waits_total",
        "Chunks that waited because their connection held its whole share of the in-flight bound (device_in_flight_bytes_max).",
        &sink.device_in_flight_waits,
    );
    gauge(
        &mut out,
        "tributary_sink_landing_files_open",
        "Raw landing files open now (bounded by open_files_max).",
        sink.landing_files_open.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "tributary_sink_landing_files_closed_at_limit_total",
        "Raw landing files closed (least recently used first) to stay within open_files_max.",
        &sink.landing_files_closed_at_limit,
    );
    if let Some(replication) = &sources.replication {
        render_replication(&mut out, replication, crate::replication::unix_ms());
    }
    if let Some(authority) = &sources.onboarding {
        render_onboarding(&mut out, authority);
    }
    if let Some(datasets) = &sources.datasets {
        counter(
            &mut out,
            "tributary_datasets_shards_published_total",
            "Dataset shards published.",
            &datasets.shards_published,
        );
        counter(
            &mut out,
            "tributary_datasets_samples_published_total",
            "Samples in published shards.",
            &datasets.samples_published,
        );
        counter(
            &mut out,
            "tributary_datasets_shard_failures_total",
            "Shards dropped after a target failure.",
            &datasets.shard_failures,
        );
        counter(
            &mut out,
            "tributary_datasets_rejected_chunks_total",
            "Chunks quarantined (left out of the datasets, listed in the manifest) because a record would break the dataset.",
            &datasets.rejected_chunks,
        );
        counter(
            &mut out,
            "tributary_datasets_type_conflicts_total",
            "Values in published sensor shards that did not fit their typed column (cell null, raw JSON kept in payload, listed in the manifest).",
            &datasets.type_conflicts,
        );
        counter(
            &mut out,
            "tributary_datasets_step_failures_total",
            "Dataset pipeline steps that failed and will be retried (logged at most every 10 s).",
            &datasets.step_failures,
        );
        counter(
            &mut out,
            "tributary_datasets_undecodable_chunks_total",
            "Chunks the sink cannot decode.",
            &datasets.undecodable_chunks,
        );
        gauge(
            &mut out,
            "tributary_datasets_dictionary_cache_bytes",
            "Dictionary bytes loaded in the datasets pipeline's decompressors (least recently used devices dropped past the bound).",
            datasets.dictionary_cache_bytes.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "tributary_datasets_dictionary_cache_evictions_total",
            "Devices whose dictionaries were dropped from the datasets pipeline's decompressors to stay within the bound.",
            &datasets.dictionary_cache_evictions,
        );
        counter(
            &mut out,
            "tributary_datasets_upload_bytes_total",
            "Shard bytes uploaded to bucket targets (multipart parts; a retried upload counts again).",
            &datasets.upload_bytes,
        );
        counter(
            &mut out,
            "tributary_datasets_upload_parts_total",
            "Multipart upload parts sent to bucket targets.",
            &datasets.upload_parts,
        );
        counter(
            &mut out,
            "tributary_datasets_upload_failures_total",
            "Shard uploads (and bucket recoveries) that failed; the records go into a shard again later.",
            &datasets.upload_failures,
        );
        counter(
            &mut out,
            "tributary_datasets_bucket_manifest_failures_total",
            "Manifest or wids index puts to bucket targets that failed (retried; the bucket's manifest lags meanwhile).",
            &datasets.bucket_manifest_failures,
        );
    }
    out
}

/// Serves `GET /metrics` until the task is aborted.
pub async fn serve(listener: TcpListener, sources: MetricsSources) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let sources = sources.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; REQUEST_BYTES_MAX];
            let mut read = 0;
            let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
                while read < request.len() {
                    match stream.read(&mut request[read..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(count) => read += count,
                    }
                    if request[..read].windows(4).any(|window| window == b"\r\n\r\n") {
                        return true;
                    }
                }
                false
            })
            .await;
            if !matches!(complete, Ok(true)) {
                return;
            }
            let (status, body) = if request.starts_with(b"GET /metrics ") {
                ("200 OK", render(&sources))
            } else {
                ("404 Not Found", "only GET /metrics is served here\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// The replicator's series, one per replica with the label `replica="<name>"` (names are
/// `[A-Za-z0-9_-]`, so they need no escaping).
pub fn render_replication(
    out: &mut String,
    replication: &crate::replication::ReplicationMetrics,
    now_unix_ms: u64,
) {
    type Value = fn(&crate::replication::ReplicaMetrics, u64) -> u64;
    let series: [(&str, &str, &str, Value); 7] = [
        (
            "tributary_replication_lag_bytes",
            "gauge",
            "Bytes of published shards, manifests and archive log not on the replica yet (measured after each pass).",
            |metrics, _| metrics.lag_bytes.load(Ordering::Relaxed),
        ),
        (
            "tributary_replication_lag_seconds",
            "gauge",
            "Seconds since the replica was last caught up with the sources (0 when it is).",
            |metrics, now| metrics.lag_seconds(now),
        ),
        (
            "tributary_replication_objects_copied_total",
            "counter",
            "Objects written to the replica (shards, manifests, archive objects, log segments, keys).",
            |metrics, _| metrics.objects_copied.load(Ordering::Relaxed),
        ),
        (
            "tributary_replication_bytes_copied_total",
            "counter",
            "Bytes written to the replica.",
            |metrics, _| metrics.bytes_copied.load(Ordering::Relaxed),
        ),
        (
            "tributary_replication_objects_present_total",
            "counter",
            "Objects found already on the replica and not copied again.",
            |metrics, _| metrics.objects_present.load(Ordering::Relaxed),
        ),
        (
            "tributary_replication_repairs_total",
            "counter",
            "Replica objects replaced from the source (wrong size, or named by verify with --repair).",
            |metrics, _| metrics.repairs.load(Ordering::Relaxed),
        ),
        (
            "tributary_replication_errors_total",
            "counter",
            "Passes that failed (replica unreachable or full, a source unreadable); retried every pass.",
            |metrics, _| metrics.errors.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (replica, metrics) in &replication.replicas {
            let _ = writeln!(out, "{name}{{replica=\"{replica}\"}} {}", value(metrics, now_unix_ms));
        }
    }
    let shared: [(&str, &str, &str, f64); 4] = [
        (
            "tributary_replication_budget_bytes_per_second",
            "gauge",
            "The replication bandwidth budget in force (bytes_per_second_max, or the adaptive budget).",
            replication.budget_bytes_per_second.load(Ordering::Relaxed) as f64,
        ),
        (
            "tributary_replication_ingest_latency_seconds",
            "gauge",
            "The adaptive mode's signal: mean ingest (ack) latency of its last interval with acked chunks (0 without the adaptive mode).",
            replication.ingest_latency_us.load(Ordering::Relaxed) as f64 / 1e6,
        ),
        (
            "tributary_replication_ingest_latency_threshold_seconds",
            "gauge",
            "The latency above which the adaptive mode cuts the budget (0 without the adaptive mode).",
            replication.ingest_latency_threshold_us.load(Ordering::Relaxed) as f64 / 1e6,
        ),
        (
            "tributary_replication_budget_cuts_total",
            "counter",
            "Times the adaptive mode halved the budget because ingest latency rose.",
            replication.budget_cuts.load(Ordering::Relaxed) as f64,
        ),
    ];
    for (name, kind, help, value) in shared {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
}

/// The onboarding authority's counters; refusals per `RejectionCode` (the codes a claim holder
/// or device provokes: `docs/operations.md`, "Threat model").
fn render_onboarding(out: &mut String, authority: &onboarding_authority::authority::AuthorityMetrics) {
    for (name, help, value) in [
        ("accepted", "Onboarding requests answered with a new certificate.", &authority.accepted),
        (
            "reanswered",
            "Requests answered again with the certificate already issued to their key.",
            &authority.reanswered,
        ),
        ("renewed", "Device certificates issued by renewal.", &authority.renewed),
        ("pending", "Requests waiting for an operator's approval.", &authority.pending),
        ("ignored", "Messages ignored (invalid topic, unparsable, revoked sender).", &authority.ignored),
        ("heartbeats", "Device heartbeats recorded.", &authority.heartbeats),
        ("config_acks", "Config acks recorded.", &authority.config_acks),
        ("configs_published", "Config documents published.", &authority.configs_published),
    ] {
        counter(out, &format!("tributary_onboarding_{name}_total"), help, value);
    }
    let _ = writeln!(
        out,
        "# HELP tributary_onboarding_rejected_total Onboarding requests refused, per code.\n# TYPE tributary_onboarding_rejected_total counter"
    );
    for code in onboarding::RejectionCode::ALL {
        let _ = writeln!(
            out,
            "tributary_onboarding_rejected_total{{code=\"{}\"}} {}",
            code.as_str(),
            authority.rejections(code)
        );
    }
}

#[cfg(test)]
mod onboarding_tests {
    use super::*;

    #[test]
    fn onboarding_refusals_are_exported_per_code() {
        let authority = Arc::new(onboarding_authority::authority::AuthorityMetrics::default());
        authority.count_rejection(onboarding::RejectionCode::TokenUsed);
        authority.count_rejection(onboarding::RejectionCode::TokenUsed);
        let sources = MetricsSources {
            sink: Arc::new(SinkMetrics::default()),
            datasets: None,
            in_flight_available: Arc::new(tokio::sync::Semaphore::new(8)),
            in_flight_bytes_max: 8,
            onboarding: Some(authority),
            replication: Some(Arc::new(crate::replication::ReplicationMetrics {
                replicas: vec![("site-b".to_owned(), Arc::default())],
                ..Default::default()
            })),
        };
        let text = render(&sources);
        assert!(text.contains("tributary_onboarding_rejected_total{code=\"token_used\"} 2"), "{text}");
        assert!(text.contains("tributary_onboarding_rejected_total{code=\"key_mismatch\"} 0"), "{text}");
        assert!(text.contains("tributary_onboarding_accepted_total 0"), "{text}");
        // Every sink-side family the Grafana dashboard queries is one this endpoint exports.
        let dashboard = include_str!("../../deploy/grafana/tributary.json");
        let sink_side = telemetry::metric_families_named_in(dashboard).into_iter().filter(|family| {
            ["tributary_sink_", "tributary_onboarding_", "tributary_replication_"]
                .iter()
                .any(|prefix| family.starts_with(prefix))
        });
        let mut checked = 0;
        for family in sink_side {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "the dashboard queries {family}, not exported"
            );
            checked += 1;
        }
        assert!(checked >= 10, "the dashboard shows the sink ({checked} families)");
    }

    #[test]
    fn replication_series_are_exported_per_replica() {
        let site_b = Arc::new(crate::replication::ReplicaMetrics::default());
        site_b.objects_copied.store(3, Ordering::Relaxed);
        site_b.bytes_copied.store(300, Ordering::Relaxed);
        site_b.lag_bytes.store(42, Ordering::Relaxed);
        site_b.behind_since_unix_ms.store(10_000, Ordering::Relaxed);
        let replication = Arc::new(crate::replication::ReplicationMetrics {
            replicas: vec![("site-b".into(), site_b), ("s3-b".into(), Arc::default())],
            ..Default::default()
        });
        replication.budget_bytes_per_second.store(8 << 20, Ordering::Relaxed);
        replication.ingest_latency_us.store(25_000, Ordering::Relaxed);
        replication.budget_cuts.store(3, Ordering::Relaxed);
        let sources = MetricsSources {
            sink: Arc::new(SinkMetrics::default()),
            datasets: None,
            in_flight_available: Arc::new(tokio::sync::Semaphore::new(8)),
            in_flight_bytes_max: 8,
            onboarding: None,
            replication: Some(replication.clone()),
        };
        assert!(
            render(&sources).contains("tributary_replication_objects_copied_total{replica=\"site-b\"} 3")
        );
        let mut text = String::new();
        render_replication(&mut text, &replication, 75_000);
        for line in [
            "tributary_replication_lag_bytes{replica=\"site-b\"} 42",
            "tributary_replication_lag_seconds{replica=\"site-b\"} 65",
            "tributary_replication_lag_seconds{replica=\"s3-b\"} 0",
            "tributary_replication_bytes_copied_total{replica=\"site-b\"} 300",
            "tributary_replication_errors_total{replica=\"s3-b\"} 0",
            "# TYPE tributary_replication_lag_bytes gauge",
            "tributary_replication_budget_bytes_per_second 8388608",
            "tributary_replication_ingest_latency_seconds 0.025",
            "tributary_replication_ingest_latency_threshold_seconds 0",
            "tributary_replication_budget_cuts_total 3",
        ] {
            assert!(text.lines().any(|found| found == line), "{line} in\n{text}");
        }
    }
}
