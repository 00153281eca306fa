//! The sink's own durable state: the `LandingStore` interface and `SinkState`, its heed
//! implementation. Per (device, lane) durable watermarks and the committer's checkpoint, always
//! written together in one synced transaction; per device the ring it is bound to.
//!
//! Layout: database `watermarks`, key `device ‖ 0x00 ‖ lane id`, value `durable_through` u64 LE;
//! database `committer`, key `checkpoint`, value opaque bytes from `Committer::checkpoint`;
//! database `rings`, key `device`, value `ring_id` (16 bytes) ‖ one u64 LE seq base per lane in
//! lane id order (48 bytes, 16 + 8 × `Lane::COUNT`); database `committer`, key `prepared` (cluster
//! mode only: a commit point written before etcd accepted it, see `Prepared`): `commit_id` u64 LE
//! ‖ entry count u32 LE ‖ per entry `device length` u16 LE ‖ device ‖ lane id u8 ‖ seq u64 LE ‖
//! then the checkpoint to the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use heed::types::Bytes;
use heed::{Database, Env, EnvOpenOptions, WithoutTls};
use protocol::Lane;

/// Bounds the state file; at ~40 bytes per (device, lane) this holds millions of devices.
const STATE_MAP_BYTES: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
#[error("sink state at {path}: {operation}: {source}")]
pub struct StateError {
    path: PathBuf,
    operation: &'static str,
    #[source]
    source: heed::Error,
}

impl StateError {
    /// An error of a store that is not heed (the simulator's), or of a rule above it.
    pub fn other(path: &str, operation: &'static str, message: String) -> StateError {
        StateError {
            path: PathBuf::from(path),
            operation,
            source: heed::Error::Io(std::io::Error::other(message)),
        }
    }
}

pub type Watermarks = BTreeMap<(String, Lane), u64>;

/// The ring a device streams from: its identity and, per lane, the core seq its seq 0 maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingBinding {
    pub ring_id: [u8; 16],
    pub bases: [u64; Lane::COUNT],
}

const RING_BINDING_BYTES: usize = 16 + 8 * Lane::COUNT;

impl RingBinding {
    fn encode(&self) -> [u8; RING_BINDING_BYTES] {
        let mut bytes = [0u8; RING_BINDING_BYTES];
        bytes[..16].copy_from_slice(&self.ring_id);
        for (slot, base) in bytes[16..].chunks_exact_mut(8).zip(self.bases) {
            slot.copy_from_slice(&base.to_le_bytes());
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<RingBinding> {
        let bytes: &[u8; RING_BINDING_BYTES] = bytes.try_into().ok()?;
        let ring_id = bytes[..16].try_into().expect("16 bytes");
        let mut bases = [0u64; Lane::COUNT];
        for (base, slot) in bases.iter_mut().zip(bytes[16..].chunks_exact(8)) {
            *base = u64::from_le_bytes(slot.try_into().expect("8 bytes"));
        }
        Some(RingBinding { ring_id, bases })
    }
}

/// A commit point written durably but not yet current (cluster mode): its watermarks and
/// checkpoint become the stored ones only at `promote`, after etcd accepted `commit_id`; until
/// then readers of the checkpoint and Acks see the previous commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    pub commit_id: u64,
    pub advanced: Watermarks,
    pub checkpoint: Vec<u8>,
}

impl Prepared {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&self.commit_id.to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(self.advanced.len()).expect("entries fit u32").to_le_bytes());
        for ((device, lane), seq) in &self.advanced {
            bytes
                .extend_from_slice(&u16::try_from(device.len()).expect("device ids are short").to_le_bytes());
            bytes.extend_from_slice(device.as_bytes());
            bytes.push(lane.id());
            bytes.extend_from_slice(&seq.to_le_bytes());
        }
        bytes.extend_from_slice(&self.checkpoint);
        bytes
    }

    /// Hostile bytes: every length is checked against what is left.
    fn decode(bytes: &[u8]) -> Option<Prepared> {
        fn take<'a>(bytes: &mut &'a [u8], count: usize) -> Option<&'a [u8]> {
            let (taken, rest) = bytes.split_at_checked(count)?;
            *bytes = rest;
            Some(taken)
        }
        let mut rest = bytes;
        let commit_id = u64::from_le_bytes(take(&mut rest, 8)?.try_into().ok()?);
        let count = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?);
        let mut advanced = Watermarks::new();
        for _ in 0..count {
            let length = u16::from_le_bytes(take(&mut rest, 2)?.try_into().ok()?);
            let device = std::str::from_utf8(take(&mut rest, length.into())?).ok()?.to_string();
            let lane = Lane::from_id(take(&mut rest, 1)?[0]).ok()?;
            let seq = u64::from_le_bytes(take(&mut rest, 8)?.try_into().ok()?);
            advanced.insert((device, lane), seq);
        }
        Some(Prepared { commit_id, advanced, checkpoint: rest.to_vec() })
    }
}

