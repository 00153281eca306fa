//! The sink's side of one connection from an appliance.
//!
//! ```text
//! new ─► AwaitingHello ─Hello─► AwaitingGrant ─grant─► Streaming ─► Closed
//!          (10 s timeout)        (landing core)   Welcome sent
//! ```
//!
//! The device id comes from the verified client certificate (the driver passes it to
//! [`SinkSession::new`]); a Hello naming another device is refused with `DeviceMismatch`.
//! After a valid Hello the session emits [`SinkEvent::Hello`] and waits for the landing core's
//! [`Grant`]: per lane the seq base of the ring's epoch, the landed watermark and the lane's
//! generation. The resume seq the Welcome names is `landed - base + 1` in the ring's numbering,
//! computed with checked arithmetic (a lane whose seq space is exhausted is refused with
//! `LimitExceeded`, never wrapped or panicked on).
//!
//! Lane streams: each unidirectional stream carries one lane, fixed by its first chunk; a lane
//! has at most one stream per session; seqs strictly increase on a stream; a chunk naming a
//! dictionary the device never sent is refused; a dictionary frame blocks its stream until the
//! driver reports it stored ([`SinkSession::dictionary_stored`]). Each accepted chunk is
//! emitted as [`SinkEvent::Chunk`] with its seq moved into the core's seq space
//! (`base + ring seq`, checked, and the header restamped) and the lane's generation, which the
//! landing core uses to fence chunks of a lane it rolled back since the grant.
//!
//! Acks: [`SinkSession::handle_durable`] turns the core's durable watermark back into the
//! ring's numbering, never beyond what this session received or the device already held at the
//! Welcome, so a device is only ever told about seqs it sent.
//!
//! Limits: [`SinkSessionConfig::streams_max`] streams per connection,
//! [`SinkSessionConfig::dictionaries_max`] dictionary frames per connection, frames up to
//! `frame_bytes_max`; a decoder buffers less than one frame plus one read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use protocol::{
    Ack, ControlMessage, DecodeError, ErrorCode, FrameDecoder, FrameKind, Lane, LaneResume, NO_DICTIONARY,
    PROTOCOL_VERSION, SessionLimits, Welcome, decode_chunk, decode_control, decode_dictionary_frame,
    restamp_seq,
};

use crate::{CONTROL_FRAME_BYTES_MAX, Close, Stream, Transmit, control_frame};

/// A lane stream, as the driver numbers it (QUIC's stream id).
pub type StreamId = u64;

#[derive(Clone, Debug)]
pub struct SinkSessionConfig {
    pub hello_timeout: Duration,
    /// Largest frame accepted, advertised in the Welcome.
    pub frame_bytes_max: usize,
    /// Advertised in the Welcome: unacked bytes the device may have in flight.
    pub in_flight_bytes_max: u64,
    /// Advertised in the Welcome.
    pub commit_interval_ms: u32,
    /// Unidirectional streams one connection may open over its life.
    pub streams_max: usize,
    /// Dictionary frames one connection may send.
    pub dictionaries_max: usize,
}

impl Default for SinkSessionConfig {
    fn default() -> SinkSessionConfig {
        SinkSessionConfig {
            hello_timeout: Duration::from_secs(10),
            frame_bytes_max: protocol::FRAME_BYTES_MAX,
            in_flight_bytes_max: 64 * 1024 * 1024,
            commit_interval_ms: 50,
            streams_max: 4 * Lane::COUNT,
            dictionaries_max: protocol::DICTIONARIES_MAX,
        }
    }
}

/// The landing core's answer to a Hello, per lane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneGrant {
    /// Core seq = base + ring seq for the ring that said Hello.
    pub base: u64,
    /// Highest core seq landed (durable or about to be) for this device and lane.
    pub landed: u64,
    /// Bumped by the landing core whenever it rolls the lane back; chunks carry it.
    pub generation: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub lanes: [LaneGrant; Lane::COUNT],
}

