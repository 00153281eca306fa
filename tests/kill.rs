//! kill -9 of either side mid-stream (sync mode at both ends): zero acked records lost, zero
//! records landed twice. The sink and the appliance run as child processes (this test binary
//! re-executed) so that SIGKILL hits a real process with real files and sockets.
//!
//! `TRIBUTARY_KILLS` sets the number of kills per side (default 20).

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use appliance::Uplink;
use core_sink::Sink;
use core_sink::datasets::manifest::Manifest;
use protocol::Lane;
use sha2::Digest as _;
use support::harness::{
    Fleet, MIB, assert_landed_exactly_once, free_udp_port, landed_records, produce, produce_media,
    python_read, record_key, wait_until, write_sink_config,
};

const SINK_CHILD: &str = "TRIBUTARY_SINK_CHILD";
const APPLIANCE_CHILD: &str = "TRIBUTARY_APPLIANCE_CHILD";
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

fn kills() -> usize {
    std::env::var("TRIBUTARY_KILLS").ok().and_then(|value| value.parse().ok()).unwrap_or(20)
}

/// splitmix64, seeded: kill moments are random but reproducible.
struct Rng(u64);
impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % bound
    }
}

fn child(test: &str, variable: &str, value: &str, extra: &[(&str, String)]) -> Child {
    child_logging_to(test, variable, value, extra, None)
}

/// Like `child`, with the child's stderr (its logs) appended to `log`.
fn child_logging_to(
    test: &str,
    variable: &str,
    value: &str,
    extra: &[(&str, String)],
    log: Option<&Path>,
) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", test, "--nocapture", "--test-threads=1"]).env(variable, value);
    for (key, value) in extra {
        command.env(key, value);
    }
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap()),
        None => Stdio::null(),
    };
    command.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap()
}

/// Runs a sink from a config file until killed.
#[test]
fn sink_child() {
    // Prints "listening on ADDRESS"; SIGKILL kills it, SIGTERM shuts it down cleanly.
    support::harness::run_sink_child(SINK_CHILD, "warn");
}

