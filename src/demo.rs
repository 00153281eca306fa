//! `tributary demo`: the pipeline on one machine with embedded defaults — a fleet CA, a core sink
//! with raw landing and training datasets on two targets, and several simulated appliances, each
//! with its own ring and QUIC uplink, producing sensor readings and camera-like frames for a
//! while. It ends with every produced record durable at the sink, the datasets published, and a
//! summary of where everything is.
//!
//! Not in the demo yet (their issues are open): the appliance pipeline's real sources and filters,
//! the MQTT broker and onboarding, the inference API and archive.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use appliance::{Uplink, UplinkConfig};
use buffer::{Ring, RingConfig};
use clap::Args;
use core_sink::datasets::manifest::Manifest;
use core_sink::{Sink, SinkConfig, SinkMetrics};
use fleet::{FleetCa, Validity};
use indicatif::{ProgressBar, ProgressStyle};
use protocol::{ChunkBuilder, ChunkCompressor, Lane, RecordRef};

const MIB: u64 = 1024 * 1024;
/// A slow source still flows: an open chunk is sealed after this long.
const CHUNK_AGE_MAX: Duration = Duration::from_millis(250);
/// How long the demo waits for the last chunks to be acked after producing stops.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo keeps its fleet CA, sink state, landing, datasets and appliance rings
    /// (replaced if it exists).
    #[arg(long, default_value = "tributary-demo")]
    dir: PathBuf,
    /// Simulated appliances.
    #[arg(long, default_value_t = 3)]
    appliances: usize,
    /// How long the appliances produce data, in seconds.
    #[arg(long = "duration", alias = "seconds", default_value_t = 15)]
    seconds: u64,
    /// Sensor readings per second per appliance.
    #[arg(long, default_value_t = 2_000)]
    readings_per_second: u64,
    /// Camera frames per second per appliance (synthetic, 20–60 KiB each).
    #[arg(long, default_value_t = 5)]
    frames_per_second: u64,
}

#[derive(Default)]
struct Produced {
    readings: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
}

