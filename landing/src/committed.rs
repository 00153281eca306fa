//! The one reader of committed raw landing, for everything downstream of the sink's commits: the
//! dataset pipeline, the archive feed, replication.
//!
//! What is committed. A raw landing checkpoint (`RawLanding`'s `Committer::checkpoint`, which the
//! lander publishes after every commit) names per (device, lane) the newest file and its committed
//! length. Every older file of the lane is committed whole: `RawLanding` fsyncs a file before it
//! starts the next one and never writes to it again. Bytes past the committed length of the newest
//! file and files newer than it are not committed (writes in flight, or a torn tail that recovery
//! truncates) and are never read.
//!
//! Layout read (see `raw`): `<landing_dir>/raw/<device>/<lane>/<first seq, 20 digits>.tcr`, each a
//! sequence of records `length u32 LE ‖ encoded chunk`, seqs increasing per (device, lane) across
//! the files.
//!
//! Position. A consumer keeps a [`ReadPosition`] per (device, lane): the file and offset of the
//! next record and the highest seq it consumed. Reading resumes at that file and offset; chunks at
//! or below `through_seq` are passed over, so a consumer resuming from an older offset still sees
//! each chunk once. `ReadPosition::default()` is the start of the lane.
//!
//! Limits. Each length prefix is checked against `protocol::CHUNK_ENCODED_BYTES_MAX` before
//! anything is allocated; a reader holds one record buffer (at most `CHUNK_ENCODED_BYTES_MAX`,
//! about 4 MiB) and one `READ_BUFFER_BYTES` file buffer whatever the file sizes. A caller bounds
//! one step with [`LaneReader::bytes_read`] (it overshoots by at most one record).
//!
//! Damage. A record crossing the committed end of its file, a file shorter than its committed
//! length, a length prefix over the limit, a chunk that fails `protocol::decode_chunk`, a chunk of
//! another lane, or a seq not above the one before it is reported as [`ReadError::Damaged`] with
//! the file and the record's offset. Nothing is yielded past damage: the reader's position stays
//! before the damaged record, and every later call reports the same damage.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use protocol::{CHUNK_ENCODED_BYTES_MAX, CHUNK_HEADER_LEN, ChunkHeader, DecodeError, Lane};

use crate::raw::{
    CommittedPositions, FilePosition, LandingError, RECORD_LENGTH_BYTES, parse_checkpoint, raw_files,
};

/// The file buffer of a reader: records are read through it, so small records cost no syscall
/// each.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

// A length prefix holds any chunk length.
const _: () = assert!(CHUNK_ENCODED_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(RECORD_LENGTH_BYTES == size_of::<u32>());

/// Where a consumer is in the committed landing of one (device, lane).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadPosition {
    /// The file of the next record (named by its first seq).
    pub file_first_seq: u64,
    /// The offset of the next record in that file.
    pub offset: u64,
    /// The highest seq consumed; chunks at or below it are passed over.
    pub through_seq: u64,
}

