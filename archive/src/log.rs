//! The files of the decision log under `<root>/log/`.
//!
//! ```text
//! entries      := "TRBLOG\0\x01" ‖ frame(leaf bytes)*            (frame.rs; leaf ≤ LEAF_BYTES_MAX)
//! index        := "TRBIDX\0\x01" ‖ record*                       (60 bytes each)
//! record       := entry offset u64 LE ‖ payload length u32 LE ‖ leaf hash (32) ‖ id hash (16)
//! checkpoints  := "TRBCKP\0\x01" ‖ frame(signed checkpoint note)* (note ≤ CHECKPOINT_BYTES_MAX)
//! ```
//!
//! The id hash is the first 16 bytes of `SHA-256(kind ‖ 0x00 ‖ id)`: `show ID` finds candidates in
//! the index and reads only their entries. The index is derived from the entries (rebuilt from
//! them after a crash); the entries are the record, the checkpoints commit to them.
//!
//! Write order per flush: objects' directories fsynced, entries appended and fsynced, index
//! appended and fsynced, checkpoint appended and fsynced. Readers therefore read in the reverse
//! order (checkpoints, index, entries) to see a consistent prefix while a writer appends.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::checkpoint::CHECKPOINT_BYTES_MAX;
use crate::frame::{FRAME_HEADER_BYTES, FrameError, FrameRead, MAGIC_BYTES, read_frame};
use crate::leaf::{EntryKind, LEAF_BYTES_MAX};
use crate::merkle::Hash;

pub const ENTRIES_MAGIC: &[u8; MAGIC_BYTES] = b"TRBLOG\0\x01";
pub const INDEX_MAGIC: &[u8; MAGIC_BYTES] = b"TRBIDX\0\x01";
pub const CHECKPOINTS_MAGIC: &[u8; MAGIC_BYTES] = b"TRBCKP\0\x01";
pub const INDEX_RECORD_BYTES: usize = 8 + 4 + 32 + 16;
/// Most entries in one log: keeps the in-memory tree (64 bytes per leaf) and index (60 bytes per
/// entry) within reach of one machine (about 16 GiB at the limit).
pub const ENTRIES_MAX: u64 = 1 << 27;
/// Most checkpoints read back (one per flush; 2^20 covers a flush a minute for two years).
pub const CHECKPOINTS_MAX: usize = 1 << 20;

const _: () = assert!(INDEX_RECORD_BYTES == 60);
// Both frame payloads fit the 32-bit length prefix.
const _: () = assert!(LEAF_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(CHECKPOINT_BYTES_MAX <= LEAF_BYTES_MAX);

pub type IdHash = [u8; 16];

pub fn id_hash(kind: EntryKind, id: &str) -> IdHash {
    let mut hasher = Sha256::new();
    hasher.update(kind.name().as_bytes());
    hasher.update([0]);
    hasher.update(id.as_bytes());
    hasher.finalize()[..16].try_into().expect("16 bytes")
}

pub fn log_dir(root: &Path) -> PathBuf {
    root.join("log")
}
pub fn entries_path(root: &Path) -> PathBuf {
    log_dir(root).join("entries")
}
pub fn index_path(root: &Path) -> PathBuf {
    log_dir(root).join("index")
}
pub fn checkpoints_path(root: &Path) -> PathBuf {
    log_dir(root).join("checkpoints")
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a log file of this format (magic {found:02x?})")]
    UnknownFormat { path: PathBuf, found: Vec<u8> },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {number} (1-based) in {path} is damaged: {reason}")]
    DamagedCheckpoint { path: PathBuf, number: u64, reason: String },
}

pub fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexRecord {
    /// Where the entry's frame starts in the entries file.
    pub offset: u64,
    /// Payload (leaf) bytes.
    pub length: u32,
    pub leaf_hash: Hash,
    pub id_hash: IdHash,
}

impl IndexRecord {
    pub fn encode(&self) -> [u8; INDEX_RECORD_BYTES] {
        let mut bytes = [0u8; INDEX_RECORD_BYTES];
        bytes[..8].copy_from_slice(&self.offset.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.length.to_le_bytes());
        bytes[12..44].copy_from_slice(&self.leaf_hash);
        bytes[44..].copy_from_slice(&self.id_hash);
        bytes
    }

    pub fn decode(bytes: &[u8; INDEX_RECORD_BYTES]) -> IndexRecord {
        IndexRecord {
            offset: u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
            length: u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
            leaf_hash: bytes[12..44].try_into().expect("32 bytes"),
            id_hash: bytes[44..].try_into().expect("16 bytes"),
        }
    }

    /// Where the next entry starts.
    pub fn end(&self) -> u64 {
        self.offset + FRAME_HEADER_BYTES as u64 + u64::from(self.length)
    }
}

/// Opens a log file for reading and checks its magic. `Ok(None)` when it does not exist.
pub fn open_checked(path: &Path, magic: &[u8; MAGIC_BYTES]) -> Result<Option<File>, LogError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(LogError::Io { path: path.to_path_buf(), source: error }),
    };
    let mut found = [0u8; MAGIC_BYTES];
    let mut filled = 0;
    while filled < MAGIC_BYTES {
        match file.read(&mut found[filled..]).map_err(io_error(path))? {
            0 => break,
            read => filled += read,
        }
    }
    if found[..filled] != magic[..] {
        return Err(LogError::UnknownFormat { path: path.to_path_buf(), found: found[..filled].to_vec() });
    }
    Ok(Some(file))
}

