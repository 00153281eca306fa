//! Dataset shards in an S3-compatible bucket (moto on loopback): shards, manifests and the wids
//! index land in the bucket with every record exactly once; the server stopped (SIGSTOP) mid-way
//! fails uploads without moving the manifest, and once it is back everything is published once;
//! leftovers of a crash (an unlisted shard key, a staging object) are removed on start; a key
//! holding other bytes fails the shard and is not published over; pyarrow and webdataset read
//! the datasets straight from the bucket.
//!
//! One test in this binary: it sets the AWS credential variables of the process.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use archive::ObjectsConfig;
use core_sink::datasets::manifest::Manifest;
use core_sink::datasets::pipeline::Pipeline;
use core_sink::datasets::{BucketTargetConfig, DatasetsConfig};
use core_sink::replication::replica::{Replica as _, S3Replica, WriteMode};

#[path = "support/datasets.rs"]
mod datasets_support;
#[path = "support/moto.rs"]
mod moto;
use datasets_support::{MIB, assert_exactly_once, dictionaries, expected_keys, land, new_landing};
use moto::Moto;

const BUCKET: &str = "tributary-datasets";
const PREFIX: &str = "site-a/datasets";
/// Records per `land` batch: 300 media records of 40 KB (12 MB: a media shard of three 5 MiB
/// parts) and 3 000 sensor records.
const BATCH_RECORDS: u64 = 3_000;
/// Bounds the loops that drive the pipeline (each step reads at most 16 MiB per lane).
const STEPS_MAX: usize = 200;

fn s3_config(moto: &Moto) -> ObjectsConfig {
    // Short bounds: an upload to the stopped server must fail in seconds.
    moto.s3_config(BUCKET, PREFIX, 2_000)
}

fn config(base: &Path, moto: &Moto) -> DatasetsConfig {
    let mut config = DatasetsConfig::with_targets(Vec::new(), base.join("manifests"));
    let mut bucket = BucketTargetConfig::new(s3_config(moto), base.join("staging"));
    bucket.part_bytes = 5 * MIB;
    config.buckets.push(bucket);
    config.shard_bytes_max = 16 * MIB;
    config.parquet_row_group_rows = 500;
    config.target_retry_after_ms = 10;
    config.validate().unwrap();
    config
}

/// Steps until the pipeline has consumed everything committed, then publishes the open shards.
fn drain(pipeline: &mut Pipeline, checkpoint: &[u8]) {
    for _ in 0..STEPS_MAX {
        if !pipeline.step(checkpoint).unwrap_or(false) {
            break;
        }
    }
    pipeline.publish_open_shards();
}

fn manifest(base: &Path, dataset: &str) -> Manifest {
    Manifest::read(&base.join(format!("manifests/{dataset}/manifest.json"))).unwrap().unwrap_or_default()
}

fn keys_below(bucket: &S3Replica, prefix: &str) -> Vec<String> {
    bucket.list(prefix).unwrap().into_iter().map(|(key, _)| key).collect()
}

