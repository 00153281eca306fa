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
//! - **Cluster** (`open_clustered`, with an `cluster::OwnershipRegistry`): a device must be claimed
//!   (`claim`) before its session opens; a new ownership adopts the device's watermarks and ring
//!   binding from the registry. A commit point is: `Committer::commit` (fsync) → the store's
//!   `prepare` (durable, not current) → ONE fenced registry txn for every device with pending
//!   lanes → the store's `promote` → Acks. Rule: *a checkpoint becomes current (readable, acked)
//!   only after the registry accepted its commit id, and the registry never holds a watermark
//!   whose data is not fsynced and prepared here.* Fenced: the prepared point is discarded and
//!   the commit fails as any failed commit does (everything pending rolls back; the fenced
//!   devices lose their token). Outcome unknown: nothing is acked and nothing rolls back; the
//!   next `commit` resolves it first (applied → promote; abandoned → the data, still fsynced, goes
//!   into the next commit point). At open, a prepared point is settled with the registry
//!   (applied → promoted, else discarded and the files recovered to the last current
//!   checkpoint). At most `batch_devices_max` devices are pending at once (one txn per commit
//!   point keeps it atomic): `commit_due` turns true at the bound, and a chunk of one more
//!   device is fenced if the driver did not commit.
//!
//! Bounds: pending state is one entry per (device, lane) written since the last commit;
//! `commit_bytes_max` and `commit_interval` bound what a commit covers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cluster::{
    Claim, ClusterError, CommitOutcome, DeviceCommit, DeviceRecord, FencingToken, OwnershipRegistry,
    RingRecord,
};
use std::time::{Duration, Instant};

use protocol::{ChunkHeader, Lane};
use session::{Grant, LaneGrant};

use crate::raw::{Committer, LandingError};
use crate::state::{LandingStore, Prepared, RingBinding, StateError, Watermarks};

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
    #[error("landing commit failed: cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("landing commit fenced: {devices:?} are owned by another node now")]
    Fenced { devices: Vec<String> },
}

