//! Replication to a directory replica: `core-sink replicate` copies every published shard,
//! manifest, archive object, log segment and checkpoint; a rerun copies nothing; a crash at any
//! put resumes without copying anything twice; a SIGKILLed replicator leaves no partial object;
//! verify names corrupted and deleted objects and `--repair` restores them; `core-sink restore`
//! rebuilds an archive `audit verify` accepts and datasets equal to the sources.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use core_sink::replication::replica::{DirectoryReplica, PutOutcome, Replica, ReplicaError, WriteMode};
use core_sink::replication::{ReplicationConfig, Replicator, Sources};

#[path = "support/replication.rs"]
mod replication_support;
#[path = "support/archive.rs"]
mod support;
#[path = "support/tmpfs.rs"]
mod tmpfs;
use replication_support::{Site, files_under};
use support::core_sink;

/// Four 200 kB shards and `decisions` archived decisions: a copy long enough to be caught in the
/// middle (by a kill, or by a full file system).
fn site_with_large_shards(decisions: u32) -> Site {
    let mut site = Site::new();
    site.shard_bytes = 200_000;
    site.publish_shards(4);
    site.archive_decisions(decisions);
    site
}

fn site_with_sources() -> Site {
    let mut site = Site::new();
    site.publish_shards(3);
    site.archive_decisions(10);
    site
}

fn replicator(site: &Site, replica: &Path) -> Replicator {
    Replicator::open(
        &site.config(ReplicationConfig::directory("site-b", replica)),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap()
}

fn counter(replicator: &Replicator, pick: fn(&core_sink::replication::ReplicaMetrics) -> &AtomicU64) -> u64 {
    pick(&replicator.metrics.replicas[0].1).load(Ordering::Relaxed)
}

fn pass_ok(replicator: &mut Replicator) {
    for report in replicator.pass(false) {
        assert_eq!(report.error, None, "replica {}", report.replica);
    }
}

/// Every replica file that is not a log segment or an archive object equals the sources.
fn assert_datasets_replicated(site: &Site, replica: &Path) {
    let found = files_under(replica);
    for (key, bytes) in site.expected_dataset_files() {
        assert!(found.get(&key) == Some(&bytes), "{key} on the replica equals the source");
    }
    assert!(
        !found.keys().any(|key| key.rsplit('/').next().unwrap().starts_with('.')),
        "no temporary file left"
    );
}

#[test]
fn a_directory_replica_equals_the_sources_and_a_rerun_copies_nothing() {
    let mut site = site_with_sources();
    let replica = site.base.join("replica");
    let config = site.config_file(
        "pass_interval_ms = 50\n[[replication.replicas]]\nname = \"site-b\"\ndirectory = \"replica\"\n",
    );
    let config_text = config.to_str().unwrap();

    let (ok, stdout, stderr) = core_sink(&["replicate", "--once", "--config", config_text]);
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) = core_sink(&["replicate", "verify", "--config", config_text]);
    assert!(ok && stdout.contains("site-b: equal to the sources"), "{stdout}{stderr}");
    assert_datasets_replicated(&site, &replica);
    let watermark = site.base.join("state/replication/site-b.json");
    assert!(watermark.is_file(), "the watermark is under <state_dir>/replication");

    // A rerun copies nothing.
    let mut replicator = replicator(&site, &replica);
    pass_ok(&mut replicator);
    assert_eq!(counter(&replicator, |m| &m.objects_copied), 0);
    assert_eq!(counter(&replicator, |m| &m.lag_bytes), 0);

    // New shards and decisions: only they are copied. Per dataset 2 shards and the manifest; the
    // archive: 3 new originals and one segment of each log file; the feed's new review shard.
    site.publish_shards(2);
    site.archive_decisions(3);
    pass_ok(&mut replicator);
    assert_eq!(counter(&replicator, |m| &m.objects_copied), 2 * 3 + 3 + 3 + 1);
    assert!(replicator.verify(0).unwrap().is_empty());
    assert_datasets_replicated(&site, &replica);
}

