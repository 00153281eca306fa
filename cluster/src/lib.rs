//! Tributary's core cluster on etcd: membership (a member key under the node's lease), device
//! ownership with fencing tokens, fenced watermark commits batched per commit point, and
//! rendezvous placement. Synchronous: it runs on the sink's lander thread next to LMDB.
//!
//! **Invariant:** a node's watermark commit reaches etcd only inside a txn that checks, for every
//! device in it, that the node still owns the device under the token it claimed; nothing else
//! writes watermarks.
//! **Invariant:** a commit whose outcome is unknown is neither acked nor rolled back until
//! `resolve` settles it.
//! **API boundary:** `OwnershipRegistry` (claim, release, record, commit, resolve, settle); the
//! landing core sees only this trait (`EtcdRegistry` in production, `MemoryCluster` in tests).

pub mod config;
pub mod etcd;
pub mod etcd_registry;
pub mod http;
pub mod placement;
pub mod registry;
pub mod testing;

pub use config::ClusterConfig;
pub use etcd_registry::{EtcdRegistry, KeepAlive};
pub use registry::{
    Claim, ClusterError, CommitOutcome, DeviceCommit, DeviceRecord, FencingToken, LaneWatermarks,
    MemoryCluster, MemoryRegistry, OwnershipRegistry, RingRecord,
};
