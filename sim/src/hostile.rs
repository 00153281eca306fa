//! Hostile devices: a valid certificate (the sink session is created for their own device id)
//! and bytes that break the protocol on purpose. Each plays one [`HostileKind`] over and over —
//! a connection lost, a sink crash or a storage fault in the middle only means another try —
//! until the sink has closed one of its sessions with the expected [`ErrorCode`]. Any other code
//! than the expected one or a transient one (`ShuttingDown`, `Internal`) fails the run, and so
//! does a hostile that never got its expected close by the end of the heal phase.
//!
//! Hostile devices do not use `DeviceSession` (an honest machine cannot say these things): they
//! build frames by hand with the protocol crate and read the sink's control stream with a
//! `FrameDecoder` only to learn the Welcome's resume seqs.

use protocol::{
    Ack, Codec, ControlMessage, ErrorCode, FrameDecoder, FrameKind, Hello, Lane, PROTOCOL_VERSION,
    SealedChunk, dictionary_frame_payload, dictionary_id, encode_control, encode_frame,
};

use crate::link::ConnId;
use crate::rng::Rng;

/// Dictionary frames the `TooManyDictionaries` device sends: one more than a connection may.
pub const TOO_MANY_DICTIONARIES: usize = protocol::DICTIONARIES_MAX + 1;
/// Chunks the `Replayer` resends on every connection, and connections it makes at least.
pub const REPLAYED_CHUNKS_MAX: u64 = 20;
pub const REPLAYER_ATTEMPTS_MIN: u64 = 3;
/// Control frames a hostile device decodes from the sink.
const CONTROL_FRAME_BYTES_MAX: usize = protocol::FRAME_KIND_BYTES + protocol::CONTROL_MESSAGE_BYTES_MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostileKind {
    /// A chunk with seq `u64::MAX` (it lands at base 0); the next Hello finds the lane's seq
    /// space exhausted.
    SeqMax,
    /// A fresh ring each connection and a chunk near `u64::MAX`: once an epoch's base is high,
    /// `base + seq` overflows.
    EpochOverflow,
    /// A sensor chunk, then a media chunk on the same stream.
    LaneSwitch,
    /// Two streams for the sensor lane.
    TwoStreams,
    /// Seqs going backwards on a stream.
    SeqBackwards,
    /// A chunk naming a dictionary never sent.
    UnknownDictionary,
    /// A dictionary frame whose id is not its content's.
    GarbageDictionary,
    /// More dictionary frames than a connection may send.
    TooManyDictionaries,
    /// A Hello naming another (honest) device.
    WrongDevice,
    /// Random bytes on the control stream.
    RandomBytes,
    /// A control frame on a lane stream.
    ControlOnLane,
    /// A lane stream that ends inside a frame.
    StreamEndsInFrame,
    /// A chunk whose body does not match its CRC.
    BadCrc,
    /// A chunk of a lane the Hello did not name.
    LaneNotInHello,
    /// Lane data and no Hello.
    DataBeforeHello,
    /// Connects and says nothing.
    Silent,
    /// A second Hello after the Welcome.
    SecondHello,
    /// An Ack from the device.
    AckFromDevice,
    /// Not hostile, only wasteful: resends the same chunks from seq 1 on every connection,
    /// whatever the Welcome says. The protocol allows it; the sink must drop the resends as
    /// duplicates and hold each chunk exactly once (the dedupe path, which honest devices,
    /// resuming at the sink's landed seq, rarely take).
    Replayer,
}

impl HostileKind {
    pub const ALL: [HostileKind; 19] = [
        HostileKind::SeqMax,
        HostileKind::EpochOverflow,
        HostileKind::LaneSwitch,
        HostileKind::TwoStreams,
        HostileKind::SeqBackwards,
        HostileKind::UnknownDictionary,
        HostileKind::GarbageDictionary,
        HostileKind::TooManyDictionaries,
        HostileKind::WrongDevice,
        HostileKind::RandomBytes,
        HostileKind::ControlOnLane,
        HostileKind::StreamEndsInFrame,
        HostileKind::BadCrc,
        HostileKind::LaneNotInHello,
        HostileKind::DataBeforeHello,
        HostileKind::Silent,
        HostileKind::SecondHello,
        HostileKind::AckFromDevice,
        HostileKind::Replayer,
    ];

