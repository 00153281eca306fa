//! PEM decoding shared by the CA, issued certificates and the TLS configurations, with errors that
//! say which certificate or key was at fault.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::FleetError;

/// Longest PEM file (certificate, key, CA certificate) this crate reads. One P-256 certificate is
/// about 0.7 KiB, so this leaves room for chains and comments while bounding the allocation.
pub const PEM_FILE_BYTES_MAX: u64 = 64 * 1024;

fn unusable(what: &str, problem: String) -> FleetError {
    FleetError::Certificate { what: what.to_owned(), problem }
}

/// `der` parsed as X.509; the error names `what`.
pub(crate) fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, FleetError> {
    X509Certificate::from_der(der)
        .map(|(_, certificate)| certificate)
        .map_err(|error| unusable(what, format!("not an X.509 certificate: {error}")))
}

/// All certificates in `pem`, at least one, each checked to parse as X.509.
pub(crate) fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, FleetError> {
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| unusable(what, format!("not valid PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(unusable(what, "no CERTIFICATE block in the PEM text".to_owned()));
    }
    for certificate in &certificates {
        X509Certificate::from_der(certificate)
            .map_err(|error| unusable(what, format!("not an X.509 certificate: {error}")))?;
    }
    Ok(certificates)
}

/// The first certificate of `pem`, parsed.
pub(crate) fn first_certificate(pem: &str, what: &str) -> Result<CertificateDer<'static>, FleetError> {
    Ok(certificates(pem, what)?.swap_remove(0))
}

/// The private key in `pem` (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, FleetError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|error| unusable(what, format!("no private key in the PEM text: {error}")))
}

/// An rcgen key pair from `pem` (PKCS#8 as rcgen writes it).
pub(crate) fn key_pair(pem: &str, what: &str) -> Result<rcgen::KeyPair, FleetError> {
    rcgen::KeyPair::from_pem(pem)
        .map_err(|error| unusable(what, format!("not a usable private key: {error}")))
}

/// Whether `key_pair` holds the private half of the public key in `certificate`.
pub(crate) fn key_matches(certificate: &CertificateDer<'_>, key_pair: &rcgen::KeyPair) -> bool {
    match X509Certificate::from_der(certificate) {
        Ok((_, parsed)) => parsed.public_key().subject_public_key.data.as_ref() == key_pair.public_key_raw(),
        Err(_) => false,
    }
}

/// The certificates of a bundle file (`ca.pem`), at least one.
pub(crate) fn read_bundle(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, FleetError> {
    let text = crate::files::read_required_text(path, PEM_FILE_BYTES_MAX, "a fleet CA bundle")?;
    certificates(&text, &path.display().to_string())
}

/// One certificate as a PEM block (base64 in lines of 64, as RFC 7468 writes it).
pub(crate) fn encode_certificate(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut body = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let value = chunk
            .iter()
            .enumerate()
            .fold(0u32, |value, (index, byte)| value | (u32::from(*byte) << (16 - 8 * index)));
        for index in 0..4 {
            body.push(if index <= chunk.len() {
                ALPHABET[(value >> (18 - 6 * index)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    let lines: Vec<&str> =
        body.as_bytes().chunks(64).map(|line| std::str::from_utf8(line).expect("base64 is ASCII")).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}
