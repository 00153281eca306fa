//! The inference API end to end: real HTTP on loopback, a real ring in a temporary directory,
//! the committed `shapes` model.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use buffer::{ReadLimits, Ring, RingConfig};
use inference::api::ErrorBody;
use inference::client::LoopbackClient;
use inference::metrics::RejectReason;
use inference::synthetic::{dataset, encode_jpeg, encode_png};
use inference::{
    InferResponse, InferenceConfig, InferenceService, InputTensor, ModelSource, RecordedDecision,
};
use protocol::evidence::{EVIDENCE_CONTENT_TYPE, Evidence, MODEL_CONTENT_TYPE, ModelRecord, sha256};
use protocol::{ChunkDecompressor, Lane, Record};
use tokio::task::JoinHandle;

const MIB: u64 = 1024 * 1024;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn shapes_source() -> ModelSource {
    ModelSource::in_directory(models_dir(), "shapes")
}

/// A served service; shut down when dropped.
struct Harness {
    service: Arc<InferenceService>,
    address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Harness {
    async fn start(ring: &Ring, state_dir: &Path, configure: impl FnOnce(&mut InferenceConfig)) -> Harness {
        let mut config = InferenceConfig::new(state_dir, vec![shapes_source()]);
        configure(&mut config);
        let service = InferenceService::start(config, ring.clone()).expect("service starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(inference::serve(listener, service.clone(), async {
            let _ = stopped.await;
        }));
        Harness { service, address, shutdown: Some(shutdown), server: Some(server) }
    }

    async fn client(&self) -> LoopbackClient {
        LoopbackClient::connect(self.address).await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap().unwrap();
    }
}

fn open_ring(path: &Path, capacity_bytes: u64, audit_reserved_bytes: u64) -> Ring {
    let mut config = RingConfig::with_capacity(capacity_bytes);
    config.audit_reserved_bytes = audit_reserved_bytes;
    Ring::open(path, config).unwrap()
}

/// Every record of the audit lane, with its chunk's seq.
fn audit_records(ring: &Ring) -> Vec<(u64, Record)> {
    let mut records = Vec::new();
    let mut from_seq = 1;
    loop {
        let chunks = ring
            .read_from(Lane::Audit, from_seq, ReadLimits { chunks_max: 64, bytes_max: 64 << 20 })
            .unwrap();
        let Some(last) = chunks.last() else { return records };
        from_seq = last.seq + 1;
        for chunk in chunks {
            let raw = ChunkDecompressor::new().decompress(&chunk.header, chunk.body()).unwrap();
            for record in protocol::decode_records(&chunk.header, &raw).unwrap() {
                records.push((chunk.seq, record.to_owned()));
            }
        }
    }
}

fn evidence_by_id(records: &[(u64, Record)]) -> HashMap<String, Vec<Evidence>> {
    let mut found: HashMap<String, Vec<Evidence>> = HashMap::new();
    for (_, record) in records.iter().filter(|(_, record)| record.content_type == EVIDENCE_CONTENT_TYPE) {
        let evidence = Evidence::decode(&record.payload).unwrap();
        assert_eq!(evidence.decision.decision_id, record.key);
        found.entry(record.key.clone()).or_default().push(evidence);
    }
    found
}

fn model_records(records: &[(u64, Record)]) -> Vec<(u64, ModelRecord)> {
    records
        .iter()
        .filter(|(_, record)| record.content_type == MODEL_CONTENT_TYPE)
        .map(|(seq, record)| (*seq, ModelRecord::decode(&record.payload).unwrap()))
        .collect()
}

/// Request `index`'s body: PNG, JPEG, binary tensor or JSON tensor in turn.
fn request_body(index: usize, image: &image::GrayImage) -> (&'static str, Vec<u8>) {
    let tensor = || {
        let data = image.as_raw().iter().map(|&pixel| (f32::from(pixel) / 255.0 - 0.5) / 0.5).collect();
        InputTensor::new(vec![1, 1, 32, 32], data).unwrap()
    };
    match index % 4 {
        0 => ("image/png", encode_png(image)),
        1 => ("image/jpeg", encode_jpeg(image, 85)),
        2 => (inference::TENSOR_CONTENT_TYPE, tensor().encode()),
        _ => {
            let tensor = tensor();
            (
                "application/json",
                serde_json::to_vec(&serde_json::json!({"shape": tensor.shape, "data": tensor.data})).unwrap(),
            )
        }
    }
}

