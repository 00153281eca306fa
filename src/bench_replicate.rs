//! `tributary bench replicate`: the sink's durable landing (`RawLanding`: 200 KiB chunks, a commit
//! with fsync every 32) alone, then while a replicator copies published dataset shards to a
//! directory replica on the same disk within its bandwidth budget, then with the budget lifted.
//! The landing rate of each case against the first is the ratio the 90 % target is about;
//! all cases run in the same process run on the same disk.

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

const MIB: u64 = 1024 * 1024;
const CHUNK_PAYLOAD_BYTES: usize = 200 * 1024;
const CHUNKS_PER_COMMIT: u64 = 32;
const SHARD_BYTES: u64 = 16 * MIB;

#[derive(Args)]
pub struct ReplicateArgs {
    /// Directory for the landing, the dataset and the replica (on the disk you want to measure).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// MiB landed per case.
    #[arg(long, default_value_t = 512)]
    mib_per_case: u64,
    /// MiB of published shards for the replicator (more than it copies during a case).
    #[arg(long, default_value_t = 1024)]
    dataset_mib: u64,
    /// The replicator's bandwidth budget in the throttled case, MiB/s.
    #[arg(long, default_value_t = 64)]
    budget_mib_per_second: u64,
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

/// Lands `total` bytes of 200 KiB media chunks durably; returns bytes per second.
fn land(landing_dir: &Path, total: u64) -> Result<f64> {
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
            landing.commit()?;
        }
    }
    landing.commit()?;
    Ok((chunks * CHUNK_PAYLOAD_BYTES as u64) as f64 / started.elapsed().as_secs_f64())
}

/// One case: landing while a replicator with `budget` bytes/s (none: no replicator) copies the
/// dataset; returns the landing rate and the replication rate, bytes per second.
fn case(base: &Path, name: &str, total: u64, budget: Option<u64>) -> Result<(f64, f64)> {
    let Some(bytes_per_second_max) = budget else {
        return Ok((land(&base.join(format!("landing-{name}")), total)?, 0.0));
    };
    let replica = base.join(format!("replica-{name}"));
    std::fs::create_dir_all(&replica)?;
    let mut config = ReplicationConfig::directory("bench", &replica);
    config.pass_interval_ms = 10;
    config.bytes_per_second_max = bytes_per_second_max;
    config.objects_per_second_max = 100_000;
    let stop = Arc::new(AtomicBool::new(false));
    let replicator = Replicator::with_backends(
        Sources { manifest_dir: Some(base.join("manifests")), archive_root: None },
        config,
        &base.join(format!("state-{name}")),
        vec![("bench".into(), Box::new(DirectoryReplica::new(&replica)))],
        stop.clone(),
    )?;
    let metrics = replicator.metrics.replicas[0].1.clone();
    let thread = std::thread::spawn(move || replicator.run());
    let started = Instant::now();
    let landing_rate = land(&base.join(format!("landing-{name}")), total)?;
    let copied = metrics.bytes_copied.load(Ordering::Relaxed);
    let replication_rate = copied as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    thread.join().expect("replicator thread");
    Ok((landing_rate, replication_rate))
}

pub fn run(args: ReplicateArgs) -> Result<()> {
    let base = args.dir.join("tributary-bench-replicate");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let shards = (args.dataset_mib * MIB).div_ceil(SHARD_BYTES).max(1);
    publish_dataset(&base, shards)?;
    let total = args.mib_per_case * MIB;
    println!(
        "tributary bench replicate: {} MiB landed per case (200 KiB chunks, fsync every {CHUNKS_PER_COMMIT}), \
         replicator copying {} MiB of 16 MiB shards to a directory replica, in {}",
        args.mib_per_case,
        shards * SHARD_BYTES / MIB,
        base.display()
    );
    let budget = args.budget_mib_per_second * MIB;
    let cases: [(&str, Option<u64>); 3] =
        [("alone", None), ("replicating", Some(budget)), ("unthrottled", Some(64 * 1024 * MIB))];
    let mut baseline = None;
    println!("{:<34} {:>14} {:>8} {:>18}", "case", "landing MiB/s", "ratio", "replication MiB/s");
    for (name, case_budget) in cases {
        let (landing, replication) = case(&base, name, total, case_budget)?;
        let baseline = *baseline.get_or_insert(landing);
        let label = match case_budget {
            None => "landing alone".to_string(),
            Some(bytes) if bytes >= 64 * 1024 * MIB => "with replication, no budget".to_string(),
            Some(bytes) => format!("with replication, {} MiB/s budget", bytes / MIB),
        };
        println!(
            "{label:<34} {:>14.0} {:>7.0}% {:>18.0}",
            landing / MIB as f64,
            100.0 * landing / baseline,
            replication / MIB as f64
        );
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
