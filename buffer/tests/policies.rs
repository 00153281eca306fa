//! Lane policies, the audit reservation, acks and configuration errors.

mod common;

use std::time::Duration;

use buffer::{LanePolicy, ReadLimits, Ring, RingConfig, RingError};
use common::{MIB, chunk, open};
use protocol::Lane;

fn ring_with(config: RingConfig) -> (tempfile::TempDir, Ring) {
    let directory = tempfile::tempdir().unwrap();
    let ring = open(&directory.path().join("ring"), config);
    (directory, ring)
}

#[test]
fn audit_appends_succeed_inside_the_reservation_while_sensor_data_overflows() {
    let mut config = RingConfig::with_capacity(8 * MIB);
    config.audit_reserved_bytes = MIB;
    let (_directory, ring) = ring_with(config);
    let mut audit_seqs = Vec::new();
    for step in 0..200u64 {
        // 5x the ring in sensor data, with an audit record every fourth step.
        ring.append(chunk(Lane::Sensor, step, 200 * 1024)).unwrap();
        if step % 4 == 0 {
            audit_seqs.push(ring.append(chunk(Lane::Audit, step, 16 * 1024)).unwrap());
        }
    }
    let stats = ring.stats();
    assert!(stats.lane(Lane::Sensor).evicted_chunks > 100, "sensor data was evicted");
    let audit = stats.lane(Lane::Audit);
    assert_eq!(audit.evicted_chunks, 0);
    assert_eq!(audit.chunk_count, audit_seqs.len() as u64);
    let held =
        ring.read_from(Lane::Audit, 1, ReadLimits { chunks_max: 1000, bytes_max: usize::MAX }).unwrap();
    assert_eq!(held.iter().map(|stored| stored.seq).collect::<Vec<_>>(), audit_seqs);

    // Fill the reservation: the next audit append is refused at once (the API answers 503), and
    // nothing already recorded is evicted.
    let refused = loop {
        match ring.append(chunk(Lane::Audit, 9_999, 64 * 1024)) {
            Ok(seq) => audit_seqs.push(seq),
            Err(refused) => break refused.error,
        }
    };
    assert!(matches!(refused, RingError::Backpressure { lane: Lane::Audit, .. }), "{refused}");
    let audit = ring.stats().lanes[Lane::Audit.index()];
    assert_eq!(audit.evicted_chunks, 0);
    assert_eq!(audit.chunk_count, audit_seqs.len() as u64);
    assert!(audit.bytes_used <= MIB);
    // An ack frees the reservation again.
    ring.ack(Lane::Audit, *audit_seqs.last().unwrap()).unwrap();
    ring.append(chunk(Lane::Audit, 10_000, 64 * 1024)).unwrap();
}

/// A ring whose decisions lane (`block`, capped at 1 MiB) is full: seven 128 KiB chunks, seqs
/// 1 to 7.
fn full_block_lane(block_timeout_ms: u64) -> (tempfile::TempDir, Ring) {
    let mut config = RingConfig::with_capacity(8 * MIB);
    config.lanes[Lane::Decisions.index()] =
        buffer::LaneConfig { policy: LanePolicy::Block, bytes_max: Some(MIB), block_timeout_ms };
    let (directory, ring) = ring_with(config);
    for step in 0..7 {
        assert_eq!(ring.append(chunk(Lane::Decisions, step, 128 * 1024)).unwrap(), step + 1);
    }
    (directory, ring)
}

#[test]
fn block_lane_waits_for_an_ack_then_proceeds() {
    let (_directory, ring) = full_block_lane(60_000);
    // The eighth does not fit the 1 MiB cap; it waits until the ack below frees room.
    let waiter = {
        let ring = ring.clone();
        std::thread::spawn(move || ring.append(chunk(Lane::Decisions, 100, 128 * 1024)))
    };
    while ring.stats().lane(Lane::Decisions).waiting_appends == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!waiter.is_finished());
    ring.ack(Lane::Decisions, 3).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), 8);
    assert_eq!(ring.stats().lane(Lane::Decisions).evicted_chunks, 0);
}

