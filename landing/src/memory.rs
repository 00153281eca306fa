//! An in-memory disk for the landing core: a `Committer` and a `LandingStore` whose durability,
//! failures and crashes are explicit, for the model test and the simulator.
//!
//! [`MemoryDisk`] is a shared handle: the committer and the store each hold one, and the test
//! keeps another to arm faults ([`Faults`]), to crash ([`MemoryDisk::crash`]: everything not
//! fsynced is lost) and to read what is durably landed ([`MemoryDisk::durable_chunks`]).
//!
//! The committer mirrors `RawLanding`: an append-only list of chunks per (device, lane),
//! `commit` syncs everything written, the checkpoint is the committed length of every list, and
//! `recover` truncates back to a checkpoint. A failed write may leave a torn entry behind (the
//! way a short write leaves a partial record in a file); a failed sync may have made some
//! writes durable or not, at random, as a kernel that dropped dirty pages may.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use protocol::{ChunkHeader, Lane};

use crate::raw::{Committer, LandingError};
use crate::state::{LandingStore, Prepared, RingBinding, StateError, StoredState, Watermarks};

/// What the next calls do wrong. Each flag fails the next call of its kind once, then clears.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// `Committer::land` fails (leaving a torn entry when `torn_write` is set too).
    pub land: bool,
    pub torn_write: bool,
    /// `Committer::commit` fails; `sync_partially` decides whether some of the data reached
    /// the disk anyway.
    pub commit: bool,
    pub sync_partially: bool,
    /// `LandingStore::commit` fails.
    pub store_commit: bool,
    /// `LandingStore::bind` fails.
    pub store_bind: bool,
    /// `LandingStore::promote` fails (cluster mode: etcd accepted, the local step did not).
    pub store_promote: bool,
    /// `Committer::recover` fails.
    pub recover: bool,
}

/// One entry of a lane's list: a landed chunk, or the remains of a failed write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Chunk { seq: u64, encoded: Vec<u8> },
    Torn,
}

#[derive(Debug, Default)]
struct Disk {
    /// What is in the files now (page cache view).
    files: BTreeMap<(String, Lane), Vec<Entry>>,
    /// How much of each list an fsync made durable.
    synced: BTreeMap<(String, Lane), usize>,
    /// The committer's in-memory committed positions (its checkpoint).
    committed: BTreeMap<(String, Lane), usize>,
    store: StoredState,
    faults: Faults,
    /// Calls that failed because a fault was armed.
    faults_fired: u64,
}

/// A shared handle on one in-memory disk.
#[derive(Clone, Debug, Default)]
pub struct MemoryDisk {
    disk: Arc<Mutex<Disk>>,
}

impl MemoryDisk {
    pub fn new() -> MemoryDisk {
        MemoryDisk::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.disk.lock().expect("memory disk lock")
    }

    pub fn committer(&self) -> MemoryCommitter {
        MemoryCommitter { disk: self.clone() }
    }

    pub fn store(&self) -> MemoryStore {
        MemoryStore { disk: self.clone() }
    }

    /// Arms faults for the next calls.
    pub fn arm(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn armed(&self) -> Faults {
        self.lock().faults
    }

    pub fn faults_fired(&self) -> u64 {
        self.lock().faults_fired
    }

    /// Power loss: everything written but not fsynced is gone; the committer's memory too.
    pub fn crash(&self) {
        let mut disk = self.lock();
        let synced = disk.synced.clone();
        for (key, entries) in disk.files.iter_mut() {
            entries.truncate(synced.get(key).copied().unwrap_or(0));
        }
        disk.committed.clear();
        disk.faults = Faults::default();
    }

    /// The chunks of (device, lane) that a restart keeps: the files as far as the stored
    /// checkpoint reaches, which is what every Ack was based on.
    pub fn durable_chunks(&self, device: &str, lane: Lane) -> Vec<(u64, Vec<u8>)> {
        let disk = self.lock();
        let key = (device.to_string(), lane);
        let positions = disk.store.checkpoint.as_deref().map(parse_positions).unwrap_or_default();
        let length = positions.get(&key).copied().unwrap_or(0);
        let entries = disk.files.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        // The store records a checkpoint only after the committer synced what it covers.
        assert!(
            length <= entries.len(),
            "{device}/{lane}: the stored checkpoint covers {length} entries but the disk holds {}",
            entries.len()
        );
        let entries = &entries[..length];
        entries
            .iter()
            .map(|entry| match entry {
                Entry::Chunk { seq, encoded } => (*seq, encoded.clone()),
                Entry::Torn => panic!("a torn entry of {device}/{lane} is inside the stored checkpoint"),
            })
            .collect()
    }

    /// Every (device, lane) with files.
    pub fn lanes(&self) -> Vec<(String, Lane)> {
        self.lock().files.keys().cloned().collect()
    }

    /// The store's durable state.
    pub fn stored(&self) -> StoredState {
        self.lock().store.clone()
    }

    /// Takes an armed fault of the kind `pick` selects, counting it when it fires.
    fn take(&self, pick: impl FnOnce(&mut Faults) -> &mut bool) -> bool {
        let mut disk = self.lock();
        let fired = std::mem::take(pick(&mut disk.faults));
        disk.faults_fired += u64::from(fired);
        fired
    }
}

fn injected(what: &str) -> LandingError {
    LandingError::Io {
        path: format!("memory:{what}").into(),
        source: std::io::Error::other("injected fault"),
    }
}

fn encode_positions(positions: &BTreeMap<(String, Lane), usize>) -> Vec<u8> {
    let mut text = String::new();
    for ((device, lane), length) in positions {
        text.push_str(&format!("{device} {} {length}\n", lane.name()));
    }
    text.into_bytes()
}

fn parse_positions(checkpoint: &[u8]) -> BTreeMap<(String, Lane), usize> {
    let text = String::from_utf8_lossy(checkpoint);
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let [device, lane, length] = fields[..] else { panic!("memory checkpoint line {line:?}") };
            ((device.to_string(), lane.parse().expect("lane")), length.parse().expect("length"))
        })
        .collect()
}

