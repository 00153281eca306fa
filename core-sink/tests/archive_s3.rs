//! The archive with its objects in a real S3-compatible server: Python `moto` in server mode on
//! loopback (`pip install 'moto[server]'`; CI installs it). The feed ingests decisions into the
//! bucket, `core-sink audit verify|show|export` find them through the archive's objects.toml,
//! and a corrupted or deleted object in the bucket fails verification naming its entry.
//!
//! One test in this binary: it sets the AWS credential variables of the process, which the
//! archive (in process) and the `core-sink` children read.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use archive::{ObjectsConfig, ObjectsKind, ObjectsRecord};
use core_sink::archive_feed::{ArchiveConfig, ArchiveFeed, ArchiveFeedMetrics};
use core_sink::dictionaries::DictionaryStore;
use core_sink::landing::{Committer as _, RawLanding};
use object_store::ObjectStoreExt as _;
use protocol::evidence::{sha256, sha256_hex};

#[path = "support/moto.rs"]
mod moto;
#[path = "support/archive.rs"]
mod support;
use moto::Moto;
use support::{MIB, core_sink, drain, evidence, land, model};

const BUCKET: &str = "tributary-test";
const PREFIX: &str = "core-archive";

/// The bucket, around the archive's code: signed requests through `object_store` (moto refuses
/// anonymous access to objects).
struct Bucket {
    store: object_store::aws::AmazonS3,
    runtime: tokio::runtime::Runtime,
}

