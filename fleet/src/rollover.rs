//! Fleet CA rollover: a new CA trusted alongside the old one, devices moved to it, the old one
//! retired; and the device's rule for taking a new trust anchor.
//!
//! Files of a CA directory during a rollover, besides `ca.key`:
//! - `ca.pem`: the trust bundle, 1 to `CA_BUNDLE_CERTIFICATES_MAX` self-signed CA certificates.
//!   The one whose key is `ca.key` signs (the first, except inside an interrupted `switch`); the
//!   others are trusted alongside it by the sink, the broker and the devices.
//! - `ca.next.key` (mode 0600) and `ca.next.pem`: the new CA, staged by `begin`.
//! - `ca.cross.pem`: the new CA's name and key certified by the old CA (a cross-certificate), so
//!   a device that pins only the old CA can check the new one before trusting it. Written by
//!   `begin`, removed by `retire`.
//!
//! The phases (`core-sink ca rollover begin|switch|retire`):
//! 1. `begin`: `ca.next.key` (kept if present, so a re-run keeps the key), `ca.next.pem`,
//!    `ca.cross.pem`, then `ca.pem` = [old, new]. The old CA still signs.
//! 2. `switch`: `ca.next.key` renamed onto `ca.key` (the old key is gone), `ca.pem` = [new, old],
//!    `ca.next.pem` removed. The new CA signs; the old one is still trusted.
//! 3. `retire`: refused while devices hold a certificate of another CA than the signer (unless
//!    forced); `ca.pem` = [new], `ca.cross.pem` removed.
//!
//! Every step is one durable write, rename or removal (`durable`), and every phase reads where
//! the files are before it acts, so a phase interrupted by a crash is completed by running it
//! again. `FleetCa::load` takes the bundle certificate that matches `ca.key` as the signer, so
//! the directory loads at every step.
//!
//! **Invariant:** a device never trusts an anchor that no anchor it already trusts vouches for
//! ([`accept_trust_bundle`]): an offered anchor is taken when it is pinned already, or when a
//! cross-certificate in the offer names it (same subject, same public key), verifies with the
//! key of a pinned CA and is within its validity period.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::{CA_VALIDITY_DAYS, Validity, generate_key};
use crate::files::{self, PRIVATE_MODE, PUBLIC_MODE};
use crate::pem::{self, PEM_FILE_BYTES_MAX};
use crate::{CA_CERTIFICATE_FILE, CA_KEY_FILE, FleetCa, FleetError};

/// The staged new CA key (mode 0600), from `begin` to `switch`.
pub const NEXT_CA_KEY_FILE: &str = "ca.next.key";
/// The staged new CA certificate, from `begin` to `switch`.
pub const NEXT_CA_CERTIFICATE_FILE: &str = "ca.next.pem";
/// The new CA certified by the old one, from `begin` to `retire`.
pub const CROSS_CERTIFICATE_FILE: &str = "ca.cross.pem";
/// Most certificates a trust bundle (or an offer of anchors and cross-certificates) holds: a
/// rollover needs two anchors and one cross-certificate.
pub const CA_BUNDLE_CERTIFICATES_MAX: usize = 4;
/// Hex digits of a short CA fingerprint (`fleet list`'s ISSUER column).
pub const SHORT_FINGERPRINT_HEX: usize = 16;

/// Where a CA directory stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloverPhase {
    /// One CA, nothing staged.
    Stable,
    /// A new CA is staged and trusted; the old one signs (or `switch` was interrupted).
    Begun,
    /// The new CA signs; the old one is still trusted until `retire`.
    Switched,
}

/// What a phase did, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloverReport {
    pub phase: RolloverPhase,
    /// Short fingerprint of the signing CA afterwards.
    pub signer: String,
    /// Short fingerprints of the bundle afterwards, in order.
    pub bundle: Vec<String>,
}

fn rollover_error(dir: &Path, problem: impl Into<String>) -> FleetError {
    FleetError::Rollover { directory: dir.to_path_buf(), problem: problem.into() }
}

