//! The onboarding authority (core side): answers onboarding requests, records heartbeats and
//! config acknowledgements, and publishes what the operator's CLI writes into the registry
//! (config changes).
//!
//! A request arrives on `tributary/onboarding/request/{key}` and is answered on
//! `tributary/onboarding/response/{key}`, `{key}` being the fingerprint of the requester's key
//! (`topics::key_fingerprint`); a topic segment that is not even a device-id-shaped word is
//! ignored (no answer topic can be named for it). A request is checked in this order, each failure
//! answered with its [`RejectionCode`], logged at warn with the code and counted per code
//! ([`AuthorityMetrics::rejections`]): payload size (before parsing), JSON shape, device id syntax,
//! reserved ids, CSR (size, syntax, signature — the proof that the requester holds the key —,
//! ECDSA P-256, subject CN = device id), topic segment = fingerprint of the CSR's key
//! (`topic_mismatch`), then in one registry write transaction:
//!
//! 1. device revoked: `device_revoked`;
//! 2. device active with this same key: the stored certificate is sent again (a retry after a
//!    lost answer; nothing is signed or consumed);
//! 3. with a token: unknown (`unknown_token`), already used — by anyone, with any key —
//!    (`token_used`), expired (`expired_token`); then the id active with another key
//!    (`device_id_taken`) or approved for another key (`key_mismatch`); otherwise the token is
//!    consumed (device id, key fingerprint, time) and the certificate signed in that same
//!    transaction, so a token is consumed exactly when a certificate is issued;
//! 4. without a token: approval mode off (`missing_token`), id active (`device_id_taken`), id
//!    bound to another key (`key_mismatch`, the other key's fingerprint is not revealed: it names
//!    that key's answer topic); otherwise the first key to ask binds the id and the request waits
//!    (`pending`) until `core-sink fleet approve`, which signs only the bound key.
//!
//! A token outranks an unapproved request: a valid unused token signs its key even if another key
//! asked for the id without a token (otherwise anyone with the claim identity could squat ids).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleet::{CsrProblem, CsrSigner, FleetCa, RevocationList, Validity};
use serde::Deserialize;
use tokio::sync::watch;

use crate::registry::{DeviceState, Registry, sha256_hex};
use onboarding::messages::{
    ConfigAck, ConfigDocument, Heartbeat, OnboardingRequest, OnboardingResponse, RejectionCode,
    RenewalRequest, RenewalResponse, parse_bounded, shorten, unix_ms_now,
};
use onboarding::mqtt::{self, Session, TlsIdentity};
use onboarding::topics::{self, Topic};
use onboarding::{AUTHORITY_IDENTITY, BrokerEndpoint, OnboardingError, RESERVED_DEVICE_IDS};

/// How long the authority's own MQTT certificate is valid; it is re-issued at every start.
const AUTHORITY_CERTIFICATE_DAYS: u32 = 30;

/// The `[onboarding]` section of the sink's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityConfig {
    /// The fleet MQTT broker (TLS); `host` must be a name on the broker's certificate.
    pub broker: BrokerEndpoint,
    /// The device registry (heed environment).
    pub registry_dir: PathBuf,
    /// What devices are told: where the QUIC sink listens and the name on its certificate.
    pub sink_address: String,
    pub sink_server_name: String,
    /// Requests without a token wait for `core-sink fleet approve ID` instead of being refused.
    #[serde(default)]
    pub allow_operator_approval: bool,
    #[serde(default = "default_certificate_validity_days")]
    pub certificate_validity_days: u32,
    /// Overrides `certificate_validity_days` with a lifetime in seconds (short-lived certificates;
    /// the renewal tests use seconds).
    #[serde(default)]
    pub certificate_validity_seconds: Option<u64>,
    /// The config a new device starts with.
    #[serde(default)]
    pub default_config: BTreeMap<String, String>,
    /// How often the registry is checked for config changes made by the CLI.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Onboarding requests handled per second (a burst of the same size); beyond it a request is
    /// refused `rate_limited` before its CSR is even parsed, and the device asks again later.
    #[serde(default = "default_requests_per_second_max")]
    pub requests_per_second_max: u32,
    /// Unapproved pending devices the registry holds (approval mode); a request for a new id
    /// beyond it is refused `too_many_pending` until the operator approves or forgets some.
    #[serde(default = "default_pending_devices_max")]
    pub pending_devices_max: u32,
}

