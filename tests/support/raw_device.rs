//! A hand-driven device for tests that must say what a real appliance never would (a Hello naming
//! another device, garbage frames, hostile seqs), and a well-behaved bystander appliance that must
//! keep flowing meanwhile. Every raw Hello the root tests send is built by `hello` below, so a
//! change of the Hello layout is one edit here.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use appliance::Uplink;
use core_sink::Sink;
use protocol::{
    Codec, ControlMessage, FrameDecoder, FrameKind, Hello, Lane, PROTOCOL_VERSION, decode_control,
    encode_control, encode_frame,
};

use super::harness::{Fleet, MIB, produce, wait_until};

/// How long the panicking helpers wait for the sink before failing the test.
pub const LIMIT: Duration = Duration::from_secs(60);

/// The Hello a device sends as `device_id`; the only place root tests build one.
pub fn hello(device_id: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        device_id: device_id.to_string(),
        boot_id: [7; 16],
        ring_id: [8; 16],
        lanes: Lane::ALL.to_vec(),
        codecs: vec![Codec::Raw],
        dictionary_ids: Vec::new(),
    }
}

/// `message` as one control frame.
pub fn control_frame(message: &ControlMessage) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_frame(FrameKind::Control, &encode_control(message).expect("valid control message"), &mut frame)
        .expect("a control message fits a frame");
    frame
}

/// Connects to `sink` with `device`'s certificate. The error is the handshake's (a sink at its
/// connection limit refuses here).
pub async fn connect(
    fleet: &Fleet,
    device: &str,
    sink: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let settings = fleet::transport::TransportSettings::default();
    let client = fleet::client_config(fleet.ca.certificate_pem(), &fleet.device(device), settings.to_quinn())
        .expect("client config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    endpoint.set_default_client_config(client);
    let connecting = endpoint.connect(sink, "localhost").map_err(|error| format!("connect: {error}"))?;
    let connection = connecting.await.map_err(|error| format!("handshake: {error}"))?;
    Ok((endpoint, connection))
}

/// Opens the control stream, sends a Hello naming `claimed`, and returns the sink's first control
/// message: `Ok(None)` when the sink ended the stream or the connection without answering,
/// `Err` when it said nothing within `limit`.
pub async fn say_hello(
    connection: &quinn::Connection,
    claimed: &str,
    limit: Duration,
) -> Result<Option<ControlMessage>, String> {
    let exchange = async {
        let Ok((mut send, mut recv)) = connection.open_bi().await else {
            return None;
        };
        if send.write_all(&control_frame(&ControlMessage::Hello(hello(claimed)))).await.is_err() {
            return None;
        }
        let mut decoder = FrameDecoder::new(1 + protocol::CONTROL_MESSAGE_BYTES_MAX);
        let mut buffer = vec![0u8; 4096];
        loop {
            if let Some(frame) = decoder.next_frame().expect("the sink sends valid frames") {
                return Some(decode_control(&frame.payload).expect("the sink sends valid control messages"));
            }
            match recv.read(&mut buffer).await {
                Ok(Some(read)) => decoder.push(&buffer[..read]),
                _ => return None,
            }
        }
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("no answer to the Hello and no close within {limit:?}"))
}

/// A client with `device`'s certificate whose Hello names `claimed`; panics on a failed handshake.
pub async fn connect_and_hello(
    fleet: &Fleet,
    device: &str,
    claimed: &str,
    sink: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection, Option<ControlMessage>) {
    let (endpoint, connection) = connect(fleet, device, sink).await.expect("connect to the sink");
    let reply = say_hello(&connection, claimed, LIMIT).await.expect("the sink answers the Hello");
    (endpoint, connection, reply)
}

/// Waits up to `limit` for the sink to close `connection`: its application error code and
/// reason, or what happened instead.
pub async fn closed_by_sink(
    connection: &quinn::Connection,
    limit: Duration,
) -> Result<(u64, String), String> {
    match tokio::time::timeout(limit, connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            Ok((close.error_code.into_inner(), String::from_utf8_lossy(&close.reason).into_owned()))
        }
        Ok(other) => Err(format!("expected an application close, got {other}")),
        Err(_) => Err(format!("the sink did not close the connection within {limit:?}")),
    }
}

/// Waits for the sink to close `connection` and returns its application error code and reason.
pub async fn close_code(connection: &quinn::Connection) -> (u64, String) {
    closed_by_sink(connection, LIMIT).await.unwrap_or_else(|failure| panic!("{failure}"))
}

/// A well-behaved appliance that must keep flowing while others misbehave.
pub struct Bystander {
    pub ring: buffer::Ring,
    pub uplink: Uplink,
}

impl Bystander {
    pub fn start(fleet: &Fleet, sink: &Sink) -> Bystander {
        let ring = fleet.open_ring("bystander", 16 * MIB);
        let uplink =
            Uplink::spawn(ring.clone(), fleet.uplink_config("bystander", sink.local_addr())).unwrap();
        Bystander { ring, uplink }
    }

    /// Produces 500 sensor records from index `first` and reports whether the sink acked them all
    /// within `limit`.
    pub async fn try_deliver(&self, first: u64, limit: Duration) -> bool {
        let ring = self.ring.clone();
        let seqs = tokio::task::spawn_blocking(move || produce(&ring, "bystander", Lane::Sensor, first, 500))
            .await
            .unwrap();
        let last = *seqs.last().unwrap();
        let metrics = self.uplink.metrics();
        wait_until(limit, || metrics.acked_through(Lane::Sensor) >= last).await
    }

    pub async fn delivers(&self, first: u64) {
        assert!(self.try_deliver(first, LIMIT).await, "bystander keeps flowing");
    }
}