fn read_optional_text(path: &Path) -> Result<Option<String>, FleetError> {
    let Some(bytes) = files::read_bounded(path, PEM_FILE_BYTES_MAX)? else { return Ok(None) };
    String::from_utf8(bytes).map(Some).map_err(|_| FleetError::Certificate {
        what: path.display().to_string(),
        problem: "not UTF-8".to_owned(),
    })
}

fn remove_if_present(dir: &Path, name: &str) -> Result<(), FleetError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(durable::sync_directory(dir)?),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(files::io_error("remove", &path, source)),
    }
}

/// Where the CA directory `dir` stands.
pub fn phase(dir: &Path) -> Result<RolloverPhase, FleetError> {
    if dir.join(NEXT_CA_CERTIFICATE_FILE).exists() {
        return Ok(RolloverPhase::Begun);
    }
    let bundle = pem::read_bundle(&dir.join(CA_CERTIFICATE_FILE))?;
    Ok(if bundle.len() > 1 { RolloverPhase::Switched } else { RolloverPhase::Stable })
}

fn report(dir: &Path) -> Result<RolloverReport, FleetError> {
    let ca = FleetCa::load(dir)?;
    let bundle = pem::certificates(ca.certificate_pem(), CA_CERTIFICATE_FILE)?;
    Ok(RolloverReport {
        phase: phase(dir)?,
        signer: short_fingerprint(ca.signing_certificate()),
        bundle: bundle.iter().map(|certificate| short_fingerprint(certificate)).collect(),
    })
}

/// Parameters of a fleet CA certificate: O = `fleet_name`, CN = `common_name`, path length 0.
pub(crate) fn ca_params(fleet_name: &str, common_name: &str, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, fleet_name);
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity.apply(&mut params);
    params
}

/// Phase 1: stages a new CA, certifies it with the old one and trusts both (`ca.pem` = [old,
/// new]); the old CA keeps signing. Re-running it after a crash keeps a staged key.
pub fn begin(dir: &Path) -> Result<RolloverReport, FleetError> {
    if phase(dir)? == RolloverPhase::Switched {
        return Err(rollover_error(
            dir,
            "the new CA signs already: retire the old one before a new rollover",
        ));
    }
    let old = FleetCa::load(dir)?;
    let old_certificate = old.signing_certificate().clone();
    let parsed = pem::parse(&old_certificate, CA_CERTIFICATE_FILE)?;
    let fleet_name = parsed
        .subject()
        .iter_organization()
        .next()
        .and_then(|organization| organization.as_str().ok())
        .unwrap_or("tributary fleet")
        .to_owned();

    // The key first: once written, every re-run uses it.
    let key_path = dir.join(NEXT_CA_KEY_FILE);
    let key = match read_optional_text(&key_path)? {
        Some(key_pem) => pem::key_pair(&key_pem, &key_path.display().to_string())?,
        None => {
            let key = generate_key("the new fleet CA key")?;
            match durable::Options::default()
                .mode(PRIVATE_MODE)
                .keep_existing()
                .write(&key_path, key.serialize_pem().as_bytes())
            {
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(rollover_error(dir, "another process is staging a new CA"));
                }
                result => result?,
            }
            key
        }
    };
    let common_name = format!(
        "Tributary fleet CA {}",
        &sha256_hex(&rcgen::PublicKeyData::subject_public_key_info(&key))[..8]
    );
    let params = ca_params(&fleet_name, &common_name, Validity::days(CA_VALIDITY_DAYS));
    let next_path = dir.join(NEXT_CA_CERTIFICATE_FILE);
    let staged = read_optional_text(&next_path)?
        .and_then(|text| pem::first_certificate(&text, "").ok())
        .filter(|certificate| pem::key_matches(certificate, &key));
    let new_certificate = match staged {
        Some(certificate) => certificate,
        None => {
            let certificate = params.self_signed(&key).map_err(|source| FleetError::Generate {
                what: "the new fleet CA certificate".to_owned(),
                source,
            })?;
            files::write_replacing(&next_path, certificate.pem().as_bytes(), PUBLIC_MODE)?;
            certificate.der().clone()
        }
    };
    // The cross-certificate: the new CA's subject and key, issued by the old CA.
    let old_issuer = Issuer::from_ca_cert_der(&old_certificate, old.signing_key()?).map_err(|source| {
        FleetError::Generate { what: "an issuer from the old fleet CA".to_owned(), source }
    })?;
    let new_parsed = pem::parse(&new_certificate, NEXT_CA_CERTIFICATE_FILE)?;
    let new_common_name = new_parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|name| name.as_str().ok())
        .unwrap_or(common_name.as_str())
        .to_owned();
    let cross_params = ca_params(&fleet_name, &new_common_name, Validity::days(CA_VALIDITY_DAYS));
    let cross = cross_params.signed_by(&key, &old_issuer).map_err(|source| FleetError::Generate {
        what: "the cross-certificate of the new fleet CA".to_owned(),
        source,
    })?;
    assert!(
        vouches_for(cross.der(), &old_certificate, &new_certificate),
        "the cross-certificate names the new CA"
    );
    files::write_replacing(&dir.join(CROSS_CERTIFICATE_FILE), cross.pem().as_bytes(), PUBLIC_MODE)?;
    write_bundle(dir, &[old_certificate, new_certificate])?;
    tracing::info!(directory = %dir.display(), "fleet CA rollover begun: the new CA is trusted alongside the old");
    report(dir)
}

