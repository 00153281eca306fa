//! zstd dictionaries end to end: the chunker trains one from the first records, stores it
//! durably, the uplink sends it ahead of the first chunk naming it, the sink stores it durably
//! and decodes with it — across a sink restart, an appliance restart (the chunker resumes the
//! same dictionary, the new session sends it again) and a retraining after the data changed.
//! Every record lands once, byte-identical, and the datasets pipeline decodes every chunk.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::chunker::{Chunker, ChunkerConfig};
use appliance::dictionaries::DictionaryStore;
use appliance::{SourceRecord, Uplink};
use buffer::Ring;
use core_sink::Sink;
use core_sink::datasets::DatasetsConfig;
use protocol::Lane;
use support::harness::{Fleet, MIB, wait_until};

const LIMIT: Duration = Duration::from_secs(30);
const SOURCE: &str = "env-sensor";

fn reading(index: u64) -> SourceRecord {
    let payload = format!(
        "{{\"sensor\":\"env0\",\"temperature_c\":{:.2},\"humidity_pct\":{:.1},\"status\":\"ok\"}}",
        21.0 + (index % 50) as f64 * 0.03,
        40.0 + (index % 7) as f64
    );
    record(index, payload)
}

/// Records of another shape entirely: a dictionary trained on `reading` does not help them.
fn other_shape(index: u64) -> SourceRecord {
    let noise: String =
        (0..6).map(|step| format!("{:08x}", (index * 2_654_435_761 + step * 40_503) % 0xffff_ffff)).collect();
    record(index, format!("[\"vibration\",{index},\"{noise}\",\"{}\"]", noise.len()))
}

fn record(index: u64, payload: String) -> SourceRecord {
    SourceRecord {
        lane: Lane::Sensor,
        key: format!("reading-{index}"),
        timestamp_us: 1_700_000_000_000_000 + index,
        content_type: "application/json".into(),
        payload: payload.into_bytes(),
        tags: Default::default(),
    }
}

fn chunker(store: &Arc<DictionaryStore>) -> Chunker {
    let config = ChunkerConfig {
        chunk_raw_bytes: 4096,
        dictionary_bytes: 4096,
        dictionary_sample_records: 400,
        ..ChunkerConfig::default()
    };
    Chunker::new(SOURCE, Lane::Sensor, config, Some(store.clone()))
}

fn feed(chunker: &mut Chunker, ring: &Ring, records: impl Iterator<Item = SourceRecord>) {
    let now = Instant::now();
    for record in records {
        for chunk in chunker.push(&record, now).unwrap() {
            ring.append(chunk).unwrap();
        }
    }
    if let Some(chunk) = chunker.flush().unwrap() {
        ring.append(chunk).unwrap();
    }
}

async fn drained(ring: &Ring) -> bool {
    wait_until(LIMIT, || {
        let lane = ring.stats().lanes[Lane::Sensor.index()];
        lane.acked_through + 1 == lane.next_seq
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dictionaries_survive_retraining_and_restarts_of_both_ends() {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
    let fleet = Fleet::new();
    let listen = support::harness::free_udp_port();
    let mut sink_config = fleet.sink_config(listen);
    let mut datasets =
        DatasetsConfig::with_targets(vec![fleet.path().join("ost0")], fleet.path().join("manifests"));
    datasets.shard_age_max_ms = 200;
    sink_config.datasets = Some(datasets);
    let sink = Sink::start(sink_config.clone()).await.unwrap();
    let ring = fleet.open_ring("dict-dev", 64 * MIB);
    let store_dir = fleet.path().join("appliance-dictionaries");
    let store = Arc::new(DictionaryStore::open(&store_dir).unwrap());
    let uplink_config = {
        let mut config = fleet.uplink_config("dict-dev", listen);
        config.dictionaries = Some(store.clone());
        config
    };
    let uplink = Uplink::spawn(ring.clone(), uplink_config.clone()).unwrap();

    // Phase 1: the first records train a dictionary; later chunks use it.
    let mut first = chunker(&store);
    feed(&mut first, &ring, (0..3_000).map(reading));
    let first_dictionary = first.dictionary_id();
    assert_ne!(first_dictionary, protocol::NO_DICTIONARY, "a dictionary was trained");
    assert!(first.metrics().chunks_with_dictionary.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert!(drained(&ring).await, "phase 1 drained");
    assert_eq!(core_sink::SinkMetrics::get(&sink.metrics().dictionaries_stored), 1);

    // Phase 2: the sink restarts; the appliance restarts (new chunker, new uplink session).
    uplink.stop().await;
    sink.shutdown().await;
    // The old endpoint's socket closes once its last connection task ends.
    let mut restarted = None;
    for _ in 0..200 {
        match Sink::start(sink_config.clone()).await {
            Ok(sink) => {
                restarted = Some(sink);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let sink = restarted.expect("the sink restarts on its port");
    drop(first);
    let store = Arc::new(DictionaryStore::open(&store_dir).unwrap());
    let mut resumed = chunker(&store);
    assert_eq!(resumed.dictionary_id(), first_dictionary, "a restarted chunker resumes its dictionary");
    let uplink = Uplink::spawn(ring.clone(), {
        let mut config = uplink_config.clone();
        config.dictionaries = Some(store.clone());
        config
    })
    .unwrap();
    feed(&mut resumed, &ring, (3_000..4_000).map(reading));
    assert!(drained(&ring).await, "phase 2 drained");
    assert!(
        uplink.metrics().dictionaries_sent.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "resent per session"
    );

    // Phase 3: the data changes shape; the ratio degrades and a new dictionary is trained.
    feed(&mut resumed, &ring, (4_000..8_000).map(other_shape));
    let retrained = resumed.dictionary_id();
    assert_ne!(retrained, first_dictionary, "the chunker retrained");
    assert_ne!(retrained, protocol::NO_DICTIONARY);
    assert!(drained(&ring).await, "phase 3 drained");
    assert_eq!(core_sink::SinkMetrics::get(&sink.metrics().dictionaries_stored), 1, "only the new one");

    // Everything landed once, byte-identical, decodable with the sink's own dictionaries.
    let landed = support::harness::landed_payloads(&fleet.landing_dir(), "dict-dev");
    let sensor = &landed[&Lane::Sensor];
    assert_eq!(sensor.len(), 8_000);
    for (index, (key, payload)) in sensor.iter().enumerate() {
        let expected = if index < 4_000 { reading(index as u64) } else { other_shape(index as u64) };
        assert_eq!((key, payload), (&expected.key, &expected.payload));
    }
    // Counters restart with the sink; the manifest holds both sinks' shards.
    let datasets = sink.dataset_metrics().unwrap();
    let manifest_path = fleet.path().join("manifests/sensor/manifest.json");
    let published_rows = || {
        core_sink::datasets::manifest::Manifest::read(&manifest_path)
            .ok()
            .flatten()
            .map_or(0, |manifest| manifest.shards.iter().map(|shard| shard.samples).sum::<u64>())
    };
    let published = wait_until(LIMIT, || published_rows() >= 8_000).await;
    assert!(
        published,
        "datasets published {} readings, {} undecodable chunks, {} rejected",
        published_rows(),
        datasets.undecodable_chunks.load(std::sync::atomic::Ordering::Relaxed),
        datasets.rejected_chunks.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(published_rows(), 8_000, "each reading exactly once");
    assert_eq!(datasets.undecodable_chunks.load(std::sync::atomic::Ordering::Relaxed), 0);
    uplink.stop().await;
    sink.shutdown().await;
}
