//! What survives a power cut: the ring identity, and every chunk `read_from` ever served.
//!
//! Power cuts are simulated with `buffer::power_cut::PowerCut`: the ring's `data.mdb` is copied
//! after every fsync (through the `SyncObserver` seam) and put back after the ring is closed.

mod common;

use std::path::Path;

use buffer::power_cut::PowerCut;
use buffer::{Durability, IDENTITY_BYTES, OnCorrupt, ReadLimits, Ring, RingConfig, RingError};
use common::{MIB, chunk, open};
use protocol::Lane;

/// Longer than any test runs: in `Periodic` mode only `sync`, `renew_identity` and open fsync.
const SYNC_INTERVAL_NEVER_MS: u64 = 60_000;

const ALL: ReadLimits = ReadLimits { chunks_max: usize::MAX, bytes_max: usize::MAX };

fn periodic(power_cut: &PowerCut) -> RingConfig {
    let mut config = RingConfig::with_capacity(8 * MIB);
    config.durability = Durability::Periodic { sync_interval_ms: SYNC_INTERVAL_NEVER_MS };
    config.sync_observer = Some(power_cut.observer());
    config
}

fn seqs(ring: &Ring, lane: Lane) -> Vec<u64> {
    ring.read_from(lane, 1, ALL).unwrap().iter().map(|stored| stored.seq).collect()
}

/// Cuts the power with `ring` open: it is closed (its final fsync is not kept), the last synced
/// state is put back, and the ring is opened again.
fn power_cut(ring: Ring, power_cut: &PowerCut, path: &Path, config: RingConfig) -> Ring {
    power_cut.cut();
    drop(ring);
    power_cut.restore(path);
    open(path, config)
}

/// Edits `meta` behind the ring's back, as another build (older or newer) would have left it.
fn edit_meta(
    path: &Path,
    edit: impl FnOnce(&mut heed::RwTxn, heed::Database<heed::types::Bytes, heed::types::Bytes>),
) {
    let env =
        unsafe { heed::EnvOpenOptions::new().map_size(9 * MIB as usize).max_dbs(3).open(path).unwrap() };
    let mut txn = env.write_txn().unwrap();
    let meta = env.open_database(&txn, Some("meta")).unwrap().expect("meta database");
    edit(&mut txn, meta);
    txn.commit().unwrap();
    env.prepare_for_closing().wait();
}

#[test]
fn read_from_serves_only_fsynced_chunks_in_periodic_mode() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let cuts = PowerCut::new(directory.path().join("snapshot"));
    let config = periodic(&cuts);
    let ring = open(&path, config.clone());
    for step in 0..3 {
        assert_eq!(ring.append(chunk(Lane::Sensor, step, 1000)).unwrap(), step + 1);
    }
    let check = |ring: &Ring, next_seq: u64, synced_next_seq: u64, readable: &[u64]| {
        let stats = ring.stats();
        let lane = stats.lane(Lane::Sensor);
        assert_eq!((lane.next_seq, lane.synced_next_seq), (next_seq, synced_next_seq));
        assert_eq!(seqs(ring, Lane::Sensor), readable);
        // A read from a seq past the synced ones is empty, not an error.
        assert!(ring.read_from(Lane::Sensor, synced_next_seq, ALL).unwrap().is_empty());
    };
    check(&ring, 4, 1, &[]);
    ring.sync().unwrap();
    check(&ring, 4, 4, &[1, 2, 3]);
    for step in 3..5 {
        ring.append(chunk(Lane::Sensor, step, 1000)).unwrap();
    }
    check(&ring, 6, 4, &[1, 2, 3]);
    // Acks and other lanes do not make unsynced appends readable.
    ring.ack(Lane::Sensor, 1).unwrap();
    ring.append(chunk(Lane::Audit, 0, 1000)).unwrap();
    check(&ring, 6, 4, &[2, 3]);
    assert!(seqs(&ring, Lane::Audit).is_empty());

    // The power goes: the unsynced appends and the ack are gone, everything read survived, and
    // the lost seqs are given again.
    let ring = power_cut(ring, &cuts, &path, config.clone());
    check(&ring, 4, 4, &[1, 2, 3]);
    assert_eq!(ring.stats().lane(Lane::Sensor).acked_through, 0);
    assert_eq!(ring.append(chunk(Lane::Sensor, 40, 1000)).unwrap(), 4);
    ring.sync().unwrap();
    let read = ring.read_from(Lane::Sensor, 4, ALL).unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].body(), &common::body_bytes(Lane::Sensor, 40, 1000)[..]);
}

