//! Shared fixtures: a fleet in a temporary directory, and real QUIC handshakes over 127.0.0.1
//! between a minimal sink and a minimal appliance, each network step bounded by a timeout so a
//! bug fails the test instead of hanging the suite.

#![allow(dead_code)] // Each test file uses a different part of this module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleet::{FleetCa, IssuedCertificate, RevocationList, Validity};
use quinn::rustls::AlertDescription;
use quinn::{ConnectionError, Endpoint, ReadError, ReadToEndError, TransportErrorCode};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Bound on every network step of a test: loopback handshakes take milliseconds.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The name appliances connect to; on the sink certificate of every test fleet.
pub const SERVER_NAME: &str = "localhost";
/// The sink tells an accepted device its id back; ids are at most 128 bytes.
const REPLY_BYTES_MAX: usize = 256;

/// A fleet CA (created, then loaded back from disk), its sink certificate, and a place for the
/// revocation list, all in one temporary directory.
pub struct Fleet {
    pub directory: TempDir,
    pub ca: FleetCa,
    pub server: IssuedCertificate,
}

impl Fleet {
    pub fn new(fleet_name: &str) -> Fleet {
        let directory = tempfile::tempdir().expect("temporary directory");
        let ca_directory = directory.path().join("ca");
        FleetCa::init(&ca_directory, fleet_name).expect("init fleet CA");
        // Issue from a loaded CA, so the handshake tests also cover load.
        let ca = FleetCa::load(&ca_directory).expect("load fleet CA");
        let server = ca
            .issue_server(&[SERVER_NAME.to_owned(), "127.0.0.1".to_owned()], Validity::days(30))
            .expect("issue sink certificate");
        Fleet { directory, ca, server }
    }

    pub fn device(&self, device_id: &str) -> IssuedCertificate {
        self.ca.issue_device(device_id, Validity::days(30)).expect("issue device certificate")
    }

    pub fn revocation_path(&self) -> PathBuf {
        self.directory.path().join("revoked.txt")
    }

    pub fn client(&self, device: &IssuedCertificate) -> quinn::ClientConfig {
        fleet::client_config(self.ca.certificate_pem(), device, transport()).expect("client config")
    }
}

pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // Shorter than STEP_TIMEOUT, so a silent peer ends in a connection error, not a test timeout.
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("idle timeout")));
    Arc::new(transport)
}

/// What the sink saw of one connection attempt.
#[derive(Debug)]
pub enum SinkSaw {
    Device(String),
    Refused(ConnectionError),
    NoDeviceId(String),
}

/// A sink endpoint on 127.0.0.1 that accepts every connection, reports what it saw, and sends an
/// accepted device its own id (as `peer_device_id` read it) on a unidirectional stream.
pub struct Sink {
    pub address: SocketAddr,
    endpoint: Endpoint,
    outcomes: mpsc::UnboundedReceiver<SinkSaw>,
}

impl Sink {
    pub fn start(ca_pem: &str, server: &IssuedCertificate, revocations: RevocationList) -> Sink {
        let config = fleet::server_config(ca_pem, server, revocations, transport()).expect("server config");
        let endpoint =
            Endpoint::server(config, "127.0.0.1:0".parse().expect("address")).expect("bind sink endpoint");
        let address = endpoint.local_addr().expect("sink address");
        let (sender, outcomes) = mpsc::unbounded_channel();
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                tokio::spawn(serve(incoming, sender.clone()));
            }
        });
        Sink { address, endpoint, outcomes }
    }

    pub async fn next_outcome(&mut self) -> SinkSaw {
        timeout(STEP_TIMEOUT, self.outcomes.recv())
            .await
            .expect("sink reported nothing in time")
            .expect("sink accept loop ended")
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

async fn serve(incoming: quinn::Incoming, outcomes: mpsc::UnboundedSender<SinkSaw>) {
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            let _ = outcomes.send(SinkSaw::Refused(error));
            return;
        }
    };
    let device_id = match fleet::peer_device_id(&connection) {
        Ok(device_id) => device_id,
        Err(error) => {
            let _ = outcomes.send(SinkSaw::NoDeviceId(error.to_string()));
            return;
        }
    };
    let _ = outcomes.send(SinkSaw::Device(device_id.clone()));
    // Errors here show up on the client side as a missing reply.
    if let Ok(mut stream) = connection.open_uni().await {
        let _ = stream.write_all(device_id.as_bytes()).await;
        let _ = stream.finish();
    }
    let _ = timeout(STEP_TIMEOUT, connection.closed()).await;
}

