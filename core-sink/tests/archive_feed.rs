//! The archive feed on its own (no network): committed audit-lane landing goes into the archive
//! and the review dataset exactly once, across restarts and a crash between persists.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use core_sink::archive_feed::{ArchiveConfig, ArchiveFeed, ArchiveFeedMetrics};
use core_sink::dictionaries::DictionaryStore;
use core_sink::landing::{Committer, RawLanding};
use protocol::evidence::{
    Blob, Decision, EVIDENCE_CONTENT_TYPE, Evidence, MODEL_CONTENT_TYPE, ModelRecord, RequestMeta,
    model_record_key,
};
use protocol::{ChunkBuilder, ChunkCompressor, Lane, RecordRef};

const MIB: u64 = 1024 * 1024;
const RECORDS_PER_CHUNK: usize = 4;

fn model() -> ModelRecord {
    ModelRecord::new("shapes", vec![42; 10_000])
}

fn evidence(number: u32) -> Evidence {
    let score = (number % 10) as f32 / 10.0;
    Evidence {
        decision: Decision {
            decision_id: format!("d-{number:05}"),
            decided_at_us: 1_700_000_000_000_000 + u64::from(number) * 1_000_000,
            model_name: "shapes".into(),
            model_sha256: model().model.sha256,
            label: "square".into(),
            label_index: 0,
            score,
            scores: vec![score, 1.0 - score],
            latency_us: 800,
            request: RequestMeta::default(),
        },
        original: Blob::new("image/png", format!("png {number}").into_bytes()),
        modified: None,
    }
}

/// Lands, as the lander does, the model record (when `with_model`) and decisions `numbers` of
/// `device` on the audit lane, `RECORDS_PER_CHUNK` records per compressed chunk; commits and
/// returns the landing checkpoint.
fn land(
    landing: &mut RawLanding,
    device: &str,
    with_model: bool,
    numbers: std::ops::Range<u32>,
    seqs: &mut BTreeMap<String, u64>,
) -> Vec<u8> {
    let mut records: Vec<(String, &str, Vec<u8>)> = Vec::new();
    if with_model {
        let model = model();
        records.push((model_record_key(&model.model.sha256), MODEL_CONTENT_TYPE, model.encode().unwrap()));
    }
    for number in numbers {
        let evidence = evidence(number);
        records.push((
            evidence.decision.decision_id.clone(),
            EVIDENCE_CONTENT_TYPE,
            evidence.encode().unwrap(),
        ));
    }
    let mut compressor = ChunkCompressor::new(1);
    for chunk in records.chunks(RECORDS_PER_CHUNK) {
        let mut builder = ChunkBuilder::new(Lane::Audit, 1024 * 1024);
        for (key, content_type, payload) in chunk {
            builder.push(RecordRef { key, timestamp_us: 1, content_type, payload }).unwrap();
        }
        let seq = seqs.entry(device.to_string()).or_insert(0);
        *seq += 1;
        let encoded = builder.seal(&mut compressor, 0).unwrap().encode(*seq);
        let (header, _) = protocol::decode_chunk(&encoded).unwrap();
        landing.land(device, &header, &encoded).unwrap();
    }
    landing.commit().unwrap();
    landing.checkpoint()
}

fn open_feed(base: &Path) -> ArchiveFeed {
    let mut config = ArchiveConfig::new(base.join("archive"), base.join("review"));
    // The archive flushes by itself every 4 entries, so a crash of the feed leaves some of the
    // records it consumed durable in the log and others not.
    config.checkpoint_every_entries = 4;
    let dictionaries = Arc::new(DictionaryStore::open(&base.join("dictionaries")).unwrap());
    ArchiveFeed::open(config, &base.join("landing"), dictionaries, Arc::new(ArchiveFeedMetrics::default()))
        .unwrap()
}

/// Every review sample key (member name without extension) in the published review shards, with
/// how often its original appears.
fn review_samples(base: &Path) -> BTreeMap<String, usize> {
    let mut samples = BTreeMap::new();
    for entry in std::fs::read_dir(base.join("review")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with("review-") && name.ends_with(".tar"),
            "only published shards remain: {name}"
        );
        let output = std::process::Command::new("tar").arg("-tf").arg(&path).output().unwrap();
        assert!(output.status.success(), "GNU tar reads {}", path.display());
        let members: Vec<String> =
            String::from_utf8(output.stdout).unwrap().lines().map(str::to_string).collect();
        for member in &members {
            if let Some(key) = member.strip_suffix(".png") {
                assert!(members.contains(&format!("{key}.json")), "{key} has its prediction");
                *samples.entry(key.to_string()).or_default() += 1;
            }
        }
    }
    samples
}

