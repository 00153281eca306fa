//! Onboarding end to end against a real Mosquitto (Debian package), started by each test on a
//! free loopback port with TLS, client certificates and the shipped ACL file.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use onboarding::cli::{ConfigCommand, FleetCommand};
use onboarding::messages::OnboardingRequest;
use onboarding::{
    Authority, DeviceAgent, DeviceAgentConfig, DeviceState, DeviceStatus, OnboardingError,
    OnboardingResponse, Registry, RejectionCode, topics,
};
use protocol::Lane;
use support::{Capture, TestFleet, WAIT, free_udp_port, open_ring, produce, uplink_config, wait_until};

const DEVICES: usize = 20;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRIBUTARY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn start_authority(fleet: &TestFleet, sink: std::net::SocketAddr) -> Authority {
    let mut authority = Authority::start(fleet.authority_config(sink), &fleet.ca, &fleet.revocation_file())
        .expect("authority");
    assert!(authority.wait_ready(WAIT).await, "authority did not subscribe: {}", fleet.broker.log_text());
    authority
}

/// Streams one chunk and waits until the sink acknowledged it; returns whether it did.
async fn stream_once(uplink: &appliance::Uplink, ring: &buffer::Ring, device_id: &str, first: u64) -> bool {
    let seq = produce(ring, device_id, first, 10);
    let metrics = uplink.metrics();
    wait_until(WAIT, || metrics.acked_through(Lane::Sensor) >= seq).await
}

/// Twenty devices onboard at once through the sink's `[onboarding]` hook, each key file is 0600,
/// no private key crosses the broker, a device with a certificate skips onboarding, and every
/// device streams over QUIC with its new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_devices_onboard_concurrently_then_stream_over_quic() {
    init_tracing();
    let fleet = TestFleet::new();
    let (capture, _observer) = Capture::start(&fleet).await;
    let mut sink_config = fleet.sink_config(free_udp_port());
    sink_config.onboarding = Some(fleet.authority_config(sink_config.listen));
    let sink = core_sink::Sink::start(sink_config).await.expect("sink with onboarding");
    let registry = Registry::open(&fleet.path().join("registry")).expect("registry");
    let tokens =
        registry.create_tokens(DEVICES as u32, Duration::from_secs(3600), now_unix_ms()).expect("tokens");

    let started = Instant::now();
    let mut onboarding = tokio::task::JoinSet::new();
    for (index, token) in tokens.into_iter().enumerate() {
        let config = fleet.onboarding_config(&format!("dev-{index:02}"), Some(token));
        onboarding.spawn(async move { onboarding::ensure_identity(&config).await });
    }
    let mut identities = Vec::new();
    while let Some(result) = onboarding.join_next().await {
        identities.push(result.expect("task").expect("onboarding"));
    }
    let elapsed = started.elapsed();
    eprintln!("onboarded {DEVICES} devices concurrently in {} ms", elapsed.as_millis());
    identities.sort_by(|left, right| left.device_id.cmp(&right.device_id));

    for identity in &identities {
        let key = identity.identity_dir.join(fleet::KEY_FILE);
        let mode = std::fs::metadata(&key).expect("key file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
        assert_eq!(identity.certificate.device_id().expect("device id"), identity.device_id);
        assert_eq!(identity.config.values.get("log_level").map(String::as_str), Some("info"));
        // The private key's body never crossed the broker.
        let key_body: String =
            identity.certificate.private_key_pem.lines().filter(|line| !line.starts_with("-----")).collect();
        assert!(
            !capture.contains(key_body.as_bytes()),
            "{}: private key seen at the broker",
            identity.device_id
        );
        let record = registry.device(&identity.device_id).expect("read").expect("registered");
        assert_eq!(record.state, DeviceState::Active);
    }
    assert!(!capture.contains(b"PRIVATE KEY"), "a private key was published");
    assert!(capture.on_topic(&topics::response("dev-07")) >= 1, "answers travel through the broker");

    // A device with a certificate does not ask again: this broker address cannot be reached.
    let mut offline = fleet.onboarding_config("dev-00", None);
    offline.broker.port = 1;
    let again = onboarding::ensure_identity(&offline).await.expect("skips onboarding");
    assert_eq!(again.certificate.certificate_pem, identities[0].certificate.certificate_pem);

    let mut uplinks = Vec::new();
    for identity in &identities {
        let ring = open_ring(&fleet, &identity.device_id);
        let uplink = appliance::Uplink::spawn(ring.clone(), uplink_config(identity)).expect("uplink");
        uplinks.push((uplink, ring, identity.device_id.clone()));
    }
    for (uplink, ring, device_id) in &uplinks {
        assert!(stream_once(uplink, ring, device_id, 0).await, "{device_id}: no ack from the sink");
        assert!(sink.durable_through(device_id, Lane::Sensor) >= 1, "{device_id}");
    }
    for (uplink, _, _) in uplinks {
        uplink.stop().await;
    }
    sink.shutdown().await;
}

