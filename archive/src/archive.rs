//! The writer: ingests audit-lane records into the object store and the decision log, and signs
//! checkpoints.
//!
//! Entries are kept in memory until [`Archive::flush`] (at most `checkpoint_every_entries`, which
//! triggers a flush), so that the objects they name are durable before the entries are: a flush
//! makes the objects durable (local: fsyncs files and directories; object store: uploads them and
//! confirms each, see `store.rs`), then appends and fsyncs the entries, the index and a signed
//! checkpoint. A crash loses at most the entries since the last flush; their records are ingested
//! again from the raw landing, and objects already stored are found in place. Dropping an
//! `Archive` does not flush: it is the same as a crash, and callers flush where their own state
//! (the feed's positions) says so.
//!
//! Recovery at open: a partial index record is cut off; index records that do not chain (each
//! entry starts where the previous one ends, inside the entries file) are dropped; entries after
//! the last indexed one are read back and indexed, and the first frame that is torn or fails its
//! checksum ends the log there (the file is truncated: only an interrupted flush leaves such a
//! tail); a torn checkpoint is cut off. A log shorter than its latest checkpoint is refused.
//!
//! One writer per archive: `<root>/LOCK` is held with `flock` while the archive is open.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Seek as _, SeekFrom, Write as _};
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};

use protocol::RecordRef;
use protocol::evidence::{
    EVIDENCE_CONTENT_TYPE, Evidence, MODEL_CONTENT_TYPE, ModelRecord, Sha256Digest, model_record_key,
};

use crate::checkpoint::{Checkpoint, Signer, validate_origin};
use crate::frame::{FRAME_HEADER_BYTES, FrameError, FrameRead, MAGIC_BYTES, encode_frame, read_frame};
use crate::leaf::{EntryKind, LEAF_BYTES_MAX, LeafEntry, validate_device};
use crate::log::{
    CHECKPOINTS_MAGIC, ENTRIES_MAGIC, ENTRIES_MAX, INDEX_MAGIC, INDEX_RECORD_BYTES, IdHash, IndexRecord,
    LogError, checkpoints_path, create_if_missing, entries_path, id_hash, index_path, log_dir, open_append,
    open_checked, read_checkpoint_notes, read_entry, read_index,
};
use crate::merkle::{MerkleTree, leaf_hash};
use crate::objects::{ObjectError, Objects};
use crate::objects_config::ObjectsConfig;

/// Most entries between checkpoints (and so most entries held in memory before a flush).
pub const CHECKPOINT_EVERY_ENTRIES_MAX: u64 = 100_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveConfig {
    /// Directory holding `objects/`, `log/`, `keys/`.
    pub root: PathBuf,
    /// The log's name in every checkpoint, e.g. `tributary.example/core-archive`; also the
    /// signing key's name.
    pub origin: String,
    /// A flush (and so a checkpoint) happens at the latest after this many new entries.
    pub checkpoint_every_entries: u64,
    /// Where the objects are stored; recorded in `<root>/objects.toml` at creation.
    pub objects: ObjectsConfig,
}

