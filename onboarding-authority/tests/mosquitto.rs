//! Onboarding end to end against a real Mosquitto (Debian package), started by each test on a
//! free loopback port with TLS, client certificates and the shipped ACL file.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fleet::Validity;

use onboarding::messages::OnboardingRequest;
use onboarding::{
    DeviceAgent, DeviceAgentConfig, DeviceStatus, OnboardingError, OnboardingResponse, RejectionCode, topics,
};
use onboarding_authority::cli::{ConfigCommand, FleetCommand};
use onboarding_authority::{DeviceState, Registry};
use protocol::Lane;
use support::{
    Capture, TestFleet, WAIT, free_udp_port, init_tracing, now_unix_ms, open_ring, produce, stream_once,
    uplink_config, wait_until,
};

const DEVICES: usize = 20;

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
    let dev_07_key = fingerprint_of_key_pem(&identities[7].certificate.private_key_pem);
    assert!(capture.on_topic(&topics::response(&dev_07_key)) >= 1, "answers travel through the broker");

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

/// Sends a raw request as the claim identity on the topic of `key` (a key fingerprint; also the
/// client id, as the ACL requires) and returns the authority's answer.
async fn ask_raw(fleet: &TestFleet, key: &str, payload: Vec<u8>) -> OnboardingResponse {
    let mut session = fleet.claim_session(key);
    assert!(session.wait_ready(WAIT).await, "claim session did not subscribe");
    onboarding::mqtt::publish(&session.client, topics::request(key), false, payload).await.expect("publish");
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

/// A device key: its CSR for a device id and its fingerprint (the onboarding topic segment).
struct Key {
    csr_pem: String,
    sha256: String,
}

fn key(device_id: &str) -> Key {
    let (csr_pem, key_pem) = fleet::csr::generate_device_key_and_csr(device_id).expect("csr");
    Key { csr_pem, sha256: fingerprint_of_key_pem(&key_pem) }
}

fn fingerprint_of_key_pem(key_pem: &str) -> String {
    topics::key_fingerprint(&fleet::csr::subject_public_key_info_of_key_pem(key_pem).expect("key"))
}

/// A CSR whose signature does not verify (one byte of the signature flipped), with the
/// fingerprint of the key it names.
fn csr_with_bad_signature(device_id: &str) -> Key {
    let Key { csr_pem, sha256 } = key(device_id);
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(csr_pem.as_bytes())
        .map(|der: rustls_pki_types::CertificateSigningRequestDer<'static>| der.as_ref().to_vec())
        .expect("csr der");
    let mut der = der;
    let last = der.len() - 1;
    der[last] ^= 0x01;
    Key { csr_pem: support::pem("CERTIFICATE REQUEST", &der), sha256 }
}

fn certificate_of(response: &OnboardingResponse) -> &str {
    match response {
        OnboardingResponse::Accepted { certificate_pem, .. } => certificate_pem,
        other => panic!("expected a certificate, got {other:?}"),
    }
}

fn rejection_of(response: OnboardingResponse) -> RejectionCode {
    match response {
        OnboardingResponse::Rejected { code, message } => {
            assert!(!message.is_empty(), "{code}: a rejection says why");
            code
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Each bad request is refused with its reason, and no certificate is issued for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_their_reason_and_no_certificate() {
    init_tracing();
    let fleet = TestFleet::new();
    let (capture, _observer) = Capture::start(&fleet).await;
    let authority = fleet.start_authority(fleet.authority_config(free_udp_port())).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(4, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let expired = registry.create_tokens(1, Duration::from_secs(1), now_unix_ms() - 60_000).expect("expired")
        [0]
    .clone();
    // The owner of a token and an id: onboarded properly.
    fleet.onboard("owner", &tokens[0]).await;

    struct Case {
        name: &'static str,
        device_id: &'static str,
        /// The topic segment (and client id) the request is sent on.
        topic_key: String,
        payload: Vec<u8>,
        expected: RejectionCode,
    }
    let case = |name, device_id: &'static str, token: Option<&str>, expected| {
        let Key { csr_pem, sha256 } = key(device_id);
        Case { name, device_id, topic_key: sha256, payload: request(device_id, token, csr_pem), expected }
    };
    let bad_signature = csr_with_bad_signature("badsig");
    let stranger = key("topic");
    let cases = vec![
        case("reused token", "reuser", Some(&tokens[0]), RejectionCode::TokenUsed),
        case("expired token", "late", Some(&expired), RejectionCode::ExpiredToken),
        case("forged token", "forger", Some(&"ab".repeat(32)), RejectionCode::UnknownToken),
        case("no token without approval mode", "tokenless", None, RejectionCode::MissingToken),
        Case {
            name: "CSR with a bad signature",
            device_id: "badsig",
            topic_key: bad_signature.sha256.clone(),
            payload: request("badsig", Some(&tokens[1]), bad_signature.csr_pem.clone()),
            expected: RejectionCode::CsrBadSignature,
        },
        case("CSR for another device's id", "owner", Some(&tokens[1]), RejectionCode::DeviceIdTaken),
        Case {
            name: "CSR subject is not the device asked for",
            device_id: "thief",
            topic_key: stranger.sha256.clone(),
            payload: request("thief", Some(&tokens[1]), stranger.csr_pem.clone()),
            expected: RejectionCode::CsrSubjectMismatch,
        },
        Case {
            name: "topic is not the fingerprint of the CSR's key",
            device_id: "topic",
            topic_key: key("topic").sha256,
            payload: request("topic", Some(&tokens[1]), stranger.csr_pem.clone()),
            expected: RejectionCode::TopicMismatch,
        },
        case("reserved id", "claim", Some(&tokens[1]), RejectionCode::ReservedDeviceId),
        Case {
            name: "oversized payload",
            device_id: "big",
            topic_key: key("big").sha256,
            payload: vec![b'x'; onboarding::PAYLOAD_BYTES_MAX + 1],
            expected: RejectionCode::PayloadTooLarge,
        },
        Case {
            name: "not JSON",
            device_id: "garbage",
            topic_key: key("garbage").sha256,
            payload: b"\x00\x01 definitely not json".to_vec(),
            expected: RejectionCode::MalformedPayload,
        },
        Case {
            name: "not a CSR",
            device_id: "nocsr",
            topic_key: key("nocsr").sha256,
            payload: request(
                "nocsr",
                Some(&tokens[1]),
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_owned(),
            ),
            expected: RejectionCode::CsrMalformed,
        },
    ];
    for case in cases {
        match ask_raw(&fleet, &case.topic_key, case.payload).await {
            OnboardingResponse::Rejected { code, message } => {
                assert_eq!(code, case.expected, "{}: {message}", case.name);
                assert!(!message.is_empty(), "{}", case.name);
            }
            other => panic!("{}: expected a rejection, got {other:?}", case.name),
        }
        let record = registry.device(case.device_id).expect("read");
        if case.device_id != "owner" {
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
        Some(onboarding_authority::registry::sha256_hex(tokens[0].as_bytes())),
        "owner unchanged"
    );
    // The token offered with every refused CSR was not consumed by the refusals.
    let fresh = key("fresh");
    match ask_raw(&fleet, &fresh.sha256, request("fresh", Some(&tokens[1]), fresh.csr_pem)).await {
        OnboardingResponse::Accepted { .. } => {}
        other => panic!("a refused request must not consume the token: {other:?}"),
    }
    // Only two certificates were ever sent: the owner's and the fresh device's. The observer
    // receives the last one a moment after the device did; the authority sends in order, so
    // once it holds the fresh device's answer it holds every earlier one.
    let accepted = || {
        capture
            .snapshot()
            .iter()
            .filter(|(topic, payload)| {
                topic.contains("/response/") && payload.starts_with(b"{\"status\":\"accepted\"")
            })
            .count()
    };
    wait_until(WAIT, || capture.on_topic(&topics::response(&fresh.sha256)) >= 1).await;
    assert_eq!(accepted(), 2);
    authority.shutdown().await;
}

/// The ACL keeps a device to its own topics: what it publishes on another device's topics is
/// not delivered, and it receives nothing from another device's topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_keeps_a_device_to_its_own_topics() {
    init_tracing();
    let fleet = TestFleet::new();
    let (capture, _observer) = Capture::start(&fleet).await;
    let authority = fleet.start_authority(fleet.authority_config(free_udp_port())).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(2, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let alice = fleet.onboard("alice", &tokens[0]).await;
    let bob = fleet.onboard("bob", &tokens[1]).await;

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
    let authority = fleet.start_authority(fleet.authority_config(sink.local_addr())).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(2, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let identity = fleet.onboard("doomed", &tokens[0]).await;
    let ring = open_ring(&fleet, "doomed");
    let uplink = appliance::Uplink::spawn(ring.clone(), uplink_config(&identity)).expect("uplink");
    assert!(stream_once(&uplink, &ring, "doomed", 0).await, "streams before the revocation");

    let printed = fleet
        .fleet_command(
            FleetCommand::Revoke { device: "doomed".to_owned() },
            &fleet.authority_config(sink.local_addr()),
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

/// A device whose key is lost (or whose certificate expired, or whose hardware was replaced)
/// cannot claim its id with a new key (`device_id_taken`) until the operator runs `fleet rebind`;
/// then it onboards with a new key and a new token and streams on, while the old key's
/// certificate stays refused by the sink. Fails without the rebind (the new key stays refused)
/// and without the key revocation (the old certificate streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebind_lets_a_new_key_claim_the_id_and_refuses_the_old_one() {
    init_tracing();
    let fleet = TestFleet::new();
    let sink = core_sink::Sink::start(fleet.sink_config(free_udp_port())).await.expect("sink");
    let authority_config = fleet.authority_config(sink.local_addr());
    let authority = fleet.start_authority(authority_config.clone()).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(2, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let old_identity = fleet.onboard("phoenix", &tokens[0]).await;
    let ring = open_ring(&fleet, "phoenix");
    let uplink = appliance::Uplink::spawn(ring.clone(), uplink_config(&old_identity)).expect("uplink");
    assert!(stream_once(&uplink, &ring, "phoenix", 0).await, "streams before the key is lost");
    uplink.stop().await;
    let old_key = registry.device("phoenix").expect("read").expect("record").key_sha256.expect("bound key");

    // The key is lost: a new one (a fresh identity directory) asks with a new token.
    let mut new_config = fleet.onboarding_config("phoenix", Some(tokens[1].clone()));
    new_config.identity_dir = fleet.path().join("devices").join("phoenix-new-key");
    match onboarding::ensure_identity(&new_config).await {
        Err(OnboardingError::Rejected { code, .. }) => assert_eq!(code, RejectionCode::DeviceIdTaken),
        other => panic!("a second key took an active id: {other:?}"),
    }

    let printed = fleet
        .fleet_command(FleetCommand::Rebind { device: "phoenix".to_owned() }, &authority_config)
        .expect("rebind");
    assert!(printed.contains(&old_key), "{printed}");
    let record = registry.device("phoenix").expect("read").expect("record");
    assert_eq!(record.state, DeviceState::Pending);
    assert_eq!(record.retired_key_sha256s, vec![old_key.clone()]);
    assert!(
        fleet
            .fleet_command(FleetCommand::Rebind { device: "phoenix".to_owned() }, &authority_config)
            .is_err(),
        "a pending id has no key to retire"
    );

    let new_identity = onboarding::ensure_identity(&new_config).await.expect("onboard with the new key");
    let record = registry.device("phoenix").expect("read").expect("record");
    assert_eq!(record.state, DeviceState::Active);
    assert_ne!(record.key_sha256.as_deref(), Some(old_key.as_str()), "bound to the new key");

    support::assert_uplink_refused(&ring, uplink_config(&old_identity), "phoenix", 10, "the old key").await;
    let uplink = appliance::Uplink::spawn(ring.clone(), uplink_config(&new_identity)).expect("new uplink");
    assert!(stream_once(&uplink, &ring, "phoenix", 20).await, "the new key streams, the refused chunk too");
    assert_eq!(sink.durable_through("phoenix", Lane::Sensor), uplink.metrics().acked_through(Lane::Sensor));
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
    let authority = fleet.start_authority(fleet.authority_config(free_udp_port())).await;
    let registry = authority.registry().clone();
    let token =
        registry.create_tokens(1, Duration::from_secs(3600), now_unix_ms()).expect("tokens").remove(0);
    let identity = fleet.onboard("cfg", &token).await;
    let mut agent_config = DeviceAgentConfig::new(fleet.broker.endpoint());
    agent_config.heartbeat_interval_ms = 100;
    let agent = DeviceAgent::start(agent_config.clone(), &identity).expect("agent");
    agent.report(DeviceStatus {
        version: "1.2.3".to_owned(),
        uptime_seconds: 42,
        ring_fill_percent_per_lane: [("sensor".to_owned(), 12.5)].into(),
        uplink_lag_chunks: 7,
        last_ack_unix_ms: Some(1),
        uplink_lag_seconds_per_lane: [("media".to_owned(), 4.5)].into(),
        records_per_second: 250.0,
        bytes_per_second: 80_000.0,
        boot_slot: Some("B".to_owned()),
    });
    let mut applied = agent.config();
    fleet
        .fleet_command(
            FleetCommand::Config {
                command: ConfigCommand::Set {
                    device: "cfg".to_owned(),
                    assignments: vec!["sample_rate_hz=50".to_owned(), "heartbeat_interval_ms=150".to_owned()],
                },
            },
            &fleet.authority_config(free_udp_port()),
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
                && heartbeat.uplink_lag_seconds_per_lane.get("media") == Some(&4.5)
                && heartbeat.records_per_second == 250.0
                && heartbeat.boot_slot.as_deref() == Some("B")
        })
    };
    assert!(wait_until(WAIT, reported).await, "heartbeat does not report the new config");
    assert!(
        wait_until(WAIT, || registry.device("cfg").expect("read").expect("cfg").config_acked_version
            == version)
        .await
    );
    let listing = onboarding_authority::cli::list(&registry).expect("list");
    let line = listing.lines().find(|line| line.starts_with("cfg ")).expect("cfg listed");
    assert!(line.contains("active") && line.contains("1.2.3") && line.contains("sensor=12"), "{line}");
    let view = onboarding_authority::cli::top(&registry.devices().expect("devices"), now_unix_ms(), 10)
        .expect("top");
    let line = view.lines().find(|line| line.starts_with("cfg ")).expect("cfg in the fleet view");
    assert!(line.contains(" 4.5 media ") && line.contains(" 250 ") && line.ends_with(" B"), "{view}");

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
    let authority = fleet.start_authority(config.clone()).await;
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
    let key_pem = std::fs::read_to_string(fleet.identity_dir("approved").join(fleet::KEY_FILE)).expect("key");
    let printed = fleet
        .fleet_command(FleetCommand::Approve { device: "approved".to_owned(), key_sha256: None }, &config)
        .expect("approve");
    // The operator sees which key the approval signs, to compare with the device's log.
    assert!(printed.contains(&fingerprint_of_key_pem(&key_pem)), "{printed}");
    let identity =
        tokio::time::timeout(WAIT, onboarding).await.expect("in time").expect("task").expect("onboarded");
    assert_eq!(identity.certificate.device_id().expect("id"), "approved");
    authority.shutdown().await;
}

/// Issue 15: a second holder of the claim identity (shipped in every image) who knows a device's
/// id (ids are predictable) neither reads that device's answer nor takes over its sessions: the
/// device onboards on the topic of its key's fingerprint, and the agent and the authority use
/// client ids nobody can guess. On the old layout (client id = device id) the device's onboarding
/// session kicked the eavesdropper off (and read through it), and the eavesdropper's reconnect or
/// a later claim session with the device id knocked the agent off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_holder_neither_reads_another_devices_answer_nor_knocks_it_off() {
    init_tracing();
    let fleet = TestFleet::new();
    let (capture, _observer) = Capture::start(&fleet).await;
    let authority = fleet.start_authority(fleet.authority_config(free_udp_port())).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(2, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let claim = fleet::IssuedCertificate::read_from(&fleet.claim_dir).expect("claim identity");
    let mut eavesdropper = fleet.session_with(
        &claim,
        "victim",
        &[
            topics::response("victim"),
            "tributary/onboarding/response/+".to_owned(),
            "tributary/onboarding/#".to_owned(),
            "tributary/#".to_owned(),
        ],
    );
    assert!(eavesdropper.wait_ready(WAIT).await, "eavesdropper did not connect");

    let identity = fleet.onboard("victim", &tokens[0]).await;
    let victim_key = fingerprint_of_key_pem(&identity.certificate.private_key_pem);
    assert!(capture.on_topic(&topics::response(&victim_key)) >= 1, "the answer went through the broker");
    // Time for a kicked session to reconnect, had it been kicked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let overheard: Vec<String> =
        std::iter::from_fn(|| eavesdropper.incoming.try_recv().ok()).map(|message| message.topic).collect();
    assert!(overheard.is_empty(), "the eavesdropper received {overheard:?}");
    assert_eq!(eavesdropper.connections.load(Ordering::Relaxed), 1, "the eavesdropper was disconnected");
    eavesdropper.close().await;

    let mut agent_config = DeviceAgentConfig::new(fleet.broker.endpoint());
    agent_config.heartbeat_interval_ms = 100;
    let agent = DeviceAgent::start(agent_config, &identity).expect("agent");
    let heartbeat_at = || {
        registry.device("victim").expect("read").expect("victim").last_heartbeat_received_unix_ms.unwrap_or(0)
    };
    assert!(wait_until(WAIT, || heartbeat_at() > 0).await, "no heartbeat from the agent");
    // Every client id a claim holder can guess: the device id, the authority's name.
    let mut intruders = Vec::new();
    for client_id in ["victim", onboarding::AUTHORITY_IDENTITY] {
        let mut intruder = fleet.session_with(&claim, client_id, &[]);
        assert!(intruder.wait_ready(WAIT).await, "{client_id}: intruder did not connect");
        intruders.push(intruder);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let since = heartbeat_at();
    assert!(wait_until(WAIT, || heartbeat_at() > since).await, "heartbeats stopped");
    assert_eq!(agent.mqtt_connections(), 1, "the agent was knocked off the broker");
    // The authority still answers: another device onboards.
    fleet.onboard("next", &tokens[1]).await;
    for intruder in intruders {
        intruder.close().await;
    }
    agent.shutdown().await;
    authority.shutdown().await;
}

/// Issue 15: a claim token is single-use. A retry with the same key and device id (a lost answer)
/// gets the same certificate again; the same token with another key, even for the same device
/// id, is refused with `token_used`, and a fresh token cannot move a device id to another key.
/// The old code signed a second certificate for another key with the same token and device id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_token_is_single_use_and_a_retry_with_the_same_key_gets_its_certificate() {
    init_tracing();
    let fleet = TestFleet::new();
    let authority = fleet.start_authority(fleet.authority_config(free_udp_port())).await;
    let registry = authority.registry().clone();
    let tokens = registry.create_tokens(2, Duration::from_secs(3600), now_unix_ms()).expect("tokens");
    let first_key = key("solo");
    let first_request = request("solo", Some(&tokens[0]), first_key.csr_pem.clone());
    let first = ask_raw(&fleet, &first_key.sha256, first_request.clone()).await;
    let retry = ask_raw(&fleet, &first_key.sha256, first_request).await;
    assert_eq!(certificate_of(&retry), certificate_of(&first), "a retry gets the same certificate");
    assert_eq!(authority.metrics().reanswered.load(Ordering::Relaxed), 1);
    assert_eq!(authority.metrics().accepted.load(Ordering::Relaxed), 1, "signed once");

    let second_key = key("solo");
    let reuse_same_device = request("solo", Some(&tokens[0]), second_key.csr_pem.clone());
    assert_eq!(
        rejection_of(ask_raw(&fleet, &second_key.sha256, reuse_same_device).await),
        RejectionCode::TokenUsed
    );
    let other = key("other");
    let reuse_other_device = request("other", Some(&tokens[0]), other.csr_pem.clone());
    assert_eq!(
        rejection_of(ask_raw(&fleet, &other.sha256, reuse_other_device).await),
        RejectionCode::TokenUsed
    );
    let fresh_token_other_key = request("solo", Some(&tokens[1]), second_key.csr_pem.clone());
    assert_eq!(
        rejection_of(ask_raw(&fleet, &second_key.sha256, fresh_token_other_key).await),
        RejectionCode::DeviceIdTaken
    );
    assert_eq!(authority.metrics().rejections(RejectionCode::TokenUsed), 2);
    assert_eq!(authority.metrics().rejections(RejectionCode::DeviceIdTaken), 1);

    let record = registry.device("solo").expect("read").expect("solo");
    assert_eq!(record.key_sha256.as_deref(), Some(first_key.sha256.as_str()));
    assert_eq!(record.certificate_pem.as_deref(), Some(certificate_of(&first)));
    // The refusal did not consume the fresh token: another device uses it.
    let last = key("other");
    let accepted = ask_raw(&fleet, &last.sha256, request("other", Some(&tokens[1]), last.csr_pem)).await;
    certificate_of(&accepted);
    authority.shutdown().await;
}

/// Issue 15: the device pins the fleet CA shipped in its image. A (test-built) authority that
/// answers with another CA is refused with `CaMismatch`; one that names the right CA but signs
/// with another is refused too; nothing is stored. The old code stored whatever CA the answer
/// named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_a_foreign_ca_is_refused_by_the_device() {
    init_tracing();
    let fleet = TestFleet::new();
    let rogue = fleet::FleetCa::init(&fleet.path().join("rogue"), "rogue fleet").expect("rogue CA");
    let rogue_signer = fleet::CsrSigner::from_ca(&rogue).expect("rogue signer");
    // It holds an authority certificate of the real fleet (the broker lets it answer).
    let identity = fleet.ca.issue_device(onboarding::AUTHORITY_IDENTITY, Validity::days(1)).expect("id");
    let mut fake = fleet.session_with(&identity, "fake-authority", &[topics::REQUEST_FILTER.to_owned()]);
    assert!(fake.wait_ready(WAIT).await, "fake authority did not subscribe");

    for (device_id, named_ca) in
        [("foreign-ca", rogue.certificate_pem()), ("foreign-signer", fleet.ca.certificate_pem())]
    {
        let mut config = fleet.onboarding_config(device_id, Some("t".repeat(64)));
        config.attempts_max = 1;
        let device = tokio::spawn(async move { onboarding::ensure_identity(&config).await });
        let message =
            tokio::time::timeout(WAIT, fake.incoming.recv()).await.expect("a request").expect("open");
        let asked: OnboardingRequest = serde_json::from_slice(&message.payload).expect("request");
        assert_eq!(asked.device_id, device_id);
        let csr = fleet::CsrSigner::check(&asked.csr_pem, device_id).expect("csr");
        let answer = OnboardingResponse::Accepted {
            certificate_pem: rogue_signer.sign(&csr, Validity::days(1)).expect("sign"),
            ca_pem: named_ca.to_owned(),
            sink_address: "127.0.0.1:1".to_owned(),
            sink_server_name: "localhost".to_owned(),
            config: Default::default(),
        };
        let topic = message.topic.replace("/request/", "/response/");
        onboarding::mqtt::publish(&fake.client, topic, false, serde_json::to_vec(&answer).expect("json"))
            .await
            .expect("publish");
        let outcome = tokio::time::timeout(WAIT, device).await.expect("in time").expect("task");
        match (device_id, outcome) {
            ("foreign-ca", Err(OnboardingError::CaMismatch { pinned_sha256, offered_sha256 })) => {
                assert_ne!(pinned_sha256, offered_sha256)
            }
            ("foreign-signer", Err(OnboardingError::BadAnswer(problem))) => {
                assert!(problem.contains("not issued by the pinned fleet CA"), "{problem}")
            }
            (_, other) => panic!("{device_id}: the device accepted a foreign CA: {other:?}"),
        }
        assert!(!fleet.identity_dir(device_id).join(fleet::CERTIFICATE_FILE).exists(), "{device_id}: stored");
        assert!(
            !fleet.identity_dir(device_id).join(fleet::CA_CERTIFICATE_FILE).exists(),
            "{device_id}: stored"
        );
    }
    fake.close().await;
}

/// Issue 15, approval mode: the first key to ask for a device id binds it; another key asking for
/// that id is refused with `key_mismatch` (the old code told it `pending` and let the operator
/// approve whichever key came first, unseen). The operator sees the bound key and can approve the
/// right one by fingerprint, which the other key then cannot take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_binds_a_device_id_to_one_key_and_the_operator_chooses_it() {
    init_tracing();
    let fleet = TestFleet::new();
    let mut config = fleet.authority_config(free_udp_port());
    config.allow_operator_approval = true;
    let authority = fleet.start_authority(config.clone()).await;
    let registry = authority.registry().clone();
    let squatter = key("victim");
    let squat = request("victim", None, squatter.csr_pem.clone());
    assert!(matches!(
        ask_raw(&fleet, &squatter.sha256, squat.clone()).await,
        OnboardingResponse::Pending { .. }
    ));

    let mut device = fleet.onboarding_config("victim", None);
    device.response_timeout_ms = 1_000;
    device.approval_wait_ms = 2_000;
    match onboarding::ensure_identity(&device).await {
        Err(OnboardingError::Rejected { code, message }) => {
            assert_eq!(code, RejectionCode::KeyMismatch, "{message}");
            assert!(!message.contains(&squatter.sha256), "the other key's topic is not revealed: {message}");
        }
        other => panic!("a second key for a pending id was not refused: {other:?}"),
    }
    let listing = onboarding_authority::cli::list(&registry).expect("list");
    assert!(listing.contains(&squatter.sha256), "the operator sees the bound key: {listing}");

    let device_key_pem =
        std::fs::read_to_string(fleet.identity_dir("victim").join(fleet::KEY_FILE)).expect("device key");
    let device_key = fingerprint_of_key_pem(&device_key_pem);
    let approve = |key_sha256: Option<String>| {
        fleet.fleet_command(FleetCommand::Approve { device: "victim".to_owned(), key_sha256 }, &config)
    };
    assert!(approve(Some("not-a-fingerprint".to_owned())).is_err(), "a malformed fingerprint is refused");
    let printed = approve(Some(device_key.clone())).expect("approve");
    assert!(printed.contains(&device_key), "{printed}");
    assert_eq!(rejection_of(ask_raw(&fleet, &squatter.sha256, squat).await), RejectionCode::KeyMismatch);
    let identity = onboarding::ensure_identity(&device).await.expect("the approved key onboards");
    assert_eq!(fingerprint_of_key_pem(&identity.certificate.private_key_pem), device_key);
    assert_eq!(authority.metrics().rejections(RejectionCode::KeyMismatch), 2);
    authority.shutdown().await;
}

/// Anyone holding the claim identity can ask for new ids without a token: in approval mode the
/// registry keeps at most `pending_devices_max` unapproved records (a request for another new id
/// is refused `too_many_pending`, ids already pending are answered as before, a token still
/// onboards), and the operator frees places by approving or forgetting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unapproved_pending_devices_are_bounded_and_the_operator_frees_places() {
    init_tracing();
    let fleet = TestFleet::new();
    let mut config = fleet.authority_config(free_udp_port());
    config.allow_operator_approval = true;
    config.pending_devices_max = 2;
    let authority = fleet.start_authority(config.clone()).await;
    let keys: Vec<(String, Key)> = ["squat-1", "squat-2", "squat-3", "squat-4"]
        .into_iter()
        .map(|device_id| (device_id.to_owned(), key(device_id)))
        .collect();
    let ask = |index: usize| {
        let (device_id, key) = &keys[index];
        ask_raw(&fleet, &key.sha256, request(device_id, None, key.csr_pem.clone()))
    };
    assert!(matches!(ask(0).await, OnboardingResponse::Pending { .. }));
    assert!(matches!(ask(1).await, OnboardingResponse::Pending { .. }));
    assert_eq!(rejection_of(ask(2).await), RejectionCode::TooManyPending);
    assert!(matches!(ask(0).await, OnboardingResponse::Pending { .. }), "a pending id is still answered");
    let registry = authority.registry().clone();
    assert!(registry.device("squat-3").expect("read").is_none(), "the refused id left no record");
    assert!(!RejectionCode::TooManyPending.is_permanent(), "the device asks again later");

    let token = registry.create_tokens(1, Duration::from_secs(60), now_unix_ms()).expect("token");
    let with_token = key("tokened");
    let answer =
        ask_raw(&fleet, &with_token.sha256, request("tokened", Some(&token[0]), with_token.csr_pem)).await;
    certificate_of(&answer);

    let fleet_command = |command| fleet.fleet_command(command, &config);
    fleet_command(FleetCommand::Forget { device: "squat-1".to_owned() }).expect("forget");
    assert!(registry.device("squat-1").expect("read").is_none());
    assert!(fleet_command(FleetCommand::Forget { device: "tokened".to_owned() }).is_err(), "active is kept");
    assert!(matches!(ask(2).await, OnboardingResponse::Pending { .. }), "a forgotten place is free");
    assert_eq!(rejection_of(ask(3).await), RejectionCode::TooManyPending);
    fleet_command(FleetCommand::Approve { device: "squat-2".to_owned(), key_sha256: None }).expect("approve");
    certificate_of(&ask(1).await);
    assert!(matches!(ask(3).await, OnboardingResponse::Pending { .. }), "an approved place is free");
    assert_eq!(authority.metrics().rejections(RejectionCode::TooManyPending), 2);
    authority.shutdown().await;
}

/// Requests beyond `requests_per_second_max` are refused `rate_limited` before their CSR is
/// looked at: over a burst sent on one session, the authority answered no more requests than its
/// bucket allows in the time the burst took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_requests_beyond_the_rate_are_refused_rate_limited() {
    init_tracing();
    let fleet = TestFleet::new();
    let mut config = fleet.authority_config(free_udp_port());
    config.requests_per_second_max = 2;
    let authority = fleet.start_authority(config).await;
    const REQUESTS: usize = 20;
    let flooder = key("flooder");
    let payload = request("flooder", Some("no-such-token"), flooder.csr_pem.clone());
    let mut session = fleet.claim_session(&flooder.sha256);
    assert!(session.wait_ready(WAIT).await, "claim session did not subscribe");
    let started = Instant::now();
    for _ in 0..REQUESTS {
        onboarding::mqtt::publish(&session.client, topics::request(&flooder.sha256), false, payload.clone())
            .await
            .expect("publish");
    }
    let mut codes = Vec::new();
    while codes.len() < REQUESTS {
        let message =
            tokio::time::timeout(WAIT, session.incoming.recv()).await.expect("an answer").expect("open");
        codes.push(rejection_of(serde_json::from_slice(&message.payload).expect("a response")));
    }
    let elapsed = started.elapsed();
    session.close().await;
    let looked_at = codes.iter().filter(|code| **code == RejectionCode::UnknownToken).count();
    let limited = codes.iter().filter(|code| **code == RejectionCode::RateLimited).count();
    assert_eq!(looked_at + limited, REQUESTS, "{codes:?}");
    // The burst (2) at once, then 2 per second.
    let allowed = 2 + 2 * elapsed.as_secs_f64().ceil() as usize;
    assert!(looked_at <= allowed, "{looked_at} requests decided in {elapsed:?}: more than the rate allows");
    assert!(limited >= 1, "{codes:?}");
    assert_eq!(authority.metrics().rejections(RejectionCode::RateLimited), limited as u64);
    authority.shutdown().await;
}