/// Everything a `LandingStore` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredState {
    pub watermarks: Watermarks,
    pub bindings: BTreeMap<String, RingBinding>,
    pub checkpoint: Option<Vec<u8>>,
    /// Cluster mode: a commit point waiting for etcd's answer.
    pub prepared: Option<Prepared>,
}

/// Where the landing core keeps its durable state. Every write returns only once durable.
pub trait LandingStore: Send {
    fn load(&mut self) -> Result<StoredState, StateError>;
    /// Records advanced watermarks and the checkpoint that covers them, in one durable step.
    fn commit(&mut self, advanced: &Watermarks, checkpoint: &[u8]) -> Result<(), StateError>;
    /// Records the ring `device` streams from, durably.
    fn bind(&mut self, device: &str, binding: &RingBinding) -> Result<(), StateError>;
    /// Cluster mode: records a commit point durably without making it current (replaces any
    /// earlier prepared one).
    fn prepare(&mut self, prepared: &Prepared) -> Result<(), StateError>;
    /// Makes the prepared commit point `commit_id` current, as `commit` does, and forgets it as
    /// prepared, in one durable step.
    fn promote(&mut self, commit_id: u64) -> Result<(), StateError>;
    /// Forgets the prepared commit point.
    fn discard_prepared(&mut self) -> Result<(), StateError>;
}

pub struct SinkState {
    path: PathBuf,
    env: Env<WithoutTls>,
    watermarks: Database<Bytes, Bytes>,
    committer: Database<Bytes, Bytes>,
    rings: Database<Bytes, Bytes>,
}

fn key(device: &str, lane: Lane) -> Vec<u8> {
    let mut key = Vec::with_capacity(device.len() + 2);
    key.extend_from_slice(device.as_bytes());
    key.push(0);
    key.push(lane.id());
    key
}

impl SinkState {
    pub fn open(path: &Path) -> Result<SinkState, StateError> {
        let error = |operation| move |source| StateError { path: path.to_path_buf(), operation, source };
        std::fs::create_dir_all(path).map_err(|source| error("create directory")(heed::Error::Io(source)))?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(STATE_MAP_BYTES).max_dbs(3);
        // SAFETY: one open per path per process (heed refuses a second), default flags: every
        // commit is fsynced, which is what makes an Ack safe to send.
        let env = unsafe { options.open(path) }.map_err(error("open"))?;
        env.clear_stale_readers().map_err(error("clear stale readers"))?;
        let mut txn = env.write_txn().map_err(error("begin"))?;
        let watermarks =
            env.create_database(&mut txn, Some("watermarks")).map_err(error("create watermarks"))?;
        let committer =
            env.create_database(&mut txn, Some("committer")).map_err(error("create committer"))?;
        let rings = env.create_database(&mut txn, Some("rings")).map_err(error("create rings"))?;
        txn.commit().map_err(error("commit"))?;
        Ok(SinkState { path: path.to_path_buf(), env, watermarks, committer, rings })
    }

    fn error(&self, operation: &'static str) -> impl FnOnce(heed::Error) -> StateError + '_ {
        move |source| StateError { path: self.path.clone(), operation, source }
    }

    /// Watermarks and the checkpoint (what readers of the state need; the landing core loads
    /// everything through `LandingStore::load`).
    pub fn load_watermarks(&self) -> Result<(Watermarks, Option<Vec<u8>>), StateError> {
        let txn = self.env.read_txn().map_err(self.error("begin read"))?;
        let mut watermarks = Watermarks::new();
        for entry in self.watermarks.iter(&txn).map_err(self.error("read watermarks"))? {
            let (key, value) = entry.map_err(self.error("read watermarks"))?;
            let (Some((&lane, rest)), Ok(value)) = (key.split_last(), <[u8; 8]>::try_from(value)) else {
                tracing::error!(path = %self.path.display(), "skipping a malformed watermark entry");
                continue;
            };
            let (Some((&0, device)), Ok(lane)) = (rest.split_last(), Lane::from_id(lane)) else {
                tracing::error!(path = %self.path.display(), "skipping a malformed watermark key");
                continue;
            };
            watermarks
                .insert((String::from_utf8_lossy(device).into_owned(), lane), u64::from_le_bytes(value));
        }
        let checkpoint = self
            .committer
            .get(&txn, b"checkpoint")
            .map_err(self.error("read checkpoint"))?
            .map(<[u8]>::to_vec);
        Ok((watermarks, checkpoint))
    }

    fn load_bindings(&self) -> Result<BTreeMap<String, RingBinding>, StateError> {
        let txn = self.env.read_txn().map_err(self.error("begin read"))?;
        let mut bindings = BTreeMap::new();
        for entry in self.rings.iter(&txn).map_err(self.error("read rings"))? {
            let (key, value) = entry.map_err(self.error("read rings"))?;
            let (Ok(device), Some(binding)) = (std::str::from_utf8(key), RingBinding::decode(value)) else {
                tracing::error!(path = %self.path.display(), "skipping a malformed ring binding");
                continue;
            };
            bindings.insert(device.to_string(), binding);
        }
        Ok(bindings)
    }
}

impl SinkState {
    fn load_prepared(&self) -> Result<Option<Prepared>, StateError> {
        let txn = self.env.read_txn().map_err(self.error("begin read"))?;
        let Some(bytes) = self.committer.get(&txn, b"prepared").map_err(self.error("read prepared"))? else {
            return Ok(None);
        };
        match Prepared::decode(bytes) {
            Some(prepared) => Ok(Some(prepared)),
            None => Err(StateError::other(
                &self.path.display().to_string(),
                "read prepared",
                "the prepared commit point is malformed".to_string(),
            )),
        }
    }