    /// The codes the sink must close this device's session with.
    pub fn expected(self) -> &'static [ErrorCode] {
        match self {
            HostileKind::SeqMax | HostileKind::EpochOverflow | HostileKind::TooManyDictionaries => {
                &[ErrorCode::LimitExceeded]
            }
            HostileKind::LaneSwitch
            | HostileKind::TwoStreams
            | HostileKind::SeqBackwards
            | HostileKind::UnknownDictionary
            | HostileKind::BadCrc
            | HostileKind::LaneNotInHello => &[ErrorCode::BadChunk],
            HostileKind::GarbageDictionary
            | HostileKind::ControlOnLane
            | HostileKind::StreamEndsInFrame
            | HostileKind::DataBeforeHello
            | HostileKind::Silent
            | HostileKind::SecondHello
            | HostileKind::AckFromDevice => &[ErrorCode::BadFrame],
            HostileKind::WrongDevice => &[ErrorCode::DeviceMismatch],
            // Random bytes may even parse as a control frame of another version.
            HostileKind::RandomBytes => &[ErrorCode::BadFrame, ErrorCode::UnsupportedVersion],
            // Never closed for what it sends.
            HostileKind::Replayer => &[],
        }
    }

    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

/// Codes any session may end with for reasons that are not its own: a lost connection, a sink
/// shutting down or superseding it, a storage failure or a fence after a rollback.
pub fn is_transient(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::ShuttingDown | ErrorCode::Internal)
}

pub struct Hostile {
    pub index: usize,
    pub id: String,
    pub kind: HostileKind,
    pub conn: Option<ConnId>,
    pub decoder: FrameDecoder,
    pub welcomed: bool,
    pub ring_id: [u8; 16],
    pub attempts: u64,
    pub done: bool,
    /// Every close of one of its sessions at the sink: (code, by the device, reason).
    pub closes: Vec<(ErrorCode, bool, String)>,
    /// `Replayer`: how many chunks it resends.
    pub replayed: u64,
}

impl Hostile {
    pub fn new(index: usize, kind: HostileKind, rng: &mut Rng) -> Hostile {
        Hostile {
            index,
            id: format!("hostile-{index}-{}", kind.name().to_lowercase()),
            kind,
            conn: None,
            decoder: FrameDecoder::new(CONTROL_FRAME_BYTES_MAX),
            welcomed: false,
            ring_id: rng.bytes16(),
            attempts: 0,
            done: false,
            closes: Vec::new(),
            replayed: rng.range(5, REPLAYED_CHUNKS_MAX),
        }
    }

    /// Starts a connection attempt: fresh decoder; `EpochOverflow` takes a fresh ring.
    pub fn start_attempt(&mut self, conn: ConnId, rng: &mut Rng) {
        self.conn = Some(conn);
        self.decoder = FrameDecoder::new(CONTROL_FRAME_BYTES_MAX);
        self.welcomed = false;
        self.attempts += 1;
        if self.kind == HostileKind::EpochOverflow {
            self.ring_id = rng.bytes16();
        }
    }
}

/// What a hostile device writes: (stream, bytes, finish). Stream `None` is the control stream;
/// `Some(n)` the device's n-th unidirectional stream.
pub type Writes = Vec<(Option<usize>, Vec<u8>, bool)>;

pub fn control_frame(message: &ControlMessage) -> Vec<u8> {
    let payload = encode_control(message).expect("hostile control messages stay within bounds");
    let mut frame = Vec::new();
    encode_frame(FrameKind::Control, &payload, &mut frame).expect("a control message fits a frame");
    frame
}

fn hello(device_id: &str, ring_id: [u8; 16], lanes: Vec<Lane>, rng: &mut Rng) -> Vec<u8> {
    control_frame(&ControlMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        device_id: device_id.to_string(),
        boot_id: rng.bytes16(),
        ring_id,
        lanes,
        codecs: Codec::ALL.to_vec(),
        dictionary_ids: Vec::new(),
    }))
}

