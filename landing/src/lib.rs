//! The sink's landing core, with no async runtime and no network: where verified chunks become
//! durable exactly once.
//!
//! - `raw`: the `Committer` interface and `RawLanding`, the append-only files of chunks as
//!   received, with their checkpoint format.
//! - `state`: the `LandingStore` interface and `SinkState`, the sink's own durable state (heed):
//!   watermarks and the committer's checkpoint in one synced transaction, ring bindings.
//! - `core`: `LandingCore`, dedupe, ring epochs, fencing, commit points (see its module doc).
//! - `committed`: the one reader of committed raw landing, for datasets, archive and replication.
//!
//! **Invariant:** this crate knows nothing of tokio, quinn or sockets; every input is a method
//! call, so the simulator drives the very code the sink runs.

pub mod committed;
pub mod core;
pub mod memory;
pub mod raw;
pub mod state;

pub use crate::core::{
    CommitError, CommitFailure, LandOutcome, LandRequest, LandingConfig, LandingCore, LandingStats, OpenError,
};
pub use committed::{
    CommittedChunk, CommittedLanding, Damage, LaneReader, READ_BUFFER_BYTES, ReadError, ReadPosition,
    read_landed_file,
};
pub use raw::{
    CommittedPositions, Committer, FilePosition, LandingError, RECORD_LENGTH_BYTES, RawLanding,
    parse_checkpoint, raw_file_path, raw_files,
};
pub use state::{LandingStore, Prepared, RingBinding, SinkState, StateError, StoredState, Watermarks};
