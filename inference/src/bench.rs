//! `tributary bench inference` (feature `bench`; also `cargo run --release -p tributary-inference
//! --features bench --example bench_inference -- --models-dir models`): the inference API on loopback, `clients` concurrent keep-alive
//! connections each sending 32×32 PNGs, with and without the durable evidence record, the two
//! modes alternating in the same run on the same ring and disk. Reports requests/s, p50 and p99
//! latency (client side: request sent to answer read) and what the record adds at p99 (target:
//! at most 2 ms). The same run times the disk's physical limit — one record-sized write +
//! fdatasync to a plain file, and one durable ring commit (an audit-lane append in `sync` mode:
//! an LMDB commit, two fdatasyncs) — and states the record's p99 cost as a multiple of that
//! commit, since no durable record can cost less than one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::LoopbackClient;
use crate::synthetic::{dataset, encode_png};
use crate::{EvidenceMode, InferenceConfig, InferenceService, ModelSource};
use anyhow::{Context, Result, bail};
use buffer::{Durability, Ring, RingConfig};
use clap::Args;
use protocol::{ChunkBuilder, Lane, RecordRef};

const MIB: u64 = 1024 * 1024;
/// Alternating rounds per mode; latencies of all rounds are merged, rates are the median.
const ROUNDS: usize = 3;
/// Distinct images sent (cycled).
const IMAGES: usize = 256;
/// What the evidence record may add at p99.
const RECORD_P99_BUDGET: Duration = Duration::from_millis(2);
/// Appends + fsyncs timed for the disk's floor (a durable record costs at least one).
const FSYNC_SAMPLES: usize = 200;
/// Bytes per timed append, about one evidence record.
const FSYNC_SAMPLE_BYTES: usize = 5 * 1024;
/// Durable ring commits timed: 100 record-sized chunks (≈ 800 KiB stored) fit the 8 MiB audit
/// reservation of the 64 MiB scratch ring, so no ack or eviction runs between them.
const RING_COMMIT_SAMPLES: usize = 100;