struct Sent {
    content_type: &'static str,
    body: Vec<u8>,
    answer: InferResponse,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_decisions_each_have_exactly_one_byte_identical_evidence_record() {
    const REQUESTS: usize = 1_000;
    const CLIENTS: usize = 16;
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 128 * MIB, 64 * MIB);
    let harness = Harness::start(&ring, &directory.path().join("state"), |_| {}).await;
    let images = Arc::new(dataset(42, REQUESTS));
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        let mut client = harness.client().await;
        let images = images.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for index in (client_index..REQUESTS).step_by(CLIENTS) {
                let (content_type, body) = request_body(index, &images[index].1);
                let response = client.infer(None, content_type, body.clone()).await.unwrap();
                assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
                sent.push(Sent { content_type, body, answer: response.json().unwrap() });
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    assert_eq!(sent.len(), REQUESTS);

    let records = audit_records(&ring);
    let evidence = evidence_by_id(&records);
    assert_eq!(evidence.len(), REQUESTS, "one evidence record per decision, none extra");
    let model = harness.service.models().get(None).unwrap().clone();
    for Sent { content_type, body, answer } in &sent {
        let copies = &evidence[&answer.decision_id];
        assert_eq!(copies.len(), 1, "decision {} recorded {} times", answer.decision_id, copies.len());
        let recorded = &copies[0];
        assert_eq!(recorded.original.sha256, sha256(body));
        assert_eq!(&recorded.original.bytes, body);
        assert_eq!(recorded.original.content_type, *content_type);
        // What the model saw is kept whenever it is not the bytes received.
        assert_eq!(recorded.modified.is_some(), *content_type != inference::TENSOR_CONTENT_TYPE);
        assert_eq!(recorded.decision.label, answer.label);
        assert_eq!(recorded.decision.scores, answer.scores);
        assert_eq!(recorded.decision.model_sha256, *model.sha256());
        assert!(recorded.decision.request.client.starts_with("127.0.0.1:"));
    }
    // The model version travelled once, before the first decision naming it.
    let models = model_records(&records);
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].1.model.sha256, *model.sha256());
    let first_evidence_seq =
        records.iter().find(|(_, record)| record.content_type == EVIDENCE_CONTENT_TYPE).unwrap().0;
    assert!(models[0].0 < first_evidence_seq);

    let metrics = harness.service.metrics().snapshot();
    assert_eq!(metrics.decisions, REQUESTS as u64);
    assert_eq!(metrics.evidence_batch_records, REQUESTS as u64);
    assert!(metrics.evidence_batches <= REQUESTS as u64);
    println!(
        "{} decisions in {} audit chunks; batch-size buckets {:?}",
        metrics.decisions, metrics.evidence_batches, metrics.batch_size_buckets
    );
    harness.stop().await;
}

