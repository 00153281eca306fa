//! The fleet certificate authority and the certificates it issues.
//!
//! Layout of a CA directory: `ca.pem` (the self-signed CA certificate, world-readable) and
//! `ca.key` (its PKCS#8 private key, mode 0600). Layout of an identity directory (a device's or
//! the sink's): `cert.pem`, `key.pem` (mode 0600) and `ca.pem` (the fleet CA, to verify peers).
//!
//! Every key is ECDSA P-256 (small certificates, fast handshakes on appliance CPUs, supported by
//! every TLS 1.3 stack). The CA may sign only end-entity certificates (path length 0). Device
//! certificates carry the device id as subject CN and only the clientAuth extended key usage;
//! server certificates carry their names as SANs and only serverAuth, so neither can stand in
//! for the other. Serial numbers are rcgen's default, derived from a SHA-256 of the fresh
//! public key, so they are unique per certificate.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, ServerName};

use crate::files::{self, PRIVATE_MODE, PUBLIC_MODE};
use crate::pem::{self, PEM_FILE_BYTES_MAX};
use crate::{FleetError, device_id_from_certificate, validate_device_id};

/// The CA certificate in a CA directory and in every identity directory.
pub const CA_CERTIFICATE_FILE: &str = "ca.pem";
/// The CA private key in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// An issued certificate in an identity directory.
pub const CERTIFICATE_FILE: &str = "cert.pem";
/// An issued certificate's private key in an identity directory.
pub const KEY_FILE: &str = "key.pem";

/// How long a new fleet CA is valid: ten years. It must outlive every certificate it issues, and
/// replacing it means re-issuing every device certificate, so it is long; the device
/// certificates are what callers keep short.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// How far before "now" a new validity period starts, so that a peer whose clock runs up to an
/// hour behind accepts a certificate issued a moment ago.
pub const VALIDITY_BACKDATE_SECONDS: u64 = 3600;
/// Longest fleet name in bytes: the X.509 upper bound for an organization name (RFC 5280).
pub const FLEET_NAME_BYTES_MAX: usize = 64;
/// Most names one server certificate may carry.
pub const SERVER_NAMES_MAX: usize = 16;
/// Latest time X.509 can express (GeneralizedTime 9999-12-31T23:59:59Z), in Unix seconds.
const LATEST_UNIX_SECONDS: u64 = 253_402_300_799;

/// The period in which a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (`VALIDITY_BACKDATE_SECONDS`, for peers with slow clocks) to `days` from
    /// now.
    pub fn days(days: u32) -> Validity {
        Validity::seconds(u64::from(days) * 86_400)
    }

    /// From an hour ago to `seconds` from now: short-lived certificates (and tests of renewal).
    pub fn seconds(seconds: u64) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(VALIDITY_BACKDATE_SECONDS),
            not_after: now + Duration::from_secs(seconds),
        }
    }

    /// The validity period a certificate carries.
    pub fn of_certificate(certificate_pem: &str) -> Result<Validity, FleetError> {
        let der = pem::first_certificate(certificate_pem, "certificate")?;
        let certificate = pem::parse(&der, "certificate")?;
        let at = |seconds: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0));
        Ok(Validity {
            not_before: at(certificate.validity().not_before.timestamp()),
            not_after: at(certificate.validity().not_after.timestamp()),
        })
    }

    /// When a holder should renew: once `renew_after_percent` of the lifetime has passed. The
    /// lifetime counts from the issue time (`not_before` plus the backdate, or `not_before` when
    /// that is later than `not_after` allows), not from the backdated start, so a certificate of
    /// a few seconds is not renewed at once.
    pub fn renewal_time(&self, renew_after_percent: u8) -> SystemTime {
        assert!((1..=99).contains(&renew_after_percent), "renew_after_percent in 1..=99");
        let issued = (self.not_before + Duration::from_secs(VALIDITY_BACKDATE_SECONDS)).min(self.not_after);
        let lifetime = self.not_after.duration_since(issued).unwrap_or_default();
        issued + lifetime * u32::from(renew_after_percent) / 100
    }

    fn check(&self, subject: &str) -> Result<(), FleetError> {
        let invalid = |problem: String| FleetError::InvalidValidity { subject: subject.to_owned(), problem };
        if self.not_before < UNIX_EPOCH {
            return Err(invalid("not_before is before 1970".to_owned()));
        }
        if self.not_after > UNIX_EPOCH + Duration::from_secs(LATEST_UNIX_SECONDS) {
            return Err(invalid("not_after is after 9999-12-31, which X.509 cannot express".to_owned()));
        }
        if self.not_after <= self.not_before {
            return Err(invalid("not_after must be later than not_before".to_owned()));
        }
        Ok(())
    }

    pub(crate) fn apply(&self, params: &mut CertificateParams) {
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
    }
}

