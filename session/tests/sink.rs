//! The sink session at its boundaries: every way a device can break the rules, and the close
//! code each one gets; grants, seq translation and Acks. No sockets, no clock: bytes in, events
//! and transmits out.

mod common;

use std::time::{Duration, Instant};

use protocol::{
    Codec, ControlMessage, ErrorCode, FrameDecoder, FrameKind, Lane, SealedChunk, decode_chunk,
    decode_control, dictionary_frame_payload, dictionary_id, encode_control,
};
use session::{
    Close, DictionaryRefusal, Grant, LandingRefusal, LaneGrant, SinkEvent, SinkSession, SinkSessionConfig,
    Stream,
};

use common::{control, frame, hello};

const DEVICE: &str = "cam-01";

fn hello_from(device: &str) -> Vec<u8> {
    control(&hello(device))
}

fn chunk(lane: Lane, seq: u64, dict_id: u32) -> Vec<u8> {
    let body = seq.to_le_bytes().to_vec();
    SealedChunk::new(lane, Codec::Raw, dict_id, 1, body.len() as u32, body).unwrap().encode(seq)
}

fn chunk_frame(lane: Lane, seq: u64) -> Vec<u8> {
    frame(FrameKind::Chunk, &chunk(lane, seq, protocol::NO_DICTIONARY))
}

fn grant(base: u64, landed: u64) -> Grant {
    Grant { lanes: [LaneGrant { base, landed, generation: 7 }; Lane::COUNT] }
}

fn drain(session: &mut SinkSession) -> Vec<SinkEvent> {
    std::iter::from_fn(|| session.poll_event()).collect()
}

fn control_messages(session: &mut SinkSession) -> Vec<ControlMessage> {
    let mut decoder = FrameDecoder::new(protocol::FRAME_BYTES_MAX);
    let mut messages = Vec::new();
    while let Some(transmit) = session.poll_transmit() {
        assert_eq!(transmit.stream, Stream::Control);
        decoder.push(&transmit.bytes);
        while let Some(frame) = decoder.next_frame().unwrap() {
            messages.push(decode_control(&frame.payload).unwrap());
        }
    }
    messages
}

/// A session past its Welcome, granted `grant`.
fn streaming(grant: Grant) -> SinkSession {
    let mut session = SinkSession::new(SinkSessionConfig::default(), DEVICE, [], Instant::now());
    session.handle_control_bytes(&hello_from(DEVICE));
    assert_eq!(drain(&mut session), [SinkEvent::Hello { ring_id: [2; 16], boot_id: [1; 16] }]);
    session.handle_grant(Ok(grant));
    assert!(matches!(control_messages(&mut session)[..], [ControlMessage::Welcome(_)]));
    session
}

fn closed_with(session: &SinkSession) -> Option<(ErrorCode, String)> {
    session.close().map(|close| (close.code, close.reason.clone()))
}

/// Feeds `stream_bytes` (stream id, bytes) to a streaming session and checks the close code and
/// a fragment of the reason.
fn check(name: &str, stream_bytes: &[(u64, Vec<u8>)], expected: Option<(ErrorCode, &str)>) {
    let mut session = streaming(grant(0, 0));
    for (stream, bytes) in stream_bytes {
        session.handle_stream_bytes(*stream, bytes);
    }
    let closed = closed_with(&session);
    match (closed, expected) {
        (None, None) => {}
        (Some((code, reason)), Some((expected_code, fragment))) => {
            assert_eq!(code, expected_code, "{name}: {reason}");
            assert!(reason.contains(fragment), "{name}: reason {reason:?} lacks {fragment:?}");
        }
        (closed, expected) => panic!("{name}: closed {closed:?}, expected {expected:?}"),
    }
}

