//! A device that picks hostile values must lose only its own connection: real QUIC on loopback, a
//! real `core_sink::Sink`, certificates from the test fleet.
//!
//! Seqs are chosen by the device. One that lands a chunk with seq `u64::MAX` leaves a watermark
//! with no next seq; when it reconnects, the sink cannot name a resume seq in its Welcome and
//! must refuse the connection cleanly (QUIC close with `LimitExceeded` and a reason), end the
//! session (`sessions_active` back where it was) and keep serving everyone else, however often
//! the device retries and across a restart of the sink, since the watermark is durable.

mod support;

use std::time::Duration;

use core_sink::{Sink, SinkMetrics};
use protocol::{ChunkBuilder, ControlMessage, ErrorCode, FrameKind, Lane, RecordRef, encode_frame};
use support::harness::{Fleet, wait_until};
use support::raw_device::{Bystander, LIMIT, closed_by_sink, connect, say_hello};

const HOSTILE: &str = "hostile";
/// A refusal on loopback takes milliseconds; a sink that says nothing this long never will.
const ANSWER_LIMIT: Duration = Duration::from_secs(5);
/// How long a refused session may take to be counted out of `sessions_active`.
const SESSION_END_LIMIT: Duration = Duration::from_secs(2);
/// A healthy bystander is acked in about a second; this leaves room for a loaded 2-core machine.
const BYSTANDER_LIMIT: Duration = Duration::from_secs(30);

/// One valid sensor chunk (one JSON record, raw codec) framed with `seq`.
fn chunk_frame(seq: u64) -> Vec<u8> {
    let mut builder = ChunkBuilder::new(Lane::Sensor, 64 * 1024);
    let payload = br#"{"sensor":"temp-000","celsius":21.5}"#;
    builder
        .push(RecordRef {
            key: "hostile-sensor-0000000000",
            timestamp_us: 1_700_000_000_000_000,
            content_type: "application/json",
            payload,
        })
        .expect("valid record");
    let mut frame = Vec::new();
    encode_frame(FrameKind::Chunk, &builder.seal_raw().encode(seq), &mut frame).expect("chunk fits a frame");
    frame
}

fn sessions_active(sink: &Sink) -> u64 {
    SinkMetrics::get(&sink.metrics().sessions_active)
}

/// The hostile device's first session, which the sink accepts: one valid chunk with seq
/// `u64::MAX`, kept until the sink made it durable, then a clean close by the device.
async fn land_the_last_seq(fleet: &Fleet, sink: &Sink) {
    let sessions_before = sessions_active(sink);
    let (endpoint, connection) = connect(fleet, HOSTILE, sink.local_addr()).await.expect("first connection");
    let reply = say_hello(&connection, HOSTILE, ANSWER_LIMIT).await;
    assert!(
        matches!(reply, Ok(Some(ControlMessage::Welcome(_)))),
        "the first session is welcomed: {reply:?}"
    );
    let mut stream = connection.open_uni().await.expect("lane stream");
    stream.write_all(&chunk_frame(u64::MAX)).await.expect("send the chunk");
    stream.finish().expect("finish the lane stream");
    assert!(
        wait_until(LIMIT, || sink.durable_through(HOSTILE, Lane::Sensor) == u64::MAX).await,
        "the sink commits the chunk with seq u64::MAX (durable through {})",
        sink.durable_through(HOSTILE, Lane::Sensor)
    );
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    assert!(
        wait_until(SESSION_END_LIMIT, || sessions_active(sink) == sessions_before).await,
        "the first session ended: sessions_active {} (was {sessions_before})",
        sessions_active(sink)
    );
}

/// The hostile device reconnects and says Hello: the sink's close code and reason, or what it
/// did instead.
async fn reconnect(fleet: &Fleet, sink: &Sink) -> Result<(u64, String), String> {
    let (endpoint, connection) = connect(fleet, HOSTILE, sink.local_addr()).await?;
    let outcome = match say_hello(&connection, HOSTILE, ANSWER_LIMIT).await {
        Ok(Some(ControlMessage::Welcome(welcome))) => Err(format!("welcomed: {welcome:?}")),
        Ok(_) => closed_by_sink(&connection, ANSWER_LIMIT).await,
        Err(silence) => Err(silence),
    };
    // The device gives up on this connection either way.
    connection.close(0u32.into(), b"giving up");
    let _ = tokio::time::timeout(ANSWER_LIMIT, endpoint.wait_idle()).await;
    outcome
}

