//! `OwnershipRegistry` on etcd.
//!
//! Keys (under `key_prefix`, default `/tributary`):
//! - `members/<node>` = the node's advertised address, attached to the node's lease;
//! - `owners/<device>` = the owning node's name, attached to its lease; its create revision is
//!   the fencing token;
//! - `watermarks/<device>` = JSON `DeviceRecord`: `{"watermarks": {"<lane id>": <seq>, ...},
//!   "ring": {"id": [16 bytes], "bases": {...}}}`, the device's complete state (one key per device, not per lane, so a txn covers 63 devices within etcd's 128 ops);
//! - `commits/<node>` = the node's last commit id (`"<id>"`, or `"abandoned <id>"` after an
//!   unknown outcome was resolved as not applied).
//!
//! A commit is one txn: compares `owners/<d>` create revision == token and `owners/<d>` lease ==
//! the node's lease for every device in the batch, and `commits/<node>` mod revision == the one this node last wrote (the chain); puts
//! every `watermarks/<d>` and `commits/<node>`. A lease that expired deleted the owner keys, so
//! the compares also check the lease. The chain compare is what makes unknown outcomes safe: once
//! `resolve` has moved `commits/<node>` on, a delayed copy of the old txn can never apply.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::ClusterConfig;
use crate::etcd::{Compare, EtcdClient, EtcdError, KeyValue, Op};
use crate::registry::{
    Claim, ClusterError, CommitOutcome, DeviceCommit, DeviceRecord, FencingToken, OwnershipRegistry,
    check_batch, check_device,
};

/// The largest device record we parse (4 lanes and a ring binding today: about 200 bytes).
const WATERMARK_VALUE_BYTES_MAX: usize = 8 << 10;
/// Tries of an idempotent txn (claim, release) whose outcome was unknown.
const CLAIM_ATTEMPTS_MAX: usize = 3;

pub struct EtcdRegistry {
    client: EtcdClient,
    node: String,
    prefix: String,
    lease: i64,
    lease_ttl_seconds: u64,
    batch_devices_max: usize,
    /// The mod revision of `commits/<node>` this node last saw/wrote (0: never written).
    commit_mod_revision: i64,
    last_commit_id: u64,
    /// (commit id, the chain revision it compared against)
    unresolved: Option<(u64, i64)>,
    lease_lost: Arc<AtomicBool>,
}