fn default_certificate_validity_days() -> u32 {
    365
}
fn default_poll_interval_ms() -> u64 {
    500
}
fn default_requests_per_second_max() -> u32 {
    100
}
fn default_pending_devices_max() -> u32 {
    1_000
}

impl AuthorityConfig {
    /// The validity of a certificate issued now (onboarding or renewal).
    pub fn certificate_validity(&self) -> Validity {
        match self.certificate_validity_seconds {
            Some(seconds) => Validity::seconds(seconds),
            None => Validity::days(self.certificate_validity_days),
        }
    }

    /// Resolves a relative `registry_dir` against `base` (the config file's directory).
    pub fn resolve_relative(&mut self, base: &Path) {
        if self.registry_dir.is_relative() {
            self.registry_dir = base.join(&self.registry_dir);
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=3650).contains(&self.certificate_validity_days) {
            return Err(format!(
                "onboarding.certificate_validity_days = {}: expected 1..=3650",
                self.certificate_validity_days
            ));
        }
        if let Some(seconds) = self.certificate_validity_seconds
            && !(5..=3650 * 86_400).contains(&seconds)
        {
            return Err(format!(
                "onboarding.certificate_validity_seconds = {seconds}: expected 5..=315360000 (ten years)"
            ));
        }
        if !(10..=60_000).contains(&self.poll_interval_ms) {
            return Err(format!(
                "onboarding.poll_interval_ms = {}: expected 10..=60000",
                self.poll_interval_ms
            ));
        }
        if !(1..=100_000).contains(&self.requests_per_second_max) {
            return Err(format!(
                "onboarding.requests_per_second_max = {}: expected 1..=100000",
                self.requests_per_second_max
            ));
        }
        if !(1..=1_000_000).contains(&self.pending_devices_max) {
            return Err(format!(
                "onboarding.pending_devices_max = {}: expected 1..=1000000",
                self.pending_devices_max
            ));
        }
        if self.broker.host.is_empty() || self.sink_address.is_empty() || self.sink_server_name.is_empty() {
            return Err("onboarding: broker.host, sink_address and sink_server_name must be set".to_owned());
        }
        ConfigDocument { version: 1, values: self.default_config.clone() }
            .validate()
            .map_err(|problem| format!("onboarding.default_config: {problem}"))
    }
}

/// Counters of what the authority did.
#[derive(Debug, Default)]
pub struct AuthorityMetrics {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub pending: AtomicU64,
    pub heartbeats: AtomicU64,
    pub config_acks: AtomicU64,
    pub configs_published: AtomicU64,
    pub ignored: AtomicU64,
    /// Requests answered with the certificate already issued to their key (retries).
    pub reanswered: AtomicU64,
    /// Certificates issued by renewal (refused renewals count in the rejections per code).
    pub renewed: AtomicU64,
    /// Rejections per code, indexed by [`RejectionCode::index`].
    rejected_by_code: [AtomicU64; RejectionCode::ALL.len()],
}

impl AuthorityMetrics {
    /// How many requests were refused with `code`.
    pub fn rejections(&self, code: RejectionCode) -> u64 {
        self.rejected_by_code.get(code.index()).map_or(0, |count| count.load(Ordering::Relaxed))
    }

