//! Replication to a real S3-compatible server (moto on loopback) next to a directory replica: both
//! verify equal to the sources; the S3 server stopped (SIGSTOP) leaves the directory replica
//! current and the bucket's backlog drains once it is back, nothing skipped; an object damaged or
//! deleted in the bucket is named by verify and repaired; a lost watermark costs HEADs and one
//! listing, not copies;
//! create-only puts never replace an object.
//!
//! One test in this binary: it sets the AWS credential variables of the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use archive::ObjectsConfig;
use core_sink::replication::replica::{PutOutcome, Replica as _, S3Replica, WriteMode};
use core_sink::replication::{ReplicaConfig, ReplicaMetrics, ReplicationConfig, Replicator};
use object_store::ObjectStoreExt as _;

#[path = "support/moto.rs"]
mod moto;
#[path = "support/replication.rs"]
mod replication_support;
#[path = "support/archive.rs"]
mod support;
use moto::Moto;
use replication_support::Site;

const BUCKET: &str = "tributary-replica";
const PREFIX: &str = "site-c";

fn s3_config(moto: &Moto) -> ObjectsConfig {
    // Short bounds: a pass against the stopped server must fail in seconds.
    moto.s3_config(BUCKET, PREFIX, 2_000)
}

fn metrics(replicator: &Replicator, index: usize) -> Arc<ReplicaMetrics> {
    replicator.metrics.replicas[index].1.clone()
}

