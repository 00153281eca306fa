//! The embedded broker (rumqttd) carries a whole onboarding and heartbeats: what `tributary demo`
//! relies on. (This crate's dev-dependency on `onboarding` turns on its `embedded-broker`.)

mod support;

use std::time::Duration;

use onboarding::broker::EmbeddedBroker;
use onboarding::{BrokerEndpoint, DeviceAgent, DeviceAgentConfig, DeviceOnboardingConfig, DeviceStatus};
use onboarding_authority::{Authority, AuthorityConfig};
use support::{WAIT, authority_config, fleet_with_claim, now_unix_ms, write_server_certificate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_onboards_and_reports_through_the_embedded_broker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, claim_dir) = fleet_with_claim(dir.path(), "demo fleet");
    let broker_dir = dir.path().join("broker");
    write_server_certificate(&ca, &["127.0.0.1"], &broker_dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    EmbeddedBroker::start(listen, &broker_dir).expect("embedded broker");
    let broker = BrokerEndpoint { host: "127.0.0.1".to_owned(), port };

    let sink: std::net::SocketAddr = "127.0.0.1:4433".parse().expect("address");
    let config = AuthorityConfig {
        default_config: Default::default(),
        ..authority_config(broker.clone(), &dir.path().join("registry"), sink)
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
