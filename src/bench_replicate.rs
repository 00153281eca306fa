//! `tributary bench replicate`: the sink's durable landing (`RawLanding`: 200 KiB chunks, a commit
//! with fsync every 32) alone, then while a replicator copies published dataset shards to a
//! directory replica on the same disk within a fixed bandwidth budget, then in adaptive mode
//! (the budget between the floor and the same maximum, following the landing's commit latency as
//! `serve` follows the lander's ack latency), then with the budget lifted. The landing rate of
//! each case against the first is the ratio the 90 % target is about; the replication
//! rate and the bytes left to copy at the end of the case are the price (backing off trades lag
//! for ingest). All cases run in the same process run on the same disk.
//!
//! On a shared machine the landing rate alone drifts between cases, so each case with
//! replication is compared with the mean of the landing alone measured just before and just
//! after it (alone, fixed, alone, adaptive, alone, no budget, alone), and `--rounds` repeats the
//! sequence; the summary gives each case's range of ratios over the rounds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use core_sink::datasets::manifest::{Manifest, ShardEntry};
use core_sink::landing::{Committer, RawLanding};
use core_sink::replication::replica::DirectoryReplica;
use core_sink::replication::{ReplicationConfig, Replicator, Sources};
use protocol::evidence::{sha256, sha256_hex};
use telemetry::{LatencyHistogram, OldestPending};

/// The landing's commits as the adaptive budget sees them: their durations, and since when the
/// one in progress runs (a stuck commit counts before it ends).
#[derive(Default)]
struct Commits {
    times: LatencyHistogram,
    in_progress: OldestPending,
}

const MIB: u64 = 1024 * 1024;
const CHUNK_PAYLOAD_BYTES: usize = 200 * 1024;
const CHUNKS_PER_COMMIT: u64 = 32;
const SHARD_BYTES: u64 = 16 * MIB;

#[derive(Args)]
pub struct ReplicateArgs {
    /// Directory for the landing, the dataset and the replica (on the disk you want to measure).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Directory for the replica, e.g. on another device (a second disk, a tmpfs); absent: under
    /// `--dir`, on the landing's disk.
    #[arg(long)]
    replica_dir: Option<PathBuf>,
    /// Times the sequence of cases runs (each with its own bracketing measurements alone).
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// MiB landed per case.
    #[arg(long, default_value_t = 512)]
    mib_per_case: u64,
    /// MiB of published shards for the replicator (more than it copies during a case).
    #[arg(long, default_value_t = 1024)]
    dataset_mib: u64,
    /// The replicator's bandwidth budget in the fixed case, and the adaptive budget's maximum, MiB/s.
    #[arg(long, default_value_t = 64)]
    budget_mib_per_second: u64,
    /// The adaptive budget's floor, MiB/s (`bytes_per_second_min`).
    #[arg(long, default_value_t = 4)]
    floor_mib_per_second: u64,
    /// Time between two decisions of the adaptive budget, ms (`adaptive_interval_ms`).
    #[arg(long, default_value_t = 100)]
    adaptive_interval_ms: u64,
    /// The adaptive budget is cut while the mean commit latency exceeds the lowest seen × this
    /// (`ingest_latency_factor`).
    #[arg(long, default_value_t = 2.0)]
    latency_factor: f64,
}

/// How the replicator runs during a case.
#[derive(Clone, Copy)]
enum Mode {
    Alone,
    Fixed(u64),
    /// Between the floor and the maximum, bytes per second.
    Adaptive {
        floor: u64,
        max: u64,
        interval_ms: u64,
        factor: f64,
    },
    Unthrottled,
}

fn pseudo_random(state: &mut u64, bytes: &mut [u8]) {
    for byte in bytes.iter_mut() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *byte = *state as u8;
    }
}