/// Sends a raw request as the claim identity and returns the authority's answer.
async fn ask_raw(fleet: &TestFleet, client_id: &str, payload: Vec<u8>) -> OnboardingResponse {
    let mut session = fleet.claim_session(client_id);
    assert!(session.wait_ready(WAIT).await, "claim session did not subscribe");
    onboarding::mqtt::publish(&session.client, topics::request(client_id), false, payload)
        .await
        .expect("publish");
    let message =
        tokio::time::timeout(WAIT, session.incoming.recv()).await.expect("an answer").expect("open");
    session.close().await;
    serde_json::from_slice(&message.payload).expect("a response")
}

fn request(device_id: &str, token: Option<&str>, csr_pem: String) -> Vec<u8> {
    serde_json::to_vec(&OnboardingRequest {
        device_id: device_id.to_owned(),
        claim_token: token.map(str::to_owned),
        csr_pem,
    })
    .expect("request")
}

fn csr(device_id: &str) -> String {
    fleet::csr::generate_device_key_and_csr(device_id).expect("csr").0
}

/// A CSR whose signature does not verify: one byte of the signature flipped.
fn csr_with_bad_signature(device_id: &str) -> String {
    let pem = csr(device_id);
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|der: rustls_pki_types::CertificateSigningRequestDer<'static>| der.as_ref().to_vec())
        .expect("csr der");
    let mut der = der;
    let last = der.len() - 1;
    der[last] ^= 0x01;
    support::pem("CERTIFICATE REQUEST", &der)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// Each bad request is refused with its reason, and no certificate is issued for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_their_reason_and_no_certificate() {
    init_tracing();
    let fleet = TestFleet::new();
    let (capture, _observer) = Capture::start(&fleet).await;
    let authority = start_authority(&fleet, free_udp_port()).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(4, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let expired = registry.create_tokens(1, Duration::from_secs(1), now_unix_ms() - 60_000).expect("expired")
        [0]
    .clone();
    // The owner of a token and an id: onboarded properly.
    onboarding::ensure_identity(&fleet.onboarding_config("owner", Some(tokens[0].clone())))
        .await
        .expect("owner");

    struct Case {
        name: &'static str,
        client_id: &'static str,
        payload: Vec<u8>,
        expected: RejectionCode,
    }
    let cases = vec![
        Case {
            name: "reused token",
            client_id: "reuser",
            payload: request("reuser", Some(&tokens[0]), csr("reuser")),
            expected: RejectionCode::TokenUsed,
        },
        Case {
            name: "expired token",
            client_id: "late",
            payload: request("late", Some(&expired), csr("late")),
            expected: RejectionCode::ExpiredToken,
        },
        Case {
            name: "forged token",
            client_id: "forger",
            payload: request("forger", Some(&"ab".repeat(32)), csr("forger")),
            expected: RejectionCode::UnknownToken,
        },
        Case {
            name: "no token without approval mode",
            client_id: "tokenless",
            payload: request("tokenless", None, csr("tokenless")),
            expected: RejectionCode::MissingToken,
        },
        Case {
            name: "CSR with a bad signature",
            client_id: "badsig",
            payload: request("badsig", Some(&tokens[1]), csr_with_bad_signature("badsig")),
            expected: RejectionCode::CsrBadSignature,
        },
        Case {
            name: "CSR for another device's id",
            client_id: "owner",
            payload: request("owner", Some(&tokens[1]), csr("owner")),
            expected: RejectionCode::DeviceIdTaken,
        },
        Case {
            name: "CSR subject is not the device asked for",
            client_id: "thief",
            payload: request("thief", Some(&tokens[1]), csr("owner")),
            expected: RejectionCode::CsrSubjectMismatch,
        },
        Case {
            name: "payload names another device than the topic",
            client_id: "topic",
            payload: request("owner", Some(&tokens[1]), csr("owner")),
            expected: RejectionCode::TopicMismatch,
        },
        Case {
            name: "reserved id",
            client_id: "claim",
            payload: request("claim", Some(&tokens[1]), csr("claim")),
            expected: RejectionCode::ReservedDeviceId,
        },
        Case {
            name: "oversized payload",
            client_id: "big",
            payload: vec![b'x'; onboarding::PAYLOAD_BYTES_MAX + 1],
            expected: RejectionCode::PayloadTooLarge,
        },
        Case {
            name: "not JSON",
            client_id: "garbage",
            payload: b"\x00\x01 definitely not json".to_vec(),
            expected: RejectionCode::MalformedPayload,
        },
        Case {
            name: "not a CSR",
            client_id: "nocsr",
            payload: request(
                "nocsr",
                Some(&tokens[1]),
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_owned(),
            ),
            expected: RejectionCode::CsrMalformed,
        },
    ];
    for case in cases {
        match ask_raw(&fleet, case.client_id, case.payload).await {
            OnboardingResponse::Rejected { code, message } => {
                assert_eq!(code, case.expected, "{}: {message}", case.name);
                assert!(!message.is_empty(), "{}", case.name);
            }
            other => panic!("{}: expected a rejection, got {other:?}", case.name),
        }
        let record = registry.device(case.client_id).expect("read");
        if case.client_id != "owner" {
            assert!(
                record.is_none_or(|record| record.certificate_pem.is_none()),
                "{}: a certificate was issued",
                case.name
            );
        }
    }
    let owner = registry.device("owner").expect("read").expect("owner");
    assert_eq!(
        owner.token_hash,
        Some(onboarding::registry::sha256_hex(tokens[0].as_bytes())),
        "owner unchanged"
    );
    // The token offered with every refused CSR was not consumed by the refusals.
    match ask_raw(&fleet, "fresh", request("fresh", Some(&tokens[1]), csr("fresh"))).await {
        OnboardingResponse::Accepted { .. } => {}
        other => panic!("a refused request must not consume the token: {other:?}"),
    }
    // Only two certificates were ever sent: the owner's and the fresh device's.
    let accepted = capture
        .snapshot()
        .iter()
        .filter(|(topic, payload)| {
            topic.contains("/response/") && payload.starts_with(b"{\"status\":\"accepted\"")
        })
        .count();
    assert_eq!(accepted, 2);
    authority.shutdown().await;
}

/// The ACL keeps a device to its own topics: what it publishes on another device's topics is
/// not delivered, and it receives nothing from another device's topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_keeps_a_device_to_its_own_topics() {
    init_tracing();
    let fleet = TestFleet::new();
    let (capture, _observer) = Capture::start(&fleet).await;
    let authority = start_authority(&fleet, free_udp_port()).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(2, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let alice = onboarding::ensure_identity(&fleet.onboarding_config("alice", Some(tokens[0].clone())))
        .await
        .expect("alice");
    let bob = onboarding::ensure_identity(&fleet.onboarding_config("bob", Some(tokens[1].clone())))
        .await
        .expect("bob");

    // Alice tries Bob's topics (and everything), with her own certificate.
    let mut intruder = fleet.session_with(
        &alice.certificate,
        "alice",
        &[
            topics::config("alice"),
            topics::config("bob"),
            topics::response("bob"),
            topics::heartbeat("bob"),
            "tributary/#".to_owned(),
        ],
    );
    assert!(intruder.wait_ready(WAIT).await, "alice's session did not connect");
    let heartbeat = onboarding::Heartbeat { version: "forged-by-alice".to_owned(), ..Default::default() };
    let forged = serde_json::to_vec(&heartbeat).expect("heartbeat");
    let forged = forged.as_slice();
    onboarding::mqtt::publish(&intruder.client, topics::heartbeat("bob"), false, forged.to_vec())
        .await
        .expect("publish");
    onboarding::mqtt::publish(&intruder.client, topics::config("bob"), true, b"{}".to_vec())
        .await
        .expect("publish");
    // Control: her own heartbeat, published after, does arrive at the observer.
    let own = String::from_utf8_lossy(forged).replace("forged-by-alice", "alice-own");
    onboarding::mqtt::publish(&intruder.client, topics::heartbeat("alice"), false, own.into_bytes())
        .await
        .expect("publish");
    assert!(
        wait_until(WAIT, || capture.contains(b"alice-own")).await,
        "control heartbeat not delivered: {}",
        fleet.broker.log_text()
    );
    assert!(!capture.contains(b"forged-by-alice"), "a heartbeat on bob's topic was delivered");
    assert!(
        capture.snapshot().iter().all(|(topic, payload)| topic != &topics::config("bob") || payload != b"{}"),
        "alice's config for bob was delivered"
    );

    // Bob's config changes and is delivered to Bob (his agent acks it); Alice gets nothing of it.
    let bob_agent =
        DeviceAgent::start(DeviceAgentConfig::new(fleet.broker.endpoint()), &bob).expect("bob agent");
    registry.set_config("bob", "secret_setting", "bob-only").expect("set");
    assert!(
        wait_until(WAIT, || registry.device("bob").expect("read").expect("bob").config_acked_version == 2)
            .await,
        "bob did not acknowledge his config"
    );
    // Control: a config for Alice, published after Bob's, reaches her.
    registry.set_config("alice", "note", "alice-only").expect("set");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut received = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, intruder.incoming.recv()).await {
        let done = message.payload.windows(10).any(|window| window == b"alice-only");
        received.push(message.topic.clone());
        if done {
            break;
        }
    }
    assert!(received.iter().all(|topic| topic == &topics::config("alice")), "alice received {received:?}");
    assert!(!received.is_empty(), "control: alice's own config did not arrive");
    let bob_record = registry.device("bob").expect("read").expect("bob");
    assert!(bob_record.last_heartbeat.is_none_or(|heartbeat| heartbeat.version != "forged-by-alice"));
    bob_agent.shutdown().await;
    intruder.close().await;
    authority.shutdown().await;
}

