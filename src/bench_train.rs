//! `tributary bench train`: training while ingest runs. Ingest (raw landing + commit + the
//! dataset pipeline deriving WebDataset and typed Parquet shards) runs once alone and once while
//! a stock reader loops over what is published (webdataset through the wids index, a pyarrow scan
//! of the sensor manifest's Parquet files), in the same process run on the same disk; then the
//! reader alone and a plain read of the same media files. Prints the ingest ratio (with reader /
//! alone) and the reader's throughput next to the plain read.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use core_sink::datasets::manifest::Manifest;
use core_sink::datasets::pipeline::{Pipeline, SHARD_INDEX_FILE};
use core_sink::datasets::{DatasetsConfig, Placement};
use core_sink::landing::{Committer, RawLanding};
use protocol::{ChunkBuilder, Lane, RecordRef};

use crate::bench_sink::{PLAIN_READ, WEBDATASET_READ, land_media_chunk, python};

const MIB: u64 = 1024 * 1024;
const SAMPLE_BYTES: usize = 200 * 1024;
/// Sensor records per batch, one raw chunk each of about 64 KiB.
const SENSOR_RECORDS_PER_BATCH: u64 = 2_000;

#[derive(Args)]
pub struct TrainArgs {
    /// Directory holding the landing, the targets and the manifests (on the disk to measure).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Batches landed and committed one after the other.
    #[arg(long, default_value_t = 40)]
    batches: u64,
    /// 200 KiB media samples per batch.
    #[arg(long, default_value_t = 50)]
    samples_per_batch: u64,
    /// Shard size; small so that many shards are published while the reader loops.
    #[arg(long, default_value_t = 16)]
    shard_mib: u64,
}

/// Loops over the published shards until the stop file exists: the wids index's media shards
/// with `webdataset`, the sensor manifest's Parquet files with `pyarrow`. Prints bytes read
/// (media sample bytes and Parquet table bytes), seconds and passes, space-separated.
const LOOPING_READER: &str = r#"
import json, os, sys, time
import pyarrow.parquet as pq
import webdataset
index, sensor_manifest, stop = sys.argv[1:4]
media = parquet = passes = 0
started = time.perf_counter()
while not os.path.exists(stop):
    try:
        listed = json.load(open(index))["shardlist"]
    except FileNotFoundError:
        listed = []
    base = os.path.dirname(index)
    urls = ["file://" + os.path.normpath(os.path.join(base, shard["url"])) for shard in listed]
    if urls:
        for sample in webdataset.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False):
            media += sum(len(value) for value in sample.values() if isinstance(value, bytes))
    try:
        shards = json.load(open(sensor_manifest))["shards"]
    except FileNotFoundError:
        shards = []
    for shard in shards:
        parquet += pq.read_table(shard["path"], columns=["device", "timestamp_us", "celsius"]).nbytes
    passes += 1
    if not urls:
        time.sleep(0.01)
print(media, parquet, time.perf_counter() - started, passes)
"#;

fn sensor_payload(index: u64) -> String {
    format!(
        r#"{{"sensor":"temp-{:03}","celsius":{:.3},"humidity":{:.2},"status":"ok","site":"north-yard"}}"#,
        index % 64,
        20.0 + (index % 1000) as f64 / 100.0,
        40.0 + (index % 500) as f64 / 10.0
    )
}

