//! Appliance first boot: obtain a device certificate over MQTT, or skip if there is one.
//!
//! Files in `identity_dir` (the data partition): `key.pem` (mode 0600, generated here, never
//! sent), `cert.pem` and `ca.pem` (from the authority), `sink.json` (where the QUIC sink is),
//! `config.json` (the device config, see `agent.rs`). The key is written before the first
//! request, so a reboot during onboarding asks again for the same key.
//!
//! Sequence: connect with the claim identity, client id = `{key}` (the fingerprint of the device
//! key, see `topics.rs`: nobody else can guess it, so nobody else can read the answer or take the
//! session over), subscribe to `tributary/onboarding/response/{key}` and wait for the SubAck, then
//! publish the request on `tributary/onboarding/request/{key}`; wait
//! `response_timeout_ms` for an answer and ask again, at most `attempts_max` times. A rejection
//! with a permanent code ends onboarding with that code; `pending` (operator approval) keeps
//! asking for up to `approval_wait_ms`.
//!
//! Trust anchor: the fleet CA is the one shipped in the image (the claim bundle's `ca.pem`, which
//! already verifies the broker). An answer offering a CA that is not pinned is refused
//! ([`OnboardingError::CaMismatch`]) unless a pinned CA vouches for it (a cross-certificate in the
//! offer, during a CA rollover: `fleet::rollover::accept_trust_bundle`); the certificate must
//! chain to a CA so trusted, and `ca.pem` in the identity directory holds only such CAs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet::IssuedCertificate;
use fleet::csr::{
    certificate_matches_key, csr_for_key_pem, generate_device_key_and_csr, subject_public_key_info_of_key_pem,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};

use crate::files::{self, PRIVATE_MODE};
use crate::messages::{ConfigDocument, OnboardingRequest, OnboardingResponse, parse_bounded};
use crate::mqtt::{self, Session, TlsIdentity};
use crate::{BrokerEndpoint, OnboardingError, topics};

/// Files in the identity directory besides fleet's `cert.pem`, `key.pem` and `ca.pem`.
pub const SINK_FILE: &str = "sink.json";
pub const CONFIG_FILE: &str = "config.json";

/// How a device onboards.
#[derive(Clone)]
pub struct DeviceOnboardingConfig {
    pub device_id: String,
    /// On the data partition; holds the key, the certificate and the device's state.
    pub identity_dir: PathBuf,
    pub broker: BrokerEndpoint,
    /// The claim identity shipped in the image: `cert.pem`, `key.pem`, `ca.pem` (the fleet CA,
    /// which verifies the broker and is pinned as the device's trust anchor), as `core-sink fleet
    /// claim identity` writes them.
    pub claim_identity_dir: PathBuf,
    /// The claim token; `None` asks for an operator's approval.
    pub claim_token: Option<String>,
    /// How long one request waits for its answer.
    pub response_timeout_ms: u64,
    /// Requests without an answer before giving up.
    pub attempts_max: u32,
    /// How long to keep asking while the answer is `pending`.
    pub approval_wait_ms: u64,
}

impl fmt::Debug for DeviceOnboardingConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The claim token is a secret.
        formatter
            .debug_struct("DeviceOnboardingConfig")
            .field("device_id", &self.device_id)
            .field("identity_dir", &self.identity_dir)
            .field("broker", &self.broker)
            .field("claim_identity_dir", &self.claim_identity_dir)
            .field("has_claim_token", &self.claim_token.is_some())
            .finish_non_exhaustive()
    }
}

impl DeviceOnboardingConfig {
    /// Defaults: 10 s per request, 6 attempts, one hour of waiting for an approval.
    pub fn new(
        device_id: &str,
        identity_dir: &Path,
        broker: BrokerEndpoint,
        claim_identity_dir: &Path,
        claim_token: Option<String>,
    ) -> DeviceOnboardingConfig {
        DeviceOnboardingConfig {
            device_id: device_id.to_owned(),
            identity_dir: identity_dir.to_path_buf(),
            broker,
            claim_identity_dir: claim_identity_dir.to_path_buf(),
            claim_token,
            response_timeout_ms: 10_000,
            attempts_max: 6,
            approval_wait_ms: 3_600_000,
        }
    }
}