    fn write_watermarks(
        &self,
        txn: &mut heed::RwTxn<'_>,
        advanced: &Watermarks,
        checkpoint: &[u8],
    ) -> Result<(), StateError> {
        for ((device, lane), durable_through) in advanced {
            self.watermarks
                .put(txn, &key(device, *lane), &durable_through.to_le_bytes())
                .map_err(self.error("write watermark"))?;
        }
        self.committer.put(txn, b"checkpoint", checkpoint).map_err(self.error("write checkpoint"))
    }
}

impl LandingStore for SinkState {
    fn load(&mut self) -> Result<StoredState, StateError> {
        let (watermarks, checkpoint) = self.load_watermarks()?;
        Ok(StoredState {
            watermarks,
            bindings: self.load_bindings()?,
            checkpoint,
            prepared: self.load_prepared()?,
        })
    }

    fn prepare(&mut self, prepared: &Prepared) -> Result<(), StateError> {
        let mut txn = self.env.write_txn().map_err(self.error("begin write"))?;
        self.committer
            .put(&mut txn, b"prepared", &prepared.encode())
            .map_err(self.error("write prepared"))?;
        txn.commit().map_err(self.error("commit"))
    }

    fn promote(&mut self, commit_id: u64) -> Result<(), StateError> {
        let prepared =
            self.load_prepared()?.filter(|prepared| prepared.commit_id == commit_id).ok_or_else(|| {
                StateError::other(
                    &self.path.display().to_string(),
                    "promote",
                    format!("commit {commit_id} is not prepared"),
                )
            })?;
        let mut txn = self.env.write_txn().map_err(self.error("begin write"))?;
        self.write_watermarks(&mut txn, &prepared.advanced, &prepared.checkpoint)?;
        self.committer.delete(&mut txn, b"prepared").map_err(self.error("delete prepared"))?;
        txn.commit().map_err(self.error("commit"))
    }

    fn discard_prepared(&mut self) -> Result<(), StateError> {
        let mut txn = self.env.write_txn().map_err(self.error("begin write"))?;
        self.committer.delete(&mut txn, b"prepared").map_err(self.error("delete prepared"))?;
        txn.commit().map_err(self.error("commit"))
    }

    fn bind(&mut self, device: &str, binding: &RingBinding) -> Result<(), StateError> {
        let mut txn = self.env.write_txn().map_err(self.error("begin write"))?;
        self.rings
            .put(&mut txn, device.as_bytes(), &binding.encode())
            .map_err(self.error("write ring binding"))?;
        txn.commit().map_err(self.error("commit"))
    }

    /// Records advanced watermarks and the checkpoint that covers them, durably (fsync).
    fn commit(&mut self, advanced: &Watermarks, checkpoint: &[u8]) -> Result<(), StateError> {
        let mut txn = self.env.write_txn().map_err(self.error("begin write"))?;
        self.write_watermarks(&mut txn, advanced, checkpoint)?;
        txn.commit().map_err(self.error("commit"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_round_trips_and_hostile_bytes_are_refused() {
        let prepared = Prepared {
            commit_id: 7,
            advanced: Watermarks::from([
                (("cam-1".to_string(), Lane::Media), 42),
                (("cam-2".to_string(), Lane::Audit), 3),
            ]),
            checkpoint: b"cam-1 media 0 100\n".to_vec(),
        };
        let bytes = prepared.encode();
        assert_eq!(Prepared::decode(&bytes), Some(prepared));
        for cut in 0..12 {
            assert_eq!(Prepared::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut huge_count = bytes.clone();
        huge_count[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Prepared::decode(&huge_count), None);
        let mut bad_lane = bytes.clone();
        bad_lane[12 + 2 + 5] = 9;
        assert_eq!(Prepared::decode(&bad_lane), None);
    }
}
