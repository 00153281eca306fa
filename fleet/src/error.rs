//! Errors of the fleet crate. Each message names the file, directory or device it concerns and,
//! where an operator can act on it, what to do next.

use std::path::PathBuf;

use thiserror::Error;

/// Why a device id is not acceptable. Device ids become directory names and dataset keys at the
/// core, hence the narrow alphabet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum DeviceIdProblem {
    #[error("device id is empty")]
    Empty,
    #[error("device id is {length} bytes, maximum {max}")]
    TooLong { length: usize, max: usize },
    #[error("device id contains {character:?} at byte {position} (allowed: A-Z a-z 0-9 _ -)")]
    ForbiddenCharacter { character: char, position: usize },
}

/// Everything that can go wrong with fleet identity, each with the context an operator needs.
#[derive(Debug, Error)]
pub enum FleetError {
    #[error("failed to {operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "refusing to create a fleet CA in {directory}: {existing} already exists (a fleet has one \
         CA: load it, or choose an empty directory)"
    )]
    CaExists { directory: PathBuf, existing: PathBuf },

    #[error("invalid device id {device_id:?}: {problem}")]
    InvalidDeviceId { device_id: String, problem: DeviceIdProblem },

    #[error("invalid fleet name {fleet_name:?}: {problem}")]
    InvalidFleetName { fleet_name: String, problem: String },

    #[error(
        "invalid server name {name:?}: {problem} (give DNS names or IP addresses the appliances \
         connect to)"
    )]
    InvalidServerName { name: String, problem: String },

    #[error("invalid validity for {subject}: {problem}")]
    InvalidValidity { subject: String, problem: String },

    #[error("{path} is {length} bytes, more than the {max} bytes such a file may have")]
    FileTooLarge { path: PathBuf, length: u64, max: u64 },

    #[error("{what} is not usable: {problem}")]
    Certificate { what: String, problem: String },

    #[error(
        "private key {key_path} does not belong to certificate {certificate_path} (restore the \
         pair from the same issue, or issue a new one)"
    )]
    KeyMismatch { key_path: PathBuf, certificate_path: PathBuf },

    #[error("failed to generate {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },

    #[error("failed to build the {side} TLS configuration: {source}")]
    Tls {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },

    #[error("failed to build the device certificate verifier: {source}")]
    Verifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },

    #[error("failed to build the {side} QUIC crypto configuration: {source}")]
    Quic {
        side: &'static str,
        #[source]
        source: quinn::crypto::rustls::NoInitialCipherSuite,
    },

    #[error("revocation list {path}, line {line}: {problem} (fix or remove the line)")]
    RevocationLine { path: PathBuf, line: usize, problem: DeviceIdProblem },

    #[error(
        "revocation list {path} line {line}: expected `key:` and 64 lowercase hex digits (SHA-256 of a public key)"
    )]
    RevocationKey { path: PathBuf, line: usize },

    #[error("CA rollover in {directory}: {problem}")]
    Rollover { directory: PathBuf, problem: String },

    #[error(
        "untrusted fleet CA offered (sha256 {sha256}): {problem}; the offer is refused and the \
         pinned CAs are kept"
    )]
    UntrustedAnchor { sha256: String, problem: String },

    #[error(
        "connection has no verified peer certificate (was it accepted with fleet::server_config, \
         which requires one?)"
    )]
    NoPeerCertificate,
}
