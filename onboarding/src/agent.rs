//! The device agent (appliance side, after onboarding): publishes heartbeats built from the
//! [`DeviceStatus`] the daemon reports, receives config from the authority, persists it
//! (`config.json` in the identity directory, atomically) before applying and acknowledging it,
//! and hands it to the daemon through a `watch` channel (only the latest config matters, so the
//! channel holds one value and never grows).
//!
//! The MQTT client id is the device id with a random suffix (`mqtt::unguessable_client_id`): the
//! ACL keys a device's topics on its certificate CN, not on the client id, and a client id the
//! claim identity's holders could guess would let them knock the agent off the broker.
//!
//! Config keys the agent applies itself: `heartbeat_interval_ms` (100..=3600000). Every other key
//! is passed to the daemon as is.
//!
//! Renewal (EST-style re-enrollment over the same channel): once `renew_after_percent` of the
//! certificate's lifetime has passed (counted from its issue, `fleet::Validity::renewal_time`),
//! the agent stages a new key (`key.next.pem`, before the request, so a restart asks again for
//! the same key), publishes a CSR for it on `tributary/device/{id}/renew/request` with the
//! current certificate, and waits for `renew/response`. A certificate for the staged key that
//! chains to the pinned CA and names this device is installed as a pair (`fleet::install_renewal`)
//! and the MQTT session is restarted with it; the uplink picks it up at its next connection
//! (`UplinkConfig::identity_dir`). Without an answer, or refused, it asks again every
//! `renewal_retry_ms` until the certificate expires (and after: a certificate past its expiry
//! no longer connects to the broker, so renewal must happen inside the window).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::device::{CONFIG_FILE, DeviceIdentity};
use crate::messages::{
    ConfigAck, ConfigDocument, Heartbeat, RenewalRequest, RenewalResponse, parse_bounded, shorten,
    unix_ms_now,
};
use crate::mqtt::{self, Session, TlsIdentity};
use crate::{BrokerEndpoint, OnboardingError, files, topics};

/// The config key that sets the heartbeat interval.
pub const HEARTBEAT_INTERVAL_KEY: &str = "heartbeat_interval_ms";
const HEARTBEAT_INTERVAL_MIN_MS: u64 = 100;
const HEARTBEAT_INTERVAL_MAX_MS: u64 = 3_600_000;

#[derive(Clone, Debug)]
pub struct DeviceAgentConfig {
    pub broker: BrokerEndpoint,
    /// Used until the config sets `heartbeat_interval_ms`.
    pub heartbeat_interval_ms: u64,
    /// Renew once this percentage of the certificate's lifetime has passed (1..=99).
    pub renew_after_percent: u8,
    /// Wait before asking again when a renewal got no answer or was refused.
    pub renewal_retry_ms: u64,
}

impl DeviceAgentConfig {
    /// A heartbeat every 10 s; renewal after two thirds of the lifetime, retried every minute.
    pub fn new(broker: BrokerEndpoint) -> DeviceAgentConfig {
        DeviceAgentConfig {
            broker,
            heartbeat_interval_ms: 10_000,
            renew_after_percent: 66,
            renewal_retry_ms: 60_000,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=99).contains(&self.renew_after_percent) {
            return Err(format!("renew_after_percent = {}: expected 1..=99", self.renew_after_percent));
        }
        if !(100..=86_400_000).contains(&self.renewal_retry_ms) {
            return Err(format!("renewal_retry_ms = {}: expected 100..=86400000", self.renewal_retry_ms));
        }
        Ok(())
    }
}

/// What the agent's renewals did (read by the daemon's `/metrics` and tests).
#[derive(Debug, Default)]
pub struct RenewalMetrics {
    /// Certificates renewed and installed.
    pub renewed: AtomicU64,
    /// Renewal requests sent (first attempts and retries).
    pub requests: AtomicU64,
    /// Answers refusing a renewal; the last code is in `last_refusal`.
    pub refused: AtomicU64,
    /// Answers that could not be used (wrong key, not chaining to the pinned CA, unparsable).
    pub bad_answers: AtomicU64,
    /// Answers refused because they offered a fleet CA no pinned CA vouches for (also counted
    /// in `bad_answers`).
    pub untrusted_offers: AtomicU64,
    /// Times the pinned CA bundle (`ca.pem`) changed: a CA of a rollover taken, or a retired one
    /// dropped.
    pub trust_changes: AtomicU64,
    pub last_refusal: std::sync::Mutex<Option<crate::RejectionCode>>,
    /// The installed certificate's expiry (Unix seconds).
    pub certificate_expires_unix_seconds: AtomicU64,
}

