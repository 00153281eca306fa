//! Durable landing of verified chunks: the `Committer` interface and the raw landing committer.
//!
//! A committer receives chunks that the sink has verified and deduplicated, writes them, and makes
//! them durable only at `commit`. Its state at a commit (`checkpoint`) is stored by the sink in
//! the same transaction as the watermarks it covers; after a crash, `recover` gets the last
//! checkpoint and must drop everything written after it, so nothing is landed twice.
//!
//! Raw landing layout (the archive of originals as received):
//! `<landing_dir>/raw/<device>/<lane>/<first seq, 20 digits>.tcr`, each file a sequence of
//! records `length u32 LE ‖ encoded chunk (header ‖ body)`, chunks in seq order. A record's
//! length is at most `protocol::CHUNK_ENCODED_BYTES_MAX`. A file is rotated (a new one started)
//! at the first chunk after it reached `rotate_bytes`; the full file is fsynced first, so once a
//! commit records a newer file, every older file of the lane is committed whole. At most
//! `open_files_max` files are open at once (file descriptors are a process-wide limit, and every
//! (device, lane) that ever landed would otherwise keep one): landing on a lane whose file is not
//! open when the limit is reached closes the least recently used file first (fsyncing it if it
//! holds uncommitted bytes, then remembering its position for the next commit), and the lane
//! continues in a new file, exactly as after a rotation. Checkpoint: one
//! line per (device, lane): `device lane first_seq committed_length` (the newest file of the lane
//! and how much of it is committed). Readers of committed data use `committed`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use protocol::{ChunkHeader, Lane};

#[derive(Debug, thiserror::Error)]
pub enum LandingError {
    #[error("landing I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("landing checkpoint is malformed at line {line}: {reason}")]
    Checkpoint { line: usize, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LandingError + '_ {
    move |source| LandingError::Io { path: path.to_path_buf(), source }
}

/// Where training datasets and archives plug in. Calls come from one thread, in order.
pub trait Committer: Send {
    /// Writes a verified chunk of `device`; not yet durable.
    fn land(&mut self, device: &str, header: &ChunkHeader, encoded: &[u8]) -> Result<(), LandingError>;
    /// Makes everything landed so far durable (fsync of data and directories).
    fn commit(&mut self) -> Result<(), LandingError>;
    /// State to store with the watermarks of this commit.
    fn checkpoint(&self) -> Vec<u8>;
    /// Called once at start with the last stored checkpoint: drops whatever was written after it.
    fn recover(&mut self, checkpoint: Option<&[u8]>) -> Result<(), LandingError>;
    /// Forgets uncommitted writes of one (device, lane) after a failed `land`, so that its
    /// resent chunks land cleanly.
    fn discard_uncommitted(&mut self, device: &str, lane: Lane) -> Result<(), LandingError>;
    /// Files the committer holds open (for metrics).
    fn open_files(&self) -> usize {
        0
    }
    /// Files closed so far to stay within the committer's open-file limit (for metrics).
    fn files_closed_at_limit(&self) -> u64 {
        0
    }
}

/// Bytes of a record's length prefix.
pub const RECORD_LENGTH_BYTES: usize = 4;

/// A file of one (device, lane) and a length in it: the committed end of a lane in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilePosition {
    /// The file's first seq, which names it.
    pub first_seq: u64,
    pub length: u64,
}

struct OpenFile {
    file: File,
    position: FilePosition,
    dirty: bool,
    created: bool,
    /// `RawLanding::uses` at its last write: the least recently used file is closed first.
    last_used: u64,
}

/// A file closed at the open-file limit while it held uncommitted bytes: already fsynced, its
/// position goes into the next commit's checkpoint (unless a newer file of the lane does).
#[derive(Clone, Copy)]
struct ClosedUncommitted {
    position: FilePosition,
    created: bool,
}

/// Default for [`RawLanding::with_open_files_max`]: well under the usual 1024 descriptors.
pub const OPEN_FILES_MAX_DEFAULT: usize = 256;

/// Append-only, rotated, fsynced files of verified chunks per device and lane.
pub struct RawLanding {
    root: PathBuf,
    rotate_bytes: u64,
    open_files_max: usize,
    open: BTreeMap<(String, Lane), OpenFile>,
    closed_uncommitted: BTreeMap<(String, Lane), ClosedUncommitted>,
    committed: BTreeMap<(String, Lane), FilePosition>,
    uses: u64,
    closed_at_limit: u64,
}

const FILE_SUFFIX: &str = ".tcr";

impl RawLanding {
    pub fn new(landing_dir: &Path, rotate_bytes: u64) -> RawLanding {
        RawLanding::with_open_files_max(landing_dir, rotate_bytes, OPEN_FILES_MAX_DEFAULT)
    }

    /// A raw landing that keeps at most `open_files_max` (at least 1) files open.
    pub fn with_open_files_max(landing_dir: &Path, rotate_bytes: u64, open_files_max: usize) -> RawLanding {
        assert!(open_files_max >= 1, "open_files_max must be at least 1");
        RawLanding {
            root: landing_dir.join("raw"),
            rotate_bytes,
            open_files_max,
            open: BTreeMap::new(),
            closed_uncommitted: BTreeMap::new(),
            committed: BTreeMap::new(),
            uses: 0,
            closed_at_limit: 0,
        }
    }