/// A valid chunk frame of `lane` at `seq`, one record, naming `dict_id`.
pub fn chunk_frame(lane: Lane, seq: u64, dict_id: u32, rng: &mut Rng) -> Vec<u8> {
    let body = rng.bytes(8);
    let chunk =
        SealedChunk::new(lane, Codec::Raw, dict_id, 1, body.len() as u32, body).expect("a small chunk");
    let mut frame = Vec::new();
    encode_frame(FrameKind::Chunk, &chunk.encode(seq), &mut frame).expect("a small chunk fits a frame");
    frame
}

/// The `Replayer`'s chunk at `seq`: the same bytes on every connection.
pub fn replayed_chunk(seq: u64) -> SealedChunk {
    let body = seq.to_le_bytes().repeat(2);
    SealedChunk::new(Lane::Sensor, Codec::Raw, 0, 1, body.len() as u32, body).expect("a small chunk")
}

fn replayed_chunk_frame(seq: u64) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_frame(FrameKind::Chunk, &replayed_chunk(seq).encode(seq), &mut frame)
        .expect("a small chunk fits a frame");
    frame
}

fn dictionary_frame(dictionary: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_frame(
        FrameKind::Dictionary,
        &dictionary_frame_payload(dictionary_id(dictionary), dictionary),
        &mut frame,
    )
    .expect("a small dictionary fits a frame");
    frame
}

/// What the device sends as soon as the connection is up.
pub fn opening(hostile: &Hostile, honest_victim: &str, rng: &mut Rng) -> Writes {
    let all = Lane::ALL.to_vec();
    match hostile.kind {
        HostileKind::WrongDevice => vec![(None, hello(honest_victim, hostile.ring_id, all, rng), false)],
        HostileKind::RandomBytes => {
            let length = rng.range_usize(1, 200);
            vec![(None, rng.bytes(length), false)]
        }
        HostileKind::DataBeforeHello => vec![(Some(0), chunk_frame(Lane::Sensor, 1, 0, rng), false)],
        HostileKind::Silent => Vec::new(),
        HostileKind::LaneNotInHello => {
            vec![(None, hello(&hostile.id, hostile.ring_id, vec![Lane::Audit], rng), false)]
        }
        _ => vec![(None, hello(&hostile.id, hostile.ring_id, all, rng), false)],
    }
}

/// What the device sends once welcomed; `resume(lane)` is the Welcome's resume seq.
pub fn after_welcome(hostile: &Hostile, resume: impl Fn(Lane) -> u64, rng: &mut Rng) -> Writes {
    let sensor = resume(Lane::Sensor);
    match hostile.kind {
        HostileKind::SeqMax => vec![(Some(0), chunk_frame(Lane::Audit, u64::MAX, 0, rng), false)],
        HostileKind::EpochOverflow => vec![(Some(0), chunk_frame(Lane::Sensor, u64::MAX - 5, 0, rng), false)],
        HostileKind::LaneSwitch => {
            let mut bytes = chunk_frame(Lane::Sensor, sensor, 0, rng);
            bytes.extend(chunk_frame(Lane::Media, resume(Lane::Media), 0, rng));
            vec![(Some(0), bytes, false)]
        }
        HostileKind::TwoStreams => vec![
            (Some(0), chunk_frame(Lane::Sensor, sensor, 0, rng), false),
            (Some(1), chunk_frame(Lane::Sensor, sensor + 1, 0, rng), false),
        ],
        HostileKind::SeqBackwards => {
            let decisions = resume(Lane::Decisions);
            let mut bytes = chunk_frame(Lane::Decisions, decisions + 5, 0, rng);
            bytes.extend(chunk_frame(Lane::Decisions, decisions + 2, 0, rng));
            vec![(Some(0), bytes, false)]
        }
        HostileKind::UnknownDictionary => {
            let never_sent = dictionary_id(&rng.bytes(64));
            vec![(Some(0), chunk_frame(Lane::Media, resume(Lane::Media), never_sent, rng), false)]
        }
        HostileKind::GarbageDictionary => {
            let dictionary = rng.bytes(64);
            let mut payload = dictionary_id(&dictionary).wrapping_add(1).max(1).to_le_bytes().to_vec();
            payload.extend_from_slice(&dictionary);
            let mut frame = Vec::new();
            encode_frame(FrameKind::Dictionary, &payload, &mut frame).expect("fits");
            vec![(Some(0), frame, false)]
        }
        HostileKind::TooManyDictionaries => {
            let mut bytes = Vec::new();
            for _ in 0..TOO_MANY_DICTIONARIES {
                bytes.extend(dictionary_frame(&rng.bytes(32)));
            }
            vec![(Some(0), bytes, false)]
        }
        HostileKind::ControlOnLane => {
            let ack = control_frame(&ControlMessage::Ack(Ack { lane: Lane::Sensor, durable_through: 1 }));
            vec![(Some(0), ack, false)]
        }
        HostileKind::StreamEndsInFrame => {
            let frame = chunk_frame(Lane::Sensor, sensor, 0, rng);
            vec![(Some(0), frame[..10].to_vec(), true)]
        }
        HostileKind::BadCrc => {
            let mut frame = chunk_frame(Lane::Sensor, sensor, 0, rng);
            let last = frame.len() - 1;
            frame[last] ^= 0x5a;
            vec![(Some(0), frame, false)]
        }
        HostileKind::LaneNotInHello => vec![(Some(0), chunk_frame(Lane::Sensor, 1, 0, rng), false)],
        HostileKind::SecondHello => {
            vec![(None, hello(&hostile.id, hostile.ring_id, Lane::ALL.to_vec(), rng), false)]
        }
        HostileKind::AckFromDevice => {
            vec![(
                None,
                control_frame(&ControlMessage::Ack(Ack { lane: Lane::Audit, durable_through: 1 })),
                false,
            )]
        }
        HostileKind::Replayer => {
            let bytes = (1..=hostile.replayed).flat_map(replayed_chunk_frame).collect();
            vec![(Some(0), bytes, false)]
        }
        HostileKind::WrongDevice
        | HostileKind::RandomBytes
        | HostileKind::DataBeforeHello
        | HostileKind::Silent => Vec::new(),
    }
}

