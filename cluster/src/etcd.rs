//! etcd v3 through its JSON gateway (etcd 3.4: `POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/lease/revoke`). Keys and values travel as
//! base64, int64 fields come back as JSON strings (absent when zero), and a txn whose compares
//! failed has no `succeeded` field.
//!
//! Retry rule: a request that could not connect is tried on the next endpoint; a txn that may
//! have reached a server (an exchange error or a server-side timeout) is never resent, it is
//! reported as `EtcdError::OutcomeUnknown` so the caller resolves it (see
//! `EtcdRegistry::resolve`). Reads and lease calls are idempotent and tried on every endpoint.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use crate::http;

/// etcd's default `--max-txn-ops`: compares, success ops and failure ops each at most this.
pub const TXN_OPS_MAX: usize = 128;
/// The most keys one range asks for (`limit`); more is an error, not a silent truncation.
pub const RANGE_KEYS_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint answered ({attempts})")]
    Unavailable { attempts: String },
    #[error("etcd at {endpoint} refused {path}: {message} (grpc code {code})")]
    Server { endpoint: String, path: String, code: i64, message: String },
    #[error("etcd at {endpoint} answered {path} with something unexpected: {reason}")]
    Malformed { endpoint: String, path: String, reason: String },
    #[error("the outcome of a txn sent to {endpoint} is unknown: {reason}")]
    OutcomeUnknown { endpoint: String, reason: String },
    #[error("range over {key:?} has more than {RANGE_KEYS_MAX} keys")]
    TooManyKeys { key: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

#[derive(Clone, Debug)]
pub enum Compare {
    /// The key's create revision (0 when the key does not exist).
    CreateRevision { key: Vec<u8>, revision: i64 },
    /// The key's last modification revision (0 when the key does not exist).
    ModRevision { key: Vec<u8>, revision: i64 },
    /// The lease the key is attached to (0 when none or the key does not exist).
    Lease { key: Vec<u8>, lease: i64 },
}

#[derive(Clone, Debug)]
pub enum Op {
    Put { key: Vec<u8>, value: Vec<u8>, lease: i64 },
    Get { key: Vec<u8> },
    Delete { key: Vec<u8> },
}

#[derive(Clone, Debug)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store revision after the txn (a successful txn with puts created this revision).
    pub revision: i64,
    /// One entry per `Op::Get` of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

#[derive(Clone, Debug)]
pub struct EtcdClient {
    endpoints: Vec<String>,
    preferred: usize,
    timeout: Duration,
}

impl EtcdClient {
    /// `endpoints` are `host:port` of the members' client URLs (plain HTTP).
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> EtcdClient {
        assert!(!endpoints.is_empty(), "an etcd client needs at least one endpoint");
        EtcdClient { endpoints, preferred: 0, timeout }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Reads one key.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let (kvs, _) = self.range(key, false)?;
        Ok(kvs.into_iter().next())
    }

    /// Reads one key or every key under a prefix; returns the key-values and the store revision.
    pub fn range(&mut self, key: &[u8], prefix: bool) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let mut request = json!({ "key": BASE64.encode(key), "limit": (RANGE_KEYS_MAX + 1).to_string() });
        if prefix {
            request["range_end"] = Value::String(BASE64.encode(prefix_end(key)));
        }
        let (endpoint, answer) = self.call("/v3/kv/range", &request, Idempotent::Yes)?;
        let malformed = |reason: String| malformed(&endpoint, "/v3/kv/range", reason);
        let kvs = parse_kvs(answer.get("kvs")).map_err(malformed)?;
        if kvs.len() > RANGE_KEYS_MAX {
            return Err(EtcdError::TooManyKeys { key: String::from_utf8_lossy(key).into_owned() });
        }
        let revision = int(answer.pointer("/header/revision")).map_err(malformed)?;
        Ok((kvs, revision))
    }

    /// One transaction: if every compare holds, `success` runs, else `failure`.
    pub fn txn(
        &mut self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult, EtcdError> {
        assert!(
            compares.len() <= TXN_OPS_MAX && success.len() <= TXN_OPS_MAX && failure.len() <= TXN_OPS_MAX,
            "a txn has at most {TXN_OPS_MAX} compares and ops per branch"
        );
        let compare_json: Vec<Value> = compares
            .iter()
            .map(|compare| match compare {
                Compare::CreateRevision { key, revision } => json!({
                    "key": BASE64.encode(key), "target": "CREATE", "result": "EQUAL",
                    "create_revision": revision.to_string() }),
                Compare::ModRevision { key, revision } => json!({
                    "key": BASE64.encode(key), "target": "MOD", "result": "EQUAL",
                    "mod_revision": revision.to_string() }),
                Compare::Lease { key, lease } => json!({
                    "key": BASE64.encode(key), "target": "LEASE", "result": "EQUAL",
                    "lease": lease.to_string() }),
            })
            .collect();
        let request =
            json!({ "compare": compare_json, "success": ops_json(success), "failure": ops_json(failure) });
        let (endpoint, answer) = self.call("/v3/kv/txn", &request, Idempotent::No)?;
        let malformed = |reason: String| malformed(&endpoint, "/v3/kv/txn", reason);
        let succeeded = answer.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let revision = int(answer.pointer("/header/revision")).map_err(malformed)?;
        let branch = if succeeded { success } else { failure };
        let responses =
            answer.get("responses").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        if responses.len() != branch.len() {
            return Err(malformed(format!("{} responses for {} ops", responses.len(), branch.len())));
        }
        let mut gets = Vec::new();
        for (op, response) in branch.iter().zip(responses) {
            if let Op::Get { .. } = op {
                let range = response
                    .get("response_range")
                    .ok_or_else(|| malformed("a get without response_range".into()))?;
                gets.push(parse_kvs(range.get("kvs")).map_err(malformed)?.into_iter().next());
            }
        }
        Ok(TxnResult { succeeded, revision, gets })
    }

    /// Grants a lease of `ttl_seconds`; returns its id.
    pub fn lease_grant(&mut self, ttl_seconds: u64) -> Result<i64, EtcdError> {
        let (endpoint, answer) =
            self.call("/v3/lease/grant", &json!({ "TTL": ttl_seconds.to_string() }), Idempotent::Yes)?;
        let id = int(answer.get("ID")).map_err(|reason| malformed(&endpoint, "/v3/lease/grant", reason))?;
        if id == 0 {
            return Err(malformed(&endpoint, "/v3/lease/grant", "lease id 0".into()));
        }
        Ok(id)
    }

    /// Renews a lease; returns its remaining TTL in seconds, 0 when the lease is gone.
    pub fn lease_keepalive(&mut self, id: i64) -> Result<i64, EtcdError> {
        let (endpoint, answer) =
            self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }), Idempotent::Yes)?;
        int(answer.pointer("/result/TTL"))
            .map_err(|reason| malformed(&endpoint, "/v3/lease/keepalive", reason))
    }

    /// Revokes a lease: every key attached to it is deleted at once.
    pub fn lease_revoke(&mut self, id: i64) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }), Idempotent::Yes) {
            Ok(_) => Ok(()),
            // Already expired: the keys are gone either way.
            Err(EtcdError::Server { code: 5, .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn call(
        &mut self,
        path: &str,
        request: &Value,
        idempotent: Idempotent,
    ) -> Result<(String, Value), EtcdError> {
        let body = serde_json::to_vec(request).expect("a JSON value serializes");
        let mut attempts = Vec::new();
        for attempt in 0..self.endpoints.len() {
            let index = (self.preferred + attempt) % self.endpoints.len();
            let endpoint = self.endpoints[index].clone();
            match http::post_json(&endpoint, path, &body, self.timeout) {
                Ok(response) => {
                    // The first JSON value: lease/keepalive is a stream of them.
                    let answer: Value = match serde_json::Deserializer::from_slice(&response.body)
                        .into_iter::<Value>()
                        .next()
                    {
                        Some(Ok(answer)) => answer,
                        _ => {
                            return Err(malformed(
                                &endpoint,
                                path,
                                format!("HTTP {} with a body that is not JSON", response.status),
                            ));
                        }
                    };
                    let error = answer.get("error").or_else(|| answer.pointer("/result/error"));
                    if response.status != 200 || error.is_some() {
                        let code = answer.get("code").and_then(Value::as_i64).unwrap_or(-1);
                        let message = answer
                            .get("message")
                            .or(error)
                            .and_then(Value::as_str)
                            .unwrap_or("no message")
                            .to_string();
                        // Unavailable (14) and DeadlineExceeded (4) from a member without a leader
                        // or quorum: another member may do better for a read; a txn's outcome is
                        // unknown (the proposal may still commit).
                        let retryable = code == 14 || code == 4;
                        if retryable && idempotent == Idempotent::No {
                            return Err(EtcdError::OutcomeUnknown { endpoint, reason: message });
                        }
                        if retryable {
                            attempts.push(format!("{endpoint}: {message}"));
                            continue;
                        }
                        return Err(EtcdError::Server { endpoint, path: path.to_string(), code, message });
                    }
                    self.preferred = index;
                    return Ok((endpoint, answer));
                }
                Err(error) if error.request_may_have_been_sent() && idempotent == Idempotent::No => {
                    return Err(EtcdError::OutcomeUnknown { endpoint, reason: error.to_string() });
                }
                Err(error) => attempts.push(error.to_string()),
            }
        }
        Err(EtcdError::Unavailable { attempts: attempts.join("; ") })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Idempotent {
    Yes,
    No,
}

fn malformed(endpoint: &str, path: &str, reason: String) -> EtcdError {
    EtcdError::Malformed { endpoint: endpoint.to_string(), path: path.to_string(), reason }
}

/// The range end that covers every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn ops_json(ops: &[Op]) -> Vec<Value> {
    ops.iter()
        .map(|op| match op {
            Op::Put { key, value, lease } => json!({ "request_put": {
                "key": BASE64.encode(key), "value": BASE64.encode(value), "lease": lease.to_string() } }),
            Op::Get { key } => json!({ "request_range": { "key": BASE64.encode(key) } }),
            Op::Delete { key } => json!({ "request_delete_range": { "key": BASE64.encode(key) } }),
        })
        .collect()
}

/// An int64 field: a JSON string or number, absent meaning 0 (proto3 JSON).
fn int(value: Option<&Value>) -> Result<i64, String> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(text)) => text.parse().map_err(|_| format!("not an integer: {text:?}")),
        Some(Value::Number(number)) => number.as_i64().ok_or_else(|| format!("not an int64: {number}")),
        Some(other) => Err(format!("not an integer: {other}")),
    }
}

