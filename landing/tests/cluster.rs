//! The landing core in cluster mode, pure: `MemoryDisk` per node and one `MemoryCluster` (the
//! in-memory twin of the etcd registry, same rules). Checks the commit-point rule: a checkpoint
//! becomes current (acked, readable) only after the registry accepted it, and the registry never
//! holds a watermark whose chunk is not durable on the node that committed it — through fencing,
//! unknown outcomes and crashes between the steps.

use std::time::{Duration, Instant};

use cluster::{Claim, MemoryCluster};
use landing::memory::{Faults, MemoryCommitter, MemoryDisk, MemoryStore};
use landing::{CommitError, LandOutcome, LandRequest, LandingConfig, LandingCore, OpenError};
use protocol::{ChunkHeader, Codec, Lane, SealedChunk};

type Core = LandingCore<MemoryCommitter, MemoryStore>;

const DEVICE: &str = "cam-1";
const RING: [u8; 16] = [5; 16];

fn config() -> LandingConfig {
    LandingConfig { commit_bytes_max: 1 << 20, commit_interval: Duration::from_secs(3600) }
}

fn open(disk: &MemoryDisk, cluster: &MemoryCluster, node: &str) -> Core {
    LandingCore::open_clustered(config(), disk.committer(), disk.store(), Box::new(cluster.node(node)), 63)
        .expect("open in cluster mode")
}

fn chunk(seq: u64) -> (ChunkHeader, Vec<u8>) {
    let body = format!("{DEVICE}/{seq}").into_bytes();
    let raw_len = u32::try_from(body.len()).expect("small");
    let sealed = SealedChunk::new(Lane::Sensor, Codec::Raw, 0, 1, raw_len, body).expect("valid chunk");
    let encoded = sealed.encode(seq);
    let (header, _) = protocol::decode_chunk(&encoded).expect("decodes");
    (header, encoded)
}