/// The fleet certificate authority: its certificate and the key that signs device and server
/// certificates.
pub struct FleetCa {
    directory: PathBuf,
    /// The whole trust bundle (`ca.pem`), the signer among it.
    certificate_pem: String,
    /// The bundle certificate whose key is `ca.key`.
    signing_certificate: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for FleetCa {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The signing key stays out of logs.
        formatter.debug_struct("FleetCa").field("directory", &self.directory).finish_non_exhaustive()
    }
}

impl FleetCa {
    /// Creates `ca.pem` and `ca.key` (mode 0600) in `dir` (created if missing); refuses if
    /// `ca.key` already exists. The CA is valid for `CA_VALIDITY_DAYS`; its subject is
    /// O = `fleet_name`, CN = "Tributary fleet CA".
    pub fn init(dir: &Path, fleet_name: &str) -> Result<FleetCa, FleetError> {
        validate_fleet_name(fleet_name)?;
        let key_path = dir.join(CA_KEY_FILE);
        let certificate_path = dir.join(CA_CERTIFICATE_FILE);
        let refuse = || FleetError::CaExists { directory: dir.to_path_buf(), existing: key_path.clone() };
        // An early check so that the common mistake fails before any work; the hard link below is
        // the check that holds against a concurrent init.
        if key_path.symlink_metadata().is_ok() {
            return Err(refuse());
        }
        files::create_directory(dir)?;

        let key = generate_key("the fleet CA key")?;
        let params =
            crate::rollover::ca_params(fleet_name, "Tributary fleet CA", Validity::days(CA_VALIDITY_DAYS));
        let certificate = params.self_signed(&key).map_err(|source| FleetError::Generate {
            what: format!("the certificate of fleet CA {fleet_name:?}"),
            source,
        })?;
        let certificate_pem = certificate.pem();

        // The key is the commit point: once it exists, init refuses. The certificate follows; if
        // the process dies between the two, load names the missing ca.pem.
        match durable::Options::default()
            .mode(PRIVATE_MODE)
            .keep_existing()
            .write(&key_path, key.serialize_pem().as_bytes())
        {
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => return Err(refuse()),
            result => result?,
        }
        files::write_replacing(&certificate_path, certificate_pem.as_bytes(), PUBLIC_MODE)?;
        tracing::info!(directory = %dir.display(), fleet_name, "created fleet CA");
        Ok(FleetCa {
            directory: dir.to_path_buf(),
            certificate_pem,
            signing_certificate: certificate.der().clone(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA from `ca.pem` and `ca.key` in `dir`, checking that the certificate is a CA
    /// and that the key belongs to it.
    pub fn load(dir: &Path) -> Result<FleetCa, FleetError> {
        let key_path = dir.join(CA_KEY_FILE);
        let certificate_path = dir.join(CA_CERTIFICATE_FILE);
        let hint = format!("is {} a fleet CA directory? init creates one", dir.display());
        let (certificate_pem, key_pem) = read_pem_pair(&certificate_path, &key_path, &hint)?;

        let what = certificate_path.display().to_string();
        // A trust bundle during a rollover: the signer is the certificate of ca.key (the first,
        // except inside an interrupted `switch`), the others are trusted alongside it.
        let key = pem::key_pair(&key_pem, &key_path.display().to_string())?;
        let bundle = pem::certificates(&certificate_pem, &what)?;
        if bundle.len() > crate::rollover::CA_BUNDLE_CERTIFICATES_MAX {
            return Err(FleetError::Certificate {
                what,
                problem: format!(
                    "{} certificates, a bundle holds at most {}",
                    bundle.len(),
                    crate::rollover::CA_BUNDLE_CERTIFICATES_MAX
                ),
            });
        }
        let position = bundle.iter().position(|certificate| pem::key_matches(certificate, &key));
        let Some(position) = position else {
            return Err(FleetError::KeyMismatch { key_path, certificate_path });
        };
        if position != 0 {
            tracing::warn!(
                directory = %dir.display(),
                "the signing CA is not the first of ca.pem: a rollover switch was interrupted (run `core-sink ca rollover switch` again)"
            );
        }
        let certificate = bundle[position].clone();
        let parsed = pem::parse(&certificate, &what)?;
        let is_ca = matches!(parsed.basic_constraints(), Ok(Some(constraints)) if constraints.value.ca);
        if !is_ca {
            return Err(FleetError::Certificate {
                what,
                problem: "not a CA certificate (basic constraints do not say CA)".to_owned(),
            });
        }
        if parsed.validity().not_after.timestamp() < unix_seconds_now() {
            tracing::warn!(
                path = %certificate_path.display(),
                "fleet CA certificate has expired: every certificate it issues will be refused"
            );
        }
        let issuer = Issuer::from_ca_cert_der(&certificate, key)
            .map_err(|source| FleetError::Generate { what: format!("an issuer from {what}"), source })?;
        Ok(FleetCa {
            directory: dir.to_path_buf(),
            certificate_pem,
            signing_certificate: certificate,
            key_pem,
            issuer,
        })
    }

    /// The directory this CA was created in or loaded from.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The CA certificate, PEM: what both sides trust (during a rollover, the bundle of the
    /// CAs trusted, see `rollover.rs`).
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The certificate of the CA that signs (the one of `ca.key`), DER.
    pub fn signing_certificate(&self) -> &CertificateDer<'static> {
        &self.signing_certificate
    }

    /// A copy of the signing key, for another issuer (the CSR signer, the cross-certificate).
    pub(crate) fn signing_key(&self) -> Result<KeyPair, FleetError> {
        pem::key_pair(&self.key_pem, "the fleet CA key")
    }

    /// Client certificate: subject CN = `device_id`, EKU clientAuth, signed by the CA; a fresh
    /// ECDSA P-256 key is generated here.
    pub fn issue_device(&self, device_id: &str, validity: Validity) -> Result<IssuedCertificate, FleetError> {
        validate_device_id(device_id)?;
        let subject = format!("device {device_id}");
        validity.check(&subject)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, device_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity.apply(&mut params);
        let issued = self.sign(params, &subject)?;
        // Pair the check: what the sink will read back is what was asked for.
        let certificate = pem::first_certificate(&issued.certificate_pem, &subject)?;
        assert_eq!(device_id_from_certificate(&certificate)?, device_id);
        Ok(issued)
    }

    /// Server certificate for the sink: SANs from `names` (DNS names or IP addresses, 1 to
    /// `SERVER_NAMES_MAX`), subject CN = the first name, EKU serverAuth.
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Validity,
    ) -> Result<IssuedCertificate, FleetError> {
        let first = names.first().ok_or_else(|| FleetError::InvalidServerName {
            name: String::new(),
            problem: "no names given".to_owned(),
        })?;
        if names.len() > SERVER_NAMES_MAX {
            return Err(FleetError::InvalidServerName {
                name: first.clone(),
                problem: format!("{} names given, at most {SERVER_NAMES_MAX}", names.len()),
            });
        }
        for name in names {
            validate_server_name(name)?;
        }
        let subject = format!("server {first}");
        validity.check(&subject)?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|source| FleetError::Generate { what: format!("parameters for {subject}"), source })?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, first.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity.apply(&mut params);
        self.sign(params, &subject)
    }

    /// Signs an end-entity certificate for a fresh key; `params` carries the subject, names,
    /// extended key usage and validity.
    fn sign(&self, mut params: CertificateParams, subject: &str) -> Result<IssuedCertificate, FleetError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = generate_key(&format!("the key of {subject}"))?;
        let certificate = params.signed_by(&key, &self.issuer).map_err(|source| FleetError::Generate {
            what: format!("the certificate of {subject}"),
            source,
        })?;
        Ok(IssuedCertificate { certificate_pem: certificate.pem(), private_key_pem: key.serialize_pem() })
    }
}