/// A replica that "crashes" at its `crash_at`-th put, before or after the write lands.
struct CrashingReplica {
    inner: DirectoryReplica,
    puts: Arc<AtomicU64>,
    landed: Arc<AtomicU64>,
    /// The keys written, in order.
    written: Arc<std::sync::Mutex<Vec<String>>>,
    /// Crash at this put, or at the first put of a key starting with `crash_key_prefix`.
    crash_at: u64,
    crash_key_prefix: Option<&'static str>,
    after_landing: bool,
    /// After the crash every put fails (the process is gone).
    crashed: AtomicBool,
}

impl Replica for CrashingReplica {
    fn describe(&self) -> &str {
        self.inner.describe()
    }
    fn head(&self, key: &str) -> Result<Option<u64>, ReplicaError> {
        self.inner.head(key)
    }
    fn get(&self, key: &str, bytes_max: u64) -> Result<Option<Vec<u8>>, ReplicaError> {
        self.inner.get(key, bytes_max)
    }
    fn put(&self, key: &str, bytes: &[u8], mode: WriteMode) -> Result<PutOutcome, ReplicaError> {
        let number = self.puts.fetch_add(1, Ordering::Relaxed) + 1;
        let crash = || ReplicaError {
            replica: "crashing".into(),
            operation: "PUT",
            key: key.into(),
            reason: "simulated crash".into(),
        };
        if self.crashed.load(Ordering::Relaxed) {
            return Err(crash());
        }
        let due =
            number == self.crash_at || self.crash_key_prefix.is_some_and(|prefix| key.starts_with(prefix));
        if due && !self.after_landing {
            self.crashed.store(true, Ordering::Relaxed);
            return Err(crash());
        }
        let outcome = self.inner.put(key, bytes, mode)?;
        if outcome == PutOutcome::Written {
            self.landed.fetch_add(1, Ordering::Relaxed);
            self.written.lock().unwrap().push(key.to_string());
        }
        if due {
            self.crashed.store(true, Ordering::Relaxed);
            return Err(crash());
        }
        Ok(outcome)
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ReplicaError> {
        self.inner.list(prefix)
    }
}

#[test]
fn a_crash_at_any_put_resumes_without_copying_anything_twice() {
    let mut site = site_with_sources();
    let sources = Sources::of(&site.config(ReplicationConfig::directory("x", &site.base)));
    // How many puts a whole pass makes.
    let reference = site.base.join("reference");
    std::fs::create_dir_all(&reference).unwrap();
    let mut replicator = replicator(&site, &reference);
    pass_ok(&mut replicator);
    let puts_total = counter(&replicator, |m| &m.objects_copied);
    assert!(puts_total > 20, "{puts_total} puts");
    let expected = files_under(&reference);

    // Every put as the crash point while the sources stand still; while they grow between the
    // crash and the resume (the cut moves, so a resumed pass would cut other segment boundaries),
    // the first put of each kind of object, so the growth does not shift the crash points.
    let mut cases: Vec<(bool, bool, u64, Option<&'static str>)> = Vec::new();
    for after_landing in [false, true] {
        cases.extend((1..=puts_total).map(|crash_at| (false, after_landing, crash_at, None)));
    }
    for after_landing in [false, true] {
        for prefix in [
            "datasets/media/media-",
            "datasets/sensor/manifest.json",
            "archive/keys/",
            "archive/objects/",
            "archive/log/entries/",
            "archive/log/index/",
            "archive/log/checkpoints/",
        ] {
            cases.push((true, after_landing, u64::MAX, Some(prefix)));
        }
    }
    for (number, (grow, after_landing, crash_at, crash_key_prefix)) in cases.into_iter().enumerate() {
        {
            {
                let case = format!(
                    "crash at put {crash_at} or key {crash_key_prefix:?}, after landing: {after_landing}, sources grow: {grow}"
                );
                let replica = site.base.join(format!("replica-{number}"));
                std::fs::create_dir_all(&replica).unwrap();
                let state = site.base.join(format!("state-{number}"));
                let config = ReplicationConfig::directory("site-b", &replica);
                let crashing = |crash_at: u64, crash_key_prefix: Option<&'static str>| CrashingReplica {
                    inner: DirectoryReplica::new(&replica),
                    puts: Arc::new(AtomicU64::new(0)),
                    landed: Arc::new(AtomicU64::new(0)),
                    written: Arc::default(),
                    crash_at,
                    crash_key_prefix,
                    after_landing,
                    crashed: AtomicBool::new(false),
                };
                let first_replica = crashing(crash_at, crash_key_prefix);
                let (first_landed, first_written) =
                    (first_replica.landed.clone(), first_replica.written.clone());
                let mut first = Replicator::with_backends(
                    sources.clone(),
                    config.clone(),
                    &state,
                    vec![("site-b".into(), Box::new(first_replica))],
                    Arc::new(AtomicBool::new(false)),
                )
                .unwrap();
                let report = first.pass(false);
                assert!(
                    report[0].error.as_deref().unwrap_or_default().contains("simulated crash"),
                    "{case}: {report:?}"
                );
                drop(first);
                if grow {
                    // The sources move on while the replicator is down: the cut moves too.
                    site.publish_shards(1);
                    site.archive_decisions(1);
                }

                let second_replica = crashing(u64::MAX, None);
                let second_written = second_replica.written.clone();
                let mut second = Replicator::with_backends(
                    sources.clone(),
                    config,
                    &state,
                    vec![("site-b".into(), Box::new(second_replica))],
                    Arc::new(AtomicBool::new(false)),
                )
                .unwrap();
                pass_ok(&mut second);
                assert!(second.verify(0).unwrap().is_empty(), "{case}");
                let first_written = first_written.lock().unwrap().clone();
                let second_written = second_written.lock().unwrap().clone();
                assert_eq!(first_landed.load(Ordering::Relaxed), first_written.len() as u64);
                // No immutable object is written twice (a manifest is rewritten when it changed).
                for key in &second_written {
                    assert!(
                        key.ends_with("manifest.json") || !first_written.contains(key),
                        "{case}: {key} written twice"
                    );
                }
                // No log byte is written twice, under whatever segment boundaries.
                for file in ["entries", "index", "checkpoints"] {
                    let written: u64 = first_written
                        .iter()
                        .chain(&second_written)
                        .filter_map(|key| key.strip_prefix(&format!("archive/log/{file}/")))
                        .map(|range| {
                            let (start, end) = range.split_once('-').unwrap();
                            end.parse::<u64>().unwrap() - start.parse::<u64>().unwrap()
                        })
                        .sum();
                    let source = std::fs::metadata(site.archive_root().join("log").join(file)).unwrap().len();
                    assert_eq!(written, source, "{case}: log/{file} bytes written once");
                }
                if !grow {
                    assert_eq!(
                        first_written.len() + second_written.len(),
                        puts_total as usize,
                        "{case}: every object written exactly once"
                    );
                    assert_eq!(files_under(&replica), expected, "{case}: the replica equals a clean run's");
                }
            }
        }
    }
}

#[test]
fn a_sigkilled_replicator_leaves_no_partial_object_and_the_next_run_completes() {
    let site = site_with_large_shards(6);
    let replica = site.base.join("replica");
    // 256 KiB/s: the run takes seconds, so the kill lands while it copies.
    let config = site.config_file(
        "bytes_per_second_max = 262144\n[[replication.replicas]]\nname = \"site-b\"\ndirectory = \"replica\"\n",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_core-sink"))
        .args(["replicate", "--config", config.to_str().unwrap()])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    child.wait().unwrap();

    // Whatever is visible under a key is whole: every shard there equals its source.
    let expected = site.expected_dataset_files();
    for (key, bytes) in files_under(&replica) {
        if key.rsplit('/').next().unwrap().starts_with('.') {
            continue; // a temporary file of the killed run, never a key
        }
        if let Some(source) = expected.get(&key).filter(|_| !key.ends_with("manifest.json")) {
            assert!(&bytes == source, "{key} is whole");
        }
    }
    let (ok, stdout, stderr) = core_sink(&["replicate", "--once", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) = core_sink(&["replicate", "verify", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
}

#[test]
fn verify_names_damaged_and_deleted_objects_and_repair_restores_them() {
    let site = site_with_sources();
    let replica = site.base.join("replica");
    let config = site.config_file("[[replication.replicas]]\nname = \"site-b\"\ndirectory = \"replica\"\n");
    let config_text = config.to_str().unwrap();
    let (ok, _, stderr) = core_sink(&["replicate", "--once", "--config", config_text]);
    assert!(ok, "{stderr}");

    // A flipped byte in a shard, a deleted archive object, a deleted log segment.
    let shard = site.manifest("media").shards[1].clone();
    let shard_key = format!("datasets/media/{}", shard.name);
    let mut bytes = std::fs::read(replica.join(&shard_key)).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(replica.join(&shard_key), &bytes).unwrap();
    let original = support::evidence(3).original;
    let object_key = core_sink::replication::object_key(&original.sha256);
    std::fs::remove_file(replica.join(&object_key)).unwrap();
    let index_segment = files_under(&replica.join("archive/log/index")).into_keys().next().unwrap();
    std::fs::remove_file(replica.join("archive/log/index").join(&index_segment)).unwrap();

    let (ok, stdout, _) = core_sink(&["replicate", "verify", "--config", config_text]);
    assert!(!ok, "verify fails");
    assert!(
        stdout.contains(&format!("site-b: {shard_key}: sha256 ")) && stdout.contains(&shard.sha256),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("site-b: {object_key}: missing (original of entry cam-01/d-00003)")),
        "{stdout}"
    );
    assert!(stdout.contains("missing: the replica's index stop at byte 0"), "{stdout}");
    assert_eq!(stdout.lines().count(), 3, "exactly the three differences: {stdout}");

    // A normal pass trusts its watermark; --repair re-copies what verify names.
    let (ok, stdout, stderr) = core_sink(&["replicate", "--repair", "--config", config_text]);
    assert!(ok && stdout.contains("site-b: up to date (repaired 3)"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = core_sink(&["replicate", "verify", "--config", config_text]);
    assert!(ok, "{stdout}{stderr}");
    assert_datasets_replicated(&site, &replica);
}

#[test]
fn restore_rebuilds_an_archive_that_verifies_and_datasets_equal_to_the_sources() {
    let site = site_with_sources();
    let replica = site.base.join("replica");
    let mut replicator = replicator(&site, &replica);
    pass_ok(&mut replicator);

    let restored = site.base.join("restored");
    let (ok, stdout, stderr) =
        core_sink(&["restore", "--from", replica.to_str().unwrap(), "--to", restored.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) =
        core_sink(&["audit", "verify", "--archive", restored.join("archive").to_str().unwrap()]);
    assert!(ok && stdout.contains("11 entries (10 decisions, 1 models)"), "{stdout}{stderr}");
    for file in ["entries", "index", "checkpoints"] {
        assert_eq!(
            std::fs::read(restored.join("archive/log").join(file)).unwrap(),
            std::fs::read(site.archive_root().join("log").join(file)).unwrap(),
            "log/{file} equals the source's"
        );
    }
    for (dataset, _, _) in replication_support::DATASETS {
        let manifest = core_sink::datasets::manifest::Manifest::read(
            &restored.join("datasets/manifests").join(dataset).join("manifest.json"),
        )
        .unwrap()
        .unwrap();
        let source = site.manifest(dataset);
        assert_eq!(manifest.shards.len(), source.shards.len());
        for (restored_shard, source_shard) in manifest.shards.iter().zip(&source.shards) {
            assert!(
                restored_shard.path.starts_with(&restored),
                "{:?} points into the restore",
                restored_shard.path
            );
            assert_eq!(
                std::fs::read(&restored_shard.path).unwrap(),
                std::fs::read(&source_shard.path).unwrap()
            );
        }
    }
    // Restore writes only into a new directory.
    let (ok, _, stderr) =
        core_sink(&["restore", "--from", replica.to_str().unwrap(), "--to", restored.to_str().unwrap()]);
    assert!(!ok && stderr.contains("not empty"), "{stderr}");
}

#[test]
fn config_errors_name_the_file_and_key() {
    let site = Site::new();
    let config =
        site.config_file("[[replication.replicas]]\nname = \"site-b\"\ndirectory = \"missing-dir\"\n");
    let (ok, _, stderr) = core_sink(&["replicate", "--once", "--config", config.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("replication.replicas[0].directory") && stderr.contains("not a directory"),
        "{stderr}"
    );
    let config = site.config_file(
        "bytes_per_second_max = 10\n[[replication.replicas]]\nname = \"b\"\ndirectory = \"replica\"\n",
    );
    let (ok, _, stderr) = core_sink(&["replicate", "--once", "--config", config.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("sink.toml")
            && stderr.contains("replication.bytes_per_second_max = 10: expected at least 1024"),
        "{stderr}"
    );
}

/// `GET /metrics` from `address`, or `None` while nothing listens.
fn scrape(address: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: sink\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.take(1 << 20).read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn serve_runs_the_replicator_and_exports_its_metrics() {
    let site = site_with_sources();
    let (ok, _, stderr) =
        core_sink(&["init", "--dir", site.base.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(ok, "{stderr}");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = site.config_file(
        "pass_interval_ms = 50\n[[replication.replicas]]\nname = \"site-b\"\ndirectory = \"replica\"\n",
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n{text}")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_core-sink"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .spawn()
        .unwrap();
    let address: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let caught_up = "tributary_replication_lag_bytes{replica=\"site-b\"} 0";
    let mut last = String::new();
    // A bound for a failing run only; the assertions are about what the endpoint says.
    for _ in 0..600 {
        if let Some(response) = scrape(address) {
            last = response;
            let copied = last
                .lines()
                .find_map(|line| {
                    line.strip_prefix("tributary_replication_objects_copied_total{replica=\"site-b\"} ")
                })
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or(0);
            if copied > 0 && last.lines().any(|line| line == caught_up) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(last.lines().any(|line| line == caught_up), "{last}");
    assert!(last.contains("tributary_replication_lag_seconds{replica=\"site-b\"} 0"), "{last}");
    assert!(last.contains("tributary_replication_errors_total{replica=\"site-b\"} 0"), "{last}");
    assert!(status.success(), "serve exits cleanly on SIGTERM: {status}");
    let (ok, stdout, stderr) = core_sink(&["replicate", "verify", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
}

#[test]
fn a_full_replica_fails_its_passes_without_partial_objects_and_drains_when_space_returns() {
    let site = site_with_large_shards(4);
    let replica = site.base.join("replica-full");
    // 1.6 MB of shards on a 1 MiB file system.
    let Some(tmpfs) = tmpfs::Tmpfs::mount(&replica, "1m") else { return };
    let mut replicator = replicator(&site, &replica);
    for _ in 0..2 {
        let reports = replicator.pass(false);
        let error = reports[0].error.clone().unwrap_or_default();
        assert!(error.contains("No space left on device") && error.contains("datasets/"), "{reports:?}");
    }
    assert_eq!(counter(&replicator, |m| &m.errors), 2);
    assert!(counter(&replicator, |m| &m.lag_bytes) > 0);
    let expected = site.expected_dataset_files();
    for (key, bytes) in files_under(&replica) {
        assert!(!key.rsplit('/').next().unwrap().starts_with('.'), "no temporary file left: {key}");
        assert!(expected.get(&key) == Some(&bytes), "{key} is whole");
    }

    // Space returns: the next pass copies the rest.
    tmpfs.resize("16m");
    pass_ok(&mut replicator);
    assert!(replicator.verify(0).unwrap().is_empty());
    assert_eq!(counter(&replicator, |m| &m.lag_bytes), 0);
}

/// Records each read of every source streamed to the inner replica (key, when, bytes); sets
/// `stop` once the first shard is written.
struct RecordingReplica {
    inner: DirectoryReplica,
    reads: Arc<std::sync::Mutex<Vec<(String, std::time::Instant, usize)>>>,
    stop: Arc<AtomicBool>,
}

impl Replica for RecordingReplica {
    fn describe(&self) -> &str {
        self.inner.describe()
    }
    fn head(&self, key: &str) -> Result<Option<u64>, ReplicaError> {
        self.inner.head(key)
    }
    fn get(&self, key: &str, bytes_max: u64) -> Result<Option<Vec<u8>>, ReplicaError> {
        self.inner.get(key, bytes_max)
    }
    fn put(&self, key: &str, bytes: &[u8], mode: WriteMode) -> Result<PutOutcome, ReplicaError> {
        self.put_stream(key, bytes.len() as u64, &mut &bytes[..], mode)
    }
    fn put_stream(
        &self,
        key: &str,
        length: u64,
        source: &mut dyn std::io::Read,
        mode: WriteMode,
    ) -> Result<PutOutcome, ReplicaError> {
        struct Recorder<'a> {
            key: &'a str,
            inner: &'a mut dyn std::io::Read,
            reads: &'a std::sync::Mutex<Vec<(String, std::time::Instant, usize)>>,
        }
        impl std::io::Read for Recorder<'_> {
            fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
                let read = self.inner.read(buffer)?;
                if read > 0 {
                    self.reads.lock().unwrap().push((self.key.to_string(), std::time::Instant::now(), read));
                }
                Ok(read)
            }
        }
        let mut recorder = Recorder { key, inner: source, reads: &self.reads };
        let outcome = self.inner.put_stream(key, length, &mut recorder, mode)?;
        if key.ends_with(".tar") || key.ends_with(".parquet") {
            self.stop.store(true, Ordering::Relaxed);
        }
        Ok(outcome)
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ReplicaError> {
        self.inner.list(prefix)
    }
}

#[test]
fn a_shard_is_copied_in_chunks_each_waiting_for_its_budget() {
    // 150 kB shards at 100 kB/s with a one-second (100 kB) burst: the first 100 kB may go at
    // once, the other 50 kB only chunk by chunk over at least half a second. Paced as a whole
    // object, the shard would wait and then be read in one go.
    let mut site = Site::new();
    site.shard_bytes = 150_000;
    site.publish_shards(1);
    let replica = site.base.join("replica");
    std::fs::create_dir_all(&replica).unwrap();
    let mut config = ReplicationConfig::directory("site-b", &replica);
    config.bytes_per_second_max = 100_000;
    config.chunk_bytes = 16 * 1024;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend =
        RecordingReplica { inner: DirectoryReplica::new(&replica), reads: reads.clone(), stop: stop.clone() };
    let sources = Sources::of(&site.config(config.clone()));
    let sources = Sources { archive_root: None, ..sources };
    let mut replicator = Replicator::with_backends(
        sources,
        config,
        &site.base.join("state"),
        vec![("site-b".to_string(), Box::new(backend))],
        stop,
    )
    .unwrap();
    replicator.pass(false);
    let reads = reads.lock().unwrap();
    let shard = &reads.first().expect("a shard was copied").0;
    let chunks: Vec<_> = reads.iter().filter(|(key, _, _)| key == shard).collect();
    assert_eq!(chunks.iter().map(|chunk| chunk.2).sum::<usize>(), 150_000, "{shard}");
    assert!(chunks.iter().all(|chunk| chunk.2 <= 16 * 1024), "no read beyond a chunk");
    let spread = chunks.last().unwrap().1 - chunks.first().unwrap().1;
    assert!(spread >= Duration::from_millis(400), "{shard} went in {spread:?}: not paced chunk by chunk");
    assert_eq!(std::fs::read(replica.join(shard)).unwrap().len(), 150_000);
}

/// Every file under `directory` (relative path → bytes), hidden ones included.
fn source_files(directory: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    files_under(directory)
}

#[test]
fn review_shards_and_the_committed_raw_landing_are_replicated_and_restored() {
    let mut site = site_with_sources();
    let replica = site.base.join("replica");
    let checkpoint = Arc::new(std::sync::Mutex::new(site.landing_checkpoint()));
    let mut replicator = replicator(&site, &replica).with_landing_checkpoint(checkpoint.clone());
    pass_ok(&mut replicator);
    assert_eq!(counter(&replicator, |m| &m.lag_bytes), 0);

    // The replica's review shards equal the published ones; its landing segments, joined per
    // file, equal the landing files (all committed).
    let check = |site: &Site| {
        let found = files_under(&replica);
        let review = source_files(&site.base.join("review"));
        assert!(!review.is_empty(), "the feed published review shards");
        for (name, bytes) in &review {
            assert!(found.get(&format!("review/{name}")) == Some(bytes), "review/{name} on the replica");
        }
        let landing = source_files(&site.base.join("landing/raw"));
        assert!(!landing.is_empty());
        for (file, bytes) in &landing {
            let (lane_dir, name) = file.rsplit_once('/').unwrap();
            let prefix = format!("landing/raw/{lane_dir}/{}/", name.trim_end_matches(".tcr"));
            let joined: Vec<u8> = found
                .range(prefix.clone()..)
                .take_while(|(key, _)| key.starts_with(&prefix))
                .flat_map(|(_, bytes)| bytes.clone())
                .collect();
            assert!(&joined == bytes, "{file}: the replica's segments join to the landing file");
        }
    };
    check(&site);

    // More decisions: new landing records and a new review shard; only they are copied, and a
    // pass with the sources still copies nothing.
    let copied_before = counter(&replicator, |m| &m.objects_copied);
    pass_ok(&mut replicator);
    assert_eq!(counter(&replicator, |m| &m.objects_copied), copied_before, "a rerun copies nothing");
    site.archive_decisions(3);
    *checkpoint.lock().unwrap() = site.landing_checkpoint();
    pass_ok(&mut replicator);
    // 3 originals, one segment of each log file, one review shard, one landing segment.
    assert_eq!(counter(&replicator, |m| &m.objects_copied), copied_before + 3 + 3 + 1 + 1);
    assert_eq!(counter(&replicator, |m| &m.lag_bytes), 0);
    check(&site);
    assert_eq!(replicator.verify(0).unwrap(), Vec::new());

    // Damage in both is named by verify and mended by a repairing pass.
    let found = files_under(&replica);
    let review_key = found.keys().find(|key| key.starts_with("review/")).unwrap().clone();
    let landing_key = found.keys().find(|key| key.starts_with("landing/raw/")).unwrap().clone();
    let mut damaged = found[&landing_key].clone();
    damaged[7] ^= 0x10;
    std::fs::write(replica.join(&landing_key), damaged).unwrap();
    std::fs::remove_file(replica.join(&review_key)).unwrap();
    let named: Vec<String> =
        replicator.verify(0).unwrap().iter().map(|difference| difference.key.clone()).collect();
    assert_eq!(named, vec![review_key.clone(), landing_key.clone()]);
    for report in replicator.pass(true) {
        assert_eq!((report.error, report.repaired), (None, 2));
    }
    assert_eq!(replicator.verify(0).unwrap(), Vec::new());
    check(&site);

    // Restore brings both back, byte for byte.
    let restored = site.base.join("restored");
    let (ok, stdout, stderr) =
        core_sink(&["restore", "--from", replica.to_str().unwrap(), "--to", restored.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(source_files(&restored.join("review")), source_files(&site.base.join("review")));
    assert_eq!(source_files(&restored.join("landing/raw")), source_files(&site.base.join("landing/raw")));
    assert!(stdout.contains("raw landing: 1 files"), "{stdout}");
}
