//! The archive end to end on real files: ingest, idempotence, crash recovery, every tamper case
//! named by `verify`, evidence bundles, hostile bytes.

use std::fs;
use std::path::{Path, PathBuf};

use archive::audit::VerifyError;
use archive::frame::{FRAME_HEADER_BYTES, MAGIC_BYTES};
use archive::log::{INDEX_RECORD_BYTES, checkpoints_path, entries_path, index_path};
use archive::objects::object_path;
use archive::{Archive, ArchiveConfig, ArchiveError, IngestOutcome};
use protocol::RecordRef;
use protocol::evidence::{
    Blob, Decision, EVIDENCE_CONTENT_TYPE, Evidence, MODEL_CONTENT_TYPE, ModelRecord, RequestMeta,
    model_record_key, sha256,
};

const ORIGIN: &str = "tributary.test/archive";

fn config(root: &Path, checkpoint_every_entries: u64) -> ArchiveConfig {
    ArchiveConfig {
        root: root.to_path_buf(),
        origin: ORIGIN.into(),
        checkpoint_every_entries,
        objects: archive::ObjectsConfig::local(),
    }
}

fn model() -> ModelRecord {
    ModelRecord::new("shapes", (0..5000u32).map(|index| (index * 7) as u8).collect())
}

fn evidence(number: u32) -> Evidence {
    let score = (number % 10) as f32 / 10.0;
    Evidence {
        decision: Decision {
            decision_id: format!("d-{number:04}"),
            decided_at_us: 1_700_000_000_000_000 + u64::from(number),
            model_name: "shapes".into(),
            model_sha256: model().model.sha256,
            label: "circle".into(),
            label_index: 1,
            score,
            scores: vec![1.0 - score, score],
            latency_us: 900,
            request: RequestMeta { client: "10.0.0.1:1234".into(), request_id: Some(format!("r{number}")) },
        },
        original: Blob::new("image/png", format!("png bytes of decision {number}").into_bytes()),
        modified: number
            .is_multiple_of(2)
            .then(|| Blob::new("application/x-tensor-f32", vec![number as u8; 64])),
    }
}

/// The model, then decisions `first..first + count`, each record `index` of chunk `seq = number`.
fn ingest(archive: &mut Archive, device: &str, first: u32, count: u32) -> Vec<IngestOutcome> {
    try_ingest(archive, device, first, count).into_iter().map(Result::unwrap).collect()
}

fn try_ingest(
    archive: &mut Archive,
    device: &str,
    first: u32,
    count: u32,
) -> Vec<Result<IngestOutcome, ArchiveError>> {
    let model = model();
    let model_bytes = model.encode().unwrap();
    let model_key = model_record_key(&model.model.sha256);
    let mut outcomes = Vec::new();
    let record = RecordRef {
        key: &model_key,
        timestamp_us: 1,
        content_type: MODEL_CONTENT_TYPE,
        payload: &model_bytes,
    };
    outcomes.push(archive.ingest_record(device, 1, 0, &record).map(|ingested| ingested.outcome));
    for number in first..first + count {
        outcomes.push(try_ingest_evidence(archive, device, u64::from(number) + 2, number));
    }
    outcomes
}

/// Ingests the evidence of decision `number` as the record at `seq`.
fn try_ingest_evidence(
    archive: &mut Archive,
    device: &str,
    seq: u64,
    number: u32,
) -> Result<IngestOutcome, ArchiveError> {
    let evidence = evidence(number);
    let bytes = evidence.encode().unwrap();
    let record = RecordRef {
        key: &evidence.decision.decision_id,
        timestamp_us: 2,
        content_type: EVIDENCE_CONTENT_TYPE,
        payload: &bytes,
    };
    archive.ingest_record(device, seq, 0, &record).map(|ingested| ingested.outcome)
}

/// An archive with a model and 12 decisions of one device, checkpoints every 5 entries.
fn populated(root: &Path) -> Archive {
    let mut archive = Archive::open(config(root, 5)).unwrap();
    ingest(&mut archive, "cam-01", 0, 12);
    archive.flush().unwrap();
    archive
}

