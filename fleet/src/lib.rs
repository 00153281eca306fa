//! Fleet identity: the fleet certificate authority, device and server certificates, the
//! revocation list, and the QUIC (quinn) TLS configurations of both sides of the uplink.
//!
//! - `authority.rs`: [`FleetCa`] (`ca.pem`, `ca.key` mode 0600), [`IssuedCertificate`]
//!   (`cert.pem`, `key.pem` mode 0600, `ca.pem`), [`Validity`]. ECDSA P-256 keys throughout.
//! - `device_id.rs`: [`validate_device_id`] (1..=128 bytes of `[A-Za-z0-9_-]`) and
//!   [`device_id_from_certificate`] (the subject CN).
//! - `revocation.rs`: [`RevocationList`], a text file of revoked device ids (at most 16 MiB).
//! - `tls.rs`: [`server_config`] and [`client_config`]: TLS 1.3, ALPN `tributary/1`, mutual
//!   certificates, no 0-RTT, no resumption; [`peer_device_id`].
//! - `rollover.rs`: CA rollover (`begin`, `switch`, `retire` on a CA directory) and the
//!   device's rule for taking a new anchor ([`rollover::accept_trust_bundle`]).
//! - `files.rs`: atomic writes (temporary file, fsync, rename, fsync directory) and bounded reads.
//!
//! Invariant: a device is identified only by the subject CN of a certificate that chains to the
//! fleet CA, is within its validity period, carries the clientAuth usage and names a device id
//! that is not on the revocation list at the moment of the handshake.
//! Invariant: private keys are written with mode 0600 and never appear in `Debug` output or logs.
//! Invariant: the crate knows no async runtime; the quinn configurations it builds are passed to
//! endpoints the appliance and the sink create.

mod authority;
pub mod csr;
mod device_id;
mod error;
pub mod files;
mod pem;
mod revocation;
pub mod rollover;
mod tls;
pub mod transport;

pub use authority::{
    CA_CERTIFICATE_FILE, CA_KEY_FILE, CA_VALIDITY_DAYS, CERTIFICATE_FILE, FLEET_NAME_BYTES_MAX, FleetCa,
    IssuedCertificate, KEY_FILE, NEXT_CERTIFICATE_FILE, NEXT_KEY_FILE, SERVER_NAMES_MAX,
    VALIDITY_BACKDATE_SECONDS, Validity, finish_renewal, install_renewal, read_ca_pem, stage_renewal_key,
    staged_renewal_key,
};
pub use csr::{CSR_PEM_BYTES_MAX, CsrProblem, CsrSigner};
pub use device_id::{
    DEVICE_ID_BYTES_MAX, device_id_from_certificate, key_fingerprint_from_certificate, validate_device_id,
};
pub use error::{DeviceIdProblem, FleetError};
pub use pem::PEM_FILE_BYTES_MAX;
pub use revocation::{REVOCATION_FILE_BYTES_MAX, RevocationList, is_key_fingerprint};
pub use tls::{client_config, client_config_with_alpn, peer_device_id, server_config};

/// The application protocol both sides negotiate; a peer that offers anything else is refused.
pub const ALPN: &[u8] = b"tributary/1";
