//! Appliance → sink → training datasets, read back by the stock Python readers (webdataset,
//! wids through the shard index, pyarrow over the date partitions, DuckDB's grouped aggregate)
//! and by Rust: every sample exactly once, keys and payloads byte-identical, shards
//! striped over two targets, manifests matching the files.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use appliance::Uplink;
use core_sink::Sink;
use core_sink::datasets::manifest::Manifest;
use core_sink::datasets::parquet::read_parquet_typed;
use core_sink::datasets::pipeline::SHARD_INDEX_FILE;
use core_sink::datasets::typed::{Cell, ColumnType};
use core_sink::datasets::{DatasetsConfig, Placement};
use protocol::Lane;
use sha2::Digest as _;
use support::harness::{
    Fleet, MIB, produce, produce_media, python_read, record_key, sensor_payload, wait_drained,
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
        let drained = wait_drained(&ring, &[Lane::Sensor, Lane::Media], DRAIN_LIMIT).await;
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

    // Typed columns in date partitions, as Rust, pyarrow and DuckDB see them.
    let sent: BTreeMap<String, serde_json::Value> = devices
        .iter()
        .flat_map(|device| {
            (0..5_000).map(move |index| {
                let payload: serde_json::Value = serde_json::from_slice(&sensor_payload(index)).unwrap();
                (record_key(device, Lane::Sensor, index), payload)
            })
        })
        .collect();
    for shard in &sensor_manifest.shards {
        assert_eq!(shard.relative_path, format!("sensor/date=2023-11-14/{}", shard.name));
        let columns: Vec<(&str, ColumnType)> =
            shard.columns.iter().map(|column| (column.name.as_str(), column.column_type)).collect();
        // Inferred: objects and arrays stay in the payload, `seq` is a fixed column's name.
        assert_eq!(
            columns,
            [
                ("celsius", ColumnType::Double),
                ("firmware", ColumnType::String),
                ("humidity", ColumnType::Double),
                ("note", ColumnType::String),
                ("sensor", ColumnType::String),
                ("site", ColumnType::String),
                ("status", ColumnType::String),
            ]
        );
        for (row, cells) in read_parquet_typed(&shard.path).unwrap().1 {
            let payload = &sent[&row.key];
            assert_eq!(cells["celsius"], Cell::Double(payload["celsius"].as_f64().unwrap()), "{}", row.key);
            assert_eq!(cells["sensor"], Cell::Text(payload["sensor"].as_str().unwrap().to_string()));
        }
    }
    let sensor_directories: Vec<PathBuf> = targets.iter().map(|target| target.join("sensor")).collect();
    if let Some(rows) = python_read("partitions", &sensor_directories) {
        let mut seen = BTreeMap::new();
        for row in rows {
            let key = row["key"].as_str().unwrap().to_string();
            assert_eq!(row["date"], "2023-11-14");
            let payload = &sent[&key];
            for field in ["celsius", "humidity", "sensor", "status"] {
                assert_eq!(row["typed"][field], payload[field], "{key}: {field}");
            }
            assert!(row["typed"].get("calibration").is_none(), "nested values get no column");
            assert!(seen.insert(key, row["device"].clone()).is_none(), "pyarrow saw a row twice");
        }
        assert_eq!(seen.len(), sent.len(), "pyarrow reads every row through the partitions");
    }
    let mut query_arguments = vec![PathBuf::from("celsius")];
    query_arguments.extend(sensor_directories.iter().cloned());
    if let Some(rows) = python_read("duckdb-average", &query_arguments) {
        let expected: Vec<(String, f64, u64)> = devices
            .iter()
            .map(|device| {
                let celsius: Vec<f64> = (0..5_000)
                    .map(|index| sent[&record_key(device, Lane::Sensor, index)]["celsius"].as_f64().unwrap())
                    .collect();
                (device.to_string(), celsius.iter().sum::<f64>() / celsius.len() as f64, 5_000)
            })
            .collect();
        assert_eq!(rows.len(), expected.len(), "{rows:?}");
        for (row, (device, average, count)) in rows.iter().zip(&expected) {
            assert_eq!(row["device"], *device);
            assert_eq!(row["rows"], *count);
            let seen = row["average"].as_f64().unwrap();
            assert!((seen - average).abs() < 1e-9, "{device}: DuckDB {seen}, sent {average}");
        }
    }

    // The wids shard index lists exactly the manifest's shards, and wids reads them through it.
    let index_path = fleet.path().join("manifests/media").join(SHARD_INDEX_FILE);
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    assert_eq!(index["__kind__"], "wids-shard-index-v1");
    assert_eq!(index["wids_version"], 1);
    let listed: Vec<(PathBuf, u64)> = index["shardlist"]
        .as_array()
        .unwrap()
        .iter()
        .map(|shard| {
            (
                index_path.parent().unwrap().join(shard["url"].as_str().unwrap()),
                shard["nsamples"].as_u64().unwrap(),
            )
        })
        .collect();
    let manifested: Vec<(PathBuf, u64)> =
        media_manifest.shards.iter().map(|shard| (shard.path.clone(), shard.samples)).collect();
    assert_eq!(listed.len(), manifested.len());
    for ((listed, listed_samples), (path, samples)) in listed.iter().zip(&manifested) {
        assert_eq!(listed.canonicalize().unwrap(), path.canonicalize().unwrap());
        assert_eq!(listed_samples, samples);
    }
    if let Some(samples) = python_read("wids", &[index_path]) {
        let mut seen = BTreeMap::new();
        for sample in samples {
            let key = sample["key"].as_str().unwrap().to_string();
            let jpg = sample["files"]["jpg"].as_str().unwrap().to_string();
            assert!(seen.insert(key.clone(), jpg).is_none(), "wids saw {key} twice");
        }
        assert_eq!(seen, media, "wids keys and payload sha256 equal what was sent");
    }
}