impl ArchiveConfig {
    pub fn validate(&self) -> Result<(), String> {
        validate_origin(&self.origin)?;
        self.objects.validate()?;
        if !(1..=CHECKPOINT_EVERY_ENTRIES_MAX).contains(&self.checkpoint_every_entries) {
            return Err(format!(
                "checkpoint_every_entries = {}: expected 1..={CHECKPOINT_EVERY_ENTRIES_MAX}",
                self.checkpoint_every_entries
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid archive config: {0}")]
    Config(String),
    #[error("archive I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("archive at {path} is open in another process (its LOCK is held)")]
    Locked { path: PathBuf },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("checkpoint signing key: {0}")]
    Key(String),
    #[error("archive log is inconsistent: {0} (run `core-sink audit verify`)")]
    Inconsistent(String),
    /// The record can never be archived; skip it (the raw landing keeps it).
    #[error("record {key:?} refused: {reason}")]
    Rejected { key: String, reason: String },
    #[error("an earlier write failed; reopen the archive to recover")]
    Poisoned,
}

/// Whether a record was new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    Appended {
        entry_index: u64,
    },
    /// The same (device, kind, id) is already in the log; nothing was written.
    Duplicate {
        entry_index: u64,
    },
}

/// What an ingested record held.
#[derive(Clone, Debug, PartialEq)]
pub enum IngestedRecord {
    Decision(Box<Evidence>),
    Model { name: String, sha256: Sha256Digest },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ingested {
    pub outcome: IngestOutcome,
    pub record: IngestedRecord,
}

struct PendingEntry {
    bytes: Vec<u8>,
    device: String,
    kind: EntryKind,
    id: String,
}

pub struct Archive {
    config: ArchiveConfig,
    signer: Signer,
    objects: Objects,
    entries: File,
    index: File,
    checkpoints: File,
    entries_length: u64,
    tree: MerkleTree,
    /// Durable entries.
    records: Vec<IndexRecord>,
    /// Entry indexes by id hash, durable and pending.
    ids: HashMap<IdHash, Vec<u64>>,
    pending: Vec<PendingEntry>,
    checkpoint_tree_size: u64,
    checkpoints_written: u64,
    poisoned: bool,
    /// Held for the `flock`.
    _lock: File,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Archive")
            .field("root", &self.config.root)
            .field("entries", &self.tree.size())
            .field("checkpoint_tree_size", &self.checkpoint_tree_size)
            .finish_non_exhaustive()
    }
}

fn archive_io(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io { path: path.to_path_buf(), source }
}

fn lock(root: &Path) -> Result<File, ArchiveError> {
    let path = root.join("LOCK");
    let file =
        OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(archive_io(&path))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Err(ArchiveError::Locked { path });
        }
        return Err(ArchiveError::Io { path, source: error });
    }
    Ok(file)
}

/// Whether the log holds entries (an archive that existed before `objects.toml` did).
fn has_entries(root: &Path) -> bool {
    fs::metadata(entries_path(root)).is_ok_and(|metadata| metadata.len() > MAGIC_BYTES as u64)
}

fn truncate_file(path: &Path, length: u64) -> Result<(), ArchiveError> {
    let file = OpenOptions::new().write(true).open(path).map_err(archive_io(path))?;
    file.set_len(length).and_then(|()| file.sync_all()).map_err(archive_io(path))
}

impl Archive {
    /// Opens the archive at `config.root`, creating it (and its signing key) on first use, and
    /// recovers from a crash (see the module doc). The objects go to the store `config.objects`
    /// names, which must be the one the archive recorded at creation (`objects.toml`).
    pub fn open(config: ArchiveConfig) -> Result<Archive, ArchiveError> {
        config.validate().map_err(ArchiveError::Config)?;
        // Refuse another store before connecting to it (and so before asking for credentials);
        // `open_with_objects` checks again under the lock.
        crate::objects::check_recorded(&config.root, &config.objects, has_entries(&config.root))?;
        let objects = Objects::connect(&config.root, &config.objects)?;
        Archive::open_with_objects(config, objects)
    }

