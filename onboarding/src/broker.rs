//! The embedded MQTT broker for the one-machine default (`tributary demo`): rumqttd (MQTT 3.1.1,
//! QoS 0/1) with one TLS listener whose clients must present a certificate of the fleet CA.
//!
//! Not the fleet broker: rumqttd has no ACL, so any fleet certificate (a device's, the claim
//! identity's) may use any topic: the key-bound topics, single-use tokens and the pinned CA still
//! hold, but a claim holder can subscribe to every answer (certificates are public; keys never
//! travel) and any client id. Production uses Mosquitto with `onboarding/mosquitto/acl`.
//! rumqttd's `Broker::start` never returns and has no stop: the broker runs on its own threads
//! until the process exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::OnboardingError;
use crate::mqtt::PACKET_BYTES_MAX;

/// Connections the embedded broker accepts: a demo fleet, with room for reconnects.
const CONNECTIONS_MAX: usize = 1024;
/// Unacknowledged QoS 1 messages per connection.
const INFLIGHT_MAX: usize = 100;
/// How long `start` waits for the listener.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running embedded broker (see the module documentation: it cannot be stopped).
#[derive(Debug)]
pub struct EmbeddedBroker {
    listen: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `listen` (a concrete port: rumqttd cannot report a port it chose) with
    /// TLS from `certificate_dir` (`cert.pem`, `key.pem` of a server certificate, `ca.pem` the
    /// fleet CA that client certificates must chain to), and waits until it accepts connections.
    pub fn start(listen: SocketAddr, certificate_dir: &Path) -> Result<EmbeddedBroker, OnboardingError> {
        let path = |name: &str| -> Result<String, OnboardingError> {
            let file: PathBuf = certificate_dir.join(name);
            if !file.exists() {
                return Err(OnboardingError::File { path: file, problem: "missing".to_owned() });
            }
            Ok(file.display().to_string())
        };
        let settings = rumqttd::ServerSettings {
            name: "tributary-embedded".to_owned(),
            listen,
            tls: Some(rumqttd::TlsConfig::Rustls {
                capath: Some(path(fleet::CA_CERTIFICATE_FILE)?),
                certpath: path(fleet::CERTIFICATE_FILE)?,
                keypath: path(fleet::KEY_FILE)?,
            }),
            next_connection_delay_ms: 1,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: PACKET_BYTES_MAX,
                max_inflight_count: INFLIGHT_MAX,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: CONNECTIONS_MAX,
                max_outgoing_packet_count: 200,
                max_segment_size: 104_857_600,
                max_segment_count: 10,
                ..Default::default()
            },
            v4: Some(HashMap::from([("1".to_owned(), settings)])),
            ..Default::default()
        };
        let mut broker = rumqttd::Broker::new(config);
        std::thread::Builder::new()
            .name("embedded-mqtt".to_owned())
            .spawn(move || {
                if let Err(error) = broker.start() {
                    tracing::error!(%error, "embedded MQTT broker stopped");
                }
            })
            .map_err(|source| {
                OnboardingError::io("start the embedded broker on", Path::new("thread"), source)
            })?;
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while std::net::TcpStream::connect(listen).is_err() {
            if Instant::now() > deadline {
                return Err(OnboardingError::Mqtt(format!("embedded broker did not listen on {listen}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(%listen, "embedded MQTT broker listening");
        Ok(EmbeddedBroker { listen })
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }
}