#[test]
fn ingests_once_and_verifies() {
    let directory = tempfile::tempdir().unwrap();
    let mut archive = populated(directory.path());
    assert_eq!(archive.entries(), 13);
    assert_eq!(archive.checkpoints(), 3, "checkpoints at 5, 10 and 13 entries");
    // The same records again, before and after a reopen: nothing is appended.
    let again = ingest(&mut archive, "cam-01", 0, 12);
    assert!(again.iter().all(|outcome| matches!(outcome, IngestOutcome::Duplicate { .. })));
    drop(archive);
    let mut archive = Archive::open(config(directory.path(), 5)).unwrap();
    let again = ingest(&mut archive, "cam-01", 0, 12);
    assert_eq!(again[3], IngestOutcome::Duplicate { entry_index: 3 });
    // The same decision ids from another device are other decisions.
    let other = ingest(&mut archive, "cam-02", 0, 2);
    assert_eq!(other[1], IngestOutcome::Appended { entry_index: 14 });
    archive.flush().unwrap();

    let report = archive::verify(directory.path()).unwrap();
    assert_eq!((report.entries, report.decisions, report.models), (16, 14, 2));
    assert_eq!(
        (report.checkpoints, report.latest_checkpoint_tree_size, report.entries_after_latest_checkpoint),
        (4, 16, 0)
    );
    // One model, 12 originals, 6 modified inputs (identical for both devices).
    assert_eq!(report.objects_checked, 19);

    let view = archive::show(directory.path(), "d-0003", Some("cam-01")).unwrap();
    assert_eq!((view.entry_index, view.lane_seq, view.decision.score), (4, 5, 0.3));
    assert_eq!(view.checkpoint_tree_size, Some(16));
    assert!(view.objects.iter().all(|object| Path::new(&object.location).exists()));
    assert!(matches!(
        archive::show(directory.path(), "d-0001", None),
        Err(archive::AuditError::Ambiguous { devices, .. }) if devices == ["cam-01", "cam-02"]
    ));
    assert!(matches!(
        archive::show(directory.path(), "d-9999", None),
        Err(archive::AuditError::NotFound { .. })
    ));

    let review = archive::review_list(directory.path(), 0.25).unwrap();
    let reviewed: Vec<(&str, &str)> =
        review.iter().map(|item| (item.device.as_str(), item.decision_id.as_str())).collect();
    assert_eq!(
        reviewed,
        [
            ("cam-01", "d-0000"),
            ("cam-01", "d-0001"),
            ("cam-01", "d-0002"),
            ("cam-01", "d-0010"),
            ("cam-01", "d-0011"),
            ("cam-02", "d-0000"),
            ("cam-02", "d-0001")
        ]
    );
}

