//! The device session at its boundaries: the Hello it sends, how it reads the Welcome and Acks,
//! what it sends from the ring and when it stops reading. No sockets, no clock.

use std::time::{Duration, Instant};

use protocol::{
    Ack, Codec, ControlMessage, ErrorCode, FrameDecoder, FrameKind, Lane, LaneResume, PROTOCOL_VERSION,
    SealedChunk, SessionLimits, Welcome, decode_control, dictionary_id, encode_control, encode_frame,
};
use session::{DeviceConfig, DeviceEvent, DeviceSession, ReadRequest, Stream};

fn config() -> DeviceConfig {
    DeviceConfig {
        device_id: "cam-01".into(),
        boot_id: [1; 16],
        ring_id: [2; 16],
        lanes: vec![Lane::Audit, Lane::Sensor],
        welcome_timeout: Duration::from_secs(5),
        read_chunks_max: 8,
        read_bytes_max: 1 << 20,
        idle_poll: Duration::from_millis(5),
        in_flight_bytes_max: 1 << 20,
    }
}

fn control(message: ControlMessage) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(FrameKind::Control, &encode_control(&message).unwrap(), &mut out).unwrap();
    out
}

fn welcome(resume: &[(Lane, u64)], in_flight_bytes_max: u64) -> Vec<u8> {
    control(ControlMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        resume: resume.iter().map(|&(lane, resume_seq)| LaneResume { lane, resume_seq }).collect(),
        limits: SessionLimits {
            frame_bytes_max: protocol::FRAME_BYTES_MAX as u32,
            in_flight_bytes_max,
            commit_interval_ms: 50,
        },
    }))
}

fn ack(lane: Lane, through: u64) -> Vec<u8> {
    control(ControlMessage::Ack(Ack { lane, durable_through: through }))
}

fn stored(lane: Lane, seq: u64, dict_id: u32, body_bytes: usize) -> (u64, Vec<u8>) {
    let body = vec![seq as u8; body_bytes];
    (seq, SealedChunk::new(lane, Codec::Raw, dict_id, 1, body.len() as u32, body).unwrap().encode(seq))
}

fn events(session: &mut DeviceSession) -> Vec<DeviceEvent> {
    std::iter::from_fn(|| session.poll_event())
        .filter(|event| !matches!(event, DeviceEvent::AckLatency { .. }))
        .collect()
}

/// Frame kinds per stream, in order.
fn transmitted(session: &mut DeviceSession) -> Vec<(Stream, FrameKind)> {
    let mut out = Vec::new();
    while let Some(transmit) = session.poll_transmit() {
        let mut decoder = FrameDecoder::new(protocol::FRAME_BYTES_MAX);
        decoder.push(&transmit.bytes);
        while let Some(frame) = decoder.next_frame().unwrap() {
            out.push((transmit.stream, frame.kind));
        }
    }
    out
}

fn welcomed(next_seqs: [u64; Lane::COUNT], resume: &[(Lane, u64)]) -> (DeviceSession, Instant) {
    let now = Instant::now();
    let mut session = DeviceSession::new(config(), next_seqs, now);
    let hello = session.poll_transmit().expect("Hello first");
    let mut decoder = FrameDecoder::new(4096);
    decoder.push(&hello.bytes);
    match decode_control(&decoder.next_frame().unwrap().unwrap().payload).unwrap() {
        ControlMessage::Hello(hello) => {
            assert_eq!(hello.ring_id, [2; 16]);
            assert_eq!(hello.lanes, [Lane::Audit, Lane::Sensor]);
        }
        other => panic!("{other:?}"),
    }
    session.handle_control_bytes(now, &welcome(resume, 1 << 20));
    (session, now)
}

/// A welcomed session whose events so far (the `Welcomed`) are taken.
fn welcomed_and_drained(next_seqs: [u64; Lane::COUNT], resume: &[(Lane, u64)]) -> (DeviceSession, Instant) {
    let (mut session, now) = welcomed(next_seqs, resume);
    events(&mut session);
    (session, now)
}

