//! Read-only audit of an archive: full verification, one decision with its inclusion proof,
//! evidence bundles and their offline verification, the review list.
//!
//! Nothing here writes to the archive or takes its lock, so these run beside a live writer. They
//! read checkpoints, then the index, then the entries (the reverse of the write order) and so see
//! a consistent prefix; entries beyond the latest checkpoint are checked but not yet covered.
//! Objects are read from the store the archive's `objects.toml` names (local when absent);
//! `export` copies them into the bundle, so a bundle verifies offline wherever they were stored.
//!
//! Evidence bundle (a directory):
//! ```text
//! leaf.json          the entry's leaf bytes, exactly as logged
//! checkpoint.note    the signed checkpoint the proof leads to
//! checkpoint.vkey    the verifier key (compare it with the archive's published key)
//! proof.json         {"leaf_index","tree_size","leaf_hash","audit_path":[hex…]}
//! objects/<64 hex>   original, modified input (if any) and model file
//! ```

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufReader, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use protocol::evidence::{Sha256Digest, sha256, sha256_hex};
use serde::{Deserialize, Serialize};

use protocol::evidence::{BlobSummary, DecisionSummary, parse_sha256_hex};

use crate::checkpoint::{CHECKPOINT_BYTES_MAX, Checkpoint, KEY_FILE_BYTES_MAX, Verifier, verifier_key_path};
use crate::frame::{FrameError, FrameRead, MAGIC_BYTES, read_frame};
use crate::leaf::{EntryKind, LEAF_BYTES_MAX, LeafBody, LeafEntry};
use crate::log::{
    ENTRIES_MAGIC, IndexRecord, LogError, entries_path, id_hash, open_checked, read_checkpoint_notes,
    read_entry, read_index,
};
use crate::merkle::{Hash, MerkleTree, PROOF_HASHES_MAX, leaf_hash, verify_consistency, verify_inclusion};
use crate::objects::{OBJECT_BYTES_MAX, Objects};
use crate::objects_config::{ObjectsRecord, objects_record_path};

/// What a successful verification covered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub entries: u64,
    pub decisions: u64,
    pub models: u64,
    pub checkpoints: u64,
    pub latest_checkpoint_tree_size: u64,
    /// Entries checked but not yet covered by a checkpoint (a writer between flushes).
    pub entries_after_latest_checkpoint: u64,
    pub objects_checked: u64,
    pub object_bytes_hashed: u64,
    /// Bytes of an entry or checkpoint being appended when the files were read.
    pub torn_tail_bytes: u64,
}

/// The first thing found wrong.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("log entry {index} ({id}) at byte {offset}: {reason}")]
    Entry { index: u64, offset: u64, id: String, reason: String },
    #[error("checkpoint {number}{}: {reason}", tree_size.map(|size| format!(" (tree size {size})")).unwrap_or_default())]
    Checkpoint { number: u64, tree_size: Option<u64>, reason: String },
    #[error("object {sha256} ({role} of log entry {entry_index}, {id}): {reason}")]
    Object { sha256: String, role: &'static str, entry_index: u64, id: String, reason: String },
}

fn unreadable(path: &Path, reason: impl ToString) -> VerifyError {
    VerifyError::Unreadable { path: path.to_path_buf(), reason: reason.to_string() }
}

/// Reads at most `max` bytes of `path`, refusing a larger file before reading it.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let length = fs::metadata(path).map_err(|error| format!("{}: {error}", path.display()))?.len();
    if length > max {
        return Err(format!("{}: {length} bytes exceed the limit of {max}", path.display()));
    }
    fs::read(path).map_err(|error| format!("{}: {error}", path.display()))
}

pub fn read_verifier(root: &Path) -> Result<Verifier, VerifyError> {
    let path = verifier_key_path(root);
    let bytes = read_bounded(&path, KEY_FILE_BYTES_MAX as u64).map_err(|reason| unreadable(&path, reason))?;
    Verifier::parse(&String::from_utf8_lossy(&bytes)).map_err(|error| unreadable(&path, error))
}

/// `kind device/id`, how errors and listings name an entry.
fn describe(leaf: &LeafEntry) -> String {
    format!("{} {}/{}", leaf.kind().name(), leaf.device, leaf.id())
}