/// One hostile scenario against one sink configuration.
struct Scenario {
    connections_max: u64,
    /// Reconnects of the hostile device after its chunk with seq `u64::MAX` is durable.
    reconnects: u64,
    /// Restart the sink on the same state directory between landing and reconnecting.
    restart: bool,
    /// The bystander streams from before the hostile device connects (else it starts after).
    bystander_throughout: bool,
}

/// What the sink did, gathered whole so a failure shows every symptom at once.
#[derive(Debug)]
struct Observed {
    /// Per reconnect: the sink's close (code, reason), or what happened instead.
    reconnects: Vec<Result<(u64, String), String>>,
    /// `sessions_active` once the reconnects are over, and the value it must come back to.
    sessions_active_after: u64,
    sessions_active_expected: u64,
    /// The bystander's 500 records were acked in time after the reconnects.
    bystander_delivered: bool,
}

async fn run(scenario: Scenario) -> Observed {
    let fleet = Fleet::new();
    let mut config = fleet.sink_config("127.0.0.1:0".parse().unwrap());
    config.connections_max = scenario.connections_max;
    let mut sink = Sink::start(config.clone()).await.expect("start the sink");
    let mut bystander = None;
    if scenario.bystander_throughout {
        let started = Bystander::start(&fleet, &sink);
        started.delivers(0).await;
        bystander = Some(started);
    }
    land_the_last_seq(&fleet, &sink).await;
    if scenario.restart {
        assert!(
            bystander.is_none(),
            "a bystander streaming throughout would need a new uplink after the restart"
        );
        sink.shutdown().await;
        sink = Sink::start(config).await.expect("restart the sink on the same state directory");
        assert_eq!(
            sink.durable_through(HOSTILE, Lane::Sensor),
            u64::MAX,
            "the watermark survived the restart"
        );
    }
    let sessions_active_expected = sessions_active(&sink);
    let mut reconnects = Vec::new();
    for _ in 0..scenario.reconnects {
        reconnects.push(reconnect(&fleet, &sink).await);
        // A fixed sink is back at the baseline within milliseconds; waiting here keeps the next
        // reconnect from racing the end of this session at the connection limit.
        wait_until(SESSION_END_LIMIT, || sessions_active(&sink) == sessions_active_expected).await;
    }
    let sessions_active_after = sessions_active(&sink);
    let bystander = match bystander {
        Some(bystander) => bystander,
        None => Bystander::start(&fleet, &sink),
    };
    let first = if scenario.bystander_throughout { 500 } else { 0 };
    let bystander_delivered = bystander.try_deliver(first, BYSTANDER_LIMIT).await;
    bystander.uplink.stop().await;
    sink.shutdown().await;
    Observed { reconnects, sessions_active_after, sessions_active_expected, bystander_delivered }
}

async fn check(scenario: Scenario) {
    let reconnects = scenario.reconnects;
    let observed = run(scenario).await;
    let limit_exceeded = u64::from(ErrorCode::LimitExceeded.id());
    let refused_cleanly = |outcome: &Result<(u64, String), String>| matches!(outcome, Ok((code, reason)) if *code == limit_exceeded && !reason.is_empty());
    assert!(
        observed.reconnects.len() as u64 == reconnects
            && observed.reconnects.iter().all(refused_cleanly)
            && observed.sessions_active_after == observed.sessions_active_expected
            && observed.bystander_delivered,
        "expected every reconnect closed with LimitExceeded ({limit_exceeded}) and a reason, sessions_active \
         back to {}, and the bystander acked; observed {observed:#?}",
        observed.sessions_active_expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_at_the_last_seq_is_refused_cleanly_while_others_keep_streaming() {
    check(Scenario { connections_max: 4096, reconnects: 1, restart: false, bystander_throughout: true })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_at_the_last_seq_beyond_connections_max_never_lock_out_other_devices() {
    check(Scenario { connections_max: 2, reconnects: 4, restart: false, bystander_throughout: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_at_the_last_seq_after_a_sink_restart_never_lock_out_other_devices() {
    check(Scenario { connections_max: 2, reconnects: 4, restart: true, bystander_throughout: false }).await;
}
