//! Files that appear in a directory, one record per file (`kind = "directory"`).
//!
//! Every `poll_interval_ms` the directory is listed (not recursively). A regular file is taken
//! once its size and modification time are the same on two polls in a row, so a file still being
//! written is left alone; writers that pause longer than a poll interval should write to a
//! dot-file or a `*.partial` / `*.tmp` name and rename it when done, since those names and
//! anything that is not a regular file (directories, symlinks, sockets) are never taken.
//!
//! A taken file becomes a record: key `<source>-<sequence>`, timestamp its modification time,
//! content type from the extension (jpg/jpeg → image/jpeg, png → image/png, json →
//! application/json, anything else application/octet-stream), lane `media` for images and other
//! blobs and `sensor` for JSON unless `lane` overrides it, tag `file_name` holding the file's
//! name. Only after the pipeline took the record is the file moved to `done/` (a name already
//! there gets the record key as a prefix) or, with `after_send = "delete"`, deleted. If that
//! fails, the file is remembered and the move retried on later polls without sending it again.
//!
//! Limits: files over `file_bytes_max` (default `FILE_BYTES_DEFAULT`, 4 000 000 bytes; at most
//! `RECORD_PAYLOAD_BYTES_MAX`) are moved to `rejected/`, counted and logged, never read; a file
//! is read through a bound of `file_bytes_max + 1` bytes, so one that grew after its size was
//! taken is caught and retried. At most `FILES_TRACKED_MAX` (4096) files are tracked between
//! polls and at most `DIRECTORY_ENTRIES_PER_POLL_MAX` (65 536) directory entries looked at per
//! poll; the rest wait for later polls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use protocol::{Lane, RECORD_PAYLOAD_BYTES_MAX};
use serde::Deserialize;
use tracing::{debug, error, info, warn};

use super::metrics::{SourceErrorKind, SourceMetrics};
use super::{
    Delivery, Handover, KeySequence, SourceConfigError, check_path, check_range, lane_setting,
    micros_since_epoch, now_us, sleep_until_unless_stopped, validate_source_name,
};
use crate::source::{RecordSender, Source, SourceRecord, StopSignal};

/// Default largest file.
pub const FILE_BYTES_DEFAULT: u64 = 4_000_000;
/// Default time between two listings of the directory.
pub const POLL_INTERVAL_DEFAULT_MS: u64 = 1_000;
/// Shortest and longest `poll_interval_ms` a config may ask for.
const POLL_INTERVAL_RANGE_MS: std::ops::RangeInclusive<u64> = 10..=3_600_000;
/// Most files remembered between polls (seen once and waiting, or sent and waiting for a move).
pub const FILES_TRACKED_MAX: usize = 4096;
/// Most directory entries looked at in one poll.
const DIRECTORY_ENTRIES_PER_POLL_MAX: usize = 65_536;
/// Where sent files go with `after_send = "move"`.
pub const DONE_DIRECTORY: &str = "done";
/// Where files over `file_bytes_max` go.
pub const REJECTED_DIRECTORY: &str = "rejected";

const _: () = assert!(FILE_BYTES_DEFAULT <= RECORD_PAYLOAD_BYTES_MAX as u64);
const _: () = assert!(FILES_TRACKED_MAX <= DIRECTORY_ENTRIES_PER_POLL_MAX);

/// What happens to a file once its record is in the pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSend {
    /// Moved to the `done/` subdirectory.
    #[default]
    Move,
    /// Deleted.
    Delete,
}

/// Settings of a `directory` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// The directory watched; it must exist.
    pub path: PathBuf,
    /// Time between two listings.
    #[serde(default = "poll_interval_default_ms")]
    pub poll_interval_ms: u64,
    /// Largest file taken, bytes.
    #[serde(default = "file_bytes_default")]
    pub file_bytes_max: u64,
    /// What happens to a file after it was sent.
    #[serde(default)]
    pub after_send: AfterSend,
    /// Lane for every file, instead of media for images and blobs, sensor for JSON.
    #[serde(default)]
    pub lane: Option<String>,
}

fn poll_interval_default_ms() -> u64 {
    POLL_INTERVAL_DEFAULT_MS
}