#[test]
fn sync_mode_serves_every_commit_at_once() {
    let directory = tempfile::tempdir().unwrap();
    let cuts = PowerCut::new(directory.path().join("snapshot"));
    let mut config = RingConfig::with_capacity(8 * MIB);
    config.sync_observer = Some(cuts.observer());
    let ring = open(&directory.path().join("ring"), config);
    let snapshots_at_open = cuts.snapshots();
    for step in 0..3 {
        let seq = ring.append(chunk(Lane::Sensor, step, 1000)).unwrap();
        let lane = ring.stats().lanes[Lane::Sensor.index()];
        assert_eq!((lane.next_seq, lane.synced_next_seq), (seq + 1, seq + 1));
        assert_eq!(seqs(&ring, Lane::Sensor), (1..=seq).collect::<Vec<_>>());
    }
    // Each commit is fsynced by LMDB, and each is shown to the observer.
    assert!(cuts.snapshots() >= snapshots_at_open + 3);
}

#[test]
fn the_identity_is_made_at_open_and_survives_reopens() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let cuts = PowerCut::new(directory.path().join("snapshot"));
    let config = periodic(&cuts);
    let ring = open(&path, config.clone());
    let identity = ring.identity();
    assert_ne!(identity, [0u8; IDENTITY_BYTES]);
    assert_eq!(ring.clone().identity(), identity, "clones share it");
    drop(ring);
    let ring = open(&path, config.clone());
    assert_eq!(ring.identity(), identity);
    // Durable at open, before any periodic fsync.
    let ring = power_cut(ring, &cuts, &path, config);
    assert_eq!(ring.identity(), identity);

    let other = tempfile::tempdir().unwrap();
    let other_ring = open(&other.path().join("ring"), RingConfig::with_capacity(8 * MIB));
    assert_ne!(other_ring.identity(), identity, "every ring draws its own");
}

#[test]
fn renew_identity_is_durable_when_it_returns_in_every_mode() {
    for durability in [Durability::Periodic { sync_interval_ms: SYNC_INTERVAL_NEVER_MS }, Durability::Sync] {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("ring");
        let cuts = PowerCut::new(directory.path().join("snapshot"));
        let mut config = periodic(&cuts);
        config.durability = durability;
        let ring = open(&path, config.clone());
        let old = ring.identity();
        ring.append(chunk(Lane::Sensor, 0, 1000)).unwrap();
        let syncs = ring.stats().syncs;
        let renewed = ring.renew_identity().unwrap();
        assert_ne!(renewed, old, "{durability:?}");
        assert_eq!(ring.identity(), renewed);
        assert_eq!(ring.stats().syncs, syncs + 1, "{durability:?}: renewing forced an fsync");
        // Its fsync made the append before it durable too, so it is readable now.
        assert_eq!(seqs(&ring, Lane::Sensor), [1]);
        let ring = power_cut(ring, &cuts, &path, config.clone());
        assert_eq!(ring.identity(), renewed, "{durability:?}: the renewed identity survived the cut");
        assert_eq!(seqs(&ring, Lane::Sensor), [1]);
        drop(ring);
        assert_eq!(open(&path, config).identity(), renewed);
    }
}

#[test]
fn a_ring_written_before_identities_gets_one_at_open() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let config = RingConfig::with_capacity(8 * MIB);
    let before = {
        let ring = open(&path, config.clone());
        ring.append(chunk(Lane::Sensor, 0, 1000)).unwrap();
        ring.identity()
    };
    // What a build that predates the key leaves: no `identity` in `meta`.
    edit_meta(&path, |txn, meta| assert!(meta.delete(txn, b"identity").unwrap()));
    let ring = open(&path, config.clone());
    let identity = ring.identity();
    assert_ne!(identity, [0u8; IDENTITY_BYTES]);
    assert_ne!(identity, before, "a fresh identity is drawn, not the one that was deleted");
    assert_eq!(seqs(&ring, Lane::Sensor), [1], "the ring's chunks are untouched");
    drop(ring);
    assert_eq!(open(&path, config).identity(), identity, "and kept");
}

