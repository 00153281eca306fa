//! The appliance's ring: a bounded, crash-safe store of chunks per lane, on LMDB (heed).
//!
//! Producers `append` sealed chunks (from `protocol::ChunkBuilder`); the ring gives each a seq
//! (per lane, from 1, never reused). The uplink reads a lane from the core's resume seq with
//! `read_from` and calls `ack` as durable watermarks come back; acked chunks are deleted. When a
//! lane has no room its policy decides: `drop_oldest` evicts (counted) or `block` waits, then
//! reports backpressure. The audit lane has its own reservation and is never evicted.
//!
//! Limits: capacity 4 MiB ..= 1 TiB of accounted chunk bytes; the LMDB map (and file) is the
//! capacity plus 15 % headroom; one chunk up to `protocol::CHUNK_ENCODED_BYTES_MAX` (4 MiB + 40);
//! one commit group up to `commit_group_bytes_max` (8 MiB by default); at most `queue_depth_max`
//! requests queued for the writer. The on-disk layout is described in `layout`.
//!
//! Invariants:
//! - Chunk data and its lane's accounting change in the same write transaction.
//! - An append returns `Ok(seq)` only after its transaction committed (and, in `Sync` mode, was
//!   fsynced).
//! - `read_from` returns only chunks whose commit was fsynced (seq below `synced_next_seq`): what
//!   leaves the ring survives a power cut, in every durability mode.
//! - The ring identity (`identity`) is durable before `open` or `renew_identity` returns.
//! - `acked_through` never decreases; `next_seq` never decreases (in `Periodic` mode a power cut
//!   takes both back to the last fsync); seqs in a lane are contiguous except for evicted
//!   (counted) and quarantined (counted) chunks.
//! - The audit lane is never evicted; no lane evicts a higher-priority lane.
//! - Knows nothing of the network.

mod config;
mod error;
pub mod layout;
#[cfg(feature = "test-support")]
pub mod power_cut;
mod ring;
mod store;
mod writer;

pub use config::{
    CAPACITY_BYTES_MAX, CAPACITY_BYTES_MIN, Durability, LaneConfig, LanePolicy, MAP_HEADROOM_PERCENT,
    OnCorrupt, RingConfig, SyncObserver,
};
pub use error::{AppendError, Result, RingError};
pub use layout::IDENTITY_BYTES;
pub use ring::{LaneStats, ReadLimits, Ring, RingStats, StoredChunk};