/// Checks the whole archive, its objects in the store its `objects.toml` names; see
/// [`VerifyError`] for what the first failure names.
pub fn verify(root: &Path) -> Result<VerifyReport, VerifyError> {
    let objects = Objects::for_audit(root).map_err(|error| unreadable(&objects_record_path(root), error))?;
    verify_with_objects(root, &objects)
}

/// [`verify`] against `objects` (which must be the archive's store).
pub fn verify_with_objects(root: &Path, objects: &Objects) -> Result<VerifyReport, VerifyError> {
    let verifier = read_verifier(root)?;
    let mut report = VerifyReport::default();
    // Checkpoints first, then the index, then the entries: the reverse of the write order.
    let (notes, damaged_checkpoint) = match read_checkpoint_notes(root) {
        Ok((notes, torn)) => {
            report.torn_tail_bytes += torn;
            (notes, None)
        }
        Err(LogError::DamagedCheckpoint { number, reason, .. }) => {
            // Named after the entries are checked, so an entry at fault is named first.
            (Vec::new(), Some(VerifyError::Checkpoint { number, tree_size: None, reason }))
        }
        Err(error) => return Err(unreadable(&crate::log::checkpoints_path(root), error)),
    };
    let index_path = crate::log::index_path(root);
    let (records, _partial) = read_index(root).map_err(|error| unreadable(&index_path, error))?;

    let path = entries_path(root);
    let file = open_checked(&path, ENTRIES_MAGIC)
        .map_err(|error| unreadable(&path, error))?
        .ok_or_else(|| unreadable(&path, "missing"))?;
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(MAGIC_BYTES as u64)).map_err(|error| unreadable(&path, error))?;
    let mut tree = MerkleTree::new();
    let mut checked_objects: HashSet<Sha256Digest> = HashSet::new();
    let mut offset = MAGIC_BYTES as u64;
    loop {
        let index = tree.size();
        let indexed = records.get(index as usize);
        let entry_error = |id: String, reason: String| VerifyError::Entry { index, offset, id, reason };
        let bytes = match read_frame(&mut reader, LEAF_BYTES_MAX) {
            Ok(FrameRead::Frame(bytes)) => bytes,
            Ok(FrameRead::End) => break,
            Ok(FrameRead::Torn { bytes }) if indexed.is_none() => {
                report.torn_tail_bytes += bytes;
                break;
            }
            Ok(FrameRead::Torn { bytes }) => {
                return Err(entry_error("unreadable".into(), format!("cut short after {bytes} bytes")));
            }
            Err(FrameError::Io(error)) => return Err(unreadable(&path, error)),
            Err(error) => return Err(entry_error("unreadable".into(), error.to_string())),
        };
        let leaf =
            LeafEntry::decode(&bytes).map_err(|error| entry_error("unreadable".into(), error.to_string()))?;
        let name = describe(&leaf);
        let hash = leaf_hash(&bytes);
        if let Some(record) = indexed {
            let expected = IndexRecord {
                offset,
                length: bytes.len() as u32,
                leaf_hash: hash,
                id_hash: id_hash(leaf.kind(), &leaf.id()),
            };
            if *record != expected {
                let reason = if record.offset != offset {
                    format!("the index places entry {index} at byte {}", record.offset)
                } else {
                    "the index records another leaf here (an entry was changed, removed or inserted)"
                        .to_string()
                };
                return Err(entry_error(name, reason));
            }
        }
        for (role, digest) in leaf.objects() {
            if checked_objects.contains(&digest) {
                continue;
            }
            let bytes = objects.check(&digest).map_err(|error| VerifyError::Object {
                sha256: sha256_hex(&digest),
                role,
                entry_index: index,
                id: name.clone(),
                reason: error.to_string(),
            })?;
            report.objects_checked += 1;
            report.object_bytes_hashed += bytes;
            checked_objects.insert(digest);
        }
        match leaf.kind() {
            EntryKind::Decision => report.decisions += 1,
            EntryKind::Model => report.models += 1,
        }
        offset += (crate::frame::FRAME_HEADER_BYTES + bytes.len()) as u64;
        tree.push(hash);
    }
    if records.len() as u64 > tree.size() {
        return Err(VerifyError::Entry {
            index: tree.size(),
            offset,
            id: "missing".into(),
            reason: format!("the index lists {} entries but the log ends here", records.len()),
        });
    }
    report.entries = tree.size();
    if let Some(error) = damaged_checkpoint {
        return Err(error);
    }

    let mut previous: Option<Checkpoint> = None;
    for (position, note) in notes.iter().enumerate() {
        let number = position as u64 + 1;
        let checkpoint_error =
            |tree_size: Option<u64>, reason: String| VerifyError::Checkpoint { number, tree_size, reason };
        let checkpoint = verifier.open(note).map_err(|error| checkpoint_error(None, error.to_string()))?;
        let size = checkpoint.tree_size;
        if size > tree.size() {
            return Err(checkpoint_error(
                Some(size),
                format!("covers more entries than the log's {}", tree.size()),
            ));
        }
        if tree.root(size) != checkpoint.root_hash {
            // The previous checkpoint matched its prefix, so the change is among the entries this
            // one added (or an entry was removed or inserted among them).
            let since = previous.as_ref().map_or(0, |previous| previous.tree_size);
            return Err(checkpoint_error(
                Some(size),
                format!(
                    "root does not match the log's first {size} entries: entries {since}..{size} differ from \
                     what was signed"
                ),
            ));
        }
        if let Some(previous) = &previous {
            if size < previous.tree_size {
                return Err(checkpoint_error(Some(size), format!("smaller than checkpoint {}", number - 1)));
            }
            let proof = tree.consistency_proof(previous.tree_size, size).expect("sizes checked above");
            verify_consistency(previous.tree_size, size, &previous.root_hash, &checkpoint.root_hash, &proof)
                .map_err(|error| {
                    checkpoint_error(
                        Some(size),
                        format!("not consistent with checkpoint {}: {error}", number - 1),
                    )
                })?;
        }
        previous = Some(checkpoint);
    }
    report.checkpoints = notes.len() as u64;
    report.latest_checkpoint_tree_size = previous.map_or(0, |checkpoint| checkpoint.tree_size);
    report.entries_after_latest_checkpoint = report.entries - report.latest_checkpoint_tree_size;
    Ok(report)
}

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no decision {id:?}{} in the archive", device.as_ref().map(|device| format!(" of device {device:?}")).unwrap_or_default())]
    NotFound { id: String, device: Option<String> },
    #[error("decision id {id:?} exists for several devices ({devices:?}); name one with --device")]
    Ambiguous { id: String, devices: Vec<String> },
    #[error(
        "decision {id:?} (entry {entry_index}) is not covered by a checkpoint yet; retry after the next flush"
    )]
    NotCheckpointed { id: String, entry_index: u64 },
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{0}")]
    Other(String),
}

