//! Test support (feature `test-support`): simulated power cuts through the `SyncObserver` seam.
//!
//! A power cut keeps what the last fsync put on disk and nothing written after it. `PowerCut`
//! copies `data.mdb` after every fsync of the ring (the observer runs while the writer is paused,
//! so the copy is exactly the synced state), `cut` stops copying (the power is off), and
//! `restore` puts the last copy back in place of the ring's file, as the disk would hold it at the
//! next boot. The copy goes to a temporary name and is renamed, so the snapshot is always whole.
//!
//! Not a model of everything a power cut does: LMDB in `NOSYNC` mode may also find later commits
//! partly written back by the kernel; the snapshot is the ideal loss (every unsynced commit gone),
//! which is the case the ring's read clamp must handle.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::SyncObserver;

/// LMDB's data file, the whole ring; `lock.mdb` holds only reader slots and is rebuilt at open.
const DATA_FILE: &str = "data.mdb";
const LOCK_FILE: &str = "lock.mdb";

#[derive(Debug, Default)]
struct State {
    /// The power is off: fsyncs happen (the process is still winding down) but are not kept.
    cut: bool,
    snapshots: u64,
}

/// Keeps the last synced `data.mdb` of one ring in `snapshot_dir`.
#[derive(Clone, Debug)]
pub struct PowerCut {
    snapshot_dir: PathBuf,
    state: Arc<Mutex<State>>,
}

impl PowerCut {
    /// `snapshot_dir` is created if missing and should be outside the ring's directory.
    pub fn new(snapshot_dir: impl AsRef<Path>) -> PowerCut {
        let snapshot_dir = snapshot_dir.as_ref().to_path_buf();
        fs::create_dir_all(&snapshot_dir)
            .unwrap_or_else(|error| panic!("create {}: {error}", snapshot_dir.display()));
        PowerCut { snapshot_dir, state: Arc::default() }
    }

    /// The observer to put in `RingConfig::sync_observer`.
    pub fn observer(&self) -> SyncObserver {
        let power_cut = self.clone();
        SyncObserver::new(move |ring_dir| power_cut.snapshot(ring_dir))
    }

    fn snapshot(&self, ring_dir: &Path) {
        // Held during the copy: `cut` waits for a snapshot in progress, so none lands after it.
        let mut state = self.state.lock().expect("power cut state lock");
        if state.cut {
            return;
        }
        let partial = self.snapshot_dir.join(format!("{DATA_FILE}.partial"));
        let source = ring_dir.join(DATA_FILE);
        fs::copy(&source, &partial)
            .unwrap_or_else(|error| panic!("copy {} to {}: {error}", source.display(), partial.display()));
        fs::rename(&partial, self.snapshot_dir.join(DATA_FILE)).expect("rename snapshot");
        state.snapshots += 1;
    }

    /// How many synced states were copied so far.
    pub fn snapshots(&self) -> u64 {
        self.state.lock().expect("power cut state lock").snapshots
    }

    /// The power goes off now: later fsyncs are not kept. Returns once no copy is in progress.
    pub fn cut(&self) {
        self.state.lock().expect("power cut state lock").cut = true;
    }

    /// Replaces the ring's files with the last synced state (call once every handle of the ring
    /// is dropped) and turns the power back on.
    pub fn restore(&self, ring_dir: &Path) {
        let mut state = self.state.lock().expect("power cut state lock");
        assert!(state.cut, "restore follows a cut");
        assert!(state.snapshots > 0, "the ring was opened with this observer, which snapshots at open");
        let partial = ring_dir.join(format!("{DATA_FILE}.restoring"));
        fs::copy(self.snapshot_dir.join(DATA_FILE), &partial).expect("copy the snapshot back");
        fs::rename(&partial, ring_dir.join(DATA_FILE)).expect("rename the restored ring");
        match fs::remove_file(ring_dir.join(LOCK_FILE)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("remove {LOCK_FILE}: {error}"),
        }
        state.cut = false;
    }
}