/// A chunk accepted by the session, for the landing core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingChunk {
    pub stream: StreamId,
    pub lane: Lane,
    /// The seq in the ring's numbering, as the device sent it.
    pub ring_seq: u64,
    /// The seq in the core's numbering (`base + ring_seq`); the encoded header carries it.
    pub seq: u64,
    pub generation: u64,
    pub header: protocol::ChunkHeader,
    pub encoded: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkEvent {
    /// A valid Hello: ask the landing core for a [`Grant`] for this device and ring.
    Hello { ring_id: [u8; 16], boot_id: [u8; 16] },
    /// Store this dictionary durably, then call [`SinkSession::dictionary_stored`] (or
    /// [`SinkSession::dictionary_refused`]). The stream is paused until then.
    Dictionary { stream: StreamId, dict_id: u32, dictionary: Vec<u8> },
    /// Land this chunk.
    Chunk(IncomingChunk),
    /// The session ended (see [`SinkSession::close`]).
    Closed,
}

/// Why the driver could not store a dictionary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DictionaryRefusal {
    /// The device is over its dictionary quota.
    Refused(String),
    /// The dictionary's bytes are not a dictionary zstd can load (checked before it is stored).
    Invalid(String),
    /// The sink's own storage failed.
    Storage(String),
}

/// Why the landing core did not land a chunk of this session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LandingRefusal {
    /// The lane was rolled back (or the device's ring changed) since this session's grant.
    Fenced,
    /// Writing or committing failed; everything since the last commit was rolled back.
    StorageFailed(String),
    /// The sink cannot grant a session (its state is unavailable).
    Unavailable(String),
}

#[derive(Debug)]
enum State {
    AwaitingHello { deadline: Instant },
    AwaitingGrant,
    Streaming { grant: Grant },
    Closed,
}

#[derive(Debug)]
struct LaneStream {
    decoder: FrameDecoder,
    lane: Option<Lane>,
    last_ring_seq: u64,
    /// A dictionary frame waits to be stored; nothing after it is decoded until then.
    blocked_on: Option<u32>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LaneProgress {
    granted: bool,
    bound_to_stream: bool,
    /// Highest ring seq the device held at the Welcome or sent since.
    highest_ring_seq: u64,
    /// Highest ring seq acked to the device.
    acked_ring_seq: u64,
}

pub struct SinkSession {
    config: SinkSessionConfig,
    device: String,
    state: State,
    control: FrameDecoder,
    streams: HashMap<StreamId, LaneStream>,
    streams_opened: usize,
    dictionaries_received: usize,
    known_dictionaries: HashSet<u32>,
    lanes: [LaneProgress; Lane::COUNT],
    transmits: VecDeque<Transmit>,
    events: VecDeque<SinkEvent>,
    close: Option<Close>,
    acks_queued: u64,
}

impl SinkSession {
    /// How a connection whose certificate names no usable device is refused (there is no
    /// session to speak of).
    pub fn unidentified(reason: &str) -> Close {
        Close::local(ErrorCode::Unauthorized, reason)
    }

    /// Acks queued so far (for the sink's counters).
    pub fn acks_queued(&self) -> u64 {
        self.acks_queued
    }

