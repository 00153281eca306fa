//! The archive feed on its own (no network): committed audit-lane landing goes into the archive
//! and the review dataset exactly once, across restarts and a crash between persists.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use core_sink::archive_feed::{ArchiveConfig, ArchiveFeed, ArchiveFeedMetrics};
use core_sink::dictionaries::DictionaryStore;
use core_sink::landing::{Committer as _, RawLanding};

#[path = "support/sink_config.rs"]
mod sink_config;
#[path = "support/archive.rs"]
mod support;
use sink_config::load_sink_config;
use support::{MIB, core_sink, drain, evidence, land};

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
    let write = |archive_section: &str| load_sink_config(base, archive_section);
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

    // [archive.objects]: local by default; s3 with its bucket; every error names the file and key.
    assert_eq!(archive.objects, archive::ObjectsConfig::local());
    let objects =
        |lines: &str| format!("[archive]\nroot = \"a\"\nreview_dir = \"r\"\n[archive.objects]\n{lines}");
    let config = write(&objects(
        "kind = \"s3\"\nbucket = \"tributary-archive\"\nendpoint = \"http://127.0.0.1:9000\"\n\
         allow_http = true\nprefix = \"core\"\nretries_max = 2\n",
    ))
    .unwrap();
    let parsed = config.archive.unwrap().objects;
    assert_eq!(
        (parsed.kind, parsed.bucket.as_deref(), parsed.retries_max),
        (archive::ObjectsKind::S3, Some("tributary-archive"), 2)
    );
    let s3 = archive::ObjectsConfig::s3("tributary-archive", Some("http://127.0.0.1:9000"), "core");
    assert_eq!(
        parsed,
        archive::ObjectsConfig { retries_max: 2, ..s3 },
        "the keys left out keep their defaults"
    );
    let path = base.join("sink.toml").display().to_string();
    let check = |lines: &str, expected: &[&str]| {
        let message = write(&objects(lines)).expect_err(lines).to_string();
        assert!(message.contains(&path), "names the file: {message}");
        for part in expected {
            assert!(message.contains(part), "{message:?} should contain {part:?}");
        }
    };
    check("kind = \"gcs\"\n", &["kind = \"gcs\"", "unknown variant `gcs`, expected `local` or `s3`"]);
    check("kind = \"s3\"\n", &["archive.objects.bucket: required when kind = \"s3\""]);
    check("kind = \"s3\"\nbucket = \"Not_A_Bucket\"\n", &["archive.objects.bucket = \"Not_A_Bucket\""]);
    check(
        "kind = \"s3\"\nbucket = \"b-1\"\nendpoint = \"http://127.0.0.1:9000\"\n",
        &["archive.objects.endpoint = \"http://127.0.0.1:9000\": plain http needs allow_http = true"],
    );
    check(
        "kind = \"s3\"\nbucket = \"b-1\"\nsecret_access_key = \"x\"\n",
        &["unknown field `secret_access_key`"],
    );
    check(
        "kind = \"s3\"\nbucket = \"b-1\"\nretry_timeout_ms = 900000\n",
        &["archive.objects.retry_timeout_ms = 900000"],
    );
    check("bucket = \"b-1\"\n", &["archive.objects.bucket: only for kind = \"s3\""]);
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