/// Every record key in the shards the local manifests list, read from the bucket, after
/// checking that the bucket holds exactly the listed shards with the listed sha256.
fn published_keys(base: &Path, bucket: &S3Replica) -> BTreeMap<String, usize> {
    let mut keys = BTreeMap::new();
    let scratch = tempfile::tempdir().unwrap();
    for dataset in ["media", "sensor"] {
        let manifest = manifest(base, dataset);
        let listed: Vec<String> = manifest.shards.iter().map(|shard| shard.relative_path.clone()).collect();
        let mut stored = keys_below(bucket, &format!("{dataset}/"));
        stored.sort();
        let mut expected = listed.clone();
        expected.sort();
        assert_eq!(stored, expected, "{dataset}: the bucket holds exactly the shards the manifest lists");
        for shard in &manifest.shards {
            assert_eq!(
                shard.path.to_str().unwrap(),
                format!("s3://{BUCKET}/{PREFIX}/{}", shard.relative_path),
                "the manifest names the object"
            );
            let bytes =
                bucket.get(&shard.relative_path, 64 * MIB).unwrap().expect("listed shard in the bucket");
            assert_eq!(bytes.len() as u64, shard.bytes);
            assert_eq!(
                core_sink::datasets::targets::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
                shard.sha256
            );
            let file = scratch.path().join(&shard.name);
            std::fs::write(&file, &bytes).unwrap();
            if dataset == "sensor" {
                for row in core_sink::datasets::parquet::read_parquet_rows(&file).unwrap() {
                    *keys.entry(row.key).or_default() += 1;
                }
            } else {
                let output = std::process::Command::new("tar").arg("-tf").arg(&file).output().unwrap();
                assert!(output.status.success(), "GNU tar reads {}", shard.name);
                for name in String::from_utf8(output.stdout).unwrap().lines() {
                    if let Some(key) = name.strip_suffix(".jpg") {
                        *keys.entry(key.rsplit('/').next().unwrap().to_string()).or_default() += 1;
                    }
                }
            }
        }
        // The bucket's manifest is the local one; its wids index lists the bucket's shards.
        let in_bucket =
            bucket.get(&format!("manifests/{dataset}/manifest.json"), 64 * MIB).unwrap().expect("manifest");
        assert_eq!(serde_json::from_slice::<Manifest>(&in_bucket).unwrap(), manifest, "{dataset} manifest");
        if dataset == "media" {
            let index = bucket
                .get("manifests/media/wids-index.json", MIB)
                .unwrap()
                .expect("wids index in the bucket");
            let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
            let urls: Vec<&str> = index["shardlist"]
                .as_array()
                .unwrap()
                .iter()
                .map(|shard| shard["url"].as_str().unwrap())
                .collect();
            let paths: Vec<String> =
                manifest.shards.iter().map(|shard| format!("../../{}", shard.relative_path)).collect();
            assert_eq!(urls, paths, "index URLs relative to the index");
        }
    }
    assert_eq!(keys_below(bucket, "_staging/"), Vec::<String>::new(), "no staging object left");
    keys
}

fn signal(moto: &Moto, signal: libc::c_int) {
    // SAFETY: kill(2) of our own child process.
    assert_eq!(unsafe { libc::kill(moto.child.id() as libc::pid_t, signal) }, 0);
}