    /// A session for a connection whose certificate names `device`. `known_dictionaries` are
    /// the ids the sink already stores for this device.
    pub fn new(
        config: SinkSessionConfig,
        device: &str,
        known_dictionaries: impl IntoIterator<Item = u32>,
        now: Instant,
    ) -> SinkSession {
        assert!(
            (CONTROL_FRAME_BYTES_MAX..=protocol::FRAME_BYTES_MAX).contains(&config.frame_bytes_max),
            "frame_bytes_max {} outside {CONTROL_FRAME_BYTES_MAX}..={}",
            config.frame_bytes_max,
            protocol::FRAME_BYTES_MAX
        );
        SinkSession {
            state: State::AwaitingHello { deadline: now + config.hello_timeout },
            config,
            device: device.to_string(),
            control: FrameDecoder::new(CONTROL_FRAME_BYTES_MAX),
            streams: HashMap::new(),
            streams_opened: 0,
            dictionaries_received: 0,
            known_dictionaries: known_dictionaries.into_iter().collect(),
            lanes: Default::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            close: None,
            acks_queued: 0,
        }
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn close(&self) -> Option<&Close> {
        self.close.as_ref()
    }

    pub fn is_closed(&self) -> bool {
        self.close.is_some()
    }

    pub fn grant(&self) -> Option<&Grant> {
        match &self.state {
            State::Streaming { grant } => Some(grant),
            _ => None,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SinkEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingHello { deadline } => Some(deadline),
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::AwaitingHello { deadline } = self.state
            && now >= deadline
        {
            let waited = self.config.hello_timeout.as_millis();
            self.close_with(Close::local(ErrorCode::BadFrame, format!("no Hello within {waited} ms")));
        }
    }

    /// Whether the driver may push more bytes of `stream` (it is not waiting for a dictionary
    /// to be stored).
    pub fn stream_ready(&self, stream: StreamId) -> bool {
        self.streams.get(&stream).is_none_or(|state| state.blocked_on.is_none())
    }

    fn close_with(&mut self, close: Close) {
        if self.close.is_some() {
            return;
        }
        self.state = State::Closed;
        self.close = Some(close);
        self.streams.clear();
        self.transmits.clear();
        self.events.retain(|event| !matches!(event, SinkEvent::Chunk(_) | SinkEvent::Dictionary { .. }));
        self.events.push_back(SinkEvent::Closed);
    }

    /// A newer connection of the same device took over.
    pub fn superseded(&mut self) {
        self.close_with(Close::local(
            ErrorCode::ShuttingDown,
            "superseded by a newer connection of this device",
        ));
    }

    /// The device's certificate was revoked.
    pub fn revoked(&mut self) {
        self.close_with(Close::local(ErrorCode::Unauthorized, "device certificate revoked"));
    }

    /// The sink is stopping.
    pub fn shutting_down(&mut self) {
        self.close_with(Close::local(ErrorCode::ShuttingDown, "sink shutting down"));
    }

    /// The connection failed underneath, or the device closed it.
    pub fn connection_lost(&mut self, reason: &str) {
        self.close_with(Close::peer(ErrorCode::ShuttingDown, format!("connection lost: {reason}")));
    }

    /// Bytes that arrived on the control stream.
    pub fn handle_control_bytes(&mut self, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.control.push(bytes);
        loop {
            let frame = match self.control.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(error) => {
                    self.close_with(Close::local(ErrorCode::BadFrame, format!("control stream: {error}")));
                    return;
                }
            };
            if frame.kind != FrameKind::Control {
                self.close_with(Close::local(
                    ErrorCode::BadFrame,
                    format!("the control stream carried a {} frame", frame.kind),
                ));
                return;
            }
            let message = match decode_control(&frame.payload) {
                Ok(message) => message,
                Err(error @ DecodeError::UnsupportedVersion { .. }) => {
                    self.close_with(Close::local(ErrorCode::UnsupportedVersion, error.to_string()));
                    return;
                }
                Err(error) => {
                    self.close_with(Close::local(ErrorCode::BadFrame, error.to_string()));
                    return;
                }
            };
            self.handle_message(message);
            if self.is_closed() {
                return;
            }
        }
    }

    /// The device finished its side of the control stream. Before the Hello that ends the
    /// session; after it the device simply has nothing more to say (it only ever sends a Hello
    /// and, before closing, an Error), so the session goes on.
    pub fn handle_control_finished(&mut self) {
        if let State::AwaitingHello { .. } = self.state {
            self.close_with(Close::local(ErrorCode::BadFrame, "control stream ended before Hello"));
        }
    }

    fn handle_message(&mut self, message: ControlMessage) {
        match (&self.state, message) {
            (_, ControlMessage::Error(error)) => self.close_with(Close::peer(error.code, error.reason)),
            (State::AwaitingHello { .. }, ControlMessage::Hello(hello)) => {
                if hello.device_id != self.device {
                    let reason = format!(
                        "Hello names device {:?} but the certificate is for {:?}",
                        hello.device_id, self.device
                    );
                    self.close_with(Close::local(ErrorCode::DeviceMismatch, reason));
                    return;
                }
                for &lane in &hello.lanes {
                    self.lanes[lane.index()].granted = true;
                }
                self.state = State::AwaitingGrant;
                self.events.push_back(SinkEvent::Hello { ring_id: hello.ring_id, boot_id: hello.boot_id });
            }
            (State::AwaitingHello { .. }, _) => {
                self.close_with(Close::local(ErrorCode::BadFrame, "the first control message must be Hello"));
            }
            (_, ControlMessage::Hello(_)) => {
                self.close_with(Close::local(ErrorCode::BadFrame, "a second Hello"));
            }
            (_, other) => {
                let name = if matches!(other, ControlMessage::Welcome(_)) { "Welcome" } else { "Ack" };
                self.close_with(Close::local(ErrorCode::BadFrame, format!("a device may not send {name}")));
            }
        }
    }

    /// The landing core's answer to [`SinkEvent::Hello`]. Sends the Welcome.
    pub fn handle_grant(&mut self, grant: Result<Grant, LandingRefusal>) {
        if !matches!(self.state, State::AwaitingGrant) {
            return; // Closed meanwhile.
        }
        let grant = match grant {
            Ok(grant) => grant,
            Err(refusal) => {
                self.refuse_landing(refusal);
                return;
            }
        };
        let mut resume = Vec::new();
        for lane in Lane::ALL {
            let progress = &mut self.lanes[lane.index()];
            if !progress.granted {
                continue;
            }
            let lane_grant = grant.lanes[lane.index()];
            // The device's ring holds this lane through `held` in its own numbering; a lane
            // rolled back below its epoch's base resumes from the epoch's start.
            let held = lane_grant.landed.saturating_sub(lane_grant.base);
            let Some(resume_seq) = held.checked_add(1) else {
                let reason = format!(
                    "{lane}: the core holds seq {} (base {}), the end of the seq space; this lane \
                     cannot take more chunks from this ring",
                    lane_grant.landed, lane_grant.base
                );
                self.close_with(Close::local(ErrorCode::LimitExceeded, reason));
                return;
            };
            progress.highest_ring_seq = held;
            // Fix (simulator, regression `welcome_trimmed_chunks_the_sink_had_not_committed`):
            // `held` is landed, not necessarily durable, so it was never acked; the first
            // `handle_durable` acks what of it is durable (the device no longer trims at the
            // Welcome).
            progress.acked_ring_seq = 0;
            resume.push(LaneResume { lane, resume_seq });
        }
        let welcome = ControlMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            resume,
            limits: SessionLimits {
                frame_bytes_max: u32::try_from(self.config.frame_bytes_max).expect("asserted at new"),
                in_flight_bytes_max: self.config.in_flight_bytes_max,
                commit_interval_ms: self.config.commit_interval_ms,
            },
        });
        self.transmits.push_back(Transmit { stream: Stream::Control, bytes: control_frame(&welcome) });
        self.state = State::Streaming { grant };
    }