/// Phase 2: the staged CA becomes the signer (`ca.key` replaced by `ca.next.key`) and the first
/// of the bundle ([new, old]). Re-running it after a crash completes it; after completion it
/// changes nothing.
pub fn switch(dir: &Path) -> Result<RolloverReport, FleetError> {
    let next_path = dir.join(NEXT_CA_CERTIFICATE_FILE);
    let Some(next_pem) = read_optional_text(&next_path)? else {
        return match phase(dir)? {
            RolloverPhase::Switched => report(dir),
            _ => Err(rollover_error(dir, "no new CA is staged: run `ca rollover begin` first")),
        };
    };
    let new_certificate = pem::first_certificate(&next_pem, &next_path.display().to_string())?;
    let staged_key_path = dir.join(NEXT_CA_KEY_FILE);
    if let Some(key_pem) = read_optional_text(&staged_key_path)? {
        let key = pem::key_pair(&key_pem, &staged_key_path.display().to_string())?;
        if !pem::key_matches(&new_certificate, &key) {
            return Err(FleetError::KeyMismatch { key_path: staged_key_path, certificate_path: next_path });
        }
        durable::rename_into_place(&staged_key_path, &dir.join(CA_KEY_FILE))?;
    } else {
        // The rename happened before a crash: ca.key must be the new key now.
        let key_path = dir.join(CA_KEY_FILE);
        let key_pem = files::read_required_text(&key_path, PEM_FILE_BYTES_MAX, "the CA key")?;
        if !pem::key_matches(&new_certificate, &pem::key_pair(&key_pem, &key_path.display().to_string())?) {
            return Err(rollover_error(
                dir,
                format!(
                    "{NEXT_CA_KEY_FILE} is missing and {CA_KEY_FILE} is not the staged CA's key: run `ca rollover begin` again"
                ),
            ));
        }
    }
    let bundle = pem::read_bundle(&dir.join(CA_CERTIFICATE_FILE))?;
    let mut ordered = vec![new_certificate.clone()];
    ordered.extend(bundle.into_iter().filter(|certificate| *certificate != new_certificate));
    write_bundle(dir, &ordered)?;
    remove_if_present(dir, NEXT_CA_CERTIFICATE_FILE)?;
    tracing::info!(directory = %dir.display(), "fleet CA rollover switched: the new CA signs");
    report(dir)
}

