//! Ring configuration: every bound is named here, with a default and a reason.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protocol::Lane;

use crate::error::{Result, RingError};

/// The smallest ring we accept: enough for a handful of maximum-size chunks plus the audit
/// reservation. Smaller rings would evict on nearly every append.
pub const CAPACITY_BYTES_MIN: u64 = 4 * 1024 * 1024;
/// Largest capacity: LMDB maps the whole file, so this is bounded by the address space we are
/// willing to map on a 64-bit appliance.
pub const CAPACITY_BYTES_MAX: u64 = 1 << 40;
/// The LMDB map (and so the file) may exceed the configured capacity by this share. It holds the
/// B-tree's branch pages, the free list, and free runs too fragmented for large chunks; eviction
/// keeps accounted bytes under the capacity so that LMDB never reaches MAP_FULL.
pub const MAP_HEADROOM_PERCENT: u64 = 15;
/// How many readers (uplink lanes, API lookups, tools) may hold a read transaction at once.
pub const READERS_MAX_DEFAULT: u32 = 256;
/// LMDB reuses the pages a transaction frees only two commits later, so about two commit groups
/// of freed pages are unusable at any time; with one group (and one chunk) at most this share of
/// the capacity, that lag takes about 6 % of the 15 % headroom and leaves the rest for the tree's
/// own pages and free-list fragmentation.
pub const GROUP_SHARE_OF_CAPACITY_DIVISOR: u64 = 32;
/// Upper bound on one commit group.
pub const COMMIT_GROUP_BYTES_MAX_DEFAULT: u64 = 8 * 1024 * 1024;
/// Smaller groups would commit (and fsync) more often than any chunk stream needs.
pub const COMMIT_GROUP_BYTES_MIN: u64 = 64 * 1024;
pub const COMMIT_GROUP_OPERATIONS_MAX: usize = 1024;
/// Appends and acks waiting for the writer thread; producers block when it is full.
pub const QUEUE_DEPTH_MAX_DEFAULT: usize = 1024;

/// When an append returns, and what a power loss can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every commit group is fsynced before its appends return: a returned append survives power
    /// loss.
    Sync,
    /// Commits are written without fsync (LMDB `NOSYNC`, never with `WRITEMAP`) and the file is
    /// fsynced every `sync_interval_ms`. A process crash loses nothing (the pages are in the OS
    /// page cache); a power loss or kernel crash may lose the commits of the last
    /// `sync_interval_ms` plus one commit group. Those commits are never sent: `Ring::read_from`
    /// serves only chunks an fsync has made durable (`LaneStats::synced_next_seq`), so a ring
    /// that lost them after a power cut is never behind what the core holds, and their seqs are
    /// given again to new chunks the core has not seen.
    Periodic { sync_interval_ms: u64 },
}

/// What an append does when its lane has no room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LanePolicy {
    /// Evict the oldest unacked chunks (of this lane and lower-priority `drop_oldest` lanes,
    /// lowest priority first); every eviction is counted. The append never waits for the network.
    DropOldest,
    /// Wait up to `block_timeout_ms` for acks to free space, then fail with `Backpressure`. Never
    /// evicts. The audit lane is always `Block`.
    Block,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneConfig {
    pub policy: LanePolicy,
    /// Optional cap for this lane alone, inside its pool (the audit reservation for the audit
    /// lane, the shared pool for the others).
    pub bytes_max: Option<u64>,
    /// How long a `Block` append waits for room. Zero fails at once (what the inference API wants:
    /// answer 503 instead of hanging).
    pub block_timeout_ms: u64,
}

/// What to do when the file at the ring's path cannot be opened as a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCorrupt {
    /// Move the damaged ring aside intact (`<path>.corrupt-<unix seconds>`) for forensics, log it
    /// loudly and start a fresh ring, so a damaged disk never wedges the appliance.
    Quarantine,
    /// Return an error and touch nothing.
    Refuse,
}

/// A test seam: called on the ring's writer thread right after each successful fsync of the ring
/// (each `force_sync` in `Periodic` mode, each commit in `Sync` mode, and the fsync at open), with
/// the ring's directory, while the writer is paused: `data.mdb` then holds exactly the state a
/// power cut at that moment would leave. Reads do not yet see chunks this fsync made durable
/// (the observer runs before they are published), so nothing leaves the ring before an observer
/// has seen the state holding it. Tests copy `data.mdb` here to simulate power cuts
/// (`tests/power_cut.rs`); production configs leave it `None`. The callback blocks the writer:
/// keep it short and never call the ring from it (that would deadlock).
#[derive(Clone)]
pub struct SyncObserver(pub Arc<dyn Fn(&Path) + Send + Sync>);

impl SyncObserver {
    pub fn new(observe: impl Fn(&Path) + Send + Sync + 'static) -> SyncObserver {
        SyncObserver(Arc::new(observe))
    }

    pub(crate) fn observe(&self, path: &Path) {
        (self.0)(path)
    }
}

/// A closure has nothing to print.
impl fmt::Debug for SyncObserver {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("SyncObserver(..)")
    }
}