#[test]
fn lane_stream_rules() {
    let dictionary = vec![5u8; 64];
    let dict_id = dictionary_id(&dictionary);
    let cases: Vec<(&str, Vec<(u64, Vec<u8>)>, Option<(ErrorCode, &str)>)> = vec![
        (
            "two chunks in order",
            vec![(0, [chunk_frame(Lane::Sensor, 1), chunk_frame(Lane::Sensor, 2)].concat())],
            None,
        ),
        (
            "a gap is fine (evictions)",
            vec![(0, [chunk_frame(Lane::Sensor, 1), chunk_frame(Lane::Sensor, 9)].concat())],
            None,
        ),
        (
            "seq going backwards",
            vec![(0, [chunk_frame(Lane::Sensor, 5), chunk_frame(Lane::Sensor, 4)].concat())],
            Some((ErrorCode::BadChunk, "seqs must increase")),
        ),
        (
            "a repeated seq",
            vec![(0, [chunk_frame(Lane::Sensor, 5), chunk_frame(Lane::Sensor, 5)].concat())],
            Some((ErrorCode::BadChunk, "seqs must increase")),
        ),
        (
            "lane switch on a stream",
            vec![(0, [chunk_frame(Lane::Sensor, 1), chunk_frame(Lane::Media, 2)].concat())],
            Some((ErrorCode::BadChunk, "on the sensor stream")),
        ),
        (
            "a second stream for a lane",
            vec![(0, chunk_frame(Lane::Sensor, 1)), (4, chunk_frame(Lane::Sensor, 2))],
            Some((ErrorCode::BadChunk, "a second stream for lane sensor")),
        ),
        (
            "a control frame on a lane stream",
            vec![(0, frame(FrameKind::Control, &[2, 0, 1]))],
            Some((ErrorCode::BadFrame, "control frame")),
        ),
        (
            "a corrupt chunk",
            vec![(0, {
                let mut bytes = chunk_frame(Lane::Sensor, 1);
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                bytes
            })],
            Some((ErrorCode::BadChunk, "crc")),
        ),
        (
            "a chunk naming a dictionary never sent",
            vec![(0, frame(FrameKind::Chunk, &chunk(Lane::Sensor, 1, 77)))],
            Some((ErrorCode::BadChunk, "never sent")),
        ),
        (
            "a dictionary frame whose id is not its content id",
            vec![(
                0,
                frame(FrameKind::Dictionary, &[&(dict_id ^ 1).to_le_bytes()[..], &dictionary].concat()),
            )],
            Some((ErrorCode::BadFrame, "")),
        ),
        (
            "a frame length over the limit",
            vec![(0, (u32::MAX).to_le_bytes().to_vec())],
            Some((ErrorCode::BadFrame, "")),
        ),
        (
            "more streams than allowed",
            (0..=SinkSessionConfig::default().streams_max as u64)
                .map(|stream| (stream * 4, Vec::new()))
                .collect(),
            Some((ErrorCode::LimitExceeded, "lane streams")),
        ),
    ];
    for (name, input, expected) in cases {
        check(name, &input, expected);
    }
}

#[test]
fn control_stream_rules() {
    let cases: Vec<(&str, Vec<u8>, ErrorCode, &str)> = vec![
        ("Hello naming another device", hello_from("cam-02"), ErrorCode::DeviceMismatch, "cam-02"),
        (
            "Ack before Hello",
            frame(
                FrameKind::Control,
                &encode_control(&ControlMessage::Ack(protocol::Ack {
                    lane: Lane::Audit,
                    durable_through: 1,
                }))
                .unwrap(),
            ),
            ErrorCode::BadFrame,
            "must be Hello",
        ),
        (
            "a chunk frame on the control stream",
            chunk_frame(Lane::Audit, 1),
            ErrorCode::BadFrame,
            "chunk frame",
        ),
        (
            "a version-1 Hello",
            {
                let mut bytes = hello_from(DEVICE);
                bytes[6] = 1; // prefix 4, kind 1, variant tag 1, then the version
                bytes
            },
            ErrorCode::UnsupportedVersion,
            "version",
        ),
        ("garbage", vec![3, 0, 0, 0, 1, 0xff, 0xff], ErrorCode::BadFrame, ""),
    ];
    for (name, bytes, code, fragment) in cases {
        let mut session = SinkSession::new(SinkSessionConfig::default(), DEVICE, [], Instant::now());
        session.handle_control_bytes(&bytes);
        let (closed_code, reason) = closed_with(&session).unwrap_or_else(|| panic!("{name}: not closed"));
        assert_eq!(closed_code, code, "{name}: {reason}");
        assert!(reason.contains(fragment), "{name}: {reason:?} lacks {fragment:?}");
    }
}

#[test]
fn no_hello_within_the_timeout_closes() {
    let start = Instant::now();
    let mut session = SinkSession::new(SinkSessionConfig::default(), DEVICE, [], start);
    assert_eq!(session.poll_timeout(), Some(start + Duration::from_secs(10)));
    session.handle_timeout(start + Duration::from_secs(9));
    assert!(!session.is_closed());
    session.handle_timeout(start + Duration::from_secs(10));
    assert_eq!(closed_with(&session).map(|(code, _)| code), Some(ErrorCode::BadFrame));
}

#[test]
fn a_lane_landed_to_the_end_of_the_seq_space_is_refused_not_wrapped() {
    // The reported panic: a device that once sent seq u64::MAX made `landed + 1` overflow.
    let mut session = SinkSession::new(SinkSessionConfig::default(), DEVICE, [], Instant::now());
    session.handle_control_bytes(&hello_from(DEVICE));
    drain(&mut session);
    let mut lanes = [LaneGrant::default(); Lane::COUNT];
    lanes[Lane::Sensor.index()].landed = u64::MAX;
    session.handle_grant(Ok(Grant { lanes }));
    let (code, reason) = closed_with(&session).expect("refused");
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(reason.contains("end of the seq space"), "{reason}");
    assert!(control_messages(&mut session).is_empty(), "no Welcome");
}

