//! The `[cluster]` section of the sink's config. Absent: the sink runs standalone (no etcd).
//!
//! ```toml
//! [cluster]
//! node = "sink-a"                       # unique per node; the member and commit keys use it
//! advertise = "10.0.0.5:4433"           # the address devices dial for this node
//! endpoints = ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]
//! lease_ttl_seconds = 10                # etcd leases count whole seconds
//! request_timeout_ms = 2000
//! commit_batch_devices_max = 63         # devices per etcd txn (2 compares each; --max-txn-ops is 128)
//! key_prefix = "/tributary"
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::etcd::TXN_OPS_MAX;

/// Devices per commit txn: each needs two compares (owner key create revision == token, owner
/// key lease == the node's lease) and one put; the node's commit key one compare and one put; the
/// failure branch reads each owner key and the commit key. etcd limits compares to 128 too.
pub const COMMIT_BATCH_DEVICES_MAX: usize = (TXN_OPS_MAX - 1) / 2;
const _: () = assert!(2 * COMMIT_BATCH_DEVICES_MAX + 1 <= TXN_OPS_MAX);

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub node: String,
    pub advertise: String,
    pub endpoints: Vec<String>,
    #[serde(default = "default_lease_ttl_seconds")]
    pub lease_ttl_seconds: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_commit_batch_devices_max")]
    pub commit_batch_devices_max: usize,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_lease_ttl_seconds() -> u64 {
    // Failover time is at most one TTL plus a reconnect; 10 s rides out a GC pause or a slow
    // disk on an etcd member without flapping ownership.
    10
}
fn default_request_timeout_ms() -> u64 {
    2000
}
fn default_commit_batch_devices_max() -> usize {
    COMMIT_BATCH_DEVICES_MAX
}
fn default_key_prefix() -> String {
    "/tributary".to_string()
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: [cluster] {key}: {expectation}")]
pub struct ConfigError {
    pub file: String,
    pub key: &'static str,
    pub expectation: String,
}

impl ClusterConfig {
    /// Reads the `[cluster]` section of a whole config document; `Ok(None)` when there is none.
    pub fn from_document(file: &Path, text: &str) -> Result<Option<ClusterConfig>, ConfigError> {
        let error =
            |key, expectation: String| ConfigError { file: file.display().to_string(), key, expectation };
        let document: toml::Table =
            text.parse().map_err(|parse: toml::de::Error| error("(document)", parse.to_string()))?;
        let Some(section) = document.get("cluster") else { return Ok(None) };
        let config: ClusterConfig = section
            .clone()
            .try_into()
            .map_err(|parse: toml::de::Error| error("(section)", parse.to_string()))?;
        config.validate(file)?;
        Ok(Some(config))
    }

    /// Checks every value; errors name the file, the key and what was expected.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let error = |key, expectation: &str| {
            Err(ConfigError { file: file.display().to_string(), key, expectation: expectation.to_string() })
        };
        if !valid_name(&self.node) {
            return error("node", "a non-empty name of at most 255 bytes without '/' or control characters");
        }
        if self.advertise.is_empty() {
            return error("advertise", "the host:port devices dial for this node");
        }
        if self.endpoints.is_empty() {
            return error("endpoints", "at least one etcd client endpoint as \"host:port\"");
        }
        if self.endpoints.iter().any(|endpoint| endpoint.starts_with("https://")) {
            return error("endpoints", "plain http endpoints (TLS to etcd is not built yet)");
        }
        if self.endpoints.iter().any(|endpoint| !endpoint.trim_start_matches("http://").contains(':')) {
            return error("endpoints", "\"host:port\" entries (optionally prefixed with http://)");
        }
        if !(2..=3600).contains(&self.lease_ttl_seconds) {
            return error("lease_ttl_seconds", "2..=3600 (etcd's minimum lease TTL is about 2 s)");
        }
        if !(100..=60_000).contains(&self.request_timeout_ms) {
            return error("request_timeout_ms", "100..=60000");
        }
        if self.request_timeout_ms >= self.lease_ttl_seconds * 1000 / 2 {
            return error(
                "request_timeout_ms",
                "below half of lease_ttl_seconds, so a keepalive can fail once and still renew in time",
            );
        }
        if !(1..=COMMIT_BATCH_DEVICES_MAX).contains(&self.commit_batch_devices_max) {
            return error(
                "commit_batch_devices_max",
                "1..=63 (two compares per device; etcd's --max-txn-ops default is 128)",
            );
        }
        if !self.key_prefix.starts_with('/') || self.key_prefix.ends_with('/') {
            return error("key_prefix", "a path starting with '/' and not ending with '/'");
        }
        Ok(())
    }

    /// Endpoints as `host:port` (an `http://` prefix removed).
    pub fn endpoint_addresses(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|endpoint| endpoint.trim_start_matches("http://").trim_end_matches('/').to_string())
            .collect()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Node and device names become etcd key segments.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.chars().any(|character| character == '/' || character.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<Option<&str>, &str>) {
        let result = ClusterConfig::from_document(Path::new("/etc/tributary/sink.toml"), text);
        match (result, expected) {
            (Ok(config), Ok(node)) => assert_eq!(config.map(|config| config.node).as_deref(), node),
            (Err(error), Err(expected)) => assert_eq!(error.to_string(), expected),
            (result, expected) => panic!("{result:?} != {expected:?}"),
        }
    }

    const BASE: &str =
        "[cluster]\nnode = \"sink-a\"\nadvertise = \"127.0.0.1:4433\"\nendpoints = [\"127.0.0.1:2379\"]\n";

    #[test]
    fn sections() {
        check("[sink]\nlisten = \"x\"\n", Ok(None));
        check(BASE, Ok(Some("sink-a")));
        check(
            &format!("{BASE}lease_ttl_seconds = 1\n"),
            Err(
                "/etc/tributary/sink.toml: [cluster] lease_ttl_seconds: 2..=3600 (etcd's minimum lease TTL is about 2 s)",
            ),
        );
        check(
            &format!("{BASE}commit_batch_devices_max = 64\n"),
            Err(
                "/etc/tributary/sink.toml: [cluster] commit_batch_devices_max: 1..=63 (two compares per device; etcd's --max-txn-ops default is 128)",
            ),
        );
        check(
            &format!("{BASE}lease_ttl_seconds = 2\nrequest_timeout_ms = 1000\n"),
            Err(
                "/etc/tributary/sink.toml: [cluster] request_timeout_ms: below half of lease_ttl_seconds, so a keepalive can fail once and still renew in time",
            ),
        );
        check(
            &BASE.replace("sink-a", "sink/a"),
            Err(
                "/etc/tributary/sink.toml: [cluster] node: a non-empty name of at most 255 bytes without '/' or control characters",
            ),
        );
        check(
            &BASE.replace("[\"127.0.0.1:2379\"]", "[\"https://e:2379\"]"),
            Err(
                "/etc/tributary/sink.toml: [cluster] endpoints: plain http endpoints (TLS to etcd is not built yet)",
            ),
        );
        let unknown =
            ClusterConfig::from_document(Path::new("f.toml"), &format!("{BASE}lease_ttl = 3\n")).unwrap_err();
        assert_eq!(unknown.key, "(section)");
        assert!(unknown.to_string().contains("lease_ttl"), "{unknown}");
    }
}