/// What is wrong with a record in committed landing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("a record needs {needed} bytes but {available} are left before the committed end")]
    Truncated { needed: u64, available: u64 },
    #[error("the file is {length} bytes, shorter than its committed {committed} bytes")]
    ShorterThanCommitted { length: u64, committed: u64 },
    #[error("the length prefix says {length} bytes, above the chunk limit of {max}")]
    RecordTooLarge { length: u64, max: usize },
    #[error("the chunk does not verify: {0}")]
    Chunk(#[source] DecodeError),
    #[error("a {found} chunk among the {expected} lane's files")]
    WrongLane { expected: Lane, found: Lane },
    #[error("seq {seq} follows seq {previous}: seqs must increase")]
    SeqNotIncreasing { previous: u64, seq: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading committed landing: {0}")]
    Landing(#[from] LandingError),
    #[error("reading committed landing {path} at offset {offset}: {source}")]
    Io {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("committed landing {path} is damaged at offset {offset}: {damage}")]
    Damaged { path: PathBuf, offset: u64, damage: Damage },
}

/// The committed landing one checkpoint covers.
#[derive(Clone, Debug)]
pub struct CommittedLanding {
    landing_dir: PathBuf,
    positions: CommittedPositions,
}

impl CommittedLanding {
    /// `checkpoint` is `RawLanding`'s checkpoint at a commit (empty: nothing committed yet).
    pub fn new(landing_dir: &Path, checkpoint: &[u8]) -> Result<CommittedLanding, LandingError> {
        Ok(CommittedLanding {
            landing_dir: landing_dir.to_path_buf(),
            positions: parse_checkpoint(checkpoint)?,
        })
    }

    /// Every (device, lane) with committed chunks, in order.
    pub fn lanes(&self) -> impl Iterator<Item = (&str, Lane)> + '_ {
        self.positions.keys().map(|(device, lane)| (device.as_str(), *lane))
    }

    /// The committed end of (device, lane): its newest file and that file's committed length.
    pub fn end(&self, device: &str, lane: Lane) -> Option<FilePosition> {
        self.positions.get(&(device.to_string(), lane)).copied()
    }

    /// A reader of the committed chunks of (device, lane) after `from` (none if the checkpoint
    /// does not name the lane). Lists the lane's files now; files started later are past the
    /// checkpoint anyway.
    pub fn read(&self, device: &str, lane: Lane, from: ReadPosition) -> Result<LaneReader, ReadError> {
        let mut files = VecDeque::new();
        if let Some(end) = self.end(device, lane) {
            for (first_seq, path) in raw_files(&self.landing_dir, device, lane)? {
                if first_seq < from.file_first_seq || first_seq > end.first_seq {
                    continue;
                }
                let offset = if first_seq == from.file_first_seq { from.offset } else { 0 };
                let committed_length = (first_seq == end.first_seq).then_some(end.length);
                files.push_back(PendingFile { first_seq, path, offset, committed_length });
            }
        }
        Ok(LaneReader {
            lane,
            files,
            current: None,
            position: from,
            previous_seq: None,
            record: Vec::new(),
            bytes_read: 0,
        })
    }
}

/// A committed chunk, verified, and the position just after it.
#[derive(Debug)]
pub struct CommittedChunk<'a> {
    pub header: ChunkHeader,
    /// Header ‖ body, as landed.
    pub encoded: &'a [u8],
    /// Where the consumer is once it has consumed this chunk.
    pub position: ReadPosition,
}

impl CommittedChunk<'_> {
    pub fn body(&self) -> &[u8] {
        &self.encoded[CHUNK_HEADER_LEN..]
    }
}

struct PendingFile {
    first_seq: u64,
    path: PathBuf,
    offset: u64,
    /// `None` for a sealed file (committed whole).
    committed_length: Option<u64>,
}

/// Yields the committed chunks of one (device, lane) in seq order; see the module doc.
pub struct LaneReader {
    lane: Lane,
    /// Files not opened yet, oldest first.
    files: VecDeque<PendingFile>,
    /// The file being read and its first seq.
    current: Option<(u64, RecordFile)>,
    position: ReadPosition,
    previous_seq: Option<u64>,
    /// The last record read (reused: grows to the largest record, at most the chunk limit).
    record: Vec<u8>,
    bytes_read: u64,
}

impl LaneReader {
    /// The next committed chunk after the position, or `None` at the committed end. After an
    /// error the position stays before the record at fault, and the next call reads it again.
    pub fn next_chunk(&mut self) -> Result<Option<CommittedChunk<'_>>, ReadError> {
        let header = loop {
            if self.current.is_none() {
                let Some(next) = self.files.front() else { return Ok(None) };
                // Left in the queue until it opens, so that a failed open is tried again.
                let file = RecordFile::open(&next.path, next.offset, next.committed_length)?;
                let first_seq = next.first_seq;
                self.files.pop_front();
                self.current = Some((first_seq, file));
            }
            let (first_seq, file) = self.current.as_mut().expect("opened above");
            let record_offset = file.offset;
            let Some(header) = file.next_record(&mut self.record, Some(self.lane), self.previous_seq)? else {
                self.current = None;
                continue;
            };
            self.previous_seq = Some(header.seq);
            self.bytes_read += file.offset - record_offset;
            let passed_over = header.seq <= self.position.through_seq;
            self.position = ReadPosition {
                file_first_seq: *first_seq,
                offset: file.offset,
                through_seq: self.position.through_seq.max(header.seq),
            };
            if !passed_over {
                break header;
            }
        };
        Ok(Some(CommittedChunk { header, encoded: &self.record, position: self.position }))
    }

    /// After the last chunk consumed or passed over: where the next read starts.
    pub fn position(&self) -> ReadPosition {
        self.position
    }

    /// Bytes of records read so far, length prefixes included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

/// The records of one file from an offset up to an end, read through a bounded buffer.
struct RecordFile {
    path: PathBuf,
    reader: BufReader<File>,
    /// Of the next record.
    offset: u64,
    /// Where reading stops: the committed length, or the file's length if that is shorter.
    end: u64,
    /// The committed length (the file's length for a sealed file).
    committed_end: u64,
    /// Set after an error: the buffered reader is somewhere inside the record at `offset`.
    seek_before_reading: bool,
}

