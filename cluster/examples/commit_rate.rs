//! etcd load of fenced watermark commits: starts a 3-member etcd cluster on loopback (fsync on,
//! this machine's disk) and measures commit txns per second and their latency, for one node
//! committing batches of 1, 16 and 63 devices back to back, and for 3 nodes committing at once.
//!
//! `cargo run --release -p tributary-cluster --example commit_rate [seconds per case]`
//! Results are recorded in docs/benchmarks.md ("Cluster: etcd commit load").

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster::testing::EtcdCluster;
use cluster::{
    Claim, ClusterConfig, CommitOutcome, DeviceCommit, DeviceRecord, EtcdRegistry, OwnershipRegistry,
    RingRecord,
};

fn main() {
    let seconds: u64 = std::env::args().nth(1).map_or(3, |text| text.parse().expect("seconds per case"));
    let etcd = EtcdCluster::start(3);
    println!("etcd 3-member cluster on loopback, {seconds} s per case");
    println!("{:<28} {:>10} {:>16} {:>10} {:>10}", "case", "txns/s", "device-commits/s", "p50 ms", "p99 ms");
    for devices in [1, 16, 63] {
        let (txns, latencies) =
            run_node(&etcd, &format!("solo-{devices}"), devices, Duration::from_secs(seconds));
        report(&format!("1 node, {devices} devices/txn"), txns, devices, seconds, latencies);
    }
    let threads: Vec<_> = (0..3)
        .map(|index| {
            let endpoints = etcd.endpoints();
            std::thread::spawn(move || {
                run_node_at(endpoints, &format!("trio-{index}"), 63, Duration::from_secs(seconds))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut total = 0;
    for thread in threads {
        let (txns, latencies) = thread.join().expect("node thread");
        total += txns;
        all.extend(latencies);
    }
    report("3 nodes at once, 63 dev/txn", total, 63, seconds, all);
}

fn report(case: &str, txns: u64, devices: usize, seconds: u64, mut latencies: Vec<Duration>) {
    latencies.sort();
    let percentile = |fraction: f64| {
        latencies[((latencies.len() as f64 - 1.0) * fraction) as usize].as_secs_f64() * 1000.0
    };
    let rate = txns as f64 / seconds as f64;
    println!(
        "{case:<28} {rate:>10.0} {:>16.0} {:>10.2} {:>10.2}",
        rate * devices as f64,
        percentile(0.5),
        percentile(0.99)
    );
}

fn run_node(etcd: &EtcdCluster, node: &str, devices: usize, duration: Duration) -> (u64, Vec<Duration>) {
    run_node_at(etcd.endpoints(), node, devices, duration)
}

fn run_node_at(
    endpoints: Vec<String>,
    node: &str,
    devices: usize,
    duration: Duration,
) -> (u64, Vec<Duration>) {
    let config = ClusterConfig {
        node: node.to_string(),
        advertise: format!("{node}:4433"),
        endpoints,
        lease_ttl_seconds: 10,
        request_timeout_ms: 2000,
        commit_batch_devices_max: 63,
        key_prefix: "/bench".to_string(),
    };
    let mut registry = EtcdRegistry::connect(&config).expect("joining");
    let _alive = registry.spawn_keep_alive();
    let tokens: Vec<(String, i64)> = (0..devices)
        .map(|index| {
            let device = format!("{node}-cam-{index:03}");
            match registry.claim(&device).expect("claim") {
                Claim::Owned { token } => (device, token),
                other => panic!("{other:?}"),
            }
        })
        .collect();
    let started = Instant::now();
    let mut commit_id = 0u64;
    let mut latencies = Vec::new();
    while started.elapsed() < duration {
        commit_id += 1;
        let batch: Vec<DeviceCommit> = tokens
            .iter()
            .map(|(device, token)| DeviceCommit {
                device: device.clone(),
                token: *token,
                record: DeviceRecord {
                    watermarks: BTreeMap::from([(0, commit_id), (2, commit_id * 10)]),
                    ring: Some(RingRecord { id: [1; 16], bases: BTreeMap::from([(0, 0), (2, 0)]) }),
                },
            })
            .collect();
        let sent = Instant::now();
        assert_eq!(registry.commit(commit_id, &batch).expect("commit"), CommitOutcome::Committed);
        latencies.push(sent.elapsed());
    }
    (commit_id, latencies)
}
