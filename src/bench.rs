//! `tributary bench buffer`: ring append throughput against a plain sequential write + fsync of
//! the same bytes in the same chunk sizes, measured in the same run on the same disk.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use buffer::{Durability, Ring, RingConfig};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use protocol::{Codec, Lane, SealedChunk};

const MIB: u64 = 1024 * 1024;
/// Runs per case; the median is reported.
const REPEATS: usize = 3;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[derive(Subcommand)]
pub enum Target {
    /// The LMDB ring: appends of 64 KiB and 256 KiB chunks, sync and periodic durability, 1 and
    /// 8 producers, plus a soak at 10x capacity with mixed sizes (append rate first vs last tenth).
    Buffer(BufferArgs),
    /// Appliances → one sink on loopback, durable at both ends: ~255 B JSON records and 200 KiB
    /// frames, 1 and 16 appliances, plus the sink's memory with 50 devices connected.
    Uplink(crate::bench_uplink::UplinkArgs),
    /// Dataset shard writing over 1, 2 and 4 targets (200 KiB samples) against a parallel
    /// sequential write, and webdataset reading against a plain read.
    Sink(crate::bench_sink::SinkArgs),
    /// The appliance's stages on one core (filters → chunker with zstd → ring, sync and
    /// periodic) for 335 B JSON records and 200 KiB frames, against zstd alone on the same data.
    Pipeline(crate::bench_pipeline::PipelineArgs),
    /// The inference API: requests/s and p50/p99 latency with and without the durable audit
    /// record, measured in the same run.
    Inference(inference::bench::InferenceArgs),
    /// The sink's durable landing alone, while a replicator copies published shards to a
    /// directory replica within its budget, and with the budget lifted: ratios in the same run.
    Replicate(crate::bench_replicate::ReplicateArgs),
    /// Training while ingest runs: ingest (landing + dataset pipeline) alone and while a stock
    /// reader loops over the published shards (webdataset via the wids index, a pyarrow scan),
    /// in the same run; the reader's throughput next to a plain read of the same files.
    Train(crate::bench_train::TrainArgs),
    /// Tributary against the peers users would deploy instead (NATS leaf node + JetStream,
    /// a Mosquitto bridge at QoS 1; Debian's binaries when on PATH), the same store-and-forward
    /// workloads in the same run: records/s, MB/s, edge CPU per GB and memory, as ratios.
    Peers(crate::bench_peers::PeersArgs),
}

#[derive(Args)]
pub struct BufferArgs {
    /// Directory for the rings and the baseline file (on the disk you want to measure).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Bytes written per case, in MiB.
    #[arg(long, default_value_t = 256)]
    mib_per_case: u64,
    /// Capacity of the soak ring, in MiB (the soak writes ten times this).
    #[arg(long, default_value_t = 64)]
    soak_capacity_mib: u64,
}

pub fn run(target: Target) -> Result<()> {
    match target {
        Target::Buffer(args) => bench_buffer(&args),
        Target::Uplink(args) => crate::bench_uplink::bench_uplink(&args),
        Target::Sink(args) => crate::bench_sink::bench_sink(&args),
        Target::Inference(args) => inference::bench::run(args),
        Target::Pipeline(args) => crate::bench_pipeline::run(args),
        Target::Replicate(args) => crate::bench_replicate::run(args),
        Target::Train(args) => crate::bench_train::run(args),
        Target::Peers(args) => crate::bench_peers::run(args),
    }
}

struct Case {
    chunk_bytes: usize,
    durability: Durability,
    producers: usize,
}

fn durability_name(durability: Durability) -> &'static str {
    match durability {
        Durability::Sync => "sync",
        Durability::Periodic { .. } => "periodic",
    }
}

/// Incompressible bytes, as the ring stores compressed chunks.
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn progress(total: u64, label: String) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:<34} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(label);
    bar
}

