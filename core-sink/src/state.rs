//! The sink's own durable state (heed): per (device, lane) durable watermarks and the committer's
//! checkpoint, always written together in one synced transaction.
//!
//! Layout: database `watermarks`, key `device ‖ 0x00 ‖ lane id`, value `durable_through` u64 LE;
//! database `committer`, key `checkpoint`, value opaque bytes from `Committer::checkpoint`.

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

pub type Watermarks = BTreeMap<(String, Lane), u64>;

pub struct SinkState {
    path: PathBuf,
    env: Env<WithoutTls>,
    watermarks: Database<Bytes, Bytes>,
    committer: Database<Bytes, Bytes>,
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
        options.map_size(STATE_MAP_BYTES).max_dbs(2);
        // SAFETY: one open per path per process (heed refuses a second), default flags: every
        // commit is fsynced, which is what makes an Ack safe to send.
        let env = unsafe { options.open(path) }.map_err(error("open"))?;
        env.clear_stale_readers().map_err(error("clear stale readers"))?;
        let mut txn = env.write_txn().map_err(error("begin"))?;
        let watermarks =
            env.create_database(&mut txn, Some("watermarks")).map_err(error("create watermarks"))?;
        let committer =
            env.create_database(&mut txn, Some("committer")).map_err(error("create committer"))?;
        txn.commit().map_err(error("commit"))?;
        Ok(SinkState { path: path.to_path_buf(), env, watermarks, committer })
    }

    fn error(&self, operation: &'static str) -> impl FnOnce(heed::Error) -> StateError + '_ {
        move |source| StateError { path: self.path.clone(), operation, source }
    }

    pub fn load(&self) -> Result<(Watermarks, Option<Vec<u8>>), StateError> {
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

    /// Records advanced watermarks and the checkpoint that covers them, durably (fsync).
    pub fn commit(&self, advanced: &Watermarks, checkpoint: &[u8]) -> Result<(), StateError> {
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