/// The physical floor: p50 and p99 of appending a record-sized block to a file and fsyncing it.
fn fsync_floor(dir: &std::path::Path) -> Result<(Duration, Duration)> {
    use std::io::Write as _;
    let path = dir.join("fsync-floor.bin");
    let mut file = std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let block = vec![0x5a_u8; FSYNC_SAMPLE_BYTES];
    let mut samples = Vec::with_capacity(FSYNC_SAMPLES);
    for _ in 0..FSYNC_SAMPLES {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    std::fs::remove_file(&path).ok();
    samples.sort();
    Ok((percentile(&samples, 0.50), percentile(&samples, 0.99)))
}

/// The physical limit of a durable record: p50 and p99 of one audit-lane append of a
/// record-sized chunk to a scratch ring in `sync` durability (queue to the writer thread, LMDB
/// commit with its two fdatasyncs, reply). Every durable evidence batch costs at least this.
fn ring_commit_floor(dir: &std::path::Path) -> Result<(Duration, Duration)> {
    let mut config = RingConfig::with_capacity(64 * MIB);
    config.durability = Durability::Sync;
    let ring = Ring::open(dir.join("ring-commit-floor"), config).context("open the scratch ring")?;
    let payload = vec![0x5a_u8; FSYNC_SAMPLE_BYTES];
    let mut samples = Vec::with_capacity(RING_COMMIT_SAMPLES);
    for index in 0..RING_COMMIT_SAMPLES {
        let key = format!("floor-{index}");
        let mut builder = ChunkBuilder::new(Lane::Audit, 2 * FSYNC_SAMPLE_BYTES);
        builder.push(RecordRef {
            key: &key,
            timestamp_us: 0,
            content_type: "application/octet-stream",
            payload: &payload,
        })?;
        let chunk = builder.seal_raw();
        let started = Instant::now();
        ring.append(chunk).context("append to the scratch ring")?;
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok((percentile(&samples, 0.50), percentile(&samples, 0.99)))
}

#[derive(Args)]
pub struct InferenceArgs {
    /// Directory for the ring and the service state (on the disk you want to measure).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Directory holding shapes.onnx and shapes.json.
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// Requests per round and mode.
    #[arg(long, default_value_t = 3_000)]
    requests: usize,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Ring durability: `sync` (fsync per commit group, the appliance default) or `periodic`
    /// (the API then calls `Ring::sync` per batch itself).
    #[arg(long, default_value = "sync")]
    durability: String,
}

struct Round {
    latencies: Vec<Duration>,
    requests_per_second: f64,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

async fn round(
    address: std::net::SocketAddr,
    bodies: Arc<Vec<Vec<u8>>>,
    requests: usize,
    clients: usize,
) -> Result<Round> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..clients {
        let bodies = bodies.clone();
        let mut client = LoopbackClient::connect(address).await?;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for index in (client_index..requests).step_by(clients) {
                let sent = Instant::now();
                let response = client.infer(None, "image/png", bodies[index % bodies.len()].clone()).await?;
                latencies.push(sent.elapsed());
                if response.status != 200 {
                    bail!("status {}: {}", response.status, String::from_utf8_lossy(&response.body));
                }
            }
            Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let requests_per_second = latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok(Round { latencies, requests_per_second })
}

pub fn run(args: InferenceArgs) -> Result<()> {
    let durability = match args.durability.as_str() {
        "sync" => Durability::Sync,
        "periodic" => Durability::Periodic { sync_interval_ms: 1_000 },
        other => bail!("--durability {other}: expected sync or periodic"),
    };
    if args.requests == 0 || args.clients == 0 {
        bail!("--requests and --clients must be at least 1");
    }
    if args.clients > crate::http_server::CONNECTIONS_LIMIT {
        bail!(
            "--clients must be at most {} (the API's connection limit)",
            crate::http_server::CONNECTIONS_LIMIT
        );
    }
    let work = tempfile::Builder::new()
        .prefix("tributary-bench-inference")
        .tempdir_in(&args.dir)
        .with_context(|| format!("create a directory in {}", args.dir.display()))?;
    let mut ring_config = RingConfig::with_capacity(1024 * MIB);
    ring_config.audit_reserved_bytes = 512 * MIB;
    ring_config.durability = durability;
    let ring = Ring::open(work.path().join("ring"), ring_config).context("open the ring")?;
    let source = ModelSource::in_directory(&args.models_dir, "shapes");
    let start = |mode: EvidenceMode, state: &str| -> Result<Arc<InferenceService>> {
        let mut config = InferenceConfig::new(work.path().join(state), vec![source.clone()]);
        config.evidence = mode;
        // Every benchmark client keeps its connection; none waits in the queue.
        config.http.connections_max = args.clients;
        InferenceService::start(config, ring.clone())
            .with_context(|| format!("start the inference service with {}", source.onnx_path.display()))
    };
    let recorded = start(EvidenceMode::Durable, "state-recorded")?;
    let unrecorded = start(EvidenceMode::UnrecordedForBenchmark, "state-unrecorded")?;
    let bodies: Arc<Vec<Vec<u8>>> =
        Arc::new(dataset(77, IMAGES).iter().map(|(_, image)| encode_png(image)).collect());

    let (fsync_p50, fsync_p99) = fsync_floor(work.path())?;
    let (commit_p50, commit_p99) = ring_commit_floor(work.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut addresses = Vec::new();
        for service in [&unrecorded, &recorded] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addresses.push(listener.local_addr()?);
            tokio::spawn(crate::serve(listener, service.clone(), std::future::pending()));
        }
        // Warm-up: connections, allocator, page cache, the model record.
        for &address in &addresses {
            round(address, bodies.clone(), args.requests / 10 + args.clients, args.clients).await?;
        }
        let before = recorded.metrics().snapshot();
        let mut results: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (mode, &address) in addresses.iter().enumerate() {
                results[mode].push(round(address, bodies.clone(), args.requests, args.clients).await?);
            }
        }
        let after = recorded.metrics().snapshot();
        println!(
            "tributary bench inference: {} clients, {} requests x {ROUNDS} rounds per mode, 32x32 PNG, {} durability, in {}",
            args.clients,
            args.requests,
            args.durability,
            args.dir.display()
        );
        println!("{:<22} {:>12} {:>10} {:>10} {:>10}", "mode", "requests/s", "p50 ms", "p99 ms", "max ms");
        let mut p99 = [Duration::ZERO; 2];
        for (mode, rounds) in results.iter_mut().enumerate() {
            let mut latencies: Vec<Duration> = rounds.iter().flat_map(|round| round.latencies.iter().copied()).collect();
            latencies.sort();
            let mut rates: Vec<f64> = rounds.iter().map(|round| round.requests_per_second).collect();
            rates.sort_by(f64::total_cmp);
            p99[mode] = percentile(&latencies, 0.99);
            println!(
                "{:<22} {:>12.0} {:>10.3} {:>10.3} {:>10.3}",
                ["without audit record", "with audit record"][mode],
                rates[rates.len() / 2],
                milliseconds(percentile(&latencies, 0.50)),
                milliseconds(p99[mode]),
                milliseconds(*latencies.last().expect("at least one request")),
            );
        }
        let batches = after.evidence_batches - before.evidence_batches;
        let records = after.evidence_batch_records - before.evidence_batch_records;
        println!(
            "evidence: {records} records in {batches} appends (mean {:.1} per group commit), {:.1} KiB per record",
            records as f64 / batches.max(1) as f64,
            (after.evidence_bytes - before.evidence_bytes) as f64 / records.max(1) as f64 / 1024.0
        );
        println!(
            "disk floor: append {} KiB + fdatasync to a plain file: p50 {:.3} ms, p99 {:.3} ms",
            FSYNC_SAMPLE_BYTES / 1024,
            milliseconds(fsync_p50),
            milliseconds(fsync_p99)
        );
        println!(
            "disk floor: durable ring commit ({} KiB audit chunk, sync: LMDB commit = 2 fdatasyncs): p50 {:.3} ms, p99 {:.3} ms",
            FSYNC_SAMPLE_BYTES / 1024,
            milliseconds(commit_p50),
            milliseconds(commit_p99)
        );
        let added = p99[1].saturating_sub(p99[0]);
        let verdict = if added <= RECORD_P99_BUDGET { "met" } else { "MISSED" };
        println!(
            "audit record adds {:.3} ms at p99 (target <= {:.0} ms: {verdict})",
            milliseconds(added),
            milliseconds(RECORD_P99_BUDGET)
        );
        // A request that arrives while a group commit is under way waits for it and then for its
        // own: about two commits is what this disk allows at the tail with one writer.
        let commits = |duration: Duration| duration.as_secs_f64() / commit_p50.as_secs_f64().max(1e-9);
        println!(
            "against the disk: added p99 = {:.1} durable commits (p50 {:.3} ms; 1-2 is the floor), \
             with-record p99 = {:.1} commits; the 2 ms target is {:.1} commits on this disk{}",
            commits(added),
            milliseconds(commit_p50),
            commits(p99[1]),
            commits(RECORD_P99_BUDGET),
            if RECORD_P99_BUDGET < commit_p50 { ", below one: unreachable here with a durable record" } else { "" }
        );
        anyhow::Ok(())
    })?;
    drop(runtime);
    drop((recorded, unrecorded, ring));
    Ok(())
}