/// Runs `tests/read_datasets.py` with `arguments`; returns its JSON lines.
fn read_with_python(moto: &Moto, arguments: &[&str]) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/read_datasets.py");
    let output = std::process::Command::new("python3")
        .arg(&script)
        .args(arguments)
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run python3 tests/read_datasets.py");
    assert!(
        output.status.success(),
        "read_datasets.py {arguments:?} (endpoint {}): {}",
        moto.endpoint(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn shards_manifests_and_the_wids_index_land_in_the_bucket_once_through_an_outage_and_read_from_there() {
    let moto = Moto::start_with_bucket(BUCKET);
    let bucket = S3Replica::connect(&s3_config(&moto)).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let (landing_dir, mut landing) = new_landing(base);
    let mut seqs = BTreeMap::new();

    // Leftovers of a crash between an upload and its manifest: removed before any shard goes up.
    let orphan = "media/media-node0-t00-00000007.tar";
    bucket.put(orphan, b"an unlisted shard", WriteMode::Overwrite).unwrap();
    bucket.put("_staging/media/media-node0-t00-00000000.tar", b"half", WriteMode::Overwrite).unwrap();

    let mut pipeline = Pipeline::open(config(base, &moto), &landing_dir, dictionaries(base)).unwrap();
    let checkpoint = land(&mut landing, "cam-01", 0, BATCH_RECORDS, &mut seqs);
    drain(&mut pipeline, &checkpoint);
    assert_exactly_once(&published_keys(base, &bucket), &expected_keys(&[0], BATCH_RECORDS));
    let metrics = pipeline.metrics.clone();
    let shard_bytes: u64 = ["media", "sensor"]
        .iter()
        .flat_map(|name| manifest(base, name).shards)
        .map(|shard| shard.bytes)
        .sum();
    assert_eq!(metrics.upload_bytes.load(Ordering::Relaxed), shard_bytes, "every shard byte uploaded once");
    let media = manifest(base, "media");
    assert!(media.shards[0].bytes > 10 * MIB, "a media shard of {} bytes", media.shards[0].bytes);
    assert!(metrics.upload_parts.load(Ordering::Relaxed) >= 4, "the media shard went up in 5 MiB parts");
    assert_eq!(metrics.upload_failures.load(Ordering::Relaxed), 0);
    assert!(std::fs::read_dir(base.join("staging")).unwrap().next().is_none(), "staging files deleted");

    // The server stops answering: uploads fail and count, the manifests (the pipeline's
    // checkpoint) stay where they were; once it answers again everything goes up once.
    let consumed_before = (manifest(base, "media").consumed, manifest(base, "sensor").consumed);
    signal(&moto, libc::SIGSTOP);
    let checkpoint = land(&mut landing, "cam-02", BATCH_RECORDS, BATCH_RECORDS, &mut seqs);
    drain(&mut pipeline, &checkpoint);
    assert!(metrics.upload_failures.load(Ordering::Relaxed) >= 1, "failed uploads are counted");
    assert_eq!((manifest(base, "media").consumed, manifest(base, "sensor").consumed), consumed_before);
    signal(&moto, libc::SIGCONT);
    for _ in 0..STEPS_MAX {
        drain(&mut pipeline, &checkpoint);
        if manifest(base, "sensor").consumed.len() == 2 && manifest(base, "media").consumed.len() == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let both = expected_keys(&[0, BATCH_RECORDS], BATCH_RECORDS);
    assert_exactly_once(&published_keys(base, &bucket), &both);

    // Another object under the next shard's key: the shard fails (published objects are never
    // replaced), the key is cleared as unlisted, and the records go up in the next attempt.
    let next = manifest(base, "media").next_shard_seq;
    let taken = format!("media/media-node0-t00-{next:08}.tar");
    bucket.put(&taken, b"someone else's bytes", WriteMode::Overwrite).unwrap();
    let failures = metrics.upload_failures.load(Ordering::Relaxed);
    let checkpoint = land(&mut landing, "cam-03", 2 * BATCH_RECORDS, BATCH_RECORDS / 10, &mut seqs);
    drain(&mut pipeline, &checkpoint);
    assert_eq!(
        metrics.upload_failures.load(Ordering::Relaxed),
        failures + 1,
        "the conflict failed the shard"
    );
    for _ in 0..STEPS_MAX {
        drain(&mut pipeline, &checkpoint);
        if manifest(base, "media").consumed.len() == 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(pipeline);

    // A restart finds nothing to remove and publishes nothing again.
    let mut pipeline = Pipeline::open(config(base, &moto), &landing_dir, dictionaries(base)).unwrap();
    drain(&mut pipeline, &checkpoint);
    assert_eq!(pipeline.metrics.upload_bytes.load(Ordering::Relaxed), 0);
    let mut all = both.clone();
    all.extend(expected_keys(&[2 * BATCH_RECORDS], BATCH_RECORDS / 10));
    assert_exactly_once(&published_keys(base, &bucket), &all);
    assert!(!keys_below(&bucket, "media/").contains(&orphan.to_string()));

    // Readers straight from the bucket.
    let endpoint = moto.endpoint();
    let rows = read_with_python(&moto, &["s3-partitions", &endpoint, &format!("{BUCKET}/{PREFIX}/sensor")]);
    let mut sensor_keys = BTreeMap::new();
    for row in &rows {
        assert_eq!(row["date"], "1970-01-01");
        *sensor_keys.entry(row["key"].as_str().unwrap().to_string()).or_insert(0usize) += 1;
    }
    let samples = read_with_python(
        &moto,
        &["s3-webdataset", &endpoint, &format!("{BUCKET}/{PREFIX}/manifests/media/wids-index.json")],
    );
    let mut media_keys = BTreeMap::new();
    for sample in &samples {
        assert!(sample["files"]["jpg"].is_string() && sample["files"]["json"].is_string(), "{sample}");
        let key = sample["key"].as_str().unwrap().rsplit('/').next().unwrap().to_string();
        *media_keys.entry(key).or_insert(0usize) += 1;
    }
    let (expected_sensor, expected_media): (BTreeMap<String, usize>, BTreeMap<String, usize>) =
        all.into_iter().partition(|(key, _)| key.starts_with("sensor-"));
    assert_exactly_once(&sensor_keys, &expected_sensor);
    assert_exactly_once(&media_keys, &expected_media);
}
