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

/// The value of the series `name` (a whole line's name, labels included) as a counter.
fn value(exposition: &str, name: &str) -> u64 {
    sample(exposition, name)
}

/// The value of the series `name` (a whole line's name, labels included) as a `T`.
fn sample<T: std::str::FromStr<Err: std::fmt::Debug>>(exposition: &str, name: &str) -> T {
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

/// A sink whose replicator runs in adaptive mode with an ingest latency threshold of `target_ms`
/// (no sources: the budget is what is observed), fed by one appliance until `done` holds for a
/// scrape taken while chunks are acked (or 60 s pass); returns that scrape's body.
async fn adaptive_replication_under_ingest(target_ms: u64, done: fn(&str) -> bool) -> String {
    let fleet = Fleet::new();
    let mut config = fleet.sink_config("127.0.0.1:0".parse().unwrap());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let replica = fleet.path().join("replica");
    std::fs::create_dir_all(&replica).unwrap();
    let mut replication = core_sink::replication::ReplicationConfig::directory("site-b", &replica);
    replication.adaptive = true;
    replication.bytes_per_second_max = 64 * MIB;
    replication.bytes_per_second_min = Some(MIB);
    replication.ingest_latency_target_ms = Some(target_ms);
    replication.adaptive_interval_ms = 50;
    replication.pass_interval_ms = 50;
    config.replication = Some(replication);
    let sink = Sink::start(config).await.unwrap();
    let address = sink.metrics_address().unwrap();
    let scrape = move || async move {
        let response = tokio::task::spawn_blocking(move || get(address, "/metrics")).await.unwrap();
        response.split("\r\n\r\n").nth(1).unwrap().to_string()
    };
    // Idle ingest is healthy: the budget climbs from the floor to the max first.
    let at_max = format!("tributary_replication_budget_bytes_per_second {}", 64 * MIB);
    let mut body = String::new();
    for _ in 0..600 {
        body = scrape().await;
        if body.lines().any(|line| line == at_max) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.lines().any(|line| line == at_max), "{body}");
    let ring = fleet.open_ring("busy", 64 * MIB);
    let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config("busy", sink.local_addr())).unwrap();
    let metrics = uplink.metrics();
    let mut first = 0;
    // A bound for a failing run only; what is asserted is what the endpoint says.
    for _ in 0..120 {
        let seqs = {
            let ring = ring.clone();
            tokio::task::spawn_blocking(move || produce(&ring, "busy", Lane::Sensor, first, 500))
                .await
                .unwrap()
        };
        first += 500;
        let last = *seqs.last().unwrap();
        assert!(wait_until(Duration::from_secs(60), || metrics.acked_through(Lane::Sensor) >= last).await);
        body = scrape().await;
        if done(&body) {
            break;
        }
    }
    uplink.stop().await;
    sink.shutdown().await;
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_replication_backs_off_while_ingest_latency_is_above_its_target() {
    // Every ack waits for a commit point (20 ms apart), so a 1 ms target is always exceeded.
    let body = adaptive_replication_under_ingest(1, |body| {
        value(body, "tributary_replication_budget_cuts_total") >= 2
            && value(body, "tributary_replication_budget_bytes_per_second") < 64 * MIB
    })
    .await;
    assert!(value(&body, "tributary_replication_budget_cuts_total") >= 2, "{body}");
    assert!(value(&body, "tributary_replication_budget_bytes_per_second") < 64 * MIB, "{body}");
    assert!(value(&body, "tributary_replication_budget_bytes_per_second") >= MIB, "never below the floor");
    assert_eq!(sample::<f64>(&body, "tributary_replication_ingest_latency_threshold_seconds"), 0.001);
    assert!(sample::<f64>(&body, "tributary_replication_ingest_latency_seconds") > 0.001, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_replication_keeps_its_budget_while_ingest_latency_is_under_its_target() {
    // The same load against a 60 s target: never exceeded, so never cut.
    let body = adaptive_replication_under_ingest(60_000, |body| {
        sample::<f64>(body, "tributary_replication_ingest_latency_seconds") > 0.0
    })
    .await;
    assert!(sample::<f64>(&body, "tributary_replication_ingest_latency_seconds") > 0.0, "{body}");
    assert_eq!(value(&body, "tributary_replication_budget_cuts_total"), 0, "{body}");
    assert_eq!(value(&body, "tributary_replication_budget_bytes_per_second"), 64 * MIB, "{body}");
}