/// What the daemon reports; the agent adds the config version and the send time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceStatus {
    pub version: String,
    pub uptime_seconds: u64,
    pub ring_fill_percent_per_lane: BTreeMap<String, f64>,
    pub uplink_lag_chunks: u64,
    pub last_ack_unix_ms: Option<u64>,
    pub uplink_lag_seconds_per_lane: BTreeMap<String, f64>,
    pub records_per_second: f64,
    pub bytes_per_second: f64,
    pub boot_slot: Option<String>,
}

/// A config the daemon should apply (the latest one).
pub type ConfigUpdate = ConfigDocument;

/// A running agent.
pub struct DeviceAgent {
    status: watch::Sender<DeviceStatus>,
    config: watch::Receiver<ConfigDocument>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Session>,
    connections: Arc<Connections>,
    renewal: Arc<RenewalMetrics>,
}

/// Broker connections over every session the agent had (it restarts its session after a
/// renewal, with the new certificate).
#[derive(Default)]
struct Connections {
    earlier_sessions: AtomicU64,
    current: std::sync::Mutex<Arc<AtomicU64>>,
}

struct State {
    device_id: String,
    config_path: PathBuf,
    config: watch::Sender<ConfigDocument>,
    status: watch::Receiver<DeviceStatus>,
    heartbeat_interval: Duration,
    renewal: Renewal,
}

/// The renewal side of the agent's state.
struct Renewal {
    identity_dir: PathBuf,
    pinned_ca_pem: String,
    certificate_pem: String,
    private_key_pem: String,
    broker: BrokerEndpoint,
    renew_after_percent: u8,
    retry: Duration,
    /// When to ask next; pushed back by `retry` after each request.
    next_attempt: tokio::time::Instant,
    /// The fingerprint of the staged key the last request asked for.
    asked_for: Option<String>,
    metrics: Arc<RenewalMetrics>,
    connections: Arc<Connections>,
}

fn heartbeat_interval(config: &ConfigDocument, default_ms: u64) -> Result<Duration, String> {
    match config.values.get(HEARTBEAT_INTERVAL_KEY) {
        None => Ok(Duration::from_millis(default_ms)),
        Some(text) => match text.parse::<u64>() {
            Ok(ms) if (HEARTBEAT_INTERVAL_MIN_MS..=HEARTBEAT_INTERVAL_MAX_MS).contains(&ms) => {
                Ok(Duration::from_millis(ms))
            }
            _ => Err(format!(
                "{HEARTBEAT_INTERVAL_KEY} = {text:?}: expected \
                 {HEARTBEAT_INTERVAL_MIN_MS}..={HEARTBEAT_INTERVAL_MAX_MS}"
            )),
        },
    }
}

