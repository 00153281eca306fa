//! The sink refuses what it must, with a clear reason, and one bad peer never disturbs others:
//! a Hello naming another device, malformed frames, corrupted chunks, a revoked device.

mod support;

use std::sync::Arc;
use std::time::Duration;

use appliance::Uplink;
use core_sink::{Sink, SinkMetrics};
use protocol::{Codec, ControlMessage, ErrorCode, FrameKind, Lane, SealedChunk, encode_frame};
use support::harness::{Fleet, MIB, produce, wait_until};
use support::raw_device::{Bystander, LIMIT, close_code, connect_and_hello};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_naming_another_device_is_refused() {
    let fleet = Fleet::new();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let bystander = Bystander::start(&fleet, &sink);
    bystander.delivers(0).await;
    let (_endpoint, connection, reply) =
        connect_and_hello(&fleet, "mallory", "bystander", sink.local_addr()).await;
    assert!(reply.is_none(), "no Welcome for an impostor: {reply:?}");
    let (code, reason) = close_code(&connection).await;
    assert_eq!(code, u64::from(ErrorCode::DeviceMismatch.id()), "{reason}");
    assert!(reason.contains("mallory") && reason.contains("bystander"), "{reason}");
    bystander.delivers(500).await;
    bystander.uplink.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_corrupt_chunks_close_only_that_connection() {
    let fleet = Fleet::new();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let bystander = Bystander::start(&fleet, &sink);
    bystander.delivers(0).await;

    // Garbage bytes on a lane stream: a frame length beyond the maximum.
    let (_endpoint, connection, reply) =
        connect_and_hello(&fleet, "fuzzer", "fuzzer", sink.local_addr()).await;
    assert!(matches!(reply, Some(ControlMessage::Welcome(_))), "{reply:?}");
    let mut stream = connection.open_uni().await.unwrap();
    stream.write_all(&[0xff, 0xff, 0xff, 0x7f, 2, 1, 2, 3]).await.unwrap();
    let (code, reason) = close_code(&connection).await;
    assert_eq!(code, u64::from(ErrorCode::BadFrame.id()), "{reason}");
    bystander.delivers(500).await;

    // A well-framed chunk whose body was corrupted after its CRC was computed.
    let (_endpoint, connection, _) = connect_and_hello(&fleet, "bitflip", "bitflip", sink.local_addr()).await;
    let chunk = SealedChunk::new(Lane::Sensor, Codec::Raw, 0, 1, 100, vec![42; 100]).unwrap();
    let mut encoded = chunk.encode(1);
    *encoded.last_mut().unwrap() ^= 1;
    let mut frame = Vec::new();
    encode_frame(FrameKind::Chunk, &encoded, &mut frame).unwrap();
    let mut stream = connection.open_uni().await.unwrap();
    stream.write_all(&frame).await.unwrap();
    let (code, reason) = close_code(&connection).await;
    assert_eq!(code, u64::from(ErrorCode::BadChunk.id()), "{reason}");
    assert!(reason.contains("crc"), "{reason}");
    assert!(SinkMetrics::get(&sink.metrics().bad_chunks) >= 1);
    bystander.delivers(1_000).await;
    assert_eq!(sink.durable_through("bitflip", Lane::Sensor), 0, "nothing of the bad chunk landed");
    bystander.uplink.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_cut_off_within_seconds_and_refused_after() {
    let fleet = Fleet::new();
    let mut config = fleet.sink_config("127.0.0.1:0".parse().unwrap());
    config.revocation_reload_ms = 100;
    let revocation_file = config.revocation_file.clone();
    let sink = Sink::start(config).await.unwrap();
    let bystander = Bystander::start(&fleet, &sink);
    let ring = fleet.open_ring("stolen", 16 * MIB);
    let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config("stolen", sink.local_addr())).unwrap();
    {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || produce(&ring, "stolen", Lane::Sensor, 0, 300)).await.unwrap();
    }
    let metrics = uplink.metrics();
    assert!(wait_until(LIMIT, || metrics.acked_through(Lane::Sensor) >= 1).await, "flows before revocation");

    fleet::RevocationList::revoke(&revocation_file, "stolen").unwrap();
    let refused_before = SinkMetrics::get(&sink.metrics().connections_refused);
    let sessions_ended = Arc::new(metrics);
    let ended_before = sessions_ended.sessions_ended.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        wait_until(LIMIT, || sessions_ended.sessions_ended.load(std::sync::atomic::Ordering::Relaxed)
            > ended_before)
        .await,
        "the revoked device's session was closed"
    );
    assert!(
        wait_until(LIMIT, || SinkMetrics::get(&sink.metrics().connections_refused) > refused_before).await,
        "its reconnects are refused at the handshake"
    );
    {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || produce(&ring, "stolen", Lane::Sensor, 300, 300)).await.unwrap();
    }
    let durable = sink.durable_through("stolen", Lane::Sensor);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.durable_through("stolen", Lane::Sensor),
        durable,
        "nothing more lands from a revoked device"
    );
    bystander.delivers(0).await;
    uplink.stop().await;
    bystander.uplink.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_change_or_a_seq_going_backwards_on_a_stream_is_refused() {
    let fleet = Fleet::new();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let frame_of = |lane: Lane, seq: u64| {
        let chunk = SealedChunk::new(lane, Codec::Raw, 0, 1, 10, vec![seq as u8; 10]).unwrap();
        let mut frame = Vec::new();
        encode_frame(FrameKind::Chunk, &chunk.encode(seq), &mut frame).unwrap();
        frame
    };
    let cases = [
        ("backwards", [frame_of(Lane::Sensor, 5), frame_of(Lane::Sensor, 3)], "seqs must increase"),
        ("lane change", [frame_of(Lane::Sensor, 5), frame_of(Lane::Media, 6)], "stream"),
    ];
    for (name, frames, reason_part) in cases {
        let (_endpoint, connection, _) = connect_and_hello(
            &fleet,
            name.replace(' ', "-").as_str(),
            name.replace(' ', "-").as_str(),
            sink.local_addr(),
        )
        .await;
        let mut stream = connection.open_uni().await.unwrap();
        for frame in &frames {
            stream.write_all(frame).await.unwrap();
        }
        let (code, reason) = close_code(&connection).await;
        assert_eq!(code, u64::from(ErrorCode::BadChunk.id()), "{name}: {reason}");
        assert!(reason.contains(reason_part), "{name}: {reason}");
    }
    sink.shutdown().await;
}
