//! The sink's session state machine driven by a hostile device: arbitrary control and stream
//! bytes, well-formed frames with arbitrary seqs, lanes and dictionaries, interleaved with what
//! the driver would do (grants, durable watermarks, stored or refused dictionaries, timeouts).
//! Never panics; core seqs handed to landing strictly increase per lane; Acks never cover more
//! than the session received.
#![no_main]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use protocol::{
    Codec, ControlMessage, FrameDecoder, FrameKind, Hello, Lane, PROTOCOL_VERSION, SealedChunk,
    decode_control, dictionary_id, encode_control, encode_frame,
};
use session::{
    DictionaryRefusal, Grant, LandingRefusal, LaneGrant, SinkEvent, SinkSession, SinkSessionConfig,
};

const DEVICE: &str = "cam-01";

#[derive(Arbitrary, Debug)]
enum Op {
    Control(Vec<u8>),
    ValidHello { device_is_ours: bool, lanes: u8 },
    ControlFinished,
    Grant { base: u64, landed: u64, generation: u64 },
    RefuseGrant,
    Stream { stream: u8, bytes: Vec<u8> },
    Chunk { stream: u8, lane: u8, seq: u64, dict_id: u32 },
    Dictionary { stream: u8, bytes: Vec<u8>, honest_id: bool },
    StreamFinished(u8),
    ResolveDictionary(u8),
    Durable { lane: u8, durable: u64, generation: u64 },
    RefuseLanding,
    Advance(u16),
}

fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(kind, payload, &mut out).expect("test frames are within bounds");
    out
}

fn lane(id: u8) -> Lane {
    Lane::ALL[id as usize % Lane::COUNT]
}

fuzz_target!(|ops: Vec<Op>| {
    let start = Instant::now();
    let mut now = start;
    let mut session = SinkSession::new(SinkSessionConfig::default(), DEVICE, [7], now);
    let mut pending_dictionaries = VecDeque::new();
    let mut last_core_seq = [0u64; Lane::COUNT];
    let mut received_ring_seq = [0u64; Lane::COUNT];
    let mut acks = FrameDecoder::new(protocol::FRAME_BYTES_MAX);
    for op in ops.into_iter().take(256) {
        match op {
            Op::Control(bytes) => session.handle_control_bytes(&bytes),
            Op::ValidHello { device_is_ours, lanes } => {
                let hello = ControlMessage::Hello(Hello {
                    protocol_version: PROTOCOL_VERSION,
                    device_id: if device_is_ours { DEVICE.into() } else { "someone-else".into() },
                    boot_id: [1; 16],
                    ring_id: [2; 16],
                    lanes: Lane::ALL.iter().copied().filter(|l| lanes & (1 << l.index()) != 0).collect(),
                    codecs: Codec::ALL.to_vec(),
                    dictionary_ids: vec![protocol::LaneDictionary { lane: Lane::Sensor, dict_id: 7 }],
                });
                session.handle_control_bytes(&frame(FrameKind::Control, &encode_control(&hello).unwrap()));
            }
            Op::ControlFinished => session.handle_control_finished(),
            Op::Grant { base, landed, generation } => {
                if matches!(session.poll_event(), Some(SinkEvent::Hello { .. })) {
                    session.handle_grant(Ok(Grant {
                        lanes: [LaneGrant { base, landed, generation }; Lane::COUNT],
                    }));
                }
            }
            Op::RefuseGrant => {
                if matches!(session.poll_event(), Some(SinkEvent::Hello { .. })) {
                    session.handle_grant(Err(LandingRefusal::Unavailable("fuzz".into())));
                }
            }
            Op::Stream { stream, bytes } => session.handle_stream_bytes(u64::from(stream % 24), &bytes),
            Op::Chunk { stream, lane: lane_id, seq, dict_id } => {
                let body = seq.to_le_bytes().to_vec();
                if let Ok(chunk) =
                    SealedChunk::new(lane(lane_id), Codec::Raw, dict_id, 1, body.len() as u32, body)
                {
                    session.handle_stream_bytes(
                        u64::from(stream % 24),
                        &frame(FrameKind::Chunk, &chunk.encode(seq.max(1))),
                    );
                }
            }
            Op::Dictionary { stream, bytes, honest_id } => {
                let id = if honest_id { dictionary_id(&bytes) } else { 7 };
                // dict_id ‖ dictionary, built by hand: the id may lie about the content.
                let mut payload = id.to_le_bytes().to_vec();
                payload.extend_from_slice(&bytes);
                let mut framed = Vec::new();
                if encode_frame(FrameKind::Dictionary, &payload, &mut framed).is_ok() {
                    session.handle_stream_bytes(u64::from(stream % 24), &framed);
                }
            }
            Op::StreamFinished(stream) => session.handle_stream_finished(u64::from(stream % 24)),
            Op::ResolveDictionary(choice) => {
                if let Some((stream, dict_id)) = pending_dictionaries.pop_front() {
                    match choice % 4 {
                        0 => session.dictionary_refused(DictionaryRefusal::Refused("quota".into())),
                        1 => session.dictionary_refused(DictionaryRefusal::Invalid("zstd".into())),
                        _ => session.dictionary_stored(stream, dict_id),
                    }
                }
            }
            Op::Durable { lane: lane_id, durable, generation } => {
                let lane = lane(lane_id);
                // The landing core reports what it landed (maybe from an older session too).
                let durable = if generation % 2 == 0 { last_core_seq[lane.index()] } else { durable };
                let generation =
                    session.grant().map_or(generation, |grant| grant.lanes[lane.index()].generation);
                session.handle_durable(lane, durable, generation);
            }
            Op::RefuseLanding => session.refuse_landing(LandingRefusal::Fenced),
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms));
                session.handle_timeout(now);
            }
        }
        while let Some(event) = session.poll_event() {
            match event {
                SinkEvent::Chunk(chunk) => {
                    let index = chunk.lane.index();
                    assert!(chunk.seq > last_core_seq[index], "core seqs go back on {}", chunk.lane);
                    last_core_seq[index] = chunk.seq;
                    received_ring_seq[index] = received_ring_seq[index].max(chunk.ring_seq);
                    let (header, _) =
                        protocol::decode_chunk(&chunk.encoded).expect("restamped chunk decodes");
                    assert_eq!(header.seq, chunk.seq);
                }
                SinkEvent::Dictionary { stream, dict_id, .. } => {
                    pending_dictionaries.push_back((stream, dict_id))
                }
                SinkEvent::Hello { .. } | SinkEvent::Closed => {}
            }
        }
        while let Some(transmit) = session.poll_transmit() {
            acks.push(&transmit.bytes);
            while let Some(frame) = acks.next_frame().expect("the sink frames its own messages") {
                if let Ok(ControlMessage::Ack(ack)) = decode_control(&frame.payload) {
                    let Some(grant) = session.grant() else { continue };
                    let highest = received_ring_seq[ack.lane.index()].max(
                        grant.lanes[ack.lane.index()]
                            .landed
                            .saturating_sub(grant.lanes[ack.lane.index()].base),
                    );
                    assert!(ack.durable_through <= highest, "ack beyond what the device sent or held");
                }
            }
        }
    }
});
