//! Ownership, fencing and commits against a real 3-member etcd cluster on loopback.
//! Skips only when etcd is missing and CI is not `true`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster::testing::{EtcdCluster, etcd_or_skip};
use cluster::{
    Claim, ClusterConfig, ClusterError, CommitOutcome, DeviceCommit, DeviceRecord, EtcdRegistry,
    OwnershipRegistry, RingRecord,
};

fn config(etcd: &EtcdCluster, node: &str, prefix: &str) -> ClusterConfig {
    let config = ClusterConfig {
        node: node.to_string(),
        advertise: format!("{node}.example:4433"),
        endpoints: etcd.endpoints(),
        lease_ttl_seconds: 2,
        request_timeout_ms: 800,
        commit_batch_devices_max: 63,
        key_prefix: prefix.to_string(),
    };
    config.validate(std::path::Path::new("test")).unwrap();
    config
}

fn claim(registry: &mut EtcdRegistry, device: &str) -> i64 {
    match registry.claim(device).unwrap() {
        Claim::Owned { token } => token,
        other => panic!("{} could not claim {device}: {other:?}", registry.node()),
    }
}

fn entry(device: &str, token: i64, seq: u64) -> DeviceCommit {
    let ring = RingRecord { id: [7; 16], bases: BTreeMap::from([(0, 0), (2, 1000)]) };
    let record = DeviceRecord { watermarks: BTreeMap::from([(0, seq / 2), (2, seq)]), ring: Some(ring) };
    DeviceCommit { device: device.to_string(), token, record }
}

#[test]
fn ownership_fencing_and_takeover() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let mut a = EtcdRegistry::connect(&config(&etcd, "sink-a", "/t1")).unwrap();
    let _a_alive = a.spawn_keep_alive();
    let mut b = EtcdRegistry::connect(&config(&etcd, "sink-b", "/t1")).unwrap();
    let _b_alive = b.spawn_keep_alive();
    assert_eq!(
        a.members().unwrap(),
        vec![
            ("sink-a".into(), "sink-a.example:4433".into()),
            ("sink-b".into(), "sink-b.example:4433".into())
        ]
    );

    let devices: Vec<String> = (0..50).map(|index| format!("cam-{index:03}")).collect();
    let tokens: Vec<i64> = devices.iter().map(|device| claim(&mut a, device)).collect();
    // Claiming again is idempotent; another node is told who owns it.
    assert_eq!(a.claim(&devices[0]).unwrap(), Claim::Owned { token: tokens[0] });
    assert_eq!(b.claim(&devices[0]).unwrap(), Claim::OwnedElsewhere { node: "sink-a".into() });

    // One txn for the whole batch.
    let batch: Vec<DeviceCommit> =
        devices.iter().zip(&tokens).map(|(device, token)| entry(device, *token, 100)).collect();
    assert_eq!(a.commit(1, &batch).unwrap(), CommitOutcome::Committed);
    assert_eq!(b.record(&devices[7]).unwrap(), entry(&devices[7], 0, 100).record);
    assert_eq!(b.record("never-seen").unwrap(), DeviceRecord::default());

    // B cannot commit for a device it does not own, whatever token it names; nothing is stored.
    let forged = vec![entry(&devices[0], tokens[0], 999)];
    assert_eq!(b.commit(1, &forged).unwrap(), CommitOutcome::Fenced { devices: vec![devices[0].clone()] });
    assert_eq!(a.record(&devices[0]).unwrap().watermarks[&2], 100);

    // A batch with one device A lost is refused as a whole: atomic, no partial watermarks.
    a.release(&devices[1], tokens[1]).unwrap();
    let b_token = claim(&mut b, &devices[1]);
    assert!(b_token > tokens[1], "a later ownership has a larger fencing token");
    let batch: Vec<DeviceCommit> =
        devices.iter().zip(&tokens).map(|(device, token)| entry(device, *token, 200)).collect();
    assert_eq!(a.commit(2, &batch).unwrap(), CommitOutcome::Fenced { devices: vec![devices[1].clone()] });
    assert_eq!(a.record(&devices[0]).unwrap().watermarks[&2], 100, "nothing of a fenced batch is stored");
    // Without the lost device the batch goes through; B resumes the lost one from etcd.
    assert_eq!(a.commit(3, &batch[2..]).unwrap(), CommitOutcome::Committed);
    assert_eq!(b.record(&devices[1]).unwrap().watermarks[&2], 100);
    assert_eq!(b.commit(1, &[entry(&devices[1], b_token, 150)]).unwrap(), CommitOutcome::Committed);

    // A leaves (lease revoked): B takes every device at once and resumes from A's watermarks.
    drop(_a_alive);
    a.leave().unwrap();
    let token = claim(&mut b, &devices[5]);
    assert!(token > tokens[5]);
    assert_eq!(b.record(&devices[5]).unwrap().watermarks[&2], 200);

    // A restarted A continues its commit chain from etcd.
    let mut a_again = EtcdRegistry::connect(&config(&etcd, "sink-a", "/t1")).unwrap();
    assert_eq!(a_again.last_commit_id(), 3);
    // Its previous process had prepared commits 3 (sent, applied) and 4 (maybe sent, not applied).
    assert!(a_again.settle(3).unwrap());
    assert!(a_again.settle(2).unwrap());
    assert!(!a_again.settle(4).unwrap());
    assert_eq!(a_again.last_commit_id(), 4);
    assert!(!a_again.settle(4).unwrap(), "an abandoned commit stays abandoned");
}