/// Publishes `shards` shards of 16 MiB of dataset `media` as the pipeline does: file, then manifest.
fn publish_dataset(base: &Path, shards: u64) -> Result<()> {
    let mut manifest = Manifest::empty("media", "webdataset");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes = vec![0u8; SHARD_BYTES as usize];
    for shard_seq in 0..shards {
        pseudo_random(&mut state, &mut bytes);
        let name = format!("media-bench-t0-{shard_seq:08}.tar");
        let path = base.join("t0").join("media").join(&name);
        std::fs::create_dir_all(path.parent().expect("a directory"))?;
        std::fs::write(&path, &bytes)?;
        manifest.shards.push(ShardEntry {
            relative_path: format!("media/{name}"),
            columns: Vec::new(),
            name,
            path,
            target: 0,
            shard_seq,
            bytes: SHARD_BYTES,
            samples: 1,
            sha256: sha256_hex(&sha256(&bytes)),
            time_range_us: [0, 1],
            ranges: Vec::new(),
        });
        manifest.next_shard_seq = shard_seq + 1;
    }
    manifest.write(&base.join("manifests").join("media").join("manifest.json"))?;
    Ok(())
}

/// Lands `total` bytes of 200 KiB media chunks durably, timing each commit into `commits`;
/// returns bytes per second.
fn land(landing_dir: &Path, total: u64, commits: &Commits) -> Result<f64> {
    let mut landing = RawLanding::new(landing_dir, 256 * MIB);
    landing.recover(None)?;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut payload = vec![0u8; CHUNK_PAYLOAD_BYTES];
    let chunks = total / CHUNK_PAYLOAD_BYTES as u64;
    let started = Instant::now();
    for index in 0..chunks {
        pseudo_random(&mut state, &mut payload[..64]);
        crate::bench_sink::land_media_chunk(&mut landing, index, &payload)?;
        if (index + 1) % CHUNKS_PER_COMMIT == 0 {
            let commit_started = Instant::now();
            commits.in_progress.set(Some(commit_started));
            landing.commit()?;
            commits.in_progress.set(None);
            commits.times.observe(commit_started.elapsed());
        }
    }
    landing.commit()?;
    Ok((chunks * CHUNK_PAYLOAD_BYTES as u64) as f64 / started.elapsed().as_secs_f64())
}

/// What one case measured, bytes per second and bytes.
struct Measured {
    landing: f64,
    replication: f64,
    /// Bytes of the dataset not on the replica when the landing finished.
    lag: u64,
    /// The adaptive budget's cuts and its budget at the end.
    cuts: u64,
    budget_at_end: u64,
}

/// One case: landing while a replicator in `mode` copies the dataset.
fn case(
    base: &Path,
    replica_base: &Path,
    name: &str,
    total: u64,
    dataset_bytes: u64,
    mode: Mode,
) -> Result<Measured> {
    let commits = Arc::new(Commits::default());
    let landing_dir = base.join(format!("landing-{name}"));
    let replica = replica_base.join(format!("replica-{name}"));
    let mut config = ReplicationConfig::directory("bench", &replica);
    config.pass_interval_ms = 10;
    config.objects_per_second_max = 100_000;
    match mode {
        Mode::Alone => {
            let landing = land(&landing_dir, total, &commits)?;
            let _ = std::fs::remove_dir_all(&landing_dir);
            return Ok(Measured { landing, replication: 0.0, lag: 0, cuts: 0, budget_at_end: 0 });
        }
        Mode::Fixed(budget) => config.bytes_per_second_max = budget,
        Mode::Unthrottled => config.bytes_per_second_max = 64 * 1024 * MIB,
        Mode::Adaptive { floor, max, interval_ms, factor } => {
            config.ingest_latency_factor = factor;
            config.adaptive = true;
            config.bytes_per_second_max = max;
            config.bytes_per_second_min = Some(floor);
            config.adaptive_interval_ms = interval_ms;
        }
    }
    std::fs::create_dir_all(&replica)?;
    let stop = Arc::new(AtomicBool::new(false));
    let signal = commits.clone();
    let replicator = Replicator::with_backends(
        Sources { manifest_dir: Some(base.join("manifests")), ..Sources::default() },
        config,
        &base.join(format!("state-{name}")),
        vec![("bench".into(), Box::new(DirectoryReplica::new(&replica)))],
        stop.clone(),
    )?
    .with_latency_signal(Arc::new(move || {
        let snapshot = signal.times.snapshot();
        core_sink::replication::LatencyReading {
            sum_us: snapshot.sum_us,
            count: snapshot.count,
            pending_us: signal.in_progress.age(Instant::now()).as_micros() as u64,
        }
    }));
    let metrics = replicator.metrics.clone();
    let thread = std::thread::spawn(move || replicator.run());
    let started = Instant::now();
    let landing = land(&landing_dir, total, &commits)?;
    let copied = metrics.replicas[0].1.bytes_copied.load(Ordering::Relaxed);
    let replication = copied as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    thread.join().expect("replicator thread");
    // Each case's files go when it ends: the disk holds one case at a time.
    let _ = std::fs::remove_dir_all(&landing_dir);
    let _ = std::fs::remove_dir_all(&replica);
    Ok(Measured {
        landing,
        replication,
        lag: dataset_bytes.saturating_sub(copied),
        cuts: metrics.budget_cuts.load(Ordering::Relaxed),
        budget_at_end: metrics.budget_bytes_per_second.load(Ordering::Relaxed),
    })
}