    /// Counts one request refused with `code`.
    pub fn count_rejection(&self, code: RejectionCode) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        if let Some(count) = self.rejected_by_code.get(code.index()) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a request gets.
#[derive(Debug)]
enum Decision {
    Accepted {
        certificate_pem: String,
        config: ConfigDocument,
    },
    /// The certificate already issued to this key, sent again.
    Reanswered {
        certificate_pem: String,
        config: ConfigDocument,
    },
    Pending(String),
    Rejected(RejectionCode, String),
}

struct Handler {
    config: AuthorityConfig,
    registry: Registry,
    /// The fleet CA as last loaded from its directory; replaced when the directory changes (a CA
    /// rollover phase), checked at every poll.
    signing: std::sync::RwLock<Signing>,
    metrics: Arc<AuthorityMetrics>,
    /// `requests_per_second_max`; only the authority's task takes from it.
    requests: std::sync::Mutex<telemetry::TokenBucket>,
}

/// What the authority signs with and offers devices, from one reading of the CA directory.
struct Signing {
    signer: CsrSigner,
    /// `ca.pem` and, during a rollover, `ca.cross.pem` (`fleet::rollover::offered_trust`).
    offered_trust: String,
    /// The CA directory's files as read (bundle, key, cross-certificate), to notice a change.
    files: Vec<u8>,
}

impl Signing {
    fn load(ca: &FleetCa) -> Result<Signing, OnboardingError> {
        Ok(Signing {
            signer: CsrSigner::from_ca(ca)?,
            offered_trust: fleet::rollover::offered_trust(ca.directory())?,
            files: ca_directory_files(ca.directory())?,
        })
    }
}

/// The bytes of the CA directory's files that a rollover phase changes.
fn ca_directory_files(directory: &Path) -> Result<Vec<u8>, OnboardingError> {
    let mut bytes = Vec::new();
    for name in [fleet::CA_CERTIFICATE_FILE, fleet::CA_KEY_FILE, fleet::rollover::CROSS_CERTIFICATE_FILE] {
        let content = fleet::files::read_bounded(&directory.join(name), fleet::PEM_FILE_BYTES_MAX)?;
        bytes.extend_from_slice(&content.unwrap_or_default());
        bytes.push(0);
    }
    Ok(bytes)
}

/// The authority's MQTT session: a certificate of the signing CA, the whole bundle as trust for
/// the broker's certificate (which a rollover moves from the old CA to the new).
fn start_session(config: &AuthorityConfig, ca: &FleetCa) -> Result<Session, OnboardingError> {
    let identity = ca.issue_device(AUTHORITY_IDENTITY, Validity::days(AUTHORITY_CERTIFICATE_DAYS))?;
    // Not the bare identity name: a claim holder could connect with it and knock us off.
    let client_id = mqtt::unguessable_client_id(AUTHORITY_IDENTITY)?;
    Session::start(
        &config.broker,
        &client_id,
        &TlsIdentity {
            ca_pem: ca.certificate_pem(),
            certificate_pem: &identity.certificate_pem,
            private_key_pem: &identity.private_key_pem,
        },
        &[
            topics::REQUEST_FILTER.to_owned(),
            topics::HEARTBEAT_FILTER.to_owned(),
            topics::CONFIG_ACK_FILTER.to_owned(),
            topics::RENEW_REQUEST_FILTER.to_owned(),
        ],
    )
}

/// A running authority.
pub struct Authority {
    registry: Registry,
    metrics: Arc<AuthorityMetrics>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Session>>,
    ready: watch::Receiver<bool>,
}

impl Authority {
    /// Starts the authority on the current tokio runtime: opens the registry, puts the reserved
    /// identities on `revocation_file` (so the claim certificate shipped in images cannot stream
    /// to the sink), and connects to the broker with its own certificate.
    pub fn start(
        config: AuthorityConfig,
        ca: &FleetCa,
        revocation_file: &Path,
    ) -> Result<Authority, OnboardingError> {
        config.validate().map_err(OnboardingError::Config)?;
        let registry = Registry::open(&config.registry_dir)?;
        let signing = std::sync::RwLock::new(Signing::load(ca)?);
        for reserved in RESERVED_DEVICE_IDS {
            RevocationList::revoke(revocation_file, reserved)?;
        }
        let ca_dir = ca.directory().to_path_buf();
        let mut session = start_session(&config, ca)?;
        let metrics = Arc::new(AuthorityMetrics::default());
        let (stop, mut stopped) = watch::channel(false);
        let (ready_sender, ready) = watch::channel(false);
        let rate = u64::from(config.requests_per_second_max);
        let requests = std::sync::Mutex::new(telemetry::TokenBucket::new(rate, rate));
        let handler =
            Handler { config, registry: registry.clone(), signing, metrics: metrics.clone(), requests };
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(handler.config.poll_interval_ms));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    message = session.incoming.recv() => match message {
                        Some(message) => handler.handle(&session, &message.topic, &message.payload).await,
                        None => break,
                    },
                    _ = ticker.tick() => {
                        if let Some(ca) = handler.reload_if_changed(&ca_dir) {
                            // The broker may trust only the new CA now: a new session with a
                            // certificate of the signing CA and the new bundle as trust.
                            match start_session(&handler.config, &ca) {
                                Ok(started) => std::mem::replace(&mut session, started).close().await,
                                Err(error) => tracing::error!(%error, "authority session with the reloaded CA failed; keeping the old one"),
                            }
                        }
                        ready_sender.send_replace(session.is_ready());
                        if session.is_ready() {
                            handler.publish_configs(&session).await;
                        }
                    }
                }
            }
            session
        });
        tracing::info!(registry = %registry.path().display(), "onboarding authority started");
        Ok(Authority { registry, metrics, stop, task: Some(task), ready })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn metrics(&self) -> &AuthorityMetrics {
        &self.metrics
    }

    /// The counters, for an endpoint that outlives this borrow (the sink's `/metrics`).
    pub fn shared_metrics(&self) -> Arc<AuthorityMetrics> {
        self.metrics.clone()
    }

    /// Waits until connected and subscribed, at most `limit`.
    pub async fn wait_ready(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.ready.wait_for(|ready| *ready))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Ok(session) = task.await
        {
            session.close().await;
        }
    }
}

