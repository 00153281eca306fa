//! Cluster failover with real processes: a 3-member etcd on loopback, sink node A (a child
//! process) in cluster mode takes an appliance's stream; A is SIGKILLed under load and node B
//! (another child, its own state and landing directories) starts on the same address. B refuses
//! the device until A's lease (2 s) expires, then owns it, resumes from the watermark A committed
//! through etcd, and takes the rest. Then A restarts (recovering its files to what etcd
//! accepted) and stops. Every record is in A's landing or B's, exactly once.
//!
//! Skips only when etcd is missing and CI is not `true`.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use appliance::Uplink;
use cluster::testing::{EtcdCluster, etcd_or_skip};
use protocol::Lane;
use support::harness::{
    Fleet, MIB, assert_landed_exactly_once, free_udp_port, landed_records, produce, record_key, wait_until,
};

const SINK_CHILD: &str = "TRIBUTARY_CLUSTER_SINK_CHILD";
const LIMIT: Duration = Duration::from_secs(120);

/// Runs a sink from a config file until killed.
#[test]
fn cluster_sink_child() {
    support::harness::run_sink_child(SINK_CHILD, "info");
}

/// A node's config: its own state and landing directories, the fleet's certificates.
fn write_node_config(fleet: &Fleet, node: &str, listen: SocketAddr, etcd: &EtcdCluster) -> PathBuf {
    let directory = fleet.path().join(node);
    std::fs::create_dir_all(&directory).unwrap();
    let root = fleet.path().display();
    let endpoints: Vec<String> = etcd.endpoints().iter().map(|endpoint| format!("\"{endpoint}\"")).collect();
    let text = format!(
        "listen = \"{listen}\"\nstate_dir = \"state\"\nlanding_dir = \"landing\"\nca_dir = \"{root}/ca\"\n\
         server_certificate_dir = \"{root}/server\"\nrevocation_file = \"{root}/ca/revoked.txt\"\n\
         commit_interval_ms = 20\n[transport]\nidle_timeout_ms = 3000\nkeep_alive_ms = 500\n\
         [cluster]\nnode = \"{node}\"\nadvertise = \"{listen}\"\nendpoints = [{}]\nlease_ttl_seconds = 2\n\
         request_timeout_ms = 800\nkey_prefix = \"/failover\"\n",
        endpoints.join(", ")
    );
    let path = directory.join("sink.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start_node(config: &Path) -> Child {
    let log = config.with_file_name("sink.log");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cluster_sink_child", "--nocapture", "--test-threads=1"])
        .env(SINK_CHILD, config)
        .env("TRIBUTARY_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("listening on") => break,
            Some(Ok(_)) => continue,
            _ => panic!(
                "sink node exited before listening; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    child
}

fn stop_node(mut child: Child, config: &Path) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the sink node stops cleanly on SIGTERM ({status}); its log:\n{}",
        std::fs::read_to_string(config.with_file_name("sink.log")).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_owner_moves_the_device_and_every_record_lands_once() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let fleet = Fleet::new();
    let listen = free_udp_port();
    let config_a = write_node_config(&fleet, "sink-a", listen, &etcd);
    let config_b = write_node_config(&fleet, "sink-b", listen, &etcd);
    let mut node_a = start_node(&config_a);

    let device = "cluster-cam";
    let ring = fleet.open_ring(device, 64 * MIB);
    let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config(device, listen)).unwrap();
    let metrics = uplink.metrics();
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = {
        let (ring, stop, produced) = (ring.clone(), stop.clone(), produced.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                let first = produced.load(Ordering::Relaxed);
                produce(&ring, device, Lane::Sensor, first, 500);
                produced.store(first + 500, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Node A owns the device and acks through etcd; then it dies mid-stream.
    assert!(wait_until(LIMIT, || metrics.acked_through(Lane::Sensor) >= 5).await, "node A acks");
    tokio::time::sleep(Duration::from_millis(300)).await;
    node_a.kill().unwrap(); // SIGKILL
    node_a.wait().unwrap();
    let acked_by_a = metrics.acked_through(Lane::Sensor);

    // Node B on the same address: refuses while A's lease lives, then takes over.
    let node_b = start_node(&config_b);
    assert!(
        wait_until(LIMIT, || metrics.acked_through(Lane::Sensor) > acked_by_a + 5).await,
        "node B takes the device over and acks; its log:\n{}",
        std::fs::read_to_string(config_b.with_file_name("sink.log")).unwrap_or_default()
    );
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let head = ring.stats().lane(Lane::Sensor).next_seq - 1;
    assert!(
        wait_until(LIMIT, || metrics.acked_through(Lane::Sensor) >= head).await,
        "drained through node B"
    );
    assert_eq!(ring.stats().lane(Lane::Sensor).evicted_chunks, 0);
    uplink.stop().await;
    stop_node(node_b, &config_b);

    // A comes back (another port): it settles its prepared commit point with etcd and truncates
    // its files to what etcd accepted, then stops.
    let config_a_again = write_node_config(&fleet, "sink-a", free_udp_port(), &etcd);
    assert_eq!(config_a_again, config_a);
    stop_node(start_node(&config_a), &config_a);

    let total = produced.load(Ordering::Relaxed);
    let mut landed = landed_records(&fleet.path().join("sink-a/landing"), device);
    let landed_b = landed_records(&fleet.path().join("sink-b/landing"), device);
    let from_a = landed.get(&Lane::Sensor).map_or(0, Vec::len);
    let from_b = landed_b.get(&Lane::Sensor).map_or(0, Vec::len);
    assert!(from_a > 0 && from_b > 0, "both nodes landed part of the stream ({from_a} and {from_b} records)");
    for (lane, records) in landed_b {
        landed.entry(lane).or_default().extend(records);
    }
    let expected: Vec<String> = (0..total).map(|index| record_key(device, Lane::Sensor, index)).collect();
    assert_landed_exactly_once(&landed, Lane::Sensor, &expected);
    eprintln!("failover: {from_a} records landed on node A, {from_b} on node B, {total} produced, each once");
}