/// Lands and commits `args.batches` batches and derives the datasets after each commit, as the
/// sink does; returns bytes landed per second.
fn ingest(run: &Path, args: &TrainArgs) -> Result<f64> {
    let landing_dir = run.join("landing");
    let mut landing = RawLanding::new(&landing_dir, 1 << 30);
    landing.recover(None)?;
    let targets = vec![run.join("target0"), run.join("target1")];
    let mut config = DatasetsConfig::with_targets(targets, run.join("manifests"));
    config.placement = Placement::RoundRobin;
    config.shard_bytes_max = args.shard_mib * MIB;
    let dictionaries =
        std::sync::Arc::new(core_sink::dictionaries::DictionaryStore::open(&run.join("dictionaries"))?);
    let mut pipeline = Pipeline::open(config, &landing_dir, dictionaries)?;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut payload = vec![0u8; SAMPLE_BYTES];
    let mut landed = 0u64;
    let started = Instant::now();
    for batch in 0..args.batches {
        for sample in 0..args.samples_per_batch {
            for byte in payload.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            land_media_chunk(&mut landing, batch * args.samples_per_batch + sample, &payload)?;
            landed += SAMPLE_BYTES as u64;
        }
        let mut builder = ChunkBuilder::new(Lane::Sensor, 1024 * 1024);
        for record in 0..SENSOR_RECORDS_PER_BATCH {
            let index = batch * SENSOR_RECORDS_PER_BATCH + record;
            let key = format!("reading-{index:010}");
            let payload = sensor_payload(index);
            let timestamp_us = 1_796_299_200_000_000 + index * 1_000;
            builder.push(RecordRef {
                key: &key,
                timestamp_us,
                content_type: "application/json",
                payload: payload.as_bytes(),
            })?;
            landed += payload.len() as u64;
        }
        let encoded = builder.seal_raw().encode(batch + 1);
        let (header, _) = protocol::decode_chunk(&encoded)?;
        landing.land("bench-env", &header, &encoded)?;
        landing.commit()?;
        let checkpoint = landing.checkpoint();
        while pipeline.step(&checkpoint)? {}
    }
    pipeline.publish_open_shards();
    Ok(landed as f64 / started.elapsed().as_secs_f64())
}

pub fn run(args: TrainArgs) -> Result<()> {
    let base = args.dir.join("tributary-bench-train");
    let _ = std::fs::remove_dir_all(&base);
    println!(
        "tributary bench train: {} batches of {} x 200 KiB frames + {} JSON readings, shards of {} MiB over 2 targets, in {}",
        args.batches,
        args.samples_per_batch,
        SENSOR_RECORDS_PER_BATCH,
        args.shard_mib,
        base.display()
    );
    let alone = ingest(&base.join("alone"), &args)?;

    let run = base.join("with-reader");
    let stop = run.join("stop");
    std::fs::create_dir_all(&run)?;
    let reader = std::process::Command::new("python3")
        .arg("-c")
        .arg(LOOPING_READER)
        .arg(run.join("manifests/media").join(SHARD_INDEX_FILE))
        .arg(run.join("manifests/sensor/manifest.json"))
        .arg(&stop)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("start the looping python reader")?;
    let with_reader = ingest(&run, &args);
    std::fs::write(&stop, b"")?;
    let output = reader.wait_with_output()?;
    let with_reader = with_reader?;
    anyhow::ensure!(
        output.status.success(),
        "the reader failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // "<media bytes> <parquet bytes> <seconds> <passes>"
    let report: Vec<f64> = String::from_utf8(output.stdout)?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("reader report")?;
    anyhow::ensure!(report.len() == 4, "reader report {report:?}");
    let (media_rate, parquet_rate, passes) = (report[0] / report[2], report[1] / report[2], report[3]);

    let manifest = Manifest::read(&run.join("manifests/media/manifest.json"))?.context("media manifest")?;
    let shards: Vec<PathBuf> = manifest.shards.iter().map(|shard| shard.path.clone()).collect();
    let webdataset_alone = python(WEBDATASET_READ, &shards)?;
    let plain = python(PLAIN_READ, &shards)?;

    println!("ingest alone            {:>10.1} MB/s", alone / 1e6);
    println!(
        "ingest with the reader  {:>10.1} MB/s   ratio {:.2} (target >= 0.90)",
        with_reader / 1e6,
        with_reader / alone
    );
    println!(
        "reader during ingest    {:>10.1} MB/s media (webdataset via the wids index), {:.1} MB/s Parquet (pyarrow), {} passes",
        media_rate / 1e6,
        parquet_rate / 1e6,
        passes
    );
    println!(
        "after ingest: webdataset {:.1} MB/s, plain read {:.1} MB/s of the same {} files; reader during ingest / plain {:.2}",
        webdataset_alone / 1e6,
        plain / 1e6,
        shards.len(),
        media_rate / plain
    );
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
