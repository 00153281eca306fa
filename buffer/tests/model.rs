//! Model-based test: random sequences of append / read / ack / sync / reopen applied to the real
//! ring and to a `BTreeMap` model must give identical observable results, including eviction under
//! `drop_oldest`, backpressure under `block`, the audit reservation, and (in `Periodic` mode) reads
//! that serve only chunks an fsync made durable.

mod common;

use std::collections::BTreeMap;

use buffer::layout::stored_bytes;
use buffer::{AppendError, Durability, LanePolicy, ReadLimits, Ring, RingConfig, RingError};
use common::{MIB, body_bytes, chunk, open};
use proptest::prelude::*;
use protocol::{CHUNK_HEADER_LEN, Lane, SealedChunk};

#[derive(Clone, Debug)]
enum Operation {
    Append {
        lane: Lane,
        len: usize,
    },
    /// `fraction` of the way from the lane's watermark to its head.
    Ack {
        lane: Lane,
        fraction: u8,
    },
    Read {
        lane: Lane,
        offset: u8,
        chunks_max: u8,
    },
    /// `Ring::sync`: in `Periodic` mode, makes every append so far readable.
    Sync,
    Reopen,
}

/// Longer than any case runs, so in `Periodic` mode only `Sync` and `Reopen` fsync and the model
/// needs no clock.
const SYNC_INTERVAL_NEVER_MS: u64 = 60_000;

fn lane_strategy() -> impl Strategy<Value = Lane> {
    prop_oneof![Just(Lane::Audit), Just(Lane::Decisions), Just(Lane::Sensor), Just(Lane::Media)]
}

fn operation_strategy() -> impl Strategy<Value = Operation> {
    prop_oneof![
        6 => (lane_strategy(), prop_oneof![4 => 0usize..3_000, 8 => 3_000usize..400_000, 1 => 500_000usize..600_000]).prop_map(|(lane, len)| Operation::Append { lane, len }),
        2 => (lane_strategy(), 0u8..=100).prop_map(|(lane, fraction)| Operation::Ack { lane, fraction }),
        2 => (lane_strategy(), any::<u8>(), 1u8..8).prop_map(|(lane, offset, chunks_max)| Operation::Read { lane, offset, chunks_max }),
        1 => Just(Operation::Sync),
        1 => Just(Operation::Reopen),
    ]
}

#[derive(Clone, Debug, Default)]
struct ModelLane {
    next_seq: u64,
    /// `next_seq` at the last fsync: reads serve only seqs below it.
    synced_next_seq: u64,
    acked_through: u64,
    chunks: BTreeMap<u64, (u64, Vec<u8>)>,
    evicted_chunks: u64,
    rejected_chunks: u64,
}

impl ModelLane {
    fn bytes_used(&self) -> u64 {
        self.chunks.values().map(|(stored, _)| stored).sum()
    }
}

/// What a user can observe of an append.
#[derive(Debug, PartialEq, Eq)]
enum AppendResult {
    Appended(u64),
    TooLarge,
    Backpressure,
    Rejected,
    /// Any other error: never expected, shown with its message.
    Unexpected(String),
}

struct Model {
    config: RingConfig,
    lanes: [ModelLane; Lane::COUNT],
}

impl Model {
    fn new(config: RingConfig) -> Model {
        let lane = ModelLane { next_seq: 1, synced_next_seq: 1, ..ModelLane::default() };
        Model { config, lanes: [lane.clone(), lane.clone(), lane.clone(), lane] }
    }

    /// An fsync: everything appended so far becomes readable.
    fn sync(&mut self) {
        for lane in &mut self.lanes {
            lane.synced_next_seq = lane.next_seq;
        }
    }

    fn pool_used(&self, lane: Lane) -> u64 {
        Lane::ALL
            .iter()
            .filter(|other| (**other == Lane::Audit) == (lane == Lane::Audit))
            .map(|other| self.lanes[other.index()].bytes_used())
            .sum()
    }