pub(crate) fn generate_key(what: &str) -> Result<KeyPair, FleetError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| FleetError::Generate { what: what.to_owned(), source })
}

fn unix_seconds_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

fn validate_fleet_name(fleet_name: &str) -> Result<(), FleetError> {
    let invalid = |problem: String| FleetError::InvalidFleetName {
        fleet_name: crate::device_id::shown(fleet_name),
        problem,
    };
    if fleet_name.is_empty() {
        return Err(invalid("fleet name is empty".to_owned()));
    }
    if fleet_name.len() > FLEET_NAME_BYTES_MAX {
        return Err(invalid(format!("{} bytes, maximum {FLEET_NAME_BYTES_MAX}", fleet_name.len())));
    }
    if let Some(character) = fleet_name.chars().find(|character| character.is_control()) {
        return Err(invalid(format!("contains the control character {character:?}")));
    }
    Ok(())
}

/// Accepts what an appliance can connect to: an IP address or a syntactically valid DNS name.
fn validate_server_name(name: &str) -> Result<(), FleetError> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    ServerName::try_from(name).map(|_| ()).map_err(|error| FleetError::InvalidServerName {
        name: crate::device_id::shown(name),
        problem: error.to_string(),
    })
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key stays out of logs.
        formatter
            .debug_struct("IssuedCertificate")
            .field("certificate_pem", &self.certificate_pem)
            .finish_non_exhaustive()
    }
}

