//! End-to-end over real QUIC sockets on loopback: appliance ring → uplink → (chaos proxy) → core
//! sink → raw landing. Every record produced must land exactly once, in order per lane.

mod support;

use std::time::Duration;

use appliance::Uplink;
use chaos::{ChaosConfig, ChaosProxy};
use core_sink::{Sink, SinkMetrics};
use protocol::Lane;
use support::harness::{
    Fleet, MIB, assert_landed_exactly_once, landed_records, produce, record_key, wait_drained, wait_until,
};

/// Generous liveness bound for a drain; tests assert what landed, never how fast.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

fn keys(device: &str, lane: Lane, count: u64) -> Vec<String> {
    (0..count).map(|index| record_key(device, lane, index)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_link_delivers_every_record_exactly_once_in_order() {
    let fleet = Fleet::new();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let proxy = ChaosProxy::start(sink.local_addr(), ChaosConfig::lossy(7, 0.10)).await.unwrap();
    let device = "lossy-1";
    let ring = fleet.open_ring(device, 256 * MIB);
    let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config(device, proxy.local_addr())).unwrap();
    let producer = {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || {
            produce(&ring, device, Lane::Sensor, 0, 100_000);
            produce(&ring, device, Lane::Audit, 0, 2_000);
            produce(&ring, device, Lane::Media, 0, 1_000);
        })
    };
    producer.await.unwrap();
    let lanes = [Lane::Sensor, Lane::Audit, Lane::Media];
    assert!(wait_drained(&ring, &lanes, DRAIN_LIMIT).await, "drained: {:?}", ring.stats());
    uplink.stop().await;
    sink.shutdown().await;

    let landed = landed_records(&fleet.landing_dir(), device);
    assert_landed_exactly_once(&landed, Lane::Sensor, &keys(device, Lane::Sensor, 100_000));
    assert_landed_exactly_once(&landed, Lane::Audit, &keys(device, Lane::Audit, 2_000));
    assert_landed_exactly_once(&landed, Lane::Media, &keys(device, Lane::Media, 1_000));
    let stats = proxy.stats();
    assert!(stats.dropped > 100 && stats.reordered > 0, "the link really was lossy: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_longer_than_the_ring_applies_its_policy_then_resumes() {
    let fleet = Fleet::new();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let proxy = ChaosProxy::start(sink.local_addr(), ChaosConfig::clean(3)).await.unwrap();
    let device = "blackhole-1";
    // 8 MiB ring: the sensor lane holds about 7 MiB; the outage produces far more.
    let ring = fleet.open_ring(device, 8 * MIB);
    // Small QUIC windows, so that little of the outage hides in the uplink's send buffers.
    let mut config = fleet.uplink_config(device, proxy.local_addr());
    config.transport.send_window_bytes = 1024 * 1024;
    config.transport.stream_receive_window_bytes = 256 * 1024;
    config.transport.receive_window_bytes = 512 * 1024;
    let uplink = Uplink::spawn(ring.clone(), config).unwrap();
    {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || produce(&ring, device, Lane::Sensor, 0, 5_000)).await.unwrap();
    }
    assert!(wait_drained(&ring, &[Lane::Sensor], DRAIN_LIMIT).await);

    proxy.set_blackhole(true);
    // Incompressible-ish volume: distinct readings compress ~5x, so 400k records are ~25 MiB of
    // chunks, three times the ring.
    {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || produce(&ring, device, Lane::Sensor, 5_000, 400_000))
            .await
            .unwrap();
    }
    let during = ring.stats();
    assert!(during.lane(Lane::Sensor).evicted_chunks > 0, "drop_oldest applied and counted: {during:?}");
    assert_eq!(during.lane(Lane::Sensor).rejected_chunks, 0);
    // Hold the outage until the connection times out, so what sat in its buffers is gone too.
    let metrics = uplink.metrics();
    let ended = metrics.sessions_ended.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        wait_until(DRAIN_LIMIT, || metrics.sessions_ended.load(std::sync::atomic::Ordering::Relaxed) > ended)
            .await
    );
    proxy.set_blackhole(false);
    {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || produce(&ring, device, Lane::Sensor, 405_000, 1_000))
            .await
            .unwrap();
    }
    assert!(wait_drained(&ring, &[Lane::Sensor], DRAIN_LIMIT).await, "{:?}", ring.stats());
    let duplicates = SinkMetrics::get(&sink.metrics().duplicates_dropped);
    uplink.stop().await;
    sink.shutdown().await;

    // Exactly once for what survived: no duplicates, order kept, the first and last batches
    // complete, and the evicted middle accounted for by the ring's counter.
    let landed = landed_records(&fleet.landing_dir(), device);
    let records = &landed[&Lane::Sensor];
    let mut seen: Vec<&String> = records.iter().map(|(_, key)| key).collect();
    let before = seen.len();
    seen.dedup();
    assert_eq!(seen.len(), before, "no duplicates (sink dropped {duplicates} resent chunks)");
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "in order");
    let first: Vec<String> = (0..5_000).map(|index| record_key(device, Lane::Sensor, index)).collect();
    let last: Vec<String> = (405_000..406_000).map(|index| record_key(device, Lane::Sensor, index)).collect();
    assert!(first.iter().all(|key| seen.binary_search(&key).is_ok()), "the batch before the outage landed");
    assert!(last.iter().all(|key| seen.binary_search(&key).is_ok()), "the batch after the outage landed");
    assert!(seen.len() < 406_000, "some of the outage was evicted, as the policy says");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_appliances_land_exactly_once() {
    let fleet = Fleet::new();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let devices: Vec<String> = (0..50).map(|index| format!("fleet-{index:02}")).collect();
    let mut running = Vec::new();
    for device in &devices {
        let ring = fleet.open_ring(device, 16 * MIB);
        let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config(device, sink.local_addr())).unwrap();
        running.push((device.clone(), ring, uplink));
    }
    let producers: Vec<_> = running
        .iter()
        .map(|(device, ring, _)| {
            let (device, ring) = (device.clone(), ring.clone());
            tokio::task::spawn_blocking(move || {
                produce(&ring, &device, Lane::Sensor, 0, 2_000);
                produce(&ring, &device, Lane::Decisions, 0, 200);
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    for (device, ring, _) in &running {
        assert!(wait_drained(ring, &[Lane::Sensor, Lane::Decisions], DRAIN_LIMIT).await, "{device} drained");
    }
    for (_, _, uplink) in running {
        uplink.stop().await;
    }
    sink.shutdown().await;
    for device in &devices {
        let landed = landed_records(&fleet.landing_dir(), device);
        assert_landed_exactly_once(&landed, Lane::Sensor, &keys(device, Lane::Sensor, 2_000));
        assert_landed_exactly_once(&landed, Lane::Decisions, &keys(device, Lane::Decisions, 200));
    }
}
