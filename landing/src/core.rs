//! The landing core: the one place where chunks become durable exactly once and watermarks
//! advance. Synchronous and single-threaded; the sink runs it on its lander thread, the
//! simulator calls it directly.
//!
//! State per (device, lane): `landed` (highest core seq written, durable or not: the dedupe
//! line), `durable` (highest core seq covered by a successful commit: what Acks report) and a
//! `generation`. Per device: the ring it is bound to (`RingBinding`: ring id and per-lane seq
//! base of that ring's epoch).
//!
//! Rules:
//! - **Epochs.** A Hello with a ring id the device is not bound to (a recreated or renewed ring)
//!   binds the new ring durably before any of its chunks land, with per-lane bases at or above
//!   everything ever landed for the device: the new ring's seq s lands as core seq base + s, so
//!   nothing it sends is taken for a duplicate of the old ring's data. A device seen for the
//!   first time is bound with bases 0. A device with watermarks but no binding (state from
//!   before epochs existed) is bound to the first ring it names with bases 0.
//! - **Dedupe.** A chunk at or below `landed` is dropped and counted.
//! - **Fencing.** A chunk carries the generation of its lane at its session's grant. Any
//!   rollback of the lane (failed write, failed commit) and any new epoch bumps the generation,
//!   so nothing granted before can land after the gap the rollback made: the session is closed
//!   and the device resends from the durable watermark.
//! - **Commit.** `Committer::commit` (fsync) and then the store's transaction recording the
//!   advanced watermarks with the committer's checkpoint; only then do `durable` watermarks
//!   advance. If either fails, the committer is recovered to the last stored checkpoint (the
//!   same path as a restart), every pending lane rolls back, and nothing is acked.
//!
//! Bounds: pending state is one entry per (device, lane) written since the last commit;
//! `commit_bytes_max` and `commit_interval` bound what a commit covers.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use protocol::{ChunkHeader, Lane};
use session::{Grant, LaneGrant};

use crate::raw::{Committer, LandingError};
use crate::state::{LandingStore, RingBinding, StateError, Watermarks};

#[derive(Clone, Copy, Debug)]
pub struct LandingConfig {
    /// A commit is due once this many bytes are pending...
    pub commit_bytes_max: u64,
    /// ...or this long after the first pending chunk landed.
    pub commit_interval: Duration,
}

/// Counters, exact: each outcome of `land`, `commit` and `open_session` counts once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LandingStats {
    pub chunks_landed: u64,
    pub bytes_landed: u64,
    pub duplicates_dropped: u64,
    pub fenced_chunks: u64,
    pub landing_failures: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub epochs_started: u64,
    pub sessions_granted: u64,
}

/// One chunk for the landing core; `seq` in `header` is the core seq.
#[derive(Clone, Copy, Debug)]
pub struct LandRequest<'a> {
    pub device: &'a str,
    pub generation: u64,
    pub header: &'a ChunkHeader,
    pub encoded: &'a [u8],
}

