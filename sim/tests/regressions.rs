//! Every seed that failed while the simulator was developed, as a named test.
//!
//! A seed means something only for the scenario generator (`sim::scenario`) and the simulator it
//! was found with: whenever either changes the order or number of draws, the seeds here must be
//! found again (revert the fix in a scratch copy, scan seeds, keep the first that fails; for the
//! simulator's own bugs, reintroduce the bug the same way). So each test also checks a witness
//! from the run's report — that the seed still reaches the situation that found the bug — and
//! fails with "re-derive this seed" when it does not.
//!
//! History: the first generator's seeds 3 (Welcome trim), 102 (dictionary frame), 15 (eviction
//! undone), 192 and 267 (restored twice), 191 and 725 (replayer stall) were re-derived for the
//! generator these tests run with.

use sim::{Options, Report, run_seed};

/// Runs each of `seeds`, which must pass, and checks that it still reaches `what` (`reached`, on
/// the run's report).
fn passes_reaching(seeds: &[u64], what: &str, reached: impl Fn(&Report) -> bool) {
    for &seed in seeds {
        let report = match run_seed(seed, &Options::default()) {
            Ok(report) => report,
            Err(failure) => panic!("{failure}"),
        };
        assert!(
            reached(&report),
            "seed {seed} no longer reaches {what}: re-derive this regression seed (see the module doc)"
        );
    }
}

/// Bug in `session` (fixed in `DeviceSession::handle_welcome` and `SinkSession::handle_grant`):
/// the Welcome's resume seq is the sink's *landed* watermark (written, maybe not committed) and
/// the device trimmed its ring below it at the Welcome. A device that reconnected while the sink
/// had uncommitted chunks of it deleted them; a sink crash before the commit then lost them
/// (invariant 1). Found as "ACKED DATA NOT DURABLE" at the ring's trim. Now the device trims only
/// on Acks, and the sink acks what of the resumed range is durable right after the grant.
#[test]
fn welcome_trimmed_chunks_the_sink_had_not_committed() {
    passes_reaching(&[12], "a grant over uncommitted chunks", |report| report.grants_over_pending > 0);
}

/// Bug in `session` (fixed in `DeviceSession::handle_read`): a chunk naming a dictionary whose
/// frame exceeds the sink's frame limit was sent with that dictionary frame anyway; the sink
/// closed every session with `bad_frame` and the lane never got past the chunk (a reconnect
/// loop, not the documented "skipped and reported"). Now it is `Undeliverable`.
#[test]
fn dictionary_frame_above_the_sink_frame_limit() {
    passes_reaching(&[102, 344], "a dictionary above the frame limit", |report| {
        report.undeliverable_chunks.contains_key("DictionaryTooLarge")
    });
}

/// Bug in the ring's design (fixed in `buffer`: `Ring::read_from` holds at a gap whose deletion is
/// not fsynced yet; modelled by `sim::ring::ModelRing::read_from`): in `Periodic` durability an
/// eviction not fsynced yet is undone by a power cut — the chunk is back and the ring's evicted
/// counters went back too — but the ring had served the chunks after the gap, the sink acked past
/// it, and the next Ack deleted the restored chunk unsent: lost and counted nowhere (invariant 3
/// says evictions are never silent). Found as "ACKED DATA NOT DURABLE" at the ring's trim.
/// `buffer/tests/durability.rs` has the same case against the real ring. The seeds are those of
/// `0..4000` that fail with the rule taken out of the model.
#[test]
fn an_eviction_undone_by_a_power_cut_is_never_skipped_past() {
    passes_reaching(&[1676, 2843], "an eviction undone by a power cut", |report| report.evictions_undone > 0);
}

/// Simulator bug: a chunk restored from a backup may legitimately land once more per restore
/// (the documented duplicate of `RingBehind`); the check allowed one extra copy in total, and a
/// chunk restored twice was reported as a duplicate.
#[test]
fn a_chunk_restored_twice_may_land_three_times() {
    passes_reaching(&[1211], "a chunk restored from a backup twice", |report| {
        report.max_restores_of_a_chunk >= 2
    });
}

/// Simulator bug: the replaying device waited for the sink's Hello timeout before hanging up
/// (as if it expected to be closed), so it needed more than the stall detector's 30 s of virtual
/// time to make its connections and the run was declared stuck.
#[test]
fn the_replayer_finishes_before_the_stall_detector() {
    passes_reaching(&[191, 725], "a replaying device", |report| {
        report.hostiles.iter().any(|(id, _, _)| id.ends_with("replayer"))
    });
}