fn file_bytes_default() -> u64 {
    FILE_BYTES_DEFAULT
}

impl DirectoryConfig {
    /// A config with every default, watching `path`.
    pub fn new(path: impl Into<PathBuf>) -> DirectoryConfig {
        DirectoryConfig {
            path: path.into(),
            poll_interval_ms: POLL_INTERVAL_DEFAULT_MS,
            file_bytes_max: FILE_BYTES_DEFAULT,
            after_send: AfterSend::Move,
            lane: None,
        }
    }
}

/// A checked `directory` source, ready to run.
#[derive(Debug)]
pub struct DirectorySource {
    name: String,
    path: PathBuf,
    poll_interval: Duration,
    file_bytes_max: u64,
    after_send: AfterSend,
    lane: Option<Lane>,
    keys: KeySequence,
    metrics: Arc<SourceMetrics>,
}

impl DirectorySource {
    pub fn new(
        name: &str,
        config: &DirectoryConfig,
        metrics: Arc<SourceMetrics>,
    ) -> Result<DirectorySource, SourceConfigError> {
        validate_source_name(name)?;
        check_path(name, "path", &config.path)?;
        if !config.path.is_dir() {
            let found = format!("{:?} (missing or not a directory)", config.path.display().to_string());
            return Err(SourceConfigError::invalid(name, "path", "an existing directory", found));
        }
        let poll_interval_ms = check_range(
            name,
            "poll_interval_ms",
            config.poll_interval_ms,
            POLL_INTERVAL_RANGE_MS,
            "milliseconds",
        )?;
        let file_bytes_max = check_range(
            name,
            "file_bytes_max",
            config.file_bytes_max,
            1..=RECORD_PAYLOAD_BYTES_MAX as u64,
            "bytes",
        )?;
        let lane = match &config.lane {
            None => None,
            Some(text) => Some(lane_setting(name, Some(text), Lane::Media)?),
        };
        Ok(DirectorySource {
            name: name.to_string(),
            path: config.path.clone(),
            poll_interval: Duration::from_millis(poll_interval_ms),
            file_bytes_max,
            after_send: config.after_send,
            lane,
            keys: KeySequence::starting_now(name),
            metrics,
        })
    }
}

/// Content type and default lane by extension (compared without case).
fn content_type_and_lane(path: &Path) -> (&'static str, Lane) {
    let extension = path.extension().and_then(OsStr::to_str).map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("jpg" | "jpeg") => ("image/jpeg", Lane::Media),
        Some("png") => ("image/png", Lane::Media),
        Some("json") => ("application/json", Lane::Sensor),
        _ => ("application/octet-stream", Lane::Media),
    }
}

/// Names a writer uses while a file is incomplete.
fn is_incomplete_name(name: &OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.starts_with(b".") || name.ends_with(b".partial") || name.ends_with(b".tmp")
}

/// Size and modification time: a file is complete once these stop changing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Observation {
    bytes: u64,
    modified: SystemTime,
}

/// What a poll ended with.
enum PollEnd {
    Continue,
    Stopped,
    Disconnected,
}

/// State kept between polls.
struct Watcher {
    source: DirectorySource,
    /// Files seen on the last poll, with what they looked like.
    observed: HashMap<PathBuf, Observation>,
    /// Files already sent whose move or deletion failed; retried without sending again.
    sent_unfinished: HashSet<PathBuf>,
}

impl Source for DirectorySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(self: Box<Self>, out: RecordSender, stop: StopSignal) -> anyhow::Result<()> {
        for subdirectory in [DONE_DIRECTORY, REJECTED_DIRECTORY] {
            let path = self.path.join(subdirectory);
            fs::create_dir_all(&path).with_context(|| format!("failed to create {}", path.display()))?;
        }
        info!(source = %self.name, path = %self.path.display(), "directory source watching");
        let poll_interval = self.poll_interval;
        let mut watcher =
            Watcher { source: *self, observed: HashMap::new(), sent_unfinished: HashSet::new() };
        let mut next_poll = Instant::now();
        loop {
            match watcher.poll(&out, &stop) {
                PollEnd::Continue => {}
                PollEnd::Stopped => return Ok(()),
                PollEnd::Disconnected => {
                    debug!(source = %watcher.source.name, "pipeline hung up");
                    return Ok(());
                }
            }
            next_poll += poll_interval;
            // After a slow poll, wait a whole interval rather than polling back to back.
            let now = Instant::now();
            if next_poll < now {
                next_poll = now + poll_interval;
            }
            if !sleep_until_unless_stopped(next_poll, &stop) {
                return Ok(());
            }
        }
    }
}

