//! Device ids: the subject CN of a device certificate, 1..=128 bytes of `[A-Za-z0-9_-]`.
//!
//! The core turns a device id into a directory name and a dataset key, so the alphabet excludes
//! dots (WebDataset splits keys at the first dot), slashes and everything else a file system or
//! a shell could interpret.

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{DeviceIdProblem, FleetError};

/// Longest device id in bytes.
pub const DEVICE_ID_BYTES_MAX: usize = 128;

/// How many bytes of a rejected (possibly hostile) device id an error message repeats.
const SHOWN_BYTES_MAX: usize = 160;

/// Checks that `device_id` is 1..=128 bytes of `[A-Za-z0-9_-]`.
pub fn validate_device_id(device_id: &str) -> Result<(), FleetError> {
    device_id_problem(device_id)
        .map_or(Ok(()), |problem| Err(FleetError::InvalidDeviceId { device_id: shown(device_id), problem }))
}

pub(crate) fn device_id_problem(device_id: &str) -> Option<DeviceIdProblem> {
    if device_id.is_empty() {
        return Some(DeviceIdProblem::Empty);
    }
    if device_id.len() > DEVICE_ID_BYTES_MAX {
        return Some(DeviceIdProblem::TooLong { length: device_id.len(), max: DEVICE_ID_BYTES_MAX });
    }
    device_id
        .char_indices()
        .find(|&(_, character)| !(character.is_ascii_alphanumeric() || character == '_' || character == '-'))
        .map(|(position, character)| DeviceIdProblem::ForbiddenCharacter { character, position })
}

/// A prefix of `text` short enough for a log line, cut at a character boundary.
pub(crate) fn shown(text: &str) -> String {
    if text.len() <= SHOWN_BYTES_MAX {
        return text.to_owned();
    }
    format!("{}...", &text[..text.floor_char_boundary(SHOWN_BYTES_MAX)])
}

/// The device id (subject CN) of a DER certificate. Errors if the certificate does not parse,
/// has no CN or more than one, or its CN is not a valid device id.
pub fn device_id_from_certificate(der: &[u8]) -> Result<String, FleetError> {
    let certificate_error =
        |problem: String| FleetError::Certificate { what: "device certificate".to_owned(), problem };
    let (_, certificate) = X509Certificate::from_der(der)
        .map_err(|error| certificate_error(format!("not an X.509 certificate: {error}")))?;
    let mut common_names = certificate.subject().iter_common_name();
    let common_name = common_names
        .next()
        .ok_or_else(|| certificate_error("subject has no common name (CN), so no device id".to_owned()))?;
    if common_names.next().is_some() {
        return Err(certificate_error("subject has more than one common name (CN)".to_owned()));
    }
    let device_id = common_name
        .as_str()
        .map_err(|error| certificate_error(format!("subject common name is not a string: {error}")))?;
    validate_device_id(device_id)?;
    Ok(device_id.to_owned())
}

/// The fingerprint of the key a DER certificate names: SHA-256 of its SubjectPublicKeyInfo,
/// lowercase hex (the onboarding topics' `key_fingerprint`, the revocation list's `key:` entries).
pub fn key_fingerprint_from_certificate(der: &[u8]) -> Result<String, FleetError> {
    let (_, certificate) = X509Certificate::from_der(der).map_err(|error| FleetError::Certificate {
        what: "device certificate".to_owned(),
        problem: format!("not an X.509 certificate: {error}"),
    })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, certificate.public_key().raw);
    Ok(digest.as_ref().iter().map(|byte| format!("{byte:02x}")).collect())
}