    /// Closes the least recently used open file, a clean one if there is one; a file with
    /// uncommitted bytes is fsynced first and its position kept for the next commit.
    fn close_least_recently_used(&mut self) -> Result<(), LandingError> {
        let victim = self
            .open
            .iter()
            .min_by_key(|(_, open)| (open.dirty, open.last_used))
            .map(|(key, _)| key.clone())
            .expect("called with open files");
        let open = self.open.remove(&victim).expect("chosen above");
        if open.dirty {
            let path = self.file_path(&victim.0, victim.1, open.position.first_seq);
            open.file.sync_data().map_err(io_error(&path))?;
            let created =
                open.created || self.closed_uncommitted.get(&victim).is_some_and(|closed| closed.created);
            self.closed_uncommitted.insert(victim, ClosedUncommitted { position: open.position, created });
        }
        self.closed_at_limit += 1;
        Ok(())
    }

    fn lane_dir(&self, device: &str, lane: Lane) -> PathBuf {
        self.root.join(device).join(lane.name())
    }

    fn file_path(&self, device: &str, lane: Lane, first_seq: u64) -> PathBuf {
        self.lane_dir(device, lane).join(format!("{first_seq:020}{FILE_SUFFIX}"))
    }
}

fn parse_first_seq(path: &Path) -> Option<u64> {
    path.file_name()?.to_str()?.strip_suffix(FILE_SUFFIX)?.parse().ok()
}

fn sync_directory(path: &Path) -> Result<(), LandingError> {
    durable::sync_directory(path).map_err(|error| io_error(path)(error.source))
}

impl RawLanding {
    /// Brings the files of (device, lane) back to the last commit: the committed file truncated to
    /// its committed length, files started after it removed, older (sealed) files kept.
    fn roll_back_lane(&self, device: &str, lane: Lane) -> Result<(), LandingError> {
        let committed = self.committed.get(&(device.to_string(), lane)).copied();
        let landing_dir = self.root.parent().expect("raw root is inside the landing dir");
        for (first_seq, path) in raw_files(landing_dir, device, lane)? {
            match committed {
                Some(position) if first_seq == position.first_seq => {
                    let file = OpenOptions::new().write(true).open(&path).map_err(io_error(&path))?;
                    let length = file.metadata().map_err(io_error(&path))?.len();
                    if length > position.length {
                        tracing::info!(path = %path.display(), from = length, to = position.length, "truncating landed file to its last commit");
                        file.set_len(position.length).map_err(io_error(&path))?;
                        file.sync_all().map_err(io_error(&path))?;
                    }
                }
                Some(position) if first_seq < position.first_seq => {} // sealed by an earlier commit
                _ => {
                    tracing::info!(path = %path.display(), "removing a landed file written after the last commit");
                    fs::remove_file(&path).map_err(io_error(&path))?;
                }
            }
        }
        Ok(())
    }
}