fn start_sink_child(config: &Path) -> Child {
    let log = config.with_file_name("sink.log");
    let mut sink = child_logging_to(
        "sink_child",
        SINK_CHILD,
        config.to_str().unwrap(),
        &[("TRIBUTARY_LOG", "warn".to_string())],
        Some(&log),
    );
    let stdout = sink.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            // The test harness may print "test sink_child ... " on the same line first.
            Some(Ok(line)) if line.contains("listening on") => break,
            Some(Ok(_)) => continue,
            _ => panic!("sink child exited before listening"),
        }
    }
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    sink
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_killed_mid_stream_loses_nothing_and_lands_nothing_twice() {
    let fleet = Fleet::new();
    let listen = free_udp_port();
    let config = write_sink_config(&fleet, listen);
    let mut sink = start_sink_child(&config);
    let device = "sink-kill";
    let ring = fleet.open_ring(device, 256 * MIB);
    let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config(device, listen)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let media = Arc::new(std::sync::Mutex::new(Vec::new()));
    let producer = {
        let (ring, stop, produced, media) = (ring.clone(), stop.clone(), produced.clone(), media.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                let first = produced.load(Ordering::Relaxed);
                produce(&ring, device, Lane::Sensor, first, 1_000);
                let frames = produce_media(&ring, device, first / 500, 2);
                media.lock().unwrap().extend(frames);
                produced.store(first + 1_000, Ordering::Relaxed);
                // A steady stream, not a flood: the point is kills during shard writing.
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };
    let mut rng = Rng(0x51_4E_4B);
    let metrics = uplink.metrics();
    let mut connects_at_kill = 0;
    for _ in 0..kills() {
        // Kill mid-stream: only once the uplink is connected to this incarnation and has had a
        // random moment to send and receive acks.
        assert!(
            wait_until(DRAIN_LIMIT, || metrics.connects.load(Ordering::Relaxed) > connects_at_kill).await,
            "the uplink reconnects to the restarted sink"
        );
        tokio::time::sleep(Duration::from_millis(50 + rng.below(400))).await;
        connects_at_kill = metrics.connects.load(Ordering::Relaxed);
        sink.kill().unwrap(); // SIGKILL
        sink.wait().unwrap();
        sink = start_sink_child(&config);
    }
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let total = produced.load(Ordering::Relaxed);
    let stats = ring.stats();
    let heads = [Lane::Sensor, Lane::Media].map(|lane| (lane, stats.lane(lane).next_seq - 1));
    assert!(
        wait_until(DRAIN_LIMIT, || heads.iter().all(|(lane, head)| metrics.acked_through(*lane) >= *head))
            .await,
        "both lanes drained after the kills"
    );
    // The ring must not have evicted anything, or "every record once" would not be the
    // expectation (eviction is the ring's policy, counted, and tested elsewhere).
    let stats = ring.stats();
    for lane in [Lane::Sensor, Lane::Media] {
        assert_eq!(stats.lane(lane).evicted_chunks, 0, "{lane}: the ring was sized to hold the outages");
    }
    uplink.stop().await;
    // A clean stop publishes the open shards.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(sink.id() as i32, libc::SIGTERM) };
    assert!(sink.wait().unwrap().success(), "the sink stops cleanly on SIGTERM");

    let landed = landed_records(&fleet.landing_dir(), device);
    let expected: Vec<String> = (0..total).map(|index| record_key(device, Lane::Sensor, index)).collect();
    assert_landed_exactly_once(&landed, Lane::Sensor, &expected);
    // Every kill hit a connected incarnation (the loop waits for each reconnect); the last
    // restart may see no new connection when everything was already acked before the kill.
    assert!(
        metrics.connects.load(Ordering::Relaxed) >= kills() as u64,
        "the uplink reconnected after each kill"
    );

    // Datasets after 20 kills during shard writing: every published shard complete and readable,
    // the union of samples equal to every acked record, once.
    let sensor = Manifest::read(&fleet.path().join("manifests/sensor/manifest.json")).unwrap().unwrap();
    let media_manifest =
        Manifest::read(&fleet.path().join("manifests/media/manifest.json")).unwrap().unwrap();
    for shard in sensor.shards.iter().chain(&media_manifest.shards) {
        let bytes = std::fs::read(&shard.path).unwrap();
        let digest: String = sha2::Sha256::digest(&bytes).iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(digest, shard.sha256, "{} is complete", shard.name);
    }
    let mut rows: Vec<String> = Vec::new();
    for shard in &sensor.shards {
        rows.extend(
            core_sink::datasets::parquet::read_parquet_rows(&shard.path)
                .unwrap()
                .into_iter()
                .map(|row| row.key),
        );
    }
    rows.sort();
    assert_eq!(rows, expected, "parquet holds every sensor record once");
    let mut frames: Vec<String> =
        media.lock().unwrap().iter().map(|(key, _)| format!("{device}/{key}")).collect();
    frames.sort();
    let shards: Vec<PathBuf> = media_manifest.shards.iter().map(|shard| shard.path.clone()).collect();
    if let Some(samples) = python_read("webdataset", &shards) {
        let mut keys: Vec<String> =
            samples.iter().map(|sample| sample["key"].as_str().unwrap().to_string()).collect();
        keys.sort();
        let missing = frames.iter().filter(|key| keys.binary_search(key).is_err()).count();
        let mut unique = keys.clone();
        unique.dedup();
        assert!(
            missing == 0 && unique.len() == keys.len() && keys.len() == frames.len(),
            "webdataset sees every frame once: {missing} missing, {} duplicated, {} read, {} sent; sink log:\n{}",
            keys.len() - unique.len(),
            keys.len(),
            frames.len(),
            std::fs::read_to_string(fleet.path().join("sink.log")).unwrap_or_default()
        );
    }
    let files: Vec<PathBuf> = sensor.shards.iter().map(|shard| shard.path.clone()).collect();
    if let Some(python_rows) = python_read("parquet", &files) {
        assert_eq!(python_rows.len(), expected.len(), "pyarrow reads every row");
    }
}

/// An appliance from its ring directory: produces batches (run-tagged keys, printed after each
/// append returns) and uplinks to the sink, until killed; in drain mode it only uplinks until
/// everything is acked.
#[test]
fn appliance_child() {
    let Ok(directory) = std::env::var(APPLIANCE_CHILD) else { return };
    let directory = PathBuf::from(directory);
    let run: u64 = std::env::var("RUN").unwrap().parse().unwrap();
    let drain = std::env::var("DRAIN").is_ok();
    let sink: std::net::SocketAddr = std::env::var("SINK").unwrap().parse().unwrap();
    let ca_pem = std::fs::read_to_string(directory.join("identity").join("ca.pem")).unwrap();
    let identity = fleet::IssuedCertificate::read_from(&directory.join("identity")).unwrap();
    let ring =
        buffer::Ring::open(directory.join("ring"), buffer::RingConfig::with_capacity(256 * MIB)).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut config = appliance::UplinkConfig::new(sink, "localhost", "app-kill", identity, &ca_pem);
        config.transport.idle_timeout_ms = 3_000;
        config.transport.keep_alive_ms = 500;
        config.reconnect_max_ms = 500;
        let uplink = Uplink::spawn(ring.clone(), config).unwrap();
        if drain {
            let head = ring.stats().lane(Lane::Sensor).next_seq - 1;
            // Bounded, so a broken uplink fails the test instead of hanging CI.
            let drained =
                wait_until(DRAIN_LIMIT, || ring.stats().lane(Lane::Sensor).acked_through >= head).await;
            assert!(drained, "the drain run did not get everything acked");
            println!("@DONE");
            uplink.stop().await;
            return;
        }
        let prefix = format!("run{run:03}");
        let mut index = 0u64;
        loop {
            let ring = ring.clone();
            let (batch_prefix, first) = (prefix.clone(), index);
            tokio::task::spawn_blocking(move || produce(&ring, &batch_prefix, Lane::Sensor, first, 500))
                .await
                .unwrap();
            println!("@A {run} {first} 500");
            index += 500;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_killed_mid_stream_loses_nothing_and_lands_nothing_twice() {
    let fleet = Fleet::new();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let directory = fleet.path().join("appliance");
    fleet.device("app-kill").write_to(&directory.join("identity"), fleet.ca.certificate_pem()).unwrap();
    let mut rng = Rng(0xA9_91_1A);
    let mut appended: Vec<(u64, u64, u64)> = Vec::new();
    let kills = kills();
    for run in 0..=kills as u64 {
        let drain = run == kills as u64;
        let mut extra = vec![("RUN", run.to_string()), ("SINK", sink.local_addr().to_string())];
        if drain {
            extra.push(("DRAIN", "1".to_string()));
        }
        let mut appliance = child("appliance_child", APPLIANCE_CHILD, directory.to_str().unwrap(), &extra);
        let stdout = appliance.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines.push(line);
            }
            lines
        });
        if drain {
            let status = tokio::task::spawn_blocking(move || appliance.wait()).await.unwrap().unwrap();
            assert!(status.success(), "drain run ended cleanly");
        } else {
            tokio::time::sleep(Duration::from_millis(200 + rng.below(600))).await;
            appliance.kill().unwrap(); // SIGKILL
            appliance.wait().unwrap();
        }
        let lines = reader.join().unwrap();
        if drain {
            assert!(lines.iter().any(|line| line.contains("@DONE")), "drain finished: {lines:?}");
        }
        for line in lines {
            // Markers start with '@': the harness may print its own text before them on a line.
            let Some(marker) = line.find('@').map(|at| &line[at + 1..]) else { continue };
            let fields: Vec<&str> = marker.split_whitespace().collect();
            if let ["A", run, first, count] = fields[..] {
                appended.push((run.parse().unwrap(), first.parse().unwrap(), count.parse().unwrap()));
            }
        }
    }
    sink.shutdown().await;

    let landed = landed_records(&fleet.landing_dir(), "app-kill");
    let records = landed.get(&Lane::Sensor).cloned().unwrap_or_default();
    let keys: Vec<&String> = records.iter().map(|(_, key)| key).collect();
    let unique: BTreeSet<&String> = keys.iter().copied().collect();
    assert_eq!(unique.len(), keys.len(), "no record landed twice");
    assert!(records.windows(2).all(|pair| pair[0].0 <= pair[1].0), "seq order");
    let mut required = 0;
    for (run, first, count) in &appended {
        for index in *first..first + count {
            let key = record_key(&format!("run{run:03}"), Lane::Sensor, index);
            assert!(unique.contains(&key), "appended (returned Ok) but never landed: {key}");
            required += 1;
        }
    }
    assert!(required > 0, "the children appended before being killed");
}
