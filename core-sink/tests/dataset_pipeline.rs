//! The dataset pipeline on its own (no network): recovery after a crash leaves every record in
//! exactly one published shard, and a failing target's records go to a healthy one.

use std::collections::BTreeMap;
use std::path::Path;

use core_sink::datasets::manifest::Manifest;
use core_sink::datasets::parquet::{OwnedSeriesRow, TypedCells, read_parquet_typed};
use core_sink::datasets::pipeline::Pipeline;
use core_sink::datasets::typed::{Cell, ColumnType, TypedColumn};
use core_sink::datasets::{DatasetsConfig, Placement};
use core_sink::landing::{Committer, RawLanding};
use protocol::{ChunkBuilder, Lane, RecordRef};

#[path = "support/datasets.rs"]
mod datasets_support;
use datasets_support::{MIB, assert_exactly_once, dictionaries, expected_keys, land, new_landing};
#[path = "support/sink_config.rs"]
mod sink_config;
use sink_config::load_sink_config;
#[path = "support/tmpfs.rs"]
mod tmpfs;
use tmpfs::Tmpfs;

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

/// Lands one sensor chunk of JSON records `(timestamp_us, payload)` for `device` at `seq`.
fn land_json(landing: &mut RawLanding, device: &str, seq: u64, records: &[(u64, &str)]) {
    let mut builder = ChunkBuilder::new(Lane::Sensor, 128 * 1024);
    for (index, (timestamp_us, payload)) in records.iter().enumerate() {
        let key = format!("env-{index}");
        let record = RecordRef {
            key: &key,
            timestamp_us: *timestamp_us,
            content_type: "application/json",
            payload: payload.as_bytes(),
        };
        builder.push(record).unwrap();
    }
    let encoded = builder.seal_raw().encode(seq);
    let (header, _) = protocol::decode_chunk(&encoded).unwrap();
    landing.land(device, &header, &encoded).unwrap();
}

type TypedShard = (String, Vec<TypedColumn>, Vec<(OwnedSeriesRow, TypedCells)>);

/// Every published sensor shard: its path below the target, its columns and its rows.
fn typed_shards(base: &Path) -> Vec<TypedShard> {
    let manifest = Manifest::read(&base.join("manifests/sensor/manifest.json")).unwrap().unwrap();
    manifest
        .shards
        .iter()
        .map(|shard| {
            assert!(shard.path.ends_with(&shard.relative_path), "{shard:?}");
            let (columns, rows) = read_parquet_typed(&shard.path).unwrap();
            assert_eq!(columns, shard.columns, "the manifest lists the shard's columns");
            (shard.relative_path.clone(), columns, rows)
        })
        .collect()
}

/// 2026-12-03 12:00 UTC.
const NOON_US: u64 = 1_796_299_200_000_000;
const DAY_US: u64 = 86_400_000_000;

