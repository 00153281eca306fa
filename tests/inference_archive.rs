//! Inference with evidence, end to end: the appliance daemon's inference API (the committed
//! ONNX model) → audit lane → QUIC → sink → tamper-evident archive. Every answered decision is
//! in the core log exactly once with its original byte-identical by hash, `audit verify`
//! passes; a decision answered right before the appliance is killed with SIGKILL still
//! reaches the archive; and a real sink outage with a small audit reservation fills the audit
//! lane, the API refuses (503 `audit_full`) without deciding, and after the sink returns every
//! answered decision — and nothing else — arrives and the API decides again.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use core_sink::archive_feed::ArchiveConfig;
use core_sink::{Sink, SinkConfig};
use inference::client::LoopbackClient;
use support::harness::{Fleet, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

fn free_tcp_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    protocol::evidence::sha256_hex(&protocol::evidence::sha256(bytes))
}

/// The `[ring]` of the tests that never fill the audit lane: 128 MiB, half of it for audit.
const RING_ROOMY: &str = "capacity_bytes = 134217728\naudit_reserved_bytes = 67108864\n";

fn write_appliance_config(
    fleet: &Fleet,
    device: &str,
    sink: std::net::SocketAddr,
    api: std::net::SocketAddr,
    ring: &str,
) -> PathBuf {
    let dir = fleet.path().join(device);
    std::fs::create_dir_all(&dir).unwrap();
    fleet.device(device).write_to(&dir.join("identity"), fleet.ca.certificate_pem()).unwrap();
    std::fs::write(dir.join("fleet-ca.pem"), fleet.ca.certificate_pem()).unwrap();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let config = format!(
        r#"
data_dir = "."
[ring]
{ring}durability = "sync"
[uplink]
sink = "{sink}"
server_name = "localhost"
ca_file = "fleet-ca.pem"
[inference]
listen = "{api}"
models_dir = "{models}"
models = ["shapes"]
# The test images are about 1 KB; 64 KiB bodies keep one request's evidence within one audit
# chunk of the small ring too.
body_bytes_max = 65536
"#,
        models = models.display()
    );
    let path = dir.join("appliance.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A sink config on `listen` with the archive feed; returns it and the archive root.
fn archive_sink_config(fleet: &Fleet, listen: std::net::SocketAddr) -> (SinkConfig, PathBuf) {
    let mut config = fleet.sink_config(listen);
    let root = fleet.path().join("archive");
    let mut archive = ArchiveConfig::new(root.clone(), fleet.path().join("review"));
    archive.flush_interval_ms = 100;
    config.archive = Some(archive);
    (config, root)
}

async fn start_sink(fleet: &Fleet) -> (Sink, PathBuf) {
    let (config, root) = archive_sink_config(fleet, "127.0.0.1:0".parse().unwrap());
    (Sink::start(config).await.unwrap(), root)
}

/// Decision id → sha256 of the original, for every decision the archive holds.
fn archived(root: &Path, ids: &[String]) -> Option<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    for id in ids {
        let view = archive::audit::show(root, id, None).ok()?;
        let original = view.objects.iter().find(|object| object.role == "original")?;
        found.insert(id.clone(), original.sha256.clone());
    }
    Some(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_decisions_reach_the_archive_once_with_their_originals() {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
    let fleet = Fleet::new();
    let (sink, root) = start_sink(&fleet).await;
    let api = free_tcp_port();
    let config_path = write_appliance_config(&fleet, "infer-1", sink.local_addr(), api, RING_ROOMY);
    let config = appliance::config::ApplianceConfig::load(&config_path).unwrap();
    let daemon = appliance::daemon::Daemon::start(config).await.unwrap();

    let images = inference::synthetic::dataset(7, 50);
    let mut sent: BTreeMap<String, String> = BTreeMap::new();
    let mut clients = Vec::new();
    for worker in 0..8usize {
        let images = images.clone();
        clients.push(tokio::spawn(async move {
            let mut client = LoopbackClient::connect(api).await.unwrap();
            let mut answered = Vec::new();
            for request in 0..125usize {
                let (_, image) = &images[(worker * 125 + request) % images.len()];
                let body = inference::synthetic::encode_png(image);
                let response = client.infer(None, "image/png", body.clone()).await.unwrap();
                assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
                let answer: inference::InferResponse = response.json().unwrap();
                answered.push((answer.decision_id, sha256_hex(&body)));
            }
            answered
        }));
    }
    for client in clients {
        for (id, digest) in client.await.unwrap() {
            assert!(sent.insert(id, digest).is_none(), "decision ids are unique");
        }
    }
    assert_eq!(sent.len(), 1_000);

    let ids: Vec<String> = sent.keys().cloned().collect();
    let arrived = wait_until(LIMIT, || {
        archive::audit::verify(&root)
            .is_ok_and(|report| report.decisions >= 1_000 && report.entries_after_latest_checkpoint == 0)
    })
    .await;
    let report = archive::audit::verify(&root);
    assert!(arrived, "the archive did not receive every decision: {report:?}");
    let report = report.unwrap();
    assert_eq!(report.decisions, 1_000, "each decision exactly once");
    assert_eq!(report.models, 1, "the model was archived once");
    assert_eq!(
        archived(&root, &ids).expect("every decision shows"),
        sent,
        "originals byte-identical by hash"
    );

    daemon.shutdown().await.unwrap();
    sink.shutdown().await;
}

/// The appliance binary beside this test's binary (`cargo test --workspace` builds it).
fn appliance_binary() -> PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    let path = test_binary.parent().and_then(Path::parent).unwrap().join("appliance");
    assert!(path.is_file(), "{} not built: run `cargo test --release --workspace`", path.display());
    path
}

fn spawn_appliance(config: &Path) -> Child {
    let log = std::fs::File::create(config.with_extension("log")).unwrap();
    Command::new(appliance_binary())
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn connect(api: std::net::SocketAddr) -> LoopbackClient {
    for _ in 0..600 {
        if let Ok(client) = LoopbackClient::connect(api).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the appliance's inference API never listened on {api}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_answered_before_sigkill_still_reaches_the_archive() {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
    let fleet = Fleet::new();
    let (sink, root) = start_sink(&fleet).await;
    let api = free_tcp_port();
    let config = write_appliance_config(&fleet, "infer-kill", sink.local_addr(), api, RING_ROOMY);
    let images = inference::synthetic::dataset(11, 5);
    let mut answered = Vec::new();
    for (_, image) in images.iter().take(3) {
        let mut child = spawn_appliance(&config);
        let mut client = connect(api).await;
        let body = inference::synthetic::encode_png(image);
        let response = client.infer(None, "image/png", body.clone()).await.unwrap();
        assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
        // SIGKILL right after the answer: the evidence was durable before the answer was sent.
        child.kill().unwrap();
        child.wait().unwrap();
        let answer: inference::InferResponse = response.json().unwrap();
        answered.push((answer.decision_id, sha256_hex(&body)));
    }
    // One more start with no requests: it only ships what the killed runs left in the ring.
    let mut child = spawn_appliance(&config);
    let ids: Vec<String> = answered.iter().map(|(id, _)| id.clone()).collect();
    let arrived = wait_until(LIMIT, || archived(&root, &ids).is_some()).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(arrived, "decisions answered before SIGKILL are missing from the archive");
    let expected: BTreeMap<String, String> = answered.into_iter().collect();
    assert_eq!(archived(&root, &ids).unwrap(), expected);
    let report = archive::audit::verify(&root).unwrap();
    assert_eq!(report.decisions, 3);
    sink.shutdown().await;
}

/// A 16 MiB ring (audit chunks up to 512 KiB) whose 1 MiB audit reservation holds the model
/// record (≈ 265 KB) and about a hundred decisions of the 32×32 synthetic images (≈ 5 KB of
/// evidence each, two pages stored): a short sink outage fills it.
const RING_SMALL_AUDIT: &str = "capacity_bytes = 16777216\naudit_reserved_bytes = 1048576\n";
/// Concurrent clients during the outage, so refused batches hold several requests.
const OUTAGE_CLIENTS: usize = 4;
/// Each outage client stops after this many refusals...
const OUTAGE_REFUSALS_PER_CLIENT: usize = 3;
/// ...or this many requests (the reservation holds about a hundred decisions in all).
const OUTAGE_REQUESTS_PER_CLIENT_MAX: usize = 2_000;

/// Sends one PNG; returns the decision id and the body's sha256 on 200, `None` on a 503 after
/// checking it is a well-formed `audit_full` refusal that names no decision.
async fn infer_or_refusal(client: &mut LoopbackClient, body: Vec<u8>) -> Option<(String, String)> {
    let digest = sha256_hex(&body);
    let response = client.infer(None, "image/png", body).await.unwrap();
    match response.status {
        200 => {
            let answer: inference::InferResponse = response.json().unwrap();
            Some((answer.decision_id, digest))
        }
        503 => {
            let retry_after = response.header("retry-after");
            assert!(
                retry_after.is_some_and(|seconds| seconds.parse::<u32>().is_ok_and(|seconds| seconds >= 1)),
                "a 503 carries Retry-After in whole seconds, got {retry_after:?}"
            );
            let body: serde_json::Value = serde_json::from_slice(&response.body).expect("a 503 body is JSON");
            let fields: Vec<&String> =
                body.as_object().expect("a 503 body is a JSON object").keys().collect();
            assert_eq!(fields, ["error", "message"], "a refusal carries its reason and nothing else: {body}");
            assert_eq!(body["error"], "audit_full", "{body}");
            None
        }
        other => panic!("unexpected status {other}: {}", String::from_utf8_lossy(&response.body)),
    }
}

/// `GET /v1/decisions/ID` on the appliance: the recorded decision, or `None` on 404.
async fn recorded_locally(client: &mut LoopbackClient, id: &str) -> Option<inference::RecordedDecision> {
    let response = client.send("GET", &format!("/v1/decisions/{id}"), &[], Vec::new()).await.unwrap();
    match response.status {
        200 => Some(response.json().unwrap()),
        404 => None,
        other => {
            panic!("GET /v1/decisions/{id}: status {other}: {}", String::from_utf8_lossy(&response.body))
        }
    }
}

/// Every decision in the archive's log, in log order (empty while there is no log yet).
fn logged_decisions(root: &Path) -> Vec<archive::ReviewItem> {
    archive::review_list(root, f32::INFINITY).unwrap_or_default()
}

/// Whether the archive verifies, logs at least `decisions` decisions and has checkpointed them.
fn archive_caught_up(root: &Path, decisions: usize) -> bool {
    logged_decisions(root).len() >= decisions
        && archive::audit::verify(root).is_ok_and(|report| report.entries_after_latest_checkpoint == 0)
}

async fn start_sink_on(config: &SinkConfig) -> Sink {
    // The previous endpoint's UDP socket is released once its last connection task has ended.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match Sink::start(config.clone()).await {
            Ok(sink) => return sink,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "sink restart: retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the sink did not restart on {} within {LIMIT:?}: {error}", config.listen),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_outage_fills_the_audit_lane_refuses_without_deciding_and_loses_nothing() {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
    let fleet = Fleet::new();
    let (sink_config, root) = archive_sink_config(&fleet, support::harness::free_udp_port());
    let sink = Sink::start(sink_config.clone()).await.unwrap();
    let api = free_tcp_port();
    let device = "infer-outage";
    let config_path = write_appliance_config(&fleet, device, sink.local_addr(), api, RING_SMALL_AUDIT);
    let config = appliance::config::ApplianceConfig::load(&config_path).unwrap();
    let daemon = appliance::daemon::Daemon::start(config).await.unwrap();
    let images: Vec<Vec<u8>> = inference::synthetic::dataset(17, 64)
        .iter()
        .map(|(_, image)| inference::synthetic::encode_png(image))
        .collect();

    // Sink up: every request is decided (the model record goes first).
    let mut client = connect(api).await;
    let mut before_outage: BTreeMap<String, String> = BTreeMap::new();
    for body in images.iter().take(20) {
        let (id, digest) = infer_or_refusal(&mut client, body.clone())
            .await
            .expect("the sink is up: every request is decided");
        assert!(before_outage.insert(id, digest).is_none(), "decision ids are unique");
    }

    // Sink down: nothing is acknowledged, the audit reservation fills, and the API refuses.
    sink.shutdown().await;
    let mut clients = Vec::new();
    for worker in 0..OUTAGE_CLIENTS {
        let images = images.clone();
        clients.push(tokio::spawn(async move {
            let mut client = LoopbackClient::connect(api).await.unwrap();
            let (mut decided, mut refused) = (Vec::new(), 0usize);
            for request in 0..OUTAGE_REQUESTS_PER_CLIENT_MAX {
                let body = images[(worker * 31 + request) % images.len()].clone();
                match infer_or_refusal(&mut client, body).await {
                    Some(answer) => decided.push(answer),
                    None => refused += 1,
                }
                if refused == OUTAGE_REFUSALS_PER_CLIENT {
                    break;
                }
            }
            (decided, refused)
        }));
    }
    let mut during_outage: BTreeMap<String, String> = BTreeMap::new();
    let mut refused = 0;
    for worker in clients {
        let (decided, worker_refused) = worker.await.unwrap();
        assert_eq!(
            worker_refused, OUTAGE_REFUSALS_PER_CLIENT,
            "the audit lane never filled in {OUTAGE_REQUESTS_PER_CLIENT_MAX} requests with the sink down"
        );
        refused += worker_refused;
        for (id, digest) in decided {
            assert!(!before_outage.contains_key(&id), "decision ids are unique");
            assert!(during_outage.insert(id, digest).is_none(), "decision ids are unique");
        }
    }
    assert!(!during_outage.is_empty(), "the reservation took some decisions before it filled");

    // Every answered decision is recorded: on the appliance while the core has not acknowledged
    // it (all of the outage's), or already in the archive (some from before the outage).
    for (id, digest) in &during_outage {
        let recorded = recorded_locally(&mut client, id)
            .await
            .unwrap_or_else(|| panic!("decision {id} was answered during the outage but is not in the ring"));
        assert_eq!(&recorded.original.sha256, digest, "{id}: the recorded original is the one sent");
    }
    for (id, digest) in &before_outage {
        match recorded_locally(&mut client, id).await {
            Some(recorded) => assert_eq!(&recorded.original.sha256, digest, "{id}"),
            None => {
                let view = archive::audit::show(&root, id, Some(device)).unwrap_or_else(|error| {
                    panic!("decision {id} is neither in the ring nor in the archive: {error}")
                });
                let original = view.objects.iter().find(|object| object.role == "original").unwrap();
                assert_eq!(&original.sha256, digest, "{id}");
            }
        }
    }
    let service =
        daemon.inference.as_ref().map(|(service, _)| service.clone()).expect("the daemon serves inference");
    let metrics = service.metrics().snapshot();
    assert_eq!(metrics.decisions as usize, before_outage.len() + during_outage.len());
    assert_eq!(metrics.unavailable(inference::metrics::UnavailableReason::AuditFull) as usize, refused);

    // Sink back on its port: the uplink reconnects and ships the backlog.
    let sink = start_sink_on(&sink_config).await;
    let during_outage_count = during_outage.len();
    let mut answered = before_outage;
    answered.extend(during_outage);
    let arrived = wait_until(LIMIT, || archive_caught_up(&root, answered.len())).await;
    assert!(
        arrived,
        "within {LIMIT:?} of the sink's return the archive logged {} of {} answered decisions: {:?}",
        logged_decisions(&root).len(),
        answered.len(),
        archive::audit::verify(&root)
    );
    let check_archive = |answered: &BTreeMap<String, String>| {
        let logged = logged_decisions(&root);
        let mut ids: Vec<&str> = logged.iter().map(|item| item.decision_id.as_str()).collect();
        ids.sort_unstable();
        let logged_count = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), logged_count, "a decision was logged more than once");
        assert_eq!(
            ids,
            answered.keys().map(String::as_str).collect::<Vec<_>>(),
            "archive = answered decisions"
        );
        for item in &logged {
            assert_eq!(item.device, device);
            let stored = std::fs::read(&item.original).unwrap();
            assert_eq!(
                sha256_hex(&stored),
                answered[&item.decision_id],
                "{}: original byte-identical",
                item.decision_id
            );
        }
        let report = archive::audit::verify(&root).expect("the archive verifies");
        assert_eq!(report.decisions as usize, answered.len());
        assert_eq!(report.models, 1, "the model was archived once");
    };
    check_archive(&answered);

    // The backlog is acknowledged: the API decides again (retried until the acks reach the ring).
    let deadline = tokio::time::Instant::now() + LIMIT;
    let (mut refused_after, mut request) = (0usize, 0usize);
    let (id, digest) = loop {
        if let Some(answer) = infer_or_refusal(&mut client, images[request % images.len()].clone()).await {
            break answer;
        }
        refused_after += 1;
        request += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API still answers 503 audit_full {LIMIT:?} after the archive received the whole backlog"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    answered.insert(id, digest);
    let arrived = wait_until(LIMIT, || archive_caught_up(&root, answered.len())).await;
    assert!(arrived, "the decision made after the outage did not reach the archive");
    check_archive(&answered);
    let metrics = service.metrics().snapshot();
    assert_eq!(metrics.decisions as usize, answered.len());
    assert_eq!(
        metrics.unavailable(inference::metrics::UnavailableReason::AuditFull) as usize,
        refused + refused_after
    );

    eprintln!(
        "sink outage: {} decided before, {} decided during the outage, {refused} refused during it, \
         {refused_after} refused after the sink returned",
        answered.len() - 1 - during_outage_count,
        during_outage_count,
    );
    daemon.shutdown().await.unwrap();
    sink.shutdown().await;
}