#[test]
fn refuses_records_it_cannot_archive_and_a_second_writer() {
    let directory = tempfile::tempdir().unwrap();
    let mut archive = Archive::open(config(directory.path(), 5)).unwrap();
    let evidence = evidence(1).encode().unwrap();
    let check = |archive: &mut Archive, device: &str, key: &str, content_type: &str, payload: &[u8]| {
        let record = RecordRef { key, timestamp_us: 0, content_type, payload };
        let result = archive.ingest_record(device, 1, 0, &record);
        assert!(
            matches!(result, Err(ArchiveError::Rejected { .. })),
            "{device} {key} {content_type}: {result:?}"
        );
    };
    check(&mut archive, "cam-01", "d-0001", "image/png", &evidence);
    check(&mut archive, "cam-01", "d-other", EVIDENCE_CONTENT_TYPE, &evidence);
    check(&mut archive, "cam/01", "d-0001", EVIDENCE_CONTENT_TYPE, &evidence);
    check(&mut archive, "cam-01", "d-0001", EVIDENCE_CONTENT_TYPE, &evidence[..evidence.len() - 1]);
    check(&mut archive, "cam-01", "model-0", MODEL_CONTENT_TYPE, &model().encode().unwrap());
    assert_eq!(archive.entries(), 0);
    assert!(matches!(Archive::open(config(directory.path(), 5)), Err(ArchiveError::Locked { .. })));
    drop(archive);
    // The origin names the signing key in every checkpoint: it cannot change.
    let mut renamed = config(directory.path(), 5);
    renamed.origin = "tributary.test/other".into();
    assert!(
        matches!(Archive::open(renamed), Err(ArchiveError::Key(message)) if message.contains("cannot change"))
    );
    Archive::open(config(directory.path(), 5)).unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

/// (offset, length) of every entry frame, from the index.
fn frames(root: &Path) -> Vec<(u64, u64)> {
    let (records, _) = archive::log::read_index(root).unwrap();
    records
        .iter()
        .map(|record| (record.offset, FRAME_HEADER_BYTES as u64 + u64::from(record.length)))
        .collect()
}

fn remove_range(path: &Path, offset: u64, length: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes.drain(offset as usize..(offset + length) as usize);
    fs::write(path, bytes).unwrap();
}

/// Offset of the signature line's base64 inside checkpoint `number` (1-based) of the file.
fn checkpoint_signature_offset(root: &Path, number: usize) -> u64 {
    let bytes = fs::read(checkpoints_path(root)).unwrap();
    let mut offset = MAGIC_BYTES;
    for _ in 1..number {
        offset +=
            FRAME_HEADER_BYTES + u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
    }
    let length = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
    let note = &bytes[offset + FRAME_HEADER_BYTES..offset + FRAME_HEADER_BYTES + length];
    // A few characters into the base64 of the signature, past the key id.
    (offset + FRAME_HEADER_BYTES + note.len() - 20) as u64
}

/// Rewrites the checksum of checkpoint `number` so that only its signature can catch a change.
fn fix_checkpoint_checksum(root: &Path, number: usize) {
    let path = checkpoints_path(root);
    let mut bytes = fs::read(&path).unwrap();
    let mut offset = MAGIC_BYTES;
    for _ in 1..number {
        offset +=
            FRAME_HEADER_BYTES + u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
    }
    let length = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
    let checksum = crc32c::crc32c(&bytes[offset + FRAME_HEADER_BYTES..offset + FRAME_HEADER_BYTES + length]);
    bytes[offset + 4..offset + 8].copy_from_slice(&checksum.to_le_bytes());
    fs::write(&path, bytes).unwrap();
}

/// Rewrites the index from the entries file, as an attacker covering a change would.
fn rebuild_index(root: &Path) {
    let bytes = fs::read(entries_path(root)).unwrap();
    let mut index = fs::read(index_path(root)).unwrap()[..MAGIC_BYTES].to_vec();
    let mut offset = MAGIC_BYTES;
    while offset < bytes.len() {
        let length = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap());
        let leaf = &bytes[offset + FRAME_HEADER_BYTES..offset + FRAME_HEADER_BYTES + length as usize];
        let parsed = archive::leaf::LeafEntry::decode(leaf).unwrap();
        let record = archive::log::IndexRecord {
            offset: offset as u64,
            length,
            leaf_hash: archive::merkle::leaf_hash(leaf),
            id_hash: archive::log::id_hash(parsed.kind(), &parsed.id()),
        };
        index.extend_from_slice(&record.encode());
        offset += FRAME_HEADER_BYTES + length as usize;
    }
    fs::write(index_path(root), index).unwrap();
}