impl EtcdRegistry {
    /// Joins the cluster: grants the node's lease and registers the member key.
    pub fn connect(config: &ClusterConfig) -> Result<EtcdRegistry, ClusterError> {
        let mut client = EtcdClient::new(config.endpoint_addresses(), config.request_timeout());
        let lease = client.lease_grant(config.lease_ttl_seconds)?;
        let prefix = config.key_prefix.clone();
        let member_key = format!("{prefix}/members/{}", config.node).into_bytes();
        client.txn(
            &[],
            &[Op::Put { key: member_key, value: config.advertise.clone().into_bytes(), lease }],
            &[],
        )?;
        let mut registry = EtcdRegistry {
            client,
            node: config.node.clone(),
            prefix,
            lease,
            lease_ttl_seconds: config.lease_ttl_seconds,
            batch_devices_max: config.commit_batch_devices_max,
            commit_mod_revision: 0,
            last_commit_id: 0,
            unresolved: None,
            lease_lost: Arc::new(AtomicBool::new(false)),
        };
        if let Some(kv) = registry.client.get(&registry.commit_key())? {
            registry.commit_mod_revision = kv.mod_revision;
            registry.last_commit_id = parse_commit_value(&kv.value)
                .ok_or_else(|| ClusterError::NodeNameConflict { node: registry.node.clone() })?
                .0;
        }
        tracing::info!(
            node = registry.node,
            lease,
            last_commit_id = registry.last_commit_id,
            "joined the cluster"
        );
        Ok(registry)
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Renews the lease once. `Err(LeaseLost)` when etcd no longer knows it.
    pub fn keep_alive(&mut self) -> Result<(), ClusterError> {
        keep_alive_once(&mut self.client, self.lease, &self.node, &self.lease_lost)
    }

    /// Renews the lease every third of its TTL on a thread until the handle is dropped.
    pub fn spawn_keep_alive(&self) -> KeepAlive {
        let mut client = self.client.clone();
        let lease = self.lease;
        let node = self.node.clone();
        let lost = self.lease_lost.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_millis(self.lease_ttl_seconds * 1000 / 3);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("etcd-keepalive-{node}"))
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    match keep_alive_once(&mut client, lease, &node, &lost) {
                        Ok(()) => {}
                        Err(ClusterError::LeaseLost { .. }) => return,
                        Err(error) => tracing::warn!(%error, node, "lease keepalive failed; retrying"),
                    }
                    // Sleep in small steps so dropping the handle stops the thread quickly.
                    let mut slept = Duration::ZERO;
                    while slept < interval && !thread_stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                        slept += Duration::from_millis(50);
                    }
                }
            })
            .expect("spawning the keepalive thread");
        KeepAlive { stop, thread: Some(thread) }
    }

    pub fn lease_lost(&self) -> bool {
        self.lease_lost.load(Ordering::Relaxed)
    }

    /// Live members: (node, advertised address), sorted by node.
    pub fn members(&mut self) -> Result<Vec<(String, String)>, ClusterError> {
        let prefix = format!("{}/members/", self.prefix);
        let (kvs, _) = self.client.range(prefix.as_bytes(), true)?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let node = String::from_utf8(kv.key.get(prefix.len()..)?.to_vec()).ok()?;
                Some((node, String::from_utf8_lossy(&kv.value).into_owned()))
            })
            .collect())
    }

    /// Leaves the cluster: revoking the lease drops every ownership at once, so devices move
    /// without waiting for the TTL.
    pub fn leave(mut self) -> Result<(), ClusterError> {
        Ok(self.client.lease_revoke(self.lease)?)
    }

    fn owner_key(&self, device: &str) -> Vec<u8> {
        format!("{}/owners/{device}", self.prefix).into_bytes()
    }
    fn watermark_key(&self, device: &str) -> Vec<u8> {
        format!("{}/watermarks/{device}", self.prefix).into_bytes()
    }
    fn commit_key(&self) -> Vec<u8> {
        format!("{}/commits/{}", self.prefix, self.node).into_bytes()
    }

    fn note_unknown(&mut self, commit_id: u64, error: EtcdError) -> ClusterError {
        match error {
            EtcdError::OutcomeUnknown { endpoint, reason } => {
                self.unresolved = Some((commit_id, self.commit_mod_revision));
                ClusterError::OutcomeUnknown { commit_id, reason: format!("{endpoint}: {reason}") }
            }
            other => ClusterError::Etcd(other),
        }
    }
}

fn keep_alive_once(
    client: &mut EtcdClient,
    lease: i64,
    node: &str,
    lost: &AtomicBool,
) -> Result<(), ClusterError> {
    if client.lease_keepalive(lease)? <= 0 {
        lost.store(true, Ordering::Relaxed);
        tracing::error!(node, lease, "lease expired: this node owns no device any more");
        return Err(ClusterError::LeaseLost { node: node.to_string() });
    }
    Ok(())
}

/// Stops the keepalive thread when dropped (a test drops it to play a paused node).
pub struct KeepAlive {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `"<id>"` → (id, applied) ; `"abandoned <id>"` → (id, not applied).
fn parse_commit_value(value: &[u8]) -> Option<(u64, bool)> {
    let text = std::str::from_utf8(value).ok()?;
    match text.strip_prefix("abandoned ") {
        Some(id) => Some((id.parse().ok()?, false)),
        None => Some((text.parse().ok()?, true)),
    }
}

fn parse_record(device: &str, kv: &KeyValue) -> Result<DeviceRecord, ClusterError> {
    let corrupt = |reason: String| ClusterError::CorruptWatermarks { device: device.to_string(), reason };
    if kv.value.len() > WATERMARK_VALUE_BYTES_MAX {
        return Err(corrupt(format!("{} bytes, above {WATERMARK_VALUE_BYTES_MAX}", kv.value.len())));
    }
    serde_json::from_slice(&kv.value).map_err(|error| corrupt(error.to_string()))
}

impl OwnershipRegistry for EtcdRegistry {
    fn node(&self) -> &str {
        &self.node
    }

