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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::device::{CONFIG_FILE, DeviceIdentity};
use crate::messages::{ConfigAck, ConfigDocument, Heartbeat, parse_bounded, shorten, unix_ms_now};
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
}

impl DeviceAgentConfig {
    /// A heartbeat every 10 s by default.
    pub fn new(broker: BrokerEndpoint) -> DeviceAgentConfig {
        DeviceAgentConfig { broker, heartbeat_interval_ms: 10_000 }
    }
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
    connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

struct State {
    device_id: String,
    config_path: PathBuf,
    config: watch::Sender<ConfigDocument>,
    status: watch::Receiver<DeviceStatus>,
    heartbeat_interval: Duration,
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
        let config_topic = topics::config(&identity.device_id);
        let client_id = mqtt::unguessable_client_id(&identity.device_id)?;
        let mut session = Session::start(
            &config.broker,
            &client_id,
            &TlsIdentity {
                ca_pem: &identity.ca_pem,
                certificate_pem: &identity.certificate.certificate_pem,
                private_key_pem: &identity.certificate.private_key_pem,
            },
            std::slice::from_ref(&config_topic),
        )?;
        let connections = session.connections.clone();
        let (status_sender, status) = watch::channel(DeviceStatus::default());
        let (config_sender, config_receiver) = watch::channel(persisted);
        let (stop, mut stopped) = watch::channel(false);
        let mut state = State {
            device_id: identity.device_id.clone(),
            config_path,
            config: config_sender,
            status,
            heartbeat_interval: interval,
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
        Ok(DeviceAgent { status: status_sender, config: config_receiver, stop, task, connections })
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
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Ok(session) = self.task.await {
            session.close().await;
        }
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