use crate::link::{Dir, Payload, Peer, StreamKey};
use crate::time::MICROS_PER_MS;
use crate::world::{Event, Side, World};

/// How long a hostile device waits for the sink to act on what it sent before it hangs up and
/// tries again.
const GIVE_UP_US: (u64, u64) = (300 * MICROS_PER_MS, 3_000 * MICROS_PER_MS);
/// How long it waits before connecting again.
const RETRY_US: (u64, u64) = (50 * MICROS_PER_MS, 1_000 * MICROS_PER_MS);

impl World {
    pub fn hostile_connect(&mut self, hostile: usize) {
        if self.hostiles[hostile].done || self.hostiles[hostile].conn.is_some() {
            return;
        }
        let conn = self.new_connection(Peer::Hostile(hostile), self.hostiles[hostile].id.clone());
        self.hostiles[hostile].start_attempt(conn, &mut self.rng);
        self.hostile_streams.insert(hostile, Vec::new());
        let handshake = self.connections[&conn].handshake_us();
        self.queue.after(handshake, Event::HostileConnected { hostile, conn });
    }

    fn hostile_retry(&mut self, hostile: usize) {
        self.hostiles[hostile].conn = None;
        if !self.hostiles[hostile].done {
            let delay = self.rng.range(RETRY_US.0, RETRY_US.1);
            self.queue.after(delay, Event::HostileConnect { hostile });
        }
    }

    pub fn hostile_connected(&mut self, hostile: usize, conn: ConnId) {
        if self.hostiles[hostile].conn != Some(conn) {
            return;
        }
        let reachable =
            self.sink.accepting() && self.connections.get(&conn).is_some_and(|connection| !connection.broken);
        if !reachable {
            if let Some(connection) = self.connections.get_mut(&conn) {
                connection.device_open = false;
            }
            self.hostile_retry(hostile);
            return;
        }
        trace!(
            self,
            "{}: connected (conn#{conn}, attempt {})",
            self.hostiles[hostile].id,
            self.hostiles[hostile].attempts
        );
        self.sink_accept(conn, Some(hostile));
        let victim = self.devices[0].id.clone();
        let writes = opening(&self.hostiles[hostile], &victim, &mut self.rng);
        self.hostile_write(hostile, conn, writes);
        // A device waiting to be closed waits out the sink's Hello timeout too; the replayer
        // hangs up as soon as its chunks could have landed.
        let waits_for_close = self.hostiles[hostile].kind != HostileKind::Replayer;
        let hello_timeout = self.scenario.sink.session.hello_timeout.as_micros() as u64;
        let give_up =
            self.rng.range(GIVE_UP_US.0, GIVE_UP_US.1) + if waits_for_close { hello_timeout } else { 0 };
        self.queue.after(give_up, Event::HostileGiveUp { hostile, conn });
    }