impl DeviceAgent {
    /// Connects with the device certificate and starts heartbeats and config handling on the
    /// current tokio runtime.
    pub fn start(
        config: DeviceAgentConfig,
        identity: &DeviceIdentity,
    ) -> Result<DeviceAgent, OnboardingError> {
        let config_path = identity.identity_dir.join(CONFIG_FILE);
        let persisted: ConfigDocument = files::read_json(&config_path)?.unwrap_or_default();
        let interval = heartbeat_interval(&persisted, config.heartbeat_interval_ms)
            .or_else(|_| heartbeat_interval(&ConfigDocument::default(), config.heartbeat_interval_ms))
            .map_err(OnboardingError::Config)?;
        config.validate().map_err(OnboardingError::Config)?;
        let config_topic = topics::config(&identity.device_id);
        let renew_topic = topics::renew_response(&identity.device_id);
        let connections = Arc::new(Connections::default());
        let renewal_metrics = Arc::new(RenewalMetrics::default());
        let mut renewal = Renewal {
            identity_dir: identity.identity_dir.clone(),
            pinned_ca_pem: identity.ca_pem.clone(),
            certificate_pem: identity.certificate.certificate_pem.clone(),
            private_key_pem: identity.certificate.private_key_pem.clone(),
            broker: config.broker.clone(),
            renew_after_percent: config.renew_after_percent,
            retry: Duration::from_millis(config.renewal_retry_ms),
            next_attempt: tokio::time::Instant::now(),
            asked_for: None,
            metrics: renewal_metrics.clone(),
            connections: connections.clone(),
        };
        renewal.schedule_from_certificate()?;
        let mut session = renewal.start_session(&identity.device_id)?;
        let (status_sender, status) = watch::channel(DeviceStatus::default());
        let (config_sender, config_receiver) = watch::channel(persisted);
        let (stop, mut stopped) = watch::channel(false);
        let mut state = State {
            device_id: identity.device_id.clone(),
            config_path,
            config: config_sender,
            status,
            heartbeat_interval: interval,
            renewal,
        };
        let default_interval_ms = config.heartbeat_interval_ms;
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(state.heartbeat_interval);
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    message = session.incoming.recv() => {
                        let Some(message) = message else { break };
                        if message.topic == config_topic {
                            state.on_config(&session, &message.payload, default_interval_ms).await;
                            if ticker.period() != state.heartbeat_interval {
                                ticker = tokio::time::interval(state.heartbeat_interval);
                            }
                        } else if message.topic == renew_topic
                            && state.renewal.on_answer(&state.device_id, &message.payload)
                        {
                            // The broker sees the new certificate from now on.
                            let previous = std::mem::replace(
                                &mut session,
                                match state.renewal.start_session(&state.device_id) {
                                    Ok(session) => session,
                                    Err(error) => {
                                        tracing::error!(device_id = state.device_id, %error, "agent session with the renewed certificate failed; the agent stops");
                                        break;
                                    }
                                },
                            );
                            previous.close().await;
                        }
                    }
                    _ = tokio::time::sleep_until(state.renewal.next_attempt) => {
                        if session.is_ready() {
                            state.renewal.ask(&session, &state.device_id).await;
                        } else {
                            state.renewal.next_attempt = tokio::time::Instant::now() + state.renewal.retry;
                        }
                    }
                    _ = ticker.tick() => {
                        if session.is_ready() {
                            state.heartbeat(&session).await;
                        }
                    }
                }
            }
            session
        });
        Ok(DeviceAgent {
            status: status_sender,
            config: config_receiver,
            stop,
            task,
            connections,
            renewal: renewal_metrics,
        })
    }

    /// Replaces the status the next heartbeats report.
    pub fn report(&self, status: DeviceStatus) {
        self.status.send_replace(status);
    }

    /// A handle that replaces the reported status from another task.
    pub fn status_reporter(&self) -> watch::Sender<DeviceStatus> {
        self.status.clone()
    }

    /// The latest applied config; `changed()` on it wakes when a new one is applied.
    pub fn config(&self) -> watch::Receiver<ConfigDocument> {
        self.config.clone()
    }

    /// How many times the broker accepted the agent's connection: 1 while it never reconnected.
    pub fn mqtt_connections(&self) -> u64 {
        let current =
            self.connections.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        self.connections.earlier_sessions.load(Ordering::Relaxed) + current.load(Ordering::Relaxed)
    }

    /// What renewals did so far.
    pub fn renewal_metrics(&self) -> Arc<RenewalMetrics> {
        self.renewal.clone()
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Ok(session) = self.task.await {
            session.close().await;
        }
    }
}

impl Renewal {
    /// Starts an MQTT session with the installed certificate, subscribed to the config and the
    /// renewal answers.
    fn start_session(&self, device_id: &str) -> Result<Session, OnboardingError> {
        let session = Session::start(
            &self.broker,
            &mqtt::unguessable_client_id(device_id)?,
            &TlsIdentity {
                ca_pem: &self.pinned_ca_pem,
                certificate_pem: &self.certificate_pem,
                private_key_pem: &self.private_key_pem,
            },
            &[topics::config(device_id), topics::renew_response(device_id)],
        )?;
        let mut current = self.connections.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let earlier = current.load(Ordering::Relaxed);
        self.connections.earlier_sessions.fetch_add(earlier, Ordering::Relaxed);
        *current = session.connections.clone();
        Ok(session)
    }

