//! What the inference service keeps between restarts, in its state directory:
//!
//! ```text
//! <state_dir>/decision-epoch             decimal microseconds: the epoch of the last start
//! <state_dir>/recorded-models/<sha256>   empty file: this model version's record was appended
//!                                        to the audit lane durably
//! ```
//!
//! Decision ids are `<epoch>-<counter>`: the epoch is this start's time in microseconds since the
//! Unix epoch, raised above the previous start's epoch when the clock went backwards, and the
//! counter counts decisions from 1 within the start. Ids are therefore unique per device across
//! restarts as long as the state directory survives (and, without it, as long as the clock never
//! goes back), and they are valid record keys: digits and one '-', at most 41 bytes.
//!
//! A lost marker directory only means model records are sent again, which the archive absorbs
//! (it is idempotent by model sha256).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use protocol::evidence::{Sha256Digest, sha256_hex};

const EPOCH_FILE: &str = "decision-epoch";
const RECORDED_MODELS_DIR: &str = "recorded-models";
/// Most marker files read at start; a directory with more is someone else's.
const RECORDED_MODELS_MAX: usize = 65_536;

#[derive(Debug, thiserror::Error)]
#[error("inference state at {path}: {operation}: {source}")]
pub struct StateError {
    pub path: PathBuf,
    pub operation: &'static str,
    #[source]
    pub source: std::io::Error,
}

fn state_error(path: &Path, operation: &'static str) -> impl FnOnce(std::io::Error) -> StateError + use<> {
    let path = path.to_path_buf();
    move |source| StateError { path, operation, source }
}

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_micros() as u64).unwrap_or(0)
}

/// Hands out decision ids for one start of the service.
#[derive(Debug)]
pub struct DecisionIds {
    epoch_us: u64,
    counter: AtomicU64,
}

impl DecisionIds {
    /// Reads the previous epoch from `state_dir`, picks this start's epoch, and writes it back
    /// durably (write, fsync, rename, fsync the directory) before any id is handed out.
    pub fn start(state_dir: &Path) -> Result<DecisionIds, StateError> {
        fs::create_dir_all(state_dir).map_err(state_error(state_dir, "create directory"))?;
        let path = state_dir.join(EPOCH_FILE);
        let previous = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().ok(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(state_error(&path, "read")(error)),
        };
        if previous.is_none() && path.exists() {
            tracing::warn!(path = %path.display(), "decision epoch file is unreadable; starting from the clock");
        }
        let epoch_us = match previous {
            Some(previous) => now_us().max(previous.saturating_add(1)),
            None => now_us(),
        };
        durable::write(&path, epoch_us.to_string().as_bytes()).map_err(durable_error)?;
        Ok(DecisionIds { epoch_us, counter: AtomicU64::new(0) })
    }

    pub fn epoch_us(&self) -> u64 {
        self.epoch_us
    }

    pub fn next(&self) -> String {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}-{counter}", self.epoch_us)
    }
}

fn durable_error(error: durable::Error) -> StateError {
    state_error(&error.path, error.operation)(error.source)
}

/// The model versions whose record is durably in the audit lane.
#[derive(Debug)]
pub struct RecordedModels {
    directory: PathBuf,
    recorded: HashSet<Sha256Digest>,
}

impl RecordedModels {
    pub fn open(state_dir: &Path) -> Result<RecordedModels, StateError> {
        let directory = state_dir.join(RECORDED_MODELS_DIR);
        fs::create_dir_all(&directory).map_err(state_error(&directory, "create directory"))?;
        let mut recorded = HashSet::new();
        for entry in
            fs::read_dir(&directory).map_err(state_error(&directory, "list"))?.take(RECORDED_MODELS_MAX)
        {
            let entry = entry.map_err(state_error(&directory, "list"))?;
            match protocol::evidence::parse_sha256_hex(&entry.file_name().to_string_lossy()) {
                Some(digest) => {
                    recorded.insert(digest);
                }
                None => {
                    tracing::warn!(path = %entry.path().display(), "ignoring a stray file among model markers")
                }
            }
        }
        Ok(RecordedModels { directory, recorded })
    }

    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.recorded.contains(digest)
    }

    /// Remembers that `digest`'s record is durable. The marker is best effort: if it cannot be
    /// written the record is sent again after a restart, which is harmless.
    pub fn insert(&mut self, digest: Sha256Digest) {
        if !self.recorded.insert(digest) {
            return;
        }
        let path = self.directory.join(sha256_hex(&digest));
        if let Err(error) = durable::write(&path, b"").map_err(durable_error) {
            tracing::warn!(%error, "model record marker not written; the record will be sent again after a restart");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_unique_across_restarts_and_are_record_keys() {
        let directory = tempfile::tempdir().unwrap();
        let first = DecisionIds::start(directory.path()).unwrap();
        let ids: Vec<String> = (0..3).map(|_| first.next()).collect();
        let second = DecisionIds::start(directory.path()).unwrap();
        assert!(second.epoch_us() > first.epoch_us());
        // A clock that went back: the stored epoch is in the future.
        fs::write(directory.path().join(EPOCH_FILE), (u64::MAX / 2).to_string()).unwrap();
        let third = DecisionIds::start(directory.path()).unwrap();
        assert_eq!(third.epoch_us(), u64::MAX / 2 + 1);
        let mut all = ids.clone();
        all.extend([second.next(), third.next()]);
        let unique: HashSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        for id in &all {
            protocol::validate_key(id).unwrap();
        }
        assert_eq!(ids[0], format!("{}-1", first.epoch_us()));
    }

    #[test]
    fn recorded_models_survive_a_restart() {
        let directory = tempfile::tempdir().unwrap();
        let mut recorded = RecordedModels::open(directory.path()).unwrap();
        let digest = protocol::evidence::sha256(b"model");
        assert!(!recorded.contains(&digest));
        recorded.insert(digest);
        fs::write(directory.path().join(RECORDED_MODELS_DIR).join("stray"), b"").unwrap();
        let reopened = RecordedModels::open(directory.path()).unwrap();
        assert!(reopened.contains(&digest));
        assert!(!reopened.contains(&protocol::evidence::sha256(b"other")));
    }
}
