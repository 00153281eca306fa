//! The dataset pipeline on its own (no network): recovery after a crash leaves every record in
//! exactly one published shard, and a failing target's records go to a healthy one.

use std::collections::BTreeMap;
use std::path::Path;

use core_sink::datasets::manifest::Manifest;
use core_sink::datasets::pipeline::Pipeline;
use core_sink::datasets::{DatasetsConfig, Placement};
use core_sink::dictionaries::DictionaryStore;
use core_sink::landing::{Committer, RawLanding};
use protocol::{ChunkBuilder, ChunkCompressor, Lane, RecordRef};

#[path = "support/tmpfs.rs"]
mod tmpfs;
use tmpfs::Tmpfs;

const MIB: u64 = 1024 * 1024;

/// Lands `count` sensor records and `count / 10` media records for `device`, starting at `first`,
/// commits, and returns the checkpoint.
fn land(
    landing: &mut RawLanding,
    device: &str,
    first: u64,
    count: u64,
    seqs: &mut BTreeMap<Lane, u64>,
) -> Vec<u8> {
    let mut compressor = ChunkCompressor::new(1);
    for (lane, records, payload_bytes) in
        [(Lane::Sensor, count, 300usize), (Lane::Media, count / 10, 40_000usize)]
    {
        let mut builder = ChunkBuilder::new(lane, 128 * 1024);
        let mut seal = |builder: &mut ChunkBuilder, landing: &mut RawLanding| {
            let seq = seqs.entry(lane).or_insert(0);
            *seq += 1;
            let chunk = if lane == Lane::Media {
                builder.seal_raw()
            } else {
                builder.seal(&mut compressor, 0).unwrap()
            };
            let encoded = chunk.encode(*seq);
            let (header, _) = protocol::decode_chunk(&encoded).unwrap();
            landing.land(device, &header, &encoded).unwrap();
        };
        for index in first..first + records {
            let key = format!("{}-{index:08}", lane.name());
            let payload: Vec<u8> = (0..payload_bytes).map(|i| (i as u64 * 31 + index) as u8).collect();
            let content_type = if lane == Lane::Media { "image/jpeg" } else { "application/json" };
            builder
                .push(RecordRef { key: &key, timestamp_us: index, content_type, payload: &payload })
                .unwrap();
            if builder.is_full() {
                seal(&mut builder, landing);
            }
        }
        if !builder.is_empty() {
            seal(&mut builder, landing);
        }
    }
    landing.commit().unwrap();
    landing.checkpoint()
}

/// Compares key counts and reports only what differs, so a failure stays readable.
fn assert_exactly_once(actual: &BTreeMap<String, usize>, expected: &BTreeMap<String, usize>) {
    let missing: Vec<&String> = expected.keys().filter(|key| !actual.contains_key(*key)).collect();
    let twice: Vec<(&String, &usize)> = actual.iter().filter(|(_, count)| **count > 1).collect();
    let extra: Vec<&String> = actual.keys().filter(|key| !expected.contains_key(*key)).collect();
    assert!(
        missing.is_empty() && twice.is_empty() && extra.is_empty(),
        "{} missing (first {:?}), {} more than once (first {:?}), {} unexpected (first {:?})",
        missing.len(),
        missing.first(),
        twice.len(),
        twice.first(),
        extra.len(),
        extra.first()
    );
}

/// An empty raw landing under `base`.
fn new_landing(base: &Path) -> (std::path::PathBuf, RawLanding) {
    let landing_dir = base.join("landing");
    let mut landing = RawLanding::new(&landing_dir, 64 * MIB);
    landing.recover(None).unwrap();
    (landing_dir, landing)
}

fn dictionaries(base: &Path) -> std::sync::Arc<DictionaryStore> {
    std::sync::Arc::new(DictionaryStore::open(&base.join("dictionaries")).unwrap())
}

fn config(base: &Path) -> DatasetsConfig {
    let mut config =
        DatasetsConfig::with_targets(vec![base.join("t0"), base.join("t1")], base.join("manifests"));
    config.placement = Placement::RoundRobin;
    config.shard_bytes_max = MIB;
    config.parquet_row_group_rows = 500;
    config
}