#[derive(Debug)]
pub enum LandOutcome {
    Landed,
    /// At or below the landed watermark.
    Duplicate,
    /// Its lane was rolled back or re-bound since its session's grant.
    Fenced,
    /// The write failed: the lane was rolled back to its last commit.
    Failed(LandingError),
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("landing commit failed: {0}")]
    Landing(#[from] LandingError),
    #[error("landing commit failed: {0}")]
    State(#[from] StateError),
}

/// A failed commit: what failed, and the lanes rolled back because of it.
#[derive(Debug)]
pub struct CommitFailure {
    pub error: CommitError,
    pub rolled_back: Vec<(String, Lane)>,
    /// Set when the committer could not even be recovered to the last checkpoint: the core
    /// refuses everything until the sink restarts.
    pub broken: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("recovering landing to the last checkpoint: {0}")]
    Recover(#[from] LandingError),
}

type Key = (String, Lane);

#[derive(Clone, Copy, Debug, Default)]
struct LaneState {
    landed: u64,
    durable: u64,
    generation: u64,
    /// Landed since the last commit.
    pending: bool,
    /// Bytes landed since the last commit (its share of `LandingCore::pending_bytes`).
    pending_bytes: u64,
}

#[derive(Clone, Debug, Default)]
struct DeviceState {
    lanes: [LaneState; Lane::COUNT],
    binding: Option<RingBinding>,
}

pub struct LandingCore<C: Committer, S: LandingStore> {
    config: LandingConfig,
    committer: C,
    store: S,
    devices: HashMap<String, DeviceState>,
    /// (device, lane) landed since the last commit, in order.
    pending: BTreeMap<Key, ()>,
    pending_bytes: u64,
    pending_since: Option<Instant>,
    /// The checkpoint of the last successful commit (what downstream readers may consume).
    checkpoint: Vec<u8>,
    stats: LandingStats,
    broken: Option<String>,
}

impl<C: Committer, S: LandingStore> LandingCore<C, S> {
    /// Loads the stored state and recovers the committer to its last checkpoint.
    pub fn open(config: LandingConfig, mut committer: C, mut store: S) -> Result<Self, OpenError> {
        let stored = store.load()?;
        committer.recover(stored.checkpoint.as_deref())?;
        let mut devices: HashMap<String, DeviceState> = HashMap::new();
        for ((device, lane), seq) in stored.watermarks {
            let lane = &mut devices.entry(device).or_default().lanes[lane.index()];
            lane.landed = seq;
            lane.durable = seq;
        }
        for (device, binding) in stored.bindings {
            devices.entry(device).or_default().binding = Some(binding);
        }
        Ok(LandingCore {
            config,
            committer,
            store,
            devices,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            pending_since: None,
            checkpoint: stored.checkpoint.unwrap_or_default(),
            stats: LandingStats::default(),
            broken: None,
        })
    }

    pub fn stats(&self) -> &LandingStats {
        &self.stats
    }

    /// The committer's checkpoint at the last successful commit.
    pub fn checkpoint(&self) -> &[u8] {
        &self.checkpoint
    }

    fn lane(&self, device: &str, lane: Lane) -> LaneState {
        self.devices.get(device).map(|state| state.lanes[lane.index()]).unwrap_or_default()
    }

    fn lane_mut(&mut self, device: &str, lane: Lane) -> &mut LaneState {
        if !self.devices.contains_key(device) {
            self.devices.insert(device.to_string(), DeviceState::default());
        }
        &mut self.devices.get_mut(device).expect("inserted above").lanes[lane.index()]
    }

    pub fn durable(&self, device: &str, lane: Lane) -> u64 {
        self.lane(device, lane).durable
    }

    pub fn landed(&self, device: &str, lane: Lane) -> u64 {
        self.lane(device, lane).landed
    }

    pub fn generation(&self, device: &str, lane: Lane) -> u64 {
        self.lane(device, lane).generation
    }

    pub fn binding(&self, device: &str) -> Option<&RingBinding> {
        self.devices.get(device).and_then(|state| state.binding.as_ref())
    }

    /// Every device the core holds state for.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(String::as_str)
    }

    /// Why the core refuses everything, if it does (see [`CommitFailure::broken`]).
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    pub fn committer(&self) -> &C {
        &self.committer
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Binds `device` to `ring_id` if it is not bound to it yet (durably, before returning) and
    /// returns the grant a session of that ring works under.
    pub fn open_session(&mut self, device: &str, ring_id: [u8; 16]) -> Result<Grant, StateError> {
        if let Some(reason) = &self.broken {
            return Err(StateError::other("landing", "open session", format!("landing is broken: {reason}")));
        }
        let bound = self.binding(device).copied();
        if bound.is_none_or(|binding| binding.ring_id != ring_id) {
            let mut bases = [0u64; Lane::COUNT];
            if let Some(previous) = bound {
                // A new epoch: start above everything landed and every earlier base, so no seq
                // of the new ring can meet a core seq an earlier ring used.
                for lane in Lane::ALL {
                    bases[lane.index()] = self.landed(device, lane).max(previous.bases[lane.index()]);
                }
                tracing::warn!(
                    device,
                    old_ring = %hex(&previous.ring_id),
                    new_ring = %hex(&ring_id),
                    ?bases,
                    "the device's ring changed (recreated or renewed): new seq epoch"
                );
            }
            let binding = RingBinding { ring_id, bases };
            self.store.bind(device, &binding)?;
            if bound.is_some() {
                self.stats.epochs_started += 1;
                // Fence every session granted under the old ring.
                for lane in Lane::ALL {
                    self.lane_mut(device, lane).generation += 1;
                }
            }
            self.lane_mut(device, Lane::Audit);
            self.devices.get_mut(device).expect("created above").binding = Some(binding);
        }
        let state = &self.devices[device];
        let binding = state.binding.expect("bound above");
        self.stats.sessions_granted += 1;
        Ok(Grant {
            lanes: Lane::ALL.map(|lane| LaneGrant {
                base: binding.bases[lane.index()],
                landed: state.lanes[lane.index()].landed,
                generation: state.lanes[lane.index()].generation,
            }),
        })
    }

    /// Lands one verified chunk (not yet durable).
    pub fn land(&mut self, now: Instant, request: LandRequest<'_>) -> LandOutcome {
        let LandRequest { device, generation, header, encoded } = request;
        let lane = header.lane;
        let current = self.lane(device, lane);
        if self.broken.is_some() || generation != current.generation {
            self.stats.fenced_chunks += 1;
            return LandOutcome::Fenced;
        }
        if header.seq <= current.landed {
            self.stats.duplicates_dropped += 1;
            return LandOutcome::Duplicate;
        }
        match self.committer.land(device, header, encoded) {
            Ok(()) => {
                let state = self.lane_mut(device, lane);
                state.landed = header.seq;
                state.pending_bytes += encoded.len() as u64;
                if !state.pending {
                    state.pending = true;
                    self.pending.insert((device.to_string(), lane), ());
                }
                self.pending_bytes += encoded.len() as u64;
                self.pending_since.get_or_insert(now);
                self.stats.chunks_landed += 1;
                self.stats.bytes_landed += encoded.len() as u64;
                LandOutcome::Landed
            }
            Err(error) => {
                // A partial write may sit in the file: roll this lane back to its last commit.
                tracing::error!(device, %lane, seq = header.seq, %error, "landing failed; lane rolled back, nothing acked");
                self.stats.landing_failures += 1;
                if let Err(rollback) = self.committer.discard_uncommitted(device, lane) {
                    self.break_core(format!("rolling back {device}/{lane} after a failed write: {rollback}"));
                }
                self.roll_back_lane(device, lane);
                LandOutcome::Failed(error)
            }
        }
    }

    /// Whether a commit point is due.
    pub fn commit_due(&self, now: Instant) -> bool {
        self.pending_bytes >= self.config.commit_bytes_max
            || self.commit_deadline().is_some_and(|deadline| now >= deadline)
    }

    /// When the next commit is due, if anything is pending.
    pub fn commit_deadline(&self) -> Option<Instant> {
        self.pending_since.map(|since| since + self.config.commit_interval)
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Makes everything landed durable and advances the durable watermarks. Returns the
    /// advanced (device, lane) watermarks.
    pub fn commit(&mut self) -> Result<Vec<(Key, u64)>, CommitFailure> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let advanced: Watermarks = self
            .pending
            .keys()
            .map(|(device, lane)| ((device.clone(), *lane), self.landed(device, *lane)))
            .collect();
        let result = self.committer.commit().map_err(CommitError::from).and_then(|()| {
            let checkpoint = self.committer.checkpoint();
            self.store.commit(&advanced, &checkpoint)?;
            Ok(checkpoint)
        });
        match result {
            Ok(checkpoint) => {
                self.checkpoint = checkpoint;
                for ((device, lane), seq) in &advanced {
                    let state = self.lane_mut(device, *lane);
                    assert!(
                        *seq >= state.durable,
                        "durable watermarks never go backwards ({device}/{lane}: {} → {seq})",
                        state.durable
                    );
                    assert!(state.pending, "only pending lanes advance");
                    state.durable = *seq;
                    state.pending = false;
                    state.pending_bytes = 0;
                }
                self.pending.clear();
                self.pending_bytes = 0;
                self.pending_since = None;
                self.stats.commits += 1;
                Ok(advanced.into_iter().collect())
            }
            Err(error) => {
                // After a failed fsync the kernel may have dropped the dirty pages: never retry
                // and trust it. Bring the files back to the last stored checkpoint (the restart
                // path) and roll every pending lane back; the devices resend.
                tracing::error!(%error, "commit failed; rolling back everything since the last commit, no Acks sent");
                self.stats.commit_failures += 1;
                let stored = self.checkpoint.clone();
                if let Err(recover) = self.committer.recover(Some(&stored)) {
                    self.break_core(format!("recovering landing after a failed commit: {recover}"));
                }
                let rolled_back: Vec<Key> = self.pending.keys().cloned().collect();
                for (device, lane) in &rolled_back {
                    self.roll_back_lane(device, *lane);
                }
                assert!(self.pending.is_empty(), "every pending lane rolled back");
                Err(CommitFailure { error, rolled_back, broken: self.broken.clone() })
            }
        }
    }

    /// Back to the last commit: landed = durable, and a new generation fences every session
    /// granted before.
    fn roll_back_lane(&mut self, device: &str, lane: Lane) {
        let state = self.lane_mut(device, lane);
        state.landed = state.durable;
        state.generation += 1;
        let was_pending = std::mem::take(&mut state.pending);
        let rolled_back_bytes = std::mem::take(&mut state.pending_bytes);
        if was_pending {
            self.pending.remove(&(device.to_string(), lane));
            // The lane's bytes are no longer pending: a commit is not due because of them.
            self.pending_bytes -= rolled_back_bytes;
            if self.pending.is_empty() {
                assert_eq!(self.pending_bytes, 0, "pending bytes are the sum of the pending lanes'");
                self.pending_since = None;
            }
        }
    }

    fn break_core(&mut self, reason: String) {
        tracing::error!(%reason, "LANDING BROKEN: refusing every session and chunk until the sink restarts");
        self.broken.get_or_insert(reason);
    }

    /// Gives back the committer and the store (the simulator "crashes" the sink this way and
    /// reopens from what they hold durably).
    pub fn into_parts(self) -> (C, S) {
        (self.committer, self.store)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
