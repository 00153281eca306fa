//! The appliance's side of one connection to the sink.
//!
//! ```text
//! new ──Hello──► AwaitingWelcome ──Welcome──► Streaming ──► Closed
//!                     │ (timeout, Error,            │ (Error, bad bytes, an Ack beyond what
//!                     │  bad bytes, ring behind)    │  was sent, control stream ended)
//!                     └──────────────► Closed ◄─────┘
//! ```
//!
//! Streaming, per lane: the driver asks [`DeviceSession::poll_read`] what to read from the ring,
//! reads it (the ring serves only fsynced chunks) and hands the chunks to
//! [`DeviceSession::handle_read`], which frames them (a dictionary frame first when a chunk names
//! a dictionary this session has not sent) into [`Transmit`]s for the lane's stream. Acks trim
//! the ring through [`DeviceEvent::Acked`].
//!
//! Limits: a lane reads its next batch only while less than one batch (`read_bytes_max`) of
//! its transmits waits to be written ([`DeviceSession::handle_written`]); unacknowledged bytes
//! in flight stay within the lower of the configured bound and
//! the sink's `SessionLimits.in_flight_bytes_max` (one read may overshoot by one chunk, because
//! a read always returns at least one chunk), and at most [`IN_FLIGHT_CHUNKS_MAX`] chunks; a lane
//! with nothing to read is polled again after `idle_poll`.
//!
//! Rules that are decided here:
//! - A Welcome naming a resume seq above the ring's next seq means the ring is behind the core
//!   under its own identity (restored from an older copy): the session ends with
//!   [`DeviceEvent::RingBehind`], and the driver gives the ring a new identity, so the sink opens
//!   a new seq epoch instead of dropping new records as duplicates.
//! - A chunk that can never be delivered (it names a dictionary the appliance does not have, or
//!   it is larger than the sink's frame limit) is skipped and reported
//!   ([`DeviceEvent::Undeliverable`]), never retried forever.
//! - An Ack beyond the highest seq this session sent (or the sink already held) is a sink bug or
//!   a hostile sink: the session closes with `BadFrame` and trims nothing.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use protocol::{
    ChunkHeader, Codec, ControlMessage, DecodeError, ErrorCode, FrameDecoder, FrameKind, Hello, Lane,
    NO_DICTIONARY, PROTOCOL_VERSION, Welcome, decode_control, dictionary_frame_payload, encode_frame,
};

use crate::{CONTROL_FRAME_BYTES_MAX, Close, Stream, Transmit, control_frame};

/// Most chunks one session keeps in flight (sent, not yet acked), whatever their size.
pub const IN_FLIGHT_CHUNKS_MAX: usize = 65_536;
/// Most chunks per lane whose send time is kept for the ack latency; beyond it chunks go
/// untimed until Acks catch up.
pub const ACK_TIMINGS_MAX: usize = 4096;

#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub device_id: String,
    /// Random per boot; the sink logs it.
    pub boot_id: [u8; 16],
    /// The ring's identity (`Ring::identity`).
    pub ring_id: [u8; 16],
    /// Lanes this appliance streams.
    pub lanes: Vec<Lane>,
    /// How long to wait for the Welcome after the Hello.
    pub welcome_timeout: Duration,
    /// Bounds of one ring read.
    pub read_chunks_max: usize,
    pub read_bytes_max: usize,
    /// How long a lane that had nothing to read waits before reading again.
    pub idle_poll: Duration,
    /// This appliance's own bound on unacked bytes; the sink's limit applies too.
    pub in_flight_bytes_max: u64,
}

/// What the driver should read from the ring next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    pub lane: Lane,
    pub from_seq: u64,
    pub chunks_max: usize,
    pub bytes_max: usize,
}

/// What one [`DeviceSession::handle_read`] queued for sending.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendSummary {
    pub chunks: u64,
    pub bytes: u64,
    pub dictionaries: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The sink accepted the session.
    Welcomed,
    /// The sink holds `lane` through `through` durably: trim the ring (`Ring::ack`).
    Acked { lane: Lane, through: u64 },
    /// From a chunk handed to the stream to the Ack covering it (sampled per lane).
    AckLatency { lane: Lane, latency: Duration },
    /// The sink already holds seqs of `lane` this ring has not written yet: give the ring a new
    /// identity and reconnect at once. The session is closed.
    RingBehind { lane: Lane, resume_seq: u64, ring_next_seq: u64 },
    /// A chunk that can never be delivered was skipped. Count it and log it with its seq.
    Undeliverable { lane: Lane, seq: u64, reason: String },
    /// The session ended (see [`DeviceSession::close`]).
    Closed,
}