#[test]
fn block_lane_times_out_with_backpressure() {
    let (_directory, ring) = full_block_lane(20);
    let error = ring.append(chunk(Lane::Decisions, 7, 128 * 1024)).unwrap_err().error;
    match error {
        RingError::Backpressure { lane, waited_ms, needed_bytes, .. } => {
            assert_eq!(lane, Lane::Decisions);
            assert!(waited_ms >= 20);
            assert!(needed_bytes > 128 * 1024);
        }
        other => panic!("expected backpressure, got {other}"),
    }
    assert_eq!(ring.stats().lane(Lane::Decisions).rejected_chunks, 1);
}

#[test]
fn a_refused_append_hands_the_chunk_back_and_its_retry_succeeds_once_acks_free_room() {
    let (_directory, ring) = full_block_lane(20);
    // The copy is the test's own reference: the caller under test keeps none.
    let sent = chunk(Lane::Decisions, 7, 128 * 1024);
    let expected = sent.clone();
    let body_address = sent.body.as_ptr();
    let refused = ring.append(sent).unwrap_err();
    assert!(matches!(refused.error, RingError::Backpressure { lane: Lane::Decisions, .. }), "{refused}");
    let returned = refused.chunk.expect("a refused chunk is handed back");
    assert_eq!(returned, expected, "the same lane, codec, counts, body bytes and body crc");
    assert_eq!(returned.body.as_ptr(), body_address, "handed back, not copied");
    assert_eq!(ring.stats().lane(Lane::Decisions).next_seq, 8, "a refused chunk takes no seq");

    // Still no room: refused again, handed back again.
    let returned = ring.append(returned).unwrap_err().chunk.expect("handed back again");
    ring.ack(Lane::Decisions, 3).unwrap();
    let seq = ring.append(returned).unwrap();
    assert_eq!(seq, 8);
    let stored =
        ring.read_from(Lane::Decisions, seq, ReadLimits { chunks_max: 1, bytes_max: usize::MAX }).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].seq, seq);
    assert_eq!(stored[0].body(), &expected.body[..]);
    assert_eq!(stored[0].encoded, expected.encode(seq));
    assert_eq!(ring.stats().lane(Lane::Decisions).rejected_chunks, 2);
}

#[test]
fn sensor_evicts_media_before_its_own_data() {
    let (_directory, ring) = ring_with(RingConfig::with_capacity(16 * MIB));
    for step in 0..80 {
        ring.append(chunk(Lane::Media, step, 256 * 1024)).unwrap();
    }
    let media_before = ring.stats().lane(Lane::Media).chunk_count;
    for step in 0..10 {
        ring.append(chunk(Lane::Sensor, step, 256 * 1024)).unwrap();
    }
    let stats = ring.stats();
    assert_eq!(stats.lane(Lane::Sensor).chunk_count, 10);
    assert_eq!(stats.lane(Lane::Sensor).evicted_chunks, 0);
    assert!(stats.lane(Lane::Media).chunk_count < media_before);
    // Media never evicts the higher-priority sensor lane: it evicts its own oldest instead.
    for step in 80..160 {
        ring.append(chunk(Lane::Media, step, 256 * 1024)).unwrap();
    }
    assert_eq!(ring.stats().lane(Lane::Sensor).chunk_count, 10);
}

#[test]
fn evictions_count_the_records_of_the_evicted_chunks_and_the_count_survives_a_reopen() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let ring = open(&path, RingConfig::with_capacity(8 * MIB));
    let records_per_chunk = |step: u64| (step % 5 + 1) as u32;
    let mut appended_records = 0u64;
    for step in 0..100 {
        let body = common::body_bytes(Lane::Media, step, 128 * 1024);
        let records = records_per_chunk(step);
        let chunk = protocol::SealedChunk::new(
            Lane::Media,
            protocol::Codec::Raw,
            0,
            records,
            body.len() as u32,
            body,
        )
        .unwrap();
        ring.append(chunk).unwrap();
        appended_records += u64::from(records);
    }
    let stats = ring.stats();
    let media = stats.lane(Lane::Media);
    assert!(media.evicted_chunks > 0, "an 8 MiB ring cannot hold 12.5 MiB of media");
    // drop_oldest evicts in seq order: the first `evicted_chunks` chunks went.
    let expected: u64 = (0..media.evicted_chunks).map(|step| u64::from(records_per_chunk(step))).sum();
    assert_eq!(media.evicted_records, expected);
    let held: u64 = ring
        .read_from(Lane::Media, 1, ReadLimits { chunks_max: 1000, bytes_max: usize::MAX })
        .unwrap()
        .iter()
        .map(|chunk| u64::from(chunk.header.record_count))
        .sum();
    assert_eq!(held + media.evicted_records, appended_records, "every record is held or counted evicted");
    drop(ring);
    let reopened = open(&path, RingConfig::with_capacity(8 * MIB));
    assert_eq!(reopened.stats().lane(Lane::Media).evicted_records, expected);
}