pub fn run(args: ReplicateArgs) -> Result<()> {
    let base = args.dir.join("tributary-bench-replicate");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let replica_base = match &args.replica_dir {
        Some(directory) => directory.join("tributary-bench-replicate-replica"),
        None => base.clone(),
    };
    std::fs::create_dir_all(&replica_base)?;
    let shards = (args.dataset_mib * MIB).div_ceil(SHARD_BYTES).max(1);
    publish_dataset(&base, shards)?;
    let total = args.mib_per_case * MIB;
    println!(
        "tributary bench replicate: {} MiB landed per case (200 KiB chunks, fsync every {CHUNKS_PER_COMMIT}), \
         replicator copying {} MiB of 16 MiB shards to a directory replica, in {} (replica in {})",
        args.mib_per_case,
        shards * SHARD_BYTES / MIB,
        base.display(),
        replica_base.display()
    );
    let budget = args.budget_mib_per_second * MIB;
    let adaptive = Mode::Adaptive {
        floor: args.floor_mib_per_second * MIB,
        max: budget,
        interval_ms: args.adaptive_interval_ms,
        factor: args.latency_factor,
    };
    let cases: [(&str, Mode); 3] =
        [("fixed", Mode::Fixed(budget)), ("adaptive", adaptive), ("unthrottled", Mode::Unthrottled)];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    println!(
        "{:<44} {:>14} {:>8} {:>18} {:>12}",
        "case", "landing MiB/s", "ratio", "replication MiB/s", "lag MiB"
    );
    let dataset_bytes = shards * SHARD_BYTES;
    let alone = || -> Result<f64> {
        Ok(case(&base, &replica_base, "alone", total, dataset_bytes, Mode::Alone)?.landing)
    };
    let print_alone = |landing: f64| println!("{:<44} {:>14.0}", "landing alone", landing / MIB as f64);
    for round in 1..=args.rounds.max(1) {
        println!("round {round}");
        let mut before = alone()?;
        print_alone(before);
        for (index, (name, mode)) in cases.into_iter().enumerate() {
            let measured = case(&base, &replica_base, name, total, dataset_bytes, mode)?;
            let after = alone()?;
            let baseline = (before + after) / 2.0;
            before = after;
            ratios[index].push(measured.landing / baseline);
            let label = match mode {
                Mode::Alone => "landing alone".to_string(),
                Mode::Fixed(bytes) => format!("with replication, fixed {} MiB/s", bytes / MIB),
                Mode::Adaptive { floor, max, .. } => {
                    format!("with replication, adaptive {}..{} MiB/s", floor / MIB, max / MIB)
                }
                Mode::Unthrottled => "with replication, no budget".to_string(),
            };
            print!(
                "{label:<44} {:>14.0} {:>7.0}% {:>18.0} {:>12}",
                measured.landing / MIB as f64,
                100.0 * measured.landing / baseline,
                measured.replication / MIB as f64,
                if matches!(mode, Mode::Alone) { "-".to_string() } else { (measured.lag / MIB).to_string() }
            );
            if matches!(mode, Mode::Adaptive { .. }) {
                print!("  ({} cuts, {} MiB/s at the end)", measured.cuts, measured.budget_at_end / MIB);
            }
            println!("  (against the mean of the alone before and after)");
            print_alone(after);
        }
    }
    println!("ratio over {} rounds (min..max):", args.rounds.max(1));
    for ((name, _), ratios) in cases.iter().zip(&ratios) {
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        println!("  {name:<12} {:>4.0}%..{:>4.0}%", 100.0 * min, 100.0 * max);
    }
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(&replica_base);
    Ok(())
}