/// Claims, opens a session and lands `seqs` (core seqs of the sensor lane).
fn land(core: &mut Core, device: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<LandOutcome> {
    let generation = core.generation(device, Lane::Sensor);
    seqs.map(|seq| {
        let (header, encoded) = chunk(seq);
        core.land(Instant::now(), LandRequest { device, generation, header: &header, encoded: &encoded })
    })
    .collect()
}

fn claim_and_open(core: &mut Core, device: &str) -> u64 {
    assert!(matches!(core.claim(device).unwrap(), Claim::Owned { .. }));
    let grant = core.open_session(device, RING).unwrap();
    grant.lanes[Lane::Sensor.index()].landed
}

fn cluster_watermark(cluster: &MemoryCluster, device: &str) -> u64 {
    cluster.record(device).watermarks.get(&Lane::Sensor.id()).copied().unwrap_or(0)
}

fn durable_seqs(disk: &MemoryDisk) -> Vec<u64> {
    disk.durable_chunks(DEVICE, Lane::Sensor).into_iter().map(|(seq, _)| seq).collect()
}

#[test]
fn standalone_cores_refuse_a_prepared_cluster_commit_point() {
    let disk = MemoryDisk::new();
    let cluster = MemoryCluster::new();
    let mut core = open(&disk, &cluster, "a");
    claim_and_open(&mut core, DEVICE);
    land(&mut core, DEVICE, 1..=2);
    cluster.make_next_commit_unknown("a", false);
    assert!(core.commit().is_err());
    drop(core);
    let result = LandingCore::open(config(), disk.committer(), disk.store());
    assert!(matches!(result, Err(OpenError::PreparedWithoutCluster { .. })));
}

#[test]
fn sessions_need_ownership_and_a_new_owner_resumes_from_the_cluster() {
    let cluster = MemoryCluster::new();
    let (disk_a, disk_b) = (MemoryDisk::new(), MemoryDisk::new());
    let mut a = open(&disk_a, &cluster, "a");
    let mut b = open(&disk_b, &cluster, "b");
    assert!(b.open_session(DEVICE, RING).is_err(), "no session without ownership");

    assert_eq!(claim_and_open(&mut a, DEVICE), 0);
    assert_eq!(b.claim(DEVICE).unwrap(), Claim::OwnedElsewhere { node: "a".into() });
    assert!(land(&mut a, DEVICE, 1..=5).iter().all(|outcome| matches!(outcome, LandOutcome::Landed)));
    let acked = a.commit().unwrap();
    assert_eq!(acked, vec![((DEVICE.to_string(), Lane::Sensor), 5)]);
    assert_eq!(cluster_watermark(&cluster, DEVICE), 5);
    assert_eq!(durable_seqs(&disk_a), vec![1, 2, 3, 4, 5]);

    // A pauses past its lease; B takes the device over and resumes where the cluster says.
    cluster.expire("a");
    assert_eq!(claim_and_open(&mut b, DEVICE), 5, "the Welcome resumes from the cluster's watermark");
    assert_eq!(b.binding(DEVICE).unwrap().ring_id, RING, "the ring binding came from the cluster");
    land(&mut b, DEVICE, 6..=8);
    assert_eq!(b.commit().unwrap(), vec![((DEVICE.to_string(), Lane::Sensor), 8)]);

    // A wakes up with chunks it landed while paused: its commit is fenced, nothing is acked,
    // nothing of it becomes durable, the registry keeps B's watermark.
    land(&mut a, DEVICE, 6..=9);
    let failure = a.commit().unwrap_err();
    assert!(matches!(failure.error, CommitError::Fenced { .. }), "{:?}", failure.error);
    assert_eq!(failure.fenced, vec![DEVICE.to_string()]);
    assert_eq!(a.durable(DEVICE, Lane::Sensor), 5);
    assert_eq!(durable_seqs(&disk_a), vec![1, 2, 3, 4, 5]);
    assert_eq!(cluster_watermark(&cluster, DEVICE), 8);
    assert!(!a.owns(DEVICE));
    assert!(matches!(land(&mut a, DEVICE, 10..=10)[0], LandOutcome::Fenced));
}

#[test]
fn an_unknown_outcome_is_neither_acked_nor_rolled_back_until_resolved() {
    for applied in [true, false] {
        let cluster = MemoryCluster::new();
        let disk = MemoryDisk::new();
        let mut core = open(&disk, &cluster, "a");
        claim_and_open(&mut core, DEVICE);
        land(&mut core, DEVICE, 1..=3);
        cluster.make_next_commit_unknown("a", applied);
        let failure = core.commit().unwrap_err();
        assert!(failure.rolled_back.is_empty(), "nothing rolls back while the outcome is unknown");
        assert_eq!(core.durable(DEVICE, Lane::Sensor), 0, "nothing acked");
        assert_eq!(core.landed(DEVICE, Lane::Sensor), 3);
        assert!(core.commit_due(Instant::now()), "resolving is due");
        // More lands meanwhile.
        land(&mut core, DEVICE, 4..=4);
        let acked = core.commit().unwrap();
        if applied {
            assert_eq!(acked, vec![((DEVICE.to_string(), Lane::Sensor), 3)], "the resolved point is acked");
            assert_eq!(core.commit().unwrap(), vec![((DEVICE.to_string(), Lane::Sensor), 4)]);
        } else {
            assert_eq!(
                acked,
                vec![((DEVICE.to_string(), Lane::Sensor), 4)],
                "abandoned: a new point covers all"
            );
        }
        assert_eq!(cluster_watermark(&cluster, DEVICE), 4);
        assert_eq!(durable_seqs(&disk), vec![1, 2, 3, 4]);
    }
}

#[test]
fn a_crash_between_the_steps_of_a_commit_point_loses_nothing_acked_and_publishes_nothing_unaccepted() {
    // The registry accepted, the local promote failed (then power loss): the restart promotes.
    let cluster = MemoryCluster::new();
    let disk = MemoryDisk::new();
    let mut core = open(&disk, &cluster, "a");
    claim_and_open(&mut core, DEVICE);
    land(&mut core, DEVICE, 1..=3);
    disk.arm(Faults { store_promote: true, ..Faults::default() });
    let failure = core.commit().unwrap_err();
    assert!(failure.broken.is_some(), "the core stops: a restart must promote");
    assert_eq!(cluster_watermark(&cluster, DEVICE), 3);
    assert_eq!(durable_seqs(&disk), Vec::<u64>::new(), "not current before the promote");
    drop(core);
    disk.crash();
    let mut core = open(&disk, &cluster, "a");
    assert_eq!(durable_seqs(&disk), vec![1, 2, 3], "the restart promoted what the registry holds");
    assert_eq!(claim_and_open(&mut core, DEVICE), 3);

    // Prepared, sent, unknown and not applied, then power loss: the restart discards it and the
    // files go back to the last current checkpoint; the registry never gets the old point.
    land(&mut core, DEVICE, 4..=6);
    cluster.make_next_commit_unknown("a", false);
    assert!(core.commit().is_err());
    drop(core);
    disk.crash();
    let mut core = open(&disk, &cluster, "a");
    assert_eq!(durable_seqs(&disk), vec![1, 2, 3]);
    assert_eq!(cluster_watermark(&cluster, DEVICE), 3);
    assert_eq!(claim_and_open(&mut core, DEVICE), 3, "the device resends 4..=6");
    land(&mut core, DEVICE, 4..=6);
    core.commit().unwrap();
    assert_eq!(durable_seqs(&disk), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(cluster_watermark(&cluster, DEVICE), 6);

    // Unknown and applied, then power loss before resolving: the restart promotes it.
    land(&mut core, DEVICE, 7..=7);
    cluster.make_next_commit_unknown("a", true);
    assert!(core.commit().is_err());
    drop(core);
    disk.crash();
    let _core = open(&disk, &cluster, "a");
    assert_eq!(durable_seqs(&disk), vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(cluster_watermark(&cluster, DEVICE), 7);
}

#[test]
fn a_commit_point_holds_at_most_one_txn_of_devices() {
    let cluster = MemoryCluster::new();
    let disk = MemoryDisk::new();
    let mut core =
        LandingCore::open_clustered(config(), disk.committer(), disk.store(), Box::new(cluster.node("a")), 2)
            .unwrap();
    for device in ["d1", "d2", "d3"] {
        claim_and_open(&mut core, device);
    }
    assert!(matches!(land(&mut core, "d1", 1..=1)[0], LandOutcome::Landed));
    assert!(!core.commit_due(Instant::now()));
    assert!(matches!(land(&mut core, "d2", 1..=1)[0], LandOutcome::Landed));
    assert!(core.commit_due(Instant::now()), "due at the device bound");
    assert!(
        matches!(land(&mut core, "d3", 1..=1)[0], LandOutcome::Fenced),
        "a third device waits for the commit"
    );
    assert!(matches!(land(&mut core, "d1", 2..=2)[0], LandOutcome::Landed), "devices already pending go on");
    assert_eq!(core.commit().unwrap().len(), 2);
}
