//! Both session state machines on hostile bytes (proptest, in every `cargo test`; the `fuzz/`
//! targets `sink_session` and `device_session` go further with coverage guidance): after a
//! valid start, arbitrary bytes, valid-looking frames with arbitrary seqs and lanes, and
//! well-formed Welcomes and Acks with arbitrary numbers. Neither side panics; the sink hands
//! landing strictly increasing core seqs per lane and closes with a peer-violation code, never
//! `internal`; the device never trims past what it sent or the sink held.

mod common;

use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use protocol::{
    Ack, Codec, ControlMessage, ErrorCode, FrameKind, Lane, LaneResume, PROTOCOL_VERSION, SealedChunk,
    SessionLimits, Welcome, encode_control,
};
use session::{
    DeviceConfig, DeviceEvent, DeviceSession, Grant, LaneGrant, SinkEvent, SinkSession, SinkSessionConfig,
};

use common::{control, frame, hello};

const DEVICE: &str = "cam-01";

/// What a hostile device sends on a stream.
#[derive(Clone, Debug)]
enum Send {
    Bytes(Vec<u8>),
    Chunk { lane: u8, seq: u64, dict_id: u32 },
}

fn send_strategy() -> impl Strategy<Value = (u8, Send)> {
    let seq = prop_oneof![8 => 0..64u64, 1 => any::<u64>(), 1 => (u64::MAX - 4)..=u64::MAX];
    let dict_id = prop_oneof![8 => Just(protocol::NO_DICTIONARY), 1 => any::<u32>()];
    prop_oneof![
        // Mostly chunks on the stream of their lane (what an honest device does, with hostile
        // seqs and dictionaries), sometimes on any stream, sometimes raw bytes.
        6 => (0..Lane::COUNT as u8, seq.clone(), dict_id.clone())
            .prop_map(|(lane, seq, dict_id)| (lane, Send::Chunk { lane, seq, dict_id })),
        1 => (0..20u8, any::<u8>(), seq, dict_id)
            .prop_map(|(stream, lane, seq, dict_id)| (stream, Send::Chunk { lane, seq, dict_id })),
        1 => (0..20u8, vec(any::<u8>(), 0..64)).prop_map(|(stream, bytes)| (stream, Send::Bytes(bytes))),
    ]
}