/// One bad request on its own connection: the status and the reason in the JSON body.
async fn check(
    harness: &Harness,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    status: u16,
    reason: &str,
) {
    let mut client = harness.client().await;
    let method = if path.starts_with("/v1/infer") { "POST" } else { "GET" };
    let response = client.send(method, path, headers, body).await.unwrap();
    let error: ErrorBody = response
        .json()
        .unwrap_or_else(|_| panic!("{path}: body {:?}", String::from_utf8_lossy(&response.body)));
    assert_eq!(
        (response.status, error.error.as_str()),
        (status, reason),
        "{path} {headers:?}: {}",
        error.message
    );
    assert!(!error.message.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_4xx_and_the_service_keeps_serving() {
    const BODY_BYTES_MAX: usize = 64 * 1024;
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 64 * MIB, 8 * MIB);
    let harness = Harness::start(&ring, &directory.path().join("state"), |config| {
        config.body_bytes_max = BODY_BYTES_MAX;
    })
    .await;
    let (_, image) = dataset(9, 1).remove(0);
    let png = encode_png(&image);
    let good = |harness: &Harness| {
        let png = png.clone();
        let address = harness.address;
        async move {
            let mut client = LoopbackClient::connect(address).await.unwrap();
            let response = client.infer(None, "image/png", png).await.unwrap();
            assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
        }
    };
    let small_tensor = InputTensor::new(vec![1, 1, 16, 16], vec![0.0; 256]).unwrap().encode();
    let mut truncated = InputTensor::new(vec![1, 1, 32, 32], vec![0.0; 1024]).unwrap().encode();
    truncated.truncate(100);
    let png_type = [("content-type", "image/png")];
    let long_request_id = "r".repeat(300);
    // (path, headers, body, expected status, expected reason)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("/v1/infer", vec![("content-type", "text/plain")], b"hello".to_vec(), 415, "unsupported_media_type"),
        ("/v1/infer", vec![], png.clone(), 415, "unsupported_media_type"),
        ("/v1/infer", png_type.to_vec(), b"this is not a png".to_vec(), 400, "not_an_image"),
        ("/v1/infer", vec![("content-type", "image/jpeg")], png.clone(), 400, "not_an_image"),
        ("/v1/infer", png_type.to_vec(), png[..png.len() / 2].to_vec(), 400, "not_an_image"),
        (
            "/v1/infer",
            vec![("content-type", inference::TENSOR_CONTENT_TYPE)],
            small_tensor,
            400,
            "shape_mismatch",
        ),
        (
            "/v1/infer",
            vec![("content-type", inference::TENSOR_CONTENT_TYPE)],
            truncated,
            400,
            "malformed_tensor",
        ),
        (
            "/v1/infer",
            vec![("content-type", "application/json")],
            br#"{"shape":[1,1,32,32]}"#.to_vec(),
            400,
            "malformed_tensor",
        ),
        ("/v1/infer?model=nope", png_type.to_vec(), png.clone(), 404, "unknown_model"),
        ("/v1/infer", png_type.to_vec(), vec![0; BODY_BYTES_MAX + 1], 413, "body_too_large"),
        (
            "/v1/infer",
            vec![("content-type", "image/png"), ("x-request-id", long_request_id.as_str())],
            png.clone(),
            400,
            "bad_request",
        ),
        ("/v1/decisions/1-1", vec![], vec![], 404, "unknown_decision"),
        ("/v1/decisions/a.b", vec![], vec![], 400, "bad_request"),
    ];
    for (path, headers, body, status, reason) in cases {
        check(&harness, path, &headers, body, status, reason).await;
        good(&harness).await;
    }
    let metrics = harness.service.metrics().snapshot();
    assert_eq!(metrics.rejected(RejectReason::UnsupportedMediaType), 2);
    assert_eq!(metrics.rejected(RejectReason::NotAnImage), 3);
    assert_eq!(metrics.rejected(RejectReason::ShapeMismatch), 1);
    assert_eq!(metrics.rejected(RejectReason::MalformedTensor), 2);
    assert_eq!(metrics.rejected(RejectReason::UnknownModel), 1);
    assert_eq!(metrics.rejected(RejectReason::BodyTooLarge), 1);
    assert_eq!(metrics.rejected(RejectReason::BadRequest), 1);
    assert_eq!(metrics.decisions, 13);
    // Refused requests leave no evidence.
    assert_eq!(evidence_by_id(&audit_records(&ring)).len(), 13);
    let rendered = harness.service.metrics().render_prometheus();
    assert!(rendered.contains("tributary_inference_rejected_total{reason=\"not_an_image\"} 3"), "{rendered}");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_lane_answers_503_without_deciding_until_the_core_acks() {
    const ATTEMPTS_MAX: usize = 500;
    let directory = tempfile::tempdir().unwrap();
    // 16 MiB ring: chunks up to 512 KiB; the audit lane holds the model record (~265 KB) and a
    // few dozen decisions.
    let ring = open_ring(&directory.path().join("ring"), 16 * MIB, 512 * 1024);
    let harness = Harness::start(&ring, &directory.path().join("state"), |config| {
        config.body_bytes_max = 64 * 1024;
        config.retry_after_seconds = 7;
    })
    .await;
    let images = dataset(5, ATTEMPTS_MAX);
    let mut client = harness.client().await;
    let mut decided = Vec::new();
    let mut refusal = None;
    for (_, image) in &images {
        let response = client.infer(Some("shapes"), "image/png", encode_png(image)).await.unwrap();
        match response.status {
            200 => decided.push(response.json::<InferResponse>().unwrap().decision_id),
            503 => {
                refusal = Some(response);
                break;
            }
            other => panic!("unexpected status {other}: {}", String::from_utf8_lossy(&response.body)),
        }
    }
    let refusal = refusal.expect("the audit lane filled up");
    assert!(!decided.is_empty());
    assert_eq!(refusal.header("retry-after"), Some("7"));
    let error: ErrorBody = refusal.json().unwrap();
    assert_eq!(error.error, "audit_full");
    assert!(error.message.contains("audit lane is full"), "{}", error.message);
    assert!(!String::from_utf8_lossy(&refusal.body).contains("decision_id"));
    // Still full: refused again, and every answered decision — and nothing else — is recorded.
    let response = client.infer(None, "image/png", encode_png(&images[0].1)).await.unwrap();
    assert_eq!(response.status, 503);
    let evidence = evidence_by_id(&audit_records(&ring));
    assert_eq!(evidence.len(), decided.len());
    assert!(decided.iter().all(|id| evidence.contains_key(id)));
    let metrics = harness.service.metrics().snapshot();
    assert_eq!(metrics.unavailable(inference::metrics::UnavailableReason::AuditFull), 2);

    // The sink acknowledges everything: room again, and the API decides again.
    let head = ring.stats().lane(Lane::Audit).next_seq - 1;
    ring.ack(Lane::Audit, head).unwrap();
    let response = client.infer(None, "image/png", encode_png(&images[1].1)).await.unwrap();
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    let answer: InferResponse = response.json().unwrap();
    let records = audit_records(&ring);
    assert_eq!(evidence_by_id(&records).keys().collect::<Vec<_>>(), [&answer.decision_id]);
    // The model record was durable before the ack: it is not sent again.
    assert!(model_records(&records).is_empty());
    // Acknowledged decisions are gone from the ring.
    let response = client.send("GET", &format!("/v1/decisions/{}", decided[0]), &[], vec![]).await.unwrap();
    assert_eq!(response.status, 404);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_can_be_read_back_and_restarts_keep_ids_and_model_records_unique() {
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 64 * MIB, 8 * MIB);
    let state_dir = directory.path().join("state");
    let images = dataset(11, 4);
    let mut ids = Vec::new();
    let mut first_answer = None;
    for start in 0..2 {
        let harness = Harness::start(&ring, &state_dir, |_| {}).await;
        let mut client = harness.client().await;
        for (index, (_, image)) in images.iter().enumerate() {
            let (content_type, body) = request_body(index, image);
            let response = client
                .send(
                    "POST",
                    "/v1/infer",
                    &[("content-type", content_type), ("x-request-id", "caller-7")],
                    body.clone(),
                )
                .await
                .unwrap();
            assert_eq!(response.status, 200);
            let answer: InferResponse = response.json().unwrap();
            ids.push(answer.decision_id.clone());
            first_answer.get_or_insert((answer, content_type, body));
        }
        // The first start's decision is found by the second start too (by scanning the lane).
        let (answer, content_type, body) = first_answer.as_ref().unwrap();
        let response =
            client.send("GET", &format!("/v1/decisions/{}", answer.decision_id), &[], vec![]).await.unwrap();
        assert_eq!(response.status, 200, "start {start}: {}", String::from_utf8_lossy(&response.body));
        let recorded: RecordedDecision = response.json().unwrap();
        assert_eq!(recorded.decision.label, answer.label);
        assert_eq!(recorded.decision.scores, answer.scores);
        assert_eq!(recorded.decision.model_sha256, answer.model_sha256);
        assert_eq!(recorded.decision.request_id.as_deref(), Some("caller-7"));
        assert_eq!(recorded.original.content_type, *content_type);
        assert_eq!(recorded.original.sha256, protocol::evidence::sha256_hex(&sha256(body)));
        assert_eq!(recorded.modified.as_ref().unwrap().content_type, inference::TENSOR_CONTENT_TYPE);
        harness.stop().await;
    }
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "decision ids repeat across restarts: {ids:?}");
    let records = audit_records(&ring);
    assert_eq!(model_records(&records).len(), 1, "the model record travels once across restarts");
    assert_eq!(evidence_by_id(&records).len(), ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_swapped_without_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 64 * MIB, 8 * MIB);
    let harness = Harness::start(&ring, &directory.path().join("state"), |_| {}).await;
    let png = encode_png(&dataset(2, 1)[0].1);
    let mut client = harness.client().await;
    assert_eq!(client.infer(Some("shapes"), "image/png", png.clone()).await.unwrap().status, 200);

    let onnx = std::fs::read(models_dir().join("shapes.onnx")).unwrap();
    let mut spec =
        inference::ModelSpec::from_json(&std::fs::read(models_dir().join("shapes.json")).unwrap()).unwrap();
    spec.name = "shapes-v2".to_string();
    let renamed = inference::Model::from_bytes(onnx, spec).unwrap();
    harness.service.set_models(vec![renamed], None).unwrap();
    let response = client.infer(Some("shapes"), "image/png", png.clone()).await.unwrap();
    assert_eq!(response.status, 404);
    assert!(response.json::<ErrorBody>().unwrap().message.contains("shapes-v2"));
    for model in [Some("shapes-v2"), None] {
        let response = client.infer(model, "image/png", png.clone()).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.json::<InferResponse>().unwrap().model_name, "shapes-v2");
    }
    // A refused swap keeps what is served.
    assert!(harness.service.set_models(vec![], Some("missing".to_string())).is_err());
    assert_eq!(harness.service.models().names(), ["shapes-v2"]);
    // Back to the file on disk.
    harness.service.reload_models(&[shapes_source()], Some("shapes".to_string())).unwrap();
    assert_eq!(client.infer(None, "image/png", png).await.unwrap().status, 200);
    harness.stop().await;
}