    fn hostile_write(&mut self, hostile: usize, conn: ConnId, writes: Writes) {
        for (stream, bytes, finish) in writes {
            let key = match stream {
                None => StreamKey::Control,
                Some(index) => {
                    let opened = self.hostile_streams.entry(hostile).or_default();
                    while opened.len() <= index {
                        let key = self
                            .connections
                            .get_mut(&conn)
                            .map_or(StreamKey::Uni(u64::MAX), |connection| connection.open_uni());
                        opened.push(key);
                    }
                    opened[index]
                }
            };
            self.send(conn, Dir::Up, key, Payload::Bytes(bytes));
            if finish {
                self.send(conn, Dir::Up, key, Payload::Fin);
            }
        }
    }

    pub fn hostile_deliver(&mut self, hostile: usize, conn: ConnId, payload: Payload) {
        if self.hostiles[hostile].conn != Some(conn) {
            return;
        }
        let Payload::Bytes(bytes) = payload else { return };
        let state = &mut self.hostiles[hostile];
        state.decoder.push(&bytes);
        let mut welcome = None;
        while let Ok(Some(frame)) = state.decoder.next_frame() {
            if frame.kind == FrameKind::Control
                && let Ok(ControlMessage::Welcome(message)) = protocol::decode_control(&frame.payload)
                && !state.welcomed
            {
                state.welcomed = true;
                welcome = Some(message);
            }
        }
        if let Some(welcome) = welcome {
            let resume = |lane: Lane| {
                welcome.resume.iter().find(|resume| resume.lane == lane).map_or(1, |resume| resume.resume_seq)
            };
            trace!(self, "{}: welcomed (conn#{conn}): {:?}", self.hostiles[hostile].id, welcome.resume);
            let writes = after_welcome(&self.hostiles[hostile], resume, &mut self.rng);
            self.hostile_write(hostile, conn, writes);
        }
    }

    pub fn hostile_give_up(&mut self, hostile: usize, conn: ConnId) {
        if self.hostiles[hostile].conn != Some(conn) {
            return;
        }
        if self.hostiles[hostile].kind == HostileKind::Replayer && !self.hostiles[hostile].done {
            let state = &self.hostiles[hostile];
            let durable: Vec<u64> =
                self.sink.disk.durable_chunks(&state.id, Lane::Sensor).iter().map(|(seq, _)| *seq).collect();
            if state.attempts >= REPLAYER_ATTEMPTS_MIN && durable == (1..=state.replayed).collect::<Vec<_>>()
            {
                self.hostiles[hostile].done = true;
                self.last_progress = self.queue.now;
            }
        }
        trace!(self, "{}: hangs up (conn#{conn})", self.hostiles[hostile].id);
        self.close_connection(conn, Side::Device, "closed by the device: shutting_down".to_string());
        self.hostile_retry(hostile);
    }

    pub fn hostile_connection_lost(&mut self, hostile: usize, conn: ConnId) {
        if self.hostiles[hostile].conn == Some(conn) {
            self.hostile_retry(hostile);
        }
    }

    /// The sink closed one of this device's sessions.
    pub fn hostile_closed(&mut self, hostile: usize, code: ErrorCode, by_peer: bool, reason: &str) {
        let state = &mut self.hostiles[hostile];
        state.closes.push((code, by_peer, reason.to_string()));
        let kind = state.kind;
        if kind.expected().contains(&code) && !by_peer {
            state.done = true;
            self.last_progress = self.queue.now;
        } else if !is_transient(code) {
            let id = state.id.clone();
            self.fail(format!("HOSTILE DEVICE CLOSED WITH THE WRONG CODE: {id} ({kind:?}) expected {:?}, got {code}: {reason}", kind.expected()));
        }
    }
}