#[test]
fn unknown_meta_keys_are_ignored_so_older_builds_open_newer_rings() {
    // An older build reads `meta` key by key, exactly as this one does with keys it does not
    // know: this is what keeps an A/B rollback working after `identity` was added.
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let config = RingConfig::with_capacity(8 * MIB);
    let identity = {
        let ring = open(&path, config.clone());
        ring.append(chunk(Lane::Sensor, 0, 1000)).unwrap();
        ring.identity()
    };
    edit_meta(&path, |txn, meta| meta.put(txn, b"a-key-from-a-later-build", b"\x01\x02\x03").unwrap());
    let ring = open(&path, config);
    assert_eq!(ring.identity(), identity);
    assert_eq!(seqs(&ring, Lane::Sensor), [1]);
    assert_eq!(ring.append(chunk(Lane::Sensor, 1, 1000)).unwrap(), 2);
}

#[test]
fn a_malformed_identity_is_damage_handled_by_policy() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let mut config = RingConfig::with_capacity(8 * MIB);
    config.on_corrupt = OnCorrupt::Refuse;
    drop(open(&path, config.clone()));
    edit_meta(&path, |txn, meta| meta.put(txn, b"identity", b"short").unwrap());
    match Ring::open(&path, config) {
        Err(RingError::CorruptRefused { reason, .. }) => {
            assert!(reason.contains("identity is 5 bytes, not 16"), "{reason}")
        }
        Err(other) => panic!("expected CorruptRefused, got {other}"),
        Ok(_) => panic!("a 5-byte identity was accepted"),
    }
}

/// Found by the simulator (`sim/tests/regressions.rs`,
/// `an_eviction_undone_by_a_power_cut_is_never_skipped_past`): an eviction that is not fsynced yet
/// leaves a gap a power cut can undo. Had `read_from` served the chunks after the gap, the core
/// would have acked past it, the cut would have brought the evicted chunk back below the core's
/// watermark (with the eviction counters undone), and the next Ack would have deleted it unsent
/// and uncounted. So reads hold at such a gap until the next fsync makes the eviction durable.
#[test]
fn read_from_never_serves_past_a_gap_a_power_cut_can_undo() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let cuts = PowerCut::new(directory.path().join("snapshot"));
    let mut config = periodic(&cuts);
    config.lanes[Lane::Sensor.index()] = buffer::LaneConfig {
        policy: buffer::LanePolicy::DropOldest,
        // Each 10 000-byte chunk costs three pages and a node (`layout::stored_bytes`): five fit.
        bytes_max: Some(70_000),
        block_timeout_ms: 0,
    };
    let ring = open(&path, config.clone());
    for tag in 1..=5 {
        assert_eq!(ring.append(chunk(Lane::Sensor, tag, 10_000)).unwrap(), tag);
    }
    ring.sync().unwrap();
    assert_eq!(seqs(&ring, Lane::Sensor), [1, 2, 3, 4, 5]);

    // The sixth chunk does not fit: seq 1 is evicted, in a commit not fsynced yet.
    assert_eq!(ring.append(chunk(Lane::Sensor, 6, 10_000)).unwrap(), 6);
    assert_eq!(ring.stats().lane(Lane::Sensor).evicted_chunks, 1);
    assert!(
        seqs(&ring, Lane::Sensor).is_empty(),
        "a read from the evicted seq must wait for the eviction to be durable"
    );
    // A reader already past the gap (it sent seq 1) is not held back.
    let from_two: Vec<u64> =
        ring.read_from(Lane::Sensor, 2, ALL).unwrap().iter().map(|stored| stored.seq).collect();
    assert_eq!(from_two, [2, 3, 4, 5]);

    // Why: a power cut now brings seq 1 back, uncounted as evicted.
    let ring = power_cut(ring, &cuts, &path, config.clone());
    assert_eq!(seqs(&ring, Lane::Sensor), [1, 2, 3, 4, 5]);
    assert_eq!(ring.stats().lane(Lane::Sensor).evicted_chunks, 0);

    // Once the eviction is fsynced, reads skip the gap as before.
    assert_eq!(ring.append(chunk(Lane::Sensor, 6, 10_000)).unwrap(), 6);
    assert!(seqs(&ring, Lane::Sensor).is_empty());
    ring.sync().unwrap();
    assert_eq!(seqs(&ring, Lane::Sensor), [2, 3, 4, 5, 6]);
    let ring = power_cut(ring, &cuts, &path, config);
    assert_eq!(seqs(&ring, Lane::Sensor), [2, 3, 4, 5, 6]);
    assert_eq!(ring.stats().lane(Lane::Sensor).evicted_chunks, 1);
}