/// Every key in the published shards of both datasets, with how often it appears.
fn published_keys(base: &Path) -> BTreeMap<String, usize> {
    let mut keys = BTreeMap::new();
    let sensor = Manifest::read(&base.join("manifests/sensor/manifest.json")).unwrap().unwrap_or_default();
    for shard in &sensor.shards {
        for row in core_sink::datasets::parquet::read_parquet_rows(&shard.path).unwrap() {
            *keys.entry(row.key).or_default() += 1;
        }
    }
    let media = Manifest::read(&base.join("manifests/media/manifest.json")).unwrap().unwrap_or_default();
    for shard in &media.shards {
        let output = std::process::Command::new("tar").arg("-tf").arg(&shard.path).output().unwrap();
        assert!(output.status.success(), "GNU tar reads {}", shard.path.display());
        for name in String::from_utf8(output.stdout).unwrap().lines() {
            if let Some(key) = name.strip_suffix(".jpg") {
                *keys.entry(key.rsplit('/').next().unwrap().to_string()).or_default() += 1;
            }
        }
    }
    keys
}

/// The keys `land` writes for batches starting at each of `firsts`, `count` records each.
fn expected_keys(firsts: &[u64], count: u64) -> BTreeMap<String, usize> {
    let mut keys = BTreeMap::new();
    for first in firsts {
        for index in *first..first + count {
            keys.insert(format!("sensor-{index:08}"), 1);
        }
        for index in *first..first + count / 10 {
            keys.insert(format!("media-{index:08}"), 1);
        }
    }
    keys
}

#[test]
fn recovery_after_a_crash_keeps_every_record_in_exactly_one_shard() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let (landing_dir, mut landing) = new_landing(base);
    let mut seqs = BTreeMap::new();
    let checkpoint = land(&mut landing, "dev-1", 0, 10_000, &mut seqs);
    {
        let mut pipeline = Pipeline::open(config(base), &landing_dir, dictionaries(base)).unwrap();
        while pipeline.step(&checkpoint).unwrap() {}
        // The process dies here: the open shard is never published.
    }
    let published_before =
        Manifest::read(&base.join("manifests/sensor/manifest.json")).unwrap().unwrap().shards.len();
    assert!(published_before >= 1, "some shards were published before the crash");
    // What a crash can leave: an in-progress file, and a published file the manifest never listed.
    std::fs::write(base.join("t0/sensor/.sensor-node0-t00-00000099.parquet.partial"), b"half").unwrap();
    std::fs::write(base.join("t1/media/media-node0-t01-00000099.tar"), b"orphan").unwrap();

    let checkpoint = land(&mut landing, "dev-1", 10_000, 10_000, &mut seqs);
    let mut pipeline = Pipeline::open(config(base), &landing_dir, dictionaries(base)).unwrap();
    assert!(
        !base.join("t0/sensor/.sensor-node0-t00-00000099.parquet.partial").exists(),
        "in-progress file removed"
    );
    assert!(!base.join("t1/media/media-node0-t01-00000099.tar").exists(), "orphan removed");
    while pipeline.step(&checkpoint).unwrap() {}
    pipeline.publish_open_shards();
    assert_exactly_once(&published_keys(base), &expected_keys(&[0, 10_000], 10_000));
    // A second pass over the same checkpoint adds nothing.
    assert!(!pipeline.step(&checkpoint).unwrap(), "nothing new to consume");
    pipeline.publish_open_shards();
    assert_exactly_once(&published_keys(base), &expected_keys(&[0, 10_000], 10_000));
}

#[test]
fn a_failing_target_sends_its_records_to_a_healthy_one() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let (landing_dir, mut landing) = new_landing(base);
    let mut seqs = BTreeMap::new();
    let checkpoint = land(&mut landing, "dev-2", 0, 6_000, &mut seqs);
    let mut pipeline = Pipeline::open(config(base), &landing_dir, dictionaries(base)).unwrap();
    // Target 0 breaks after start: its dataset directories become files, so no shard can be created there.
    for dataset in ["media", "sensor"] {
        let path = base.join("t0").join(dataset);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::write(&path, b"not a directory").unwrap();
    }
    // Failed shards roll back; later passes regenerate their records on target 1.
    for _ in 0..8 {
        while pipeline.step(&checkpoint).unwrap() {}
        pipeline.publish_open_shards();
    }
    assert!(pipeline.metrics.shard_failures.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_exactly_once(&published_keys(base), &expected_keys(&[0], 6_000));
    for dataset in ["media", "sensor"] {
        let manifest =
            Manifest::read(&base.join(format!("manifests/{dataset}/manifest.json"))).unwrap().unwrap();
        assert!(manifest.shards.iter().all(|shard| shard.target == 1), "{dataset}: only the healthy target");
    }
}

