//! The CA, the certificates it issues, device ids and the files they live in.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::Fleet;
use fleet::{
    DEVICE_ID_BYTES_MAX, DeviceIdProblem, FleetCa, FleetError, IssuedCertificate, Validity,
    device_id_from_certificate, validate_device_id,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// The boundary of device ids: `expected` is `None` for a valid id.
fn check_device_id(device_id: &str, expected: Option<DeviceIdProblem>) {
    match (validate_device_id(device_id), expected) {
        (Ok(()), None) => {}
        (Err(FleetError::InvalidDeviceId { problem, .. }), Some(expected)) => {
            assert_eq!(problem, expected, "device id {device_id:?}")
        }
        (result, expected) => panic!("device id {device_id:?}: got {result:?}, expected {expected:?}"),
    }
}

#[test]
fn device_ids() {
    use DeviceIdProblem::*;
    check_device_id("a", None);
    check_device_id("camera-01_Z9", None);
    check_device_id("-_-", None);
    check_device_id(&"x".repeat(DEVICE_ID_BYTES_MAX), None);
    check_device_id("", Some(Empty));
    check_device_id(&"x".repeat(DEVICE_ID_BYTES_MAX + 1), Some(TooLong { length: 129, max: 128 }));
    check_device_id("cam.01", Some(ForbiddenCharacter { character: '.', position: 3 }));
    check_device_id("a/b", Some(ForbiddenCharacter { character: '/', position: 1 }));
    check_device_id("..", Some(ForbiddenCharacter { character: '.', position: 0 }));
    check_device_id("a b", Some(ForbiddenCharacter { character: ' ', position: 1 }));
    check_device_id("a\n", Some(ForbiddenCharacter { character: '\n', position: 1 }));
    check_device_id("a#b", Some(ForbiddenCharacter { character: '#', position: 1 }));
    check_device_id("a\\b", Some(ForbiddenCharacter { character: '\\', position: 1 }));
    check_device_id("zé", Some(ForbiddenCharacter { character: 'é', position: 1 }));
    check_device_id("a\0", Some(ForbiddenCharacter { character: '\0', position: 1 }));
}

#[test]
fn device_id_is_read_from_the_certificate() {
    let fleet = Fleet::new("test fleet");
    let device = fleet.device("camera-01");
    assert_eq!(device_id_from_certificate(&der(&device.certificate_pem)).expect("device id"), "camera-01");
    assert_eq!(device.device_id().expect("device id"), "camera-01");

    // A sink's CN is usually a DNS name: not a device id. (The sink's verifier refuses server
    // certificates anyway, by their extended key usage.)
    let server = fleet.ca.issue_server(&["sink.example.org".to_owned()], Validity::days(1)).expect("issue");
    assert!(matches!(
        device_id_from_certificate(&der(&server.certificate_pem)),
        Err(FleetError::InvalidDeviceId {
            problem: DeviceIdProblem::ForbiddenCharacter { character: '.', .. },
            ..
        })
    ));
    assert!(matches!(device_id_from_certificate(b"not a certificate"), Err(FleetError::Certificate { .. })));
    assert!(matches!(device_id_from_certificate(&[]), Err(FleetError::Certificate { .. })));
}

/// Certificates rcgen makes directly, to reach subjects the CA never issues.
fn self_signed_with_common_names(common_names: &[&str]) -> CertificateDer<'static> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "no device here");
    for common_name in common_names {
        params.distinguished_name.push(rcgen::DnType::CommonName, *common_name);
    }
    let key = rcgen::KeyPair::generate().expect("key");
    params.self_signed(&key).expect("certificate").der().clone()
}