impl IssuedCertificate {
    /// Writes `cert.pem`, `key.pem` (mode 0600) and `ca.pem` into `dir` (created if missing),
    /// each atomically, replacing earlier ones (re-issuing is how a certificate is renewed).
    pub fn write_to(&self, dir: &Path, ca_pem: &str) -> Result<(), FleetError> {
        // Refuse to write what read_from or the TLS configurations would refuse to use.
        let certificate = pem::first_certificate(&self.certificate_pem, "certificate to write")?;
        let key = pem::key_pair(&self.private_key_pem, "private key to write")?;
        if !pem::key_matches(&certificate, &key) {
            return Err(FleetError::KeyMismatch {
                key_path: dir.join(KEY_FILE),
                certificate_path: dir.join(CERTIFICATE_FILE),
            });
        }
        pem::certificates(ca_pem, "CA certificate to write")?;

        files::create_directory(dir)?;
        files::write_replacing(&dir.join(KEY_FILE), self.private_key_pem.as_bytes(), PRIVATE_MODE)?;
        files::write_replacing(&dir.join(CERTIFICATE_FILE), self.certificate_pem.as_bytes(), PUBLIC_MODE)?;
        files::write_replacing(&dir.join(CA_CERTIFICATE_FILE), ca_pem.as_bytes(), PUBLIC_MODE)
    }

    /// Reads `cert.pem` and `key.pem` from `dir`, checking that the key belongs to the
    /// certificate.
    pub fn read_from(dir: &Path) -> Result<IssuedCertificate, FleetError> {
        let certificate_path = dir.join(CERTIFICATE_FILE);
        let key_path = dir.join(KEY_FILE);
        let hint = format!("is {} an identity directory? write_to creates one", dir.display());
        let (certificate_pem, private_key_pem) = read_pem_pair(&certificate_path, &key_path, &hint)?;
        let certificate = pem::first_certificate(&certificate_pem, &certificate_path.display().to_string())?;
        let key = pem::key_pair(&private_key_pem, &key_path.display().to_string())?;
        if !pem::key_matches(&certificate, &key) {
            return Err(FleetError::KeyMismatch { key_path, certificate_path });
        }
        Ok(IssuedCertificate { certificate_pem, private_key_pem })
    }

    /// The device id (subject CN) of this certificate; an error for a server certificate.
    pub fn device_id(&self) -> Result<String, FleetError> {
        device_id_from_certificate(&pem::first_certificate(&self.certificate_pem, "device certificate")?)
    }
}

/// A renewal's new key in an identity directory, written before the request that names it, so a
/// restart during a renewal asks again for the same key.
pub const NEXT_KEY_FILE: &str = "key.next.pem";
/// A renewal's new certificate, written once received; [`finish_renewal`] moves the pair into
/// place.
pub const NEXT_CERTIFICATE_FILE: &str = "cert.next.pem";

/// Writes a renewal's new key (`key.next.pem`, mode 0600, durably).
pub fn stage_renewal_key(dir: &Path, private_key_pem: &str) -> Result<(), FleetError> {
    pem::key_pair(private_key_pem, "renewal key to write")?;
    files::write_replacing(&dir.join(NEXT_KEY_FILE), private_key_pem.as_bytes(), PRIVATE_MODE)
}

/// The staged renewal key, if a renewal is under way.
pub fn staged_renewal_key(dir: &Path) -> Result<Option<String>, FleetError> {
    let path = dir.join(NEXT_KEY_FILE);
    let Some(bytes) = files::read_bounded(&path, PEM_FILE_BYTES_MAX)? else { return Ok(None) };
    let key_pem = String::from_utf8(bytes).map_err(|_| FleetError::Certificate {
        what: path.display().to_string(),
        problem: "not UTF-8".to_owned(),
    })?;
    pem::key_pair(&key_pem, &path.display().to_string())?;
    Ok(Some(key_pem))
}