/// The in-memory `Committer`.
pub struct MemoryCommitter {
    disk: MemoryDisk,
}

impl Committer for MemoryCommitter {
    fn land(&mut self, device: &str, header: &ChunkHeader, encoded: &[u8]) -> Result<(), LandingError> {
        if self.disk.take(|faults| &mut faults.land) {
            let torn = self.disk.take(|faults| &mut faults.torn_write);
            if torn {
                self.disk
                    .lock()
                    .files
                    .entry((device.to_string(), header.lane))
                    .or_default()
                    .push(Entry::Torn);
            }
            return Err(injected("land"));
        }
        let mut disk = self.disk.lock();
        let entries = disk.files.entry((device.to_string(), header.lane)).or_default();
        if let Some(Entry::Chunk { seq, .. }) = entries.last() {
            assert!(header.seq > *seq, "the landing core lands seqs in increasing order per lane");
        }
        entries.push(Entry::Chunk { seq: header.seq, encoded: encoded.to_vec() });
        Ok(())
    }

    fn commit(&mut self) -> Result<(), LandingError> {
        if self.disk.take(|faults| &mut faults.commit) {
            // Some pages may have reached the disk before the failure.
            if self.disk.take(|faults| &mut faults.sync_partially) {
                let mut disk = self.disk.lock();
                let lengths: Vec<_> =
                    disk.files.iter().map(|(key, entries)| (key.clone(), entries.len())).collect();
                for (key, length) in lengths {
                    disk.synced.insert(key, length);
                }
            }
            return Err(injected("commit"));
        }
        let mut disk = self.disk.lock();
        let lengths: Vec<_> = disk.files.iter().map(|(key, entries)| (key.clone(), entries.len())).collect();
        for (key, length) in lengths {
            disk.synced.insert(key.clone(), length);
            disk.committed.insert(key, length);
        }
        Ok(())
    }

    fn checkpoint(&self) -> Vec<u8> {
        encode_positions(&self.disk.lock().committed)
    }

    fn recover(&mut self, checkpoint: Option<&[u8]>) -> Result<(), LandingError> {
        if self.disk.take(|faults| &mut faults.recover) {
            return Err(injected("recover"));
        }
        let positions = checkpoint.map(parse_positions).unwrap_or_default();
        let mut disk = self.disk.lock();
        let keys: Vec<_> = disk.files.keys().cloned().collect();
        for key in keys {
            let length = positions.get(&key).copied().unwrap_or(0);
            let entries = disk.files.get_mut(&key).expect("listed above");
            entries.truncate(length);
            // Truncation is fsynced by the real committer.
            let synced = disk.synced.entry(key.clone()).or_insert(0);
            *synced = (*synced).min(length);
        }
        disk.committed = positions;
        Ok(())
    }

    fn discard_uncommitted(&mut self, device: &str, lane: Lane) -> Result<(), LandingError> {
        let mut disk = self.disk.lock();
        let key = (device.to_string(), lane);
        let length = disk.committed.get(&key).copied().unwrap_or(0);
        if let Some(entries) = disk.files.get_mut(&key) {
            entries.truncate(length);
        }
        Ok(())
    }
}

/// The in-memory `LandingStore`: every successful call is durable at once.
pub struct MemoryStore {
    disk: MemoryDisk,
}

fn store_error(operation: &'static str) -> StateError {
    StateError::other("memory", operation, "injected fault".to_string())
}

impl LandingStore for MemoryStore {
    fn load(&mut self) -> Result<StoredState, StateError> {
        Ok(self.disk.lock().store.clone())
    }

    fn commit(&mut self, advanced: &Watermarks, checkpoint: &[u8]) -> Result<(), StateError> {
        if self.disk.take(|faults| &mut faults.store_commit) {
            return Err(store_error("commit"));
        }
        let mut disk = self.disk.lock();
        for (key, seq) in advanced {
            disk.store.watermarks.insert(key.clone(), *seq);
        }
        disk.store.checkpoint = Some(checkpoint.to_vec());
        Ok(())
    }

    fn bind(&mut self, device: &str, binding: &RingBinding) -> Result<(), StateError> {
        if self.disk.take(|faults| &mut faults.store_bind) {
            return Err(store_error("bind"));
        }
        self.disk.lock().store.bindings.insert(device.to_string(), *binding);
        Ok(())
    }

    fn prepare(&mut self, prepared: &Prepared) -> Result<(), StateError> {
        self.disk.lock().store.prepared = Some(prepared.clone());
        Ok(())
    }

    fn promote(&mut self, commit_id: u64) -> Result<(), StateError> {
        if self.disk.take(|faults| &mut faults.store_promote) {
            return Err(store_error("promote"));
        }
        let mut disk = self.disk.lock();
        let prepared = disk.store.prepared.take_if(|prepared| prepared.commit_id == commit_id);
        let prepared = prepared
            .ok_or_else(|| StateError::other("memory", "promote", format!("{commit_id} not prepared")))?;
        for (key, seq) in prepared.advanced {
            disk.store.watermarks.insert(key, seq);
        }
        disk.store.checkpoint = Some(prepared.checkpoint);
        Ok(())
    }

    fn discard_prepared(&mut self) -> Result<(), StateError> {
        self.disk.lock().store.prepared = None;
        Ok(())
    }
}