/// An object a decision names, and where it is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectView {
    pub role: &'static str,
    pub content_type: Option<String>,
    pub sha256: String,
    pub bytes: Option<u64>,
    /// A path under the archive root, or `s3://bucket/key` (see `objects.toml`).
    pub location: String,
}

/// One decision: what `audit show` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecisionView {
    pub entry_index: u64,
    pub device: String,
    pub lane_seq: u64,
    pub record_index: u32,
    pub decision: DecisionSummary,
    pub leaf_hash: String,
    pub objects: Vec<ObjectView>,
    /// The latest checkpoint, when it covers this entry.
    pub checkpoint_tree_size: Option<u64>,
    pub checkpoint_root_hash: Option<String>,
    /// Hex hashes from the leaf up, RFC 6962 order; verified against the checkpoint.
    pub inclusion_proof: Option<Vec<String>>,
    #[serde(skip)]
    pub leaf_bytes: Vec<u8>,
    #[serde(skip)]
    pub checkpoint_note: Option<Vec<u8>>,
}

/// The latest checkpoint that opens, with its note.
fn latest_checkpoint(root: &Path, verifier: &Verifier) -> Result<Option<(Checkpoint, Vec<u8>)>, AuditError> {
    let (notes, _torn) = read_checkpoint_notes(root).map_err(|error| AuditError::Other(error.to_string()))?;
    let Some(note) = notes.last() else { return Ok(None) };
    let checkpoint = verifier
        .open(note)
        .map_err(|error| AuditError::Other(format!("latest checkpoint ({}): {error}", notes.len())))?;
    Ok(Some((checkpoint, note.clone())))
}