#[test]
fn every_tamper_case_names_what_was_changed() {
    type Tamper = fn(&Path);
    type Expect = fn(&VerifyError) -> bool;
    let cases: Vec<(&str, Tamper, Expect)> = vec![
        (
            "a byte of an original",
            |root| flip_byte(&object_path(root, &evidence(3).original.sha256), 2),
            |error| {
                matches!(error, VerifyError::Object { role: "original", entry_index: 4, id, .. }
                    if id == "decision cam-01/d-0003")
            },
        ),
        (
            "a byte of a modified input",
            |root| flip_byte(&object_path(root, &evidence(6).modified.unwrap().sha256), 0),
            |error| matches!(error, VerifyError::Object { role: "modified", entry_index: 7, .. }),
        ),
        (
            "a byte of the model file",
            |root| flip_byte(&object_path(root, &model().model.sha256), 4000),
            |error| matches!(error, VerifyError::Object { role: "model", entry_index: 0, .. }),
        ),
        (
            "a missing original",
            |root| fs::remove_file(object_path(root, &evidence(11).original.sha256)).unwrap(),
            |error| {
                matches!(error, VerifyError::Object { role: "original", entry_index: 12, reason, .. }
                    if reason.contains("missing"))
            },
        ),
        (
            "a byte of log entry 6",
            |root| flip_byte(&entries_path(root), frames(root)[6].0 + 40),
            |error| matches!(error, VerifyError::Entry { index: 6, .. }),
        ),
        (
            "a byte of log entry 6 with its checksum and the index fixed up",
            |root| {
                // Change the score digit, keep the JSON canonical, recompute checksum and index.
                let (offset, length) = frames(root)[6];
                let path = entries_path(root);
                let mut bytes = fs::read(&path).unwrap();
                let leaf = &mut bytes[offset as usize + FRAME_HEADER_BYTES..(offset + length) as usize];
                let text = String::from_utf8(leaf.to_vec()).unwrap();
                let changed = text.replace("\"score\":0.5", "\"score\":0.9");
                assert_ne!(text, changed);
                leaf.copy_from_slice(changed.as_bytes());
                let checksum = crc32c::crc32c(leaf);
                bytes[offset as usize + 4..offset as usize + 8].copy_from_slice(&checksum.to_le_bytes());
                fs::write(&path, bytes).unwrap();
                rebuild_index(root);
            },
            |error| matches!(error, VerifyError::Checkpoint { number: 2, tree_size: Some(10), .. }),
        ),
        (
            "a dropped log entry",
            |root| {
                let (offset, length) = frames(root)[8];
                remove_range(&entries_path(root), offset, length);
            },
            |error| matches!(error, VerifyError::Entry { index: 8, .. }),
        ),
        (
            "a dropped last log entry",
            |root| {
                let (offset, length) = *frames(root).last().unwrap();
                remove_range(&entries_path(root), offset, length);
            },
            |error| matches!(error, VerifyError::Entry { index: 12, id, .. } if id == "missing"),
        ),
        (
            "a dropped log entry with the index rebuilt",
            |root| {
                let (offset, length) = frames(root)[8];
                remove_range(&entries_path(root), offset, length);
                rebuild_index(root);
            },
            |error| matches!(error, VerifyError::Checkpoint { number: 2, .. }),
        ),
        (
            "a byte of checkpoint 2's signature",
            |root| flip_byte(&checkpoints_path(root), checkpoint_signature_offset(root, 2)),
            |error| matches!(error, VerifyError::Checkpoint { number: 2, .. }),
        ),
        (
            "a byte of checkpoint 2's signature with its checksum fixed up",
            |root| {
                flip_byte(&checkpoints_path(root), checkpoint_signature_offset(root, 2));
                fix_checkpoint_checksum(root, 2);
            },
            |error| matches!(error, VerifyError::Checkpoint { number: 2, reason, .. } if reason.contains("signature")),
        ),
        (
            "another signing key",
            |root| {
                fs::remove_file(root.join("keys/checkpoint-signing.pk8")).unwrap();
                fs::remove_file(root.join("keys/checkpoint.vkey")).unwrap();
                archive::checkpoint::Signer::load_or_create(root, ORIGIN).unwrap();
            },
            |error| matches!(error, VerifyError::Checkpoint { number: 1, .. }),
        ),
    ];
    for (name, tamper, expected) in cases {
        let directory = tempfile::tempdir().unwrap();
        drop(populated(directory.path()));
        archive::verify(directory.path())
            .unwrap_or_else(|error| panic!("{name}: untouched archive fails: {error}"));
        tamper(directory.path());
        let result = archive::verify(directory.path());
        assert!(result.as_ref().is_err_and(expected), "{name}: {result:?}");
        println!("{name}: {}", result.unwrap_err());
    }
}

