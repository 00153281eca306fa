//! Fleet CA rollover on a CA directory: the three phases, each re-run after a crash at each of
//! its steps, and the device's rule for taking a new anchor (only one a pinned CA vouches for).

use std::fs;
use std::path::Path;

use fleet::rollover::{
    CROSS_CERTIFICATE_FILE, NEXT_CA_CERTIFICATE_FILE, NEXT_CA_KEY_FILE, RolloverPhase, accept_trust_bundle,
    issuer_in_bundle, offered_trust, phase,
};
use fleet::{CA_CERTIFICATE_FILE, CA_KEY_FILE, FleetCa, FleetError, Validity};

fn read(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(name)).unwrap_or_else(|error| panic!("{name}: {error}"))
}

fn certificates_in(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

/// The fingerprint of the CA that signs in `dir`, taken from a certificate it issues now.
fn signer_of(dir: &Path) -> String {
    let ca = FleetCa::load(dir).expect("load");
    let device = ca.issue_device("probe", Validity::days(1)).expect("issue");
    issuer_in_bundle(ca.certificate_pem(), &device.certificate_pem).expect("issued by a CA of the bundle")
}

#[test]
fn begin_switch_retire_move_the_signer_and_the_trust() {
    let temporary = tempfile::tempdir().expect("temp dir");
    let dir = temporary.path();
    let old = FleetCa::init(dir, "test fleet").expect("init");
    let old_pem = old.certificate_pem().to_owned();
    let old_device = old.issue_device("dev-1", Validity::days(1)).expect("device");
    let old_fingerprint = signer_of(dir);
    assert_eq!(phase(dir).expect("phase"), RolloverPhase::Stable);

    let begun = fleet::rollover::begin(dir).expect("begin");
    assert_eq!(begun.phase, RolloverPhase::Begun);
    assert_eq!(begun.bundle.len(), 2);
    assert_eq!(begun.signer, old_fingerprint, "the old CA still signs after begin");
    assert_eq!(signer_of(dir), old_fingerprint);
    assert!(read(dir, CA_CERTIFICATE_FILE).starts_with(&old_pem), "the old CA stays first");
    // A device pinning only the old CA takes the new one: the old vouches for it.
    let offer = offered_trust(dir).expect("offer");
    assert_eq!(certificates_in(&offer), 3, "bundle and cross-certificate");
    let accepted = accept_trust_bundle(&old_pem, &offer).expect("vouched for");
    assert_eq!(accepted, read(dir, CA_CERTIFICATE_FILE));

    let switched = fleet::rollover::switch(dir).expect("switch");
    assert_eq!(switched.phase, RolloverPhase::Switched);
    assert_ne!(switched.signer, old_fingerprint);
    assert_eq!(signer_of(dir), switched.signer, "the new CA signs after switch");
    assert_eq!(switched.bundle, vec![switched.signer.clone(), old_fingerprint.clone()]);
    assert!(!dir.join(NEXT_CA_CERTIFICATE_FILE).exists() && !dir.join(NEXT_CA_KEY_FILE).exists());
    // The old CA's certificates are still trusted: the bundle holds it.
    let bundle = read(dir, CA_CERTIFICATE_FILE);
    assert_eq!(issuer_in_bundle(&bundle, &old_device.certificate_pem), Some(old_fingerprint.clone()));
    // A device that missed begin still moves: the cross-certificate is still offered.
    assert_eq!(accept_trust_bundle(&old_pem, &offered_trust(dir).expect("offer")).expect("vouched"), bundle);

    let refused =
        fleet::rollover::retire(dir, &["dev-1".to_owned()], false).expect_err("a device is on the old CA");
    assert!(
        matches!(&refused, FleetError::Rollover { problem, .. } if problem.contains("dev-1")),
        "{refused}"
    );
    assert_eq!(read(dir, CA_CERTIFICATE_FILE), bundle, "a refused retire changes nothing");

    let retired = fleet::rollover::retire(dir, &[], false).expect("retire");
    assert_eq!(retired.phase, RolloverPhase::Stable);
    assert_eq!(retired.bundle, vec![switched.signer.clone()]);
    assert_eq!(certificates_in(&read(dir, CA_CERTIFICATE_FILE)), 1);
    assert!(!dir.join(CROSS_CERTIFICATE_FILE).exists());
    assert_eq!(issuer_in_bundle(&read(dir, CA_CERTIFICATE_FILE), &old_device.certificate_pem), None);
    // A device pinning [old, new] drops the retired one.
    let pinned = accept_trust_bundle(&bundle, &offered_trust(dir).expect("offer")).expect("pinned already");
    assert_eq!(certificates_in(&pinned), 1);
    // And a second rollover can begin.
    fleet::rollover::begin(dir).expect("a second rollover");
}

#[test]
fn each_phase_completes_when_run_again_after_a_crash() {
    let temporary = tempfile::tempdir().expect("temp dir");
    let dir = temporary.path();
    let old = FleetCa::init(dir, "test fleet").expect("init");
    let old_pem = old.certificate_pem().to_owned();

    // begin, crashed after the staged key: the re-run keeps that key.
    fleet::rollover::begin(dir).expect("begin");
    let staged_key = read(dir, NEXT_CA_KEY_FILE);
    fs::remove_file(dir.join(NEXT_CA_CERTIFICATE_FILE)).expect("undo");
    fs::remove_file(dir.join(CROSS_CERTIFICATE_FILE)).expect("undo");
    fs::write(dir.join(CA_CERTIFICATE_FILE), &old_pem).expect("undo");
    assert_eq!(phase(dir).expect("phase"), RolloverPhase::Stable);
    FleetCa::load(dir).expect("loads at every step");
    fleet::rollover::begin(dir).expect("begin again");
    assert_eq!(read(dir, NEXT_CA_KEY_FILE), staged_key, "the staged key is kept");
    let staged_certificate = read(dir, NEXT_CA_CERTIFICATE_FILE);
    // begin, crashed before the bundle: the staged certificate is kept too.
    fs::write(dir.join(CA_CERTIFICATE_FILE), &old_pem).expect("undo");
    fleet::rollover::begin(dir).expect("begin again");
    assert_eq!(read(dir, NEXT_CA_CERTIFICATE_FILE), staged_certificate);
    assert_eq!(certificates_in(&read(dir, CA_CERTIFICATE_FILE)), 2);

    // switch, crashed after the key moved: the directory loads with the new signer, and the
    // re-run puts it first and drops the staged certificate.
    fs::rename(dir.join(NEXT_CA_KEY_FILE), dir.join(CA_KEY_FILE)).expect("first step of switch");
    let interrupted = FleetCa::load(dir).expect("loads at every step");
    let new_device = interrupted.issue_device("dev-2", Validity::days(1)).expect("issue");
    let switched = fleet::rollover::switch(dir).expect("switch again");
    assert_eq!(switched.phase, RolloverPhase::Switched);
    assert!(read(dir, CA_CERTIFICATE_FILE).starts_with(&staged_certificate), "the new CA is first");
    assert_eq!(
        issuer_in_bundle(&read(dir, CA_CERTIFICATE_FILE), &new_device.certificate_pem),
        Some(switched.signer.clone())
    );
    // switch after it completed changes nothing.
    let bundle = read(dir, CA_CERTIFICATE_FILE);
    assert_eq!(fleet::rollover::switch(dir).expect("switch once more"), switched);
    assert_eq!(read(dir, CA_CERTIFICATE_FILE), bundle);

    // retire, crashed after the bundle (the cross-certificate left behind): the re-run removes it.
    fs::write(dir.join(CA_CERTIFICATE_FILE), &staged_certificate).expect("first step of retire");
    assert_eq!(phase(dir).expect("phase"), RolloverPhase::Stable);
    fleet::rollover::retire(dir, &[], false).expect("retire again");
    assert!(!dir.join(CROSS_CERTIFICATE_FILE).exists());
    assert_eq!(read(dir, CA_CERTIFICATE_FILE), staged_certificate);
}

#[test]
fn phases_out_of_order_are_refused() {
    let temporary = tempfile::tempdir().expect("temp dir");
    let dir = temporary.path();
    FleetCa::init(dir, "test fleet").expect("init");
    let refusal = |result: Result<fleet::rollover::RolloverReport, FleetError>| match result {
        Err(FleetError::Rollover { problem, .. }) => problem,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(refusal(fleet::rollover::switch(dir)).contains("begin"));
    fleet::rollover::begin(dir).expect("begin");
    assert!(refusal(fleet::rollover::retire(dir, &[], true)).contains("switch"));
    fleet::rollover::switch(dir).expect("switch");
    assert!(refusal(fleet::rollover::begin(dir)).contains("retire"));
}

#[test]
fn a_device_takes_no_anchor_that_a_pinned_ca_does_not_vouch_for() {
    let temporary = tempfile::tempdir().expect("temp dir");
    let fleet_dir = temporary.path().join("fleet");
    let old = FleetCa::init(&fleet_dir, "test fleet").expect("init");
    let pinned = old.certificate_pem().to_owned();
    fleet::rollover::begin(&fleet_dir).expect("begin");
    let genuine_offer = offered_trust(&fleet_dir).expect("offer");
    let genuine_new = read(&fleet_dir, NEXT_CA_CERTIFICATE_FILE);

    // A rogue fleet rolling over vouches for its own new CA: its cross-certificate does not
    // verify with the pinned CA's key.
    let rogue_dir = temporary.path().join("rogue");
    FleetCa::init(&rogue_dir, "test fleet").expect("rogue");
    fleet::rollover::begin(&rogue_dir).expect("rogue begin");
    let rogue_new = read(&rogue_dir, NEXT_CA_CERTIFICATE_FILE);
    let rogue_cross = read(&rogue_dir, CROSS_CERTIFICATE_FILE);
    let untrusted = |offer: String| match accept_trust_bundle(&pinned, &offer) {
        Err(FleetError::UntrustedAnchor { .. }) => {}
        other => panic!("an unvouched anchor was taken: {other:?}"),
    };
    untrusted(format!("{pinned}{rogue_new}{rogue_cross}"));
    // An anchor without any cross-certificate.
    untrusted(format!("{pinned}{rogue_new}"));
    // The genuine cross-certificate does not vouch for another key under the same name.
    untrusted(format!("{pinned}{rogue_new}{}", read(&fleet_dir, CROSS_CERTIFICATE_FILE)));
    // A genuine offer with one rogue anchor added is refused whole.
    untrusted(format!("{genuine_offer}{rogue_new}"));
    // The genuine offer is taken, in its order, without the cross-certificate.
    assert_eq!(
        accept_trust_bundle(&pinned, &genuine_offer).expect("genuine"),
        format!("{pinned}{genuine_new}")
    );
    // An offer of what is pinned is taken as it is.
    assert_eq!(accept_trust_bundle(&pinned, &pinned).expect("pinned"), pinned);
}
