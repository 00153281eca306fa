//! The rumqttc session driver shared by the authority, the device's first boot and the agent.
//!
//! The event loop runs in its own task and only forwards: received publishes go into a bounded
//! queue (`INCOMING_QUEUE_MAX`; when full, the message is dropped and counted — every sender in
//! this protocol retries), and after every ConnAck it re-subscribes with a non-blocking
//! `try_subscribe_many` (clean sessions: the broker forgets subscriptions on a reconnect).
//! Publishing happens in other tasks through the `AsyncClient`: publishing from inside the loop
//! can deadlock it. TLS is rustls with the ring provider passed explicitly and the fleet CA as the
//! only trust anchor; the client presents a certificate (its identity at the broker's ACL).
//!
//! Client ids: MQTT lets a new connection with a client id already in use take the old one's
//! place (the broker disconnects the old one), and Mosquitto cannot tie client ids to
//! certificates. So no long-lived session uses a client id another certificate holder can guess:
//! the authority and the device agents use [`unguessable_client_id`], a claim session the
//! fingerprint of a key only its holder has seen (see `topics.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::OnboardingError;

/// Received messages waiting for their consumer, per session.
pub const INCOMING_QUEUE_MAX: usize = 1024;
/// Requests (publish, subscribe) waiting for the event loop, per session.
const REQUEST_QUEUE_MAX: usize = 256;
/// Largest MQTT packet either way. The broker's own limit (`message_size_limit` in the example
/// config) is the same; payloads above `PAYLOAD_BYTES_MAX` are refused by the application with a
/// reason, so a device learns why instead of being disconnected.
pub(crate) const PACKET_BYTES_MAX: usize = 256 * 1024;
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long `close` waits for the DISCONNECT to go out before stopping the loop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

const _: () = assert!(crate::PAYLOAD_BYTES_MAX * 4 <= PACKET_BYTES_MAX);

/// Random bytes in the suffix of [`unguessable_client_id`] (shown as 32 hex digits).
const CLIENT_ID_RANDOM_BYTES: usize = 16;

/// `{prefix}-{32 random hex digits}`: a client id nobody else can guess, so nobody can take the
/// session over by connecting with the same id. The prefix keeps broker logs readable.
pub fn unguessable_client_id(prefix: &str) -> Result<String, OnboardingError> {
    let mut bytes = [0u8; CLIENT_ID_RANDOM_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| OnboardingError::Mqtt("no system randomness for an MQTT client id".to_owned()))?;
    let suffix: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(format!("{prefix}-{suffix}"))
}

/// Where the MQTT broker listens (TLS). `host` is also the name its certificate must carry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BrokerEndpoint {
    pub host: String,
    pub port: u16,
}

/// A TLS client identity at the broker plus the CA that verifies the broker.
pub struct TlsIdentity<'a> {
    pub ca_pem: &'a str,
    pub certificate_pem: &'a str,
    pub private_key_pem: &'a str,
}

pub struct Session {
    pub client: AsyncClient,
    pub incoming: mpsc::Receiver<Publish>,
    ready: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pub dropped: Arc<AtomicU64>,
    /// Connections the broker accepted (ConnAcks). More than one means the session reconnected:
    /// after a network failure, or because the broker closed it (for example another client
    /// connected with the same client id).
    pub connections: Arc<AtomicU64>,
}

fn tls_config(identity: &TlsIdentity<'_>) -> Result<rustls::ClientConfig, OnboardingError> {
    let tls = |problem: String| OnboardingError::Mqtt(format!("TLS configuration: {problem}"));
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(identity.ca_pem.as_bytes()) {
        let certificate = certificate.map_err(|error| tls(format!("fleet CA PEM: {error}")))?;
        roots.add(certificate).map_err(|error| tls(format!("fleet CA: {error}")))?;
    }
    let chain = CertificateDer::pem_slice_iter(identity.certificate_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| tls(format!("client certificate PEM: {error}")))?;
    let key = PrivateKeyDer::from_pem_slice(identity.private_key_pem.as_bytes())
        .map_err(|error| tls(format!("client key PEM: {error}")))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| tls(error.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|error| tls(error.to_string()))
}

