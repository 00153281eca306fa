//! Fleet CA rollover end to end against a real Mosquitto, with certificates that live seconds: a
//! device streams over QUIC while its certificate is renewed and the fleet CA rolls over (begin,
//! switch, retire), learning the new CA through the old one's cross-certificate; and a device
//! refuses a CA no pinned CA vouches for.

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet::{FleetCa, Validity};
use onboarding::messages::{RenewalRequest, RenewalResponse};
use onboarding::{DeviceAgent, topics};
use protocol::Lane;
use support::renewing::{agent_config, onboard, short_lived};
use support::{
    TestFleet, WAIT, assert_uplink_refused, free_udp_port, init_tracing, open_ring, stream_once,
    uplink_config, wait_until,
};

/// Chunks streamed while waiting for one phase, at most (one every 100 ms or so).
const CHUNKS_PER_PHASE_MAX: u64 = 400;

fn certificates_in(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

/// A device streaming one chunk at a time and checking each Ack.
struct Streamer {
    ring: buffer::Ring,
    uplink: appliance::Uplink,
    device_id: String,
    next_record: u64,
    chunks: u64,
}

impl Streamer {
    async fn once(&mut self) {
        let first = self.next_record;
        self.next_record += 10;
        self.chunks += 1;
        assert!(
            stream_once(&self.uplink, &self.ring, &self.device_id, first).await,
            "the chunk from record {first} was not acked"
        );
    }

    /// Streams until `done` holds, one chunk about every 100 ms: no gap longer than an Ack.
    async fn until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        let mut chunks = 0;
        while !done() {
            self.once().await;
            chunks += 1;
            assert!(chunks < CHUNKS_PER_PHASE_MAX, "streamed {chunks} chunks waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Writes the sink's server certificate from the signing CA of `ca_dir`, with the bundle.
fn reissue_sink_certificate(fleet: &TestFleet, ca: &FleetCa) {
    ca.issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()], Validity::days(1))
        .expect("sink certificate")
        .write_to(&fleet.path().join("server"), ca.certificate_pem())
        .expect("write sink certificate");
}

fn installed_certificate(identity_dir: &Path) -> String {
    fleet::IssuedCertificate::read_from(identity_dir).expect("installed pair").certificate_pem
}

/// Issue 20: the device streams without a gap across renewals and one whole CA rollover. After
/// begin it pins [old, new] (the old CA vouched for the new); after switch it holds a new-CA
/// certificate and an old-CA certificate still streams; after retire it pins only the new CA
/// and the sink refuses the old-CA certificate. Every chunk is acked and landed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_streams_across_renewals_and_a_whole_ca_rollover() {
    init_tracing();
    let mut fleet = TestFleet::new();
    let ca_dir = fleet.path().join("ca");
    let sink = core_sink::Sink::start(fleet.sink_config(free_udp_port())).await.expect("sink");
    let authority = fleet.start_authority(short_lived(&fleet, sink.local_addr())).await;
    let registry = authority.registry().clone();
    let identity = onboard(&fleet, &registry, "rolling").await;
    let old_pinned = identity.ca_pem.clone();
    let agent = DeviceAgent::start(agent_config(&fleet), &identity).expect("agent");
    let renewals = agent.renewal_metrics();
    let renewed = || renewals.renewed.load(Ordering::Relaxed);
    let ring = open_ring(&fleet, "rolling");
    let mut renewing_config = uplink_config(&identity);
    renewing_config.identity_dir = Some(identity.identity_dir.clone());
    let uplink = appliance::Uplink::spawn(ring.clone(), renewing_config.clone()).expect("uplink");
    let mut device =
        Streamer { ring: ring.clone(), uplink, device_id: "rolling".to_owned(), next_record: 0, chunks: 0 };
    device.until("the first renewal", || renewed() >= 1).await;

    // Phase 1: the new CA is trusted alongside the old, which still signs. The broker takes the
    // bundle at a restart; the sink and the authority by themselves.
    let begun = fleet::rollover::begin(&ca_dir).expect("begin");
    let old_ca = FleetCa::load(&ca_dir).expect("CA after begin");
    let old_ca_device = old_ca.issue_device("rolling", Validity::days(1)).expect("an old-CA certificate");
    fleet.broker.restart(fleet.dir.path(), &old_ca);
    let at_begin = renewed();
    device
        .until("a renewal that brings the new CA", || {
            renewed() > at_begin && renewals.trust_changes.load(Ordering::Relaxed) >= 1
        })
        .await;
    let pinned =
        std::fs::read_to_string(identity.identity_dir.join(fleet::CA_CERTIFICATE_FILE)).expect("ca.pem");
    assert_eq!(certificates_in(&pinned), 2, "the device pins [old, new]");
    assert!(pinned.starts_with(old_pinned.trim_end()), "the old CA stays first while it signs");

    // Phase 2: the new CA signs. The sink's and the broker's certificates are re-issued from it.
    let switched = fleet::rollover::switch(&ca_dir).expect("switch");
    assert_ne!(switched.signer, begun.signer);
    let new_ca = FleetCa::load(&ca_dir).expect("CA after switch");
    reissue_sink_certificate(&fleet, &new_ca);
    fleet.broker.restart(fleet.dir.path(), &new_ca);
    device
        .until("a certificate of the new CA", || {
            fleet::rollover::is_issued_by(
                &installed_certificate(&identity.identity_dir),
                new_ca.signing_certificate(),
            )
        })
        .await;
    let listed = onboarding_authority::cli::run(
        onboarding_authority::cli::FleetCommand::List,
        &short_lived(&fleet, sink.local_addr()),
        &ca_dir,
        &fleet.revocation_file(),
    )
    .expect("list");
    assert!(listed.contains("ISSUER") && listed.contains(&switched.signer), "{listed}");
    assert!(
        onboarding_authority::cli::devices_on_other_cas(&registry, &ca_dir).expect("devices").is_empty(),
        "the device moved"
    );
    // An old-CA certificate still streams while the old CA is trusted (one connection of the
    // device at a time: a newer one supersedes the older).
    device.uplink.stop().await;
    let mut old_config = uplink_config(&identity);
    old_config.identity = old_ca_device.clone();
    old_config.ca_pem = new_ca.certificate_pem().to_owned();
    let old_uplink = appliance::Uplink::spawn(ring.clone(), old_config.clone()).expect("old-CA uplink");
    let mut old_device = Streamer {
        ring: ring.clone(),
        uplink: old_uplink,
        device_id: "rolling".to_owned(),
        next_record: device.next_record,
        chunks: 0,
    };
    old_device.once().await;
    device.next_record = old_device.next_record;
    device.chunks += old_device.chunks;
    old_device.uplink.stop().await;
    // A new connection of the device takes its installed pair and bundle up (its config still
    // names the first certificate and the old CA alone, which cannot verify the sink now).
    device.uplink = appliance::Uplink::spawn(ring.clone(), renewing_config.clone()).expect("uplink");
    device.once().await;
    assert!(device.uplink.metrics().certificate_reloads.load(Ordering::Relaxed) >= 1);

    // Phase 3: only the new CA is trusted.
    fleet::rollover::retire(&ca_dir, &[], false).expect("retire");
    let retired = FleetCa::load(&ca_dir).expect("CA after retire");
    assert_eq!(certificates_in(retired.certificate_pem()), 1);
    fleet.broker.restart(fleet.dir.path(), &retired);
    let trust_changes = renewals.trust_changes.load(Ordering::Relaxed);
    device
        .until("a renewal that retires the old CA", || {
            renewals.trust_changes.load(Ordering::Relaxed) > trust_changes
        })
        .await;
    assert!(renewed() >= 4, "renewals: {renewals:?}");
    assert_eq!(renewals.untrusted_offers.load(Ordering::Relaxed), 0);
    let pinned =
        std::fs::read_to_string(identity.identity_dir.join(fleet::CA_CERTIFICATE_FILE)).expect("ca.pem");
    assert_eq!(pinned, retired.certificate_pem(), "the device pins only the new CA");
    assert!(fleet::rollover::is_issued_by(
        &installed_certificate(&identity.identity_dir),
        retired.signing_certificate()
    ));

    // The sink refuses the old-CA certificate now (it is within its validity period).
    device.uplink.stop().await;
    assert_uplink_refused(&ring, old_config, "rolling", device.next_record, "a retired CA's certificate")
        .await;
    device.next_record += 10;
    device.chunks += 1;

    // The device carries the rest; every chunk landed exactly once.
    device.uplink = appliance::Uplink::spawn(ring.clone(), renewing_config).expect("uplink");
    device.once().await;
    let last = device.uplink.metrics().acked_through(Lane::Sensor);
    assert_eq!(sink.durable_through("rolling", Lane::Sensor), last);
    assert_eq!(sink.metrics().chunks_landed.load(Ordering::Relaxed), device.chunks, "each chunk landed once");

    device.uplink.stop().await;
    agent.shutdown().await;
    authority.shutdown().await;
    sink.shutdown().await;
}

/// A renewal answer offering a CA that no pinned CA vouches for is refused whole and counted:
/// the device keeps its certificate and its pinned CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_refuses_a_ca_that_no_pinned_ca_vouches_for() {
    init_tracing();
    let fleet = TestFleet::new();
    let sink = core_sink::Sink::start(fleet.sink_config(free_udp_port())).await.expect("sink");
    let config = short_lived(&fleet, sink.local_addr());
    let authority = fleet.start_authority(config).await;
    let identity = onboard(&fleet, authority.registry(), "victim").await;
    authority.shutdown().await;

    // A rogue rolling over: its new CA vouched for by its own old CA, not by the fleet's.
    let rogue_dir = fleet.path().join("rogue");
    FleetCa::init(&rogue_dir, "test fleet").expect("rogue CA");
    fleet::rollover::begin(&rogue_dir).expect("rogue begin");
    let rogue_offer = fleet::rollover::offered_trust(&rogue_dir).expect("rogue offer");
    let rogue_anchors = FleetCa::load(&rogue_dir).expect("rogue").certificate_pem().to_owned();
    let rogue_cross = std::fs::read_to_string(rogue_dir.join(fleet::rollover::CROSS_CERTIFICATE_FILE))
        .expect("rogue cross");
    let rogue_new =
        rogue_anchors.split_inclusive("-----END CERTIFICATE-----\n").nth(1).expect("new").to_owned();
    let signer = fleet::CsrSigner::from_ca(&fleet.ca).expect("signer");
    // It answers as the authority (it holds an authority certificate of the real fleet).
    let impostor =
        fleet.ca.issue_device(onboarding::AUTHORITY_IDENTITY, Validity::days(1)).expect("identity");
    let mut fake =
        fleet.session_with(&impostor, "fake-authority", &[topics::RENEW_REQUEST_FILTER.to_owned()]);
    assert!(fake.wait_ready(WAIT).await, "fake authority did not subscribe");

    let agent = DeviceAgent::start(agent_config(&fleet), &identity).expect("agent");
    let renewals = agent.renewal_metrics();
    let offers = [
        // The fleet's CA plus the rogue's new one with the rogue's cross-certificate.
        format!("{}{rogue_new}{rogue_cross}", fleet.ca.certificate_pem()),
        // Only the rogue's.
        rogue_offer.clone(),
    ];
    for (answered, offer) in offers.iter().enumerate() {
        let message =
            tokio::time::timeout(WAIT, fake.incoming.recv()).await.expect("a renewal request").expect("open");
        let request: RenewalRequest = serde_json::from_slice(&message.payload).expect("request");
        let csr = fleet::CsrSigner::check(&request.csr_pem, "victim").expect("csr");
        let answer = RenewalResponse::Renewed {
            certificate_pem: signer.sign(&csr, Validity::days(1)).expect("sign"),
            key_sha256: topics::key_fingerprint(&csr.subject_public_key_info()),
            ca_pem: Some(offer.clone()),
        };
        onboarding::mqtt::publish(
            &fake.client,
            topics::renew_response("victim"),
            false,
            serde_json::to_vec(&answer).expect("json"),
        )
        .await
        .expect("publish");
        assert!(
            wait_until(WAIT, || renewals.untrusted_offers.load(Ordering::Relaxed) > answered as u64).await,
            "the device did not refuse offer {answered}: {renewals:?}"
        );
    }
    assert_eq!(renewals.renewed.load(Ordering::Relaxed), 0);
    assert_eq!(renewals.trust_changes.load(Ordering::Relaxed), 0);
    let pinned =
        std::fs::read_to_string(identity.identity_dir.join(fleet::CA_CERTIFICATE_FILE)).expect("ca.pem");
    assert_eq!(pinned, identity.ca_pem, "the pinned CA is unchanged");
    assert_eq!(installed_certificate(&identity.identity_dir), identity.certificate.certificate_pem);
    agent.shutdown().await;
    fake.close().await;
    sink.shutdown().await;
}