/// The physical limit: the same bytes in the same write sizes to one file, then one fsync.
pub(crate) fn baseline(dir: &Path, total: u64, chunk_bytes: usize) -> Result<f64> {
    let path = dir.join("tributary-bench-baseline.bin");
    let block = noise(chunk_bytes, 7);
    let bar = progress(total, format!("baseline write+fsync {} KiB", chunk_bytes / 1024));
    let started = Instant::now();
    let mut file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let mut written = 0u64;
    while written < total {
        file.write_all(&block).with_context(|| format!("write {}", path.display()))?;
        written += chunk_bytes as u64;
        bar.set_position(written);
    }
    file.sync_all().with_context(|| format!("fsync {}", path.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    drop(file);
    fs::remove_file(&path).ok();
    Ok(written as f64 / seconds)
}

fn ring_case(dir: &Path, total: u64, case: &Case) -> Result<f64> {
    let path = dir.join("tributary-bench-ring");
    fs::remove_dir_all(&path).ok();
    let mut config = RingConfig::with_capacity((total + total / 4).max(64 * MIB));
    config.durability = case.durability;
    let ring = Ring::open(&path, config).with_context(|| format!("open ring at {}", path.display()))?;
    let per_producer = total / case.producers as u64 / case.chunk_bytes as u64;
    let bar = progress(
        per_producer * case.producers as u64 * case.chunk_bytes as u64,
        format!(
            "ring {} {} KiB x{}",
            durability_name(case.durability),
            case.chunk_bytes / 1024,
            case.producers
        ),
    );
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..case.producers)
            .map(|producer| {
                let ring = ring.clone();
                let bar = bar.clone();
                let body = noise(case.chunk_bytes, producer as u64 + 11);
                scope.spawn(move || -> Result<()> {
                    for _ in 0..per_producer {
                        let chunk = SealedChunk::new(
                            Lane::Sensor,
                            Codec::Raw,
                            0,
                            1,
                            body.len() as u32,
                            body.clone(),
                        )?;
                        ring.append(chunk)?;
                        bar.inc(body.len() as u64);
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("producer thread")?;
        }
        Ok(())
    })?;
    ring.sync()?; // periodic mode: count the final fsync in the time
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let stats = ring.stats();
    let appended = (stats.lane(Lane::Sensor).next_seq - 1) * case.chunk_bytes as u64;
    drop(ring);
    fs::remove_dir_all(&path).ok();
    Ok(appended as f64 / seconds)
}

struct SoakReport {
    first_tenth_mb_per_second: f64,
    last_tenth_mb_per_second: f64,
    largest_file_bytes: u64,
    file_bound_bytes: u64,
    evicted_chunks: u64,
}

/// Ten capacities of mixed 1 KiB – 1 MiB chunks under drop_oldest, periodic durability.
fn soak(dir: &Path, capacity_bytes: u64) -> Result<SoakReport> {
    let path = dir.join("tributary-bench-soak");
    fs::remove_dir_all(&path).ok();
    let mut config = RingConfig::with_capacity(capacity_bytes);
    config.durability = Durability::Periodic { sync_interval_ms: 100 };
    let file_bound_bytes = config.capacity_bytes + config.capacity_bytes * buffer::MAP_HEADROOM_PERCENT / 100;
    let ring = Ring::open(&path, config).with_context(|| format!("open ring at {}", path.display()))?;
    let total = 10 * capacity_bytes;
    let tenth = total / 10;
    let pool = noise(2 * MIB as usize, 3);
    let bar = progress(total, "soak 10x capacity, 1 KiB-1 MiB".to_string());
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut written = 0u64;
    let mut tenth_started = Instant::now();
    let mut tenth_rates = Vec::new();
    let mut largest_file_bytes = 0u64;
    while written < total {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Log-uniform between 1 KiB and 1 MiB.
        let exponent = 10.0 + (state >> 11) as f64 / (1u64 << 53) as f64 * 10.0;
        let len = 2f64.powf(exponent) as usize;
        let offset = (state as usize >> 3) % (pool.len() - len);
        let chunk = SealedChunk::new(
            Lane::Sensor,
            Codec::Raw,
            0,
            1,
            len as u32,
            pool[offset..offset + len].to_vec(),
        )?;
        ring.append(chunk)?;
        let before = written;
        written += len as u64;
        bar.set_position(written);
        if before / tenth != written / tenth {
            tenth_rates.push(tenth as f64 / tenth_started.elapsed().as_secs_f64());
            tenth_started = Instant::now();
            largest_file_bytes = largest_file_bytes.max(ring.stats().file_bytes);
        }
    }
    bar.finish_and_clear();
    let stats = ring.stats();
    drop(ring);
    fs::remove_dir_all(&path).ok();
    Ok(SoakReport {
        first_tenth_mb_per_second: tenth_rates.first().copied().unwrap_or(0.0) / 1e6,
        last_tenth_mb_per_second: tenth_rates.last().copied().unwrap_or(0.0) / 1e6,
        largest_file_bytes: largest_file_bytes.max(stats.file_bytes),
        file_bound_bytes,
        evicted_chunks: stats.lane(Lane::Sensor).evicted_chunks,
    })
}

fn bench_buffer(args: &BufferArgs) -> Result<()> {
    fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let total = args.mib_per_case * MIB;
    println!(
        "tributary bench buffer: {} MiB per run, median of {REPEATS} runs alternating with the peer, in {}",
        args.mib_per_case,
        args.dir.display()
    );
    println!(
        "{:<10} {:>9} {:>9} {:>10} {:>11} {:>12} {:>8}  target",
        "mode", "chunk", "producers", "MB/s", "chunks/s", "baseline MB/s", "ratio"
    );
    let mut misses = 0;
    for chunk_bytes in [64 * 1024, 256 * 1024] {
        for durability in [Durability::Periodic { sync_interval_ms: 1_000 }, Durability::Sync] {
            for producers in [1, 8] {
                let case = Case { chunk_bytes, durability, producers };
                // Peer and ring alternate, three times each, and the medians are compared: this
                // machine's virtual disk drifts by 2x between back-to-back identical writes.
                let mut baselines = Vec::new();
                let mut rings = Vec::new();
                for _ in 0..REPEATS {
                    baselines.push(baseline(&args.dir, total, chunk_bytes)?);
                    rings.push(ring_case(&args.dir, total, &case)?);
                }
                let baseline_bytes_per_second = median(&mut baselines);
                let bytes_per_second = median(&mut rings);
                let ratio = bytes_per_second / baseline_bytes_per_second;
                let target = match (durability, producers) {
                    (Durability::Periodic { .. }, _) => Some(0.80),
                    (Durability::Sync, 8) => Some(0.70),
                    (Durability::Sync, _) => None,
                };
                let verdict = match target {
                    Some(target) if ratio >= target => format!(">= {target:.2} met"),
                    Some(target) => {
                        misses += 1;
                        format!(">= {target:.2} MISSED")
                    }
                    None => "(none)".to_string(),
                };
                println!(
                    "{:<10} {:>6} KiB {:>9} {:>10.1} {:>11.0} {:>12.1} {:>8.2}  {verdict}",
                    durability_name(durability),
                    chunk_bytes / 1024,
                    producers,
                    bytes_per_second / 1e6,
                    bytes_per_second / chunk_bytes as f64,
                    baseline_bytes_per_second / 1e6,
                    ratio,
                );
            }
        }
    }
    let report = soak(&args.dir, args.soak_capacity_mib * MIB)?;
    println!(
        "soak: {} MiB ring, 10x written, mixed 1 KiB-1 MiB: first tenth {:.1} MB/s, last tenth {:.1} MB/s \
         (ratio {:.2}, target >= 0.80); largest file {:.1} MiB (bound {:.1} MiB); {} chunks evicted",
        args.soak_capacity_mib,
        report.first_tenth_mb_per_second,
        report.last_tenth_mb_per_second,
        report.last_tenth_mb_per_second / report.first_tenth_mb_per_second,
        report.largest_file_bytes as f64 / MIB as f64,
        report.file_bound_bytes as f64 / MIB as f64,
        report.evicted_chunks,
    );
    if misses > 0 {
        println!("{misses} case(s) below target");
    }
    Ok(())
}

/// One group of bars in a chart: its label and one value per series (`None`: not measured).
pub(crate) struct BarGroup {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

/// A grouped bar chart as SVG. `series` names the bars of every group (legend, in order);
/// `scale_per_group` scales each group to its own largest bar (groups in different units), else
/// every bar shares one scale. Bars are labelled with `value_text`.
pub(crate) fn grouped_bar_svg(
    title: &str,
    series: &[&str],
    groups: &[BarGroup],
    scale_per_group: bool,
    value_text: impl Fn(f64) -> String,
) -> String {
    const COLORS: [&str; 6] = ["#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a"];
    let largest = |values: &mut dyn Iterator<Item = f64>| values.fold(f64::MIN_POSITIVE, f64::max);
    let overall = largest(&mut groups.iter().flat_map(|group| group.values.iter().flatten().copied()));
    let (bar, gap, plot_height) = (28.0, 40.0, 270.0);
    let width = (60.0 + groups.len() as f64 * (series.len() as f64 * bar + gap)).max(640.0);
    let height = plot_height + 90.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">{title}</text>\n"
    );
    for (group_index, group) in groups.iter().enumerate() {
        let maximum =
            if scale_per_group { largest(&mut group.values.iter().flatten().copied()) } else { overall };
        let x0 = 60.0 + group_index as f64 * (series.len() as f64 * bar + gap);
        for (index, value) in group.values.iter().enumerate() {
            let Some(value) = value else { continue };
            let h = value / maximum * plot_height;
            let x = x0 + index as f64 * bar;
            let y = height - 40.0 - h;
            out += &format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>\n",
                bar - 2.0,
                COLORS[index % COLORS.len()],
                x + bar / 2.0,
                y - 3.0,
                value_text(*value)
            );
        }
        out += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            x0 + series.len() as f64 * bar / 2.0,
            height - 22.0,
            group.label
        );
    }
    for (index, label) in series.iter().enumerate() {
        let (x, y) = (width - 240.0, 40.0 + index as f64 * 16.0);
        out += &format!(
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{label}</text>\n",
            y - 9.0,
            COLORS[index % COLORS.len()],
            x + 14.0,
            y
        );
    }
    out += "</svg>\n";
    out
}