/// Finds decision `id` (of `device`, when given) and proves it against the latest checkpoint.
pub fn show(root: &Path, id: &str, device: Option<&str>) -> Result<DecisionView, AuditError> {
    let verifier = read_verifier(root)?;
    let store = ObjectsRecord::read_or_local(root).map_err(AuditError::Other)?;
    let latest = latest_checkpoint(root, &verifier)?;
    let (records, _) = read_index(root).map_err(|error| AuditError::Other(error.to_string()))?;
    let path = entries_path(root);
    let entries =
        File::open(&path).map_err(|error| AuditError::Other(format!("{}: {error}", path.display())))?;
    let wanted = id_hash(EntryKind::Decision, id);
    let mut found = Vec::new();
    for (entry_index, record) in records.iter().enumerate().filter(|(_, record)| record.id_hash == wanted) {
        let bytes = read_entry(&entries, record).map_err(|reason| {
            AuditError::Other(format!("entry {entry_index}: {reason} (run `core-sink audit verify`)"))
        })?;
        let leaf = LeafEntry::decode(&bytes)
            .map_err(|error| AuditError::Other(format!("entry {entry_index}: {error}")))?;
        if leaf.kind() == EntryKind::Decision
            && leaf.id() == id
            && device.is_none_or(|device| leaf.device == device)
        {
            found.push((entry_index as u64, leaf, bytes));
        }
    }
    let (entry_index, leaf, bytes) = match found.len() {
        0 => return Err(AuditError::NotFound { id: id.to_string(), device: device.map(str::to_string) }),
        1 => found.pop().expect("one"),
        _ => {
            let devices = found.into_iter().map(|(_, leaf, _)| leaf.device).collect();
            return Err(AuditError::Ambiguous { id: id.to_string(), devices });
        }
    };
    let LeafBody::Decision { decision, original, modified } = &leaf.body else {
        unreachable!("filtered above")
    };
    let hash = leaf_hash(&bytes);
    let view_of = |role: &'static str, object: &BlobSummary| ObjectView {
        role,
        content_type: Some(object.content_type.clone()),
        sha256: object.sha256.clone(),
        bytes: Some(object.bytes),
        location: store.location(root, &object.sha256),
    };
    let mut objects = vec![view_of("original", original)];
    objects.extend(modified.iter().map(|modified| view_of("modified", modified)));
    objects.push(ObjectView {
        role: "model",
        content_type: None,
        sha256: decision.model_sha256.clone(),
        bytes: None,
        location: store.location(root, &decision.model_sha256),
    });
    let mut view = DecisionView {
        entry_index,
        device: leaf.device.clone(),
        lane_seq: leaf.lane_seq,
        record_index: leaf.record_index,
        decision: decision.clone(),
        leaf_hash: sha256_hex(&hash),
        objects,
        checkpoint_tree_size: None,
        checkpoint_root_hash: None,
        inclusion_proof: None,
        leaf_bytes: bytes,
        checkpoint_note: None,
    };
    if let Some((checkpoint, note)) = latest
        && entry_index < checkpoint.tree_size
    {
        if checkpoint.tree_size > records.len() as u64 {
            return Err(AuditError::Other("the latest checkpoint covers more entries than the index".into()));
        }
        let mut tree = MerkleTree::new();
        for record in &records[..checkpoint.tree_size as usize] {
            tree.push(record.leaf_hash);
        }
        let proof = tree.inclusion_proof(entry_index, checkpoint.tree_size).expect("index below size");
        let proved =
            verify_inclusion(entry_index, checkpoint.tree_size, &hash, &proof, &checkpoint.root_hash);
        proved.map_err(|error| {
            AuditError::Other(format!(
                "entry {entry_index} does not prove against the latest checkpoint: {error} \
                 (run `core-sink audit verify`)"
            ))
        })?;
        view.checkpoint_tree_size = Some(checkpoint.tree_size);
        view.checkpoint_root_hash = Some(sha256_hex(&checkpoint.root_hash));
        view.inclusion_proof = Some(proof.iter().map(sha256_hex).collect());
        view.checkpoint_note = Some(note);
    }
    Ok(view)
}

/// `proof.json` of an evidence bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofFile {
    pub leaf_index: u64,
    pub tree_size: u64,
    pub leaf_hash: String,
    pub audit_path: Vec<String>,
}