/// Where the sink is, as the authority said.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SinkLocation {
    pub sink_address: String,
    pub sink_server_name: String,
}

/// What the uplink needs: the device certificate and key, the pinned fleet CA, the sink.
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub certificate: IssuedCertificate,
    pub ca_pem: String,
    pub sink: SinkLocation,
    /// The config persisted on the device (version 0 and empty if none yet).
    pub config: ConfigDocument,
    pub identity_dir: PathBuf,
}

/// Returns the device's identity, onboarding first if it has no certificate yet.
pub async fn ensure_identity(config: &DeviceOnboardingConfig) -> Result<DeviceIdentity, OnboardingError> {
    fleet::validate_device_id(&config.device_id)?;
    if let Some(identity) = load_identity(&config.identity_dir, &config.device_id)? {
        tracing::info!(device_id = config.device_id, "device certificate present: skipping onboarding");
        return Ok(identity);
    }
    let key_path = config.identity_dir.join(fleet::KEY_FILE);
    let (csr_pem, private_key_pem) = match files::read_bounded(&key_path, fleet::PEM_FILE_BYTES_MAX)? {
        Some(bytes) => {
            let key_pem = String::from_utf8(bytes).map_err(|_| OnboardingError::File {
                path: key_path.clone(),
                problem: "not UTF-8 PEM".to_owned(),
            })?;
            (csr_for_key_pem(&config.device_id, &key_pem)?, key_pem)
        }
        None => {
            let (csr_pem, key_pem) = generate_device_key_and_csr(&config.device_id)?;
            files::write_durably(&key_path, key_pem.as_bytes(), PRIVATE_MODE)?;
            (csr_pem, key_pem)
        }
    };
    let key_sha256 = topics::key_fingerprint(&subject_public_key_info_of_key_pem(&private_key_pem)?);
    // The operator compares this with what `core-sink fleet approve` shows (approval mode).
    tracing::info!(
        device_id = config.device_id,
        key_sha256,
        "asking the onboarding authority for a certificate"
    );
    let request = OnboardingRequest {
        device_id: config.device_id.clone(),
        claim_token: config.claim_token.clone(),
        csr_pem,
    };
    let pinned_ca_pem = fleet::read_ca_pem(&config.claim_identity_dir)?;
    let accepted = ask(config, &request, &key_sha256, &pinned_ca_pem).await?;
    let OnboardingResponse::Accepted {
        certificate_pem,
        ca_pem,
        sink_address,
        sink_server_name,
        config: device_config,
    } = accepted
    else {
        unreachable!("ask returns only an accepted response");
    };
    let trusted_ca_pem = accept_offered_trust(&pinned_ca_pem, &ca_pem)?;
    if !certificate_matches_key(&certificate_pem, &private_key_pem) {
        return Err(OnboardingError::BadAnswer("the certificate is not for this device's key".to_owned()));
    }
    let certificate = IssuedCertificate { certificate_pem, private_key_pem };
    if certificate.device_id()? != config.device_id {
        return Err(OnboardingError::BadAnswer("the certificate names another device".to_owned()));
    }
    check_issued_by(&trusted_ca_pem, &certificate.certificate_pem)?;
    device_config.validate().map_err(OnboardingError::BadAnswer)?;
    let sink = SinkLocation { sink_address, sink_server_name };
    // The sink location and config first, the certificate last: its presence means "onboarded".
    files::write_json(&config.identity_dir.join(SINK_FILE), &sink)?;
    let persisted: Option<ConfigDocument> = files::read_json(&config.identity_dir.join(CONFIG_FILE))?;
    if persisted.is_none_or(|persisted| persisted.version < device_config.version) {
        files::write_json(&config.identity_dir.join(CONFIG_FILE), &device_config)?;
    }
    certificate.write_to(&config.identity_dir, &trusted_ca_pem)?;
    tracing::info!(device_id = config.device_id, "device onboarded: certificate stored");
    load_identity(&config.identity_dir, &config.device_id)?
        .ok_or_else(|| OnboardingError::BadAnswer("the stored identity does not read back".to_owned()))
}