/// Connects to `address` as `server_name` and returns the device id the sink replied with, or
/// the error that ended the connection (during or right after the handshake: with TLS 1.3 the
/// client may finish its side before the sink has verified the client certificate).
pub async fn connect(
    address: SocketAddr,
    config: quinn::ClientConfig,
    server_name: &str,
) -> Result<String, ConnectionError> {
    let endpoint = Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("bind client endpoint");
    let attempt = async {
        let connection =
            endpoint.connect_with(config, address, server_name).expect("connect parameters").await?;
        let mut stream = connection.accept_uni().await?;
        let reply = stream.read_to_end(REPLY_BYTES_MAX).await.map_err(|error| match error {
            ReadToEndError::Read(ReadError::ConnectionLost(error)) => error,
            other => panic!("unexpected stream error: {other}"),
        })?;
        connection.close(0u32.into(), b"done");
        Ok(String::from_utf8(reply).expect("reply is UTF-8"))
    };
    let result = timeout(STEP_TIMEOUT, attempt).await.expect("connection attempt did not end in time");
    let _ = timeout(STEP_TIMEOUT, endpoint.wait_idle()).await;
    result
}

/// How a connection attempt must end.
#[derive(Clone, Copy, Debug)]
pub enum Expected<'a> {
    /// The sink accepts and `peer_device_id` reads this id.
    Accepted(&'a str),
    /// The sink refuses the device with this TLS alert.
    RefusedBySink(AlertDescription),
    /// The device refuses the sink with this TLS alert.
    RefusedByDevice(AlertDescription),
}

fn crypto_code(alert: AlertDescription) -> TransportErrorCode {
    TransportErrorCode::crypto(u8::from(alert))
}

/// The TLS alert code of a connection error, and whether the peer (not this side) sent it.
fn alert_of(error: &ConnectionError) -> Option<(TransportErrorCode, bool)> {
    match error {
        ConnectionError::ConnectionClosed(close) => Some((close.error_code, true)),
        ConnectionError::TransportError(error) => Some((error.code, false)),
        _ => None,
    }
}

/// Runs one connection attempt against `sink` and checks both sides' view of it.
pub async fn check(sink: &mut Sink, client: quinn::ClientConfig, server_name: &str, expected: Expected<'_>) {
    let client_result = connect(sink.address, client, server_name).await;
    let sink_saw = sink.next_outcome().await;
    match expected {
        Expected::Accepted(device_id) => {
            assert_eq!(client_result.as_deref(), Ok(device_id), "client side");
            assert!(matches!(&sink_saw, SinkSaw::Device(seen) if seen == device_id), "sink saw {sink_saw:?}");
        }
        Expected::RefusedBySink(alert) | Expected::RefusedByDevice(alert) => {
            let by_sink = matches!(expected, Expected::RefusedBySink(_));
            let client_error = client_result.expect_err("the connection must fail");
            assert_eq!(
                alert_of(&client_error),
                Some((crypto_code(alert), by_sink)),
                "client side error: {client_error}"
            );
            let SinkSaw::Refused(sink_error) = &sink_saw else {
                panic!("the sink must see the refusal, saw {sink_saw:?}");
            };
            assert_eq!(
                alert_of(sink_error),
                Some((crypto_code(alert), !by_sink)),
                "sink side error: {sink_error}"
            );
        }
    }
}
