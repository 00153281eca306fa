//! `tributary bench pipeline`: records/s through the appliance's own stages on one core —
//! filters (a schema check and a tag, as the demo's sensors have) → chunker (zstd once, 128 KiB
//! chunks) → ring append — for 335-byte JSON sensor records and 200 KiB incompressible frames,
//! with the ring in `sync` and `periodic` mode. The peer, measured in the same run on the same
//! records: zstd alone compressing the same 128 KiB blocks at the same level. The ratio
//! (pipeline bytes/s ÷ zstd bytes/s) says how much of zstd's speed the rest of the pipeline
//! keeps.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use appliance::chunker::{Chunker, ChunkerConfig};
use appliance::filters::{FilterChain, FilterConfig, Verdict};
use appliance::pipeline::{PipelineMetrics, append_chunk};
use appliance::{SourceRecord, StopSignal};
use buffer::{Durability, Ring, RingConfig};
use clap::Args;
use protocol::Lane;

const MIB: u64 = 1024 * 1024;
const CHUNK_RAW_BYTES: usize = 128 * 1024;
const ZSTD_LEVEL: i32 = 3;

#[derive(Args)]
pub struct PipelineArgs {
    /// Directory for the rings (on the disk you want to measure).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Sensor records per case.
    #[arg(long, default_value_t = 300_000)]
    sensor_records: usize,
    /// Frames per case.
    #[arg(long, default_value_t = 1_000)]
    frames: usize,
}

fn sensor_records(count: usize) -> Vec<SourceRecord> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|index| {
            // A realistic reading: varying numbers in fixed field names, ~335 bytes.
            let mut payload = format!(
                "{{\"sensor\":\"env{}\",\"seq\":{index},\"temperature_c\":{:.3},\"humidity_pct\":{:.2},\
                 \"pressure_hpa\":{:.2},\"x_mg\":{},\"y_mg\":{},\"z_mg\":{},\"battery_v\":{:.3},\
                 \"rssi_dbm\":-{},\"status\":\"ok\",\"site\":\"plant-3\",\"line\":\"2\",\"firmware\":\"1.4.2\",\
                 \"calibration\":\"{:016x}\",\"trace\":\"{:016x}{:016x}\"",
                index % 8,
                20.0 + (next() % 10_000) as f64 / 1_000.0,
                30.0 + (next() % 4_000) as f64 / 100.0,
                990.0 + (next() % 4_000) as f64 / 100.0,
                next() % 40,
                next() % 40,
                980 + next() % 40,
                3.0 + (next() % 1_200) as f64 / 1_000.0,
                40 + next() % 60,
                next() % 8,
                next(),
                next()
            );
            while payload.len() < 334 {
                payload.push(' ');
            }
            payload.push('}');
            record(Lane::Sensor, index, "application/json", payload.into_bytes())
        })
        .collect()
}

fn frames(count: usize) -> Vec<SourceRecord> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..count)
        .map(|index| {
            let frame: Vec<u8> = (0..200 * 1024)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            record(Lane::Media, index, "image/jpeg", frame)
        })
        .collect()
}

fn record(lane: Lane, index: usize, content_type: &str, payload: Vec<u8>) -> SourceRecord {
    SourceRecord {
        lane,
        key: format!("bench-{index:012}"),
        timestamp_us: 1_700_000_000_000_000 + index as u64,
        content_type: content_type.into(),
        payload,
        tags: Default::default(),
    }
}

fn filters(lane: Lane) -> Result<FilterChain> {
    let text = match lane {
        Lane::Sensor => {
            "filters = [{kind = \"schema\", fields = [{field = \"temperature_c\", type = \"number\"}]}, \
             {kind = \"tag\", tags = {site = \"bench\"}}]"
        }
        _ => "filters = [{kind = \"drop_duplicates\", window = 8}]",
    };
    let table: toml::Table = toml::from_str(text)?;
    let configs = FilterConfig::list_from_toml(&table["filters"])?;
    Ok(FilterChain::from_config(&configs)?)
}

/// Payload bytes per second through filters → chunker → ring.
fn run_pipeline(records: &[SourceRecord], durability: Durability, dir: &std::path::Path) -> Result<f64> {
    let path = dir.join(format!("bench-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    let mut config = RingConfig::with_capacity(4096 * MIB);
    config.durability = durability;
    let ring = Ring::open(&path, config)?;
    let lane = records[0].lane;
    let mut chain = filters(lane)?;
    let chunker_config = ChunkerConfig {
        chunk_raw_bytes: CHUNK_RAW_BYTES.max(if lane == Lane::Media { 1024 * 1024 } else { 0 }),
        zstd_level: ZSTD_LEVEL,
        dictionary: false,
        ..ChunkerConfig::default()
    };
    let mut chunker = Chunker::new("bench", lane, chunker_config, None);
    // The pipeline thread's own append path (with its retry on backpressure).
    let (stop, metrics) = (StopSignal::new(), PipelineMetrics::default());
    let started = Instant::now();
    let mut bytes = 0u64;
    for record in records {
        bytes += record.payload.len() as u64;
        let Verdict::Keep(record) = chain.apply(record.clone()) else { continue };
        for chunk in chunker.push(&record, started)? {
            append_chunk(&ring, chunk, &stop, &metrics)?;
        }
    }
    if let Some(chunk) = chunker.flush()? {
        append_chunk(&ring, chunk, &stop, &metrics)?;
    }
    ring.sync()?;
    let elapsed = started.elapsed().as_secs_f64();
    drop(ring);
    let _ = std::fs::remove_dir_all(&path);
    Ok(bytes as f64 / elapsed)
}

/// Payload bytes per second of zstd alone on the same payloads, in blocks of the chunk size.
fn run_zstd(records: &[SourceRecord]) -> Result<f64> {
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
    let mut block = Vec::with_capacity(CHUNK_RAW_BYTES * 2);
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut sink = 0usize;
    for record in records {
        block.extend_from_slice(&record.payload);
        bytes += record.payload.len() as u64;
        if block.len() >= CHUNK_RAW_BYTES {
            sink += compressor.compress(&block)?.len();
            block.clear();
        }
    }
    if !block.is_empty() {
        sink += compressor.compress(&block)?.len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(sink > 0, "zstd produced output");
    Ok(bytes as f64 / elapsed)
}

pub fn run(args: PipelineArgs) -> Result<()> {
    println!(
        "{:<16} {:<10} {:>12} {:>14} {:>14} {:>7}",
        "records", "ring", "records/s", "pipeline MB/s", "zstd MB/s", "ratio"
    );
    let workloads =
        [("335 B JSON", sensor_records(args.sensor_records)), ("200 KiB frames", frames(args.frames))];
    for (name, records) in &workloads {
        let payload_bytes: u64 = records.iter().map(|record| record.payload.len() as u64).sum();
        let average = payload_bytes as f64 / records.len() as f64;
        for (mode, durability) in
            [("sync", Durability::Sync), ("periodic", Durability::Periodic { sync_interval_ms: 200 })]
        {
            let zstd = run_zstd(records)?;
            let pipeline = run_pipeline(records, durability, &args.dir)?;
            println!(
                "{name:<16} {mode:<10} {:>12.0} {:>14.1} {:>14.1} {:>7.2}",
                pipeline / average,
                pipeline / 1e6,
                zstd / 1e6,
                pipeline / zstd
            );
        }
    }
    Ok(())
}
