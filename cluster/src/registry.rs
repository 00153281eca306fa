//! Device ownership and fenced watermark commits: the `OwnershipRegistry` trait, implemented on
//! etcd (`EtcdRegistry`) and in memory (`MemoryCluster`, same rules, for the pure landing core's
//! tests and the simulator).
//!
//! Rules (both implementations):
//! - A device is owned by at most one node. `claim` succeeds only when no live node owns it; the
//!   returned `FencingToken` is the revision at which the ownership was created and identifies
//!   this ownership forever (a later owner, even the same node again, gets a larger token).
//! - Ownership ends when the node's lease expires (the node stopped renewing: dead, paused,
//!   partitioned) or on `release`.
//! - `commit` is atomic for the whole batch: every device's watermarks are stored, or none are.
//!   It succeeds only if every device in the batch is still owned under the token given.
//!   Watermarks stored for a device are the device's complete watermark map.
//! - Each node's commits form a chain (the node's commit key holds the last commit id); a commit
//!   whose outcome is unknown must be resolved before the next, and resolution makes the
//!   unknown commit either applied or never-applicable (see `resolve`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::etcd::EtcdError;

/// The revision that created an ownership: strictly increasing across owners of a device.
pub type FencingToken = i64;

/// Per lane (the protocol's lane id) the highest core seq that is durable.
pub type LaneWatermarks = BTreeMap<u8, u64>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Owned { token: FencingToken },
    OwnedElsewhere { node: String },
}

/// What etcd holds per device: its committed watermarks and the ring binding they are based on
/// (the ring id and per-lane seq base of its epoch), so a new owner maps the device's ring seqs
/// to the same core seqs the old owner did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub watermarks: LaneWatermarks,
    pub ring: Option<RingRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingRecord {
    pub id: [u8; 16],
    pub bases: LaneWatermarks,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCommit {
    pub device: String,
    pub token: FencingToken,
    pub record: DeviceRecord,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Stored; the caller may make its commit point final and ack.
    Committed,
    /// Nothing stored: these devices are no longer owned under the token given. The caller must
    /// drop everything pending for them and stop serving them; other devices may be retried in
    /// a new batch.
    Fenced { devices: Vec<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(#[from] EtcdError),
    /// Nothing may be acked, nothing may be rolled back: call `resolve` until it answers.
    #[error(
        "the outcome of commit {commit_id} is unknown ({reason}); resolve it before acking or discarding anything"
    )]
    OutcomeUnknown { commit_id: u64, reason: String },
    #[error("commit {commit_id} is unresolved; call resolve first")]
    Unresolved { commit_id: u64 },
    #[error("node {node}: its lease expired; every device it owned is lost")]
    LeaseLost { node: String },
    #[error(
        "node {node}: another process writes the same node's commit key (two nodes configured with one name?)"
    )]
    NodeNameConflict { node: String },
    #[error("invalid device id {device:?} (empty, over 255 bytes, '/' or a control character)")]
    InvalidDevice { device: String },
    #[error("batch of {devices} devices is above the limit {limit}")]
    BatchTooLarge { devices: usize, limit: usize },
    #[error("stored watermarks for {device} are unreadable: {reason}")]
    CorruptWatermarks { device: String, reason: String },
}

pub trait OwnershipRegistry {
    fn node(&self) -> &str;
    /// Takes ownership of `device` if no live node holds it (idempotent for the holder).
    fn claim(&mut self, device: &str) -> Result<Claim, ClusterError>;
    /// Gives up ownership (rebalancing, shutdown); a no-op if the token is no longer current.
    fn release(&mut self, device: &str, token: FencingToken) -> Result<(), ClusterError>;
    /// The device's committed record (default for a device never committed): the resume point
    /// and ring binding of a new owner.
    fn record(&mut self, device: &str) -> Result<DeviceRecord, ClusterError>;
    /// One atomic, fenced commit of `batch`. `commit_id` is strictly increasing per node.
    fn commit(&mut self, commit_id: u64, batch: &[DeviceCommit]) -> Result<CommitOutcome, ClusterError>;
    /// Settles a commit that answered `OutcomeUnknown`: `Ok(true)` it was applied (ack it),
    /// `Ok(false)` it was not and never will be (roll it back). Errors leave it unresolved.
    fn resolve(&mut self) -> Result<bool, ClusterError>;
    /// At start: settles `commit_id`, which a previous process of this node prepared and may have
    /// sent. `Ok(true)` it was applied; `Ok(false)` it was not and now never will be.
    fn settle(&mut self, commit_id: u64) -> Result<bool, ClusterError>;
    /// The highest commit id of this node etcd has settled (applied or abandoned).
    fn last_commit_id(&self) -> u64;
}