const BUNDLE_LEAF: &str = "leaf.json";
const BUNDLE_CHECKPOINT: &str = "checkpoint.note";
const BUNDLE_KEY: &str = "checkpoint.vkey";
const BUNDLE_PROOF: &str = "proof.json";
const BUNDLE_OBJECTS: &str = "objects";
/// Largest `proof.json`: `PROOF_HASHES_MAX` quoted hashes and the fields around them.
const PROOF_FILE_BYTES_MAX: u64 = (PROOF_HASHES_MAX as u64) * 70 + 512;

/// Writes the evidence bundle of decision `id` into `out_dir` (created; must be empty or absent).
pub fn export(
    root: &Path,
    id: &str,
    device: Option<&str>,
    out_dir: &Path,
) -> Result<DecisionView, AuditError> {
    let view = show(root, id, device)?;
    let (Some(tree_size), Some(proof), Some(note)) =
        (view.checkpoint_tree_size, &view.inclusion_proof, &view.checkpoint_note)
    else {
        return Err(AuditError::NotCheckpointed { id: id.to_string(), entry_index: view.entry_index });
    };
    let io = |path: &Path, error: std::io::Error| AuditError::Other(format!("{}: {error}", path.display()));
    if fs::read_dir(out_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(AuditError::Other(format!("{} is not empty", out_dir.display())));
    }
    let objects_dir = out_dir.join(BUNDLE_OBJECTS);
    let objects = Objects::for_audit(root).map_err(|error| AuditError::Other(error.to_string()))?;
    fs::create_dir_all(&objects_dir).map_err(|error| io(&objects_dir, error))?;
    let verifier = read_verifier(root)?;
    let proof_file = ProofFile {
        leaf_index: view.entry_index,
        tree_size,
        leaf_hash: view.leaf_hash.clone(),
        audit_path: proof.clone(),
    };
    let proof_json = serde_json::to_vec_pretty(&proof_file).expect("plain struct");
    for (name, bytes) in [
        (BUNDLE_LEAF, view.leaf_bytes.clone()),
        (BUNDLE_CHECKPOINT, note.clone()),
        (BUNDLE_KEY, format!("{}\n", verifier.to_text()).into_bytes()),
        (BUNDLE_PROOF, proof_json),
    ] {
        let path = out_dir.join(name);
        fs::write(&path, bytes).map_err(|error| io(&path, error))?;
    }
    for object in &view.objects {
        let digest = parse_sha256_hex(&object.sha256).expect("validated leaf");
        // Copied out of the store, so the bundle verifies offline.
        let bytes = objects.read(&digest).map_err(|error| AuditError::Other(error.to_string()))?;
        let path = objects_dir.join(&object.sha256);
        fs::write(&path, bytes).map_err(|error| io(&path, error))?;
    }
    Ok(view)
}

/// What a verified bundle shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BundleReport {
    pub device: String,
    pub decision_id: String,
    pub leaf_index: u64,
    pub tree_size: u64,
    pub root_hash: String,
    /// The key the checkpoint is signed with: compare it with the archive's published key.
    pub verifier_key: String,
    pub objects: usize,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("evidence bundle {file}: {reason}")]
pub struct BundleError {
    pub file: String,
    pub reason: String,
}

