//! Certificate signing requests: a device generates its key pair itself and sends only a CSR
//! (PKCS#10, PEM); the fleet CA signs a device certificate for the public key in it. The private
//! key never leaves the device.
//!
//! Checks, in order, each with its own [`CsrProblem`]: the PEM is at most `CSR_PEM_BYTES_MAX`
//! (8 KiB; a P-256 CSR is about 0.5 KiB), parses as PKCS#10, its self-signature verifies, the key
//! is ECDSA P-256 (the only key type of the fleet, see `authority.rs`), and its subject CN is the
//! device id asked for. The certificate is built from our own parameters (subject CN = device id,
//! clientAuth only, the given validity), never from extensions the request asks for.

use std::fmt;
use std::path::Path;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::pem;
use crate::{CA_CERTIFICATE_FILE, FleetCa, FleetError, Validity, device_id_from_certificate};

/// Longest CSR (PEM text) accepted; checked before parsing.
pub const CSR_PEM_BYTES_MAX: usize = 8 * 1024;

/// Length of an uncompressed ECDSA P-256 public key point (0x04, x, y).
const P256_POINT_BYTES: usize = 65;

/// Why a CSR is refused. The message is safe to send back to the device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CsrProblem {
    #[error("CSR is {length} bytes, maximum {max}")]
    TooLarge { length: usize, max: usize },
    #[error("CSR does not parse as PEM PKCS#10")]
    Malformed,
    #[error("CSR signature does not verify (the requester does not hold the key)")]
    BadSignature,
    #[error("CSR key type is not ECDSA P-256")]
    UnsupportedKeyType,
    #[error("CSR subject CN {found:?} is not the device id {expected:?} asked for")]
    SubjectMismatch { expected: String, found: String },
}

/// Signs device certificates for CSRs with the fleet CA's key.
pub struct CsrSigner {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl fmt::Debug for CsrSigner {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The signing key stays out of logs.
        formatter.debug_struct("CsrSigner").finish_non_exhaustive()
    }
}

/// A checked CSR: its subject device id and the PEM it came from.
#[derive(Clone, Debug)]
pub struct CheckedCsr {
    pub device_id: String,
    params: CertificateSigningRequestParams,
}

impl CheckedCsr {
    /// The requested public key (DER): what binds a pending request to its later approval.
    pub fn public_key_der(&self) -> &[u8] {
        rcgen::PublicKeyData::der_bytes(&self.params.public_key)
    }

    /// The requested public key as an X.509 SubjectPublicKeyInfo (DER), what `openssl pkey
    /// -pubin -outform DER` prints: the bytes a key fingerprint is taken of.
    pub fn subject_public_key_info(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.params.public_key)
    }
}

impl CsrSigner {
    /// Reads the key of `ca` from its directory (`ca.key`) and checks it belongs to `ca.pem`.
    pub fn from_ca(ca: &FleetCa) -> Result<CsrSigner, FleetError> {
        let certificate = ca.signing_certificate();
        let issuer = Issuer::from_ca_cert_der(certificate, ca.signing_key()?).map_err(|source| {
            FleetError::Generate {
                what: format!("an issuer from {}", Path::new(CA_CERTIFICATE_FILE).display()),
                source,
            }
        })?;
        Ok(CsrSigner { issuer, ca_pem: ca.certificate_pem().to_owned() })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Checks `csr_pem` (size, syntax, signature, key type, subject CN = `device_id`).
    pub fn check(csr_pem: &str, device_id: &str) -> Result<CheckedCsr, CsrProblem> {
        if csr_pem.len() > CSR_PEM_BYTES_MAX {
            return Err(CsrProblem::TooLarge { length: csr_pem.len(), max: CSR_PEM_BYTES_MAX });
        }
        let params = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|error| match error {
            rcgen::Error::InvalidCertificationRequestSignature => CsrProblem::BadSignature,
            _ => CsrProblem::Malformed,
        })?;
        // The algorithm comes from the signature's OID; the point length pins the curve (an
        // uncompressed P-256 point is 65 bytes).
        let point = rcgen::PublicKeyData::der_bytes(&params.public_key);
        if params.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 || point.len() != P256_POINT_BYTES {
            return Err(CsrProblem::UnsupportedKeyType);
        }
        let found = params
            .params
            .distinguished_name
            .iter()
            .find_map(|(kind, value)| (*kind == DnType::CommonName).then(|| text_of(value)));
        let found = found.unwrap_or_default();
        if found != device_id {
            return Err(CsrProblem::SubjectMismatch {
                expected: crate::device_id::shown(device_id),
                found: crate::device_id::shown(&found),
            });
        }
        Ok(CheckedCsr { device_id: device_id.to_owned(), params })
    }

    /// Signs a device certificate (subject CN = the device id, clientAuth only) for the key of a
    /// checked CSR; returns the certificate, PEM.
    pub fn sign(&self, csr: &CheckedCsr, validity: Validity) -> Result<String, FleetError> {
        crate::validate_device_id(&csr.device_id)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, csr.device_id.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        let request = CertificateSigningRequestParams { params, public_key: csr.params.public_key.clone() };
        let subject = format!("device {}", csr.device_id);
        let certificate = request.signed_by(&self.issuer).map_err(|source| FleetError::Generate {
            what: format!("the certificate of {subject}"),
            source,
        })?;
        // Pair the check: the certificate names the device it was asked for.
        assert_eq!(device_id_from_certificate(certificate.der())?, csr.device_id);
        Ok(certificate.pem())
    }
}