/// Common argument checks, shared by both implementations.
pub(crate) fn check_batch(batch: &[DeviceCommit], limit: usize) -> Result<(), ClusterError> {
    if batch.len() > limit {
        return Err(ClusterError::BatchTooLarge { devices: batch.len(), limit });
    }
    for entry in batch {
        check_device(&entry.device)?;
    }
    let mut devices: Vec<&str> = batch.iter().map(|entry| entry.device.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    assert_eq!(devices.len(), batch.len(), "a commit batch names each device once");
    Ok(())
}

pub(crate) fn check_device(device: &str) -> Result<(), ClusterError> {
    if crate::config::valid_name(device) {
        Ok(())
    } else {
        Err(ClusterError::InvalidDevice { device: device.to_string() })
    }
}

/// The in-memory registry: one shared state, one handle per node. A node's "lease" is a flag
/// the test flips with `expire`.
#[derive(Clone, Default)]
pub struct MemoryCluster {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Default)]
struct MemoryState {
    revision: i64,
    /// device → (node, token)
    owners: BTreeMap<String, (String, FencingToken)>,
    records: BTreeMap<String, DeviceRecord>,
    /// node → (last commit id, applied)
    commits: BTreeMap<String, (u64, bool)>,
    expired: std::collections::BTreeSet<String>,
    /// When set, the next commit of this node is applied (or not) and answers OutcomeUnknown.
    unknown_next: Option<(String, bool)>,
}

impl MemoryCluster {
    pub fn new() -> MemoryCluster {
        MemoryCluster::default()
    }

    pub fn node(&self, name: &str) -> MemoryRegistry {
        self.state.lock().expect("memory registry lock").expired.remove(name);
        MemoryRegistry { cluster: self.clone(), node: name.to_string(), unresolved: None }
    }

    /// The node's lease expires: it owns nothing any more and cannot claim until `node` again.
    pub fn expire(&self, name: &str) {
        let mut state = self.state.lock().expect("memory registry lock");
        state.owners.retain(|_, (owner, _)| owner != name);
        state.expired.insert(name.to_string());
    }

    /// The next commit of `node` answers OutcomeUnknown after being applied (`applied`) or not.
    pub fn make_next_commit_unknown(&self, node: &str, applied: bool) {
        self.state.lock().expect("memory registry lock").unknown_next = Some((node.to_string(), applied));
    }

    /// What the registry holds for `device` (default when nothing).
    pub fn record(&self, device: &str) -> DeviceRecord {
        self.state.lock().expect("memory registry lock").records.get(device).cloned().unwrap_or_default()
    }

    pub fn owner(&self, device: &str) -> Option<(String, FencingToken)> {
        self.state.lock().expect("memory registry lock").owners.get(device).cloned()
    }
}

pub struct MemoryRegistry {
    cluster: MemoryCluster,
    node: String,
    unresolved: Option<(u64, bool)>,
}

impl OwnershipRegistry for MemoryRegistry {
    fn node(&self) -> &str {
        &self.node
    }

    fn claim(&mut self, device: &str) -> Result<Claim, ClusterError> {
        check_device(device)?;
        let mut state = self.cluster.state.lock().expect("memory registry lock");
        if state.expired.contains(&self.node) {
            return Err(ClusterError::LeaseLost { node: self.node.clone() });
        }
        if let Some((owner, token)) = state.owners.get(device) {
            return Ok(if *owner == self.node {
                Claim::Owned { token: *token }
            } else {
                Claim::OwnedElsewhere { node: owner.clone() }
            });
        }
        state.revision += 1;
        let token = state.revision;
        state.owners.insert(device.to_string(), (self.node.clone(), token));
        Ok(Claim::Owned { token })
    }

    fn release(&mut self, device: &str, token: FencingToken) -> Result<(), ClusterError> {
        let mut state = self.cluster.state.lock().expect("memory registry lock");
        if state.owners.get(device).is_some_and(|(_, current)| *current == token) {
            state.owners.remove(device);
            state.revision += 1;
        }
        Ok(())
    }

    fn record(&mut self, device: &str) -> Result<DeviceRecord, ClusterError> {
        check_device(device)?;
        Ok(self
            .cluster
            .state
            .lock()
            .expect("memory registry lock")
            .records
            .get(device)
            .cloned()
            .unwrap_or_default())
    }