#[test]
fn reads_start_at_the_resume_seq_and_nothing_is_trimmed_before_an_ack() {
    // The resume seq counts what the sink landed, durable or not: only an Ack trims (the
    // simulator's seed 3 found the ring trimmed at the Welcome losing chunks to a sink crash).
    let (mut session, now) = welcomed([1, 1, 40, 1], &[(Lane::Audit, 1), (Lane::Sensor, 31)]);
    assert_eq!(events(&mut session), [DeviceEvent::Welcomed]);
    let first = session.poll_read(now).unwrap();
    assert_eq!(first, ReadRequest { lane: Lane::Audit, from_seq: 1, chunks_max: 8, bytes_max: 1 << 20 });
    let second = session.poll_read(now).unwrap();
    assert_eq!((second.lane, second.from_seq), (Lane::Sensor, 31));
    assert_eq!(session.poll_read(now), None, "one outstanding read per lane; media was not granted");
}

#[test]
fn a_ring_behind_the_core_under_its_identity_ends_the_session_for_a_new_identity() {
    let (mut session, _) = welcomed([1, 1, 10, 1], &[(Lane::Audit, 1), (Lane::Sensor, 31)]);
    assert_eq!(
        events(&mut session),
        [
            DeviceEvent::RingBehind { lane: Lane::Sensor, resume_seq: 31, ring_next_seq: 10 },
            DeviceEvent::Closed
        ]
    );
    assert!(session.renews_ring_identity());
    assert_eq!(session.close().map(|close| close.by_peer), Some(false));
}

#[test]
fn chunks_are_framed_with_their_dictionary_once_and_acks_trim() {
    let (mut session, now) = welcomed_and_drained([1, 1, 1, 1], &[(Lane::Sensor, 1)]);
    let dictionary = vec![3u8; 100];
    let dict_id = dictionary_id(&dictionary);
    let read = session.poll_read(now).unwrap();
    let mut lookups = 0;
    let summary = session.handle_read(
        now,
        read.lane,
        vec![
            stored(Lane::Sensor, 1, dict_id, 10),
            stored(Lane::Sensor, 2, dict_id, 10),
            stored(Lane::Sensor, 3, 0, 10),
        ],
        &mut |id| {
            lookups += 1;
            (id == dict_id).then(|| dictionary.clone())
        },
    );
    assert_eq!((summary.chunks, summary.dictionaries, lookups), (3, 1, 1));
    let sensor = Stream::Lane(Lane::Sensor);
    assert_eq!(
        transmitted(&mut session),
        [
            (sensor, FrameKind::Dictionary),
            (sensor, FrameKind::Chunk),
            (sensor, FrameKind::Chunk),
            (sensor, FrameKind::Chunk)
        ]
    );
    assert_eq!(session.in_flight_bytes(), summary.bytes);
    session.handle_control_bytes(now + Duration::from_millis(7), &ack(Lane::Sensor, 2));
    assert_eq!(events(&mut session), [DeviceEvent::Acked { lane: Lane::Sensor, through: 2 }]);
    assert_eq!(session.in_flight_bytes(), summary.bytes / 3);
    // Idempotent.
    session.handle_control_bytes(now, &ack(Lane::Sensor, 2));
    assert!(events(&mut session).is_empty());
}

#[test]
fn an_ack_beyond_anything_sent_closes_without_trimming() {
    let (mut session, now) = welcomed([1, 1, 10, 1], &[(Lane::Sensor, 5)]);
    assert_eq!(events(&mut session), [DeviceEvent::Welcomed]);
    // What the sink held at the Welcome may be acked...
    session.handle_control_bytes(now, &ack(Lane::Sensor, 4));
    assert_eq!(events(&mut session), [DeviceEvent::Acked { lane: Lane::Sensor, through: 4 }]);
    // ...but nothing beyond it or what was sent since.
    session.handle_control_bytes(now, &ack(Lane::Sensor, 5));
    assert_eq!(events(&mut session), [DeviceEvent::Closed]);
    let close = session.close().unwrap();
    assert_eq!(close.code, ErrorCode::BadFrame);
    assert!(close.reason.contains("beyond the highest seq sent (4)"), "{}", close.reason);
}