#[test]
fn seqs_are_never_reused_after_everything_is_acked_and_reopened() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let config = RingConfig::with_capacity(8 * MIB);
    {
        let ring = open(&path, config.clone());
        for step in 0..5 {
            ring.append(chunk(Lane::Sensor, step, 1000)).unwrap();
        }
        ring.ack(Lane::Sensor, 5).unwrap();
        ring.ack(Lane::Sensor, 2).unwrap(); // an older watermark changes nothing
        let error = ring.ack(Lane::Sensor, 6).unwrap_err();
        assert!(matches!(error, RingError::AckBeyondHead { through_seq: 6, last_seq: 5, .. }), "{error}");
    }
    let ring = open(&path, config);
    assert_eq!(ring.stats().lane(Lane::Sensor).acked_through, 5);
    assert_eq!(ring.append(chunk(Lane::Sensor, 9, 1000)).unwrap(), 6);
    assert_eq!(ring.oldest_seq(Lane::Sensor).unwrap(), Some(6));
}

#[test]
fn read_limits_bound_a_read_but_always_return_one_chunk() {
    let (_directory, ring) = ring_with(RingConfig::with_capacity(8 * MIB));
    for step in 0..10 {
        ring.append(chunk(Lane::Sensor, step, 10_000)).unwrap();
    }
    let check = |from: u64, chunks_max: usize, bytes_max: usize, expected: &[u64]| {
        let read = ring.read_from(Lane::Sensor, from, ReadLimits { chunks_max, bytes_max }).unwrap();
        assert_eq!(
            read.iter().map(|stored| stored.seq).collect::<Vec<_>>(),
            expected,
            "from {from} max {chunks_max}/{bytes_max}"
        );
    };
    check(1, 3, usize::MAX, &[1, 2, 3]);
    check(8, 100, usize::MAX, &[8, 9, 10]);
    check(11, 100, usize::MAX, &[]);
    check(4, 100, 25_000, &[4, 5]);
    check(4, 100, 1, &[4]);
}

#[test]
fn oversized_chunks_and_bad_configs_are_clear_errors() {
    let (_directory, ring) = ring_with(RingConfig::with_capacity(8 * MIB));
    // 8 MiB ring: chunks up to a thirty-second (256 KiB) are accepted.
    ring.append(chunk(Lane::Sensor, 0, 200 * 1024)).unwrap();
    let error = ring.append(chunk(Lane::Sensor, 0, 300 * 1024)).unwrap_err().error;
    assert!(
        matches!(error, RingError::ChunkTooLarge { lane: Lane::Sensor, budget_bytes: 262_144, .. }),
        "{error}"
    );

    let check = |mutate: fn(&mut RingConfig), key: &str| {
        let mut config = RingConfig::with_capacity(16 * MIB);
        mutate(&mut config);
        let directory = tempfile::tempdir().unwrap();
        match Ring::open(directory.path().join("ring"), config) {
            Err(RingError::Config { key: actual, problem }) => {
                assert_eq!(actual, key, "{problem}");
                assert!(!problem.is_empty());
            }
            Err(other) => panic!("expected a config error for {key}, got {other}"),
            Ok(_) => panic!("expected a config error for {key}"),
        }
    };
    check(|config| config.capacity_bytes = 1000, "capacity_bytes");
    check(|config| config.audit_reserved_bytes = config.capacity_bytes, "audit_reserved_bytes");
    check(|config| config.lanes[Lane::Audit.index()].policy = LanePolicy::DropOldest, "lanes.audit.policy");
    check(|config| config.readers_max = 1, "readers_max");
    check(|config| config.queue_depth_max = 0, "queue_depth_max");
    check(
        |config| config.durability = buffer::Durability::Periodic { sync_interval_ms: 0 },
        "durability.sync_interval_ms",
    );
}