// Hostile clients (issue 15): connection caps, timeouts and decode bounds. Limits are set small
// in the config; the tests assert what happens (closed, refused, 4xx), never how fast.

/// How long a test waits for something that must happen; far above every configured timeout.
const EVENTUALLY: std::time::Duration = std::time::Duration::from_secs(20);

/// Polls `condition` until it holds; fails the test after `EVENTUALLY`.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Everything the server sends until it closes the connection (bounded by `EVENTUALLY`).
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(EVENTUALLY, stream.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the server kept the connection open; it sent {:?}",
        String::from_utf8_lossy(&answer)
    );
    String::from_utf8_lossy(&answer).into_owned()
}

/// A connection that sends request headers one byte per `interval` and never finishes them.
/// Resolves to true once the server closes it, false if it is still open after `EVENTUALLY`.
async fn slowloris(address: SocketAddr, interval: std::time::Duration) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let headers = b"POST /v1/infer HTTP/1.1\r\nhost: appliance\r\ncontent-type: image/png\r\nx-padding: ";
    let trickle = async move {
        for &byte in headers.iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    };
    let closed = async move {
        let mut buffer = [0u8; 1024];
        // Any answer or end of stream means the server let go of the connection.
        while let Ok(read) = reader.read(&mut buffer).await {
            if read == 0 {
                return;
            }
        }
    };
    tokio::select! {
        () = closed => true,
        () = trickle => true,
        _ = tokio::time::sleep(EVENTUALLY) => false,
    }
}

