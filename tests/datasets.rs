//! Appliance → sink → training datasets, read back by the stock Python readers (webdataset,
//! pyarrow) and by Rust: every sample exactly once, keys and payloads byte-identical, shards
//! striped over two targets, manifests matching the files.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use appliance::Uplink;
use core_sink::Sink;
use core_sink::datasets::manifest::Manifest;
use core_sink::datasets::{DatasetsConfig, Placement};
use protocol::Lane;
use sha2::Digest as _;
use support::harness::{
    Fleet, MIB, produce, produce_media, python_read, record_key, sensor_payload, wait_until,
};

const DRAIN_LIMIT: Duration = Duration::from_secs(300);

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_hold_every_sample_once_and_stock_readers_agree() {
    let fleet = Fleet::new();
    let mut config = fleet.sink_config("127.0.0.1:0".parse().unwrap());
    let targets = vec![fleet.path().join("ost0"), fleet.path().join("ost1")];
    let mut datasets = DatasetsConfig::with_targets(targets.clone(), fleet.path().join("manifests"));
    datasets.placement = Placement::RoundRobin;
    datasets.shard_bytes_max = 2 * MIB;
    datasets.parquet_row_group_rows = 1_000;
    config.datasets = Some(datasets);
    let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
    let sink = Sink::start(config).await.unwrap();
    let devices = ["cam-a", "cam-b"];
    let mut media: BTreeMap<String, String> = BTreeMap::new();
    for device in devices {
        let ring = fleet.open_ring(device, 64 * MIB);
        let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config(device, sink.local_addr())).unwrap();
        let produced = {
            let ring = ring.clone();
            tokio::task::spawn_blocking(move || {
                produce(&ring, device, Lane::Sensor, 0, 5_000);
                produce_media(&ring, device, 0, 150)
            })
            .await
            .unwrap()
        };
        for (key, digest) in produced {
            media.insert(format!("{device}/{key}"), digest);
        }
        let drained = wait_until(DRAIN_LIMIT, || {
            let stats = ring.stats();
            [Lane::Sensor, Lane::Media]
                .iter()
                .all(|lane| stats.lane(*lane).acked_through + 1 == stats.lane(*lane).next_seq)
        })
        .await;
        assert!(drained, "{device} drained");
        uplink.stop().await;
    }
    let metrics = sink.dataset_metrics().unwrap();
    sink.shutdown().await; // publishes the open shards

    // Manifests list existing, complete files; no in-progress file is left.
    let media_manifest =
        Manifest::read(&fleet.path().join("manifests/media/manifest.json")).unwrap().unwrap();
    let sensor_manifest =
        Manifest::read(&fleet.path().join("manifests/sensor/manifest.json")).unwrap().unwrap();
    for manifest in [&media_manifest, &sensor_manifest] {
        for shard in &manifest.shards {
            let bytes = std::fs::read(&shard.path).unwrap();
            assert_eq!(bytes.len() as u64, shard.bytes, "{}", shard.name);
            assert_eq!(sha256_hex(&bytes), shard.sha256, "{}", shard.name);
        }
    }
    for target in &targets {
        for dataset in ["media", "sensor"] {
            for entry in std::fs::read_dir(target.join(dataset)).into_iter().flatten() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                assert!(!name.starts_with('.'), "in-progress file left behind: {name}");
            }
        }
    }
    let used_targets: std::collections::BTreeSet<usize> =
        media_manifest.shards.iter().map(|shard| shard.target).collect();
    assert!(media_manifest.shards.len() >= 2 && used_targets.len() == 2, "media striped over both targets");
    let media_samples: u64 = media_manifest.shards.iter().map(|shard| shard.samples).sum();
    assert_eq!(media_samples, media.len() as u64);
    let sensor_samples: u64 = sensor_manifest.shards.iter().map(|shard| shard.samples).sum();
    assert_eq!(sensor_samples, 10_000);
    assert_eq!(metrics.undecodable_chunks.load(std::sync::atomic::Ordering::Relaxed), 0);

    // Rust reads the Parquet files back.
    let mut rows = Vec::new();
    for shard in &sensor_manifest.shards {
        rows.extend(core_sink::datasets::parquet::read_parquet_rows(&shard.path).unwrap());
    }
    let mut expected_rows: Vec<(String, String)> = devices
        .iter()
        .flat_map(|device| {
            (0..5_000).map(move |index| {
                (record_key(device, Lane::Sensor, index), sha256_hex(&sensor_payload(index)))
            })
        })
        .collect();
    expected_rows.sort();
    let mut actual_rows: Vec<(String, String)> =
        rows.iter().map(|row| (row.key.clone(), sha256_hex(&row.payload))).collect();
    actual_rows.sort();
    assert_eq!(actual_rows, expected_rows, "parquet rows equal what was sent, once each");

    // The stock Python readers see the same.
    let shards: Vec<_> = media_manifest.shards.iter().map(|shard| shard.path.clone()).collect();
    if let Some(samples) = python_read("webdataset", &shards) {
        let mut seen = BTreeMap::new();
        for sample in samples {
            let key = sample["key"].as_str().unwrap().to_string();
            let jpg = sample["files"]["jpg"].as_str().unwrap().to_string();
            assert!(sample["files"]["json"].is_string(), "{key} has its metadata");
            assert!(seen.insert(key.clone(), jpg).is_none(), "webdataset saw {key} twice");
        }
        assert_eq!(seen, media, "webdataset keys and payload sha256 equal what was sent");
    }
    let files: Vec<_> = sensor_manifest.shards.iter().map(|shard| shard.path.clone()).collect();
    if let Some(python_rows) = python_read("parquet", &files) {
        let mut python: Vec<(String, String)> = python_rows
            .iter()
            .map(|row| {
                (
                    row["key"].as_str().unwrap().to_string(),
                    row["payload_sha256"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        python.sort();
        assert_eq!(python, expected_rows, "pyarrow reads the same rows");
    }
}
