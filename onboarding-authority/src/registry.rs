//! The device registry (heed): claim tokens, devices, their latest heartbeat and their config.
//!
//! Layout: database `tokens`, key = SHA-256 of the token (hex; the token itself is shown once by
//! `create_tokens` and never stored), value = [`TokenRecord`] as JSON; database `devices`, key =
//! device id, value = [`DeviceRecord`] as JSON; database `unapproved`, key = device id of every
//! pending record no operator approved (what anyone holding the claim identity can create), value
//! empty: an index kept by `put_device` and rebuilt at open, so the authority bounds these
//! records (`pending_devices_max`) with one O(1) count. Values are small (a record with certificate and
//! heartbeat is about 3 KiB), so the map (`REGISTRY_MAP_BYTES`, 256 MiB) holds tens of thousands
//! of devices.
//!
//! The registry is also the command queue from the operator's CLI to the running authority: the
//! CLI (another process; LMDB allows that) writes config changes, approvals and revocations; the
//! authority polls and acts on them. One process opens an environment once; [`Registry::open`]
//! hands out clones of that one handle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use heed::types::{Bytes, Str};
use heed::{Database, Env, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use serde::{Deserialize, Serialize};

use onboarding::messages::{ConfigDocument, Heartbeat, validate_config_entry};
use onboarding::{OnboardingError, RESERVED_DEVICE_IDS};

/// Bounds the registry file.
const REGISTRY_MAP_BYTES: usize = 256 * 1024 * 1024;
/// Most tokens one `create_tokens` call makes.
pub const TOKENS_PER_CALL_MAX: u32 = 10_000;
/// Longest token validity: a claim token is a bootstrap secret, not a long-term credential.
pub const TOKEN_VALIDITY_MAX: Duration = Duration::from_secs(365 * 86_400);
/// Random bytes in a token (shown as 64 hex digits).
const TOKEN_RANDOM_BYTES: usize = 32;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// The device that claimed it; a token is single-use: set in the transaction that signs the
    /// certificate, and any later request naming it is refused (`token_used`).
    pub used_by: Option<String>,
    /// The key fingerprint the certificate was signed for (absent in records written before
    /// tokens were bound to keys).
    #[serde(default)]
    pub used_by_key_sha256: Option<String>,
    #[serde(default)]
    pub used_unix_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Asked without a token; waits for `core-sink fleet approve`.
    Pending,
    Active,
    Revoked,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Active => "active",
            DeviceState::Revoked => "revoked",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub state: DeviceState,
    /// SHA-256 (hex) of the claim token it onboarded with, if any.
    pub token_hash: Option<String>,
    /// Operator approval (approval mode), given before or after the device asked.
    pub approved: bool,
    /// Fingerprint (`topics::key_fingerprint`) of the key this pending id is bound to: the first
    /// key that asked without a token, or the key the operator approved. Another key is refused
    /// (`key_mismatch`) and an approval signs only this key.
    pub pending_key_sha256: Option<String>,
    /// Fingerprint of the key the certificate was signed for (active devices). A request with
    /// this key gets the stored certificate again (a retry after a lost answer); another key is
    /// refused.
    #[serde(default)]
    pub key_sha256: Option<String>,
    pub certificate_pem: Option<String>,
    pub onboarded_unix_ms: Option<u64>,
    pub last_heartbeat: Option<Heartbeat>,
    pub last_heartbeat_received_unix_ms: Option<u64>,
    /// The desired config; `config.version` grows with every change.
    pub config: ConfigDocument,
    /// The highest version published to the device (retained) and acknowledged by it.
    pub config_published_version: u64,
    pub config_acked_version: u64,
    pub config_ack_message: Option<String>,
    /// Certificates issued to this device by renewal (the onboarding one not counted).
    #[serde(default)]
    pub renewals: u64,
    #[serde(default)]
    pub renewed_unix_ms: Option<u64>,
    /// Keys this id was bound to before `fleet rebind` freed it (oldest first); each is on the
    /// revocation list as a `key:` entry.
    #[serde(default)]
    pub retired_key_sha256s: Vec<String>,
    #[serde(default)]
    pub rebound_unix_ms: Option<u64>,
}