/// Revocation: a streaming device is cut off and cannot reconnect; it cannot onboard again, with
/// its old token or a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_is_cut_off_and_cannot_onboard_again() {
    init_tracing();
    let fleet = TestFleet::new();
    let sink = core_sink::Sink::start(fleet.sink_config(free_udp_port())).await.expect("sink");
    let authority = start_authority(&fleet, sink.local_addr()).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(2, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let identity = onboarding::ensure_identity(&fleet.onboarding_config("doomed", Some(tokens[0].clone())))
        .await
        .expect("onboard");
    let ring = open_ring(&fleet, "doomed");
    let uplink = appliance::Uplink::spawn(ring.clone(), uplink_config(&identity)).expect("uplink");
    assert!(stream_once(&uplink, &ring, "doomed", 0).await, "streams before the revocation");

    let printed = onboarding::cli::run(
        FleetCommand::Revoke { device: "doomed".to_owned() },
        &fleet.authority_config(sink.local_addr()),
        &fleet.path().join("ca"),
        &fleet.revocation_file(),
    )
    .expect("revoke");
    assert!(printed.contains("revoked"));
    let metrics = uplink.metrics();
    let ended = metrics.sessions_ended.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        wait_until(WAIT, || metrics.sessions_ended.load(std::sync::atomic::Ordering::Relaxed) > ended).await,
        "the sink did not cut the revoked device off"
    );
    let acked = metrics.acked_through(Lane::Sensor);
    let attempts = || {
        metrics.connect_failures.load(std::sync::atomic::Ordering::Relaxed)
            + metrics.sessions_ended.load(std::sync::atomic::Ordering::Relaxed)
    };
    let failures = attempts();
    produce(&ring, "doomed", 10, 10);
    assert!(
        wait_until(WAIT, || attempts() >= failures + 3).await,
        "the revoked device should keep failing to reconnect"
    );
    assert_eq!(metrics.acked_through(Lane::Sensor), acked, "nothing more was accepted");
    assert_eq!(sink.durable_through("doomed", Lane::Sensor), acked);
    assert_eq!(registry.device("doomed").expect("read").expect("record").state, DeviceState::Revoked);

    for token in [&tokens[0], &tokens[1]] {
        let mut config = fleet.onboarding_config("doomed", Some(token.clone()));
        config.identity_dir = fleet.path().join("devices").join(format!("doomed-again-{}", &token[..8]));
        match onboarding::ensure_identity(&config).await {
            Err(OnboardingError::Rejected { code, .. }) => assert_eq!(code, RejectionCode::DeviceRevoked),
            other => panic!("a revoked device onboarded again: {other:?}"),
        }
    }
    uplink.stop().await;
    authority.shutdown().await;
    sink.shutdown().await;
}