fn write_sink_config(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("sink.toml");
    std::fs::write(
        &path,
        "# Written by `tributary demo`; relative paths are relative to this file.\n\
         listen = \"127.0.0.1:0\"\n\
         state_dir = \"sink/state\"\n\
         landing_dir = \"sink/landing\"\n\
         ca_dir = \"ca\"\n\
         server_certificate_dir = \"sink/server\"\n\
         revocation_file = \"ca/revoked.txt\"\n\
         commit_interval_ms = 50\n\
         \n\
         [datasets]\n\
         targets = [\"targets/ost0\", \"targets/ost1\"]\n\
         manifest_dir = \"sink/manifests\"\n\
         shard_bytes_max = 16777216\n\
         shard_age_max_ms = 5000\n",
    )
    .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// One appliance's producer: sensor readings batched into zstd chunks and frames stored raw,
/// each chunk sealed when full or `CHUNK_AGE_MAX` old.
fn produce(ring: &Ring, device: &str, args: &DemoArgs, stop: &AtomicBool, produced: &Produced) -> Result<()> {
    let mut compressor = ChunkCompressor::new(3);
    let mut readings = ChunkBuilder::new(Lane::Sensor, 128 * 1024);
    let mut frames = ChunkBuilder::new(Lane::Media, 1024 * 1024);
    let (mut readings_opened, mut frames_opened) = (Instant::now(), Instant::now());
    let started = Instant::now();
    let mut state =
        device.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |hash, byte| hash.rotate_left(5) ^ u64::from(byte));
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut temperature = 20.0f64;
    let (mut reading_index, mut frame_index) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let elapsed = started.elapsed().as_secs_f64();
        while (reading_index as f64) < elapsed * args.readings_per_second as f64 {
            temperature += ((next() % 1001) as f64 - 500.0) / 10_000.0;
            let key = format!("{device}-reading-{reading_index:010}");
            let timestamp_us =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
            let payload = format!(
                "{{\"sensor\":\"sht3x-0\",\"seq\":{reading_index},\"celsius\":{temperature:.3},\"humidity\":{:.2}}}",
                45.0 + (next() % 1000) as f64 / 100.0
            );
            readings.push(RecordRef {
                key: &key,
                timestamp_us,
                content_type: "application/json",
                payload: payload.as_bytes(),
            })?;
            produced.readings.fetch_add(1, Ordering::Relaxed);
            produced.bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
            reading_index += 1;
            if readings.is_full() {
                ring.append(readings.seal(&mut compressor, 0)?)?;
                readings_opened = Instant::now();
            }
        }
        while (frame_index as f64) < elapsed * args.frames_per_second as f64 {
            let length = 20 * 1024 + (next() % (40 * 1024)) as usize;
            let frame: Vec<u8> = (0..length).map(|_| next() as u8).collect();
            let key = format!("{device}-frame-{frame_index:08}");
            let timestamp_us =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
            frames.push(RecordRef {
                key: &key,
                timestamp_us,
                content_type: "image/jpeg",
                payload: &frame,
            })?;
            produced.frames.fetch_add(1, Ordering::Relaxed);
            produced.bytes.fetch_add(length as u64, Ordering::Relaxed);
            frame_index += 1;
            if frames.is_full() {
                ring.append(frames.seal_raw())?;
                frames_opened = Instant::now();
            }
        }
        if !readings.is_empty() && readings_opened.elapsed() >= CHUNK_AGE_MAX {
            ring.append(readings.seal(&mut compressor, 0)?)?;
            readings_opened = Instant::now();
        }
        if !frames.is_empty() && frames_opened.elapsed() >= CHUNK_AGE_MAX {
            ring.append(frames.seal_raw())?;
            frames_opened = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !readings.is_empty() {
        ring.append(readings.seal(&mut compressor, 0)?)?;
    }
    if !frames.is_empty() {
        ring.append(frames.seal_raw())?;
    }
    Ok(())
}

fn drained(rings: &[(String, Ring)]) -> bool {
    rings.iter().all(|(_, ring)| {
        let stats = ring.stats();
        [Lane::Sensor, Lane::Media]
            .iter()
            .all(|lane| stats.lane(*lane).acked_through + 1 == stats.lane(*lane).next_seq)
    })
}

pub fn run(args: &DemoArgs) -> Result<()> {
    anyhow::ensure!((1..=64).contains(&args.appliances), "--appliances must be within 1..=64");
    let dir = &args.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("remove the previous demo at {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    println!(
        "tributary demo: {} appliances for {} s, everything under {}",
        args.appliances,
        args.seconds,
        dir.display()
    );

    let ca = FleetCa::init(&dir.join("ca"), "tributary demo fleet")?;
    ca.issue_server(&["localhost".into(), "127.0.0.1".into()], Validity::days(30))?
        .write_to(&dir.join("sink").join("server"), ca.certificate_pem())?;
    let config_path = write_sink_config(&dir)?;
    let config = SinkConfig::load(&config_path)?;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let sink = runtime.block_on(Sink::start(config))?;
    println!("core sink listening on {} (config {})", sink.local_addr(), config_path.display());

    let mut rings = Vec::new();
    let mut uplinks = Vec::new();
    for index in 0..args.appliances {
        let device = format!("demo-appliance-{index:02}");
        let identity = ca.issue_device(&device, Validity::days(30))?;
        identity.write_to(&dir.join("appliances").join(&device).join("identity"), ca.certificate_pem())?;
        let ring = Ring::open(
            dir.join("appliances").join(&device).join("ring"),
            RingConfig::with_capacity(128 * MIB),
        )?;
        let config =
            UplinkConfig::new(sink.local_addr(), "localhost", &device, identity, ca.certificate_pem());
        let _guard = runtime.enter();
        uplinks.push(Uplink::spawn(ring.clone(), config)?);
        rings.push((device, ring));
    }

    let stop = AtomicBool::new(false);
    let produced = Produced::default();
    let bar = ProgressBar::new(args.seconds);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let metrics = sink.metrics();
    std::thread::scope(|scope| -> Result<()> {
        let producers: Vec<_> = rings
            .iter()
            .map(|(device, ring)| {
                let (stop, produced) = (&stop, &produced);
                scope.spawn(move || produce(ring, device, args, stop, produced))
            })
            .collect();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(args.seconds) {
            std::thread::sleep(Duration::from_millis(200));
            bar.set_position(started.elapsed().as_secs());
            bar.set_message(format!(
                "{} readings, {} frames produced; {} chunks landed durably",
                produced.readings.load(Ordering::Relaxed),
                produced.frames.load(Ordering::Relaxed),
                SinkMetrics::get(&metrics.chunks_landed)
            ));
        }
        stop.store(true, Ordering::Relaxed);
        for producer in producers {
            producer.join().expect("producer thread")?;
        }
        Ok(())
    })?;
    bar.finish_with_message("producing stopped; waiting for the last acks");
    let drain_started = Instant::now();
    while !drained(&rings) {
        anyhow::ensure!(
            drain_started.elapsed() < DRAIN_LIMIT,
            "the sink did not ack everything within {DRAIN_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let landed = SinkMetrics::get(&metrics.chunks_landed);
    let duplicates = SinkMetrics::get(&metrics.duplicates_dropped);
    runtime.block_on(async {
        for uplink in uplinks {
            uplink.stop().await;
        }
        sink.shutdown().await;
    });

    println!();
    println!(
        "produced {} sensor readings and {} frames ({:.1} MiB raw); the sink landed {landed} chunks durably ({duplicates} resends dropped as duplicates)",
        produced.readings.load(Ordering::Relaxed),
        produced.frames.load(Ordering::Relaxed),
        produced.bytes.load(Ordering::Relaxed) as f64 / MIB as f64
    );
    for (device, ring) in &rings {
        let stats = ring.stats();
        println!(
            "  {device}: sensor acked through seq {}, media through seq {}, ring holds {} unacked chunks",
            stats.lane(Lane::Sensor).acked_through,
            stats.lane(Lane::Media).acked_through,
            stats.lanes.iter().map(|lane| lane.chunk_count).sum::<u64>()
        );
    }
    for dataset in ["media", "sensor"] {
        let manifest_path = dir.join("sink").join("manifests").join(dataset).join("manifest.json");
        if let Some(manifest) = Manifest::read(&manifest_path)? {
            let samples: u64 = manifest.shards.iter().map(|shard| shard.samples).sum();
            println!(
                "dataset {dataset} ({}): {} shards, {samples} samples — manifest {}",
                manifest.kind,
                manifest.shards.len(),
                manifest_path.display()
            );
        }
    }
    println!(
        "raw landing (originals as received): {}",
        dir.join("sink").join("landing").join("raw").display()
    );
    println!("read the datasets with the stock Python readers (pip install webdataset pyarrow):");
    println!("  import glob, webdataset, pyarrow.parquet as pq");
    println!(
        "  frames = list(webdataset.WebDataset(sorted(glob.glob(\"{0}/targets/ost*/media/*.tar\")), shardshuffle=False))",
        dir.display()
    );
    println!(
        "  readings = pq.ParquetDataset(sorted(glob.glob(\"{0}/targets/ost*/sensor/*.parquet\"))).read()",
        dir.display()
    );
    Ok(())
}