#[derive(Debug)]
enum State {
    AwaitingWelcome { deadline: Instant },
    Streaming,
    Closed,
}

#[derive(Debug)]
struct LaneState {
    /// The next seq to ask the ring for.
    next_read_seq: u64,
    /// Highest seq this session sent, or the sink held at the Welcome.
    highest_covered: u64,
    acked_through: u64,
    read_outstanding: bool,
    idle_until: Option<Instant>,
    /// (seq, bytes, sent at) of chunks sent and not yet acked, in seq order; `sent_at` is kept
    /// for the first `ACK_TIMINGS_MAX` only.
    in_flight: VecDeque<(u64, u64, Option<Instant>)>,
    timed: usize,
    dictionaries_sent: HashSet<u32>,
    /// Frame bytes handed out as transmits and not yet reported written
    /// ([`DeviceSession::handle_written`]).
    unwritten_bytes: usize,
}

pub struct DeviceSession {
    config: DeviceConfig,
    ring_next_seqs: [u64; Lane::COUNT],
    state: State,
    control: FrameDecoder,
    lanes: [Option<LaneState>; Lane::COUNT],
    in_flight_bytes: u64,
    in_flight_chunks: usize,
    in_flight_bytes_max: u64,
    frame_bytes_max: usize,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DeviceEvent>,
    close: Option<Close>,
    /// Set when the session ended because the ring must take a new identity.
    renew_ring_identity: bool,
}