/// The identity stored in `identity_dir`, if onboarding completed there.
pub fn load_identity(
    identity_dir: &Path,
    device_id: &str,
) -> Result<Option<DeviceIdentity>, OnboardingError> {
    if !identity_dir.join(fleet::CERTIFICATE_FILE).exists() {
        return Ok(None);
    }
    // A renewal a power cut interrupted is completed (or dropped) before the pair is read.
    if fleet::finish_renewal(identity_dir)? {
        tracing::info!(device_id, "a renewed certificate interrupted by a restart was installed");
    }
    let certificate = IssuedCertificate::read_from(identity_dir)?;
    if certificate.device_id()? != device_id {
        return Err(OnboardingError::File {
            path: identity_dir.join(fleet::CERTIFICATE_FILE),
            problem: format!("the certificate is not for device {device_id}"),
        });
    }
    let ca_pem = fleet::read_ca_pem(identity_dir)?;
    let sink_path = identity_dir.join(SINK_FILE);
    let sink = files::read_json(&sink_path)?
        .ok_or_else(|| OnboardingError::File { path: sink_path, problem: "missing".to_owned() })?;
    let config = files::read_json(&identity_dir.join(CONFIG_FILE))?.unwrap_or_default();
    Ok(Some(DeviceIdentity {
        device_id: device_id.to_owned(),
        certificate,
        ca_pem,
        sink,
        config,
        identity_dir: identity_dir.to_path_buf(),
    }))
}

/// The certificates (DER) in a PEM text, at most `CA_CERTIFICATES_MAX`.
fn certificates_der(pem: &str, what: &str) -> Result<Vec<Vec<u8>>, OnboardingError> {
    let mut certificates = Vec::new();
    for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let certificate = certificate.map_err(|error| {
            OnboardingError::BadAnswer(format!("{what} is not PEM certificates: {error}"))
        })?;
        if certificates.len() == CA_CERTIFICATES_MAX {
            return Err(OnboardingError::BadAnswer(format!(
                "{what} holds more than {CA_CERTIFICATES_MAX} certificates"
            )));
        }
        certificates.push(certificate.as_ref().to_vec());
    }
    if certificates.is_empty() {
        return Err(OnboardingError::BadAnswer(format!("{what} holds no certificate")));
    }
    Ok(certificates)
}

/// Most certificates a CA PEM may hold (one outside a rollover; two anchors and a
/// cross-certificate during one).
const CA_CERTIFICATES_MAX: usize = fleet::rollover::CA_BUNDLE_CERTIFICATES_MAX;

/// The CAs to pin after an answer offered `offered_ca_pem` (anchors and cross-certificates):
/// each offered anchor must be pinned or vouched for by a pinned CA, otherwise the answer is
/// refused whole ([`OnboardingError::CaMismatch`]).
pub(crate) fn accept_offered_trust(
    pinned_ca_pem: &str,
    offered_ca_pem: &str,
) -> Result<String, OnboardingError> {
    let pinned = certificates_der(pinned_ca_pem, "the pinned fleet CA")?;
    let offered = certificates_der(offered_ca_pem, "the CA in the answer")?;
    fleet::rollover::accept_trust_bundle(pinned_ca_pem, offered_ca_pem).map_err(|error| {
        tracing::warn!(%error, "fleet CA offer refused");
        let fingerprint = |certificates: &[Vec<u8>]| crate::messages::sha256_hex(&certificates.concat());
        OnboardingError::CaMismatch {
            pinned_sha256: fingerprint(&pinned),
            offered_sha256: fingerprint(&offered),
        }
    })
}