#[test]
fn device_id_needs_exactly_one_valid_common_name() {
    let check = |common_names: &[&str], expected: Result<&str, &str>| {
        let result = device_id_from_certificate(&self_signed_with_common_names(common_names));
        match (&result, expected) {
            (Ok(device_id), Ok(expected)) => assert_eq!(device_id, expected),
            (Err(error), Err(expected)) => {
                assert!(error.to_string().contains(expected), "{common_names:?}: {error} lacks {expected:?}")
            }
            _ => panic!("{common_names:?}: got {result:?}, expected {expected:?}"),
        }
    };
    check(&["dev-1"], Ok("dev-1"));
    check(&[], Err("no common name"));
    // rcgen keeps one value per attribute type, so a subject with two CNs cannot be made here;
    // device_id_from_certificate refuses one ("more than one common name").
    check(&["dev/1"], Err("invalid device id"));
}

#[test]
fn init_creates_a_private_key_and_refuses_to_overwrite() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let ca_directory = directory.path().join("nested").join("ca");
    let ca = FleetCa::init(&ca_directory, "test fleet").expect("init");
    let key_path = ca_directory.join(fleet::CA_KEY_FILE);
    let certificate_path = ca_directory.join(fleet::CA_CERTIFICATE_FILE);
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(fs::read_to_string(&certificate_path).expect("ca.pem"), ca.certificate_pem());
    let key_before = fs::read(&key_path).expect("ca.key");

    let error = FleetCa::init(&ca_directory, "test fleet").expect_err("second init must be refused");
    assert!(matches!(&error, FleetError::CaExists { existing, .. } if *existing == key_path), "{error}");
    assert!(error.to_string().contains("already exists"), "{error}");
    assert_eq!(fs::read(&key_path).expect("ca.key"), key_before, "ca.key must be untouched");
    assert_eq!(fs::read_to_string(&certificate_path).expect("ca.pem"), ca.certificate_pem());
    // No temporary files left behind.
    let mut names: Vec<_> = fs::read_dir(&ca_directory)
        .expect("list")
        .map(|entry| entry.expect("entry").file_name().into_string().expect("name"))
        .collect();
    names.sort();
    assert_eq!(names, ["ca.key", "ca.pem"]);

    let loaded = FleetCa::load(&ca_directory).expect("load");
    assert_eq!(loaded.certificate_pem(), ca.certificate_pem());
}

#[test]
fn ca_certificate_is_a_constrained_ca() {
    let fleet = Fleet::new("Acme Robotics");
    let certificate = der(fleet.ca.certificate_pem());
    let (_, parsed) = X509Certificate::from_der(&certificate).expect("parse");
    let constraints = parsed.basic_constraints().expect("extension").expect("present").value;
    assert!(constraints.ca);
    assert_eq!(constraints.path_len_constraint, Some(0));
    let organization = parsed.subject().iter_organization().next().expect("O").as_str().expect("string");
    assert_eq!(organization, "Acme Robotics");
}

#[test]
fn init_checks_the_fleet_name() {
    let directory = tempfile::tempdir().expect("temporary directory");
    for fleet_name in ["", "tab\there", &"n".repeat(fleet::FLEET_NAME_BYTES_MAX + 1)] {
        let result = FleetCa::init(directory.path(), fleet_name);
        assert!(matches!(result, Err(FleetError::InvalidFleetName { .. })), "{fleet_name:?}: {result:?}");
    }
    assert!(!directory.path().join(fleet::CA_KEY_FILE).exists());
}

#[test]
fn load_refuses_a_key_of_another_ca() {
    let ours = Fleet::new("ours");
    let theirs = Fleet::new("theirs");
    let ca_directory = ours.ca.directory().to_path_buf();
    fs::copy(theirs.ca.directory().join(fleet::CA_KEY_FILE), ca_directory.join(fleet::CA_KEY_FILE))
        .expect("copy");
    let result = FleetCa::load(&ca_directory);
    assert!(matches!(result, Err(FleetError::KeyMismatch { .. })), "{result:?}");
}

#[test]
fn load_names_a_missing_file() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let error = FleetCa::load(directory.path()).expect_err("nothing to load");
    let message = error.to_string();
    assert!(message.contains("ca.pem") && message.contains("init"), "{message}");
}

