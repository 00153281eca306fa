//! The delivery protocol as pure state machines, after quinn-proto: no sockets, no tasks, no
//! clock, no randomness. Callers pass `now` and push what arrived (`handle_*`), then pull what to
//! do (`poll_transmit`, `poll_event`, `poll_read`, `poll_timeout`). The async drivers in
//! `appliance` (uplink) and `core-sink` (server) only move bytes between these machines and
//! QUIC streams, the ring and the landing core; every protocol rule, and every [`ErrorCode`] a
//! connection is closed with, is decided here.
//!
//! - [`device::DeviceSession`]: one connection of an appliance: Hello (with the ring's identity),
//!   Welcome (resume seqs, limits), reads from the ring in priority order within an in-flight
//!   bound, dictionaries before the first chunk that names them, Acks that trim the ring, and
//!   the decision to take a new ring identity when the ring is behind the core.
//! - [`sink::SinkSession`]: one connection at the sink: Hello against the certificate, the
//!   landing core's grant turned into resume seqs with checked arithmetic, one lane per stream,
//!   strictly increasing seqs, known dictionaries, ring seqs moved into the core's seq space,
//!   Acks from durable watermarks, fencing when the landing core rolled a lane back.
//! - [`backoff::Backoff`]: reconnect delays with caller-supplied jitter.
//!
//! **Invariant:** nothing in this crate reads a clock, draws a random number or does I/O; the
//! same inputs give the same outputs, which is what lets the simulator (crate `sim`) replay a
//! failing seed exactly.

pub mod backoff;
pub mod device;
pub mod sink;

use protocol::{ControlMessage, ErrorCode, FrameKind, Lane, encode_control, encode_frame};

pub use backoff::Backoff;
pub use device::{DeviceConfig, DeviceEvent, DeviceSession, ReadRequest, SendSummary};
pub use sink::{
    DictionaryRefusal, Grant, IncomingChunk, LandingRefusal, LaneGrant, SinkEvent, SinkSession,
    SinkSessionConfig, StreamId as SinkStreamId,
};

/// Where a [`Transmit`] goes: the bidirectional control stream, or the unidirectional stream of
/// one lane (the device opens one per lane).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Control,
    Lane(Lane),
}

/// Whole frames to write, in order, on one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub stream: Stream,
    pub bytes: Vec<u8>,
}

/// Why a session ended. `code` is what the QUIC connection is closed with (and what the peer
/// reads); `by_peer` tells whether the other side decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub code: ErrorCode,
    pub reason: String,
    pub by_peer: bool,
}

impl Close {
    fn local(code: ErrorCode, reason: impl Into<String>) -> Close {
        Close { code, reason: truncate_reason(reason.into()), by_peer: false }
    }

    fn peer(code: ErrorCode, reason: impl Into<String>) -> Close {
        Close { code, reason: truncate_reason(reason.into()), by_peer: true }
    }
}

/// Reasons travel in QUIC close frames and Error messages; keep them within the protocol's
/// bound, cut at a character boundary.
fn truncate_reason(mut reason: String) -> String {
    reason.truncate(reason.floor_char_boundary(protocol::ERROR_REASON_BYTES_MAX));
    reason
}

/// One control message as a whole frame. Both machines only build messages within bounds.
fn control_frame(message: &ControlMessage) -> Vec<u8> {
    let payload = encode_control(message).expect("sessions build control messages within their bounds");
    let mut frame = Vec::with_capacity(payload.len() + protocol::FRAME_LENGTH_PREFIX_BYTES + 1);
    encode_frame(FrameKind::Control, &payload, &mut frame).expect("a control message fits a frame");
    frame
}

/// The frame size a control stream decoder accepts.
const CONTROL_FRAME_BYTES_MAX: usize = protocol::FRAME_KIND_BYTES + protocol::CONTROL_MESSAGE_BYTES_MAX;