fn bytes(value: Option<&Value>) -> Result<Vec<u8>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => BASE64.decode(text).map_err(|error| format!("bad base64: {error}")),
        Some(other) => Err(format!("not base64 text: {other}")),
    }
}

fn parse_kvs(value: Option<&Value>) -> Result<Vec<KeyValue>, String> {
    let Some(value) = value else { return Ok(Vec::new()) };
    let list = value.as_array().ok_or("kvs is not a list")?;
    list.iter()
        .map(|kv| {
            Ok(KeyValue {
                key: bytes(kv.get("key"))?,
                value: bytes(kv.get("value"))?,
                create_revision: int(kv.get("create_revision"))?,
                mod_revision: int(kv.get("mod_revision"))?,
                lease: int(kv.get("lease"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn hostile_fields() {
        assert_eq!(int(Some(&json!("12"))), Ok(12));
        assert_eq!(int(None), Ok(0));
        assert!(int(Some(&json!("x"))).is_err());
        assert!(int(Some(&json!([1]))).is_err());
        assert!(bytes(Some(&json!("!!"))).is_err());
        assert!(parse_kvs(Some(&json!({"a": 1}))).is_err());
        let kvs =
            parse_kvs(Some(&json!([{"key": "Zm9v", "create_revision": "2", "mod_revision": "3"}]))).unwrap();
        assert_eq!(
            kvs,
            vec![KeyValue {
                key: b"foo".to_vec(),
                value: Vec::new(),
                create_revision: 2,
                mod_revision: 3,
                lease: 0
            }]
        );
    }
}