/// Checks an evidence bundle offline: signature, inclusion proof, leaf, every object's bytes.
pub fn verify_bundle(dir: &Path) -> Result<BundleReport, BundleError> {
    let fail = |file: &str, reason: String| BundleError { file: file.to_string(), reason };
    let read = |name: &str, max: u64| read_bounded(&dir.join(name), max).map_err(|reason| fail(name, reason));
    let key_text = read(BUNDLE_KEY, KEY_FILE_BYTES_MAX as u64)?;
    let verifier = Verifier::parse(&String::from_utf8_lossy(&key_text))
        .map_err(|error| fail(BUNDLE_KEY, error.to_string()))?;
    let note = read(BUNDLE_CHECKPOINT, CHECKPOINT_BYTES_MAX as u64)?;
    let checkpoint = verifier.open(&note).map_err(|error| fail(BUNDLE_CHECKPOINT, error.to_string()))?;
    let leaf_bytes = read(BUNDLE_LEAF, LEAF_BYTES_MAX as u64)?;
    let leaf = LeafEntry::decode(&leaf_bytes).map_err(|error| fail(BUNDLE_LEAF, error.to_string()))?;
    let LeafBody::Decision { decision, original, modified } = &leaf.body else {
        return Err(fail(BUNDLE_LEAF, "not a decision".into()));
    };
    let proof_bytes = read(BUNDLE_PROOF, PROOF_FILE_BYTES_MAX)?;
    let proof: ProofFile =
        serde_json::from_slice(&proof_bytes).map_err(|error| fail(BUNDLE_PROOF, error.to_string()))?;
    if proof.audit_path.len() > PROOF_HASHES_MAX {
        return Err(fail(
            BUNDLE_PROOF,
            format!("{} hashes exceed {PROOF_HASHES_MAX}", proof.audit_path.len()),
        ));
    }
    let path: Vec<Hash> = proof
        .audit_path
        .iter()
        .map(|hex| parse_sha256_hex(hex).ok_or_else(|| fail(BUNDLE_PROOF, format!("{hex:?} is not a hash"))))
        .collect::<Result<_, _>>()?;
    let hash = leaf_hash(&leaf_bytes);
    if proof.leaf_hash != sha256_hex(&hash) {
        return Err(fail(BUNDLE_PROOF, "leaf_hash is not the hash of leaf.json".into()));
    }
    if proof.tree_size != checkpoint.tree_size {
        return Err(fail(
            BUNDLE_PROOF,
            format!("tree size {} differs from the checkpoint's {}", proof.tree_size, checkpoint.tree_size),
        ));
    }
    verify_inclusion(proof.leaf_index, proof.tree_size, &hash, &path, &checkpoint.root_hash)
        .map_err(|error| fail(BUNDLE_PROOF, format!("leaf.json is not in the checkpoint's tree: {error}")))?;
    let mut expected: Vec<(&str, String, Option<u64>)> =
        vec![("original", original.sha256.clone(), Some(original.bytes))];
    expected
        .extend(modified.iter().map(|modified| ("modified", modified.sha256.clone(), Some(modified.bytes))));
    expected.push(("model", decision.model_sha256.clone(), None));
    for (role, hex, size) in &expected {
        let name = format!("{BUNDLE_OBJECTS}/{hex}");
        let bytes = read(&name, OBJECT_BYTES_MAX)?;
        if sha256_hex(&sha256(&bytes)) != *hex {
            return Err(fail(&name, format!("{role} does not match its sha256")));
        }
        if size.is_some_and(|size| size != bytes.len() as u64) {
            return Err(fail(&name, format!("{role} has {} bytes, the leaf says {size:?}", bytes.len())));
        }
    }
    Ok(BundleReport {
        device: leaf.device.clone(),
        decision_id: decision.decision_id.clone(),
        leaf_index: proof.leaf_index,
        tree_size: proof.tree_size,
        root_hash: sha256_hex(&checkpoint.root_hash),
        verifier_key: verifier.to_text(),
        objects: expected.len(),
    })
}

/// A decision whose score is below the review threshold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReviewItem {
    pub entry_index: u64,
    pub device: String,
    pub decision_id: String,
    pub label: String,
    pub score: f32,
    /// Where the original input is: a path or `s3://bucket/key`.
    pub original: String,
}

/// Every logged decision with `score < score_max`, in log order.
pub fn review_list(root: &Path, score_max: f32) -> Result<Vec<ReviewItem>, AuditError> {
    let store = ObjectsRecord::read_or_local(root).map_err(AuditError::Other)?;
    let (records, _) = read_index(root).map_err(|error| AuditError::Other(error.to_string()))?;
    let path = entries_path(root);
    let entries =
        File::open(&path).map_err(|error| AuditError::Other(format!("{}: {error}", path.display())))?;
    let mut items = Vec::new();
    for (entry_index, record) in records.iter().enumerate() {
        let bytes = read_entry(&entries, record)
            .map_err(|reason| AuditError::Other(format!("entry {entry_index}: {reason}")))?;
        let leaf = LeafEntry::decode(&bytes)
            .map_err(|error| AuditError::Other(format!("entry {entry_index}: {error}")))?;
        if let LeafBody::Decision { decision, original, .. } = &leaf.body
            && decision.score < score_max
        {
            items.push(ReviewItem {
                entry_index: entry_index as u64,
                device: leaf.device.clone(),
                decision_id: decision.decision_id.clone(),
                label: decision.label.clone(),
                score: decision.score,
                original: store.location(root, &original.sha256),
            });
        }
    }
    Ok(items)
}
