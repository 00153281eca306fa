//! Rough numbers for the archive on this machine: ingest, flush, reopen, verify, show.
//!
//! `cargo run --release -p tributary-archive --example throughput -- [DECISIONS] [ORIGINAL_BYTES] [DIR]`

use std::time::Instant;

use archive::{Archive, ArchiveConfig};
use protocol::RecordRef;
use protocol::evidence::{
    Blob, Decision, EVIDENCE_CONTENT_TYPE, Evidence, MODEL_CONTENT_TYPE, ModelRecord, RequestMeta,
    model_record_key,
};

fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    let decisions: u32 = arguments.get(1).map_or(20_000, |text| text.parse().expect("DECISIONS"));
    let original_bytes: usize = arguments.get(2).map_or(4096, |text| text.parse().expect("ORIGINAL_BYTES"));
    let temporary = tempfile::tempdir().expect("temporary directory");
    let root = arguments.get(3).map_or(temporary.path().join("archive"), std::path::PathBuf::from);
    let config = ArchiveConfig {
        root: root.clone(),
        origin: "bench/archive".into(),
        checkpoint_every_entries: 1000,
        objects: archive::ObjectsConfig::local(),
    };

    let model = ModelRecord::new("bench", vec![7; 1 << 20]);
    let started = Instant::now();
    let mut archive = Archive::open(config.clone()).expect("open");
    let key = model_record_key(&model.model.sha256);
    let bytes = model.encode().expect("model");
    let record = RecordRef { key: &key, timestamp_us: 0, content_type: MODEL_CONTENT_TYPE, payload: &bytes };
    archive.ingest_record("bench-device", 1, 0, &record).expect("model");
    let mut payload_bytes = 0u64;
    for number in 0..decisions {
        let mut original = vec![0u8; original_bytes];
        original[..4].copy_from_slice(&number.to_le_bytes());
        let evidence = Evidence {
            decision: Decision {
                decision_id: format!("d-{number:08}"),
                decided_at_us: u64::from(number),
                model_name: "bench".into(),
                model_sha256: model.model.sha256,
                label: "class-3".into(),
                label_index: 3,
                score: 0.75,
                scores: (0..10).map(|class| class as f32 / 10.0).collect(),
                latency_us: 1500,
                request: RequestMeta { client: "10.1.2.3:4567".into(), request_id: None },
            },
            original: Blob::new("image/png", original),
            modified: None,
        };
        let bytes = evidence.encode().expect("evidence");
        payload_bytes += bytes.len() as u64;
        let record = RecordRef {
            key: &evidence.decision.decision_id,
            timestamp_us: 0,
            content_type: EVIDENCE_CONTENT_TYPE,
            payload: &bytes,
        };
        archive.ingest_record("bench-device", 2 + u64::from(number), 0, &record).expect("ingest");
    }
    archive.flush().expect("flush");
    let ingest = started.elapsed();
    drop(archive);
    let started = Instant::now();
    let archive = Archive::open(config).expect("reopen");
    let reopen = started.elapsed();
    drop(archive);
    let started = Instant::now();
    let report = archive::verify(&root).expect("verify");
    let verify = started.elapsed();
    let started = Instant::now();
    let view = archive::show(&root, &format!("d-{:08}", decisions / 2), None).expect("show");
    let show = started.elapsed();
    let entries_bytes = std::fs::metadata(archive::log::entries_path(&root)).expect("entries").len();
    println!(
        "{decisions} decisions of {original_bytes} B originals ({payload_bytes} B of records): ingest+flush {:.2} s \
         ({:.0} decisions/s), reopen {:.3} s, verify {:.2} s ({} entries, {} checkpoints, {} B hashed), \
         show {:.3} s (proof of {} hashes), entries file {} B ({} B/entry)",
        ingest.as_secs_f64(),
        f64::from(decisions) / ingest.as_secs_f64(),
        reopen.as_secs_f64(),
        verify.as_secs_f64(),
        report.entries,
        report.checkpoints,
        report.object_bytes_hashed,
        show.as_secs_f64(),
        view.inclusion_proof.map_or(0, |proof| proof.len()),
        entries_bytes,
        entries_bytes / report.entries
    );
}