impl Watcher {
    fn poll(&mut self, out: &RecordSender, stop: &StopSignal) -> PollEnd {
        let seen = match self.list() {
            Ok(seen) => seen,
            Err(list_error) => {
                self.source.metrics.count_error(SourceErrorKind::Io);
                warn!(source = %self.source.name, path = %self.source.path.display(), error = %list_error,
                    "listing the directory failed; retrying next poll");
                return PollEnd::Continue;
            }
        };
        self.sent_unfinished.retain(|path| seen.contains_key(path));
        // Oldest first, so files leave in the order they were written.
        let mut ready: Vec<(SystemTime, PathBuf, Observation)> = Vec::new();
        let mut observed = HashMap::new();
        for (path, observation) in seen {
            if self.sent_unfinished.contains(&path) {
                let key = self.source.keys.next_key();
                self.finish(&path, &key);
            } else if self.observed.get(&path) == Some(&observation) {
                ready.push((observation.modified, path, observation));
            } else if observed.len() < FILES_TRACKED_MAX {
                observed.insert(path, observation);
            }
        }
        self.observed = observed;
        ready.sort_by(|left, right| (left.0, &left.1).cmp(&(right.0, &right.1)));
        for (_, path, observation) in ready {
            if stop.is_stopped() {
                return PollEnd::Stopped;
            }
            match self.take(&path, observation, out, stop) {
                PollEnd::Continue => {}
                end => return end,
            }
        }
        PollEnd::Continue
    }

    /// Regular files in the directory whose names say they are complete, at most
    /// `DIRECTORY_ENTRIES_PER_POLL_MAX` entries looked at. Sorted, so the cut is stable.
    fn list(&self) -> io::Result<BTreeMap<PathBuf, Observation>> {
        let mut seen = BTreeMap::new();
        for entry in fs::read_dir(&self.source.path)?.take(DIRECTORY_ENTRIES_PER_POLL_MAX) {
            let entry = entry?;
            if is_incomplete_name(&entry.file_name()) || !entry.file_type()?.is_file() {
                continue;
            }
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                // Renamed or deleted since the listing: not ours to worry about.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            let modified = metadata.modified()?;
            seen.insert(entry.path(), Observation { bytes: metadata.len(), modified });
        }
        Ok(seen)
    }

    /// Sends one complete file and moves it out of the way.
    fn take(
        &mut self,
        path: &Path,
        observation: Observation,
        out: &RecordSender,
        stop: &StopSignal,
    ) -> PollEnd {
        let source = &self.source;
        if observation.bytes > source.file_bytes_max {
            source.metrics.count_error(SourceErrorKind::FileTooLarge);
            warn!(source = %source.name, file = %path.display(), bytes = observation.bytes,
                bytes_max = source.file_bytes_max, "file too large; moving it to {REJECTED_DIRECTORY}/");
            self.move_into(path, REJECTED_DIRECTORY, &source.keys.next_key());
            return PollEnd::Continue;
        }
        let payload = match read_bounded(path, source.file_bytes_max) {
            Ok(payload) => payload,
            Err(read_error) if read_error.kind() == io::ErrorKind::NotFound => return PollEnd::Continue,
            Err(read_error) => {
                source.metrics.count_error(SourceErrorKind::Io);
                warn!(source = %source.name, file = %path.display(), error = %read_error, "reading a file failed");
                return PollEnd::Continue;
            }
        };
        if payload.len() as u64 != observation.bytes {
            // Written to since it was listed: look again on the next polls.
            debug!(source = %source.name, file = %path.display(), "file changed while being read");
            return PollEnd::Continue;
        }
        let (content_type, default_lane) = content_type_and_lane(path);
        let key = source.keys.next_key();
        let file_name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let record = SourceRecord {
            lane: source.lane.unwrap_or(default_lane),
            key: key.clone(),
            timestamp_us: match micros_since_epoch(observation.modified) {
                0 => now_us(),
                modified_us => modified_us,
            },
            content_type: content_type.to_string(),
            payload,
            tags: [("file_name".to_string(), file_name)].into(),
        };
        match Handover::new(out, record, stop, &source.metrics).deliver_blocking() {
            Delivery::Sent => {
                self.finish(path, &key);
                PollEnd::Continue
            }
            Delivery::Stopped => PollEnd::Stopped,
            Delivery::Disconnected => PollEnd::Disconnected,
        }
    }