impl DeviceRecord {
    fn new(device_id: &str, defaults: &BTreeMap<String, String>) -> DeviceRecord {
        DeviceRecord {
            device_id: device_id.to_owned(),
            state: DeviceState::Pending,
            token_hash: None,
            approved: false,
            pending_key_sha256: None,
            key_sha256: None,
            certificate_pem: None,
            onboarded_unix_ms: None,
            last_heartbeat: None,
            last_heartbeat_received_unix_ms: None,
            config: ConfigDocument { version: 1, values: defaults.clone() },
            config_published_version: 0,
            config_acked_version: 0,
            config_ack_message: None,
            renewals: 0,
            renewed_unix_ms: None,
            retired_key_sha256s: Vec::new(),
            rebound_unix_ms: None,
        }
    }

    /// A record that a request without a token created and no operator approved yet.
    fn is_unapproved_request(&self) -> bool {
        self.state == DeviceState::Pending && !self.approved
    }
}

/// A handle on the registry; clones share one environment.
#[derive(Clone)]
pub struct Registry {
    path: PathBuf,
    env: Env<WithoutTls>,
    tokens: Database<Str, Bytes>,
    devices: Database<Str, Bytes>,
    unapproved: Database<Str, Bytes>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Registry").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Environments opened by this process (heed refuses a second open of one path).
static OPENED: Mutex<BTreeMap<PathBuf, Registry>> = Mutex::new(BTreeMap::new());

/// SHA-256 hex of `bytes`.
pub use onboarding::messages::sha256_hex;

/// Parses `7d`, `12h`, `30m` or `45s`.
pub fn parse_duration(text: &str) -> Result<Duration, OnboardingError> {
    let invalid = || OnboardingError::Token(format!("duration {text:?}: expected a number and d, h, m or s"));
    let unit_index = text.len().checked_sub(1).ok_or_else(invalid)?;
    let (number, unit) = text.split_at(unit_index);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "d" => number.checked_mul(86_400),
        "h" => number.checked_mul(3_600),
        "m" => number.checked_mul(60),
        "s" => Some(number),
        _ => None,
    }
    .ok_or_else(invalid)?;
    Ok(Duration::from_secs(seconds))
}