fn load(value: &std::sync::atomic::AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

fn signal(moto: &Moto, signal: libc::c_int) {
    // SAFETY: kill(2) of our own child process.
    assert_eq!(unsafe { libc::kill(moto.child.id() as libc::pid_t, signal) }, 0);
}

#[test]
fn s3_and_directory_replicas_verify_equal_through_an_outage_damage_and_a_lost_watermark() {
    let moto = Moto::start_with_bucket(BUCKET);
    let bucket = archive::s3_client(&s3_config(&moto)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let object = |key: &str| object_store::path::Path::from(format!("{PREFIX}/{key}"));

    let mut site = Site::new();
    site.publish_shards(3);
    site.archive_decisions(10);
    let mut replication = ReplicationConfig::directory("site-b", &site.base.join("replica"));
    replication.replicas.push(ReplicaConfig {
        name: "site-c".into(),
        directory: None,
        s3: Some(s3_config(&moto)),
    });
    let config = site.config(replication);
    let mut replicator = Replicator::open(&config, Arc::new(AtomicBool::new(false))).unwrap();
    let pass = |replicator: &mut Replicator| {
        replicator.pass(false).into_iter().map(|report| report.error).collect::<Vec<_>>()
    };

    assert_eq!(pass(&mut replicator), vec![None, None]);
    assert!(replicator.verify(0).unwrap().is_empty());
    assert!(replicator.verify(1).unwrap().is_empty());
    for (key, bytes) in site.expected_dataset_files() {
        let found =
            runtime.block_on(async { bucket.get(&object(&key)).await.unwrap().bytes().await.unwrap() });
        assert_eq!(found.as_ref(), bytes.as_slice(), "{key} in the bucket");
    }
    let copied = load(&metrics(&replicator, 1).objects_copied);
    assert_eq!(pass(&mut replicator), vec![None, None]);
    assert_eq!(load(&metrics(&replicator, 1).objects_copied), copied, "a second pass copies nothing");

    // The S3 server stops answering while the sources grow: the directory replica stays current,
    // the bucket's pass fails, is counted, and its lag is measured.
    signal(&moto, libc::SIGSTOP);
    site.publish_shards(2);
    site.archive_decisions(3);
    let errors = pass(&mut replicator);
    assert!(errors[0].is_none() && errors[1].is_some(), "{errors:?}");
    site.publish_shards(1);
    assert!(pass(&mut replicator)[1].is_some());
    let s3 = metrics(&replicator, 1);
    assert_eq!(load(&s3.errors), 2);
    assert!(load(&s3.lag_bytes) > 3 * site.shard_bytes as u64, "lag {}", load(&s3.lag_bytes));
    assert!(load(&s3.behind_since_unix_ms) > 0);
    assert_eq!(load(&metrics(&replicator, 0).lag_bytes), 0);
    assert!(replicator.verify(0).unwrap().is_empty());

    // Back: the backlog drains, nothing skipped.
    signal(&moto, libc::SIGCONT);
    assert_eq!(pass(&mut replicator), vec![None, None]);
    assert!(replicator.verify(1).unwrap().is_empty());
    assert_eq!((load(&s3.lag_bytes), load(&s3.behind_since_unix_ms)), (0, 0));

    // Damage in the bucket: other bytes of the same size under a shard, a deleted archive object.
    let shard = site.manifest("sensor").shards[2].clone();
    let shard_key = format!("datasets/sensor/{}", shard.name);
    let digest = support::evidence(7).original.sha256;
    let object_key = core_sink::replication::object_key(&digest);
    runtime.block_on(async {
        bucket.put(&object(&shard_key), vec![0u8; shard.bytes as usize].into()).await.unwrap();
        bucket.delete(&object(&object_key)).await.unwrap();
    });
    let differences: Vec<String> = replicator.verify(1).unwrap().iter().map(ToString::to_string).collect();
    assert_eq!(differences.len(), 2, "{differences:?}");
    assert!(differences[0].starts_with(&format!("{shard_key}: sha256 ")), "{differences:?}");
    assert_eq!(differences[1], format!("{object_key}: missing (original of entry cam-01/d-00007)"));
    let reports = replicator.pass(true);
    assert_eq!((reports[1].error.as_ref(), reports[1].repaired), (None, 2));
    assert!(replicator.verify(1).unwrap().is_empty());

    // A lost watermark (a crash before its first write): the next pass finds everything by HEAD
    // and copies nothing.
    drop(replicator);
    std::fs::remove_file(site.base.join("state/replication/site-c.json")).unwrap();
    let mut replicator = Replicator::open(&config, Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(pass(&mut replicator), vec![None, None]);
    assert_eq!(load(&metrics(&replicator, 1).objects_copied), 0);
    // Found by HEAD: 6 shards and the manifest per dataset, the verifier key and the feed's 2
    // review shards; the log segments are adopted from a listing (their objects were put before
    // them).
    assert_eq!(load(&metrics(&replicator, 1).objects_present), 2 * (6 + 1) + 1 + 2);
    assert!(replicator.verify(1).unwrap().is_empty());

    // Restore from the bucket: the archive verifies, the logs equal the source's.
    let config_file = site.config_file(&format!(
        "[[replication.replicas]]\nname = \"site-c\"\n[replication.replicas.s3]\nbucket = \"{BUCKET}\"\n\
         endpoint = \"{}\"\nallow_http = true\nprefix = \"{PREFIX}\"\n",
        moto.endpoint()
    ));
    let restored = site.base.join("restored");
    let (ok, stdout, stderr) = support::core_sink(&[
        "restore",
        "--config",
        config_file.to_str().unwrap(),
        "--replica",
        "site-c",
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    let report = archive::verify(&restored.join("archive")).unwrap();
    assert_eq!((report.entries, report.decisions), (14, 13));
    for file in ["entries", "index", "checkpoints"] {
        assert_eq!(
            std::fs::read(restored.join("archive/log").join(file)).unwrap(),
            std::fs::read(site.archive_root().join("log").join(file)).unwrap()
        );
    }

    // Create-only: an existing key is never replaced.
    let replica = S3Replica::connect(&s3_config(&moto)).unwrap();
    assert_eq!(replica.put(&shard_key, b"other bytes", WriteMode::Create).unwrap(), PutOutcome::AlreadyThere);
    assert_eq!(replica.head(&shard_key).unwrap(), Some(shard.bytes));
}