    fn claim(&mut self, device: &str) -> Result<Claim, ClusterError> {
        check_device(device)?;
        let key = self.owner_key(device);
        // Claiming is idempotent for the holder, so an unknown outcome (or an owner key that
        // vanished between two reads) is settled by claiming again, a bounded number of times.
        let mut last_error = None;
        for _ in 0..CLAIM_ATTEMPTS_MAX {
            if self.lease_lost() {
                return Err(ClusterError::LeaseLost { node: self.node.clone() });
            }
            let result = match self.client.txn(
                &[Compare::CreateRevision { key: key.clone(), revision: 0 }],
                &[Op::Put { key: key.clone(), value: self.node.clone().into_bytes(), lease: self.lease }],
                &[Op::Get { key: key.clone() }],
            ) {
                Err(error @ EtcdError::OutcomeUnknown { .. }) => {
                    last_error = Some(error);
                    continue;
                }
                other => other?,
            };
            if result.succeeded {
                return Ok(Claim::Owned { token: result.revision });
            }
            match result.gets.into_iter().next().flatten() {
                Some(kv) if kv.lease == self.lease => return Ok(Claim::Owned { token: kv.create_revision }),
                Some(kv) => {
                    return Ok(Claim::OwnedElsewhere {
                        node: String::from_utf8_lossy(&kv.value).into_owned(),
                    });
                }
                None => continue,
            }
        }
        Err(last_error.map_or_else(
            || {
                ClusterError::Etcd(EtcdError::Unavailable {
                    attempts: format!("claim of {device} kept racing"),
                })
            },
            ClusterError::Etcd,
        ))
    }

    fn release(&mut self, device: &str, token: FencingToken) -> Result<(), ClusterError> {
        check_device(device)?;
        let key = self.owner_key(device);
        // Releasing twice is harmless (the compare fails the second time): retry unknown outcomes.
        let mut last_error = None;
        for _ in 0..CLAIM_ATTEMPTS_MAX {
            match self.client.txn(
                &[Compare::CreateRevision { key: key.clone(), revision: token }],
                &[Op::Delete { key: key.clone() }],
                &[],
            ) {
                Ok(_) => return Ok(()),
                Err(error @ EtcdError::OutcomeUnknown { .. }) => last_error = Some(error),
                Err(error) => return Err(error.into()),
            }
        }
        Err(ClusterError::Etcd(last_error.expect("the loop ran")))
    }

    fn record(&mut self, device: &str) -> Result<DeviceRecord, ClusterError> {
        check_device(device)?;
        match self.client.get(&self.watermark_key(device))? {
            Some(kv) => parse_record(device, &kv),
            None => Ok(DeviceRecord::default()),
        }
    }