/// Creates `path` holding only `magic` unless it exists; fsyncs it and its directory.
pub fn create_if_missing(path: &Path, magic: &[u8; MAGIC_BYTES]) -> Result<(), LogError> {
    if path.exists() {
        return Ok(());
    }
    durable::write(path, magic).map_err(|error| io_error(&error.path)(error.source))
}

/// Opens an existing log file for appending.
pub fn open_append(path: &Path) -> Result<File, LogError> {
    OpenOptions::new().append(true).open(path).map_err(io_error(path))
}

/// The index records of a complete prefix of the index file, and the bytes of a partial record
/// after it.
pub fn read_index(root: &Path) -> Result<(Vec<IndexRecord>, u64), LogError> {
    let path = index_path(root);
    let Some(file) = open_checked(&path, INDEX_MAGIC)? else { return Ok((Vec::new(), 0)) };
    let length = file.metadata().map_err(io_error(&path))?.len();
    let body = length.saturating_sub(MAGIC_BYTES as u64);
    let count = body / INDEX_RECORD_BYTES as u64;
    if count > ENTRIES_MAX {
        return Err(LogError::Corrupt { path, reason: format!("{count} records exceed {ENTRIES_MAX}") });
    }
    let mut bytes = vec![0u8; (count as usize) * INDEX_RECORD_BYTES];
    file.read_exact_at(&mut bytes, MAGIC_BYTES as u64).map_err(io_error(&path))?;
    let records = bytes
        .chunks_exact(INDEX_RECORD_BYTES)
        .map(|chunk| IndexRecord::decode(chunk.try_into().expect("exact chunks")))
        .collect();
    Ok((records, body % INDEX_RECORD_BYTES as u64))
}

/// Reads the leaf bytes of one indexed entry, checking the frame against the index record.
pub fn read_entry(entries: &File, record: &IndexRecord) -> Result<Vec<u8>, String> {
    if record.length as usize > LEAF_BYTES_MAX {
        return Err(format!("index claims an entry of {} bytes", record.length));
    }
    let mut frame = vec![0u8; FRAME_HEADER_BYTES + record.length as usize];
    entries
        .read_exact_at(&mut frame, record.offset)
        .map_err(|error| format!("read at {}: {error}", record.offset))?;
    let mut reader = frame.as_slice();
    match read_frame(&mut reader, LEAF_BYTES_MAX) {
        Ok(FrameRead::Frame(payload)) if payload.len() == record.length as usize => Ok(payload),
        Ok(_) => Err(format!("entry at {} does not have the indexed length", record.offset)),
        Err(error) => Err(format!("entry at {}: {error}", record.offset)),
    }
}

/// Every whole checkpoint note in the checkpoints file and the bytes of a torn one after them.
pub fn read_checkpoint_notes(root: &Path) -> Result<(Vec<Vec<u8>>, u64), LogError> {
    let path = checkpoints_path(root);
    let Some(file) = open_checked(&path, CHECKPOINTS_MAGIC)? else { return Ok((Vec::new(), 0)) };
    let mut reader = io::BufReader::new(file);
    let mut notes = Vec::new();
    loop {
        match read_frame(&mut reader, CHECKPOINT_BYTES_MAX) {
            Ok(FrameRead::Frame(note)) => {
                if notes.len() == CHECKPOINTS_MAX {
                    return Err(LogError::Corrupt {
                        path,
                        reason: format!("more than {CHECKPOINTS_MAX} checkpoints"),
                    });
                }
                notes.push(note);
            }
            Ok(FrameRead::End) => return Ok((notes, 0)),
            Ok(FrameRead::Torn { bytes }) => return Ok((notes, bytes)),
            Err(FrameError::Io(source)) => return Err(LogError::Io { path, source }),
            Err(error) => {
                let number = notes.len() as u64 + 1;
                return Err(LogError::DamagedCheckpoint { path, number, reason: error.to_string() });
            }
        }
    }
}