impl DeviceSession {
    /// Starts a session on a fresh connection and queues the Hello. `ring_next_seqs` is the
    /// ring's next seq per lane (`RingStats`), to tell a ring that is behind the core.
    pub fn new(config: DeviceConfig, ring_next_seqs: [u64; Lane::COUNT], now: Instant) -> DeviceSession {
        assert!(config.read_chunks_max >= 1 && config.read_bytes_max >= 1, "read bounds must be positive");
        assert!(ring_next_seqs.iter().all(|&seq| seq >= 1), "ring seqs start at 1");
        let mut lanes_unique = config.lanes.clone();
        lanes_unique.sort();
        lanes_unique.dedup();
        let hello = ControlMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            device_id: config.device_id.clone(),
            boot_id: config.boot_id,
            ring_id: config.ring_id,
            lanes: lanes_unique,
            codecs: Codec::ALL.to_vec(),
            dictionary_ids: Vec::new(),
        });
        let mut session = DeviceSession {
            in_flight_bytes_max: config.in_flight_bytes_max,
            state: State::AwaitingWelcome { deadline: now + config.welcome_timeout },
            config,
            ring_next_seqs,
            control: FrameDecoder::new(CONTROL_FRAME_BYTES_MAX),
            lanes: Default::default(),
            in_flight_bytes: 0,
            in_flight_chunks: 0,
            frame_bytes_max: protocol::FRAME_BYTES_MAX,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            close: None,
            renew_ring_identity: false,
        };
        session.transmits.push_back(Transmit { stream: Stream::Control, bytes: control_frame(&hello) });
        session
    }

    /// Why the session ended, once it has.
    pub fn close(&self) -> Option<&Close> {
        self.close.as_ref()
    }

    pub fn is_closed(&self) -> bool {
        self.close.is_some()
    }

    /// Whether the session ended because the ring must take a new identity before the next
    /// connection (reconnect at once, without backoff).
    pub fn renews_ring_identity(&self) -> bool {
        self.renew_ring_identity
    }

    /// Whether the Welcome arrived and chunks may flow.
    pub fn is_streaming(&self) -> bool {
        matches!(self.state, State::Streaming)
    }

    /// Unacked bytes this session has handed to its streams.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    /// The next moment [`DeviceSession::handle_timeout`] should be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingWelcome { deadline } => Some(deadline),
            State::Streaming => self.lanes.iter().flatten().filter_map(|lane| lane.idle_until).min(),
            State::Closed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::AwaitingWelcome { deadline } if now >= deadline => {
                let waited = self.config.welcome_timeout;
                self.close_with(Close::local(
                    ErrorCode::ShuttingDown,
                    format!("no Welcome within {} ms of the Hello", waited.as_millis()),
                ));
            }
            State::Streaming => {
                for lane in self.lanes.iter_mut().flatten() {
                    if lane.idle_until.is_some_and(|until| now >= until) {
                        lane.idle_until = None;
                    }
                }
            }
            _ => {}
        }
    }

    /// Ends the session from this side (the appliance is stopping, or the driver lost the
    /// connection). Idempotent.
    pub fn close_locally(&mut self, code: ErrorCode, reason: &str) {
        self.close_with(Close::local(code, reason));
    }

    /// The connection failed underneath (timeout, reset, stream error).
    pub fn connection_lost(&mut self, reason: &str) {
        self.close_with(Close::peer(ErrorCode::ShuttingDown, format!("connection lost: {reason}")));
    }

    fn close_with(&mut self, close: Close) {
        if self.close.is_some() {
            return;
        }
        self.state = State::Closed;
        self.close = Some(close);
        self.transmits.clear();
        self.events.push_back(DeviceEvent::Closed);
    }

    /// Bytes that arrived on the control stream.
    pub fn handle_control_bytes(&mut self, now: Instant, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.control.push(bytes);
        loop {
            let frame = match self.control.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(error) => {
                    self.close_with(Close::local(
                        ErrorCode::BadFrame,
                        format!("the sink sent a malformed control frame: {error}"),
                    ));
                    return;
                }
            };
            if frame.kind != FrameKind::Control {
                self.close_with(Close::local(
                    ErrorCode::BadFrame,
                    format!("the sink sent a {} frame on the control stream", frame.kind),
                ));
                return;
            }
            match decode_control(&frame.payload) {
                Ok(message) => self.handle_message(now, message),
                Err(error @ DecodeError::UnsupportedVersion { .. }) => {
                    self.close_with(Close::local(ErrorCode::UnsupportedVersion, error.to_string()));
                }
                Err(error) => {
                    self.close_with(Close::local(
                        ErrorCode::BadFrame,
                        format!("the sink sent a malformed control message: {error}"),
                    ));
                }
            }
            if self.is_closed() {
                return;
            }
        }
    }

    /// The sink finished its side of the control stream.
    pub fn handle_control_finished(&mut self) {
        self.close_with(Close::peer(ErrorCode::ShuttingDown, "the sink closed the control stream"));
    }

    fn handle_message(&mut self, now: Instant, message: ControlMessage) {
        match (&self.state, message) {
            (_, ControlMessage::Error(error)) => {
                self.close_with(Close::peer(error.code, error.reason));
            }
            (State::AwaitingWelcome { .. }, ControlMessage::Welcome(welcome)) => self.handle_welcome(welcome),
            (State::Streaming, ControlMessage::Ack(ack)) => {
                self.handle_ack(now, ack.lane, ack.durable_through)
            }
            (_, other) => {
                let name = match other {
                    ControlMessage::Hello(_) => "Hello",
                    ControlMessage::Welcome(_) => "a second Welcome",
                    ControlMessage::Ack(_) => "an Ack before the Welcome",
                    ControlMessage::Error(_) => unreachable!("handled above"),
                };
                self.close_with(Close::local(ErrorCode::BadFrame, format!("the sink sent {name}")));
            }
        }
    }

    fn handle_welcome(&mut self, welcome: Welcome) {
        let mut granted = [false; Lane::COUNT];
        for resume in &welcome.resume {
            if !self.config.lanes.contains(&resume.lane) || granted[resume.lane.index()] {
                self.close_with(Close::local(
                    ErrorCode::BadFrame,
                    format!("the Welcome names lane {} twice or without a Hello for it", resume.lane),
                ));
                return;
            }
            granted[resume.lane.index()] = true;
        }
        for resume in &welcome.resume {
            let ring_next_seq = self.ring_next_seqs[resume.lane.index()];
            if resume.resume_seq > ring_next_seq {
                self.events.push_back(DeviceEvent::RingBehind {
                    lane: resume.lane,
                    resume_seq: resume.resume_seq,
                    ring_next_seq,
                });
                self.renew_ring_identity = true;
                self.close_with(Close::local(
                    ErrorCode::ShuttingDown,
                    format!(
                        "the sink holds {} through seq {} but this ring's next seq is {ring_next_seq}: \
                         the ring takes a new identity",
                        resume.lane,
                        resume.resume_seq - 1
                    ),
                ));
                return;
            }
        }
        self.in_flight_bytes_max =
            self.config.in_flight_bytes_max.min(welcome.limits.in_flight_bytes_max).max(1);
        self.frame_bytes_max = welcome.limits.frame_bytes_max as usize;
        for resume in &welcome.resume {
            let held_through = resume.resume_seq - 1;
            self.lanes[resume.lane.index()] = Some(LaneState {
                next_read_seq: resume.resume_seq,
                highest_covered: held_through,
                // Fix (simulator, regression `welcome_trimmed_chunks_the_sink_had_not_committed`):
                // nothing is trimmed at the Welcome. The resume seq is what the sink *landed*
                // (`landed - base + 1`), which includes chunks written since its last commit
                // point; trimming below it deleted chunks a sink crash then lost (invariant 1:
                // delete only what an Ack covers). The sink acks what of it is durable right
                // after the grant (`SinkSession::handle_durable`).
                acked_through: 0,
                read_outstanding: false,
                idle_until: None,
                in_flight: VecDeque::new(),
                timed: 0,
                dictionaries_sent: HashSet::new(),
                unwritten_bytes: 0,
            });
        }
        self.state = State::Streaming;
        self.events.push_back(DeviceEvent::Welcomed);
    }

    fn handle_ack(&mut self, now: Instant, lane: Lane, through: u64) {
        let Some(state) = self.lanes[lane.index()].as_mut() else {
            self.close_with(Close::local(
                ErrorCode::BadFrame,
                format!("the sink acked lane {lane}, which this session does not stream"),
            ));
            return;
        };
        if through > state.highest_covered {
            let highest = state.highest_covered;
            self.close_with(Close::local(
                ErrorCode::BadFrame,
                format!(
                    "the sink acked {lane} through seq {through}, beyond the highest seq sent ({highest})"
                ),
            ));
            return;
        }
        if through <= state.acked_through {
            return; // Acks are idempotent.
        }
        state.acked_through = through;
        while let Some(&(seq, bytes, sent_at)) = state.in_flight.front() {
            if seq > through {
                break;
            }
            state.in_flight.pop_front();
            self.in_flight_bytes -= bytes;
            self.in_flight_chunks -= 1;
            if let Some(sent_at) = sent_at {
                state.timed -= 1;
                self.events.push_back(DeviceEvent::AckLatency {
                    lane,
                    latency: now.saturating_duration_since(sent_at),
                });
            }
        }
        self.events.push_back(DeviceEvent::Acked { lane, through });
    }

    /// The driver wrote `bytes` of `lane`'s transmits to its stream.
    pub fn handle_written(&mut self, lane: Lane, bytes: usize) {
        if let Some(state) = self.lanes[lane.index()].as_mut() {
            state.unwritten_bytes = state.unwritten_bytes.saturating_sub(bytes);
        }
    }

    /// What to read from the ring next, if anything: lanes in priority order, one read
    /// outstanding per lane, none while the in-flight bounds are reached or the lane is idle.
    pub fn poll_read(&mut self, now: Instant) -> Option<ReadRequest> {
        if !self.is_streaming()
            || self.in_flight_bytes >= self.in_flight_bytes_max
            || self.in_flight_chunks >= IN_FLIGHT_CHUNKS_MAX
        {
            return None;
        }
        let room_bytes = self.in_flight_bytes_max - self.in_flight_bytes;
        let room_chunks = IN_FLIGHT_CHUNKS_MAX - self.in_flight_chunks;
        for lane in Lane::ALL {
            let Some(state) = self.lanes[lane.index()].as_mut() else { continue };
            // One batch may wait for the stream while the next is read, no more: a slow link
            // backs up into QUIC's flow control and then into the ring, not into memory here.
            if state.read_outstanding
                || state.unwritten_bytes >= self.config.read_bytes_max
                || state.idle_until.is_some_and(|until| now < until)
            {
                continue;
            }
            state.read_outstanding = true;
            state.idle_until = None;
            return Some(ReadRequest {
                lane,
                from_seq: state.next_read_seq,
                chunks_max: self.config.read_chunks_max.min(room_chunks),
                bytes_max: self.config.read_bytes_max.min(usize::try_from(room_bytes).unwrap_or(usize::MAX)),
            });
        }
        None
    }

    /// The ring's answer to a [`ReadRequest`] of `lane`: `(seq, encoded chunk)` in seq order,
    /// each at or above the request's `from_seq`. `dictionary(id)` returns a dictionary's bytes
    /// from the appliance's store. An empty answer makes the lane idle for `idle_poll`.
    pub fn handle_read(
        &mut self,
        now: Instant,
        lane: Lane,
        chunks: Vec<(u64, Vec<u8>)>,
        dictionary: &mut dyn FnMut(u32) -> Option<Vec<u8>>,
    ) -> SendSummary {
        let mut summary = SendSummary::default();
        let idle_poll = self.config.idle_poll;
        let frame_bytes_max = self.frame_bytes_max;
        if !self.is_streaming() {
            return summary;
        }
        let Some(state) = self.lanes[lane.index()].as_mut() else {
            panic!("handle_read for lane {lane}, which poll_read never asked for");
        };
        assert!(state.read_outstanding, "handle_read for lane {lane} without an outstanding read");
        state.read_outstanding = false;
        if chunks.is_empty() {
            state.idle_until = Some(now + idle_poll);
            return summary;
        }
        for (seq, encoded) in chunks {
            assert!(
                seq >= state.next_read_seq,
                "the ring returned {lane} seq {seq} below the requested {}",
                state.next_read_seq
            );
            let header = ChunkHeader::decode(&encoded).expect("the ring validates every chunk it returns");
            assert!(
                header.lane == lane && header.seq == seq,
                "the ring returned a chunk of another lane or seq"
            );
            state.next_read_seq = seq + 1;
            if protocol::FRAME_KIND_BYTES + encoded.len() > frame_bytes_max {
                self.events.push_back(DeviceEvent::Undeliverable {
                    lane,
                    seq,
                    reason: format!(
                        "{} bytes exceed the sink's frame limit of {frame_bytes_max}",
                        encoded.len()
                    ),
                });
                continue;
            }
            if header.dict_id != NO_DICTIONARY && !state.dictionaries_sent.contains(&header.dict_id) {
                let Some(bytes) = dictionary(header.dict_id) else {
                    self.events.push_back(DeviceEvent::Undeliverable {
                        lane,
                        seq,
                        reason: format!(
                            "it is compressed with dictionary {}, which this appliance does not have",
                            header.dict_id
                        ),
                    });
                    continue;
                };
                // Fix (simulator, regression `dictionary_frame_above_the_sink_frame_limit`): the
                // dictionary's frame must fit the sink's frame limit too; unchecked, the sink
                // closed every session with `bad_frame` at this frame and the lane never got past
                // the chunk (a reconnect loop, not a skip).
                let dictionary_frame_bytes = protocol::FRAME_KIND_BYTES + 4 + bytes.len();
                if dictionary_frame_bytes > frame_bytes_max {
                    self.events.push_back(DeviceEvent::Undeliverable {
                        lane,
                        seq,
                        reason: format!(
                            "its dictionary {} needs a frame of {dictionary_frame_bytes} bytes, above the \
                             sink's frame limit of {frame_bytes_max}",
                            header.dict_id
                        ),
                    });
                    continue;
                }
                let mut frame = Vec::with_capacity(bytes.len() + 9);
                encode_frame(
                    FrameKind::Dictionary,
                    &dictionary_frame_payload(header.dict_id, &bytes),
                    &mut frame,
                )
                .expect("a dictionary within DICTIONARY_BYTES_MAX fits a frame");
                state.unwritten_bytes += frame.len();
                self.transmits.push_back(Transmit { stream: Stream::Lane(lane), bytes: frame });
                state.dictionaries_sent.insert(header.dict_id);
                summary.dictionaries += 1;
            }
            let bytes = encoded.len() as u64;
            let mut frame = Vec::with_capacity(encoded.len() + 5);
            encode_frame(FrameKind::Chunk, &encoded, &mut frame).expect("checked against the frame limit");
            state.unwritten_bytes += frame.len();
            self.transmits.push_back(Transmit { stream: Stream::Lane(lane), bytes: frame });
            let sent_at = (state.timed < ACK_TIMINGS_MAX).then_some(now);
            state.timed += usize::from(sent_at.is_some());
            state.in_flight.push_back((seq, bytes, sent_at));
            state.highest_covered = seq;
            self.in_flight_bytes += bytes;
            self.in_flight_chunks += 1;
            summary.chunks += 1;
            summary.bytes += bytes;
        }
        summary
    }
}
