//! TLS configurations for QUIC (quinn) on both sides of the uplink.
//!
//! Both sides: TLS 1.3 only (QUIC requires it), the *ring* provider passed explicitly (never a
//! process-wide default), ALPN exactly `tributary/1`, no 0-RTT (replayable data has no place in
//! an exactly-once protocol) and no session resumption. Resumption is off because a resumed
//! TLS 1.3 session restores the client certificate from the ticket without verifying it again:
//! a device revoked (or expired) after its first handshake could otherwise keep reconnecting.
//!
//! The sink verifies a device in two steps at every handshake: rustls' `WebPkiClientVerifier`
//! (chain to the fleet CA, validity period, clientAuth usage), then the revocation list by
//! device id. Refusals are logged with `tracing::warn!`. A refusal rustls makes before our hooks
//! run (no certificate at all, no common cipher suite) surfaces only as the error of the
//! connection attempt (`quinn::Incoming`), which the sink logs.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::{
    ALPN, FleetError, IssuedCertificate, RevocationList, device_id_from_certificate,
    key_fingerprint_from_certificate, pem,
};

/// Longest ALPN protocol id TLS can carry.
const ALPN_BYTES_MAX: usize = 255;
/// How many of a refused client's ALPN offers a log line repeats.
const LOGGED_ALPN_OFFERS_MAX: usize = 8;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(ca_pem: &str) -> Result<RootCertStore, FleetError> {
    let mut roots = RootCertStore::empty();
    for certificate in pem::certificates(ca_pem, "fleet CA certificate")? {
        roots.add(certificate).map_err(|error| FleetError::Certificate {
            what: "fleet CA certificate".to_owned(),
            problem: format!("not usable as a trust anchor: {error}"),
        })?;
    }
    Ok(roots)
}

/// Sink side: TLS 1.3 only, ALPN exactly `tributary/1`, client certificate required and verified
/// against the fleet CA (chain and validity period), then refused if its device id (CN) is on the
/// revocation list (checked at every handshake, so a reload takes effect for new connections at
/// once). No 0-RTT, no resumption. Each refusal is logged with `tracing::warn!` naming the reason
/// and the device id if known.
pub fn server_config(
    ca_pem: &str,
    server: &IssuedCertificate,
    revocations: RevocationList,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, FleetError> {
    const SIDE: &str = "sink";
    let provider = provider();
    let tls_error = |source| FleetError::Tls { side: SIDE, source };

    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca_pem)?), provider.clone())
        .build()
        .map_err(|source| FleetError::Verifier { source })?;
    let verifier = Arc::new(FleetClientVerifier { webpki, revocations });

    let chain = pem::certificates(&server.certificate_pem, "sink certificate")?;
    let key = pem::private_key(&server.private_key_pem, "sink private key")?;
    let certified_key = Arc::new(CertifiedKey::from_der(chain, key, &provider).map_err(tls_error)?);

    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FleetCertResolver { certified_key }));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_half_rtt_data = false;
    tls.session_storage = Arc::new(NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;

    let quic = QuicServerConfig::try_from(tls).map_err(|source| FleetError::Quic { side: SIDE, source })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

/// Appliance side: verifies the sink against the fleet CA (chain, validity, serverAuth usage and
/// the server name given to `quinn::Endpoint::connect`), presents the device certificate, ALPN
/// `tributary/1`, TLS 1.3, no 0-RTT, no resumption.
pub fn client_config(
    ca_pem: &str,
    device: &IssuedCertificate,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, FleetError> {
    client_config_with_alpn(ca_pem, device, transport, ALPN)
}

/// Same as [`client_config`], but lets tests choose the ALPN (to prove a wrong ALPN is refused).
/// `alpn` must be 1 to 255 bytes.
pub fn client_config_with_alpn(
    ca_pem: &str,
    device: &IssuedCertificate,
    transport: Arc<quinn::TransportConfig>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, FleetError> {
    assert!(!alpn.is_empty() && alpn.len() <= ALPN_BYTES_MAX, "ALPN must be 1..=255 bytes");
    const SIDE: &str = "appliance";
    let tls_error = |source| FleetError::Tls { side: SIDE, source };
    let chain = pem::certificates(&device.certificate_pem, "device certificate")?;
    let key = pem::private_key(&device.private_key_pem, "device private key")?;

    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(root_store(ca_pem)?)
        .with_client_auth_cert(chain, key)
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    tls.resumption = rustls::client::Resumption::disabled();

    let quic = QuicClientConfig::try_from(tls).map_err(|source| FleetError::Quic { side: SIDE, source })?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

/// The verified peer's device id on an established connection: the subject CN of the first
/// certificate of `peer_identity()`. Meant for the sink, where the peer is a device.
pub fn peer_device_id(connection: &quinn::Connection) -> Result<String, FleetError> {
    let identity = connection.peer_identity().ok_or(FleetError::NoPeerCertificate)?;
    let certificates =
        identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| FleetError::NoPeerCertificate)?;
    let first = certificates.first().ok_or(FleetError::NoPeerCertificate)?;
    device_id_from_certificate(first)
}

/// WebPKI verification, then the revocation list.
#[derive(Debug)]
struct FleetClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    revocations: RevocationList,
}

impl ClientCertVerifier for FleetClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let device_id = device_id_from_certificate(end_entity);
        let shown_id = device_id.as_deref().unwrap_or("unknown");
        let verified = self.webpki.verify_client_cert(end_entity, intermediates, now).inspect_err(|error| {
            tracing::warn!(device_id = shown_id, reason = %error, "refused device: certificate not accepted");
        })?;
        let device_id = match device_id {
            Ok(device_id) => device_id,
            Err(error) => {
                tracing::warn!(reason = %error, "refused device: certificate names no valid device id");
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ));
            }
        };
        if self.revocations.is_revoked(&device_id) {
            tracing::warn!(
                device_id,
                path = %self.revocations.path().display(),
                "refused device: device id is on the revocation list"
            );
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        // A key revoked on its own (`fleet rebind`: the id moved to a new key) is refused under
        // any id; a certificate that parsed above has a key to fingerprint.
        if let Ok(key_sha256) = key_fingerprint_from_certificate(end_entity)
            && self.revocations.is_key_revoked(&key_sha256)
        {
            tracing::warn!(device_id, key_sha256, "refused device: its key is on the revocation list");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, certificate, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, certificate, signature).inspect_err(|error| {
            let device_id = device_id_from_certificate(certificate);
            tracing::warn!(
                device_id = device_id.as_deref().unwrap_or("unknown"),
                reason = %error,
                "refused device: handshake signature not valid"
            );
        })
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Serves the one sink certificate. It exists to log a refusal rustls makes on its own: rustls
/// refuses a client that does not offer `tributary/1` right after choosing the certificate, so
/// this is the last point where our code sees that client.
#[derive(Debug)]
struct FleetCertResolver {
    certified_key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for FleetCertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offers_ours = client_hello.alpn().is_some_and(|mut offers| offers.any(|offer| offer == ALPN));
        if !offers_ours {
            let offered: Vec<String> = client_hello
                .alpn()
                .into_iter()
                .flatten()
                .take(LOGGED_ALPN_OFFERS_MAX)
                .map(|offer| String::from_utf8_lossy(offer).into_owned())
                .collect();
            tracing::warn!(
                ?offered,
                expected = %String::from_utf8_lossy(ALPN),
                "refused connection: client does not offer the tributary ALPN (wrong protocol or version)"
            );
        }
        Some(self.certified_key.clone())
    }
}
