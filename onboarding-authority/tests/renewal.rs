//! Certificate renewal end to end against a real Mosquitto, with certificates that live seconds:
//! the device agent renews before expiry over MQTT, the uplink takes each new certificate up at
//! its next connection, the sink accepts the old certificate until it expires and refuses it
//! after, and a revoked device cannot renew.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use onboarding::{DeviceAgent, RejectionCode};
use onboarding_authority::cli::FleetCommand;
use protocol::Lane;
use support::renewing::{agent_config, onboard, short_lived};
use support::{
    TestFleet, WAIT, assert_uplink_refused, free_udp_port, init_tracing, open_ring, produce, stream_once,
    uplink_config, wait_until,
};

/// Long enough for three renewals.
const RENEWALS_WAIT: Duration = Duration::from_secs(60);

/// Three renewals while the device streams: every chunk is acked; the first certificate still
/// connects after the first renewal (the overlap) and is refused once expired; the uplink's next
/// connection uses the newest certificate; the registry counts the renewals and binds the newest
/// key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_streams_across_three_renewals_and_the_old_certificate_serves_until_it_expires() {
    init_tracing();
    let fleet = TestFleet::new();
    let sink = core_sink::Sink::start(fleet.sink_config(free_udp_port())).await.expect("sink");
    let authority = fleet.start_authority(short_lived(&fleet, sink.local_addr())).await;
    let registry = authority.registry().clone();
    let identity = onboard(&fleet, &registry, "renewing").await;
    let first_certificate = identity.certificate.clone();
    let first_expiry = fleet::Validity::of_certificate(&first_certificate.certificate_pem).expect("validity");
    let agent = DeviceAgent::start(agent_config(&fleet), &identity).expect("agent");
    let renewals = agent.renewal_metrics();

    let ring = open_ring(&fleet, "renewing");
    let renewing_uplink = || {
        let mut config = uplink_config(&identity);
        config.identity_dir = Some(identity.identity_dir.clone());
        appliance::Uplink::spawn(ring.clone(), config).expect("uplink")
    };
    let mut uplink = renewing_uplink();
    let mut next_record = 0;
    assert!(stream_once(&uplink, &ring, "renewing", next_record).await, "streams with the first certificate");
    next_record += 10;

    // The overlap: after the first renewal, the first certificate still connects.
    let mut chunks_while_renewing = 0;
    while renewals.renewed.load(Ordering::Relaxed) < 1 {
        assert!(stream_once(&uplink, &ring, "renewing", next_record).await, "a chunk was not acked");
        next_record += 10;
        chunks_while_renewing += 1;
        assert!(chunks_while_renewing < 200, "no renewal: {:?}", renewals);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(SystemTime::now() < first_expiry.not_after, "the first renewal came after the first expiry");
    uplink.stop().await;
    let old = appliance::Uplink::spawn(ring.clone(), uplink_config(&identity)).expect("old uplink");
    assert!(
        stream_once(&old, &ring, "renewing", next_record).await,
        "the old certificate inside its validity"
    );
    next_record += 10;
    old.stop().await;

    // Streaming goes on across the next renewals, reconnecting with the newest certificate.
    uplink = renewing_uplink();
    while renewals.renewed.load(Ordering::Relaxed) < 3 {
        assert!(stream_once(&uplink, &ring, "renewing", next_record).await, "a chunk was not acked");
        next_record += 10;
        chunks_while_renewing += 1;
        assert!(chunks_while_renewing < 2_000, "fewer than three renewals: {renewals:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        uplink.metrics().certificate_reloads.load(Ordering::Relaxed) >= 1,
        "the uplink took a new certificate"
    );
    uplink.stop().await;

    // The first certificate has expired by now: the sink refuses it.
    assert!(
        wait_until(RENEWALS_WAIT, || SystemTime::now() > first_expiry.not_after).await,
        "the first certificate never expired"
    );
    assert_uplink_refused(&ring, uplink_config(&identity), "renewing", next_record, "an expired certificate")
        .await;
    next_record += 10;

    // The newest certificate carries everything that was left.
    let uplink = renewing_uplink();
    let last = produce(&ring, "renewing", next_record, 10);
    let metrics = uplink.metrics();
    assert!(
        wait_until(WAIT, || metrics.acked_through(Lane::Sensor) >= last).await,
        "the renewed certificate did not carry the rest"
    );
    assert_eq!(sink.durable_through("renewing", Lane::Sensor), last, "every chunk landed");

    let installed = fleet::IssuedCertificate::read_from(&identity.identity_dir).expect("installed pair");
    assert_ne!(installed.certificate_pem, first_certificate.certificate_pem);
    let record = registry.device("renewing").expect("read").expect("record");
    assert!(record.renewals >= 3, "registry counted {} renewals", record.renewals);
    assert_eq!(
        record.certificate_pem.as_deref(),
        Some(installed.certificate_pem.as_str()),
        "registry holds the newest"
    );
    assert!(authority.metrics().renewed.load(Ordering::Relaxed) >= 3);
    let listed = onboarding_authority::cli::list(&registry).expect("list");
    assert!(listed.contains("RENEWALS"), "{listed}");

    uplink.stop().await;
    agent.shutdown().await;
    authority.shutdown().await;
    sink.shutdown().await;
}

/// A revoked device asks for renewal and is refused `device_revoked`; its files stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_cannot_renew() {
    init_tracing();
    let fleet = TestFleet::new();
    let sink = core_sink::Sink::start(fleet.sink_config(free_udp_port())).await.expect("sink");
    let config = short_lived(&fleet, sink.local_addr());
    let authority = fleet.start_authority(config.clone()).await;
    let registry = authority.registry().clone();
    let identity = onboard(&fleet, &registry, "doomed").await;
    fleet.fleet_command(FleetCommand::Revoke { device: "doomed".to_owned() }, &config).expect("revoke");
    let agent = DeviceAgent::start(agent_config(&fleet), &identity).expect("agent");
    let renewals = agent.renewal_metrics();
    assert!(
        wait_until(WAIT, || renewals.refused.load(Ordering::Relaxed) >= 1).await,
        "no answer to the renewal: {renewals:?}"
    );
    assert_eq!(*renewals.last_refusal.lock().expect("lock"), Some(RejectionCode::DeviceRevoked));
    assert_eq!(renewals.renewed.load(Ordering::Relaxed), 0);
    assert!(authority.metrics().rejections(RejectionCode::DeviceRevoked) >= 1);
    assert_eq!(authority.metrics().renewed.load(Ordering::Relaxed), 0);
    let kept = fleet::IssuedCertificate::read_from(&identity.identity_dir).expect("pair");
    assert_eq!(kept.certificate_pem, identity.certificate.certificate_pem);
    let record = registry.device("doomed").expect("read").expect("record");
    assert_eq!(record.renewals, 0);
    agent.shutdown().await;
    authority.shutdown().await;
    sink.shutdown().await;
}