    /// Bytes that arrived on unidirectional stream `stream`. The driver must not push more
    /// bytes of a stream while [`SinkSession::stream_ready`] says it waits for a dictionary.
    pub fn handle_stream_bytes(&mut self, stream: StreamId, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        if !matches!(self.state, State::Streaming { .. }) {
            self.close_with(Close::local(ErrorCode::BadFrame, "data on a lane stream before the Welcome"));
            return;
        }
        if !self.streams.contains_key(&stream) {
            if self.streams_opened >= self.config.streams_max {
                let max = self.config.streams_max;
                self.close_with(Close::local(
                    ErrorCode::LimitExceeded,
                    format!("more than {max} lane streams on one connection"),
                ));
                return;
            }
            self.streams_opened += 1;
            self.streams.insert(
                stream,
                LaneStream {
                    decoder: FrameDecoder::new(self.config.frame_bytes_max),
                    lane: None,
                    last_ring_seq: 0,
                    blocked_on: None,
                },
            );
        }
        let state = self.streams.get_mut(&stream).expect("inserted above");
        assert!(
            state.blocked_on.is_none(),
            "bytes pushed to stream {stream} while it waits for a dictionary"
        );
        state.decoder.push(bytes);
        self.decode_stream(stream);
    }

    /// The device finished stream `stream`. Its lane stays bound to it for this session.
    pub fn handle_stream_finished(&mut self, stream: StreamId) {
        if let Some(state) = self.streams.get(&stream)
            && state.blocked_on.is_none()
            && state.decoder.buffered_len() > 0
        {
            self.close_with(Close::local(ErrorCode::BadFrame, "a lane stream ended inside a frame"));
            return;
        }
        if self.streams.get(&stream).is_some_and(|state| state.blocked_on.is_none()) {
            self.streams.remove(&stream);
        }
    }