/// A failed commit: what failed, and the lanes rolled back because of it.
#[derive(Debug)]
pub struct CommitFailure {
    pub error: CommitError,
    pub rolled_back: Vec<(String, Lane)>,
    /// Set when the committer could not even be recovered to the last checkpoint: the core
    /// refuses everything until the sink restarts.
    pub broken: Option<String>,
    /// Cluster mode: devices this node no longer owns (their sessions must be closed and sent to
    /// the owner).
    pub fenced: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("claiming a device: {0}")]
    Cluster(#[from] ClusterError),
    #[error("claiming a device: {0}")]
    State(#[from] StateError),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("recovering landing to the last checkpoint: {0}")]
    Recover(#[from] LandingError),
    #[error("settling the prepared commit point with the cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("a prepared cluster commit point {commit_id} is stored: open with the cluster (open_clustered)")]
    PreparedWithoutCluster { commit_id: u64 },
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
    cluster: Option<ClusterFence>,
}

/// Cluster mode's state: the registry, this node's tokens, the commit id chain.
struct ClusterFence {
    registry: Box<dyn OwnershipRegistry + Send>,
    tokens: HashMap<String, FencingToken>,
    next_commit_id: u64,
    batch_devices_max: usize,
    /// A commit point whose registry outcome is unknown (still prepared in the store).
    unresolved: Option<Prepared>,
}

impl<C: Committer, S: LandingStore> LandingCore<C, S> {
    /// Opens in cluster mode: settles a commit point prepared before a restart with `registry`
    /// (applied → promoted, else discarded), then opens as `open` does.
    pub fn open_clustered(
        config: LandingConfig,
        committer: C,
        mut store: S,
        mut registry: Box<dyn OwnershipRegistry + Send>,
        batch_devices_max: usize,
    ) -> Result<Self, OpenError> {
        assert!(
            (1..=cluster::config::COMMIT_BATCH_DEVICES_MAX).contains(&batch_devices_max),
            "one registry txn holds 1..={} devices",
            cluster::config::COMMIT_BATCH_DEVICES_MAX
        );
        if let Some(prepared) = store.load()?.prepared {
            if registry.settle(prepared.commit_id)? {
                tracing::info!(
                    commit_id = prepared.commit_id,
                    "the cluster accepted the commit point prepared before the restart: promoting it"
                );
                store.promote(prepared.commit_id)?;
            } else {
                tracing::info!(
                    commit_id = prepared.commit_id,
                    "the cluster never accepted the commit point prepared before the restart: discarding it"
                );
                store.discard_prepared()?;
            }
        }
        let mut core = Self::open(config, committer, store)?;
        core.cluster = Some(ClusterFence {
            next_commit_id: registry.last_commit_id() + 1,
            registry,
            tokens: HashMap::new(),
            batch_devices_max,
            unresolved: None,
        });
        Ok(core)
    }

    /// Loads the stored state and recovers the committer to its last checkpoint.
    pub fn open(config: LandingConfig, mut committer: C, mut store: S) -> Result<Self, OpenError> {
        let stored = store.load()?;
        if let Some(prepared) = &stored.prepared {
            return Err(OpenError::PreparedWithoutCluster { commit_id: prepared.commit_id });
        }
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
            cluster: None,
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

    /// Cluster mode: takes ownership of `device` (call before `open_session`). A new ownership
    /// adopts the registry's watermarks and ring binding for the device and fences its lanes.
    /// Standalone: every device is owned (token 0).
    pub fn claim(&mut self, device: &str) -> Result<Claim, ClaimError> {
        let Some(fence) = self.cluster.as_mut() else { return Ok(Claim::Owned { token: 0 }) };
        if let Some(token) = fence.tokens.get(device) {
            return Ok(Claim::Owned { token: *token });
        }
        let claim = fence.registry.claim(device)?;
        let Claim::Owned { token } = claim else { return Ok(claim) };
        let record = fence.registry.record(device)?;
        fence.tokens.insert(device.to_string(), token);
        self.adopt(device, &record)?;
        Ok(claim)
    }

    /// Whether this core may land for `device` (always, standalone).
    pub fn owns(&self, device: &str) -> bool {
        self.cluster.as_ref().is_none_or(|fence| fence.tokens.contains_key(device))
    }

    /// A new ownership: the registry's watermarks and binding are the truth (another node may
    /// have served the device since this one last did).
    fn adopt(&mut self, device: &str, record: &DeviceRecord) -> Result<(), StateError> {
        for lane in Lane::ALL {
            if self.lane(device, lane).pending {
                self.roll_back_lane(device, lane);
            }
            let cluster_durable = record.watermarks.get(&lane.id()).copied().unwrap_or(0);
            let state = self.lane_mut(device, lane);
            if cluster_durable < state.durable {
                tracing::warn!(device, %lane, local = state.durable, cluster = cluster_durable, "local watermark ahead of the cluster's (state from standalone mode?): keeping the local one");
            }
            state.durable = state.durable.max(cluster_durable);
            state.landed = state.durable;
            state.generation += 1;
        }
        if let Some(ring) = &record.ring {
            let binding = RingBinding {
                ring_id: ring.id,
                bases: Lane::ALL.map(|lane| ring.bases.get(&lane.id()).copied().unwrap_or(0)),
            };
            if self.binding(device) != Some(&binding) {
                self.store.bind(device, &binding)?;
                self.devices.get_mut(device).expect("lanes set above").binding = Some(binding);
            }
        }
        Ok(())
    }

    /// What the registry stores for `device` at a commit point.
    fn device_record(&self, device: &str) -> DeviceRecord {
        let state = self.devices.get(device).cloned().unwrap_or_default();
        let watermarks = Lane::ALL
            .iter()
            .map(|lane| {
                let lane_state = state.lanes[lane.index()];
                (lane.id(), if lane_state.pending { lane_state.landed } else { lane_state.durable })
            })
            .collect();
        let ring = state.binding.map(|binding| RingRecord {
            id: binding.ring_id,
            bases: Lane::ALL.iter().map(|lane| (lane.id(), binding.bases[lane.index()])).collect(),
        });
        DeviceRecord { watermarks, ring }
    }

    /// Devices with pending lanes (cluster mode bounds them per commit point).
    fn pending_devices(&self) -> BTreeSet<&str> {
        self.pending.keys().map(|(device, _)| device.as_str()).collect()
    }

    /// Binds `device` to `ring_id` if it is not bound to it yet (durably, before returning) and
    /// returns the grant a session of that ring works under.
    pub fn open_session(&mut self, device: &str, ring_id: [u8; 16]) -> Result<Grant, StateError> {
        if let Some(reason) = &self.broken {
            return Err(StateError::other("landing", "open session", format!("landing is broken: {reason}")));
        }
        if !self.owns(device) {
            return Err(StateError::other(
                "landing",
                "open session",
                format!("{device} is not owned by this node (claim it first)"),
            ));
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
        if self.broken.is_some() || generation != current.generation || !self.owns(device) {
            self.stats.fenced_chunks += 1;
            return LandOutcome::Fenced;
        }
        if let Some(fence) = &self.cluster
            && let pending_devices = self.pending_devices()
            && !pending_devices.contains(device)
            && pending_devices.len() >= fence.batch_devices_max
        {
            // The driver did not commit at the bound (`commit_due`): one more device would not
            // fit in one registry txn.
            tracing::warn!(
                device,
                "commit point full of devices; chunk fenced (the driver must commit when due)"
            );
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
            || self.cluster.as_ref().is_some_and(|fence| {
                fence.unresolved.is_some() || self.pending_devices().len() >= fence.batch_devices_max
            })
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
        if self.cluster.is_some() {
            return self.commit_clustered();
        }
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let advanced = self.pending_watermarks();
        let result = self.committer.commit().map_err(CommitError::from).and_then(|()| {
            let checkpoint = self.committer.checkpoint();
            self.store.commit(&advanced, &checkpoint)?;
            Ok(checkpoint)
        });
        match result {
            Ok(checkpoint) => Ok(self.advance(checkpoint, advanced)),
            Err(error) => Err(self.fail_commit(error, Vec::new())),
        }
    }

    /// Cluster mode's commit point (see the module doc).
    fn commit_clustered(&mut self) -> Result<Vec<(Key, u64)>, CommitFailure> {
        let fence = self.cluster.as_mut().expect("cluster mode");
        if let Some(prepared) = fence.unresolved.clone() {
            match fence.registry.resolve() {
                Ok(true) => {
                    fence.unresolved = None;
                    return match self.store.promote(prepared.commit_id) {
                        Ok(()) => Ok(self.advance_partially(prepared)),
                        Err(error) => Err(self.promote_failed(prepared.commit_id, error)),
                    };
                }
                Ok(false) => {
                    // Never applied, and now never will be: the data is still fsynced in the
                    // files and goes into a new commit point below.
                    fence.unresolved = None;
                    if let Err(error) = self.store.discard_prepared() {
                        self.break_core(format!("discarding an abandoned prepared commit point: {error}"));
                    }
                }
                Err(error) => {
                    return Err(CommitFailure {
                        error: error.into(),
                        rolled_back: Vec::new(),
                        broken: self.broken.clone(),
                        fenced: Vec::new(),
                    });
                }
            }
        }
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let advanced = self.pending_watermarks();
        if let Err(error) = self.committer.commit() {
            return Err(self.fail_commit(error.into(), Vec::new()));
        }
        let checkpoint = self.committer.checkpoint();
        let fence = self.cluster.as_mut().expect("cluster mode");
        let commit_id = fence.next_commit_id;
        fence.next_commit_id += 1;
        let prepared = Prepared { commit_id, advanced: advanced.clone(), checkpoint: checkpoint.clone() };
        if let Err(error) = self.store.prepare(&prepared) {
            return Err(self.fail_commit(error.into(), Vec::new()));
        }
        let fence = self.cluster.as_ref().expect("cluster mode");
        let batch: Vec<DeviceCommit> = self
            .pending_devices()
            .into_iter()
            .map(|device| DeviceCommit {
                device: device.to_string(),
                token: *fence.tokens.get(device).expect("only owned devices land"),
                record: self.device_record(device),
            })
            .collect();
        assert!(batch.len() <= fence.batch_devices_max, "land() keeps pending devices within one txn");
        let fence = self.cluster.as_mut().expect("cluster mode");
        match fence.registry.commit(commit_id, &batch) {
            Ok(CommitOutcome::Committed) => match self.store.promote(commit_id) {
                Ok(()) => Ok(self.advance(checkpoint, advanced)),
                Err(error) => Err(self.promote_failed(commit_id, error)),
            },
            Ok(CommitOutcome::Fenced { devices }) => {
                for device in &devices {
                    fence.tokens.remove(device);
                }
                tracing::warn!(
                    ?devices,
                    "commit fenced: devices owned by another node now; everything pending rolls back"
                );
                self.discard_prepared_or_break();
                Err(self.fail_commit(CommitError::Fenced { devices: devices.clone() }, devices))
            }
            Err(error @ ClusterError::OutcomeUnknown { .. }) => {
                // Neither ack nor roll back: the registry may hold this point already.
                tracing::error!(%error, "commit outcome unknown; nothing acked, resolving at the next commit");
                fence.unresolved = Some(prepared);
                Err(CommitFailure {
                    error: error.into(),
                    rolled_back: Vec::new(),
                    broken: self.broken.clone(),
                    fenced: Vec::new(),
                })
            }
            Err(error) => {
                if matches!(error, ClusterError::LeaseLost { .. }) {
                    fence.tokens.clear();
                }
                self.discard_prepared_or_break();
                Err(self.fail_commit(error.into(), Vec::new()))
            }
        }
    }

    fn discard_prepared_or_break(&mut self) {
        if let Err(error) = self.store.discard_prepared() {
            self.break_core(format!("discarding a prepared commit point the cluster refused: {error}"));
        }
    }

    /// The registry holds the commit point but the local store did not take it: the data is safe
    /// (prepared and fsynced; a restart settles and promotes it), but this process cannot go on.
    fn promote_failed(&mut self, commit_id: u64, error: StateError) -> CommitFailure {
        self.break_core(format!("the cluster accepted commit {commit_id} but promoting it locally failed: {error} (a restart promotes it)"));
        CommitFailure {
            error: error.into(),
            rolled_back: Vec::new(),
            broken: self.broken.clone(),
            fenced: Vec::new(),
        }
    }

    /// The watermarks a commit of everything pending records.
    fn pending_watermarks(&self) -> Watermarks {
        self.pending
            .keys()
            .map(|(device, lane)| ((device.clone(), *lane), self.landed(device, *lane)))
            .collect()
    }

    /// A successful commit of everything pending: durable watermarks advance.
    fn advance(&mut self, checkpoint: Vec<u8>, advanced: Watermarks) -> Vec<(Key, u64)> {
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
        advanced.into_iter().collect()
    }

    /// A commit point resolved as applied after more landed: its lanes advance to its
    /// watermarks; lanes that landed more since stay pending.
    fn advance_partially(&mut self, prepared: Prepared) -> Vec<(Key, u64)> {
        self.checkpoint = prepared.checkpoint;
        for ((device, lane), seq) in &prepared.advanced {
            let state = self.lane_mut(device, *lane);
            assert!(
                *seq >= state.durable && *seq <= state.landed,
                "a prepared point lies between durable and landed"
            );
            state.durable = *seq;
            if state.landed == *seq {
                state.pending = false;
                let bytes = std::mem::take(&mut state.pending_bytes);
                self.pending.remove(&(device.clone(), *lane));
                self.pending_bytes -= bytes;
            }
        }
        if self.pending.is_empty() {
            self.pending_since = None;
        }
        self.stats.commits += 1;
        prepared.advanced.into_iter().collect()
    }

    /// A failed commit: recover the files to the last current checkpoint (the restart path) and
    /// roll every pending lane back.
    fn fail_commit(&mut self, error: CommitError, fenced: Vec<String>) -> CommitFailure {
        // After a failed fsync the kernel may have dropped the dirty pages: never retry and trust
        // it. Bring the files back to the last stored checkpoint (the restart path) and roll
        // every pending lane back; the devices resend.
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
        CommitFailure { error, rolled_back, broken: self.broken.clone(), fenced }
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