impl Registry {
    /// Opens (creating if missing) the registry in `directory`.
    pub fn open(directory: &Path) -> Result<Registry, OnboardingError> {
        std::fs::create_dir_all(directory)
            .map_err(|source| OnboardingError::io("create directory", directory, source))?;
        let key =
            directory.canonicalize().map_err(|source| OnboardingError::io("resolve", directory, source))?;
        let mut opened = OPENED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(registry) = opened.get(&key) {
            return Ok(registry.clone());
        }
        let error = |operation| {
            let path = key.clone();
            move |source: heed::Error| OnboardingError::Registry { path, operation, source: source.into() }
        };
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(REGISTRY_MAP_BYTES).max_dbs(3);
        // SAFETY: opened once per path per process (the map above), default flags (every commit
        // fsynced): a signed certificate is recorded durably before it is sent.
        let env = unsafe { options.open(&key) }.map_err(error("open"))?;
        env.clear_stale_readers().map_err(error("clear stale readers"))?;
        let mut txn = env.write_txn().map_err(error("begin"))?;
        let tokens = env.create_database(&mut txn, Some("tokens")).map_err(error("create tokens"))?;
        let devices = env.create_database(&mut txn, Some("devices")).map_err(error("create devices"))?;
        let unapproved =
            env.create_database(&mut txn, Some("unapproved")).map_err(error("create unapproved"))?;
        txn.commit().map_err(error("commit"))?;
        let registry = Registry { path: key.clone(), env, tokens, devices, unapproved };
        registry.rebuild_unapproved_index()?;
        opened.insert(key, registry.clone());
        Ok(registry)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Recomputes the `unapproved` index from the device records (a registry written before the
    /// index existed, or one edited by hand, comes out consistent).
    fn rebuild_unapproved_index(&self) -> Result<(), OnboardingError> {
        let outcome: Result<(), std::convert::Infallible> = self.write(|transaction| {
            let registry = transaction.registry;
            registry.unapproved.clear(&mut transaction.txn).map_err(registry.error("clear unapproved"))?;
            let mut unapproved = Vec::new();
            for entry in registry.devices.iter(&transaction.txn).map_err(registry.error("read devices"))? {
                let (device_id, bytes) = entry.map_err(registry.error("read devices"))?;
                let record: DeviceRecord = registry.decode(&format!("device {device_id}"), bytes)?;
                if record.is_unapproved_request() {
                    unapproved.push(record.device_id);
                }
            }
            for device_id in unapproved {
                registry
                    .unapproved
                    .put(&mut transaction.txn, &device_id, &[])
                    .map_err(registry.error("write unapproved"))?;
            }
            Ok(Ok(()))
        })?;
        let Ok(()) = outcome;
        Ok(())
    }

    /// Removes the record of a pending device (approved or not), so its id and its place among
    /// the `pending_devices_max` are free again. Refuses active and revoked devices: those
    /// records are the certificate's and the revocation's history.
    pub fn forget_pending(&self, device_id: &str) -> Result<(), OnboardingError> {
        self.write(|transaction| {
            let Some(record) = transaction.device(device_id)? else {
                return Ok(Err(OnboardingError::UnknownDevice { device_id: device_id.to_owned() }));
            };
            if record.state != DeviceState::Pending {
                return Ok(Err(OnboardingError::Config(format!(
                    "device {device_id} is {}: only a pending device can be forgotten (revoke it instead)",
                    record.state.as_str()
                ))));
            }
            let registry = transaction.registry;
            registry
                .devices
                .delete(&mut transaction.txn, device_id)
                .map_err(registry.error("delete device"))?;
            registry
                .unapproved
                .delete(&mut transaction.txn, device_id)
                .map_err(registry.error("delete unapproved"))?;
            Ok(Ok(()))
        })?
    }

    fn error(&self, operation: &'static str) -> impl FnOnce(heed::Error) -> OnboardingError + '_ {
        move |source| OnboardingError::Registry { path: self.path.clone(), operation, source: source.into() }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, what: &str, bytes: &[u8]) -> Result<T, OnboardingError> {
        serde_json::from_slice(bytes).map_err(|error| OnboardingError::File {
            path: self.path.clone(),
            problem: format!("{what} is not a valid record: {error}"),
        })
    }

    /// Runs `body` in one write transaction, committed only if it returns `Ok(Ok(_))`; the
    /// inner error is a decision (for example a rejection), the outer one a failure.
    pub fn write<T, E>(
        &self,
        body: impl FnOnce(&mut Transaction<'_>) -> Result<Result<T, E>, OnboardingError>,
    ) -> Result<Result<T, E>, OnboardingError> {
        let txn = self.env.write_txn().map_err(self.error("begin write"))?;
        let mut transaction = Transaction { registry: self, txn };
        let outcome = body(&mut transaction)?;
        if outcome.is_ok() {
            transaction.txn.commit().map_err(self.error("commit"))?;
        }
        Ok(outcome)
    }

    /// Creates `count` single-use tokens valid for `validity`; returns them (shown once).
    pub fn create_tokens(
        &self,
        count: u32,
        validity: Duration,
        now_unix_ms: u64,
    ) -> Result<Vec<String>, OnboardingError> {
        if count == 0 || count > TOKENS_PER_CALL_MAX {
            return Err(OnboardingError::Token(format!("count {count}: expected 1..={TOKENS_PER_CALL_MAX}")));
        }
        if validity.is_zero() || validity > TOKEN_VALIDITY_MAX {
            return Err(OnboardingError::Token(format!(
                "validity {} s: expected 1 s ..= {} days",
                validity.as_secs(),
                TOKEN_VALIDITY_MAX.as_secs() / 86_400
            )));
        }
        let random = ring::rand::SystemRandom::new();
        let mut tokens = Vec::with_capacity(count as usize);
        let outcome: Result<(), std::convert::Infallible> = self.write(|transaction| {
            for _ in 0..count {
                let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
                ring::rand::SecureRandom::fill(&random, &mut bytes)
                    .map_err(|_| OnboardingError::Token("no system randomness".to_owned()))?;
                let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
                let record = TokenRecord {
                    created_unix_ms: now_unix_ms,
                    expires_unix_ms: now_unix_ms.saturating_add(validity.as_millis() as u64),
                    used_by: None,
                    used_by_key_sha256: None,
                    used_unix_ms: None,
                };
                transaction.put_token(&sha256_hex(token.as_bytes()), &record)?;
                tokens.push(token);
            }
            Ok(Ok(()))
        })?;
        let Ok(()) = outcome;
        Ok(tokens)
    }

    pub fn device(&self, device_id: &str) -> Result<Option<DeviceRecord>, OnboardingError> {
        let txn = self.env.read_txn().map_err(self.error("begin read"))?;
        self.device_in(&txn, device_id)
    }

    fn device_in(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        device_id: &str,
    ) -> Result<Option<DeviceRecord>, OnboardingError> {
        match self.devices.get(txn, device_id).map_err(self.error("read device"))? {
            Some(bytes) => Ok(Some(self.decode(&format!("device {device_id}"), bytes)?)),
            None => Ok(None),
        }
    }

    /// Every device, in id order.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, OnboardingError> {
        let txn = self.env.read_txn().map_err(self.error("begin read"))?;
        let mut devices = Vec::new();
        for entry in self.devices.iter(&txn).map_err(self.error("read devices"))? {
            let (device_id, bytes) = entry.map_err(self.error("read devices"))?;
            devices.push(self.decode(&format!("device {device_id}"), bytes)?);
        }
        Ok(devices)
    }

    /// Sets `key` = `value` in the desired config of an active device; returns the new version.
    /// The authority publishes it (retained) at its next poll.
    pub fn set_config(&self, device_id: &str, key: &str, value: &str) -> Result<u64, OnboardingError> {
        validate_config_entry(key, value).map_err(OnboardingError::Config)?;
        self.write(|transaction| {
            let Some(mut record) = transaction.device(device_id)? else {
                return Ok(Err(OnboardingError::UnknownDevice { device_id: device_id.to_owned() }));
            };
            if record.state != DeviceState::Active {
                return Ok(Err(OnboardingError::NotActive {
                    device_id: device_id.to_owned(),
                    state: record.state.as_str(),
                }));
            }
            record.config.values.insert(key.to_owned(), value.to_owned());
            record.config.validate().map_err(OnboardingError::Config)?;
            record.config.version += 1;
            transaction.put_device(&record)?;
            Ok(Ok(record.config.version))
        })?
    }

    /// Approves `device_id` (before or after it asked) for the key with fingerprint `key_sha256`,
    /// or, without one, for the key that asked (if none asked yet: the first key to ask). Given a
    /// fingerprint, the approval binds the id to it even if another key asked first: the
    /// operator's word outranks first come. Refuses reserved, active or revoked ids. Returns the
    /// fingerprint the approval is bound to (`None`: the first key to ask).
    pub fn approve(
        &self,
        device_id: &str,
        key_sha256: Option<&str>,
        defaults: &BTreeMap<String, String>,
    ) -> Result<Option<String>, OnboardingError> {
        fleet::validate_device_id(device_id)?;
        if RESERVED_DEVICE_IDS.contains(&device_id) {
            return Err(OnboardingError::Config(format!("{device_id} is a reserved id")));
        }
        if let Some(key) = key_sha256
            && !onboarding::topics::is_key_fingerprint(key)
        {
            return Err(OnboardingError::Config(format!(
                "key fingerprint {:?}: expected 64 lowercase hex digits (SHA-256 of the public key)",
                onboarding::messages::shorten(key)
            )));
        }
        self.write(|transaction| {
            let mut record =
                transaction.device(device_id)?.unwrap_or_else(|| DeviceRecord::new(device_id, defaults));
            if record.state != DeviceState::Pending {
                return Ok(Err(OnboardingError::Config(format!(
                    "device {device_id} is {}: only a pending or unknown device can be approved",
                    record.state.as_str()
                ))));
            }
            if let Some(key) = key_sha256 {
                record.pending_key_sha256 = Some(key.to_owned());
            }
            record.approved = true;
            transaction.put_device(&record)?;
            Ok(Ok(record.pending_key_sha256.clone()))
        })?
    }

    /// Frees the id of an active device for a new key (expired certificate, lost key, replaced
    /// hardware): the record goes back to pending, unapproved and bound to no key, so the id is
    /// claimed again through the normal path (a new token, or `fleet approve`); its config and
    /// history stay. Returns the fingerprint of the key it was bound to, which the caller
    /// revokes (`RevocationList::revoke_key`) *before* calling this. Refuses unknown, pending
    /// and revoked ids (a revoked id stays revoked).
    pub fn rebind(&self, device_id: &str, now_unix_ms: u64) -> Result<String, OnboardingError> {
        self.write(|transaction| {
            let Some(mut record) = transaction.device(device_id)? else {
                return Ok(Err(OnboardingError::UnknownDevice { device_id: device_id.to_owned() }));
            };
            let (DeviceState::Active, Some(key)) = (record.state, record.key_sha256.clone()) else {
                return Ok(Err(OnboardingError::NotActive {
                    device_id: device_id.to_owned(),
                    state: record.state.as_str(),
                }));
            };
            record.state = DeviceState::Pending;
            record.approved = false;
            record.pending_key_sha256 = None;
            record.key_sha256 = None;
            record.certificate_pem = None;
            record.token_hash = None;
            record.retired_key_sha256s.push(key.clone());
            record.rebound_unix_ms = Some(now_unix_ms);
            // The next onboarding publishes the config again to the new key's session.
            record.config_published_version = 0;
            record.config_acked_version = 0;
            transaction.put_device(&record)?;
            Ok(Ok(key))
        })?
    }

    /// The fingerprint of the key an active device is bound to (what `rebind` will retire).
    pub fn bound_key(&self, device_id: &str) -> Result<String, OnboardingError> {
        let record = self
            .device(device_id)?
            .ok_or_else(|| OnboardingError::UnknownDevice { device_id: device_id.to_owned() })?;
        match (record.state, record.key_sha256) {
            (DeviceState::Active, Some(key)) => Ok(key),
            (state, _) => {
                Err(OnboardingError::NotActive { device_id: device_id.to_owned(), state: state.as_str() })
            }
        }
    }

    /// Marks `device_id` revoked (known or not, so it can never onboard under that id again).
    /// The caller also adds it to the sink's revocation list.
    pub fn revoke(&self, device_id: &str) -> Result<(), OnboardingError> {
        fleet::validate_device_id(device_id)?;
        let outcome: Result<(), std::convert::Infallible> = self.write(|transaction| {
            let mut record = transaction
                .device(device_id)?
                .unwrap_or_else(|| DeviceRecord::new(device_id, &BTreeMap::new()));
            record.state = DeviceState::Revoked;
            transaction.put_device(&record)?;
            Ok(Ok(()))
        })?;
        let Ok(()) = outcome;
        Ok(())
    }

    /// Active devices whose desired config is newer than what was published.
    pub fn configs_to_publish(&self) -> Result<Vec<(String, ConfigDocument)>, OnboardingError> {
        Ok(self
            .devices()?
            .into_iter()
            .filter(|record| {
                record.state == DeviceState::Active && record.config.version > record.config_published_version
            })
            .map(|record| (record.device_id, record.config))
            .collect())
    }

    /// Applies `change` to the record of `device_id` if it exists; returns whether it did.
    pub fn update_device(
        &self,
        device_id: &str,
        change: impl FnOnce(&mut DeviceRecord) -> bool,
    ) -> Result<bool, OnboardingError> {
        let outcome = self.write(|transaction| {
            let Some(mut record) = transaction.device(device_id)? else { return Ok(Err(())) };
            if !change(&mut record) {
                return Ok(Err(()));
            }
            transaction.put_device(&record)?;
            Ok(Ok(()))
        })?;
        Ok(outcome.is_ok())
    }

    /// Creates a new pending device record with the given default config.
    pub fn new_record(device_id: &str, defaults: &BTreeMap<String, String>) -> DeviceRecord {
        DeviceRecord::new(device_id, defaults)
    }
}

/// One write transaction on the registry.
pub struct Transaction<'a> {
    registry: &'a Registry,
    txn: RwTxn<'a>,
}

impl Transaction<'_> {
    pub fn token(&self, token_hash: &str) -> Result<Option<TokenRecord>, OnboardingError> {
        let registry = self.registry;
        match registry.tokens.get(&self.txn, token_hash).map_err(registry.error("read token"))? {
            Some(bytes) => Ok(Some(registry.decode("token", bytes)?)),
            None => Ok(None),
        }
    }

    pub fn put_token(&mut self, token_hash: &str, record: &TokenRecord) -> Result<(), OnboardingError> {
        let bytes = serde_json::to_vec(record).expect("a token record serializes");
        self.registry
            .tokens
            .put(&mut self.txn, token_hash, &bytes)
            .map_err(self.registry.error("write token"))
    }

    pub fn device(&self, device_id: &str) -> Result<Option<DeviceRecord>, OnboardingError> {
        self.registry.device_in(&self.txn, device_id)
    }

    /// Writes `record` and keeps the `unapproved` index in step with it.
    pub fn put_device(&mut self, record: &DeviceRecord) -> Result<(), OnboardingError> {
        let registry = self.registry;
        let bytes = serde_json::to_vec(record).expect("a device record serializes");
        registry
            .devices
            .put(&mut self.txn, &record.device_id, &bytes)
            .map_err(registry.error("write device"))?;
        if record.is_unapproved_request() {
            registry
                .unapproved
                .put(&mut self.txn, &record.device_id, &[])
                .map_err(registry.error("write unapproved"))
        } else {
            registry
                .unapproved
                .delete(&mut self.txn, &record.device_id)
                .map(drop)
                .map_err(registry.error("delete unapproved"))
        }
    }

    /// Pending records no operator approved (O(1): the index's entry count).
    pub fn unapproved_count(&self) -> Result<u64, OnboardingError> {
        let registry = self.registry;
        registry.unapproved.len(&self.txn).map_err(registry.error("count unapproved"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_name_the_problem() {
        let check = |text: &str, expected: Option<u64>| {
            assert_eq!(parse_duration(text).ok().map(|duration| duration.as_secs()), expected, "{text}");
        };
        check("7d", Some(7 * 86_400));
        check("12h", Some(12 * 3_600));
        check("30m", Some(1_800));
        check("45s", Some(45));
        check("", None);
        check("d", None);
        check("7w", None);
        check("-1d", None);
        check("99999999999999999999d", None);
    }

    #[test]
    fn tokens_are_stored_hashed_and_single_records() {
        let directory = tempfile::tempdir().expect("temp dir");
        let registry = Registry::open(directory.path()).expect("open");
        let tokens = registry.create_tokens(3, Duration::from_secs(60), 1_000).expect("tokens");
        assert_eq!(tokens.len(), 3);
        let outcome: Result<(), ()> = registry
            .write(|transaction| {
                for token in &tokens {
                    assert!(transaction.token(token)?.is_none(), "the token itself is not a key");
                    let record = transaction.token(&sha256_hex(token.as_bytes()))?.expect("hashed key");
                    assert_eq!(record.expires_unix_ms, 61_000);
                }
                Ok(Err(()))
            })
            .expect("read");
        assert_eq!(outcome, Err(()));
        // A second open in the same process shares the environment.
        Registry::open(directory.path()).expect("second open");
    }

    #[test]
    fn the_unapproved_index_follows_the_records() {
        let directory = tempfile::tempdir().expect("temp dir");
        let registry = Registry::open(directory.path()).expect("open");
        let count = || {
            registry.write(|transaction| Ok(Err::<(), u64>(transaction.unapproved_count()?))).expect("count")
        };
        let put = |record: DeviceRecord| {
            registry.write(|transaction| transaction.put_device(&record).map(Ok::<(), ()>)).expect("put")
        };
        put(DeviceRecord::new("a", &BTreeMap::new())).expect("a");
        put(DeviceRecord::new("b", &BTreeMap::new())).expect("b");
        assert_eq!(count(), Err(2));
        registry.approve("a", None, &BTreeMap::new()).expect("approve");
        assert_eq!(count(), Err(1), "an approved record is the operator's, not a claim holder's");
        registry.forget_pending("b").expect("forget");
        assert_eq!(count(), Err(0));
        assert!(registry.device("b").expect("read").is_none());
        registry.revoke("c").expect("revoke");
        assert_eq!(count(), Err(0));
        assert!(registry.forget_pending("c").is_err(), "a revoked record stays");
        put(DeviceRecord::new("d", &BTreeMap::new())).expect("d");
        // Dropped from the index by hand: the next open rebuilds it from the records.
        let outcome: Result<(), ()> = registry
            .write(|transaction| {
                let registry = transaction.registry;
                registry.unapproved.clear(&mut transaction.txn).map_err(registry.error("clear"))?;
                Ok(Ok(()))
            })
            .expect("clear");
        outcome.expect("cleared");
        assert_eq!(count(), Err(0));
        registry.rebuild_unapproved_index().expect("rebuild");
        assert_eq!(count(), Err(1));
    }
}