    /// Sets the next attempt at the installed certificate's renewal time.
    fn schedule_from_certificate(&mut self) -> Result<(), OnboardingError> {
        let validity = fleet::Validity::of_certificate(&self.certificate_pem)?;
        let expires = validity.not_after.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.metrics.certificate_expires_unix_seconds.store(expires.as_secs(), Ordering::Relaxed);
        let wait = validity
            .renewal_time(self.renew_after_percent)
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        self.next_attempt = tokio::time::Instant::now() + wait;
        Ok(())
    }

    /// Sends a renewal request for the staged key (staging a new one first if none is).
    async fn ask(&mut self, session: &Session, device_id: &str) {
        self.next_attempt = tokio::time::Instant::now() + self.retry;
        let csr = match self.staged_csr(device_id) {
            Ok(csr) => csr,
            Err(error) => {
                tracing::error!(device_id, %error, "cannot prepare a renewal; retrying later");
                return;
            }
        };
        let (csr_pem, key_sha256) = csr;
        let bytes = serde_json::to_vec(&RenewalRequest { csr_pem }).expect("a request serializes");
        match mqtt::publish(&session.client, topics::renew_request(device_id), false, bytes).await {
            Ok(()) => {
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                tracing::info!(device_id, key_sha256, "asked for a renewed certificate");
                self.asked_for = Some(key_sha256);
            }
            Err(error) => tracing::warn!(device_id, %error, "renewal request not sent; retrying later"),
        }
    }

    /// The CSR for the staged renewal key and that key's fingerprint.
    fn staged_csr(&self, device_id: &str) -> Result<(String, String), OnboardingError> {
        let key_pem = match fleet::staged_renewal_key(&self.identity_dir)? {
            Some(key_pem) => key_pem,
            None => {
                let (_, key_pem) = fleet::csr::generate_device_key_and_csr(device_id)?;
                fleet::stage_renewal_key(&self.identity_dir, &key_pem)?;
                key_pem
            }
        };
        let key_sha256 = topics::key_fingerprint(&fleet::csr::subject_public_key_info_of_key_pem(&key_pem)?);
        Ok((fleet::csr::csr_for_key_pem(device_id, &key_pem)?, key_sha256))
    }

    /// Handles an answer; true when a renewed certificate was installed.
    fn on_answer(&mut self, device_id: &str, payload: &[u8]) -> bool {
        let answer = match parse_bounded::<RenewalResponse>(payload) {
            Ok(answer) => answer,
            Err((code, problem)) => {
                self.metrics.bad_answers.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device_id, %code, problem, "unusable renewal answer ignored");
                return false;
            }
        };
        match answer {
            RenewalResponse::Rejected { code, message } => {
                self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                *self.metrics.last_refusal.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(code);
                tracing::error!(device_id, %code, message, "renewal refused; asking again later");
                false
            }
            RenewalResponse::Renewed { certificate_pem, key_sha256, ca_pem } => {
                if self.asked_for.as_deref() != Some(key_sha256.as_str()) {
                    // An answer to an older request (its key is no longer staged).
                    tracing::debug!(device_id, key_sha256, "renewal answer for another key ignored");
                    return false;
                }
                match self.install(device_id, &certificate_pem, ca_pem.as_deref()) {
                    Ok(()) => {
                        self.asked_for = None;
                        self.metrics.renewed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(device_id, key_sha256, "device certificate renewed and installed");
                        true
                    }
                    Err(error) => {
                        self.metrics.bad_answers.fetch_add(1, Ordering::Relaxed);
                        if matches!(error, OnboardingError::CaMismatch { .. }) {
                            self.metrics.untrusted_offers.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::error!(device_id, %error, "renewed certificate refused; asking again later");
                        false
                    }
                }
            }
        }
    }