/// Phase 3: the bundle keeps only the signer and the cross-certificate goes. `still_on_old`
/// names the active devices whose certificate another CA issued; unless `force`, retiring is
/// refused while there is any (their certificates would stop working at once).
pub fn retire(dir: &Path, still_on_old: &[String], force: bool) -> Result<RolloverReport, FleetError> {
    match phase(dir)? {
        RolloverPhase::Begun => {
            return Err(rollover_error(dir, "the new CA does not sign yet: run `ca rollover switch` first"));
        }
        RolloverPhase::Stable => {
            remove_if_present(dir, CROSS_CERTIFICATE_FILE)?;
            return report(dir);
        }
        RolloverPhase::Switched => {}
    }
    if !still_on_old.is_empty() && !force {
        let shown: Vec<&str> = still_on_old.iter().take(20).map(String::as_str).collect();
        return Err(rollover_error(
            dir,
            format!(
                "{} active devices hold a certificate of the old CA ({}{}): wait for their renewal, revoke them, or pass --force",
                still_on_old.len(),
                shown.join(", "),
                if still_on_old.len() > shown.len() { ", ..." } else { "" }
            ),
        ));
    }
    let ca = FleetCa::load(dir)?;
    write_bundle(dir, std::slice::from_ref(ca.signing_certificate()))?;
    remove_if_present(dir, CROSS_CERTIFICATE_FILE)?;
    tracing::info!(directory = %dir.display(), "fleet CA rollover done: the old CA is no longer trusted");
    report(dir)
}