/// Two observers are equal when they are the same closure (clones of one `SyncObserver`).
impl PartialEq for SyncObserver {
    fn eq(&self, other: &SyncObserver) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SyncObserver {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes of chunks (as accounted by `stored_bytes`) the ring may hold, all lanes together.
    pub capacity_bytes: u64,
    /// Share of the capacity only the audit lane may use; other lanes share the rest.
    pub audit_reserved_bytes: u64,
    pub durability: Durability,
    /// Indexed by `Lane::index()`.
    pub lanes: [LaneConfig; Lane::COUNT],
    pub commit_group_bytes_max: u64,
    pub queue_depth_max: usize,
    pub readers_max: u32,
    pub on_corrupt: OnCorrupt,
    /// Test seam, `None` in production: see `SyncObserver`.
    pub sync_observer: Option<SyncObserver>,
}

impl RingConfig {
    /// Embedded defaults for a ring of `capacity_bytes`: audit reserves an eighth, decisions block
    /// for up to a second, sensor and media drop their oldest chunks, sync durability.
    pub fn with_capacity(capacity_bytes: u64) -> RingConfig {
        let block =
            |block_timeout_ms| LaneConfig { policy: LanePolicy::Block, bytes_max: None, block_timeout_ms };
        let drop_oldest = LaneConfig { policy: LanePolicy::DropOldest, bytes_max: None, block_timeout_ms: 0 };
        let mut lanes = [drop_oldest; Lane::COUNT];
        lanes[Lane::Audit.index()] = block(0);
        lanes[Lane::Decisions.index()] = block(1_000);
        RingConfig {
            capacity_bytes,
            audit_reserved_bytes: capacity_bytes / 8,
            durability: Durability::Sync,
            lanes,
            commit_group_bytes_max: COMMIT_GROUP_BYTES_MAX_DEFAULT
                .min(capacity_bytes / GROUP_SHARE_OF_CAPACITY_DIVISOR)
                .max(COMMIT_GROUP_BYTES_MIN),
            queue_depth_max: QUEUE_DEPTH_MAX_DEFAULT,
            readers_max: READERS_MAX_DEFAULT,
            on_corrupt: OnCorrupt::Quarantine,
            sync_observer: None,
        }
    }

    pub fn lane(&self, lane: Lane) -> &LaneConfig {
        &self.lanes[lane.index()]
    }

    /// The LMDB map size: capacity plus headroom, rounded down to whole pages.
    pub fn map_size_bytes(&self) -> u64 {
        let raw = self.capacity_bytes + self.capacity_bytes * MAP_HEADROOM_PERCENT / 100;
        raw - raw % crate::layout::PAGE_BYTES
    }

    /// The largest chunk (as accounted by `stored_bytes`) this ring accepts: a thirty-second of
    /// the capacity, so that one chunk's churn fits the headroom (see
    /// `GROUP_SHARE_OF_CAPACITY_DIVISOR`). A 64 MiB ring takes chunks up to 2 MiB.
    pub fn chunk_stored_bytes_max(&self) -> u64 {
        self.capacity_bytes / GROUP_SHARE_OF_CAPACITY_DIVISOR
    }

    /// Bytes the pool that `lane` draws from may hold.
    pub fn pool_budget_bytes(&self, lane: Lane) -> u64 {
        if lane == Lane::Audit {
            self.audit_reserved_bytes
        } else {
            self.capacity_bytes - self.audit_reserved_bytes
        }
    }

    /// Bytes `lane` alone may hold: its own cap, or its pool.
    pub fn lane_budget_bytes(&self, lane: Lane) -> u64 {
        let pool = self.pool_budget_bytes(lane);
        self.lane(lane).bytes_max.map_or(pool, |cap| cap.min(pool))
    }

    pub fn block_timeout(&self, lane: Lane) -> Duration {
        Duration::from_millis(self.lane(lane).block_timeout_ms)
    }

    /// Checks every bound; errors name the key and what was expected.
    pub fn validate(&self) -> Result<()> {
        let problem = |key: &'static str, problem: String| Err(RingError::Config { key, problem });
        if !(CAPACITY_BYTES_MIN..=CAPACITY_BYTES_MAX).contains(&self.capacity_bytes) {
            return problem(
                "capacity_bytes",
                format!("{} is outside {CAPACITY_BYTES_MIN}..={CAPACITY_BYTES_MAX}", self.capacity_bytes),
            );
        }
        if self.audit_reserved_bytes >= self.capacity_bytes {
            return problem(
                "audit_reserved_bytes",
                format!(
                    "{} must be below capacity_bytes {} so other lanes have room",
                    self.audit_reserved_bytes, self.capacity_bytes
                ),
            );
        }
        if self.lane(Lane::Audit).policy != LanePolicy::Block {
            return problem(
                "lanes.audit.policy",
                "the audit lane is never evicted while unacked: it must be `block`".to_string(),
            );
        }
        for lane in Lane::ALL {
            let config = self.lane(lane);
            if config.bytes_max == Some(0) {
                return problem("lanes.*.bytes_max", format!("lane {lane}: 0 would refuse every chunk"));
            }
            if config.block_timeout_ms > 3_600_000 {
                return problem(
                    "lanes.*.block_timeout_ms",
                    format!("lane {lane}: {} ms is more than an hour", config.block_timeout_ms),
                );
            }
        }
        let group_min = COMMIT_GROUP_BYTES_MIN;
        let group_max = self.chunk_stored_bytes_max().max(group_min);
        if !(group_min..=group_max).contains(&self.commit_group_bytes_max) {
            return problem(
                "commit_group_bytes_max",
                format!(
                    "{} must be within {group_min}..={group_max} (a thirty-second of the capacity)",
                    self.commit_group_bytes_max
                ),
            );
        }
        if self.queue_depth_max == 0 || self.queue_depth_max > 1 << 20 {
            return problem(
                "queue_depth_max",
                format!("{} must be within 1..=1048576", self.queue_depth_max),
            );
        }
        if !(8..=65_536).contains(&self.readers_max) {
            return problem("readers_max", format!("{} must be within 8..=65536", self.readers_max));
        }
        if let Durability::Periodic { sync_interval_ms } = self.durability
            && !(1..=60_000).contains(&sync_interval_ms)
        {
            return problem(
                "durability.sync_interval_ms",
                format!("{sync_interval_ms} must be within 1..=60000"),
            );
        }
        Ok(())
    }
}