impl Committer for RawLanding {
    fn land(&mut self, device: &str, header: &ChunkHeader, encoded: &[u8]) -> Result<(), LandingError> {
        let key = (device.to_string(), header.lane);
        let rotate = self.open.get(&key).is_some_and(|open| open.position.length >= self.rotate_bytes);
        if rotate {
            // Sync the full file now: the next commit records only the new file, and everything in
            // older files counts as committed from then on.
            let full = self.open.remove(&key).expect("checked above");
            if full.dirty {
                full.file.sync_data().map_err(io_error(&self.file_path(
                    device,
                    header.lane,
                    full.position.first_seq,
                )))?;
            }
        }
        if !self.open.contains_key(&key) && self.open.len() >= self.open_files_max {
            self.close_least_recently_used()?;
        }
        if !self.open.contains_key(&key) {
            let directory = self.lane_dir(device, header.lane);
            fs::create_dir_all(&directory).map_err(io_error(&directory))?;
            let path = self.file_path(device, header.lane, header.seq);
            let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_error(&path))?;
            let length = file.metadata().map_err(io_error(&path))?.len();
            self.open.insert(
                key.clone(),
                OpenFile {
                    file,
                    position: FilePosition { first_seq: header.seq, length },
                    dirty: false,
                    created: true,
                    last_used: 0,
                },
            );
        }
        self.uses += 1;
        let uses = self.uses;
        let first_seq = self.open[&key].position.first_seq;
        let path = self.file_path(device, header.lane, first_seq);
        let open = self.open.get_mut(&key).expect("inserted above");
        let length = u32::try_from(encoded.len()).expect("chunks are bounded by CHUNK_ENCODED_BYTES_MAX");
        let mut record = Vec::with_capacity(RECORD_LENGTH_BYTES + encoded.len());
        record.extend_from_slice(&length.to_le_bytes());
        record.extend_from_slice(encoded);
        open.file.write_all(&record).map_err(io_error(&path))?;
        open.position.length += record.len() as u64;
        open.dirty = true;
        open.last_used = uses;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), LandingError> {
        let mut new_directories = BTreeSet::new();
        // Closed at the open-file limit: fsynced then; a newer file of the lane, if one is open
        // and dirty, overrides this position below.
        for ((device, lane), closed) in std::mem::take(&mut self.closed_uncommitted) {
            if closed.created {
                new_directories.insert(self.lane_dir(&device, lane));
                new_directories.insert(self.root.join(&device));
                new_directories.insert(self.root.clone());
            }
            self.committed.insert((device, lane), closed.position);
        }
        for ((device, lane), open) in &mut self.open {
            if !open.dirty {
                continue;
            }
            let path = self
                .root
                .join(device)
                .join(lane.name())
                .join(format!("{:020}{FILE_SUFFIX}", open.position.first_seq));
            open.file.sync_data().map_err(io_error(&path))?;
            if open.created {
                new_directories.insert(path.parent().expect("file has a directory").to_path_buf());
                new_directories.insert(self.root.join(device));
                new_directories.insert(self.root.clone());
            }
            open.dirty = false;
            open.created = false;
            self.committed.insert((device.clone(), *lane), open.position);
        }
        for directory in new_directories {
            sync_directory(&directory)?;
        }
        Ok(())
    }

    fn checkpoint(&self) -> Vec<u8> {
        let mut text = String::new();
        for ((device, lane), position) in &self.committed {
            text.push_str(&format!("{device} {} {} {}\n", lane.name(), position.first_seq, position.length));
        }
        text.into_bytes()
    }

    fn recover(&mut self, checkpoint: Option<&[u8]>) -> Result<(), LandingError> {
        self.open.clear();
        self.closed_uncommitted.clear();
        self.committed = parse_checkpoint(checkpoint.unwrap_or_default())?;
        let devices: Vec<PathBuf> = match fs::read_dir(&self.root) {
            Ok(entries) => entries.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(LandingError::Io { path: self.root.clone(), source: error }),
        };
        for device_dir in devices {
            let Some(device) = device_dir.file_name().and_then(|name| name.to_str()).map(str::to_string)
            else {
                continue;
            };
            for lane in Lane::ALL {
                self.roll_back_lane(&device, lane)?;
            }
        }
        Ok(())
    }

    fn open_files(&self) -> usize {
        self.open.len()
    }

    fn files_closed_at_limit(&self) -> u64 {
        self.closed_at_limit
    }

    fn discard_uncommitted(&mut self, device: &str, lane: Lane) -> Result<(), LandingError> {
        self.open.remove(&(device.to_string(), lane));
        self.closed_uncommitted.remove(&(device.to_string(), lane));
        self.roll_back_lane(device, lane)
    }
}

/// The committed end of every (device, lane) in a raw landing checkpoint: the file that starts
/// at `first_seq` is committed through `length` bytes; older files are committed whole.
pub type CommittedPositions = BTreeMap<(String, Lane), FilePosition>;

/// Parses a raw landing checkpoint (`RawLanding`'s `Committer::checkpoint`).
pub fn parse_checkpoint(checkpoint: &[u8]) -> Result<CommittedPositions, LandingError> {
    let text = String::from_utf8_lossy(checkpoint);
    let mut positions = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let malformed =
            |reason: &str| LandingError::Checkpoint { line: index + 1, reason: reason.to_string() };
        let fields: Vec<&str> = line.split(' ').collect();
        let [device, lane, first_seq, length] = fields[..] else {
            return Err(malformed("expected 4 fields"));
        };
        let lane: Lane = lane.parse().map_err(|_| malformed("unknown lane"))?;
        let first_seq = first_seq.parse().map_err(|_| malformed("bad first seq"))?;
        let length = length.parse().map_err(|_| malformed("bad length"))?;
        positions.insert((device.to_string(), lane), FilePosition { first_seq, length });
    }
    Ok(positions)
}

/// The raw landing file of (device, lane) whose first seq is `first_seq`, under `landing_dir`.
pub fn raw_file_path(landing_dir: &Path, device: &str, lane: Lane, first_seq: u64) -> PathBuf {
    raw_lane_dir(landing_dir, device, lane).join(format!("{first_seq:020}{FILE_SUFFIX}"))
}

fn raw_lane_dir(landing_dir: &Path, device: &str, lane: Lane) -> PathBuf {
    landing_dir.join("raw").join(device).join(lane.name())
}

/// The raw landing files of (device, lane) under `landing_dir`, oldest first, with their first
/// seq; none if the lane has no directory. Other names in the directory are not landing files
/// and are left out.
pub fn raw_files(landing_dir: &Path, device: &str, lane: Lane) -> Result<Vec<(u64, PathBuf)>, LandingError> {
    let directory = raw_lane_dir(landing_dir, device, lane);
    let entries = match fs::read_dir(&directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(LandingError::Io { path: directory, source: error }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_error(&directory))?.path();
        if let Some(first_seq) = parse_first_seq(&path) {
            files.push((first_seq, path));
        }
    }
    files.sort();
    Ok(files)
}