fn text_of(value: &rcgen::DnValue) -> String {
    match value {
        rcgen::DnValue::Utf8String(text) => text.clone(),
        rcgen::DnValue::PrintableString(text) => text.as_str().to_owned(),
        rcgen::DnValue::Ia5String(text) => text.as_str().to_owned(),
        _ => String::new(),
    }
}

/// A fresh ECDSA P-256 key pair and a CSR for it with subject CN = `device_id`: what a device
/// does on first boot. Returns (CSR PEM, private key PEM).
pub fn generate_device_key_and_csr(device_id: &str) -> Result<(String, String), FleetError> {
    crate::validate_device_id(device_id)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| FleetError::Generate { what: format!("the key of device {device_id}"), source })?;
    let csr = csr_for_key(device_id, &key)?;
    Ok((csr, key.serialize_pem()))
}

/// A CSR with subject CN = `device_id` for the key in `private_key_pem`.
pub fn csr_for_key_pem(device_id: &str, private_key_pem: &str) -> Result<String, FleetError> {
    let key = pem::key_pair(private_key_pem, "device private key")?;
    csr_for_key(device_id, &key)
}

fn csr_for_key(device_id: &str, key: &KeyPair) -> Result<String, FleetError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, device_id);
    let generate = |source| FleetError::Generate { what: format!("the CSR of device {device_id}"), source };
    params.serialize_request(key).and_then(|csr| csr.pem()).map_err(generate)
}

/// The SubjectPublicKeyInfo (DER) of the key in `private_key_pem`: the same bytes as
/// [`CheckedCsr::subject_public_key_info`] of a CSR made with that key.
pub fn subject_public_key_info_of_key_pem(private_key_pem: &str) -> Result<Vec<u8>, FleetError> {
    let key = pem::key_pair(private_key_pem, "device private key")?;
    Ok(rcgen::PublicKeyData::subject_public_key_info(&key))
}

/// Whether the certificate in `certificate_pem` carries the public key of `private_key_pem`.
pub fn certificate_matches_key(certificate_pem: &str, private_key_pem: &str) -> bool {
    let Ok(certificate) = pem::first_certificate(certificate_pem, "certificate") else { return false };
    let Ok(key) = pem::key_pair(private_key_pem, "private key") else { return false };
    pem::key_matches(&certificate, &key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_with_key(device_id: &str, algorithm: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(algorithm).expect("key");
        csr_for_key(device_id, &key).expect("csr")
    }

    fn check(csr_pem: &str, device_id: &str, expected: Result<(), CsrProblem>) {
        assert_eq!(CsrSigner::check(csr_pem, device_id).map(|_| ()), expected, "{device_id}");
    }

    #[test]
    fn csr_checks_name_each_problem() {
        let (good, _) = generate_device_key_and_csr("dev-1").expect("csr");
        check(&good, "dev-1", Ok(()));
        check(
            &good,
            "dev-2",
            Err(CsrProblem::SubjectMismatch { expected: "dev-2".into(), found: "dev-1".into() }),
        );
        check(
            &"x".repeat(CSR_PEM_BYTES_MAX + 1),
            "dev-1",
            Err(CsrProblem::TooLarge { length: CSR_PEM_BYTES_MAX + 1, max: CSR_PEM_BYTES_MAX }),
        );
        check("not pem", "dev-1", Err(CsrProblem::Malformed));
        check(
            &csr_with_key("dev-1", &rcgen::PKCS_ECDSA_P384_SHA384),
            "dev-1",
            Err(CsrProblem::UnsupportedKeyType),
        );
        check(&csr_with_key("dev-1", &rcgen::PKCS_ED25519), "dev-1", Err(CsrProblem::UnsupportedKeyType));
    }

    #[test]
    fn signed_certificate_carries_the_requested_key_and_device_id() {
        let directory = tempfile::tempdir().expect("temp dir");
        let ca = FleetCa::init(directory.path(), "test").expect("CA");
        let signer = CsrSigner::from_ca(&ca).expect("signer");
        let (csr_pem, key_pem) = generate_device_key_and_csr("dev-7").expect("csr");
        let checked = CsrSigner::check(&csr_pem, "dev-7").expect("checked");
        let certificate_pem = signer.sign(&checked, Validity::days(1)).expect("signed");
        assert!(certificate_matches_key(&certificate_pem, &key_pem));
        let issued = crate::IssuedCertificate { certificate_pem, private_key_pem: key_pem };
        assert_eq!(issued.device_id().expect("device id"), "dev-7");
        // It is accepted where device certificates are used: written and read back as an identity.
        issued.write_to(&directory.path().join("device"), ca.certificate_pem()).expect("write");
        crate::IssuedCertificate::read_from(&directory.path().join("device")).expect("read back");
    }

    #[test]
    fn the_key_and_its_csr_give_the_same_subject_public_key_info() {
        let (csr_pem, key_pem) = generate_device_key_and_csr("dev-1").expect("key and CSR");
        let from_key = subject_public_key_info_of_key_pem(&key_pem).expect("from key");
        let from_csr = CsrSigner::check(&csr_pem, "dev-1").expect("checked").subject_public_key_info();
        assert_eq!(from_key, from_csr);
        // A P-256 SubjectPublicKeyInfo: 26 bytes of algorithm and curve, then the 65-byte point.
        assert_eq!(from_key.len(), 26 + P256_POINT_BYTES);
        let (_, other_key_pem) = generate_device_key_and_csr("dev-1").expect("another key");
        assert_ne!(subject_public_key_info_of_key_pem(&other_key_pem).expect("other"), from_key);
    }
}