fn write_bundle(dir: &Path, certificates: &[CertificateDer<'static>]) -> Result<(), FleetError> {
    assert!((1..=CA_BUNDLE_CERTIFICATES_MAX).contains(&certificates.len()), "a bundle of 1..=4 CAs");
    let text: String = certificates.iter().map(|certificate| pem::encode_certificate(certificate)).collect();
    files::write_replacing(&dir.join(CA_CERTIFICATE_FILE), text.as_bytes(), PUBLIC_MODE)
}

/// What the authority offers devices: the bundle, then the cross-certificate if a rollover is
/// under way (`ca.pem` + `ca.cross.pem`).
pub fn offered_trust(dir: &Path) -> Result<String, FleetError> {
    let mut offer =
        files::read_required_text(&dir.join(CA_CERTIFICATE_FILE), PEM_FILE_BYTES_MAX, "the CA bundle")?;
    if let Some(cross) = read_optional_text(&dir.join(CROSS_CERTIFICATE_FILE))? {
        if !offer.ends_with('\n') {
            offer.push('\n');
        }
        offer.push_str(&cross);
    }
    Ok(offer)
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The first `SHORT_FINGERPRINT_HEX` hex digits of a certificate's SHA-256.
pub fn short_fingerprint(certificate_der: &[u8]) -> String {
    sha256_hex(certificate_der)[..SHORT_FINGERPRINT_HEX].to_owned()
}

/// Whether `certificate` carries a valid signature by the key of `issuer` (ECDSA P-256 with
/// SHA-256, the fleet's only algorithm).
pub(crate) fn signed_by(certificate: &[u8], issuer: &[u8]) -> bool {
    let (Ok((_, certificate)), Ok((_, issuer))) =
        (X509Certificate::from_der(certificate), X509Certificate::from_der(issuer))
    else {
        return false;
    };
    if certificate.signature_algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        || certificate.issuer().as_raw() != issuer.subject().as_raw()
    {
        return false;
    }
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        issuer.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(certificate.tbs_certificate.as_ref(), certificate.signature_value.data.as_ref()).is_ok()
}

/// Whether `cross` certifies `anchor` (same subject, same public key, a CA) with the key of
/// `voucher`, inside its validity period.
fn vouches_for(cross: &[u8], voucher: &[u8], anchor: &[u8]) -> bool {
    let (Ok((_, cross_parsed)), Ok((_, anchor_parsed))) =
        (X509Certificate::from_der(cross), X509Certificate::from_der(anchor))
    else {
        return false;
    };
    let is_ca = matches!(cross_parsed.basic_constraints(), Ok(Some(constraints)) if constraints.value.ca);
    is_ca
        && cross_parsed.validity().is_valid()
        && cross_parsed.subject().as_raw() == anchor_parsed.subject().as_raw()
        && cross_parsed.public_key().raw == anchor_parsed.public_key().raw
        && signed_by(cross, voucher)
        && signed_by(anchor, anchor)
}

fn is_self_issued(certificate: &[u8]) -> bool {
    X509Certificate::from_der(certificate)
        .is_ok_and(|(_, parsed)| parsed.subject().as_raw() == parsed.issuer().as_raw())
}

/// Device side: the trust bundle to pin after an authority offered `offered_pem` (anchors, which
/// are self-issued, and cross-certificates, which are not), given the pinned `pinned_pem`. Every
/// offered anchor must be pinned already or vouched for by a cross-certificate signed by a
/// pinned CA; one that is neither refuses the whole offer ([`FleetError::UntrustedAnchor`]).
/// Anchors pinned but not offered are dropped (the authority retired them). Returns the new
/// bundle, PEM, in the offered order (the first is the signer).
pub fn accept_trust_bundle(pinned_pem: &str, offered_pem: &str) -> Result<String, FleetError> {
    let pinned = pem::certificates(pinned_pem, "the pinned fleet CA")?;
    let offered = pem::certificates(offered_pem, "the offered fleet CA bundle")?;
    if offered.len() > CA_BUNDLE_CERTIFICATES_MAX {
        return Err(FleetError::UntrustedAnchor {
            sha256: String::new(),
            problem: format!(
                "the offer holds {} certificates, at most {CA_BUNDLE_CERTIFICATES_MAX}",
                offered.len()
            ),
        });
    }
    let (anchors, crosses): (Vec<_>, Vec<_>) =
        offered.into_iter().partition(|certificate| is_self_issued(certificate));
    if anchors.is_empty() {
        return Err(FleetError::UntrustedAnchor {
            sha256: String::new(),
            problem: "the offer holds no CA certificate".to_owned(),
        });
    }
    for anchor in &anchors {
        if pinned.contains(anchor) {
            continue;
        }
        let vouched =
            crosses.iter().any(|cross| pinned.iter().any(|voucher| vouches_for(cross, voucher, anchor)));
        if !vouched {
            return Err(FleetError::UntrustedAnchor {
                sha256: sha256_hex(anchor),
                problem: "it is not pinned and no pinned CA vouches for it (no valid cross-certificate)"
                    .to_owned(),
            });
        }
    }
    Ok(anchors.iter().map(|anchor| pem::encode_certificate(anchor)).collect())
}

/// The union of two bundles (`first`'s certificates, then `second`'s not in `first`), PEM: what
/// a device pins while it moves from one to the other, so a crash in between leaves it trusting
/// both.
pub fn union_of_bundles(first_pem: &str, second_pem: &str) -> Result<String, FleetError> {
    let mut all = pem::certificates(first_pem, "a fleet CA bundle")?;
    for certificate in pem::certificates(second_pem, "a fleet CA bundle")? {
        if !all.contains(&certificate) {
            all.push(certificate);
        }
    }
    Ok(all.iter().map(|certificate| pem::encode_certificate(certificate)).collect())
}

/// Whether the CA certificate `ca` issued `certificate_pem` (its key signed it).
pub fn is_issued_by(certificate_pem: &str, ca: &CertificateDer<'_>) -> bool {
    pem::first_certificate(certificate_pem, "certificate")
        .is_ok_and(|certificate| signed_by(&certificate, ca))
}

/// The short fingerprint of the CA in `bundle_pem` that issued `certificate_pem` (whose key
/// signed it), if any.
pub fn issuer_in_bundle(bundle_pem: &str, certificate_pem: &str) -> Option<String> {
    let certificate = pem::first_certificate(certificate_pem, "certificate").ok()?;
    pem::certificates(bundle_pem, "bundle")
        .ok()?
        .iter()
        .find(|ca| signed_by(&certificate, ca))
        .map(|ca| short_fingerprint(ca))
}