#[test]
fn load_refuses_a_certificate_that_is_not_a_ca() {
    let fleet = Fleet::new("test fleet");
    let device = fleet.device("camera-01");
    let ca_directory = fleet.ca.directory().to_path_buf();
    fs::write(ca_directory.join(fleet::CA_CERTIFICATE_FILE), &device.certificate_pem).expect("write");
    fs::write(ca_directory.join(fleet::CA_KEY_FILE), &device.private_key_pem).expect("write");
    let result = FleetCa::load(&ca_directory);
    assert!(matches!(&result, Err(FleetError::Certificate { problem, .. }) if problem.contains("not a CA")));
}

#[test]
fn device_certificate_is_for_client_authentication_only() {
    let fleet = Fleet::new("test fleet");
    let device = fleet.device("camera-01");
    let certificate = der(&device.certificate_pem);
    let (_, parsed) = X509Certificate::from_der(&certificate).expect("parse");
    let usage = parsed.extended_key_usage().expect("extension").expect("present").value;
    assert!(usage.client_auth && !usage.server_auth);
    assert!(!parsed.is_ca());
    assert_eq!(
        parsed.issuer(),
        X509Certificate::from_der(&der(fleet.ca.certificate_pem())).expect("ca").1.subject()
    );
}

#[test]
fn server_certificate_names_its_addresses() {
    let fleet = Fleet::new("test fleet");
    let names = ["sink.example.org".to_owned(), "10.0.0.7".to_owned(), "::1".to_owned()];
    let server = fleet.ca.issue_server(&names, Validity::days(1)).expect("issue");
    let certificate = der(&server.certificate_pem);
    let (_, parsed) = X509Certificate::from_der(&certificate).expect("parse");
    let usage = parsed.extended_key_usage().expect("extension").expect("present").value;
    assert!(usage.server_auth && !usage.client_auth);
    let alternative_names = parsed.subject_alternative_name().expect("extension").expect("present").value;
    let general_names = &alternative_names.general_names;
    assert_eq!(general_names.len(), 3);
    assert!(matches!(general_names[0], GeneralName::DNSName("sink.example.org")));
    assert!(matches!(general_names[1], GeneralName::IPAddress(&[10, 0, 0, 7])));
    assert!(matches!(general_names[2], GeneralName::IPAddress(address) if address.len() == 16));
}

#[test]
fn issuing_checks_its_inputs() {
    let fleet = Fleet::new("test fleet");
    let ca = &fleet.ca;
    let now = SystemTime::now();
    let backwards = Validity { not_before: now, not_after: now - Duration::from_secs(1) };
    let too_late = Validity { not_before: now, not_after: now + Duration::from_secs(10_000 * 366 * 86_400) };

    assert!(matches!(ca.issue_device("cam.01", Validity::days(1)), Err(FleetError::InvalidDeviceId { .. })));
    assert!(matches!(ca.issue_device("cam-01", backwards), Err(FleetError::InvalidValidity { .. })));
    assert!(matches!(ca.issue_device("cam-01", too_late), Err(FleetError::InvalidValidity { .. })));
    assert!(matches!(ca.issue_server(&[], Validity::days(1)), Err(FleetError::InvalidServerName { .. })));
    for bad_name in ["bad name", "", "sink..example", "-sink"] {
        let result = ca.issue_server(&[bad_name.to_owned()], Validity::days(1));
        assert!(matches!(result, Err(FleetError::InvalidServerName { .. })), "{bad_name:?}: {result:?}");
    }
    let many: Vec<String> =
        (0..=fleet::SERVER_NAMES_MAX).map(|index| format!("sink{index}.example")).collect();
    assert!(matches!(ca.issue_server(&many, Validity::days(1)), Err(FleetError::InvalidServerName { .. })));
}