    fn append(&mut self, lane: Lane, body: Vec<u8>) -> AppendResult {
        let needed = stored_bytes(CHUNK_HEADER_LEN + body.len());
        let lane_budget = self.config.lane_budget_bytes(lane);
        let pool_budget = self.config.pool_budget_bytes(lane);
        let policy = self.config.lane(lane).policy;
        if needed > lane_budget.min(pool_budget).min(self.config.chunk_stored_bytes_max()) {
            self.lanes[lane.index()].rejected_chunks += 1;
            return AppendResult::TooLarge;
        }
        loop {
            let lane_over = self.lanes[lane.index()].bytes_used() + needed > lane_budget;
            let pool_over = self.pool_used(lane) + needed > pool_budget;
            if !lane_over && !pool_over {
                break;
            }
            let victim = if lane == Lane::Audit {
                None
            } else if lane_over {
                (policy == LanePolicy::DropOldest && !self.lanes[lane.index()].chunks.is_empty())
                    .then_some(lane)
            } else {
                [Lane::Media, Lane::Sensor, Lane::Decisions].into_iter().find(|other| {
                    (*other > lane || (*other == lane && policy == LanePolicy::DropOldest))
                        && self.config.lane(*other).policy == LanePolicy::DropOldest
                        && !self.lanes[other.index()].chunks.is_empty()
                })
            };
            match victim {
                Some(victim) => {
                    let state = &mut self.lanes[victim.index()];
                    state.chunks.pop_first();
                    state.evicted_chunks += 1;
                }
                None => {
                    self.lanes[lane.index()].rejected_chunks += 1;
                    return if policy == LanePolicy::Block {
                        AppendResult::Backpressure
                    } else {
                        AppendResult::Rejected
                    };
                }
            }
        }
        let state = &mut self.lanes[lane.index()];
        let seq = state.next_seq;
        state.next_seq += 1;
        state.chunks.insert(seq, (needed, body));
        if self.config.durability == Durability::Sync {
            // LMDB fsynced the commit before the append returned.
            self.sync();
        }
        AppendResult::Appended(seq)
    }
}

/// Also checks that every refusal hands back the very chunk that was sent.
fn observe_append(result: Result<u64, AppendError>, sent: &SealedChunk) -> AppendResult {
    let refused = match result {
        Ok(seq) => return AppendResult::Appended(seq),
        Err(refused) => refused,
    };
    if refused.chunk.as_ref() != Some(sent) {
        return AppendResult::Unexpected(format!("{refused:?} did not hand back the chunk sent"));
    }
    match refused.error {
        RingError::ChunkTooLarge { .. } => AppendResult::TooLarge,
        RingError::Backpressure { .. } => AppendResult::Backpressure,
        RingError::Rejected { .. } => AppendResult::Rejected,
        other => AppendResult::Unexpected(other.to_string()),
    }
}

fn model_config(durability: Durability) -> RingConfig {
    let mut config = RingConfig::with_capacity(16 * MIB);
    config.durability = durability;
    config.audit_reserved_bytes = 2 * MIB;
    // Backpressure at once, so the model needs no clock.
    config.lanes[Lane::Decisions.index()].block_timeout_ms = 0;
    config.lanes[Lane::Sensor.index()].bytes_max = Some(6 * MIB);
    config
}

fn check_lanes_agree(ring: &Ring, model: &Model) {
    let stats = ring.stats();
    for lane in Lane::ALL {
        let expected = &model.lanes[lane.index()];
        let actual = stats.lane(lane);
        assert_eq!(actual.next_seq, expected.next_seq, "{lane} next_seq");
        assert_eq!(actual.synced_next_seq, expected.synced_next_seq, "{lane} synced_next_seq");
        assert_eq!(actual.acked_through, expected.acked_through, "{lane} acked_through");
        assert_eq!(actual.chunk_count, expected.chunks.len() as u64, "{lane} chunk_count");
        assert_eq!(actual.bytes_used, expected.bytes_used(), "{lane} bytes_used");
        assert_eq!(actual.evicted_chunks, expected.evicted_chunks, "{lane} evicted_chunks");
        // Every test chunk holds one record.
        assert_eq!(actual.evicted_records, expected.evicted_chunks, "{lane} evicted_records");
        assert_eq!(actual.rejected_chunks, expected.rejected_chunks, "{lane} rejected_chunks");
        assert!(actual.bytes_used <= actual.budget_bytes, "{lane} over budget");
        assert_eq!(
            ring.oldest_seq(lane).unwrap(),
            expected.chunks.keys().next().copied(),
            "{lane} oldest seq"
        );
    }
    assert!(stats.file_bytes <= stats.map_size_bytes);
    assert_eq!(stats.map_full_retries, 0, "the model does not expect MAP_FULL at this scale");
}