#[test]
fn typed_columns_evolve_between_shards_keep_conflicts_and_rederive_the_same_after_a_crash() {
    let column = |name: &str, column_type| TypedColumn { name: name.to_string(), column_type };
    let derive = |base: &Path, landing_dir: &Path, checkpoints: &[Vec<u8>], crash: bool| {
        let mut config = config(base);
        config.sensor.schema.insert("humidity_pct".to_string(), ColumnType::Double);
        // The first row group (two rows) fixes a shard's columns.
        config.parquet_row_group_rows = 2;
        let mut pipeline = Pipeline::open(config.clone(), landing_dir, dictionaries(base)).unwrap();
        while pipeline.step(&checkpoints[0]).unwrap() {}
        pipeline.publish_open_shards();
        while pipeline.step(&checkpoints[1]).unwrap() {}
        let mut conflicts = 0;
        if crash {
            conflicts = pipeline.metrics.type_conflicts.load(std::sync::atomic::Ordering::Relaxed);
            // Dies with a shard open; the next start derives it again from the raw landing.
            drop(pipeline);
            pipeline = Pipeline::open(config, landing_dir, dictionaries(base)).unwrap();
            while pipeline.step(&checkpoints[1]).unwrap() {}
        }
        pipeline.publish_open_shards();
        conflicts += pipeline.metrics.type_conflicts.load(std::sync::atomic::Ordering::Relaxed);
        (typed_shards(base), conflicts)
    };

    let directory = tempfile::tempdir().unwrap();
    let (landing_dir, mut landing) = new_landing(directory.path());
    land_json(
        &mut landing,
        "dev-a",
        1,
        &[
            (
                NOON_US,
                r#"{"temperature_c": 21.5, "x_mg": 3, "ok": true, "state": "idle", "nested": {"a": 1}}"#,
            ),
            (NOON_US + 1, r#"{"temperature_c": 22, "x_mg": -4, "ok": false, "state": "run"}"#),
            // After the first row group: `fan_rpm` is late, text in a double column a conflict.
            (NOON_US + 2, r#"{"temperature_c": "hot", "x_mg": 5, "fan_rpm": 1200}"#),
        ],
    );
    landing.commit().unwrap();
    let first = landing.checkpoint();
    // The next day's chunk opens a shard of its own date.
    land_json(&mut landing, "dev-a", 2, &[(NOON_US + DAY_US, r#"{"temperature_c": 19.0}"#)]);
    land_json(
        &mut landing,
        "dev-b",
        1,
        &[(NOON_US + 3, r#"{"temperature_c": 20.25, "fan_rpm": 1300, "x_mg": 1.5}"#)],
    );
    landing.commit().unwrap();
    let checkpoints = [first, landing.checkpoint()];

    let clean = tempfile::tempdir().unwrap();
    let (shards, conflicts) = derive(clean.path(), &landing_dir, &checkpoints, false);
    assert_eq!(conflicts, 2, "both conflicts counted");
    let first_columns = vec![
        column("humidity_pct", ColumnType::Double),
        column("ok", ColumnType::Bool),
        column("state", ColumnType::String),
        column("temperature_c", ColumnType::Double),
        column("x_mg", ColumnType::Int64),
    ];
    let mut later_columns = first_columns.clone();
    later_columns.push(column("fan_rpm", ColumnType::Int64));
    assert_eq!(shards.len(), 3, "{shards:#?}");
    assert_eq!(
        shards[0].1, first_columns,
        "declared, then inferred in name order; `nested` stays in payload"
    );
    assert!(shards[0].0.starts_with("sensor/date=2026-12-03/sensor-node0-t"), "{}", shards[0].0);
    for shard in &shards[1..] {
        assert_eq!(shard.1, later_columns, "the late field is a column from the next shard on");
    }
    let dates: Vec<&str> = shards.iter().map(|shard| &shard.0[..23]).collect();
    assert!(dates.contains(&"sensor/date=2026-12-04/"), "{dates:?}");

    let cells: BTreeMap<(String, u64, u32), (TypedCells, Vec<u8>)> = shards
        .iter()
        .flat_map(|shard| shard.2.iter())
        .map(|(row, cells)| ((row.device.clone(), row.seq, row.index), (cells.clone(), row.payload.clone())))
        .collect();
    let cell = |device: &str, seq, index| &cells[&(device.to_string(), seq, index)].0;
    assert_eq!(
        cell("dev-a", 1, 0),
        &TypedCells::from([
            ("ok".to_string(), Cell::Bool(true)),
            ("state".to_string(), Cell::Text("idle".to_string())),
            ("temperature_c".to_string(), Cell::Double(21.5)),
            ("x_mg".to_string(), Cell::Int64(3)),
        ])
    );
    assert_eq!(
        cell("dev-a", 1, 1)["temperature_c"],
        Cell::Double(22.0),
        "an exact integer in a double column"
    );
    // The conflict: the typed cell is null, the raw JSON stays.
    assert_eq!(cell("dev-a", 1, 2), &TypedCells::from([("x_mg".to_string(), Cell::Int64(5))]));
    assert!(
        String::from_utf8_lossy(&cells[&("dev-a".to_string(), 1, 2)].1).contains(r#""temperature_c": "hot""#)
    );
    assert_eq!(
        cell("dev-b", 1, 0),
        &TypedCells::from([
            ("fan_rpm".to_string(), Cell::Int64(1300)),
            ("temperature_c".to_string(), Cell::Double(20.25)),
        ]),
        "a fraction in an int64 column is a conflict, not truncated"
    );

    let manifest = Manifest::read(&clean.path().join("manifests/sensor/manifest.json")).unwrap().unwrap();
    assert_eq!(manifest.columns, later_columns);
    assert_eq!(manifest.type_conflicts_total, 2);
    let listed: Vec<(&str, u64, u32, &str, ColumnType, &str)> = manifest
        .type_conflicts
        .iter()
        .map(|c| (c.device.as_str(), c.seq, c.index, c.column.as_str(), c.expected, c.found.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("dev-a", 1, 2, "temperature_c", ColumnType::Double, "string"),
            ("dev-b", 1, 0, "x_mg", ColumnType::Int64, "double"),
        ]
    );

    // Re-derived after a crash with a shard open: the same shards, columns and rows.
    let crashed = tempfile::tempdir().unwrap();
    let (again, _) = derive(crashed.path(), &landing_dir, &checkpoints, true);
    assert_eq!(again, shards);
}

/// What a training reader checks on one pass over the published datasets, as it would read them:
/// media through the wids index, sensor through the manifest. Returns (media shards, sensor
/// shards) read; panics on a shard that is partial, missing, or named by the index but not by
/// the manifest.
fn read_published_once(base: &Path) -> (usize, usize) {
    use sha2::Digest as _;
    let index_path = base.join("manifests/media").join(core_sink::datasets::pipeline::SHARD_INDEX_FILE);
    let Ok(index) = std::fs::read(&index_path) else { return (0, 0) };
    let index: serde_json::Value = serde_json::from_slice(&index).expect("the index is whole JSON");
    // Read after the index: the manifest is replaced before the index, so it lists at least as much.
    let media = Manifest::read(&base.join("manifests/media/manifest.json")).unwrap().unwrap_or_default();
    let shardlist = index["shardlist"].as_array().unwrap();
    for entry in shardlist {
        let path = index_path.parent().unwrap().join(entry["url"].as_str().unwrap());
        let bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let listed = media
            .shards
            .iter()
            .find(|shard| shard.path == path.canonicalize().unwrap() || shard.path == path)
            .unwrap_or_else(|| panic!("{} is in the index, not in the manifest", path.display()));
        assert_eq!(entry["nsamples"].as_u64(), Some(listed.samples));
        assert_eq!(bytes.len() as u64, listed.bytes, "{} is whole", path.display());
        let digest: String = sha2::Sha256::digest(&bytes).iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(digest, listed.sha256, "{} is the published shard", path.display());
    }
    let sensor = Manifest::read(&base.join("manifests/sensor/manifest.json")).unwrap().unwrap_or_default();
    for shard in &sensor.shards {
        let rows = core_sink::datasets::parquet::read_parquet_rows(&shard.path).unwrap();
        assert_eq!(rows.len() as u64, shard.samples, "{}", shard.path.display());
    }
    (shardlist.len(), sensor.shards.len())
}

#[test]
fn a_reader_looping_over_published_shards_while_ingest_runs_never_sees_a_partial_or_unlisted_one() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path().canonicalize().unwrap();
    let (landing_dir, mut landing) = new_landing(&base);
    let mut pipeline = Pipeline::open(config(&base), &landing_dir, dictionaries(&base)).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (base, done) = (base.clone(), done.clone());
        std::thread::spawn(move || {
            let mut passes = 0u64;
            let mut most = (0, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let seen = read_published_once(&base);
                most = (most.0.max(seen.0), most.1.max(seen.1));
                passes += 1;
            }
            (passes, most)
        })
    };
    let mut seqs = BTreeMap::new();
    let batches = 30;
    for batch in 0..batches {
        let checkpoint = land(&mut landing, "dev-live", batch * 1_000, 1_000, &mut seqs);
        while pipeline.step(&checkpoint).unwrap() {}
    }
    pipeline.publish_open_shards();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (passes, most) = reader.join().expect("the reader saw only whole, listed shards");
    assert!(passes >= 1 && most.0 >= 1, "the reader read while ingest ran: {passes} passes, {most:?} shards");
    // And after ingest: everything once.
    let firsts: Vec<u64> = (0..batches).map(|batch| batch * 1_000).collect();
    assert_exactly_once(&published_keys(&base), &expected_keys(&firsts, 1_000));
    let (media_shards, _) = read_published_once(&base);
    let manifest = Manifest::read(&base.join("manifests/media/manifest.json")).unwrap().unwrap();
    assert_eq!(media_shards, manifest.shards.len(), "the index lists every published media shard");
}

#[test]
fn bucket_targets_parse_resolve_and_validate_naming_the_key() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let load = |datasets: &str| {
        load_sink_config(base, &format!("[datasets]\nmanifest_dir = \"manifests\"\n{datasets}"))
    };
    let bucket = |extra: &str| {
        format!(
            "[[datasets.buckets]]\nstaging_dir = \"staging\"\n{extra}[datasets.buckets.s3]\nbucket = \"training\"\n\
             endpoint = \"http://127.0.0.1:9000\"\nallow_http = true\nprefix = \"site-a/datasets\"\n"
        )
    };
    // A bucket alone is a valid set of targets; staging_dir resolves against the config file.
    let config = load(&bucket("")).unwrap().datasets.unwrap();
    assert!(config.targets.is_empty());
    assert_eq!(config.buckets[0].staging_dir, base.join("staging"));
    assert_eq!(config.buckets[0].part_bytes, 8 * MIB);
    assert_eq!(config.buckets[0].base_url(), "s3://training/site-a/datasets");

    let check = |datasets: &str, expected: &str| {
        let error = load(datasets).expect_err(datasets).to_string();
        assert!(error.contains("sink.toml") && error.contains(expected), "{datasets}: {error}");
    };
    check("", "datasets.targets and datasets.buckets: 0 targets");
    check(&bucket("part_bytes = 1048576\n"), "datasets.buckets[0].part_bytes = 1048576");
    check(&format!("shard_bytes_max = 8589934592\n{}", bucket("")), "datasets.shard_bytes_max = 8589934592");
    check(&bucket("").replace("endpoint = \"http", "endpoint = \"ftp"), "datasets.buckets[0].s3");
    check(&bucket("colour = 1\n"), "colour");
}
