//! The sink's own durable state: the `LandingStore` interface and `SinkState`, its heed
//! implementation. Per (device, lane) durable watermarks and the committer's checkpoint, always
//! written together in one synced transaction; per device the ring it is bound to.
//!
//! Layout: database `watermarks`, key `device ‖ 0x00 ‖ lane id`, value `durable_through` u64 LE;
//! database `committer`, key `checkpoint`, value opaque bytes from `Committer::checkpoint`;
//! database `rings`, key `device`, value `ring_id` (16 bytes) ‖ one u64 LE seq base per lane in
//! lane id order (48 bytes, 16 + 8 × `Lane::COUNT`).

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

/// Everything a `LandingStore` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredState {
    pub watermarks: Watermarks,
    pub bindings: BTreeMap<String, RingBinding>,
    pub checkpoint: Option<Vec<u8>>,
}

/// Where the landing core keeps its durable state. Every write returns only once durable.
pub trait LandingStore: Send {
    fn load(&mut self) -> Result<StoredState, StateError>;
    /// Records advanced watermarks and the checkpoint that covers them, in one durable step.
    fn commit(&mut self, advanced: &Watermarks, checkpoint: &[u8]) -> Result<(), StateError>;
    /// Records the ring `device` streams from, durably.
    fn bind(&mut self, device: &str, binding: &RingBinding) -> Result<(), StateError>;
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

impl LandingStore for SinkState {
    fn load(&mut self) -> Result<StoredState, StateError> {
        let (watermarks, checkpoint) = self.load_watermarks()?;
        Ok(StoredState { watermarks, bindings: self.load_bindings()?, checkpoint })
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
        for ((device, lane), durable_through) in advanced {
            self.watermarks
                .put(&mut txn, &key(device, *lane), &durable_through.to_le_bytes())
                .map_err(self.error("write watermark"))?;
        }
        self.committer.put(&mut txn, b"checkpoint", checkpoint).map_err(self.error("write checkpoint"))?;
        txn.commit().map_err(self.error("commit"))
    }
}