/// A record block written by hand, bypassing `ChunkBuilder`'s checks, as a hostile appliance could.
fn hand_made_block(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut block = Vec::new();
    block.extend_from_slice(&(key.len() as u16).to_le_bytes());
    block.extend_from_slice(key.as_bytes());
    block.extend_from_slice(&7u64.to_le_bytes());
    block.push(10);
    block.extend_from_slice(b"image/jpeg");
    block.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    block.extend_from_slice(payload);
    block
}

#[test]
fn records_that_would_break_a_dataset_are_rejected_and_counted_never_written() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let (landing_dir, mut landing) = new_landing(base);
    let check = |key: &str| {
        assert!(protocol::validate_key(key).is_err(), "{key:?} is refused at the edge too");
    };
    // The last three passed the old rule (UTF-8 up to 128 bytes) and wedged every dataset: a tar
    // member name is ASCII and its name field 100 bytes.
    let too_long = "k".repeat(protocol::RECORD_KEY_BYTES_MAX + 1);
    let bad_keys = ["frame.0001", "cam/0001", "..", "a\u{7}b", "kamera-\u{fc}", "room 12", &too_long];
    for (index, key) in bad_keys.iter().enumerate() {
        check(key);
        let body = hand_made_block(key, &[index as u8; 100]);
        let chunk =
            protocol::SealedChunk::new(Lane::Media, protocol::Codec::Raw, 0, 1, body.len() as u32, body)
                .unwrap();
        let encoded = chunk.encode(index as u64 + 1);
        let (header, _) = protocol::decode_chunk(&encoded).unwrap();
        landing.land("dev-bad", &header, &encoded).unwrap();
    }
    // A good chunk after the bad ones still lands in the dataset.
    let mut seqs = BTreeMap::from([(Lane::Media, bad_keys.len() as u64), (Lane::Sensor, 0)]);
    let checkpoint = land(&mut landing, "dev-bad", 0, 100, &mut seqs);
    let mut pipeline = Pipeline::open(config(base), &landing_dir, dictionaries(base)).unwrap();
    while pipeline.step(&checkpoint).unwrap() {}
    pipeline.publish_open_shards();
    assert_eq!(
        pipeline.metrics.rejected_chunks.load(std::sync::atomic::Ordering::Relaxed),
        bad_keys.len() as u64
    );
    assert_exactly_once(&published_keys(base), &expected_keys(&[0], 100));
    let manifest = Manifest::read(&base.join("manifests/media/manifest.json")).unwrap().unwrap();
    assert_eq!(manifest.quarantined_total, bad_keys.len() as u64);
    let listed: Vec<u64> = manifest.quarantined.iter().map(|chunk| chunk.seq).collect();
    assert_eq!(listed, (1..=bad_keys.len() as u64).collect::<Vec<u64>>());
}

#[test]
fn a_full_target_hands_over_to_the_others_and_resumes_when_space_returns() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let Some(_tmpfs) = Tmpfs::mount(&base.join("t0"), "3m") else { return };
    // Leave about 400 KiB free on target 0: its first shard cannot complete.
    let filler = base.join("t0").join("filler");
    std::fs::write(&filler, vec![0u8; 2_700 * 1024]).unwrap();
    let (landing_dir, mut landing) = new_landing(base);
    let mut seqs = BTreeMap::new();
    let mut config = config(base);
    config.target_retry_after_ms = 50;
    let mut pipeline = Pipeline::open(config, &landing_dir, dictionaries(base)).unwrap();
    let checkpoint = land(&mut landing, "dev-full", 0, 6_000, &mut seqs);
    for _ in 0..8 {
        while pipeline.step(&checkpoint).unwrap() {}
        pipeline.publish_open_shards();
    }
    let failures = pipeline.metrics.shard_failures.load(std::sync::atomic::Ordering::Relaxed);
    assert!(failures >= 1, "target 0 filled up");
    assert_exactly_once(&published_keys(base), &expected_keys(&[0], 6_000));
    let leftovers: Vec<_> = std::fs::read_dir(base.join("t0").join("media"))
        .into_iter()
        .flatten()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no in-progress file left on the full target: {leftovers:?}");

    // Space returns: target 0 takes shards again after its retry delay.
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let checkpoint = land(&mut landing, "dev-full", 6_000, 6_000, &mut seqs);
    for _ in 0..4 {
        while pipeline.step(&checkpoint).unwrap() {}
        pipeline.publish_open_shards();
    }
    assert_exactly_once(&published_keys(base), &expected_keys(&[0, 6_000], 6_000));
    let media = Manifest::read(&base.join("manifests/media/manifest.json")).unwrap().unwrap();
    assert!(media.shards.iter().any(|shard| shard.target == 0), "target 0 is used again once it has space");
    drop(pipeline);
}