impl Bucket {
    fn new(moto: &Moto) -> Bucket {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(moto.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("tributary-test-key")
            .with_secret_access_key("tributary-test-secret")
            .build()
            .unwrap();
        Bucket { store, runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap() }
    }

    fn key(digest: &protocol::evidence::Sha256Digest) -> object_store::path::Path {
        let hex = sha256_hex(digest);
        object_store::path::Path::from(format!("{PREFIX}/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4]))
    }

    fn get(&self, digest: &protocol::evidence::Sha256Digest) -> Option<Vec<u8>> {
        self.runtime.block_on(async {
            match self.store.get(&Bucket::key(digest)).await {
                Ok(result) => Some(result.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(error) => panic!("GET {}: {error}", Bucket::key(digest)),
            }
        })
    }

    /// Overwrites whatever is there (what the archive never does).
    fn put(&self, digest: &protocol::evidence::Sha256Digest, bytes: &[u8]) {
        let payload = object_store::PutPayload::from(bytes.to_vec());
        self.runtime.block_on(self.store.put(&Bucket::key(digest), payload)).unwrap();
    }

    fn delete(&self, digest: &protocol::evidence::Sha256Digest) {
        self.runtime.block_on(self.store.delete(&Bucket::key(digest))).unwrap();
    }
}

fn s3_config(moto: &Moto) -> ObjectsConfig {
    moto.objects_config(BUCKET, PREFIX, 5_000)
}

fn open_feed(base: &Path, objects: ObjectsConfig) -> anyhow::Result<ArchiveFeed> {
    let mut config = ArchiveConfig::new(base.join("archive"), base.join("review"));
    config.checkpoint_every_entries = 4;
    config.objects = objects;
    let dictionaries = Arc::new(DictionaryStore::open(&base.join("dictionaries")).unwrap());
    ArchiveFeed::open(config, &base.join("landing"), dictionaries, Arc::new(ArchiveFeedMetrics::default()))
}

fn entries_in_index(root: &Path) -> usize {
    archive::log::read_index(root).unwrap().0.len()
}

#[test]
fn archive_objects_in_an_s3_compatible_store_verify_and_damage_is_named() {
    let moto = Moto::start_with_bucket(BUCKET);

    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let root = base.join("archive");
    let root_text = root.to_str().unwrap();
    let mut landing = RawLanding::new(&base.join("landing"), 64 * MIB);
    landing.recover(None).unwrap();
    let mut seqs = BTreeMap::new();
    land(&mut landing, "cam-01", true, 0..10, &mut seqs);
    let checkpoint = land(&mut landing, "cam-02", true, 0..3, &mut seqs);

    // Ingest: every object in the bucket, nothing under the archive root but the log.
    let mut feed = open_feed(base, s3_config(&moto)).unwrap();
    drain(&mut feed, &checkpoint);
    feed.persist().unwrap();
    assert_eq!(feed.metrics.decisions_archived.load(Ordering::Relaxed), 13);
    drop(feed);
    assert!(!root.join("objects").exists(), "no local objects");
    let record = ObjectsRecord::read(&root).unwrap().expect("objects.toml written at creation");
    assert_eq!(
        (record.kind, record.bucket.as_deref(), record.prefix.as_str()),
        (ObjectsKind::S3, Some(BUCKET), PREFIX)
    );
    let text = std::fs::read_to_string(root.join("objects.toml")).unwrap();
    assert!(!text.contains("tributary-test-secret") && !text.contains("tributary-test-key"), "{text}");
    let original = evidence(4).original;
    let bucket = Bucket::new(&moto);
    assert_eq!(
        bucket.get(&original.sha256),
        Some(original.bytes.clone()),
        "the content-addressed key holds it"
    );

    // The audit commands find the objects through objects.toml.
    let report = archive::verify(&root).unwrap();
    // One model for both devices; cam-02's originals equal cam-01's of the same numbers.
    assert_eq!((report.entries, report.decisions, report.objects_checked), (15, 13, 11));
    let (ok, stdout, stderr) = core_sink(&["audit", "verify", "--archive", root_text]);
    assert!(ok && stdout.contains("15 entries (13 decisions, 2 models)"), "{stdout}{stderr}");
    let (ok, stdout, stderr) =
        core_sink(&["audit", "show", "d-00004", "--archive", root_text, "--device", "cam-01"]);
    assert!(ok, "{stderr}");
    let view: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let location = view["objects"][0]["location"].as_str().unwrap().to_string();
    assert_eq!(location, format!("s3://{BUCKET}/{}", Bucket::key(&original.sha256)));
    let bundle = base.join("bundle");
    let (ok, _, stderr) = core_sink(&[
        "audit",
        "export",
        "d-00004",
        "--archive",
        root_text,
        "--device",
        "cam-01",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read(bundle.join("objects").join(sha256_hex(&original.sha256))).unwrap(),
        original.bytes
    );
    let (ok, _, stderr) = core_sink(&["audit", "verify", "--archive", root_text]);
    assert!(ok, "{stderr}");
    // Credentials only ever come from the environment.
    let output = Command::new(env!("CARGO_BIN_EXE_core-sink"))
        .args(["audit", "verify", "--archive", root_text])
        .env_remove("AWS_ACCESS_KEY_ID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("AWS_ACCESS_KEY_ID is not set"), "{stderr}");

    // Idempotent: the same records again (positions forgotten) add no entry and no object.
    std::fs::remove_file(root.join("feed/positions.json")).unwrap();
    let mut feed = open_feed(base, s3_config(&moto)).unwrap();
    drain(&mut feed, &checkpoint);
    feed.persist().unwrap();
    assert_eq!(feed.metrics.duplicates.load(Ordering::Relaxed), 15);
    drop(feed);
    assert_eq!(entries_in_index(&root), 15);

    // Straight through the object API: an existing object is checked, not rewritten; other bytes
    // under an object's key are refused and left alone.
    let mut objects = archive::Objects::connect(&root, &s3_config(&moto)).unwrap();
    objects.put(&original.sha256, &original.bytes).unwrap();
    objects.sync().unwrap();
    let intended = b"an object someone else wrote first".to_vec();
    let intended_digest = sha256(&intended);
    bucket.put(&intended_digest, b"different bytes");
    objects.put(&intended_digest, &intended).unwrap();
    let error = objects.sync().unwrap_err().to_string();
    assert!(error.contains("immutable") && error.contains(&sha256_hex(&intended_digest)), "{error}");
    assert_eq!(bucket.get(&intended_digest).as_deref(), Some(&b"different bytes"[..]));
    drop(objects);

    // Another store in the config is refused before anything is written.
    let other_prefix = ObjectsConfig { prefix: "elsewhere".into(), ..s3_config(&moto) };
    let error = format!("{:#}", open_feed(base, other_prefix).err().expect("refused"));
    assert!(
        error.contains("keeps its objects in s3://tributary-test/core-archive")
            && error.contains("objects.toml"),
        "{error}"
    );
    let error = format!("{:#}", open_feed(base, ObjectsConfig::local()).err().expect("refused"));
    assert!(error.contains("but the config names local objects/"), "{error}");

    // A corrupted object in the bucket: verify fails naming the entry and the object.
    bucket.put(&original.sha256, b"edited");
    let (ok, _, stderr) = core_sink(&["audit", "verify", "--archive", root_text]);
    assert!(!ok, "verification fails");
    assert!(
        stderr.contains(&format!(
            "object {} (original of log entry 5, decision cam-01/d-00004)",
            sha256_hex(&original.sha256)
        )) && stderr.contains("does not match its address"),
        "{stderr}"
    );
    bucket.put(&original.sha256, &original.bytes);
    archive::verify(&root).unwrap();

    // A deleted object: named as missing, with its s3:// location.
    let model_digest = model().model.sha256;
    bucket.delete(&model_digest);
    let (ok, _, stderr) = core_sink(&["audit", "verify", "--archive", root_text]);
    assert!(
        !ok && stderr.contains("(model of log entry 0, model cam-01/")
            && stderr.contains(&format!("is missing (s3://{BUCKET}/{PREFIX}/sha256/")),
        "{stderr}"
    );
    let model_bytes = model().model.bytes;
    bucket.put(&model_digest, &model_bytes);
    archive::verify(&root).unwrap();

    // The store goes away: a flush fails and writes no entry naming objects it could not store.
    // Three entries: fewer than checkpoint_every_entries, so the flush is persist's.
    let checkpoint = land(&mut landing, "cam-01", false, 10..13, &mut seqs);
    let mut feed = open_feed(base, s3_config(&moto)).unwrap();
    drop(bucket);
    drop(moto);
    drain(&mut feed, &checkpoint);
    let error = format!("{:#}", feed.persist().unwrap_err());
    assert!(error.contains(&format!("s3://{BUCKET}/{PREFIX}/sha256/")), "{error}");
    drop(feed);
    assert_eq!(entries_in_index(&root), 15, "no entry without its objects");

    // The bundle exported earlier still verifies offline, with the store gone.
    let (ok, stdout, stderr) = core_sink(&["audit", "verify-bundle", bundle.to_str().unwrap()]);
    assert!(ok && stdout.contains("decision d-00004 of device cam-01"), "{stdout}{stderr}");
}