    /// Installs a renewed certificate and the trust its answer offered. The pinned bundle only
    /// changes to CAs a pinned CA vouches for, and always holds the issuer of the installed
    /// certificate: the union of the old and new bundles is written first, then the pair, then
    /// the new bundle, each durably, so a crash between them leaves both issuers trusted.
    fn install(
        &mut self,
        device_id: &str,
        certificate_pem: &str,
        offered_ca_pem: Option<&str>,
    ) -> Result<(), OnboardingError> {
        let certificate = fleet::IssuedCertificate {
            certificate_pem: certificate_pem.to_owned(),
            private_key_pem: String::new(),
        };
        if certificate.device_id()? != device_id {
            return Err(OnboardingError::BadAnswer(
                "the renewed certificate names another device".to_owned(),
            ));
        }
        let trusted = match offered_ca_pem {
            Some(offered) => crate::device::accept_offered_trust(&self.pinned_ca_pem, offered)?,
            None => self.pinned_ca_pem.clone(),
        };
        crate::device::check_issued_by(&trusted, certificate_pem)?;
        let trust_changes = trusted != self.pinned_ca_pem;
        let ca_path = self.identity_dir.join(fleet::CA_CERTIFICATE_FILE);
        if trust_changes {
            let both = fleet::rollover::union_of_bundles(&self.pinned_ca_pem, &trusted)?;
            files::write_durably(&ca_path, both.as_bytes(), files::PUBLIC_MODE)?;
        }
        fleet::install_renewal(&self.identity_dir, certificate_pem)?;
        if trust_changes {
            files::write_durably(&ca_path, trusted.as_bytes(), files::PUBLIC_MODE)?;
            self.metrics.trust_changes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                device_id,
                anchors = trusted.matches("BEGIN CERTIFICATE").count(),
                "pinned fleet CA bundle changed (CA rollover)"
            );
        }
        self.pinned_ca_pem = trusted;
        let installed = fleet::IssuedCertificate::read_from(&self.identity_dir)?;
        self.certificate_pem = installed.certificate_pem;
        self.private_key_pem = installed.private_key_pem;
        self.schedule_from_certificate()
    }
}

impl State {
    async fn on_config(&mut self, session: &Session, payload: &[u8], default_interval_ms: u64) {
        let current = self.config.borrow().version;
        let ack = match parse_bounded::<ConfigDocument>(payload) {
            Err((code, message)) => {
                ConfigAck { version: 0, applied: false, message: format!("{code}: {message}") }
            }
            Ok(document) => {
                let checked =
                    document.validate().and_then(|()| heartbeat_interval(&document, default_interval_ms));
                match checked {
                    Err(problem) => ConfigAck { version: document.version, applied: false, message: problem },
                    Ok(_) if document.version < current => ConfigAck {
                        version: document.version,
                        applied: false,
                        message: format!("older than the running version {current}"),
                    },
                    Ok(_) if document.version == current => {
                        ConfigAck { version: current, applied: true, message: "already running".to_owned() }
                    }
                    Ok(interval) => match files::write_json(&self.config_path, &document) {
                        Err(error) => ConfigAck {
                            version: document.version,
                            applied: false,
                            message: format!("could not persist: {error}"),
                        },
                        Ok(()) => {
                            self.heartbeat_interval = interval;
                            let version = document.version;
                            self.config.send_replace(document);
                            tracing::info!(device_id = self.device_id, version, "config applied");
                            ConfigAck { version, applied: true, message: "applied".to_owned() }
                        }
                    },
                }
            }
        };
        let ack = ConfigAck { message: shorten(&ack.message), ..ack };
        let bytes = serde_json::to_vec(&ack).expect("an ack serializes");
        if let Err(error) =
            mqtt::publish(&session.client, topics::config_ack(&self.device_id), false, bytes).await
        {
            tracing::warn!(device_id = self.device_id, %error, "config ack not sent");
        }
    }

    async fn heartbeat(&self, session: &Session) {
        let status = self.status.borrow().clone();
        let heartbeat = Heartbeat {
            version: status.version,
            uptime_seconds: status.uptime_seconds,
            ring_fill_percent_per_lane: status.ring_fill_percent_per_lane,
            uplink_lag_chunks: status.uplink_lag_chunks,
            last_ack_unix_ms: status.last_ack_unix_ms,
            config_version: self.config.borrow().version,
            sent_unix_ms: unix_ms_now(),
            uplink_lag_seconds_per_lane: status.uplink_lag_seconds_per_lane,
            records_per_second: status.records_per_second,
            bytes_per_second: status.bytes_per_second,
            boot_slot: status.boot_slot,
        };
        let bytes = serde_json::to_vec(&heartbeat).expect("a heartbeat serializes");
        if let Err(error) =
            mqtt::publish(&session.client, topics::heartbeat(&self.device_id), false, bytes).await
        {
            tracing::warn!(device_id = self.device_id, %error, "heartbeat not sent");
        }
    }
}
