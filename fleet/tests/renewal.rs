//! Renewal on the device's disk: the new key is staged, the certificate joins it, and the pair
//! replaces the old one so that `cert.pem` and `key.pem` match after a crash at any step.

use std::path::Path;
use std::time::{Duration, SystemTime};

use fleet::csr::{CsrSigner, generate_device_key_and_csr};
use fleet::{
    CERTIFICATE_FILE, FleetCa, IssuedCertificate, KEY_FILE, NEXT_CERTIFICATE_FILE, NEXT_KEY_FILE,
    VALIDITY_BACKDATE_SECONDS, Validity, finish_renewal, install_renewal, stage_renewal_key,
    staged_renewal_key,
};

struct Device {
    _dir: tempfile::TempDir,
    ca: FleetCa,
    identity_dir: std::path::PathBuf,
}

fn device() -> Device {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = FleetCa::init(&dir.path().join("ca"), "renewal fleet").expect("CA");
    let identity_dir = dir.path().join("identity");
    ca.issue_device("dev-1", Validity::days(1))
        .expect("certificate")
        .write_to(&identity_dir, ca.certificate_pem())
        .expect("write");
    Device { _dir: dir, ca, identity_dir }
}

/// A new key staged and a certificate the CA signed for it.
fn renewed(device: &Device) -> (String, String) {
    let (csr_pem, key_pem) = generate_device_key_and_csr("dev-1").expect("key and CSR");
    let signer = CsrSigner::from_ca(&device.ca).expect("signer");
    let checked = CsrSigner::check(&csr_pem, "dev-1").expect("CSR");
    let certificate_pem = signer.sign(&checked, Validity::days(2)).expect("signed");
    (key_pem, certificate_pem)
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).expect("read")
}

#[test]
fn a_renewed_pair_replaces_the_old_one() {
    let device = device();
    let old = IssuedCertificate::read_from(&device.identity_dir).expect("old pair");
    let (key_pem, certificate_pem) = renewed(&device);
    stage_renewal_key(&device.identity_dir, &key_pem).expect("stage");
    assert_eq!(staged_renewal_key(&device.identity_dir).expect("read staged"), Some(key_pem.clone()));
    // Until the certificate arrives the old pair is what everyone reads.
    let before = IssuedCertificate::read_from(&device.identity_dir).expect("pair while staged");
    assert_eq!(before.certificate_pem, old.certificate_pem);

    install_renewal(&device.identity_dir, &certificate_pem).expect("install");
    let after = IssuedCertificate::read_from(&device.identity_dir).expect("renewed pair");
    assert_eq!(after.certificate_pem, certificate_pem);
    assert_eq!(after.private_key_pem, key_pem);
    assert!(!device.identity_dir.join(NEXT_KEY_FILE).exists());
    assert!(!device.identity_dir.join(NEXT_CERTIFICATE_FILE).exists());
    assert_eq!(finish_renewal(&device.identity_dir).expect("nothing left"), false);
}

#[test]
fn a_certificate_for_another_key_is_refused_and_nothing_changes() {
    let device = device();
    let old = IssuedCertificate::read_from(&device.identity_dir).expect("old pair");
    let (key_pem, _) = renewed(&device);
    let (_, foreign_certificate) = renewed(&device);
    stage_renewal_key(&device.identity_dir, &key_pem).expect("stage");
    assert!(install_renewal(&device.identity_dir, &foreign_certificate).is_err());
    let now = IssuedCertificate::read_from(&device.identity_dir).expect("pair");
    assert_eq!(now.certificate_pem, old.certificate_pem);
    assert_eq!(now.private_key_pem, old.private_key_pem);
    assert!(!device.identity_dir.join(NEXT_CERTIFICATE_FILE).exists());
}

#[test]
fn a_crash_at_any_step_leaves_a_matching_pair_after_finish() {
    // The three states a crash can leave between the certificate written and the pair in place.
    for step in ["certificate staged", "key moved", "both moved"] {
        let device = device();
        let dir = &device.identity_dir;
        let (key_pem, certificate_pem) = renewed(&device);
        stage_renewal_key(dir, &key_pem).expect("stage");
        std::fs::write(dir.join(NEXT_CERTIFICATE_FILE), &certificate_pem).expect("stage certificate");
        if step != "certificate staged" {
            std::fs::rename(dir.join(NEXT_KEY_FILE), dir.join(KEY_FILE)).expect("move key");
        }
        if step == "both moved" {
            std::fs::rename(dir.join(NEXT_CERTIFICATE_FILE), dir.join(CERTIFICATE_FILE)).expect("move cert");
        }
        finish_renewal(dir).expect("finish");
        let pair = IssuedCertificate::read_from(dir).unwrap_or_else(|error| panic!("{step}: {error}"));
        assert_eq!(pair.certificate_pem, certificate_pem, "{step}");
        assert_eq!(read(dir, KEY_FILE), key_pem, "{step}");
    }
}

#[test]
fn a_stale_staged_certificate_is_removed_and_the_old_pair_kept() {
    let device = device();
    let old = IssuedCertificate::read_from(&device.identity_dir).expect("old pair");
    let (_, foreign_certificate) = renewed(&device);
    std::fs::write(device.identity_dir.join(NEXT_CERTIFICATE_FILE), foreign_certificate).expect("write");
    assert_eq!(finish_renewal(&device.identity_dir).expect("finish"), false);
    assert!(!device.identity_dir.join(NEXT_CERTIFICATE_FILE).exists());
    assert_eq!(
        IssuedCertificate::read_from(&device.identity_dir).expect("pair").private_key_pem,
        old.private_key_pem
    );
}

#[test]
fn renewal_time_counts_the_lifetime_from_issue_not_from_the_backdated_start() {
    let validity = Validity::seconds(90);
    let issued = validity.not_before + Duration::from_secs(VALIDITY_BACKDATE_SECONDS);
    assert_eq!(validity.renewal_time(66), issued + Duration::from_secs(90) * 66 / 100);
    // Read back from a signed certificate (X.509 keeps whole seconds).
    let device = device();
    let certificate = device.ca.issue_device("dev-2", Validity::seconds(90)).expect("certificate");
    let read = Validity::of_certificate(&certificate.certificate_pem).expect("validity");
    let lifetime = read.not_after.duration_since(read.not_before).expect("ordered");
    assert_eq!(lifetime.as_secs(), VALIDITY_BACKDATE_SECONDS + 90);
    let renew_at = read.renewal_time(50);
    let now = SystemTime::now();
    assert!(renew_at > now + Duration::from_secs(30) && renew_at < now + Duration::from_secs(50));
}