    /// Moves or deletes a sent file; remembers it if that fails so it is not sent twice.
    fn finish(&mut self, path: &Path, key: &str) {
        let finished = match self.source.after_send {
            AfterSend::Move => self.move_into(path, DONE_DIRECTORY, key),
            AfterSend::Delete => match fs::remove_file(path) {
                Ok(()) => true,
                Err(remove_error) if remove_error.kind() == io::ErrorKind::NotFound => true,
                Err(remove_error) => {
                    self.source.metrics.count_error(SourceErrorKind::Io);
                    error!(source = %self.source.name, file = %path.display(), error = %remove_error,
                        "deleting a sent file failed; retrying next poll");
                    false
                }
            },
        };
        if finished {
            self.sent_unfinished.remove(path);
        } else if self.sent_unfinished.len() < FILES_TRACKED_MAX {
            self.sent_unfinished.insert(path.to_path_buf());
        } else {
            warn!(source = %self.source.name, file = %path.display(), "too many files stuck; it may be sent again");
        }
    }

    /// Moves `path` into `subdirectory`, prefixing the name with `key` if the name is taken.
    fn move_into(&self, path: &Path, subdirectory: &str, key: &str) -> bool {
        let Some(file_name) = path.file_name() else { return false };
        let directory = self.source.path.join(subdirectory);
        let mut target = directory.join(file_name);
        if target.exists() {
            let mut prefixed = std::ffi::OsString::from(format!("{key}-"));
            prefixed.push(file_name);
            target = directory.join(prefixed);
        }
        match fs::create_dir_all(&directory).and_then(|()| fs::rename(path, &target)) {
            Ok(()) => true,
            Err(move_error) if move_error.kind() == io::ErrorKind::NotFound && !path.exists() => true,
            Err(move_error) => {
                self.source.metrics.count_error(SourceErrorKind::Io);
                error!(source = %self.source.name, file = %path.display(), target = %target.display(),
                    error = %move_error, "moving a file failed; retrying next poll");
                false
            }
        }
    }
}

/// Reads at most `bytes_max + 1` bytes, so a file that grew past the limit shows as longer.
fn read_bounded(path: &Path, bytes_max: u64) -> io::Result<Vec<u8>> {
    let file = fs::File::open(path)?;
    let mut payload = Vec::new();
    file.take(bytes_max + 1).read_to_end(&mut payload)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_and_lanes_follow_the_extension() {
        let check = |name: &str, content_type: &str, lane: Lane| {
            assert_eq!(content_type_and_lane(Path::new(name)), (content_type, lane), "{name}");
        };
        check("a.jpg", "image/jpeg", Lane::Media);
        check("a.JPEG", "image/jpeg", Lane::Media);
        check("a.png", "image/png", Lane::Media);
        check("a.json", "application/json", Lane::Sensor);
        check("a.bin", "application/octet-stream", Lane::Media);
        check("noextension", "application/octet-stream", Lane::Media);
    }

    #[test]
    fn incomplete_names_are_recognised() {
        for (name, incomplete) in [
            (".hidden.jpg", true),
            ("a.jpg.partial", true),
            ("a.tmp", true),
            ("a.jpg", false),
            ("partial", false),
        ] {
            assert_eq!(is_incomplete_name(OsStr::new(name)), incomplete, "{name}");
        }
    }
}