/// Remote config: set with the CLI, delivered over MQTT, applied without restart, acknowledged,
/// reported by heartbeats, and still in force after the agent restarts. `fleet list` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_config_is_applied_reported_and_survives_restart() {
    init_tracing();
    let fleet = TestFleet::new();
    let authority = start_authority(&fleet, free_udp_port()).await;
    let registry = authority.registry().clone();
    let token =
        registry.create_tokens(1, Duration::from_secs(3600), now_unix_ms()).expect("tokens").remove(0);
    let identity =
        onboarding::ensure_identity(&fleet.onboarding_config("cfg", Some(token))).await.expect("onboard");
    let mut agent_config = DeviceAgentConfig::new(fleet.broker.endpoint());
    agent_config.heartbeat_interval_ms = 100;
    let agent = DeviceAgent::start(agent_config.clone(), &identity).expect("agent");
    agent.report(DeviceStatus {
        version: "1.2.3".to_owned(),
        uptime_seconds: 42,
        ring_fill_percent_per_lane: [("sensor".to_owned(), 12.5)].into(),
        uplink_lag_chunks: 7,
        last_ack_unix_ms: Some(1),
    });
    let mut applied = agent.config();
    onboarding::cli::run(
        FleetCommand::Config {
            command: ConfigCommand::Set {
                device: "cfg".to_owned(),
                assignments: vec!["sample_rate_hz=50".to_owned(), "heartbeat_interval_ms=150".to_owned()],
            },
        },
        &fleet.authority_config(free_udp_port()),
        &fleet.path().join("ca"),
        &fleet.revocation_file(),
    )
    .expect("config set");
    let version = registry.device("cfg").expect("read").expect("cfg").config.version;
    assert_eq!(version, 3, "two changes on top of the initial config");
    tokio::time::timeout(WAIT, applied.wait_for(|config| config.version == version))
        .await
        .expect("applied")
        .expect("open");
    assert_eq!(applied.borrow().values.get("sample_rate_hz").map(String::as_str), Some("50"));
    let reported = || {
        registry.device("cfg").expect("read").expect("cfg").last_heartbeat.is_some_and(|heartbeat| {
            heartbeat.config_version == version
                && heartbeat.version == "1.2.3"
                && heartbeat.uplink_lag_chunks == 7
        })
    };
    assert!(wait_until(WAIT, reported).await, "heartbeat does not report the new config");
    assert!(
        wait_until(WAIT, || registry.device("cfg").expect("read").expect("cfg").config_acked_version
            == version)
        .await
    );
    let listing = onboarding::cli::list(&registry).expect("list");
    let line = listing.lines().find(|line| line.starts_with("cfg ")).expect("cfg listed");
    assert!(line.contains("active") && line.contains("1.2.3") && line.contains("sensor=12"), "{line}");

    // Restart: the persisted config is in force from the start, before any message arrives.
    agent.shutdown().await;
    let restarted_identity =
        onboarding::load_identity(&identity.identity_dir, "cfg").expect("load").expect("identity");
    assert_eq!(restarted_identity.config.version, version);
    let agent = DeviceAgent::start(agent_config, &restarted_identity).expect("agent again");
    assert_eq!(agent.config().borrow().values.get("sample_rate_hz").map(String::as_str), Some("50"));
    agent.shutdown().await;
    authority.shutdown().await;
}