fn small_limits(config: &mut InferenceConfig) {
    config.http = inference::http_server::HttpLimits {
        connections_max: 1,
        connections_queued_max: 0,
        header_timeout: std::time::Duration::from_millis(300),
        body_timeout: std::time::Duration::from_millis(300),
        // Far longer than the trickle's interval: only the header and body timeouts can fire.
        idle_timeout: std::time::Duration::from_secs(10),
    };
}

/// Sends one good PNG until it is decided, retrying while the only slot is taken (503).
async fn decide_eventually(harness: &Harness) -> InferResponse {
    let png = encode_png(&dataset(3, 1).remove(0).1);
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "a well-behaved client was never served");
        if let Ok(mut client) = LoopbackClient::connect(harness.address).await
            && let Ok(response) = client.infer(Some("shapes"), "image/png", png.clone()).await
        {
            match response.status {
                200 => return response.json().unwrap(),
                503 => {}
                status => panic!("unexpected {status}: {}", String::from_utf8_lossy(&response.body)),
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_and_does_not_block_a_well_behaved_one() {
    use inference::http_server::ConnectionEvent;
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 64 * MIB, 8 * MIB);
    let harness = Harness::start(&ring, &directory.path().join("state"), small_limits).await;
    let slow = tokio::spawn(slowloris(harness.address, std::time::Duration::from_millis(20)));
    let metrics = harness.service.metrics().clone();
    wait_until("the slow client holds the only slot", || {
        metrics.snapshot().connections(ConnectionEvent::Accepted) == 1
    })
    .await;
    // The only slot is taken: a well-behaved client is turned away until the slow one is cut
    // off by the header timeout, then served.
    let answer = decide_eventually(&harness).await;
    assert!(harness.service.models().get(None).unwrap().labels().contains(&answer.label));
    assert!(slow.await.unwrap(), "the slow client was never cut off");
    let snapshot = metrics.snapshot();
    assert_eq!(snapshot.connections(ConnectionEvent::HeaderTimeout), 1, "{snapshot:?}");
    assert_eq!(snapshot.decisions, 1);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_and_are_counted_then_a_freed_slot_serves_again() {
    use inference::http_server::ConnectionEvent;
    use tokio::io::AsyncWriteExt as _;
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 64 * MIB, 8 * MIB);
    let harness = Harness::start(&ring, &directory.path().join("state"), |config| {
        small_limits(config);
        config.http.connections_queued_max = 1;
        config.http.header_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let metrics = harness.service.metrics().clone();
    let mut holder = tokio::net::TcpStream::connect(harness.address).await.unwrap();
    holder.write_all(b"POST /v1/infer HTTP/1.1\r\n").await.unwrap();
    wait_until("the first client is served", || {
        metrics.snapshot().connections(ConnectionEvent::Accepted) == 1
    })
    .await;
    let mut queued = tokio::net::TcpStream::connect(harness.address).await.unwrap();
    wait_until("the second client is queued", || {
        metrics.snapshot().connections(ConnectionEvent::Queued) == 1
    })
    .await;
    let mut refused = tokio::net::TcpStream::connect(harness.address).await.unwrap();
    let answer = read_until_closed(&mut refused).await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert_eq!(metrics.snapshot().connections(ConnectionEvent::Refused), 1);
    // The queued client gets the slot once the first one leaves.
    drop(holder);
    wait_until("the queued client is served", || {
        metrics.snapshot().connections(ConnectionEvent::Accepted) == 2
    })
    .await;
    queued
        .write_all(b"GET /v1/decisions/none HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut queued).await;
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    harness.stop().await;
}

/// The standard CRC-32 of PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffff_u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// `png` with the size in its IHDR chunk replaced (and the chunk's CRC fixed).
fn png_declaring(mut png: Vec<u8>, width: u32, height: u32) -> Vec<u8> {
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// `jpeg` with the size in its baseline frame header (SOF0) replaced.
fn jpeg_declaring(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let sof = jpeg.windows(2).position(|pair| pair == [0xff, 0xc0]).expect("a baseline JPEG");
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_larger_than_the_model_needs_are_refused_from_their_header() {
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 64 * MIB, 8 * MIB);
    let harness = Harness::start(&ring, &directory.path().join("state"), |_| {}).await;
    let image = dataset(4, 1).remove(0).1;
    // A few hundred bytes declaring 3.6 gigapixels: refused before any pixel buffer exists.
    let huge_png = png_declaring(encode_png(&image), 60_000, 60_000);
    let huge_jpeg = jpeg_declaring(encode_jpeg(&image, 85), 60_000, 60_000);
    // A real image, 1000×1000 of one grey (about 1 KiB compressed): over the default bound of
    // 8 × the model's 32×32 input a side, so it is not decoded either.
    let mut flat_png = Vec::new();
    image::GrayImage::from_pixel(1000, 1000, image::Luma([128]))
        .write_to(&mut std::io::Cursor::new(&mut flat_png), image::ImageFormat::Png)
        .unwrap();
    for (content_type, body) in [("image/png", huge_png), ("image/jpeg", huge_jpeg), ("image/png", flat_png)]
    {
        check(&harness, "/v1/infer", &[("content-type", content_type)], body, 413, "image_too_large").await;
    }
    // At the bound, an image is taken.
    let mut bound_png = Vec::new();
    image::imageops::resize(&image, 256, 256, image::imageops::FilterType::Nearest)
        .write_to(&mut std::io::Cursor::new(&mut bound_png), image::ImageFormat::Png)
        .unwrap();
    let response = harness.client().await.infer(None, "image/png", bound_png).await.unwrap();
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    let metrics = harness.service.metrics().snapshot();
    assert_eq!(metrics.rejected(RejectReason::ImageTooLarge), 3);
    assert_eq!(metrics.decodes_in_progress, 0);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_follows_the_model_and_a_trickled_body_gets_408() {
    use tokio::io::AsyncWriteExt as _;
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 64 * MIB, 8 * MIB);
    let harness = Harness::start(&ring, &directory.path().join("state"), small_limits).await;
    // The configured body_bytes_max is 1 MiB, but the 32×32 model needs at most a 256×256 RGBA
    // image and its container: 320 KiB.
    let limit = inference::input::body_bytes_max_for_model(&[1, 1, 32, 32], 8);
    assert_eq!(limit, 256 * 256 * 4 + 64 * 1024);
    check(&harness, "/v1/infer", &[("content-type", "image/png")], vec![0; limit + 1], 413, "body_too_large")
        .await;
    // A body that trickles in is cut off by the body timeout (the idle timeout is far longer).
    let mut stream = tokio::net::TcpStream::connect(harness.address).await.unwrap();
    stream
        .write_all(b"POST /v1/infer HTTP/1.1\r\nhost: a\r\ncontent-type: image/png\r\ncontent-length: 100000\r\n\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        while writer.write_all(b"x").await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let mut answer = Vec::new();
    let read =
        tokio::time::timeout(EVENTUALLY, tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut answer))
            .await;
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "the trickled body was never cut off; got {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(harness.service.metrics().snapshot().rejected(RejectReason::BodyTimeout), 1);
    harness.stop().await;
}

/// Many clients at once with `decodes_max` = 1: every request is decided, and never more than one
/// input was being decoded at a time (the peak gauge), however the requests overlapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_decode_more_than_decodes_max_at_once() {
    const CLIENTS: usize = 8;
    const REQUESTS_PER_CLIENT: usize = 12;
    let directory = tempfile::tempdir().unwrap();
    let ring = open_ring(&directory.path().join("ring"), 64 * MIB, 32 * MIB);
    let harness =
        Harness::start(&ring, &directory.path().join("state"), |config| config.decodes_max = 1).await;
    let images = Arc::new(dataset(7, CLIENTS * REQUESTS_PER_CLIENT));
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        let mut client = harness.client().await;
        let images = images.clone();
        tasks.push(tokio::spawn(async move {
            for request in 0..REQUESTS_PER_CLIENT {
                let index = client_index * REQUESTS_PER_CLIENT + request;
                let (content_type, body) = request_body(index, &images[index].1);
                let response = client.infer(None, content_type, body).await.unwrap();
                assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let snapshot = harness.service.metrics().snapshot();
    assert_eq!(snapshot.decisions, (CLIENTS * REQUESTS_PER_CLIENT) as u64);
    assert_eq!(snapshot.decodes_in_progress_peak, 1, "{snapshot:?}");
    assert_eq!(snapshot.decodes_in_progress, 0);
    println!("{} of {} requests waited for the decode slot", snapshot.decodes_waited, snapshot.decisions);
    harness.stop().await;
}