/// The same archive with its objects in an `object_store` store (`InMemory`: the code path of
/// the S3 backend without a server): ingest, verify, and tampered or deleted objects named.
#[test]
fn objects_in_an_object_store_verify_and_tampering_is_named() {
    use std::sync::Arc;

    use object_store::ObjectStoreExt as _;
    use object_store::memory::InMemory;
    use object_store::path::Path as StorePath;

    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let memory = Arc::new(InMemory::new());
    let connect = || {
        archive::Objects::from_store(
            root,
            memory.clone(),
            "memory://",
            "tenant",
            &archive::ObjectsConfig::local(),
        )
        .unwrap()
    };
    let mut archive = Archive::open_with_objects(config(root, 5), connect()).unwrap();
    ingest(&mut archive, "cam-01", 0, 12);
    archive.flush().unwrap();
    drop(archive);
    assert!(!root.join("objects").exists(), "no object went to local files");
    let report = archive::verify_with_objects(root, &connect()).unwrap();
    assert_eq!((report.entries, report.objects_checked), (13, 19));

    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let key = |digest: &protocol::evidence::Sha256Digest| {
        let hex = protocol::evidence::sha256_hex(digest);
        StorePath::from(format!("tenant/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4]))
    };
    let original = evidence(3).original;
    runtime.block_on(memory.put(&key(&original.sha256), b"edited".to_vec().into())).unwrap();
    let error = archive::verify_with_objects(root, &connect()).unwrap_err();
    assert!(
        matches!(&error, VerifyError::Object { role: "original", entry_index: 4, id, reason, .. }
            if id == "decision cam-01/d-0003" && reason.contains("does not match its address")),
        "{error}"
    );
    runtime.block_on(memory.put(&key(&original.sha256), original.bytes.clone().into())).unwrap();
    archive::verify_with_objects(root, &connect()).unwrap();

    runtime.block_on(memory.delete(&key(&model().model.sha256))).unwrap();
    let error = archive::verify_with_objects(root, &connect()).unwrap_err();
    assert!(
        matches!(&error, VerifyError::Object { role: "model", entry_index: 0, reason, .. }
            if reason.contains("missing (memory://tenant/sha256/")),
        "{error}"
    );
}

/// `objects.toml` is written at creation; another store in the config is refused at open.
#[test]
fn an_archive_refuses_a_config_naming_another_object_store() {
    let directory = tempfile::tempdir().unwrap();
    drop(populated(directory.path()));
    let record = archive::ObjectsRecord::read(directory.path()).unwrap();
    assert_eq!(record, Some(archive::ObjectsRecord::local()));
    let mut elsewhere = config(directory.path(), 5);
    elsewhere.objects = archive::ObjectsConfig::s3("tributary-archive", Some("https://s3.example"), "core");
    let error = Archive::open(elsewhere).unwrap_err().to_string();
    assert!(
        error.contains("keeps its objects in local objects/")
            && error.contains("s3://tributary-archive/core")
            && error.contains("objects.toml"),
        "{error}"
    );
    // An archive from before objects.toml (entries, no record) is local and gets its record.
    fs::remove_file(directory.path().join("objects.toml")).unwrap();
    drop(Archive::open(config(directory.path(), 5)).unwrap());
    assert_eq!(
        archive::ObjectsRecord::read(directory.path()).unwrap(),
        Some(archive::ObjectsRecord::local())
    );
    archive::verify(directory.path()).unwrap();
}

fn file_length(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A crash during a flush leaves the entries file anywhere between its lengths before and after
/// (the index and checkpoint are written after it): reopening keeps the whole entries, cuts the
/// rest, verifies, and ingesting everything again ends with each record exactly once.
#[test]
fn recovers_from_a_crash_at_every_point_of_a_flush() {
    let base = tempfile::tempdir().unwrap();
    let before = base.path().join("before");
    drop(populated(&before));
    let entries_before = file_length(&entries_path(&before));
    let after = base.path().join("after");
    fs::create_dir_all(&after).unwrap();
    copy_dir(&before, &after);
    {
        let mut archive = Archive::open(config(&after, 100)).unwrap();
        ingest(&mut archive, "cam-01", 12, 3);
        archive.flush().unwrap();
        assert_eq!(archive.entries(), 16);
    }
    let full = fs::read(entries_path(&after)).unwrap();
    let whole_frames_end: Vec<u64> = frames(&after).iter().map(|(offset, length)| offset + length).collect();
    // Around every frame boundary of the flush: inside a header, at the boundary, inside a leaf.
    let mut cuts: Vec<u64> = vec![entries_before, entries_before + 3];
    for end in whole_frames_end.iter().filter(|end| **end > entries_before) {
        cuts.extend([end - 1, *end, end + 5, end + 100]);
    }
    cuts.retain(|cut| *cut <= full.len() as u64);
    for cut in cuts {
        let crashed = base.path().join(format!("crash-{cut}"));
        fs::create_dir_all(&crashed).unwrap();
        copy_dir(&before, &crashed);
        // Objects are durable before the entries that name them.
        copy_dir(&after.join("objects"), &crashed.join("objects"));
        fs::write(entries_path(&crashed), &full[..cut as usize]).unwrap();
        let whole = whole_frames_end.iter().filter(|end| **end <= cut).count() as u64;
        let mut archive = Archive::open(config(&crashed, 100)).unwrap();
        assert_eq!(archive.entries(), whole, "cut at {cut}");
        assert_eq!(archive.checkpoint_tree_size(), whole, "a checkpoint covers the recovered entries");
        assert_eq!(
            file_length(&index_path(&crashed)),
            (MAGIC_BYTES + whole as usize * INDEX_RECORD_BYTES) as u64
        );
        let outcomes = ingest(&mut archive, "cam-01", 0, 15);
        let appended =
            outcomes.iter().filter(|outcome| matches!(outcome, IngestOutcome::Appended { .. })).count();
        assert_eq!(appended as u64, 16 - whole, "cut at {cut}");
        archive.flush().unwrap();
        drop(archive);
        let report = archive::verify(&crashed).unwrap();
        assert_eq!(report.entries, 16);
        fs::remove_dir_all(&crashed).unwrap();
    }
}

#[test]
fn recovers_a_torn_index_and_checkpoint() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    drop(populated(root));
    let index_length = file_length(&index_path(root));
    // A partial index record and a partial checkpoint frame, as a crash mid-write leaves them.
    let mut index = fs::read(index_path(root)).unwrap();
    index.truncate(index_length as usize - INDEX_RECORD_BYTES - 7);
    fs::write(index_path(root), index).unwrap();
    let mut checkpoints = fs::read(checkpoints_path(root)).unwrap();
    checkpoints.extend_from_slice(&[200, 0, 0, 0, 1, 2]);
    fs::write(checkpoints_path(root), checkpoints).unwrap();
    let archive = Archive::open(config(root, 5)).unwrap();
    assert_eq!(archive.entries(), 13);
    assert_eq!(file_length(&index_path(root)), index_length);
    drop(archive);
    let report = archive::verify(root).unwrap();
    assert_eq!((report.entries, report.torn_tail_bytes), (13, 0));
}

#[test]
fn bundles_verify_offline_and_fail_when_tampered() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path().join("archive");
    drop(populated(&root));
    let bundle = directory.path().join("bundle");
    archive::export(&root, "d-0004", None, &bundle).unwrap();
    let report = archive::verify_bundle(&bundle).unwrap();
    assert_eq!(
        (report.decision_id.as_str(), report.leaf_index, report.tree_size, report.objects),
        ("d-0004", 5, 13, 3)
    );
    assert!(archive::export(&root, "d-0004", None, &bundle).is_err(), "refuses a non-empty directory");

    let original = protocol::evidence::sha256_hex(&evidence(4).original.sha256);
    let model = protocol::evidence::sha256_hex(&model().model.sha256);
    let cases: Vec<(PathBuf, u64, String)> = vec![
        (bundle.join("leaf.json"), 30, "leaf.json".into()),
        (bundle.join(format!("objects/{original}")), 1, format!("objects/{original}")),
        (bundle.join(format!("objects/{model}")), 100, format!("objects/{model}")),
        (bundle.join("checkpoint.note"), 30, "checkpoint.note".into()),
        (bundle.join("proof.json"), 60, "proof.json".into()),
        (bundle.join("checkpoint.vkey"), 40, "checkpoint.vkey".into()),
    ];
    for (path, offset, file) in cases {
        let copy = directory.path().join("copy");
        fs::create_dir_all(&copy).unwrap();
        copy_dir(&bundle, &copy);
        flip_byte(&copy.join(path.strip_prefix(&bundle).unwrap()), offset);
        let result = archive::verify_bundle(&copy);
        assert!(matches!(&result, Err(error) if error.file == file), "{file}: {result:?}");
        fs::remove_dir_all(&copy).unwrap();
    }
}

#[test]
fn an_entry_beyond_the_latest_checkpoint_cannot_be_exported() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path().join("archive");
    let mut archive = Archive::open(config(&root, 100)).unwrap();
    ingest(&mut archive, "cam-01", 0, 3);
    // Not flushed: nothing is durable, so nothing is found by a reader.
    assert!(matches!(archive::show(&root, "d-0001", None), Err(archive::AuditError::NotFound { .. })));
    archive.flush().unwrap();
    let view = archive::show(&root, "d-0001", None).unwrap();
    assert_eq!(view.checkpoint_tree_size, Some(4));
}