    fn commit(&mut self, commit_id: u64, batch: &[DeviceCommit]) -> Result<CommitOutcome, ClusterError> {
        if let Some((commit_id, _)) = self.unresolved {
            return Err(ClusterError::Unresolved { commit_id });
        }
        check_batch(batch, self.batch_devices_max)?;
        assert!(
            commit_id > self.last_commit_id,
            "commit ids increase per node ({} → {commit_id})",
            self.last_commit_id
        );
        let commit_key = self.commit_key();
        // The token alone is public (any node can read an owner key); the lease compare makes the
        // ownership this node's own, and fails the moment the lease expires.
        let mut compares: Vec<Compare> = batch
            .iter()
            .flat_map(|entry| {
                let key = self.owner_key(&entry.device);
                [
                    Compare::CreateRevision { key: key.clone(), revision: entry.token },
                    Compare::Lease { key, lease: self.lease },
                ]
            })
            .collect();
        compares.push(Compare::ModRevision { key: commit_key.clone(), revision: self.commit_mod_revision });
        let mut success: Vec<Op> = batch
            .iter()
            .map(|entry| Op::Put {
                key: self.watermark_key(&entry.device),
                value: serde_json::to_vec(&entry.record).expect("device records serialize"),
                lease: 0,
            })
            .collect();
        success.push(Op::Put {
            key: commit_key.clone(),
            value: commit_id.to_string().into_bytes(),
            lease: 0,
        });
        let mut failure: Vec<Op> =
            batch.iter().map(|entry| Op::Get { key: self.owner_key(&entry.device) }).collect();
        failure.push(Op::Get { key: commit_key });

        let result = self
            .client
            .txn(&compares, &success, &failure)
            .map_err(|error| self.note_unknown(commit_id, error))?;
        if result.succeeded {
            self.commit_mod_revision = result.revision;
            self.last_commit_id = commit_id;
            return Ok(CommitOutcome::Committed);
        }
        let (commit_kv, owner_kvs) =
            result.gets.split_last().expect("the failure branch reads the commit key");
        let commit_mod_revision = commit_kv.as_ref().map_or(0, |kv| kv.mod_revision);
        if commit_mod_revision != self.commit_mod_revision {
            return Err(ClusterError::NodeNameConflict { node: self.node.clone() });
        }
        let fenced: Vec<String> = batch
            .iter()
            .zip(owner_kvs)
            .filter(|(entry, owner)| {
                owner.as_ref().is_none_or(|kv| kv.create_revision != entry.token || kv.lease != self.lease)
            })
            .map(|(entry, _)| entry.device.clone())
            .collect();
        assert!(!fenced.is_empty(), "a failed commit txn has a failed compare");
        tracing::warn!(
            node = self.node,
            commit_id,
            ?fenced,
            "commit fenced: these devices are owned elsewhere now"
        );
        Ok(CommitOutcome::Fenced { devices: fenced })
    }

    fn resolve(&mut self) -> Result<bool, ClusterError> {
        let Some((commit_id, expected)) = self.unresolved else { return Ok(false) };
        let commit_key = self.commit_key();
        let abandoned = format!("abandoned {commit_id}").into_bytes();
        let result = match self.client.txn(
            &[Compare::ModRevision { key: commit_key.clone(), revision: expected }],
            &[Op::Put { key: commit_key.clone(), value: abandoned, lease: 0 }],
            &[Op::Get { key: commit_key }],
        ) {
            Ok(result) => result,
            Err(EtcdError::OutcomeUnknown { endpoint, reason }) => {
                return Err(ClusterError::OutcomeUnknown {
                    commit_id,
                    reason: format!("resolving: {endpoint}: {reason}"),
                });
            }
            Err(error) => return Err(error.into()),
        };
        let (applied, mod_revision) = if result.succeeded {
            (false, result.revision)
        } else {
            let kv = result.gets.into_iter().next().flatten();
            match kv
                .as_ref()
                .and_then(|kv| parse_commit_value(&kv.value).map(|parsed| (parsed, kv.mod_revision)))
            {
                Some(((id, applied), mod_revision)) if id == commit_id => (applied, mod_revision),
                _ => return Err(ClusterError::NodeNameConflict { node: self.node.clone() }),
            }
        };
        self.unresolved = None;
        self.commit_mod_revision = mod_revision;
        self.last_commit_id = commit_id;
        tracing::info!(node = self.node, commit_id, applied, "unknown commit outcome resolved");
        Ok(applied)
    }

    fn settle(&mut self, commit_id: u64) -> Result<bool, ClusterError> {
        assert!(self.unresolved.is_none(), "settle is for a commit of a previous process, at start");
        if commit_id < self.last_commit_id {
            // The chain moved past it: every commit id is settled before the next is sent.
            return Ok(true);
        }
        if commit_id == self.last_commit_id {
            let kv = self.client.get(&self.commit_key())?;
            return match kv.as_ref().and_then(|kv| parse_commit_value(&kv.value)) {
                Some((id, applied)) if id == commit_id => Ok(applied),
                _ => Err(ClusterError::NodeNameConflict { node: self.node.clone() }),
            };
        }
        // Not in etcd (yet): a delayed copy may still arrive. Close the chain against it.
        self.unresolved = Some((commit_id, self.commit_mod_revision));
        self.resolve()
    }

    fn last_commit_id(&self) -> u64 {
        self.last_commit_id
    }
}