#[test]
fn undeliverable_chunks_are_skipped_and_reported() {
    let (mut session, now) = welcomed_and_drained([1, 1, 1, 1], &[(Lane::Sensor, 1)]);
    let read = session.poll_read(now).unwrap();
    let summary = session.handle_read(
        now,
        read.lane,
        vec![stored(Lane::Sensor, 1, 99, 10), stored(Lane::Sensor, 2, 0, 10)],
        &mut |_| None,
    );
    assert_eq!(summary.chunks, 1);
    let reported = events(&mut session);
    assert!(
        matches!(&reported[..], [DeviceEvent::Undeliverable { lane: Lane::Sensor, seq: 1, reason }] if reason.contains("dictionary 99")),
        "{reported:?}"
    );
    assert_eq!(session.poll_read(now).map(|read| read.from_seq), Some(3));
}

#[test]
fn reads_stop_at_the_in_flight_bound_and_while_a_batch_waits_for_its_stream() {
    let (mut session, now) = welcomed_and_drained([1, 1, 1, 1], &[(Lane::Sensor, 1)]);
    // The sink's limit (1 MiB) and ours (1 MiB): two 600 KiB chunks exceed it.
    let read = session.poll_read(now).unwrap();
    session.handle_read(
        now,
        read.lane,
        vec![stored(Lane::Sensor, 1, 0, 600 << 10), stored(Lane::Sensor, 2, 0, 600 << 10)],
        &mut |_| None,
    );
    assert_eq!(session.poll_read(now), None, "in flight over the bound");
    session.handle_control_bytes(now, &ack(Lane::Sensor, 2));
    assert_eq!(session.poll_read(now), None, "acked, but the batch still waits to be written");
    let written: usize =
        std::iter::from_fn(|| session.poll_transmit()).map(|transmit| transmit.bytes.len()).sum();
    session.handle_written(Lane::Sensor, written);
    assert_eq!(session.poll_read(now).map(|read| read.from_seq), Some(3));
}

#[test]
fn an_empty_read_idles_the_lane_until_its_timeout() {
    let (mut session, now) = welcomed_and_drained([1, 1, 1, 1], &[(Lane::Sensor, 1)]);
    let read = session.poll_read(now).unwrap();
    session.handle_read(now, read.lane, Vec::new(), &mut |_| None);
    assert_eq!(session.poll_read(now), None);
    assert_eq!(session.poll_timeout(), Some(now + Duration::from_millis(5)));
    session.handle_timeout(now + Duration::from_millis(5));
    assert!(session.poll_read(now + Duration::from_millis(5)).is_some());
}

#[test]
fn the_sink_breaking_the_rules_closes_the_session() {
    let now = Instant::now();
    let cases: Vec<(&str, Vec<Vec<u8>>, ErrorCode)> = vec![
        ("Ack before Welcome", vec![ack(Lane::Sensor, 1)], ErrorCode::BadFrame),
        ("second Welcome", vec![welcome(&[], 1), welcome(&[], 1)], ErrorCode::BadFrame),
        ("Welcome for a lane not asked for", vec![welcome(&[(Lane::Media, 1)], 1)], ErrorCode::BadFrame),
        (
            "Ack of a lane not streamed",
            vec![welcome(&[(Lane::Sensor, 1)], 1), ack(Lane::Media, 1)],
            ErrorCode::BadFrame,
        ),
        (
            "Error from the sink",
            vec![control(ControlMessage::Error(protocol::ErrorMessage {
                code: ErrorCode::LimitExceeded,
                reason: "quota".into(),
            }))],
            ErrorCode::LimitExceeded,
        ),
        ("garbage", vec![vec![1, 0, 0, 0, 9]], ErrorCode::BadFrame),
    ];
    for (name, inputs, code) in cases {
        let mut session = DeviceSession::new(config(), [1; Lane::COUNT], now);
        for bytes in inputs {
            session.handle_control_bytes(now, &bytes);
        }
        assert_eq!(session.close().map(|close| close.code), Some(code), "{name}");
    }
    let mut session = DeviceSession::new(config(), [1; Lane::COUNT], now);
    session.handle_timeout(now + Duration::from_secs(5));
    assert!(session.close().is_some_and(|close| close.reason.contains("no Welcome")));
}
