//! Real QUIC handshakes over 127.0.0.1: who the sink accepts, who it refuses, and with which TLS
//! alert, as seen from both sides.

mod common;

use std::time::{Duration, SystemTime};

use common::{Expected, Fleet, SERVER_NAME, Sink, check};
use fleet::{RevocationList, Validity};
use rustls::AlertDescription;

const DAY: Duration = Duration::from_secs(86_400);

/// "test fleet" and a sink of it.
fn fleet_and_sink() -> (Fleet, Sink) {
    let fleet = Fleet::new("test fleet");
    let sink = sink_for(&fleet);
    (fleet, sink)
}

fn sink_for(fleet: &Fleet) -> Sink {
    let revocations = RevocationList::open(&fleet.revocation_path()).expect("open revocation list");
    Sink::start(fleet.ca.certificate_pem(), &fleet.server, revocations)
}

#[tokio::test]
async fn good_device_is_accepted_and_identified() {
    let (fleet, mut sink) = fleet_and_sink();
    let device = fleet.device("camera-01_A");
    check(&mut sink, fleet.client(&device), SERVER_NAME, Expected::Accepted("camera-01_A")).await;
    // The sink certificate also names 127.0.0.1.
    check(&mut sink, fleet.client(&device), "127.0.0.1", Expected::Accepted("camera-01_A")).await;
}

#[tokio::test]
async fn device_of_another_fleet_is_refused() {
    let fleet = Fleet::new("test fleet");
    let other = Fleet::new("other fleet");
    let mut sink = sink_for(&fleet);
    // The stranger trusts our CA (so it would accept the sink) but its certificate is the other
    // CA's.
    let stranger = other.device("camera-01");
    let client =
        fleet::client_config(fleet.ca.certificate_pem(), &stranger, common::transport()).expect("config");
    check(&mut sink, client, SERVER_NAME, Expected::RefusedBySink(AlertDescription::UnknownCA)).await;
}

#[tokio::test]
async fn revoked_device_is_refused_after_reload() {
    let fleet = Fleet::new("test fleet");
    let path = fleet.revocation_path();
    let revocations = RevocationList::open(&path).expect("open revocation list");
    let mut sink = Sink::start(fleet.ca.certificate_pem(), &fleet.server, revocations.clone());
    // One client configuration for every attempt: were TLS resumption on, the later attempts
    // could resume the first session and skip certificate verification.
    let revoked = fleet.client(&fleet.device("sensor-7"));
    let kept = fleet.client(&fleet.device("sensor-8"));

    check(&mut sink, revoked.clone(), SERVER_NAME, Expected::Accepted("sensor-7")).await;
    RevocationList::revoke(&path, "sensor-7").expect("revoke");
    // Not in force until reloaded: the sink decides when to look at the file.
    check(&mut sink, revoked.clone(), SERVER_NAME, Expected::Accepted("sensor-7")).await;

    assert!(revocations.reload_if_changed().expect("reload"));
    check(
        &mut sink,
        revoked.clone(),
        SERVER_NAME,
        Expected::RefusedBySink(AlertDescription::CertificateRevoked),
    )
    .await;
    check(&mut sink, kept, SERVER_NAME, Expected::Accepted("sensor-8")).await;
    check(&mut sink, revoked, SERVER_NAME, Expected::RefusedBySink(AlertDescription::CertificateRevoked))
        .await;
}

/// A certificate outside its validity, late or early, is refused: TLS has one alert for "not
/// currently valid".
#[tokio::test]
async fn certificate_expired_or_not_yet_valid_is_refused() {
    let (fleet, mut sink) = fleet_and_sink();
    let now = SystemTime::now();
    for (device_id, validity) in [
        ("expired", Validity { not_before: now - 10 * DAY, not_after: now - DAY }),
        ("not-yet-valid", Validity { not_before: now + DAY, not_after: now + 10 * DAY }),
    ] {
        let device = fleet.ca.issue_device(device_id, validity).expect("issue");
        check(
            &mut sink,
            fleet.client(&device),
            SERVER_NAME,
            Expected::RefusedBySink(AlertDescription::CertificateExpired),
        )
        .await;
    }
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    let (fleet, mut sink) = fleet_and_sink();
    let device = fleet.device("camera-01");
    let client = fleet::client_config_with_alpn(
        fleet.ca.certificate_pem(),
        &device,
        common::transport(),
        b"tributary/2",
    )
    .expect("config");
    check(&mut sink, client, SERVER_NAME, Expected::RefusedBySink(AlertDescription::NoApplicationProtocol))
        .await;
}

#[tokio::test]
async fn sink_certificate_cannot_identify_a_device() {
    let (fleet, mut sink) = fleet_and_sink();
    // Signed by the fleet CA, but for serverAuth only.
    let client = fleet.client(&fleet.server);
    check(&mut sink, client, SERVER_NAME, Expected::RefusedBySink(AlertDescription::UnsupportedCertificate))
        .await;
}

#[tokio::test]
async fn device_refuses_a_sink_of_another_fleet() {
    let fleet = Fleet::new("test fleet");
    let other = Fleet::new("other fleet");
    let mut impostor = sink_for(&other);
    let client = fleet.client(&fleet.device("camera-01"));
    check(&mut impostor, client, SERVER_NAME, Expected::RefusedByDevice(AlertDescription::UnknownCA)).await;
}

#[tokio::test]
async fn device_refuses_a_sink_under_another_name() {
    let (fleet, mut sink) = fleet_and_sink();
    let client = fleet.client(&fleet.device("camera-01"));
    check(&mut sink, client, "sink.example.org", Expected::RefusedByDevice(AlertDescription::BadCertificate))
        .await;
}

#[tokio::test]
async fn device_certificate_cannot_serve_as_sink() {
    let fleet = Fleet::new("test fleet");
    let device = fleet.device("camera-01");
    let revocations = RevocationList::open(&fleet.revocation_path()).expect("open revocation list");
    // A device that holds a fleet-signed key must not be able to impersonate the sink.
    let mut impostor = Sink::start(fleet.ca.certificate_pem(), &device, revocations);
    let client = fleet.client(&fleet.device("camera-02"));
    check(
        &mut impostor,
        client,
        "camera-01",
        Expected::RefusedByDevice(AlertDescription::UnsupportedCertificate),
    )
    .await;
}