impl Drop for Authority {
    fn drop(&mut self) {
        // Without shutdown: the task stops at its next wakeup and its session with it.
        let _ = self.stop.send(true);
    }
}

fn csr_rejection_code(problem: &CsrProblem) -> RejectionCode {
    match problem {
        CsrProblem::TooLarge { .. } | CsrProblem::Malformed => RejectionCode::CsrMalformed,
        CsrProblem::BadSignature => RejectionCode::CsrBadSignature,
        CsrProblem::UnsupportedKeyType => RejectionCode::CsrUnsupportedKey,
        CsrProblem::SubjectMismatch { .. } => RejectionCode::CsrSubjectMismatch,
    }
}

impl Handler {
    /// Reloads the fleet CA when its directory's files changed (a rollover phase ran); returns
    /// it when it did. A directory that does not load (a phase half done) keeps the CA in use.
    fn reload_if_changed(&self, ca_dir: &Path) -> Option<FleetCa> {
        let files = match ca_directory_files(ca_dir) {
            Ok(files) => files,
            Err(error) => {
                tracing::error!(%error, "cannot read the fleet CA directory; keeping the CA in use");
                return None;
            }
        };
        if files == self.signing.read().unwrap_or_else(std::sync::PoisonError::into_inner).files {
            return None;
        }
        let loaded =
            FleetCa::load(ca_dir).map_err(OnboardingError::from).and_then(|ca| Ok((Signing::load(&ca)?, ca)));
        match loaded {
            Ok((signing, ca)) => {
                tracing::info!(directory = %ca_dir.display(), "fleet CA directory changed: signing and trust reloaded");
                *self.signing.write().unwrap_or_else(std::sync::PoisonError::into_inner) = signing;
                Some(ca)
            }
            Err(error) => {
                tracing::error!(%error, "fleet CA directory changed but does not load; keeping the CA in use");
                None
            }
        }
    }

    fn signing(&self) -> std::sync::RwLockReadGuard<'_, Signing> {
        self.signing.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn handle(&self, session: &Session, topic: &str, payload: &[u8]) {
        match topics::parse(topic) {
            Some(Topic::Request(key)) => self.answer(session, key, payload).await,
            Some(Topic::Heartbeat(device_id)) => self.heartbeat(device_id, payload),
            Some(Topic::ConfigAck(device_id)) => self.config_ack(device_id, payload),
            Some(Topic::RenewRequest(device_id)) => self.renew(session, device_id, payload).await,
            _ => {
                self.metrics.ignored.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(topic, "ignoring a message on an unexpected topic");
            }
        }
    }

    /// One request's share of `requests_per_second_max` (onboarding and renewal alike).
    fn take_request_token(&self) -> bool {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .try_take(std::time::Instant::now(), 1)
    }