fn expected_review(devices: &[(&str, std::ops::Range<u32>)]) -> BTreeMap<String, usize> {
    let mut samples = BTreeMap::new();
    for (device, numbers) in devices {
        for number in numbers.clone().filter(|number| number % 10 < 5) {
            samples.insert(format!("{}_d-{number:05}", device.replace('.', "-")), 1);
        }
    }
    samples
}

fn drain(feed: &mut ArchiveFeed, checkpoint: &[u8]) {
    while feed.step(checkpoint).unwrap() {}
}

#[test]
fn feeds_every_decision_exactly_once_across_restarts_and_a_crash() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let mut landing = RawLanding::new(&base.join("landing"), 64 * MIB);
    landing.recover(None).unwrap();
    let mut seqs = BTreeMap::new();
    land(&mut landing, "cam-01", true, 0..20, &mut seqs);
    let checkpoint = land(&mut landing, "cam.02", true, 0..5, &mut seqs);

    let mut feed = open_feed(base);
    drain(&mut feed, &checkpoint);
    feed.persist().unwrap();
    assert_eq!(feed.metrics.decisions_archived.load(Ordering::Relaxed), 25);
    assert_eq!(feed.metrics.models_archived.load(Ordering::Relaxed), 2);
    drop(feed);
    let report = archive::verify(&base.join("archive")).unwrap();
    assert_eq!((report.entries, report.decisions, report.models), (27, 25, 2));
    assert_eq!(report.entries_after_latest_checkpoint, 0);
    assert_eq!(review_samples(base), expected_review(&[("cam-01", 0..20), ("cam.02", 0..5)]));

    // More decisions; the feed consumes them and dies before persisting its positions. Eight of
    // the ten entries are durable (two archive flushes of four), two are lost; the review shard
    // is not published.
    let checkpoint = land(&mut landing, "cam-01", false, 20..30, &mut seqs);
    let mut feed = open_feed(base);
    drain(&mut feed, &checkpoint);
    assert_eq!(feed.metrics.decisions_archived.load(Ordering::Relaxed), 10);
    assert_eq!(feed.archive().checkpoint_tree_size(), 27 + 8);
    drop(feed);
    // A shard published after the last positions write, as a crash between the two leaves it.
    std::fs::write(base.join("review/review-00000099.tar"), b"unlisted").unwrap();

    let mut feed = open_feed(base);
    assert!(!base.join("review/review-00000099.tar").exists(), "unlisted review shard removed");
    drain(&mut feed, &checkpoint);
    feed.persist().unwrap();
    // The archive's idempotence drops what was durable; the rest is appended now.
    assert_eq!(feed.metrics.duplicates.load(Ordering::Relaxed), 8);
    assert_eq!(feed.metrics.decisions_archived.load(Ordering::Relaxed), 2);
    drop(feed);
    let expected = expected_review(&[("cam-01", 0..30), ("cam.02", 0..5)]);
    assert_eq!(review_samples(base), expected);

    // A clean restart reads nothing again.
    let mut feed = open_feed(base);
    assert!(!feed.step(&checkpoint).unwrap(), "nothing new to consume");
    feed.persist().unwrap();
    assert_eq!(feed.metrics.duplicates.load(Ordering::Relaxed), 0);
    drop(feed);
    let report = archive::verify(&base.join("archive")).unwrap();
    assert_eq!((report.entries, report.decisions), (37, 35));
    assert_eq!(review_samples(base), expected);

    // Every decision can be shown with a proof, and its bundle verifies offline.
    let view = archive::show(&base.join("archive"), "d-00003", Some("cam.02")).unwrap();
    assert_eq!(view.device, "cam.02");
    assert!(view.inclusion_proof.is_some());
    archive::export(&base.join("archive"), "d-00025", None, &base.join("bundle")).unwrap();
    let bundle = archive::verify_bundle(&base.join("bundle")).unwrap();
    assert_eq!((bundle.device.as_str(), bundle.decision_id.as_str()), ("cam-01", "d-00025"));
}

