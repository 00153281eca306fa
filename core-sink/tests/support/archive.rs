//! Shared by the archive tests: evidence and model records, landing them on the audit lane as the
//! lander does, draining a feed, running the `core-sink` binary.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;

use core_sink::archive_feed::ArchiveFeed;
use core_sink::landing::{Committer, RawLanding};
use protocol::evidence::{
    Blob, Decision, EVIDENCE_CONTENT_TYPE, Evidence, MODEL_CONTENT_TYPE, ModelRecord, RequestMeta,
    model_record_key,
};
use protocol::{ChunkBuilder, ChunkCompressor, Lane, RecordRef};

pub const MIB: u64 = 1024 * 1024;
pub const RECORDS_PER_CHUNK: usize = 4;

pub fn model() -> ModelRecord {
    ModelRecord::new("shapes", vec![42; 10_000])
}

pub fn evidence(number: u32) -> Evidence {
    let score = (number % 10) as f32 / 10.0;
    Evidence {
        decision: Decision {
            decision_id: format!("d-{number:05}"),
            decided_at_us: 1_700_000_000_000_000 + u64::from(number) * 1_000_000,
            model_name: "shapes".into(),
            model_sha256: model().model.sha256,
            label: "square".into(),
            label_index: 0,
            score,
            scores: vec![score, 1.0 - score],
            latency_us: 800,
            request: RequestMeta::default(),
        },
        original: Blob::new("image/png", format!("png {number}").into_bytes()),
        modified: None,
    }
}

/// Lands, as the lander does, the model record (when `with_model`) and decisions `numbers` of
/// `device` on the audit lane, `RECORDS_PER_CHUNK` records per compressed chunk; commits and
/// returns the landing checkpoint.
pub fn land(
    landing: &mut RawLanding,
    device: &str,
    with_model: bool,
    numbers: std::ops::Range<u32>,
    seqs: &mut BTreeMap<String, u64>,
) -> Vec<u8> {
    let mut records: Vec<(String, &str, Vec<u8>)> = Vec::new();
    if with_model {
        let model = model();
        records.push((model_record_key(&model.model.sha256), MODEL_CONTENT_TYPE, model.encode().unwrap()));
    }
    for number in numbers {
        let evidence = evidence(number);
        records.push((
            evidence.decision.decision_id.clone(),
            EVIDENCE_CONTENT_TYPE,
            evidence.encode().unwrap(),
        ));
    }
    let mut compressor = ChunkCompressor::new(1);
    for chunk in records.chunks(RECORDS_PER_CHUNK) {
        let mut builder = ChunkBuilder::new(Lane::Audit, 1024 * 1024);
        for (key, content_type, payload) in chunk {
            builder.push(RecordRef { key, timestamp_us: 1, content_type, payload }).unwrap();
        }
        let seq = seqs.entry(device.to_string()).or_insert(0);
        *seq += 1;
        let encoded = builder.seal(&mut compressor, 0).unwrap().encode(*seq);
        let (header, _) = protocol::decode_chunk(&encoded).unwrap();
        landing.land(device, &header, &encoded).unwrap();
    }
    landing.commit().unwrap();
    landing.checkpoint()
}

pub fn drain(feed: &mut ArchiveFeed, checkpoint: &[u8]) {
    while feed.step(checkpoint).unwrap() {}
}

pub fn core_sink(arguments: &[&str]) -> (bool, String, String) {
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_core-sink")).args(arguments).output().unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.success(), text(output.stdout), text(output.stderr))
}
