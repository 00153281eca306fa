//! Poison never wedges (issue 15): a chunk from an edge that skipped the key rule (an older or
//! hostile build) reaches the sink's datasets, is quarantined there with its reason, and every
//! record after it — media and sensor — is still published.
//!
//! Before the one key rule, a media record keyed `kamera-ü` was accepted, failed the WebDataset
//! writer (ustar names are ASCII), failed every target in turn, and from then on no media or sensor
//! shard was published while the pipeline logged an error every poll.

mod support;

use std::time::Duration;

use appliance::Uplink;
use core_sink::Sink;
use core_sink::datasets::DatasetsConfig;
use core_sink::datasets::manifest::Manifest;
use protocol::{Codec, Lane, NO_DICTIONARY, SealedChunk};
use support::harness::{Fleet, MIB, produce, produce_media, wait_drained};

const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// One record laid out as `protocol::record` specifies, with whatever key the caller likes.
fn raw_record(key: &str, content_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(key.len() as u16).to_le_bytes());
    bytes.extend_from_slice(key.as_bytes());
    bytes.extend_from_slice(&1_700_000_000_000_000u64.to_le_bytes());
    bytes.push(content_type.len() as u8);
    bytes.extend_from_slice(content_type.as_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A raw chunk of one record that `ChunkBuilder` would have refused.
fn poison_chunk(lane: Lane, key: &str, content_type: &str) -> SealedChunk {
    assert!(protocol::validate_key(key).is_err(), "the edge's builder refuses {key:?}");
    let body = raw_record(key, content_type, b"{\"temperature_c\": 21.5}");
    SealedChunk::new(lane, Codec::Raw, NO_DICTIONARY, 1, body.len() as u32, body).expect("a valid chunk")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_chunk_is_quarantined_and_everything_after_it_is_published() {
    let fleet = Fleet::new();
    let mut config = fleet.sink_config("127.0.0.1:0".parse().unwrap());
    let targets = vec![fleet.path().join("ost0"), fleet.path().join("ost1")];
    config.datasets = Some(DatasetsConfig::with_targets(targets, fleet.path().join("manifests")));
    let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
    let sink = Sink::start(config).await.unwrap();

    let device = "cam-poison";
    let ring = fleet.open_ring(device, 64 * MIB);
    let media_poison = ring.append(poison_chunk(Lane::Media, "kamera-\u{fc}", "image/jpeg")).unwrap();
    let sensor_poison = ring.append(poison_chunk(Lane::Sensor, "room 12", "application/json")).unwrap();
    let (media, sensor) = {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || {
            (produce_media(&ring, device, 0, 40), produce(&ring, device, Lane::Sensor, 0, 2_000))
        })
        .await
        .unwrap()
    };
    assert!(!sensor.is_empty());
    let uplink = Uplink::spawn(ring.clone(), fleet.uplink_config(device, sink.local_addr())).unwrap();
    let drained = wait_drained(&ring, &[Lane::Sensor, Lane::Media], DRAIN_LIMIT).await;
    assert!(drained, "the sink acked everything, the poison chunks included (the raw landing keeps them)");
    uplink.stop().await;
    let metrics = sink.dataset_metrics().unwrap();
    sink.shutdown().await; // publishes the open shards

    let manifest = |name: &str| {
        Manifest::read(&fleet.path().join(format!("manifests/{name}/manifest.json"))).unwrap().unwrap()
    };
    let (media_manifest, sensor_manifest) = (manifest("media"), manifest("sensor"));
    let samples = |manifest: &Manifest| manifest.shards.iter().map(|shard| shard.samples).sum::<u64>();
    assert_eq!(samples(&media_manifest), media.len() as u64, "every good media record is published");
    assert_eq!(samples(&sensor_manifest), 2_000, "every good sensor record is published");
    for (manifest, lane, seq, character) in [
        (&media_manifest, "media", media_poison, "'\u{fc}'"),
        (&sensor_manifest, "sensor", sensor_poison, "' '"),
    ] {
        assert_eq!(manifest.quarantined_total, 1, "{lane}");
        let listed = &manifest.quarantined[0];
        assert_eq!((listed.device.as_str(), listed.lane.as_str(), listed.seq), (device, lane, seq));
        assert!(listed.reason.contains(&format!("key contains {character}")), "{listed:?}");
    }
    assert_eq!(metrics.rejected_chunks.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(metrics.shard_failures.load(std::sync::atomic::Ordering::Relaxed), 0);
}