#[test]
fn config_section_parses_resolves_and_validates() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let write = |archive_section: &str| {
        let text = format!(
            "listen = \"127.0.0.1:4433\"\nstate_dir = \"state\"\nlanding_dir = \"landing\"\nca_dir = \"ca\"\n\
             server_certificate_dir = \"server\"\n{archive_section}"
        );
        let path = base.join("sink.toml");
        std::fs::write(&path, text).unwrap();
        core_sink::SinkConfig::load(&path)
    };
    let config =
        write("[archive]\nroot = \"archive\"\nreview_dir = \"review\"\nreview_score_max = 0.3\n").unwrap();
    let archive = config.archive.unwrap();
    assert_eq!((archive.root, archive.review_dir), (base.join("archive"), base.join("review")));
    assert_eq!((archive.review_score_max, archive.checkpoint_every_entries), (0.3, 1000));
    for bad in [
        "[archive]\nroot = \"a\"\nreview_dir = \"r\"\nreview_score_max = 1.5\n",
        "[archive]\nroot = \"a\"\nreview_dir = \"r\"\ncheckpoint_every_entries = 0\n",
        "[archive]\nroot = \"a\"\nreview_dir = \"r\"\norigin = \"has space\"\n",
        "[archive]\nroot = \"a\"\nreview_dir = \"r\"\nunknown = 1\n",
    ] {
        assert!(write(bad).is_err(), "{bad}");
    }
}

fn core_sink(arguments: &[&str]) -> (bool, String, String) {
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_core-sink")).args(arguments).output().unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.success(), text(output.stdout), text(output.stderr))
}

#[test]
fn audit_commands_verify_show_export_and_name_the_first_bad_entry() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let mut landing = RawLanding::new(&base.join("landing"), 64 * MIB);
    landing.recover(None).unwrap();
    let checkpoint = land(&mut landing, "cam-01", true, 0..6, &mut BTreeMap::new());
    let mut feed = open_feed(base);
    drain(&mut feed, &checkpoint);
    feed.persist().unwrap();
    drop(feed);
    let root = base.join("archive");
    let root = root.to_str().unwrap();
    let bundle = base.join("bundle");
    let bundle = bundle.to_str().unwrap();

    let (ok, stdout, stderr) = core_sink(&["audit", "verify", "--archive", root]);
    assert!(ok && stdout.contains("7 entries (6 decisions, 1 models)"), "{stdout}{stderr}");
    let (ok, stdout, _) = core_sink(&["audit", "show", "d-00002", "--archive", root]);
    let view: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(ok && view["decision"]["decision_id"] == "d-00002" && view["inclusion_proof"].is_array());
    let (ok, _, stderr) = core_sink(&["audit", "export", "d-00002", "--archive", root, "--out", bundle]);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = core_sink(&["audit", "verify-bundle", bundle]);
    assert!(ok && stdout.contains("decision d-00002 of device cam-01"), "{stdout}");
    let (ok, stdout, _) = core_sink(&["audit", "review", "--archive", root, "--score-max", "0.25"]);
    assert!(ok && stdout.lines().count() == 3, "{stdout}");

    // The original of d-00004 (entry 5: the model is entry 0) changes on disk.
    let digest = evidence(4).original.sha256;
    std::fs::write(archive::objects::object_path(&base.join("archive"), &digest), b"edited").unwrap();
    let (ok, _, stderr) = core_sink(&["audit", "verify", "--archive", root]);
    assert!(!ok, "verification fails");
    assert!(stderr.contains("original of log entry 5, decision cam-01/d-00004"), "{stderr}");
    let (ok, _, stderr) = core_sink(&["audit", "show", "d-99999", "--archive", root]);
    assert!(!ok && stderr.contains("no decision \"d-99999\""), "{stderr}");
}

#[test]
fn the_feed_thread_consumes_what_is_committed_and_persists_when_stopped() {
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path();
    let mut landing = RawLanding::new(&base.join("landing"), 64 * MIB);
    landing.recover(None).unwrap();
    let checkpoint = land(&mut landing, "cam-01", true, 0..9, &mut BTreeMap::new());
    let config = ArchiveConfig::new(base.join("archive"), base.join("review"));
    let dictionaries = Arc::new(DictionaryStore::open(&base.join("dictionaries")).unwrap());
    let runner = core_sink::archive_feed::FeedRunner::start(
        config,
        &base.join("landing"),
        dictionaries,
        Arc::new(std::sync::Mutex::new(checkpoint)),
        std::time::Duration::from_millis(5),
    )
    .unwrap();
    let metrics = runner.metrics.clone();
    runner.stop_and_join();
    assert_eq!(metrics.decisions_archived.load(Ordering::Relaxed), 9);
    let report = archive::verify(&base.join("archive")).unwrap();
    assert_eq!((report.entries, report.entries_after_latest_checkpoint), (10, 0));
    assert_eq!(review_samples(base), expected_review(&[("cam-01", 0..9)]));
    assert!(base.join("archive/feed/positions.json").exists());
}