#[test]
fn hostile_bytes_in_every_file_never_panic() {
    let directory = tempfile::tempdir().unwrap();
    let pristine = directory.path().join("pristine");
    drop(populated(&pristine));
    let mut state = 0x2545_f491_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..60 {
        let root = directory.path().join(format!("round-{round}"));
        fs::create_dir_all(&root).unwrap();
        copy_dir(&pristine, &root);
        let path = match round % 3 {
            0 => entries_path(&root),
            1 => checkpoints_path(&root),
            _ => index_path(&root),
        };
        let mut bytes = fs::read(&path).unwrap();
        match next() % 4 {
            // Random bytes after the magic.
            0 => {
                let length = (next() % 4096) as usize;
                bytes.truncate(MAGIC_BYTES);
                bytes.extend((0..length).map(|_| next() as u8));
            }
            // A few random bytes overwritten.
            1 => {
                for _ in 0..1 + next() % 8 {
                    let position = (next() as usize) % bytes.len();
                    bytes[position] = next() as u8;
                }
            }
            // A huge length prefix.
            2 => {
                let position = MAGIC_BYTES + (next() as usize) % (bytes.len() - MAGIC_BYTES);
                let end = (position + 4).min(bytes.len());
                bytes[position..end].fill(0xff);
            }
            // Truncated anywhere, even inside the magic.
            _ => bytes.truncate((next() as usize) % bytes.len()),
        }
        fs::write(&path, &bytes).unwrap();
        let _ = archive::verify(&root);
        let _ = archive::show(&root, "d-0003", None);
        let _ = archive::review_list(&root, 0.5);
        if let Ok(mut archive) = Archive::open(config(&root, 5)) {
            // Whatever open accepted is a log that still verifies after more appends, or an
            // object/checkpoint problem verify names; it never panics.
            let _ = try_ingest(&mut archive, "cam-01", 0, 14);
            let _ = archive.flush();
        }
        let _ = archive::verify(&root);
    }
    let _ = sha256(b"");
}