/// Checks that `certificate_pem` is a client certificate issued by the pinned CA, as the sink
/// will check it (webpki, clientAuth).
pub(crate) fn check_issued_by(pinned_ca_pem: &str, certificate_pem: &str) -> Result<(), OnboardingError> {
    let bad = |problem: String| OnboardingError::BadAnswer(format!("the certificate: {problem}"));
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates_der(pinned_ca_pem, "the pinned fleet CA (claim bundle ca.pem)")? {
        roots.add(CertificateDer::from(certificate)).map_err(|error| bad(format!("pinned CA: {error}")))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
            .build()
            .map_err(|error| bad(format!("verifier: {error}")))?;
    let end_entity = CertificateDer::from_pem_slice(certificate_pem.as_bytes())
        .map_err(|error| bad(format!("not PEM: {error}")))?;
    verifier
        .verify_client_cert(&end_entity, &[], rustls_pki_types::UnixTime::now())
        .map_err(|error| bad(format!("not issued by the pinned fleet CA: {error}")))?;
    Ok(())
}

async fn ask(
    config: &DeviceOnboardingConfig,
    request: &OnboardingRequest,
    key_sha256: &str,
    pinned_ca_pem: &str,
) -> Result<OnboardingResponse, OnboardingError> {
    let claim = IssuedCertificate::read_from(&config.claim_identity_dir)?;
    let response_topic = topics::response(key_sha256);
    let mut session = Session::start(
        &config.broker,
        key_sha256,
        &TlsIdentity {
            ca_pem: pinned_ca_pem,
            certificate_pem: &claim.certificate_pem,
            private_key_pem: &claim.private_key_pem,
        },
        std::slice::from_ref(&response_topic),
    )?;
    let result = exchange(config, request, &mut session, key_sha256).await;
    session.close().await;
    result
}

async fn exchange(
    config: &DeviceOnboardingConfig,
    request: &OnboardingRequest,
    session: &mut Session,
    key_sha256: &str,
) -> Result<OnboardingResponse, OnboardingError> {
    let response_topic = topics::response(key_sha256);
    let timeout = Duration::from_millis(config.response_timeout_ms);
    let payload = serde_json::to_vec(request).expect("a request serializes");
    let approval_deadline = tokio::time::Instant::now() + Duration::from_millis(config.approval_wait_ms);
    let mut unanswered = 0;
    while unanswered < config.attempts_max {
        // Subscribed first, so the answer cannot arrive before anyone listens.
        if !session.wait_ready(timeout).await {
            unanswered += 1;
            continue;
        }
        mqtt::publish(&session.client, topics::request(key_sha256), false, payload.clone()).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = loop {
            let Ok(message) = tokio::time::timeout_at(deadline, session.incoming.recv()).await else {
                break None;
            };
            let Some(message) = message else { break None };
            if message.topic != response_topic {
                continue;
            }
            match parse_bounded::<OnboardingResponse>(&message.payload) {
                Ok(response) => break Some(response),
                Err((code, problem)) => tracing::warn!(%code, problem, "unusable onboarding answer ignored"),
            }
        };
        match answer {
            Some(accepted @ OnboardingResponse::Accepted { .. }) => return Ok(accepted),
            Some(OnboardingResponse::Rejected { code, message }) if code.is_permanent() => {
                tracing::error!(device_id = config.device_id, %code, message, "onboarding refused");
                return Err(OnboardingError::Rejected { code, message });
            }
            Some(OnboardingResponse::Pending { message })
                if tokio::time::Instant::now() < approval_deadline =>
            {
                tracing::info!(device_id = config.device_id, message, "onboarding waits for approval");
                tokio::time::sleep_until(deadline).await;
            }
            Some(other) => {
                let device_id = &config.device_id;
                tracing::warn!(device_id, answer = ?other, "onboarding not completed; asking again");
                unanswered += 1;
                // A busy authority (rate limit, too many pending) is not asked again at once.
                tokio::time::sleep_until(deadline).await;
            }
            None => unanswered += 1,
        }
    }
    Err(OnboardingError::NoAnswer { attempts: config.attempts_max, timeout_ms: config.response_timeout_ms })
}