fn lane(id: u8) -> Lane {
    Lane::ALL[id as usize % Lane::COUNT]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_sink_session_survives_a_hostile_device(
        base in prop_oneof![Just(0u64), any::<u64>()],
        landed_offset in 0..16u64,
        sends in vec(send_strategy(), 0..48),
    ) {
        let landed = base.saturating_add(landed_offset);
        let mut session = SinkSession::new(SinkSessionConfig::default(), DEVICE, [], Instant::now());
        session.handle_control_bytes(&control(&hello(DEVICE)));
        let said_hello = matches!(session.poll_event(), Some(SinkEvent::Hello { .. }));
        prop_assert!(said_hello, "a valid Hello asks for a grant");
        session.handle_grant(Ok(Grant { lanes: [LaneGrant { base, landed, generation: 1 }; Lane::COUNT] }));
        // Landing drops what is at or below `landed`; the session only guarantees order.
        let mut last_core_seq = [base; Lane::COUNT];
        for (stream, send) in sends {
            let bytes = match send {
                Send::Bytes(bytes) => bytes,
                Send::Chunk { lane: id, seq, dict_id } => {
                    let body = seq.to_le_bytes().to_vec();
                    let chunk = SealedChunk::new(lane(id), Codec::Raw, dict_id, 1, 8, body).expect("valid chunk");
                    frame(FrameKind::Chunk, &chunk.encode(seq.max(1)))
                }
            };
            session.handle_stream_bytes(u64::from(stream), &bytes);
            while let Some(event) = session.poll_event() {
                if let SinkEvent::Chunk(chunk) = event {
                    let index = chunk.lane.index();
                    prop_assert!(chunk.seq > last_core_seq[index], "core seq {} after {}", chunk.seq, last_core_seq[index]);
                    prop_assert_eq!(Some(chunk.seq), base.checked_add(chunk.ring_seq));
                    last_core_seq[index] = chunk.seq;
                    // Landed at once, durable at once: Acks must stay within what was sent.
                    session.handle_durable(chunk.lane, chunk.seq, 1);
                }
            }
            if let Some(close) = session.close() {
                prop_assert!(
                    matches!(close.code, ErrorCode::BadFrame | ErrorCode::BadChunk | ErrorCode::LimitExceeded),
                    "closed with {:?}: {}", close.code, close.reason
                );
                break;
            }
        }
    }

    #[test]
    fn the_device_session_survives_a_hostile_sink(
        ring_next in 1..64u64,
        // Per lane: absent, a resume seq the ring holds (mostly), or any number.
        welcome_resume in vec(prop_oneof![3 => any::<u64>().prop_map(|seq| Some((true, seq))), 1 => any::<u64>().prop_map(|seq| Some((false, seq))), 1 => Just(None)], Lane::COUNT),
        limits in (
            prop_oneof![Just((1 + protocol::CONTROL_MESSAGE_BYTES_MAX) as u32), ((1 + protocol::CONTROL_MESSAGE_BYTES_MAX) as u32)..=(protocol::FRAME_BYTES_MAX as u32)],
            any::<u64>(),
            any::<u32>(),
        ),
        // (lane, honest, value): an honest Ack covers part of what was sent; a hostile one any seq.
        acks in vec((any::<u8>(), prop_oneof![4 => Just(true), 1 => Just(false)], any::<u64>()), 0..24),
        garbage in vec(any::<u8>(), 0..32),
    ) {
        let config = DeviceConfig {
            device_id: DEVICE.into(),
            boot_id: [1; 16],
            ring_id: [2; 16],
            lanes: Lane::ALL.to_vec(),
            welcome_timeout: Duration::from_secs(10),
            read_chunks_max: 8,
            read_bytes_max: 1 << 20,
            idle_poll: Duration::from_millis(100),
            in_flight_bytes_max: 8 << 20,
        };
        let now = Instant::now();
        let mut device = DeviceSession::new(config, [ring_next; Lane::COUNT], now);
        let resume: Vec<LaneResume> = Lane::ALL
            .into_iter()
            .zip(welcome_resume)
            .filter_map(|(lane, resume)| {
                let (held, seq) = resume?;
                let resume_seq = if held { seq % ring_next + 1 } else { seq.max(1) };
                Some(LaneResume { lane, resume_seq })
            })
            .collect();
        let mut held = [0u64; Lane::COUNT];
        for lane_resume in &resume {
            held[lane_resume.lane.index()] = lane_resume.resume_seq - 1;
        }
        let (frame_bytes_max, in_flight_bytes_max, commit_interval_ms) = limits;
        let welcome = ControlMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            resume,
            limits: SessionLimits { frame_bytes_max, in_flight_bytes_max, commit_interval_ms },
        });
        // What the encoder refuses, the device's decoder refuses too (protocol/tests/hostile.rs).
        device.handle_control_bytes(now, &control(&welcome));
        let mut sent = [0u64; Lane::COUNT];
        let mut trimmed = [0u64; Lane::COUNT];
        for (id, honest, value) in acks {
            for _ in 0..4 {
                let Some(request) = device.poll_read(now) else { break };
                let seq = request.from_seq.max(1); // a ring never holds seq 0
                let body = seq.to_le_bytes().to_vec();
                let chunk = SealedChunk::new(request.lane, Codec::Raw, protocol::NO_DICTIONARY, 1, 8, body).expect("valid");
                let summary = device.handle_read(now, request.lane, vec![(seq, chunk.encode(seq))], &mut |_| None);
                if summary.chunks > 0 {
                    sent[request.lane.index()] = sent[request.lane.index()].max(seq);
                }
            }
            let lane = lane(id);
            let covered = sent[lane.index()].max(held[lane.index()]);
            let through = if honest { value % (covered + 1) } else { value };
            if let Ok(ack) = encode_control(&ControlMessage::Ack(Ack { lane, durable_through: through })) {
                device.handle_control_bytes(now, &frame(FrameKind::Control, &ack));
            }
            while let Some(event) = device.poll_event() {
                if let DeviceEvent::Acked { lane, through } = event {
                    let index = lane.index();
                    prop_assert!(through >= trimmed[index]);
                    prop_assert!(through <= sent[index].max(held[index]), "trimmed {} through {} (sent {}, held {})", lane, through, sent[index], held[index]);
                    trimmed[index] = through;
                }
            }
            while device.poll_transmit().is_some() {}
        }
        device.handle_control_bytes(now, &garbage);
        while device.poll_event().is_some() {}
    }
}