#[test]
fn paused_node_past_its_lease_is_refused() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    // A renews nothing: it plays a SIGSTOPped process.
    let mut a = EtcdRegistry::connect(&config(&etcd, "sink-a", "/t2")).unwrap();
    let mut b = EtcdRegistry::connect(&config(&etcd, "sink-b", "/t2")).unwrap();
    let _b_alive = b.spawn_keep_alive();
    let token_a = claim(&mut a, "cam-1");
    assert_eq!(a.commit(1, &[entry("cam-1", token_a, 10)]).unwrap(), CommitOutcome::Committed);

    // The lease (2 s) runs out; B gets the device.
    let started = Instant::now();
    let token_b = loop {
        match b.claim("cam-1").unwrap() {
            Claim::Owned { token } => break token,
            Claim::OwnedElsewhere { .. } => {
                assert!(started.elapsed() < Duration::from_secs(10), "A's lease never expired");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(token_b > token_a);

    // A "wakes up" and tries to commit what it landed while paused: refused, nothing stored.
    assert_eq!(
        a.commit(2, &[entry("cam-1", token_a, 20)]).unwrap(),
        CommitOutcome::Fenced { devices: vec!["cam-1".into()] }
    );
    assert_eq!(b.record("cam-1").unwrap().watermarks[&2], 10);
    assert!(matches!(a.keep_alive(), Err(ClusterError::LeaseLost { .. })));
    assert!(matches!(a.claim("cam-2"), Err(ClusterError::LeaseLost { .. })));
    assert_eq!(b.commit(1, &[entry("cam-1", token_b, 30)]).unwrap(), CommitOutcome::Committed);
}

/// Commits until one succeeds, resolving unknown outcomes; gives up after `limit`.
fn commit_through(registry: &mut EtcdRegistry, commit_id: &mut u64, batch: &[DeviceCommit], limit: Duration) {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < limit, "no commit went through within {limit:?}");
        let outcome = match registry.resolve() {
            Ok(true) => return, // the earlier try was applied
            Ok(false) => {
                *commit_id += 1;
                registry.commit(*commit_id, batch)
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(CommitOutcome::Committed) => return,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(error) => {
                eprintln!("commit retry after: {error}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn member_loss_goes_on_and_quorum_loss_stops_commits_until_it_returns() {
    if !etcd_or_skip() {
        return;
    }
    let mut etcd = EtcdCluster::start(3);
    let mut a = EtcdRegistry::connect(&config(&etcd, "sink-a", "/t3")).unwrap();
    let devices = ["cam-1", "cam-2", "cam-3"];
    let tokens: Vec<i64> = devices.iter().map(|device| claim(&mut a, device)).collect();
    let batch =
        |seq| -> Vec<DeviceCommit> { devices.iter().zip(&tokens).map(|(d, t)| entry(d, *t, seq)).collect() };
    let mut commit_id = 0;
    commit_through(&mut a, &mut commit_id, &batch(10), Duration::from_secs(5));

    // One member of three gone (maybe the leader): commits go on after at most an election.
    etcd.kill(0);
    // A lease renewal may time out while the two left elect a leader; it goes through after.
    let started = Instant::now();
    while let Err(error) = a.keep_alive() {
        assert!(started.elapsed() < Duration::from_secs(10), "keepalive with 2 of 3 members: {error}");
        std::thread::sleep(Duration::from_millis(100));
    }
    commit_through(&mut a, &mut commit_id, &batch(20), Duration::from_secs(10));
    assert_eq!(a.record("cam-2").unwrap().watermarks[&2], 20);

    // Two of three gone: no quorum. The commit fails with a clear error and is not acked.
    etcd.kill(1);
    commit_id += 1;
    let error = a.commit(commit_id, &batch(30)).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, ClusterError::OutcomeUnknown { .. } | ClusterError::Etcd(_)),
        "quorum loss must fail the commit: {message}"
    );
    eprintln!("commit without quorum: {message}");
    assert!(a.resolve().is_err(), "nothing can be resolved without quorum");

    // Quorum back: the unknown commit is settled (applied or abandoned), then commits go on.
    etcd.restart(1);
    let started = Instant::now();
    let applied = loop {
        match a.resolve() {
            Ok(applied) => break applied,
            Err(error) => {
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "not resolved after quorum returned: {error}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let stored = a.record("cam-3").unwrap().watermarks[&2];
    assert_eq!(stored, if applied { 30 } else { 20 }, "etcd holds exactly what resolve reported");
    commit_through(&mut a, &mut commit_id, &batch(40), Duration::from_secs(10));
    assert_eq!(a.record("cam-3").unwrap().watermarks[&2], 40);
}