    /// [`Archive::open`] with the objects already connected: `objects` must be the store
    /// `config.objects` describes (tests pass an `object_store` `InMemory` store here).
    pub fn open_with_objects(config: ArchiveConfig, objects: Objects) -> Result<Archive, ArchiveError> {
        config.validate().map_err(ArchiveError::Config)?;
        let root = config.root.clone();
        let directory = log_dir(&root);
        fs::create_dir_all(&directory).map_err(archive_io(&directory))?;
        let lock = lock(&root)?;
        // Before any entry can exist: which store the log's objects are in.
        crate::objects::record_or_check(&root, &config.objects, has_entries(&root))?;
        let signer = Signer::load_or_create(&root, &config.origin).map_err(ArchiveError::Key)?;
        for (path, magic) in [
            (entries_path(&root), ENTRIES_MAGIC),
            (index_path(&root), INDEX_MAGIC),
            (checkpoints_path(&root), CHECKPOINTS_MAGIC),
        ] {
            create_if_missing(&path, magic)?;
            open_checked(&path, magic)?;
        }

        // The index: whole records that chain inside the entries file.
        let entries_file_path = entries_path(&root);
        let entries_file_length =
            fs::metadata(&entries_file_path).map_err(archive_io(&entries_file_path))?.len();
        let (mut records, partial_bytes) = read_index(&root)?;
        let mut expected_offset = MAGIC_BYTES as u64;
        let chained = records
            .iter()
            .take_while(|record| {
                let chains = record.offset == expected_offset
                    && record.length as usize <= LEAF_BYTES_MAX
                    && record.end() <= entries_file_length;
                expected_offset = record.end();
                chains
            })
            .count();
        if chained < records.len() || partial_bytes > 0 {
            tracing::warn!(
                kept = chained,
                dropped = records.len() - chained,
                partial_bytes,
                "recovering the archive index"
            );
            records.truncate(chained);
            truncate_file(&index_path(&root), (MAGIC_BYTES + chained * INDEX_RECORD_BYTES) as u64)?;
        }

        // Entries after the last indexed one: index what is whole, cut what is not.
        let indexed_end = records.last().map_or(MAGIC_BYTES as u64, IndexRecord::end);
        let mut file = File::open(&entries_file_path).map_err(archive_io(&entries_file_path))?;
        file.seek(SeekFrom::Start(indexed_end)).map_err(archive_io(&entries_file_path))?;
        let mut reader = BufReader::new(file);
        let mut offset = indexed_end;
        let mut recovered = Vec::new();
        loop {
            match read_frame(&mut reader, LEAF_BYTES_MAX) {
                Ok(FrameRead::Frame(bytes)) => {
                    let leaf = LeafEntry::decode(&bytes).map_err(|error| {
                        ArchiveError::Inconsistent(format!(
                            "entry at byte {offset} has a valid frame but {error}"
                        ))
                    })?;
                    let record = IndexRecord {
                        offset,
                        length: bytes.len() as u32,
                        leaf_hash: leaf_hash(&bytes),
                        id_hash: id_hash(leaf.kind(), &leaf.id()),
                    };
                    offset = record.end();
                    recovered.push(record);
                }
                Ok(FrameRead::End) => break,
                Err(FrameError::Io(source)) => {
                    return Err(ArchiveError::Io { path: entries_file_path, source });
                }
                Ok(FrameRead::Torn { .. }) | Err(FrameError::Checksum | FrameError::TooLarge { .. }) => {
                    tracing::warn!(path = %entries_file_path.display(), at = offset, dropped_bytes = entries_file_length - offset, "truncating a torn tail of the decision log");
                    truncate_file(&entries_file_path, offset)?;
                    break;
                }
            }
        }
        let mut index = open_append(&index_path(&root))?;
        if !recovered.is_empty() {
            tracing::info!(entries = recovered.len(), "indexed log entries written before a crash");
            let bytes: Vec<u8> = recovered.iter().flat_map(|record| record.encode()).collect();
            index
                .write_all(&bytes)
                .and_then(|()| index.sync_data())
                .map_err(archive_io(&index_path(&root)))?;
            records.extend(recovered);
        }
        if records.len() as u64 > ENTRIES_MAX {
            return Err(ArchiveError::Inconsistent(format!(
                "{} entries exceed {ENTRIES_MAX}",
                records.len()
            )));
        }

        let mut tree = MerkleTree::new();
        let mut ids: HashMap<IdHash, Vec<u64>> = HashMap::new();
        for (entry_index, record) in records.iter().enumerate() {
            tree.push(record.leaf_hash);
            ids.entry(record.id_hash).or_default().push(entry_index as u64);
        }

        // Checkpoints: cut a torn one, check the latest against the log.
        let (notes, torn_bytes) = read_checkpoint_notes(&root)?;
        if torn_bytes > 0 {
            let path = checkpoints_path(&root);
            let length = fs::metadata(&path).map_err(archive_io(&path))?.len();
            tracing::warn!(path = %path.display(), torn_bytes, "truncating a torn checkpoint");
            truncate_file(&path, length - torn_bytes)?;
        }
        let mut checkpoint_tree_size = 0;
        if let Some(note) = notes.last() {
            let checkpoint = signer.verifier().open(note).map_err(|error| {
                ArchiveError::Inconsistent(format!(
                    "latest checkpoint ({}) does not open: {error}",
                    notes.len()
                ))
            })?;
            if checkpoint.tree_size > tree.size() {
                return Err(ArchiveError::Inconsistent(format!(
                    "latest checkpoint covers {} entries but the log holds {}",
                    checkpoint.tree_size,
                    tree.size()
                )));
            }
            if tree.root(checkpoint.tree_size) != checkpoint.root_hash {
                return Err(ArchiveError::Inconsistent(format!(
                    "latest checkpoint's root does not match the log's first {} entries",
                    checkpoint.tree_size
                )));
            }
            checkpoint_tree_size = checkpoint.tree_size;
        }
        let entries_length = fs::metadata(&entries_file_path).map_err(archive_io(&entries_file_path))?.len();
        assert_eq!(entries_length, records.last().map_or(MAGIC_BYTES as u64, IndexRecord::end));
        let mut archive = Archive {
            objects,
            entries: open_append(&entries_file_path)?,
            index,
            checkpoints: open_append(&checkpoints_path(&root))?,
            config,
            signer,
            entries_length,
            tree,
            records,
            ids,
            pending: Vec::new(),
            checkpoint_tree_size,
            checkpoints_written: notes.len() as u64,
            poisoned: false,
            _lock: lock,
        };
        // Entries flushed before a crash that stopped short of their checkpoint.
        archive.flush()?;
        Ok(archive)
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }

    /// Entries in the log, pending ones included.
    pub fn entries(&self) -> u64 {
        self.tree.size()
    }

    /// Entries the latest checkpoint covers.
    pub fn checkpoint_tree_size(&self) -> u64 {
        self.checkpoint_tree_size
    }

    /// Checkpoints in the checkpoints file.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints_written
    }

    /// The public key text (`<name>+<key id>+<key>`), as in `keys/checkpoint.vkey`.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier().to_text()
    }

    /// Ingests one audit-lane record of `device` (chunk `lane_seq`, record `record_index`): an
    /// evidence record becomes a decision entry, a model record a model entry; their objects
    /// go into the store. A (device, kind, id) already logged is not appended again.
    pub fn ingest_record(
        &mut self,
        device: &str,
        lane_seq: u64,
        record_index: u32,
        record: &RecordRef<'_>,
    ) -> Result<Ingested, ArchiveError> {
        if self.poisoned {
            return Err(ArchiveError::Poisoned);
        }
        let rejected = |reason: String| ArchiveError::Rejected { key: record.key.to_string(), reason };
        validate_device(device).map_err(|error| rejected(error.to_string()))?;
        let (leaf, ingested, blobs) = match record.content_type {
            EVIDENCE_CONTENT_TYPE => {
                let evidence =
                    Evidence::decode(record.payload).map_err(|error| rejected(error.to_string()))?;
                if evidence.decision.decision_id != record.key {
                    return Err(rejected(format!(
                        "record key differs from decision id {:?}",
                        evidence.decision.decision_id
                    )));
                }
                let leaf = LeafEntry::decision(device, lane_seq, record_index, &evidence);
                let mut blobs = vec![evidence.original.clone()];
                blobs.extend(evidence.modified.clone());
                (leaf, IngestedRecord::Decision(Box::new(evidence)), blobs)
            }
            MODEL_CONTENT_TYPE => {
                let model =
                    ModelRecord::decode(record.payload).map_err(|error| rejected(error.to_string()))?;
                if model_record_key(&model.model.sha256) != record.key {
                    return Err(rejected("record key is not the model's key".to_string()));
                }
                let leaf = LeafEntry::model(device, lane_seq, record_index, &model);
                let ingested = IngestedRecord::Model { name: model.name.clone(), sha256: model.model.sha256 };
                (leaf, ingested, vec![model.model])
            }
            other => return Err(rejected(format!("content type {other:?} is not archived"))),
        };
        let bytes = leaf.encode().map_err(|error| rejected(error.to_string()))?;
        let kind = leaf.kind();
        let id = leaf.id();
        let hash = id_hash(kind, &id);
        if let Some(entry_index) = self.find(hash, device, kind, &id)? {
            return Ok(Ingested { outcome: IngestOutcome::Duplicate { entry_index }, record: ingested });
        }
        if self.tree.size() >= ENTRIES_MAX {
            return Err(ArchiveError::Inconsistent(format!("the log is full ({ENTRIES_MAX} entries)")));
        }
        for blob in &blobs {
            self.objects.put(&blob.sha256, &blob.bytes)?;
        }
        let entry_index = self.tree.size();
        self.tree.push(leaf_hash(&bytes));
        self.ids.entry(hash).or_default().push(entry_index);
        self.pending.push(PendingEntry { bytes, device: device.to_string(), kind, id });
        if self.pending.len() as u64 >= self.config.checkpoint_every_entries {
            self.flush()?;
        }
        Ok(Ingested { outcome: IngestOutcome::Appended { entry_index }, record: ingested })
    }

    /// The entry index of (device, kind, id), if logged.
    fn find(
        &self,
        hash: IdHash,
        device: &str,
        kind: EntryKind,
        id: &str,
    ) -> Result<Option<u64>, ArchiveError> {
        let Some(candidates) = self.ids.get(&hash) else { return Ok(None) };
        for &entry_index in candidates {
            let durable = self.records.len() as u64;
            let matches = if entry_index < durable {
                let record = &self.records[entry_index as usize];
                let bytes =
                    read_entry(&self.entries_reader()?, record).map_err(ArchiveError::Inconsistent)?;
                let leaf = LeafEntry::decode(&bytes)
                    .map_err(|error| ArchiveError::Inconsistent(format!("entry {entry_index}: {error}")))?;
                leaf.device == device && leaf.kind() == kind && leaf.id() == id
            } else {
                let pending = &self.pending[(entry_index - durable) as usize];
                pending.device == device && pending.kind == kind && pending.id == id
            };
            if matches {
                return Ok(Some(entry_index));
            }
        }
        Ok(None)
    }

    fn entries_reader(&self) -> Result<File, ArchiveError> {
        let path = entries_path(&self.config.root);
        File::open(&path).map_err(archive_io(&path))
    }

    /// Makes every ingested entry durable and signs a checkpoint over the whole log (when it grew).
    pub fn flush(&mut self) -> Result<(), ArchiveError> {
        if self.poisoned {
            return Err(ArchiveError::Poisoned);
        }
        if self.pending.is_empty() && self.tree.size() == self.checkpoint_tree_size {
            return Ok(());
        }
        let result = self.write_pending();
        if result.is_err() {
            // The files may hold part of this flush; only recovery at open knows what is whole.
            self.poisoned = true;
        }
        result
    }

    fn write_pending(&mut self) -> Result<(), ArchiveError> {
        let root = self.config.root.clone();
        self.objects.sync()?;
        let mut frames = Vec::new();
        let mut new_records = Vec::with_capacity(self.pending.len());
        let mut offset = self.entries_length;
        for pending in &self.pending {
            let frame = encode_frame(&pending.bytes, LEAF_BYTES_MAX);
            let record = IndexRecord {
                offset,
                length: pending.bytes.len() as u32,
                leaf_hash: leaf_hash(&pending.bytes),
                id_hash: id_hash(pending.kind, &pending.id),
            };
            assert_eq!(record.end(), offset + frame.len() as u64);
            offset = record.end();
            frames.extend_from_slice(&frame);
            new_records.push(record);
        }
        if !frames.is_empty() {
            let path = entries_path(&root);
            self.entries
                .write_all(&frames)
                .and_then(|()| self.entries.sync_data())
                .map_err(archive_io(&path))?;
            let path = index_path(&root);
            let index_bytes: Vec<u8> = new_records.iter().flat_map(|record| record.encode()).collect();
            self.index
                .write_all(&index_bytes)
                .and_then(|()| self.index.sync_data())
                .map_err(archive_io(&path))?;
        }
        self.entries_length = offset;
        for (position, record) in new_records.iter().enumerate() {
            let entry_index = self.records.len() + position;
            assert_eq!(self.tree.leaf(entry_index as u64), Some(&record.leaf_hash));
        }
        self.records.extend(new_records);
        self.pending.clear();
        assert_eq!(self.records.len() as u64, self.tree.size());

        let checkpoint = Checkpoint {
            origin: self.config.origin.clone(),
            tree_size: self.tree.size(),
            root_hash: self.tree.root(self.tree.size()),
        };
        let note = self.signer.sign(&checkpoint);
        let frame = encode_frame(&note, crate::checkpoint::CHECKPOINT_BYTES_MAX);
        let path = checkpoints_path(&root);
        self.checkpoints
            .write_all(&frame)
            .and_then(|()| self.checkpoints.sync_data())
            .map_err(archive_io(&path))?;
        self.checkpoint_tree_size = checkpoint.tree_size;
        self.checkpoints_written += 1;
        tracing::debug!(tree_size = checkpoint.tree_size, "archive checkpoint signed");
        Ok(())
    }
}

// Frames of the largest leaf fit the index's 32-bit lengths.
const _: () = assert!(FRAME_HEADER_BYTES + LEAF_BYTES_MAX < u32::MAX as usize);