/// Installs a renewed certificate for the staged key: `cert.next.pem` is written durably, then
/// [`finish_renewal`] renames the key and the certificate into place.
pub fn install_renewal(dir: &Path, certificate_pem: &str) -> Result<(), FleetError> {
    let key_pem = staged_renewal_key(dir)?.ok_or_else(|| FleetError::Certificate {
        what: dir.join(NEXT_KEY_FILE).display().to_string(),
        problem: "no renewal key is staged".to_owned(),
    })?;
    let certificate = pem::first_certificate(certificate_pem, "renewed certificate")?;
    if !pem::key_matches(&certificate, &pem::key_pair(&key_pem, "renewal key")?) {
        return Err(FleetError::KeyMismatch {
            key_path: dir.join(NEXT_KEY_FILE),
            certificate_path: dir.join(NEXT_CERTIFICATE_FILE),
        });
    }
    files::write_replacing(&dir.join(NEXT_CERTIFICATE_FILE), certificate_pem.as_bytes(), PUBLIC_MODE)?;
    let installed = finish_renewal(dir)?;
    assert!(installed, "a staged pair that matches is installed");
    Ok(())
}

/// Completes a renewal a crash interrupted, so `cert.pem` and `key.pem` are always a pair once
/// this returns: with `cert.next.pem` present, its key is `key.next.pem` (not moved yet) or
/// `key.pem` (moved, the crash came before the certificate); the key is renamed first, then the
/// certificate, then the directory is fsynced. A `cert.next.pem` that matches neither is removed.
/// Returns whether a renewed pair was moved into place.
pub fn finish_renewal(dir: &Path) -> Result<bool, FleetError> {
    let certificate_path = dir.join(NEXT_CERTIFICATE_FILE);
    let Some(bytes) = files::read_bounded(&certificate_path, PEM_FILE_BYTES_MAX)? else {
        return Ok(false);
    };
    let next_certificate =
        String::from_utf8(bytes).ok().and_then(|text| pem::first_certificate(&text, "").ok());
    let staged_key = staged_renewal_key(dir).ok().flatten();
    let matches = |key_pem: &str| {
        next_certificate.as_ref().is_some_and(|certificate| {
            pem::key_pair(key_pem, "").is_ok_and(|key| pem::key_matches(certificate, &key))
        })
    };
    if let Some(key_pem) = &staged_key
        && matches(key_pem)
    {
        durable::rename_into_place(&dir.join(NEXT_KEY_FILE), &dir.join(KEY_FILE))?;
    } else {
        let current_key = files::read_bounded(&dir.join(KEY_FILE), PEM_FILE_BYTES_MAX)?
            .and_then(|bytes| String::from_utf8(bytes).ok());
        if !current_key.as_deref().is_some_and(matches) {
            tracing::warn!(path = %certificate_path.display(), "a renewed certificate for no key we hold: removed");
            std::fs::remove_file(&certificate_path)
                .map_err(|source| files::io_error("remove", &certificate_path, source))?;
            durable::sync_directory(dir)?;
            return Ok(false);
        }
    }
    durable::rename_into_place(&certificate_path, &dir.join(CERTIFICATE_FILE))?;
    Ok(true)
}

/// Reads and checks `ca.pem` from an identity directory written by
/// [`IssuedCertificate::write_to`].
pub fn read_ca_pem(dir: &Path) -> Result<String, FleetError> {
    let path = dir.join(CA_CERTIFICATE_FILE);
    let hint = format!("is {} an identity directory? write_to creates one", dir.display());
    let ca_pem = files::read_required_text(&path, PEM_FILE_BYTES_MAX, &hint)?;
    pem::certificates(&ca_pem, &path.display().to_string())?;
    Ok(ca_pem)
}

/// Reads a certificate and its private key (PEM; both required, `hint` says what to check when
/// one is missing), warning when the key file is open to others.
fn read_pem_pair(
    certificate_path: &Path,
    key_path: &Path,
    hint: &str,
) -> Result<(String, String), FleetError> {
    let certificate_pem = files::read_required_text(certificate_path, PEM_FILE_BYTES_MAX, hint)?;
    let key_pem = files::read_required_text(key_path, PEM_FILE_BYTES_MAX, hint)?;
    files::warn_if_exposed(key_path);
    Ok((certificate_pem, key_pem))
}