impl Session {
    /// Starts the event loop task; it connects, subscribes to `subscriptions` after every
    /// connect, and reconnects with backoff until `close`.
    pub fn start(
        broker: &BrokerEndpoint,
        client_id: &str,
        identity: &TlsIdentity<'_>,
        subscriptions: &[String],
    ) -> Result<Session, OnboardingError> {
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls_config(
                identity,
            )?))))
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(PACKET_BYTES_MAX, PACKET_BYTES_MAX);
        let (client, event_loop) = AsyncClient::new(options, REQUEST_QUEUE_MAX);
        let (incoming_sender, incoming) = mpsc::channel(INCOMING_QUEUE_MAX);
        let (ready_sender, ready) = watch::channel(false);
        let (stop, stopped) = watch::channel(false);
        let dropped = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let filters: Vec<SubscribeFilter> =
            subscriptions.iter().map(|topic| SubscribeFilter::new(topic.clone(), QoS::AtLeastOnce)).collect();
        let task = tokio::spawn(drive(Driver {
            event_loop,
            client: client.clone(),
            filters,
            incoming: incoming_sender,
            ready: ready_sender,
            stopped,
            name: client_id.to_owned(),
            dropped: dropped.clone(),
            connections: connections.clone(),
        }));
        Ok(Session { client, incoming, ready, stop, task, dropped, connections })
    }

    /// Waits until connected and subscribed (a SubAck after the latest ConnAck), at most
    /// `limit`; returns whether that happened.
    pub async fn wait_ready(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.ready.wait_for(|ready| *ready))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Sends DISCONNECT and stops the event loop.
    pub async fn close(self) {
        let _ = self.client.try_disconnect();
        let mut task = self.task;
        if tokio::time::timeout(CLOSE_TIMEOUT, &mut task).await.is_err() {
            let _ = self.stop.send(true);
            let _ = task.await;
        }
    }
}

pub async fn publish(
    client: &AsyncClient,
    topic: String,
    retain: bool,
    payload: Vec<u8>,
) -> Result<(), OnboardingError> {
    client
        .publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
        .await
        .map_err(|error| OnboardingError::Mqtt(format!("publish on {topic}: {error}")))
}

struct Driver {
    event_loop: EventLoop,
    client: AsyncClient,
    filters: Vec<SubscribeFilter>,
    incoming: mpsc::Sender<Publish>,
    ready: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
    name: String,
    dropped: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
}

async fn drive(mut driver: Driver) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let event = tokio::select! {
            _ = driver.stopped.changed() => break,
            event = driver.event_loop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = RECONNECT_MIN;
                let connections = driver.connections.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(client = driver.name, connections, "MQTT connected");
                if driver.filters.is_empty() {
                    driver.ready.send_replace(true);
                } else {
                    driver.ready.send_replace(false);
                    // Non-blocking: this task must never wait on its own request queue.
                    if let Err(error) = driver.client.try_subscribe_many(driver.filters.clone()) {
                        tracing::warn!(client = driver.name, %error, "MQTT subscribe could not be queued");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.iter().any(|code| matches!(code, SubscribeReasonCode::Failure)) {
                    let codes = &ack.return_codes;
                    tracing::warn!(client = driver.name, ?codes, "MQTT subscription refused by the broker");
                }
                driver.ready.send_replace(true);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if driver.incoming.try_send(publish).is_err() {
                    driver.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        client = driver.name,
                        queue_max = INCOMING_QUEUE_MAX,
                        "MQTT message dropped: the incoming queue is full or closed"
                    );
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(error) => {
                driver.ready.send_replace(false);
                let retry_ms = backoff.as_millis() as u64;
                tracing::warn!(client = driver.name, %error, retry_ms, "MQTT connection failed");
                tokio::select! {
                    _ = driver.stopped.changed() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
    driver.ready.send_replace(false);
}