impl RecordFile {
    /// Reads `path` from `offset` to `committed_length` (`None`: the whole file).
    fn open(path: &Path, offset: u64, committed_length: Option<u64>) -> Result<RecordFile, ReadError> {
        let io = |source| ReadError::Io { path: path.to_path_buf(), offset, source };
        let mut file = File::open(path).map_err(io)?;
        let length = file.metadata().map_err(io)?.len();
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let committed_end = committed_length.unwrap_or(length);
        Ok(RecordFile {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(READ_BUFFER_BYTES, file),
            offset,
            end: committed_end.min(length),
            committed_end,
            seek_before_reading: false,
        })
    }

    /// Reads the record at `offset` into `record`, verifies its chunk (of `lane` if given, with a
    /// seq above `previous_seq` if given) and moves past it; `None` at the end. On an error the
    /// offset stays at the record, and the next call reads it again.
    fn next_record(
        &mut self,
        record: &mut Vec<u8>,
        lane: Option<Lane>,
        previous_seq: Option<u64>,
    ) -> Result<Option<ChunkHeader>, ReadError> {
        if self.offset >= self.end && self.end == self.committed_end {
            return Ok(None);
        }
        if std::mem::take(&mut self.seek_before_reading) {
            let offset = self.offset;
            self.reader.seek(SeekFrom::Start(offset)).map_err(|source| ReadError::Io {
                path: self.path.clone(),
                offset,
                source,
            })?;
        }
        match self.read_record(record, lane, previous_seq) {
            Ok(header) => {
                self.offset += (RECORD_LENGTH_BYTES + record.len()) as u64;
                Ok(Some(header))
            }
            Err(error) => {
                self.seek_before_reading = true;
                Err(error)
            }
        }
    }

    fn read_record(
        &mut self,
        record: &mut Vec<u8>,
        lane: Option<Lane>,
        previous_seq: Option<u64>,
    ) -> Result<ChunkHeader, ReadError> {
        let offset = self.offset;
        let damaged = |damage| ReadError::Damaged { path: self.path.clone(), offset, damage };
        let io = |source| ReadError::Io { path: self.path.clone(), offset, source };
        // Past `end` only when the file is shorter than its committed length.
        let available = self.end.saturating_sub(offset);
        let short = |needed| {
            if self.end < self.committed_end {
                Damage::ShorterThanCommitted { length: self.end, committed: self.committed_end }
            } else {
                Damage::Truncated { needed, available }
            }
        };
        if available < RECORD_LENGTH_BYTES as u64 {
            return Err(damaged(short(RECORD_LENGTH_BYTES as u64)));
        }
        let mut prefix = [0u8; RECORD_LENGTH_BYTES];
        self.reader.read_exact(&mut prefix).map_err(io)?;
        let length = u64::from(u32::from_le_bytes(prefix));
        if length > CHUNK_ENCODED_BYTES_MAX as u64 {
            return Err(damaged(Damage::RecordTooLarge { length, max: CHUNK_ENCODED_BYTES_MAX }));
        }
        let needed = RECORD_LENGTH_BYTES as u64 + length;
        if needed > available {
            return Err(damaged(short(needed)));
        }
        record.clear();
        record.resize(usize::try_from(length).expect("bounded by CHUNK_ENCODED_BYTES_MAX"), 0);
        self.reader.read_exact(record).map_err(io)?;
        let (header, _) = protocol::decode_chunk(record).map_err(|error| damaged(Damage::Chunk(error)))?;
        if let Some(expected) = lane
            && header.lane != expected
        {
            return Err(damaged(Damage::WrongLane { expected, found: header.lane }));
        }
        if let Some(previous) = previous_seq
            && header.seq <= previous
        {
            return Err(damaged(Damage::SeqNotIncreasing { previous, seq: header.seq }));
        }
        Ok(header)
    }
}

/// Reads every chunk of one landed file, whole, verifying each (length prefix bounded, chunk
/// checked, seqs increasing). For tests and tools that inspect a file; consumers of committed
/// data use [`CommittedLanding`], which knows where the committed data ends.
pub fn read_landed_file(path: &Path) -> Result<Vec<(ChunkHeader, Vec<u8>)>, ReadError> {
    let mut file = RecordFile::open(path, 0, None)?;
    let mut record = Vec::new();
    let mut chunks: Vec<(ChunkHeader, Vec<u8>)> = Vec::new();
    while let Some(header) =
        file.next_record(&mut record, None, chunks.last().map(|(header, _)| header.seq))?
    {
        chunks.push((header, record.clone()));
    }
    Ok(chunks)
}
