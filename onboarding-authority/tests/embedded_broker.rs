//! The embedded broker (rumqttd) carries a whole onboarding and heartbeats: what `tributary demo`
//! relies on. (This crate's dev-dependency on `onboarding` turns on its `embedded-broker`.)

use std::time::Duration;

use fleet::{FleetCa, Validity};
use onboarding::broker::EmbeddedBroker;
use onboarding::{
    BrokerEndpoint, CLAIM_IDENTITY, DeviceAgent, DeviceAgentConfig, DeviceOnboardingConfig, DeviceStatus,
};
use onboarding_authority::{Authority, AuthorityConfig};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_onboards_and_reports_through_the_embedded_broker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = FleetCa::init(&dir.path().join("ca"), "demo fleet").expect("CA");
    let broker_dir = dir.path().join("broker");
    ca.issue_server(&["127.0.0.1".to_owned()], Validity::days(1))
        .expect("broker certificate")
        .write_to(&broker_dir, ca.certificate_pem())
        .expect("write");
    let claim_dir = dir.path().join("claim");
    ca.issue_device(CLAIM_IDENTITY, Validity::days(1))
        .expect("claim")
        .write_to(&claim_dir, ca.certificate_pem())
        .expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    EmbeddedBroker::start(listen, &broker_dir).expect("embedded broker");
    let broker = BrokerEndpoint { host: "127.0.0.1".to_owned(), port };

    let config = AuthorityConfig {
        broker: broker.clone(),
        registry_dir: dir.path().join("registry"),
        sink_address: "127.0.0.1:4433".to_owned(),
        sink_server_name: "localhost".to_owned(),
        allow_operator_approval: false,
        certificate_validity_days: 1,
        certificate_validity_seconds: None,
        default_config: Default::default(),
        poll_interval_ms: 50,
        requests_per_second_max: 1_000,
        pending_devices_max: 1_000,
    };
    let mut authority = Authority::start(config, &ca, &dir.path().join("revoked.txt")).expect("authority");
    assert!(authority.wait_ready(WAIT).await, "authority did not subscribe");
    let token = authority
        .registry()
        .create_tokens(1, Duration::from_secs(60), now_unix_ms())
        .expect("token")
        .remove(0);
    let mut device = DeviceOnboardingConfig::new(
        "demo-1",
        &dir.path().join("device"),
        broker.clone(),
        &claim_dir,
        Some(token),
    );
    device.response_timeout_ms = 3_000;
    let identity = onboarding::ensure_identity(&device).await.expect("onboarded");
    let mut agent_config = DeviceAgentConfig::new(broker);
    agent_config.heartbeat_interval_ms = 100;
    let agent = DeviceAgent::start(agent_config, &identity).expect("agent");
    agent.report(DeviceStatus { version: "demo".to_owned(), ..DeviceStatus::default() });
    let registry = authority.registry().clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    while registry.device("demo-1").expect("read").and_then(|record| record.last_heartbeat).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no heartbeat through the embedded broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.shutdown().await;
    authority.shutdown().await;
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}