/// Operator approval mode: a request without a token waits until `fleet approve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_approval_onboards_a_device_without_token() {
    init_tracing();
    let fleet = TestFleet::new();
    let mut config = fleet.authority_config(free_udp_port());
    config.allow_operator_approval = true;
    let mut authority =
        Authority::start(config.clone(), &fleet.ca, &fleet.revocation_file()).expect("authority");
    assert!(authority.wait_ready(WAIT).await);
    let registry = authority.registry().clone();
    let mut device = fleet.onboarding_config("approved", None);
    device.response_timeout_ms = 300;
    let onboarding = tokio::spawn(async move { onboarding::ensure_identity(&device).await });
    assert!(
        wait_until(WAIT, || registry.device("approved").expect("read").is_some_and(|record| record.state
            == DeviceState::Pending
            && record.pending_key_sha256.is_some()))
        .await,
        "the request did not become pending"
    );
    onboarding::cli::run(
        FleetCommand::Approve { device: "approved".to_owned() },
        &config,
        &fleet.path().join("ca"),
        &fleet.revocation_file(),
    )
    .expect("approve");
    let identity =
        tokio::time::timeout(WAIT, onboarding).await.expect("in time").expect("task").expect("onboarded");
    assert_eq!(identity.certificate.device_id().expect("id"), "approved");
    authority.shutdown().await;
}