    fn commit(&mut self, commit_id: u64, batch: &[DeviceCommit]) -> Result<CommitOutcome, ClusterError> {
        if let Some((commit_id, _)) = self.unresolved {
            return Err(ClusterError::Unresolved { commit_id });
        }
        check_batch(batch, crate::config::COMMIT_BATCH_DEVICES_MAX)?;
        let mut state = self.cluster.state.lock().expect("memory registry lock");
        let last = state.commits.get(&self.node).map_or(0, |(id, _)| *id);
        assert!(commit_id > last, "commit ids increase per node ({last} → {commit_id})");
        let fenced: Vec<String> = batch
            .iter()
            .filter(|entry| state.owners.get(&entry.device) != Some(&(self.node.clone(), entry.token)))
            .map(|entry| entry.device.clone())
            .collect();
        let unknown = state.unknown_next.take_if(|(node, _)| *node == self.node).map(|(_, applied)| applied);
        let applies = fenced.is_empty() && unknown.unwrap_or(true);
        if applies {
            state.revision += 1;
            for entry in batch {
                state.records.insert(entry.device.clone(), entry.record.clone());
            }
            state.commits.insert(self.node.clone(), (commit_id, true));
        }
        if let Some(_applied) = unknown {
            self.unresolved = Some((commit_id, applies));
            return Err(ClusterError::OutcomeUnknown { commit_id, reason: "injected by the test".into() });
        }
        Ok(if fenced.is_empty() {
            CommitOutcome::Committed
        } else {
            CommitOutcome::Fenced { devices: fenced }
        })
    }

    fn resolve(&mut self) -> Result<bool, ClusterError> {
        let Some((commit_id, applied)) = self.unresolved.take() else { return Ok(false) };
        if !applied {
            self.cluster
                .state
                .lock()
                .expect("memory registry lock")
                .commits
                .insert(self.node.clone(), (commit_id, false));
        }
        Ok(applied)
    }

    fn settle(&mut self, commit_id: u64) -> Result<bool, ClusterError> {
        let mut state = self.cluster.state.lock().expect("memory registry lock");
        match state.commits.get(&self.node).copied() {
            Some((last, applied)) if last == commit_id => Ok(applied),
            Some((last, _)) if last > commit_id => Ok(true),
            _ => {
                state.commits.insert(self.node.clone(), (commit_id, false));
                Ok(false)
            }
        }
    }

    fn last_commit_id(&self) -> u64 {
        self.cluster
            .state
            .lock()
            .expect("memory registry lock")
            .commits
            .get(&self.node)
            .map_or(0, |(id, _)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(device: &str, token: FencingToken, seq: u64) -> Vec<DeviceCommit> {
        vec![DeviceCommit { device: device.into(), token, record: record(seq) }]
    }

    fn record(seq: u64) -> DeviceRecord {
        DeviceRecord { watermarks: BTreeMap::from([(2, seq)]), ring: None }
    }

    #[test]
    fn memory_registry_fences_a_node_whose_lease_expired() {
        let cluster = MemoryCluster::new();
        let mut a = cluster.node("a");
        let mut b = cluster.node("b");
        let Claim::Owned { token: token_a } = a.claim("cam").unwrap() else { panic!() };
        assert_eq!(b.claim("cam").unwrap(), Claim::OwnedElsewhere { node: "a".into() });
        assert_eq!(a.commit(1, &batch("cam", token_a, 10)).unwrap(), CommitOutcome::Committed);
        cluster.expire("a");
        let Claim::Owned { token: token_b } = b.claim("cam").unwrap() else { panic!() };
        assert!(token_b > token_a);
        assert_eq!(b.record("cam").unwrap(), record(10));
        assert_eq!(
            a.commit(2, &batch("cam", token_a, 20)).unwrap(),
            CommitOutcome::Fenced { devices: vec!["cam".into()] }
        );
        assert_eq!(b.record("cam").unwrap(), record(10));
        assert!(matches!(a.claim("other"), Err(ClusterError::LeaseLost { .. })));
    }

    #[test]
    fn memory_registry_unknown_outcomes_must_be_resolved() {
        let cluster = MemoryCluster::new();
        let mut a = cluster.node("a");
        let Claim::Owned { token } = a.claim("cam").unwrap() else { panic!() };
        cluster.make_next_commit_unknown("a", true);
        assert!(matches!(
            a.commit(1, &batch("cam", token, 5)),
            Err(ClusterError::OutcomeUnknown { commit_id: 1, .. })
        ));
        assert!(matches!(
            a.commit(2, &batch("cam", token, 6)),
            Err(ClusterError::Unresolved { commit_id: 1 })
        ));
        assert!(a.resolve().unwrap());
        assert_eq!(a.record("cam").unwrap(), record(5));
        cluster.make_next_commit_unknown("a", false);
        assert!(a.commit(2, &batch("cam", token, 7)).is_err());
        assert!(!a.resolve().unwrap());
        assert_eq!(a.record("cam").unwrap(), record(5));
    }
}