#[test]
fn validity_days_starts_an_hour_ago() {
    let before = SystemTime::now();
    let validity = Validity::days(2);
    let after = SystemTime::now();
    let backdate = Duration::from_secs(fleet::VALIDITY_BACKDATE_SECONDS);
    assert!(validity.not_before >= before - backdate && validity.not_before <= after - backdate);
    let length = Duration::from_secs(2 * 86_400);
    assert!(validity.not_after >= before + length && validity.not_after <= after + length);
}

#[test]
fn issued_certificate_round_trips_with_a_private_key_file() {
    let fleet = Fleet::new("test fleet");
    let device = fleet.device("camera-01");
    let directory = fleet.directory.path().join("devices").join("camera-01");
    device.write_to(&directory, fleet.ca.certificate_pem()).expect("write");
    assert_eq!(mode(&directory.join(fleet::KEY_FILE)), 0o600);
    assert_eq!(mode(&directory.join(fleet::CERTIFICATE_FILE)) & 0o600, 0o600);

    let read = IssuedCertificate::read_from(&directory).expect("read");
    assert_eq!(read.certificate_pem, device.certificate_pem);
    assert_eq!(read.private_key_pem, device.private_key_pem);
    assert_eq!(fleet::read_ca_pem(&directory).expect("ca.pem"), fleet.ca.certificate_pem());

    // Writing again (renewal) replaces the files and keeps the key private.
    let renewed = fleet.device("camera-01");
    renewed.write_to(&directory, fleet.ca.certificate_pem()).expect("rewrite");
    assert_eq!(
        IssuedCertificate::read_from(&directory).expect("read").certificate_pem,
        renewed.certificate_pem
    );
    assert_eq!(mode(&directory.join(fleet::KEY_FILE)), 0o600);

    // A key from another issue is refused, on reading and on writing.
    fs::write(directory.join(fleet::KEY_FILE), &device.private_key_pem).expect("write");
    let result = IssuedCertificate::read_from(&directory);
    assert!(matches!(result, Err(FleetError::KeyMismatch { .. })), "{result:?}");
    let mismatched = IssuedCertificate {
        certificate_pem: renewed.certificate_pem.clone(),
        private_key_pem: device.private_key_pem,
    };
    let result = mismatched.write_to(&directory, fleet.ca.certificate_pem());
    assert!(matches!(result, Err(FleetError::KeyMismatch { .. })), "{result:?}");
}

#[test]
fn debug_output_hides_private_keys() {
    let fleet = Fleet::new("test fleet");
    let device = fleet.device("camera-01");
    let shown = format!("{device:?} {:?}", fleet.ca);
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(shown.contains("BEGIN CERTIFICATE"));
}

#[test]
fn configurations_refuse_unusable_material() {
    let fleet = Fleet::new("test fleet");
    let device = fleet.device("camera-01");
    let revocations = fleet::RevocationList::open(&fleet.revocation_path()).expect("open");
    let garbage =
        IssuedCertificate { certificate_pem: "garbage".to_owned(), private_key_pem: "garbage".to_owned() };
    let transport = common::transport;

    assert!(fleet::client_config("garbage", &device, transport()).is_err());
    assert!(fleet::client_config(fleet.ca.certificate_pem(), &garbage, transport()).is_err());
    assert!(fleet::server_config("garbage", &fleet.server, revocations.clone(), transport()).is_err());
    assert!(
        fleet::server_config(fleet.ca.certificate_pem(), &garbage, revocations.clone(), transport()).is_err()
    );
    // A certificate with someone else's key.
    let swapped = IssuedCertificate {
        certificate_pem: fleet.server.certificate_pem.clone(),
        private_key_pem: device.private_key_pem.clone(),
    };
    assert!(fleet::server_config(fleet.ca.certificate_pem(), &swapped, revocations, transport()).is_err());
    assert!(fleet::client_config(fleet.ca.certificate_pem(), &swapped, transport()).is_err());
}