#[test]
fn a_seq_that_overflows_the_epoch_base_is_refused() {
    let mut session = streaming(grant(10, 10));
    session.handle_stream_bytes(0, &chunk_frame(Lane::Media, u64::MAX - 5));
    let (code, reason) = closed_with(&session).expect("refused");
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(reason.contains("overflows"), "{reason}");
    // And u64::MAX itself is fine without a base: it is the device's own seq space to use up.
    let mut session = streaming(grant(0, 0));
    session.handle_stream_bytes(0, &chunk_frame(Lane::Media, u64::MAX));
    assert!(!session.is_closed());
}

#[test]
fn chunks_move_into_the_core_seq_space_and_acks_move_back() {
    let mut session = streaming(grant(1000, 1003));
    session.handle_stream_bytes(0, &[chunk_frame(Lane::Sensor, 4), chunk_frame(Lane::Sensor, 5)].concat());
    let events = drain(&mut session);
    let seqs: Vec<(u64, u64, u64)> = events
        .iter()
        .map(|event| match event {
            SinkEvent::Chunk(chunk) => {
                let (header, _) = decode_chunk(&chunk.encoded).expect("restamped chunk stays valid");
                assert_eq!(header, chunk.header);
                (chunk.ring_seq, chunk.seq, header.seq)
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(seqs, [(4, 1004, 1004), (5, 1005, 1005)]);
    // Durable through core seq 1004 = ring seq 4.
    session.handle_durable(Lane::Sensor, 1004, 7);
    assert_eq!(
        control_messages(&mut session),
        [ControlMessage::Ack(protocol::Ack { lane: Lane::Sensor, durable_through: 4 })]
    );
    // A durable watermark past what this session received (an older connection's chunks
    // landing) is clamped to what this device sent here.
    session.handle_durable(Lane::Sensor, 1100, 7);
    assert_eq!(
        control_messages(&mut session),
        [ControlMessage::Ack(protocol::Ack { lane: Lane::Sensor, durable_through: 5 })]
    );
    session.handle_durable(Lane::Sensor, 1100, 7);
    assert!(control_messages(&mut session).is_empty(), "no repeated Acks");
    // Below the epoch's base nothing is acked.
    session.handle_durable(Lane::Audit, 999, 7);
    assert!(control_messages(&mut session).is_empty());
    assert_eq!(session.acks_queued(), 2);
}

#[test]
fn a_rolled_back_lane_fences_the_session() {
    let mut session = streaming(grant(0, 0));
    session.handle_durable(Lane::Sensor, 0, 8);
    let close: &Close = session.close().expect("fenced");
    assert_eq!(close.code, ErrorCode::Internal);
    assert!(close.reason.contains("rolled this lane back"), "{}", close.reason);
}

#[test]
fn a_dictionary_pauses_its_stream_until_stored() {
    let dictionary = vec![9u8; 128];
    let dict_id = dictionary_id(&dictionary);
    let mut session = streaming(grant(0, 0));
    let bytes = [
        frame(FrameKind::Dictionary, &dictionary_frame_payload(dict_id, &dictionary)),
        frame(FrameKind::Chunk, &chunk(Lane::Sensor, 1, dict_id)),
    ]
    .concat();
    session.handle_stream_bytes(0, &bytes);
    assert_eq!(
        drain(&mut session),
        [SinkEvent::Dictionary { stream: 0, dict_id, dictionary: dictionary.clone() }]
    );
    assert!(!session.stream_ready(0), "nothing after the dictionary is decoded before it is stored");
    session.dictionary_stored(0, dict_id);
    let events = drain(&mut session);
    assert!(
        matches!(&events[..], [SinkEvent::Chunk(chunk)] if chunk.header.dict_id == dict_id),
        "{events:?}"
    );
    // Sent again on a later stream of the same session: already known, no event.
    let mut session = streaming(grant(0, 0));
    session.handle_stream_bytes(0, &bytes);
    drain(&mut session);
    session.dictionary_refused(DictionaryRefusal::Refused("over quota".into()));
    assert_eq!(closed_with(&session).map(|(code, _)| code), Some(ErrorCode::LimitExceeded));
}

#[test]
fn landing_refusals_and_commands_close_with_their_codes() {
    let cases: Vec<(&str, fn(&mut SinkSession), ErrorCode)> = vec![
        ("fenced", |session| session.refuse_landing(LandingRefusal::Fenced), ErrorCode::Internal),
        (
            "storage",
            |session| session.refuse_landing(LandingRefusal::StorageFailed("eio".into())),
            ErrorCode::Internal,
        ),
        ("superseded", SinkSession::superseded, ErrorCode::ShuttingDown),
        ("revoked", SinkSession::revoked, ErrorCode::Unauthorized),
        ("shutting down", SinkSession::shutting_down, ErrorCode::ShuttingDown),
    ];
    for (name, act, code) in cases {
        let mut session = streaming(grant(0, 0));
        act(&mut session);
        assert_eq!(closed_with(&session).map(|(code, _)| code), Some(code), "{name}");
        assert_eq!(drain(&mut session), [SinkEvent::Closed], "{name}");
    }
}
