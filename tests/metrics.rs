//! The sink's Prometheus endpoint, scraped over real TCP: the counters match what was sent.

mod support;

use std::io::{Read as _, Write as _};
use std::time::Duration;

use appliance::Uplink;
use core_sink::Sink;
use protocol::Lane;
use support::harness::{Fleet, MIB, produce, wait_until};

fn get(address: std::net::SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn value(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing from:\n{exposition}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent() {
    let fleet = Fleet::new();
    let mut config = fleet.sink_config("127.0.0.1:0".parse().unwrap());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let sink = Sink::start(config).await.unwrap();
    let address = sink.metrics_address().unwrap();
    let ring = fleet.open_ring("metered", 16 * MIB);
    let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config("metered", sink.local_addr())).unwrap();
    let seqs = {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || produce(&ring, "metered", Lane::Sensor, 0, 3_000)).await.unwrap()
    };
    let last = *seqs.last().unwrap();
    let metrics = uplink.metrics();
    assert!(wait_until(Duration::from_secs(120), || metrics.acked_through(Lane::Sensor) >= last).await);

    let response = tokio::task::spawn_blocking(move || get(address, "/metrics")).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(value(body, "tributary_sink_chunks_landed_total"), seqs.len() as u64);
    assert_eq!(value(body, "tributary_sink_duplicates_dropped_total"), 0);
    assert_eq!(value(body, "tributary_sink_connections_accepted_total"), 1);
    assert_eq!(value(body, "tributary_sink_sessions_active"), 1);
    assert!(value(body, "tributary_sink_acks_sent_total") >= 1);
    assert!(value(body, "tributary_sink_commits_total") >= 1);
    // Every landed chunk is timed once, at the commit that made it durable.
    assert_eq!(value(body, "tributary_sink_ack_latency_seconds_count"), seqs.len() as u64);
    assert_eq!(value(body, "tributary_sink_ack_latency_seconds_bucket{le=\"+Inf\"}"), seqs.len() as u64);
    // And on the appliance, from the send to the Ack (nothing was resent: one session).
    let sensor_acks = metrics.ack_latency[Lane::Sensor.index()].snapshot();
    assert_eq!(sensor_acks.count, seqs.len() as u64);
    assert!(sensor_acks.quantile_upper_bound_seconds(0.5).is_some_and(|seconds| seconds < 60.0));
    assert_eq!(value(body, "tributary_sink_in_flight_bytes"), 0, "everything was written");
    let missing = tokio::task::spawn_blocking(move || get(address, "/other")).await.unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    uplink.stop().await;
    sink.shutdown().await;
}
