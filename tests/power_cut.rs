//! Power cuts in the ring's `Periodic` durability mode, end to end over QUIC on loopback: a
//! producer appends while the uplink streams to a real sink (through the chaos proxy, clean); at
//! seeded random moments the power is cut — in one instant the proxy drops everything and the
//! ring's `data.mdb` stops following its fsyncs (`buffer::power_cut`) — then the producer and
//! uplink are stopped, the ring goes back to its last fsync, is reopened and everything restarts. Every record whose append survived in the ring lands exactly
//! once; records of appends lost to a cut (never fsynced: the documented loss window of periodic
//! mode) never land, because the ring serves only fsynced chunks; the ring is never behind the
//! sink, so it never renews its identity.
//!
//! `TRIBUTARY_POWER_CUTS` sets the number of cuts (default 4); `TRIBUTARY_LOG` the log filter.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use appliance::Uplink;
use buffer::power_cut::PowerCut;
use buffer::{Durability, Ring, RingConfig, RingError};
use chaos::{ChaosConfig, ChaosProxy};
use core_sink::{Sink, SinkMetrics};
use protocol::{ChunkBuilder, ChunkCompressor, Lane, RecordRef};
use rand::{Rng as _, SeedableRng as _};
use support::harness::{
    Fleet, MIB, assert_landed_exactly_once, landed_records, record_key, sensor_payload, wait_drained,
};

const DEVICE: &str = "power-cut-1";
const SEED: u64 = 0x0BAD_F00D;
/// Two lanes, so that each keeps its own synced seq.
const LANES: [Lane; 2] = [Lane::Audit, Lane::Sensor];
const SYNC_INTERVAL_MS: u64 = 100;
/// Small chunks, a few milliseconds apart: a sync interval holds dozens of them, so a cut almost
/// always finds appends that were committed but not fsynced.
const RECORDS_PER_CHUNK: u64 = 20;
const PRODUCE_PAUSE: Duration = Duration::from_millis(2);
/// How long each epoch runs before its cut: a few sync intervals, at a random moment among them.
const EPOCH_MS: std::ops::Range<u64> = 300..900;
/// Generous liveness bounds; the test asserts what landed, never how fast.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

fn cuts() -> usize {
    std::env::var("TRIBUTARY_POWER_CUTS").ok().and_then(|value| value.parse().ok()).unwrap_or(4)
}

/// One append the producer saw return: the chunk `seq` of `lane` holds records `first..first+count`.
#[derive(Clone, Copy, Debug)]
struct Appended {
    lane: Lane,
    seq: u64,
    first: u64,
    count: u64,
}

impl Appended {
    fn keys(&self) -> impl Iterator<Item = String> + '_ {
        (self.first..self.first + self.count).map(|index| record_key(DEVICE, self.lane, index))
    }
}

/// A producer thread appending chunks of records with unique keys until stopped.
struct Producer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<Appended>, [u64; Lane::COUNT])>,
}

impl Producer {
    /// Record indexes continue from `next_index`, so keys stay unique across cuts.
    fn start(ring: Ring, mut next_index: [u64; Lane::COUNT]) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut appended = Vec::new();
            let mut compressor = ChunkCompressor::new(1);
            while !stopping.load(Ordering::Relaxed) {
                for lane in LANES {
                    let first = next_index[lane.index()];
                    next_index[lane.index()] += RECORDS_PER_CHUNK;
                    let mut builder = ChunkBuilder::new(lane, 64 * 1024);
                    for index in first..first + RECORDS_PER_CHUNK {
                        let key = record_key(DEVICE, lane, index);
                        let payload = sensor_payload(index);
                        let record = RecordRef {
                            key: &key,
                            timestamp_us: 1_700_000_000_000_000 + index,
                            content_type: "application/json",
                            payload: &payload,
                        };
                        builder.push(record).expect("valid record");
                    }
                    let mut chunk = builder.seal(&mut compressor, 0).expect("seal");
                    // The audit lane blocks when its reservation is full; wait for acks. A chunk
                    // still refused when the producer stops was never appended: its keys are
                    // expected nowhere.
                    let seq = loop {
                        match ring.append(chunk) {
                            Ok(seq) => break Some(seq),
                            Err(refused) if matches!(refused.error, RingError::Backpressure { .. }) => {
                                if stopping.load(Ordering::Relaxed) {
                                    break None;
                                }
                                chunk = refused.chunk.expect("a refused chunk is handed back");
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            Err(refused) => panic!("append {lane}: {refused}"),
                        }
                    };
                    if let Some(seq) = seq {
                        appended.push(Appended { lane, seq, first, count: RECORDS_PER_CHUNK });
                    }
                }
                std::thread::sleep(PRODUCE_PAUSE);
            }
            (appended, next_index)
        });
        Producer { stop, thread }
    }

    async fn stop(self) -> (Vec<Appended>, [u64; Lane::COUNT]) {
        self.stop.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || self.thread.join().expect("producer panicked")).await.unwrap()
    }
}