fn run(operations: Vec<Operation>, durability: Durability) {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let config = model_config(durability);
    let mut ring = open(&path, config.clone());
    let mut model = Model::new(config.clone());
    for (step, operation) in operations.into_iter().enumerate() {
        match operation {
            Operation::Append { lane, len } => {
                let tag = step as u64;
                let expected = model.append(lane, body_bytes(lane, tag, len));
                let sent = chunk(lane, tag, len);
                assert_eq!(
                    observe_append(ring.append(sent.clone()), &sent),
                    expected,
                    "step {step}: append {lane} {len}"
                );
            }
            Operation::Ack { lane, fraction } => {
                let state = &mut model.lanes[lane.index()];
                let head = state.next_seq - 1;
                let through = state.acked_through + (head - state.acked_through) * fraction as u64 / 100;
                ring.ack(lane, through).unwrap();
                if through > state.acked_through {
                    state.acked_through = through;
                    state.chunks.retain(|seq, _| *seq > through);
                }
                let beyond = ring.ack(lane, head + 1);
                assert!(matches!(beyond, Err(RingError::AckBeyondHead { .. })), "step {step}: {beyond:?}");
            }
            Operation::Read { lane, offset, chunks_max } => {
                let state = &model.lanes[lane.index()];
                let from = state.acked_through + 1 + offset as u64 % 8;
                let limits = ReadLimits { chunks_max: chunks_max as usize, bytes_max: usize::MAX };
                let read = ring.read_from(lane, from, limits).unwrap();
                let expected: Vec<(u64, &Vec<u8>)> = state
                    .chunks
                    .range(from..state.synced_next_seq.max(from))
                    .take(chunks_max as usize)
                    .map(|(seq, (_, body))| (*seq, body))
                    .collect();
                let actual: Vec<(u64, Vec<u8>)> =
                    read.iter().map(|stored| (stored.seq, stored.body().to_vec())).collect();
                assert_eq!(actual.len(), expected.len(), "step {step}: read {lane} from {from}");
                for ((seq, body), (expected_seq, expected_body)) in actual.iter().zip(expected) {
                    assert_eq!(*seq, expected_seq, "step {step}");
                    assert!(body == expected_body, "step {step}: body of seq {seq} differs");
                }
            }
            Operation::Sync => {
                ring.sync().unwrap();
                model.sync();
            }
            Operation::Reopen => {
                drop(ring);
                ring = open(&path, config.clone());
                // The ring fsyncs when it closes and again when it opens.
                model.sync();
            }
        }
        check_lanes_agree(&ring, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn ring_matches_model(operations in proptest::collection::vec(operation_strategy(), 1..80)) {
        run(operations, Durability::Sync);
    }

    #[test]
    fn ring_matches_model_in_periodic_mode(operations in proptest::collection::vec(operation_strategy(), 1..80)) {
        run(operations, Durability::Periodic { sync_interval_ms: SYNC_INTERVAL_NEVER_MS });
    }
}

/// A sequence that once exercised every policy at once; kept as a named regression.
#[test]
fn fills_every_pool_then_drains() {
    let mut operations = Vec::new();
    for round in 0..60 {
        for lane in Lane::ALL {
            operations.push(Operation::Append { lane, len: 300_000 + round * 3_000 });
        }
    }
    operations.push(Operation::Reopen);
    for lane in Lane::ALL {
        operations.push(Operation::Read { lane, offset: 0, chunks_max: 7 });
        operations.push(Operation::Ack { lane, fraction: 100 });
    }
    operations.push(Operation::Append { lane: Lane::Decisions, len: 4_000_000 });
    run(operations, Durability::Sync);
}

/// In `Periodic` mode a read sees nothing appended since the last fsync, then all of it.
#[test]
fn periodic_reads_wait_for_the_fsync() {
    let mut operations = Vec::new();
    for lane in Lane::ALL {
        operations.push(Operation::Append { lane, len: 10_000 });
        operations.push(Operation::Read { lane, offset: 0, chunks_max: 7 });
    }
    operations.push(Operation::Sync);
    for lane in Lane::ALL {
        operations.push(Operation::Read { lane, offset: 0, chunks_max: 7 });
        operations.push(Operation::Append { lane, len: 10_000 });
        operations.push(Operation::Read { lane, offset: 0, chunks_max: 7 });
        operations.push(Operation::Ack { lane, fraction: 100 });
    }
    operations.push(Operation::Reopen);
    for lane in Lane::ALL {
        operations.push(Operation::Read { lane, offset: 0, chunks_max: 7 });
    }
    run(operations, Durability::Periodic { sync_interval_ms: SYNC_INTERVAL_NEVER_MS });
}