    /// The dictionary of [`SinkEvent::Dictionary`] is durable; the stream continues.
    pub fn dictionary_stored(&mut self, stream: StreamId, dict_id: u32) {
        self.known_dictionaries.insert(dict_id);
        let Some(state) = self.streams.get_mut(&stream) else { return };
        if state.blocked_on == Some(dict_id) {
            state.blocked_on = None;
            self.decode_stream(stream);
        }
    }

    pub fn dictionary_refused(&mut self, refusal: DictionaryRefusal) {
        match refusal {
            DictionaryRefusal::Refused(reason) => {
                self.close_with(Close::local(ErrorCode::LimitExceeded, reason))
            }
            DictionaryRefusal::Invalid(reason) => self.close_with(Close::local(ErrorCode::BadFrame, reason)),
            DictionaryRefusal::Storage(reason) => self.close_with(Close::local(ErrorCode::Internal, reason)),
        }
    }

    /// The landing core did not land a chunk of this session, or could not grant it.
    pub fn refuse_landing(&mut self, refusal: LandingRefusal) {
        let reason = match refusal {
            LandingRefusal::Fenced => {
                "the core rolled this lane back since the session began; resend from the last Ack".to_string()
            }
            LandingRefusal::StorageFailed(reason) => {
                format!("sink storage failure ({reason}); resend from the last Ack")
            }
            LandingRefusal::Unavailable(reason) => format!("sink cannot take sessions now: {reason}"),
        };
        self.close_with(Close::local(ErrorCode::Internal, reason));
    }

    /// The core's durable watermark of `lane` for this device is `durable` (core seq), and the
    /// lane's generation is `generation`. Queues an Ack when it covers more of what this session
    /// received; closes the session if the lane was rolled back since its grant.
    pub fn handle_durable(&mut self, lane: Lane, durable: u64, generation: u64) {
        let State::Streaming { grant } = &self.state else { return };
        let lane_grant = grant.lanes[lane.index()];
        let progress = self.lanes[lane.index()];
        if !progress.granted {
            return;
        }
        if generation != lane_grant.generation {
            self.refuse_landing(LandingRefusal::Fenced);
            return;
        }
        if durable <= lane_grant.base {
            return;
        }
        // Never tell the device about seqs it did not send on this session or hold before it
        // (chunks of an older connection may still be landing).
        let through = (durable - lane_grant.base).min(progress.highest_ring_seq);
        if through > progress.acked_ring_seq {
            self.lanes[lane.index()].acked_ring_seq = through;
            self.acks_queued += 1;
            let ack = ControlMessage::Ack(Ack { lane, durable_through: through });
            self.transmits.push_back(Transmit { stream: Stream::Control, bytes: control_frame(&ack) });
        }
    }