fn ring_config(power_cut: &PowerCut) -> RingConfig {
    let mut config = RingConfig::with_capacity(64 * MIB);
    config.durability = Durability::Periodic { sync_interval_ms: SYNC_INTERVAL_MS };
    config.sync_observer = Some(power_cut.observer());
    config
}

/// Waits until no handle of the ring at `path` is left in this process (the uplink's blocking
/// reads may still hold a clone for a moment after it stopped): heed refuses a second open of a
/// path that is open, so a probe open that succeeds means every handle is gone.
async fn wait_until_closed(path: &Path) {
    let mut probe_config = RingConfig::with_capacity(64 * MIB);
    probe_config.durability = Durability::Periodic { sync_interval_ms: SYNC_INTERVAL_MS };
    let deadline = tokio::time::Instant::now() + CLOSE_LIMIT;
    loop {
        match Ring::open(path, probe_config.clone()) {
            Ok(probe) => {
                let closing = tokio::task::spawn_blocking(move || drop(probe));
                closing.await.unwrap();
                return;
            }
            Err(RingError::AlreadyOpen { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("the ring did not close: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_only_unsynced_appends_and_never_land_a_record_twice() {
    testkit::init_tracing();
    let fleet = Fleet::new();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    // The appliance's network: a blackhole cuts it in one instant, as a power cut would. (Stopping
    // the uplink takes as long as its endpoint drains, while the ring keeps syncing.)
    let network = ChaosProxy::start(sink.local_addr(), ChaosConfig::clean(SEED)).await.unwrap();
    let path = fleet.ring_path(DEVICE);
    let power = PowerCut::new(fleet.path().join("snapshot"));
    let config = ring_config(&power);
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);

    let mut ring = Ring::open(&path, config.clone()).unwrap();
    let identity = ring.identity();
    let mut survived: Vec<Appended> = Vec::new();
    let mut lost: Vec<Appended> = Vec::new();
    let mut next_index = [0u64; Lane::COUNT];
    // Per cut and lane, a ring that came back behind the sink: asserted after the summary below.
    let mut behind = Vec::new();
    let cuts = cuts();
    for cut in 0..cuts {
        let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config(DEVICE, network.local_addr())).unwrap();
        let producer = Producer::start(ring.clone(), next_index);
        tokio::time::sleep(Duration::from_millis(rng.random_range(EPOCH_MS))).await;

        // The power goes: nothing leaves the appliance from here on, and nothing more reaches its
        // disk. Whatever reached the sink was read before, so fsynced and snapshotted before.
        network.set_blackhole(true);
        // Taken before the snapshot freezes: the synced seqs it shows are in the snapshot (the
        // observer copies before the writer publishes them).
        let before = ring.stats();
        power.cut();
        uplink.stop().await;
        let (appended, next) = producer.stop().await;
        next_index = next;
        drop(ring);
        wait_until_closed(&path).await;
        power.restore(&path);
        ring = Ring::open(&path, config.clone()).unwrap();
        network.set_blackhole(false);

        let after = ring.stats();
        let mut lost_here = BTreeMap::new();
        for append in appended {
            if append.seq < after.lane(append.lane).next_seq {
                survived.push(append);
            } else {
                *lost_here.entry(append.lane).or_insert(0u64) += 1;
                lost.push(append);
            }
        }
        for lane in LANES {
            let (before, after) = (before.lane(lane), after.lane(lane));
            let sink_holds = sink.durable_through(DEVICE, lane);
            eprintln!(
                "cut {cut}: {lane} next seq {} (synced {}) at the cut, {} after; {} chunks lost; sink \
                 holds through {sink_holds}",
                before.next_seq,
                before.synced_next_seq,
                after.next_seq,
                lost_here.get(&lane).copied().unwrap_or(0)
            );
            // What reads could serve at the cut was fsynced, so it survived it.
            assert!(
                after.next_seq >= before.synced_next_seq,
                "cut {cut}: {lane}: came back at {} below its synced next seq {}",
                after.next_seq,
                before.synced_next_seq
            );
            if after.next_seq <= sink_holds {
                behind.push(format!(
                    "cut {cut}: {lane} next seq {}, sink through {sink_holds}",
                    after.next_seq
                ));
            }
        }
    }

    // The last epoch runs without a cut and drains.
    let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config(DEVICE, network.local_addr())).unwrap();
    let producer = Producer::start(ring.clone(), next_index);
    tokio::time::sleep(Duration::from_millis(rng.random_range(EPOCH_MS))).await;
    let (appended, _) = producer.stop().await;
    survived.extend(appended);
    let drained = wait_drained(&ring, &LANES, DRAIN_LIMIT).await;
    let duplicates_dropped = SinkMetrics::get(&sink.metrics().duplicates_dropped);
    uplink.stop().await;
    sink.shutdown().await;
    let final_identity = ring.identity();
    let stats = ring.stats();
    drop(ring);

    let landed = landed_records(&fleet.landing_dir(), DEVICE);
    let expected: BTreeSet<String> = survived.iter().flat_map(Appended::keys).collect();
    let lost_keys: BTreeSet<String> = lost.iter().flat_map(Appended::keys).collect();
    let mut landed_count: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, key) in landed.values().flatten() {
        *landed_count.entry(key.as_str()).or_default() += 1;
    }
    let twice: Vec<&str> =
        landed_count.iter().filter(|(_, count)| **count > 1).map(|(key, _)| *key).collect();
    let lost_but_landed: Vec<&str> =
        landed_count.keys().copied().filter(|key| lost_keys.contains(*key)).collect();
    let missing: Vec<&String> =
        expected.iter().filter(|key| !landed_count.contains_key(key.as_str())).collect();
    eprintln!(
        "{cuts} cuts, {} snapshots: {} chunks survived ({} records), {} chunks lost to cuts ({} records); \
         landed {} records: {} twice, {} of lost appends, {} survived records missing; the sink dropped \
         {duplicates_dropped} duplicate chunks",
        power.snapshots(),
        survived.len(),
        expected.len(),
        lost.len(),
        lost_keys.len(),
        landed_count.values().sum::<u64>(),
        twice.len(),
        lost_but_landed.len(),
        missing.len(),
    );
    assert!(drained, "the sink acked everything the ring holds: {stats:?}");
    assert!(!lost.is_empty(), "no cut found an unsynced append: the test exercised nothing");
    assert!(
        behind.is_empty(),
        "the ring came back behind the sink (chunks left it before they were fsynced): {behind:#?}"
    );
    assert_eq!(final_identity, identity, "the ring renewed its identity: it was behind the sink after a cut");
    assert!(
        twice.is_empty(),
        "{} records landed twice, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    assert!(
        lost_but_landed.is_empty(),
        "{} records of appends lost to a cut landed (they left the ring unsynced), e.g. {:?}",
        lost_but_landed.len(),
        &lost_but_landed[..lost_but_landed.len().min(5)]
    );
    assert!(
        missing.is_empty(),
        "{} records that survived in the ring never landed, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // And in order, per lane, exactly the surviving records.
    for lane in LANES {
        // Keys are zero-padded indexes: string order is production order.
        let mut keys: Vec<String> =
            survived.iter().filter(|append| append.lane == lane).flat_map(Appended::keys).collect();
        keys.sort();
        assert_landed_exactly_once(&landed, lane, &keys);
    }
}
