//! Inference with evidence, end to end: the appliance daemon's inference API (the committed
//! ONNX model) → audit lane → QUIC → sink → tamper-evident archive. Every answered decision is
//! in the core log exactly once with its original byte-identical by hash, `audit verify`
//! passes; and a decision answered right before the appliance is killed with SIGKILL still
//! reaches the archive.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use core_sink::Sink;
use core_sink::archive_feed::ArchiveConfig;
use inference::client::LoopbackClient;
use support::harness::{Fleet, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

fn free_tcp_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    protocol::evidence::sha256_hex(&protocol::evidence::sha256(bytes))
}

fn write_appliance_config(
    fleet: &Fleet,
    device: &str,
    sink: std::net::SocketAddr,
    api: std::net::SocketAddr,
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
capacity_bytes = 134217728
audit_reserved_bytes = 67108864
durability = "sync"
[uplink]
sink = "{sink}"
server_name = "localhost"
ca_file = "fleet-ca.pem"
[inference]
listen = "{api}"
models_dir = "{models}"
models = ["shapes"]
"#,
        models = models.display()
    );
    let path = dir.join("appliance.toml");
    std::fs::write(&path, config).unwrap();
    path
}

async fn start_sink(fleet: &Fleet) -> (Sink, PathBuf) {
    let mut config = fleet.sink_config("127.0.0.1:0".parse().unwrap());
    let root = fleet.path().join("archive");
    let mut archive = ArchiveConfig::new(root.clone(), fleet.path().join("review"));
    archive.flush_interval_ms = 100;
    config.archive = Some(archive);
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
    let config_path = write_appliance_config(&fleet, "infer-1", sink.local_addr(), api);
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
    let config = write_appliance_config(&fleet, "infer-kill", sink.local_addr(), api);
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