    async fn answer(&self, session: &Session, topic_key: &str, payload: &[u8]) {
        if fleet::validate_device_id(topic_key).is_err() {
            // Not a word an answer topic can be named after; the ACL keeps such topics
            // unreachable for everyone but the authority.
            self.metrics.count_rejection(RejectionCode::TopicMismatch);
            let shown = shorten(topic_key);
            tracing::warn!(topic_key = shown, "onboarding request on an invalid topic ignored");
            return;
        }
        let within_rate = self.take_request_token();
        let decided = if within_rate {
            self.decide(topic_key, payload)
        } else {
            let message = "the authority is busy; ask again later".to_owned();
            Ok((None, Decision::Rejected(RejectionCode::RateLimited, message)))
        };
        let (device_id, decision) = match decided {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::error!(topic_key, %error, "onboarding request failed");
                let message = "the authority failed; try again later".to_owned();
                (None, Decision::Rejected(RejectionCode::InternalError, message))
            }
        };
        let device_id = device_id.unwrap_or_default();
        let accepted = |certificate_pem, config| OnboardingResponse::Accepted {
            certificate_pem,
            ca_pem: self.signing().offered_trust.clone(),
            sink_address: self.config.sink_address.clone(),
            sink_server_name: self.config.sink_server_name.clone(),
            config,
        };
        let response = match decision {
            Decision::Accepted { certificate_pem, config } => {
                self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(device_id, key_sha256 = topic_key, "device onboarded: certificate issued");
                accepted(certificate_pem, config)
            }
            Decision::Reanswered { certificate_pem, config } => {
                self.metrics.reanswered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(device_id, key_sha256 = topic_key, "certificate sent again to its key");
                accepted(certificate_pem, config)
            }
            Decision::Pending(message) => {
                self.metrics.pending.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    device_id,
                    key_sha256 = topic_key,
                    "onboarding request waits for operator approval"
                );
                OnboardingResponse::Pending { message }
            }
            Decision::Rejected(code, message) => {
                self.metrics.count_rejection(code);
                let message = shorten(&message);
                tracing::warn!(
                    device_id,
                    key_sha256 = topic_key,
                    %code,
                    message,
                    "onboarding request rejected"
                );
                OnboardingResponse::Rejected { code, message }
            }
        };
        let bytes = serde_json::to_vec(&response).expect("a response serializes");
        if let Err(error) = mqtt::publish(&session.client, topics::response(topic_key), false, bytes).await {
            tracing::error!(key_sha256 = topic_key, %error, "could not send the onboarding response");
        }
    }

    /// Decides on one request; returns the device id it named (once it is known to be valid, for
    /// logs) with the decision.
    fn decide(&self, topic_key: &str, payload: &[u8]) -> Result<(Option<String>, Decision), OnboardingError> {
        let reject = |code, message: String| Ok((None, Decision::Rejected(code, message)));
        let request: OnboardingRequest = match parse_bounded(payload) {
            Ok(request) => request,
            Err((code, message)) => return reject(code, message),
        };
        let device_id = request.device_id.as_str();
        if let Err(error) = fleet::validate_device_id(device_id) {
            return reject(RejectionCode::InvalidDeviceId, error.to_string());
        }
        let named = Some(device_id.to_owned());
        let reject = |code, message: String| Ok((named.clone(), Decision::Rejected(code, message)));
        if RESERVED_DEVICE_IDS.contains(&device_id) {
            return reject(RejectionCode::ReservedDeviceId, format!("{device_id} is reserved"));
        }
        let csr = match CsrSigner::check(&request.csr_pem, device_id) {
            Ok(csr) => csr,
            Err(problem) => return reject(csr_rejection_code(&problem), problem.to_string()),
        };
        // The CSR's signature verified: the requester holds this key. The topic must be named
        // after it, so the answer goes only to a client whose id is this key's fingerprint.
        let key_sha256 = topics::key_fingerprint(&csr.subject_public_key_info());
        if key_sha256 != topic_key {
            return reject(
                RejectionCode::TopicMismatch,
                format!(
                    "the request topic must end in the SHA-256 of the CSR's public key \
                     (SubjectPublicKeyInfo, DER, lowercase hex): {key_sha256}"
                ),
            );
        }
        if let Some(token) = &request.claim_token
            && token.len() > onboarding::messages::CLAIM_TOKEN_BYTES_MAX
        {
            return reject(
                RejectionCode::UnknownToken,
                "claim token is not one this fleet issued".to_owned(),
            );
        }
        let now = unix_ms_now();
        let validity = self.config.certificate_validity();
        let refuse = |code, message: String| Ok(Err(Decision::Rejected(code, message)));
        let outcome = self.registry.write(|transaction| {
            let existing = transaction.device(device_id)?;
            if existing.as_ref().is_some_and(|record| record.state == DeviceState::Revoked) {
                return refuse(RejectionCode::DeviceRevoked, format!("device {device_id} is revoked"));
            }
            if let Some(record) = &existing
                && record.state == DeviceState::Active
                && record.key_sha256.as_deref() == Some(key_sha256.as_str())
                && let Some(certificate_pem) = &record.certificate_pem
            {
                // A retry after a lost answer: nothing changes, so nothing is committed (the
                // error side of `write` rolls back; here it only carries the answer).
                return Ok(Err(Decision::Reanswered {
                    certificate_pem: certificate_pem.clone(),
                    config: record.config.clone(),
                }));
            }
            let is_new_record = existing.is_none();
            let mut record =
                existing.unwrap_or_else(|| Registry::new_record(device_id, &self.config.default_config));
            let bound_to_other_key =
                record.pending_key_sha256.as_deref().is_some_and(|bound| bound != key_sha256);
            match &request.claim_token {
                Some(token) => {
                    let token_hash = sha256_hex(token.as_bytes());
                    let Some(mut token_record) = transaction.token(&token_hash)? else {
                        return refuse(
                            RejectionCode::UnknownToken,
                            "claim token is not one this fleet issued".to_owned(),
                        );
                    };
                    if token_record.used_by.is_some() {
                        return refuse(
                            RejectionCode::TokenUsed,
                            "claim token was already used (a token is single-use; ask the operator \
                             for a new one)"
                                .to_owned(),
                        );
                    }
                    if now > token_record.expires_unix_ms {
                        return refuse(
                            RejectionCode::ExpiredToken,
                            "claim token has expired; ask the operator for a new one".to_owned(),
                        );
                    }
                    if record.state == DeviceState::Active {
                        return refuse(
                            RejectionCode::DeviceIdTaken,
                            format!("device id {device_id} belongs to another device (another key)"),
                        );
                    }
                    if record.approved && bound_to_other_key {
                        return refuse(
                            RejectionCode::KeyMismatch,
                            format!("device id {device_id} is approved for another key"),
                        );
                    }
                    token_record.used_by = Some(device_id.to_owned());
                    token_record.used_by_key_sha256 = Some(key_sha256.clone());
                    token_record.used_unix_ms = Some(now);
                    transaction.put_token(&token_hash, &token_record)?;
                    record.token_hash = Some(token_hash);
                }
                None => {
                    if !self.config.allow_operator_approval {
                        return refuse(RejectionCode::MissingToken, "a claim token is required".to_owned());
                    }
                    if record.state == DeviceState::Active {
                        return refuse(
                            RejectionCode::DeviceIdTaken,
                            format!("device id {device_id} is already onboarded with another key"),
                        );
                    }
                    if bound_to_other_key {
                        return refuse(
                            RejectionCode::KeyMismatch,
                            format!(
                                "device id {device_id} is requested by another key; if that is not \
                                 yours, the operator can approve yours: `core-sink fleet approve \
                                 {device_id} --key-sha256 {key_sha256}`"
                            ),
                        );
                    }
                    if is_new_record
                        && transaction.unapproved_count()? >= u64::from(self.config.pending_devices_max)
                    {
                        return refuse(
                            RejectionCode::TooManyPending,
                            format!(
                                "{} devices already wait for approval; ask again later",
                                self.config.pending_devices_max
                            ),
                        );
                    }
                    if record.pending_key_sha256.is_none() {
                        // The first key to ask binds the id; the operator sees its fingerprint.
                        record.pending_key_sha256 = Some(key_sha256.clone());
                        transaction.put_device(&record)?;
                    }
                    if !record.approved {
                        return Ok(Ok(Decision::Pending(format!(
                            "waiting for `core-sink fleet approve {device_id}` (key sha256 {key_sha256})"
                        ))));
                    }
                }
            }
            let certificate_pem = self.signing().signer.sign(&csr, validity)?;
            record.state = DeviceState::Active;
            record.certificate_pem = Some(certificate_pem.clone());
            record.onboarded_unix_ms = Some(now);
            record.pending_key_sha256 = None;
            record.key_sha256 = Some(key_sha256.clone());
            transaction.put_device(&record)?;
            Ok(Ok(Decision::Accepted { certificate_pem, config: record.config.clone() }))
        })?;
        Ok((named, outcome.unwrap_or_else(|decision| decision)))
    }

    /// Answers a renewal. The request came through the broker on the device's own topic, which
    /// only a client holding a certificate for `device_id` may publish to (ACL on the CN): that is
    /// the proof of the old identity, as EST's re-enrollment takes it from the TLS session. The
    /// CSR's signature proves the new key. Checked: size and shape, device id, reserved ids, the
    /// rate, the CSR (subject CN = the id), then in one registry transaction the device must be
    /// active (`device_revoked`, `not_onboarded`); a request for the key the current certificate
    /// already names gets that certificate again (a retry after a lost answer).
    async fn renew(&self, session: &Session, device_id: &str, payload: &[u8]) {
        if fleet::validate_device_id(device_id).is_err() {
            self.metrics.ignored.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device_id = %shorten(device_id), "renewal on an invalid topic ignored");
            return;
        }
        let within_rate = self.take_request_token();
        let decided = if within_rate {
            self.decide_renewal(device_id, payload).unwrap_or_else(|error| {
                tracing::error!(device_id, %error, "renewal failed");
                Err((RejectionCode::InternalError, "the authority failed; try again later".to_owned()))
            })
        } else {
            Err((RejectionCode::RateLimited, "the authority is busy; ask again later".to_owned()))
        };
        let response = match decided {
            Ok((certificate_pem, key_sha256, reanswer)) => {
                if reanswer {
                    self.metrics.reanswered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(device_id, key_sha256, "renewed certificate sent again to its key");
                } else {
                    self.metrics.renewed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(device_id, key_sha256, "certificate renewed");
                }
                RenewalResponse::Renewed {
                    certificate_pem,
                    key_sha256,
                    ca_pem: Some(self.signing().offered_trust.clone()),
                }
            }
            Err((code, message)) => {
                self.metrics.count_rejection(code);
                let message = shorten(&message);
                tracing::warn!(device_id, %code, message, "renewal refused");
                RenewalResponse::Rejected { code, message }
            }
        };
        let bytes = serde_json::to_vec(&response).expect("a response serializes");
        if let Err(error) =
            mqtt::publish(&session.client, topics::renew_response(device_id), false, bytes).await
        {
            tracing::error!(device_id, %error, "could not send the renewal response");
        }
    }

    /// The certificate, its key's fingerprint and whether it was issued before (a retry), or the
    /// refusal.
    #[allow(clippy::type_complexity)]
    fn decide_renewal(
        &self,
        device_id: &str,
        payload: &[u8],
    ) -> Result<Result<(String, String, bool), (RejectionCode, String)>, OnboardingError> {
        let request: RenewalRequest = match parse_bounded(payload) {
            Ok(request) => request,
            Err(refusal) => return Ok(Err(refusal)),
        };
        if RESERVED_DEVICE_IDS.contains(&device_id) {
            return Ok(Err((RejectionCode::ReservedDeviceId, format!("{device_id} is reserved"))));
        }
        let csr = match CsrSigner::check(&request.csr_pem, device_id) {
            Ok(csr) => csr,
            Err(problem) => return Ok(Err((csr_rejection_code(&problem), problem.to_string()))),
        };
        let key_sha256 = topics::key_fingerprint(&csr.subject_public_key_info());
        let now = unix_ms_now();
        let validity = self.config.certificate_validity();
        self.registry.write(|transaction| {
            let Some(mut record) = transaction.device(device_id)? else {
                return Ok(Err((
                    RejectionCode::NotOnboarded,
                    format!("device {device_id} is not onboarded"),
                )));
            };
            match record.state {
                DeviceState::Revoked => {
                    return Ok(Err((RejectionCode::DeviceRevoked, format!("device {device_id} is revoked"))));
                }
                DeviceState::Pending => {
                    return Ok(Err((
                        RejectionCode::NotOnboarded,
                        format!("device {device_id} is not onboarded"),
                    )));
                }
                DeviceState::Active => {}
            }
            if record.key_sha256.as_deref() == Some(key_sha256.as_str())
                && let Some(certificate_pem) = &record.certificate_pem
            {
                return Ok(Ok((certificate_pem.clone(), key_sha256.clone(), true)));
            }
            let certificate_pem = self.signing().signer.sign(&csr, validity)?;
            record.certificate_pem = Some(certificate_pem.clone());
            record.key_sha256 = Some(key_sha256.clone());
            record.renewals += 1;
            record.renewed_unix_ms = Some(now);
            transaction.put_device(&record)?;
            Ok(Ok((certificate_pem, key_sha256.clone(), false)))
        })
    }

    fn heartbeat(&self, device_id: &str, payload: &[u8]) {
        let Some(heartbeat) = parse_or_warn::<Heartbeat>(device_id, payload, "heartbeat refused") else {
            return;
        };
        if let Err(problem) = heartbeat.validate() {
            tracing::warn!(device_id = %shorten(device_id), problem, "heartbeat refused");
            return;
        }
        let received = unix_ms_now();
        let recorded = self.registry.update_device(device_id, |record| {
            if record.state != DeviceState::Active {
                return false;
            }
            record.last_heartbeat = Some(heartbeat);
            record.last_heartbeat_received_unix_ms = Some(received);
            true
        });
        match recorded {
            Ok(true) => {
                self.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {
                tracing::warn!(
                    device_id = shorten(device_id),
                    "heartbeat of a device that is not active ignored"
                )
            }
            Err(error) => tracing::error!(device_id, %error, "could not record a heartbeat"),
        }
    }

    fn config_ack(&self, device_id: &str, payload: &[u8]) {
        let Some(ack) = parse_or_warn::<ConfigAck>(device_id, payload, "config ack refused") else { return };
        let recorded = self.registry.update_device(device_id, |record| {
            if record.state != DeviceState::Active || ack.version > record.config.version {
                return false;
            }
            if ack.applied {
                record.config_acked_version = record.config_acked_version.max(ack.version);
            }
            record.config_ack_message = Some(shorten(&ack.message));
            true
        });
        match recorded {
            Ok(true) => {
                self.metrics.config_acks.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    device_id,
                    version = ack.version,
                    applied = ack.applied,
                    "config acknowledged"
                );
            }
            Ok(false) => tracing::warn!(device_id = %shorten(device_id), "config ack ignored"),
            Err(error) => tracing::error!(device_id, %error, "could not record a config ack"),
        }
    }

    async fn publish_configs(&self, session: &Session) {
        let pending = match self.registry.configs_to_publish() {
            Ok(pending) => pending,
            Err(error) => {
                tracing::error!(%error, "could not read configs to publish");
                return;
            }
        };
        for (device_id, config) in pending {
            let bytes = serde_json::to_vec(&config).expect("a config serializes");
            // Retained: a device that connects later still receives the latest config.
            if let Err(error) = mqtt::publish(&session.client, topics::config(&device_id), true, bytes).await
            {
                tracing::warn!(device_id, %error, "config publish failed; retrying at the next poll");
                continue;
            }
            let version = config.version;
            let marked = self.registry.update_device(&device_id, |record| {
                record.config_published_version = record.config_published_version.max(version);
                true
            });
            if let Err(error) = marked {
                tracing::error!(device_id, %error, "could not record a published config");
            }
            self.metrics.configs_published.fetch_add(1, Ordering::Relaxed);
            tracing::info!(device_id, version, "config published");
        }
    }
}

/// A device's message parsed from `payload`; `None` when it is refused, which is logged as
/// `refused` (what was refused) and otherwise ignored: devices send these unasked, no answer goes
/// back.
fn parse_or_warn<T: serde::de::DeserializeOwned>(
    device_id: &str,
    payload: &[u8],
    refused: &str,
) -> Option<T> {
    match parse_bounded(payload) {
        Ok(message) => Some(message),
        Err((code, message)) => {
            tracing::warn!(device_id = %shorten(device_id), %code, message, "{refused}");
            None
        }
    }
}