#[derive(Clone, Debug)]
enum Operation {
    Ingest {
        device: u8,
        number: u8,
    },
    Flush,
    /// The process dies: the archive is dropped without a flush and opened again.
    Crash,
}

fn operation() -> impl proptest::strategy::Strategy<Value = Operation> {
    use proptest::prelude::*;
    prop_oneof![
        8 => (0u8..2, 0u8..24).prop_map(|(device, number)| Operation::Ingest { device, number }),
        1 => Just(Operation::Flush),
        1 => Just(Operation::Crash),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 16, ..Default::default() })]

    /// Random ingests, flushes and crashes against a model: what was flushed (explicitly or by
    /// `checkpoint_every_entries`) survives a crash, what was not is lost, nothing is logged twice,
    /// and the archive verifies at the end.
    #[test]
    fn agrees_with_a_model(operations in proptest::collection::vec(operation(), 1..30)) {
        const EVERY: u64 = 5;
        let directory = tempfile::tempdir().unwrap();
        let root = directory.path();
        let mut archive = Archive::open(config(root, EVERY)).unwrap();
        ingest(&mut archive, "cam-0", 0, 0); // the model, so that every decision's model exists
        archive.flush().unwrap();
        let mut durable: std::collections::BTreeSet<(u8, u8)> = Default::default();
        let mut pending: Vec<(u8, u8)> = Vec::new();
        for operation in operations {
            match operation {
                Operation::Ingest { device, number } => {
                    let outcome = try_ingest_evidence(
                        &mut archive,
                        &format!("cam-{device}"),
                        u64::from(number),
                        u32::from(number),
                    )
                    .unwrap();
                    let known = durable.contains(&(device, number)) || pending.contains(&(device, number));
                    proptest::prop_assert_eq!(matches!(outcome, IngestOutcome::Duplicate { .. }), known);
                    if !known {
                        pending.push((device, number));
                        if pending.len() as u64 == EVERY {
                            durable.extend(pending.drain(..));
                        }
                    }
                }
                Operation::Flush => {
                    archive.flush().unwrap();
                    durable.extend(pending.drain(..));
                }
                Operation::Crash => {
                    drop(archive);
                    pending.clear();
                    archive = Archive::open(config(root, EVERY)).unwrap();
                }
            }
            proptest::prop_assert_eq!(archive.entries(), 1 + (durable.len() + pending.len()) as u64);
        }
        archive.flush().unwrap();
        durable.extend(pending.drain(..));
        drop(archive);
        let report = archive::verify(root).unwrap();
        proptest::prop_assert_eq!(report.entries, 1 + durable.len() as u64);
        for (device, number) in durable {
            let view = archive::show(root, &format!("d-{number:04}"), Some(&format!("cam-{device}"))).unwrap();
            proptest::prop_assert!(view.inclusion_proof.is_some());
        }
    }
}