    fn decode_stream(&mut self, stream: StreamId) {
        loop {
            let Some(state) = self.streams.get_mut(&stream) else { return };
            if state.blocked_on.is_some() {
                return;
            }
            let frame = match state.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(error) => {
                    self.close_with(Close::local(ErrorCode::BadFrame, format!("lane stream: {error}")));
                    return;
                }
            };
            let outcome = match frame.kind {
                FrameKind::Control => {
                    Err(Close::local(ErrorCode::BadFrame, "a lane stream carried a control frame"))
                }
                FrameKind::Dictionary => self.accept_dictionary(stream, frame.payload),
                FrameKind::Chunk => self.accept_chunk(stream, frame.payload),
            };
            if let Err(close) = outcome {
                self.close_with(close);
                return;
            }
        }
    }

    fn accept_dictionary(&mut self, stream: StreamId, mut payload: Vec<u8>) -> Result<(), Close> {
        let dict_id = decode_dictionary_frame(&payload)
            .map_err(|error| Close::local(ErrorCode::BadFrame, error.to_string()))?
            .0;
        self.dictionaries_received += 1;
        if self.dictionaries_received > self.config.dictionaries_max {
            return Err(Close::local(
                ErrorCode::LimitExceeded,
                format!("more than {} dictionary frames on one connection", self.config.dictionaries_max),
            ));
        }
        if self.known_dictionaries.contains(&dict_id) {
            return Ok(());
        }
        payload.drain(..4);
        self.streams.get_mut(&stream).expect("decoding it").blocked_on = Some(dict_id);
        self.events.push_back(SinkEvent::Dictionary { stream, dict_id, dictionary: payload });
        Ok(())
    }

    fn accept_chunk(&mut self, stream: StreamId, mut encoded: Vec<u8>) -> Result<(), Close> {
        let State::Streaming { grant } = &self.state else {
            unreachable!("streams decode only when streaming")
        };
        let grant = *grant;
        let header =
            decode_chunk(&encoded).map_err(|error| Close::local(ErrorCode::BadChunk, error.to_string()))?.0;
        let lane = header.lane;
        let state = self.streams.get_mut(&stream).expect("decoding it");
        match state.lane {
            Some(stream_lane) if stream_lane != lane => {
                return Err(Close::local(
                    ErrorCode::BadChunk,
                    format!("lane {lane} chunk on the {stream_lane} stream"),
                ));
            }
            Some(_) => {}
            None => {
                let progress = &mut self.lanes[lane.index()];
                if !progress.granted {
                    return Err(Close::local(
                        ErrorCode::BadChunk,
                        format!("lane {lane} was not in the Hello"),
                    ));
                }
                if progress.bound_to_stream {
                    return Err(Close::local(
                        ErrorCode::BadChunk,
                        format!("a second stream for lane {lane}"),
                    ));
                }
                progress.bound_to_stream = true;
                state.lane = Some(lane);
            }
        }
        if header.seq <= state.last_ring_seq {
            return Err(Close::local(
                ErrorCode::BadChunk,
                format!(
                    "{lane} seq {} after seq {}: seqs must increase on a stream",
                    header.seq, state.last_ring_seq
                ),
            ));
        }
        state.last_ring_seq = header.seq;
        if header.dict_id != NO_DICTIONARY && !self.known_dictionaries.contains(&header.dict_id) {
            return Err(Close::local(
                ErrorCode::BadChunk,
                format!(
                    "{lane} seq {} is compressed with dictionary {}, which this device never sent",
                    header.seq, header.dict_id
                ),
            ));
        }
        let lane_grant = grant.lanes[lane.index()];
        let Some(seq) = lane_grant.base.checked_add(header.seq) else {
            return Err(Close::local(
                ErrorCode::LimitExceeded,
                format!(
                    "{lane} seq {} overflows the core's seq space (epoch base {})",
                    header.seq, lane_grant.base
                ),
            ));
        };
        let ring_seq = header.seq;
        let progress = &mut self.lanes[lane.index()];
        progress.highest_ring_seq = progress.highest_ring_seq.max(ring_seq);
        restamp_seq(&mut encoded, seq);
        let header = protocol::ChunkHeader { seq, ..header };
        self.events.push_back(SinkEvent::Chunk(IncomingChunk {
            stream,
            lane,
            ring_seq,
            seq,
            generation: lane_grant.generation,
            header,
            encoded,
        }));
        Ok(())
    }
}
