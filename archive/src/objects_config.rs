//! Which store holds an archive's objects: the `[archive.objects]` config and the record of it
//! kept in the archive root.
//!
//! `<root>/objects.toml` (at most [`OBJECTS_RECORD_BYTES_MAX`] bytes, format version
//! [`OBJECTS_RECORD_VERSION`]) is written when the archive is created, before its first entry,
//! and never changed by the archive afterwards:
//! ```toml
//! version = 1
//! kind = "s3"                         # or "local": <root>/objects/sha256/…
//! bucket = "tributary-archive"
//! endpoint = "http://127.0.0.1:9000"  # absent: AWS S3 itself
//! region = "us-east-1"
//! allow_http = true
//! prefix = "core-archive"             # keys are <prefix>/sha256/ab/cd/<64 hex>
//! ```
//! It names the store, never credentials: those come from `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY` and (optionally) `AWS_SESSION_TOKEN` of the process that connects.
//! Opening the archive with a config naming another store is refused, so a log never names
//! objects that live somewhere else; the audit commands (`core-sink audit verify --archive DIR`)
//! read it to find the objects. An archive created before this file existed has none and keeps
//! its objects locally; opening it writes `kind = "local"`.
//!
//! Timeouts, retries and upload batching are not part of the record: they may change between
//! runs, and the audit commands use the defaults.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::objects::OBJECT_BYTES_MAX;

/// The record's file name under the archive root.
pub const OBJECTS_RECORD_FILE: &str = "objects.toml";
pub const OBJECTS_RECORD_VERSION: u32 = 1;
/// Largest `objects.toml`: a handful of short fields.
pub const OBJECTS_RECORD_BYTES_MAX: u64 = 4096;
/// Longest key prefix in the bucket.
pub const PREFIX_BYTES_MAX: usize = 256;
/// object_store's documentation: keep retries below 5 minutes so signed requests stay valid.
pub const RETRY_TIMEOUT_MS_MAX: u64 = 5 * 60 * 1000;
pub const RETRIES_MAX: u32 = 20;
pub const UPLOADS_IN_FLIGHT_MAX: u32 = 64;
/// Largest batch of objects held in memory until the next flush uploads them.
pub const UPLOAD_BATCH_BYTES_MAX: u64 = 1024 * 1024 * 1024;

const _: () = assert!(OBJECT_BYTES_MAX <= UPLOAD_BATCH_BYTES_MAX);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectsKind {
    /// `<root>/objects/sha256/…` on the archive's own file system.
    #[default]
    Local,
    /// An S3-compatible object store (AWS S3, MinIO, Ceph RGW, …) through the `object_store` crate.
    S3,
}

/// `[archive.objects]` in sink.toml. Everything but `kind` is for `s3` only. A field left out
/// takes its value from `ObjectsConfig::local()` (the defaults are in `ObjectsConfig::from_record`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectsConfig {
    pub kind: ObjectsKind,
    pub bucket: Option<String>,
    /// `http(s)://host[:port]` of an S3-compatible server; absent = AWS S3.
    pub endpoint: Option<String>,
    /// Absent = `us-east-1`.
    pub region: Option<String>,
    /// Plain HTTP to the endpoint (a store on loopback or a private network only).
    pub allow_http: bool,
    /// Keys are `<prefix>/sha256/ab/cd/<64 hex>`; empty = at the bucket's top.
    pub prefix: String,
    /// Limit on establishing a connection (object_store's default: none named, reqwest's).
    pub connect_timeout_ms: u64,
    /// Limit on one request, body included (object_store's default is 30 s; set explicitly).
    pub request_timeout_ms: u64,
    /// Retries of a failed request (5xx, timeouts, connection errors), with exponential backoff.
    pub retries_max: u32,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Uploads run concurrently at a flush, at most this many at once.
    pub uploads_in_flight_max: u32,
    /// Objects waiting for the next flush are uploaded early once they hold this many bytes.
    pub upload_batch_bytes_max: u64,
}

pub const DEFAULT_REGION: &str = "us-east-1";

impl Default for ObjectsConfig {
    fn default() -> ObjectsConfig {
        ObjectsConfig::local()
    }
}

impl ObjectsConfig {
    /// Objects under the archive root (the default), with the default limits.
    pub fn local() -> ObjectsConfig {
        ObjectsConfig::from_record(&ObjectsRecord::local())
    }

    /// An S3-compatible store with the default limits.
    pub fn s3(bucket: &str, endpoint: Option<&str>, prefix: &str) -> ObjectsConfig {
        ObjectsConfig {
            kind: ObjectsKind::S3,
            bucket: Some(bucket.to_string()),
            endpoint: endpoint.map(str::to_string),
            allow_http: endpoint.is_some_and(|endpoint| endpoint.starts_with("http://")),
            prefix: prefix.to_string(),
            ..ObjectsConfig::local()
        }
    }

    /// The store a record names, with the default limits (what the audit commands connect with).
    /// Every default of `[archive.objects]` is here.
    pub fn from_record(record: &ObjectsRecord) -> ObjectsConfig {
        ObjectsConfig {
            kind: record.kind,
            bucket: record.bucket.clone(),
            endpoint: record.endpoint.clone(),
            region: record.region.clone(),
            allow_http: record.allow_http,
            prefix: record.prefix.clone(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 30_000,
            retries_max: 5,
            retry_timeout_ms: 60_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            uploads_in_flight_max: 8,
            upload_batch_bytes_max: 64 * 1024 * 1024,
        }
    }

    /// What `objects.toml` records for this config.
    pub fn record(&self) -> ObjectsRecord {
        match self.kind {
            ObjectsKind::Local => ObjectsRecord::local(),
            ObjectsKind::S3 => ObjectsRecord {
                version: OBJECTS_RECORD_VERSION,
                kind: ObjectsKind::S3,
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
                region: Some(self.region.clone().unwrap_or_else(|| DEFAULT_REGION.to_string())),
                allow_http: self.allow_http,
                prefix: self.prefix.clone(),
            },
        }
    }

    /// Errors start with the key, relative to `[archive]`: `objects.bucket: …`.
    pub fn validate(&self) -> Result<(), String> {
        if self.kind == ObjectsKind::Local {
            for (key, set) in [
                ("bucket", self.bucket.is_some()),
                ("endpoint", self.endpoint.is_some()),
                ("region", self.region.is_some()),
                ("allow_http", self.allow_http),
                ("prefix", !self.prefix.is_empty()),
            ] {
                if set {
                    return Err(format!("objects.{key}: only for kind = \"s3\" (kind is \"local\")"));
                }
            }
            return Ok(());
        }
        let bucket = self.bucket.as_deref().ok_or("objects.bucket: required when kind = \"s3\"")?;
        validate_bucket(bucket).map_err(|reason| format!("objects.bucket = {bucket:?}: {reason}"))?;
        if let Some(endpoint) = &self.endpoint {
            validate_endpoint(endpoint, self.allow_http)
                .map_err(|reason| format!("objects.endpoint = {endpoint:?}: {reason}"))?;
        }
        if let Some(region) = &self.region {
            let valid = (1..=64).contains(&region.len())
                && region
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
            if !valid {
                return Err(format!("objects.region = {region:?}: expected 1..=64 of [a-z0-9-]"));
            }
        }
        validate_prefix(&self.prefix)
            .map_err(|reason| format!("objects.prefix = {:?}: {reason}", self.prefix))?;
        let ranges: [(&str, u64, std::ops::RangeInclusive<u64>); 8] = [
            ("connect_timeout_ms", self.connect_timeout_ms, 100..=600_000),
            ("request_timeout_ms", self.request_timeout_ms, 100..=3_600_000),
            ("retries_max", u64::from(self.retries_max), 0..=u64::from(RETRIES_MAX)),
            ("retry_timeout_ms", self.retry_timeout_ms, 0..=RETRY_TIMEOUT_MS_MAX),
            ("backoff_initial_ms", self.backoff_initial_ms, 1..=60_000),
            ("backoff_max_ms", self.backoff_max_ms, self.backoff_initial_ms.max(1)..=300_000),
            (
                "uploads_in_flight_max",
                u64::from(self.uploads_in_flight_max),
                1..=u64::from(UPLOADS_IN_FLIGHT_MAX),
            ),
            (
                "upload_batch_bytes_max",
                self.upload_batch_bytes_max,
                OBJECT_BYTES_MAX..=UPLOAD_BATCH_BYTES_MAX,
            ),
        ];
        for (key, value, range) in ranges {
            if !range.contains(&value) {
                return Err(format!("objects.{key} = {value}: expected {}..={}", range.start(), range.end()));
            }
        }
        Ok(())
    }
}

/// S3's bucket naming rules, the part that matters for building URLs.
fn validate_bucket(bucket: &str) -> Result<(), &'static str> {
    let allowed =
        |byte: u8| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.';
    if !(3..=63).contains(&bucket.len()) || !bucket.bytes().all(allowed) {
        return Err("expected 3..=63 of [a-z0-9.-]");
    }
    if !bucket.as_bytes()[0].is_ascii_alphanumeric()
        || !bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric()
    {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

fn validate_endpoint(endpoint: &str, allow_http: bool) -> Result<(), &'static str> {
    let rest = if let Some(rest) = endpoint.strip_prefix("https://") {
        rest
    } else if let Some(rest) = endpoint.strip_prefix("http://") {
        if !allow_http {
            return Err("plain http needs allow_http = true");
        }
        rest
    } else {
        return Err("expected http(s)://host[:port]");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || endpoint.len() > 512 {
        return Err("expected http(s)://host[:port] of at most 512 bytes");
    }
    if authority.contains('@') {
        return Err("credentials never go in the config: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
    }
    if endpoint.contains(['?', '#', ' ']) {
        return Err("no query, fragment or spaces");
    }
    Ok(())
}

fn validate_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Ok(());
    }
    let allowed = |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'/');
    if prefix.len() > PREFIX_BYTES_MAX || !prefix.bytes().all(allowed) {
        return Err("expected at most 256 of [A-Za-z0-9._/-]");
    }
    if prefix.split('/').any(|segment| segment.is_empty() || segment == "." || segment == "..") {
        return Err("no leading, trailing or doubled '/', no '.' or '..' segments");
    }
    Ok(())
}

/// The content of `objects.toml`: which store holds the objects. No limits, no credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectsRecord {
    pub version: u32,
    pub kind: ObjectsKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

impl ObjectsRecord {
    pub fn local() -> ObjectsRecord {
        ObjectsRecord {
            version: OBJECTS_RECORD_VERSION,
            kind: ObjectsKind::Local,
            bucket: None,
            endpoint: None,
            region: None,
            allow_http: false,
            prefix: String::new(),
        }
    }

    /// The key of an object under the prefix: `<prefix>/sha256/ab/cd/<64 hex>`.
    pub fn key(&self, hex: &str) -> String {
        object_key(&self.prefix, hex)
    }

    /// Where an object is, for people: a path, or `s3://bucket/key`.
    pub fn location(&self, root: &Path, hex: &str) -> String {
        match self.kind {
            ObjectsKind::Local => root
                .join("objects")
                .join("sha256")
                .join(&hex[..2])
                .join(&hex[2..4])
                .join(hex)
                .display()
                .to_string(),
            ObjectsKind::S3 => {
                format!("s3://{}/{}", self.bucket.as_deref().unwrap_or_default(), self.key(hex))
            }
        }
    }

    /// One line naming the store, for errors and logs.
    pub fn describe(&self) -> String {
        match self.kind {
            ObjectsKind::Local => "local objects/ under the archive root".to_string(),
            ObjectsKind::S3 => format!(
                "s3://{}/{} at {} (region {}{})",
                self.bucket.as_deref().unwrap_or_default(),
                self.prefix,
                self.endpoint.as_deref().unwrap_or("AWS S3"),
                self.region.as_deref().unwrap_or(DEFAULT_REGION),
                if self.allow_http { ", plain http allowed" } else { "" }
            ),
        }
    }

    /// Reads `<root>/objects.toml`; `None` when the archive has none (created before it existed).
    pub fn read(root: &Path) -> Result<Option<ObjectsRecord>, String> {
        let path = objects_record_path(root);
        let length = match fs::metadata(&path) {
            Ok(metadata) => metadata.len(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("{}: {error}", path.display())),
        };
        if length > OBJECTS_RECORD_BYTES_MAX {
            return Err(format!("{}: {length} bytes exceed {OBJECTS_RECORD_BYTES_MAX}", path.display()));
        }
        let text = fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))?;
        let record: ObjectsRecord =
            toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?;
        if record.version != OBJECTS_RECORD_VERSION {
            return Err(format!(
                "{}: format version {} is not supported (this build reads {OBJECTS_RECORD_VERSION})",
                path.display(),
                record.version
            ));
        }
        ObjectsConfig::from_record(&record)
            .validate()
            .map_err(|reason| format!("{}: {reason}", path.display()))?;
        Ok(Some(record))
    }

    /// What the audit uses: the record, or `local` for an archive without one.
    pub fn read_or_local(root: &Path) -> Result<ObjectsRecord, String> {
        Ok(ObjectsRecord::read(root)?.unwrap_or_else(ObjectsRecord::local))
    }

    /// Writes `<root>/objects.toml` durably (`durable`).
    pub fn write(&self, root: &Path) -> Result<(), String> {
        let path = objects_record_path(root);
        let text = format!(
            "# The store holding this archive's objects; written when the archive was created.\n\
             # Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never from here.\n{}",
            toml::to_string(self).expect("plain struct")
        );
        durable::write(&path, text.as_bytes()).map_err(|error| error.to_string())
    }
}

pub fn objects_record_path(root: &Path) -> PathBuf {
    root.join(OBJECTS_RECORD_FILE)
}

/// `<prefix>/sha256/ab/cd/<64 hex>`, or without the prefix when it is empty.
pub fn object_key(prefix: &str, hex: &str) -> String {
    assert_eq!(hex.len(), 64, "a sha256 in hex");
    let key = format!("sha256/{}/{}/{hex}", &hex[..2], &hex[2..4]);
    if prefix.is_empty() { key } else { format!("{prefix}/{key}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_key() {
        let check = |config: ObjectsConfig, expected: Result<(), &str>| {
            let result = config.validate();
            match expected {
                Ok(()) => assert_eq!(result, Ok(()), "{config:?}"),
                Err(start) => {
                    let message = result.expect_err("invalid");
                    assert!(message.starts_with(start), "{message:?} should start with {start:?}");
                }
            }
        };
        check(ObjectsConfig::local(), Ok(()));
        check(ObjectsConfig::s3("tributary-archive", None, ""), Ok(()));
        check(ObjectsConfig::s3("bucket", Some("http://127.0.0.1:9000"), "a/b-c"), Ok(()));
        check(
            ObjectsConfig { bucket: None, ..ObjectsConfig::s3("x", None, "") },
            Err("objects.bucket: required"),
        );
        check(ObjectsConfig::s3("Bad_Bucket", None, ""), Err("objects.bucket = \"Bad_Bucket\""));
        check(
            ObjectsConfig {
                allow_http: false,
                ..ObjectsConfig::s3("bucket", Some("http://127.0.0.1:9000"), "")
            },
            Err("objects.endpoint = \"http://127.0.0.1:9000\": plain http needs allow_http"),
        );
        check(ObjectsConfig::s3("bucket", Some("https://key:secret@host"), ""), Err("objects.endpoint"));
        check(ObjectsConfig::s3("bucket", Some("ftp://host"), ""), Err("objects.endpoint"));
        check(ObjectsConfig::s3("bucket", None, "/leading"), Err("objects.prefix"));
        check(ObjectsConfig::s3("bucket", None, "a/../b"), Err("objects.prefix"));
        check(
            ObjectsConfig { region: Some("EU West".into()), ..ObjectsConfig::s3("bucket", None, "") },
            Err("objects.region"),
        );
        check(
            ObjectsConfig { retries_max: 99, ..ObjectsConfig::s3("bucket", None, "") },
            Err("objects.retries_max = 99"),
        );
        check(
            ObjectsConfig { upload_batch_bytes_max: 1, ..ObjectsConfig::s3("bucket", None, "") },
            Err("objects.upload_batch_bytes_max = 1"),
        );
        check(
            ObjectsConfig { bucket: Some("b".into()), ..ObjectsConfig::local() },
            Err("objects.bucket: only for kind"),
        );
    }

    #[test]
    fn record_round_trips_and_names_keys() {
        let directory = tempfile::tempdir().unwrap();
        assert_eq!(ObjectsRecord::read(directory.path()).unwrap(), None);
        let record = ObjectsConfig::s3("bucket", Some("http://127.0.0.1:9000"), "core").record();
        record.write(directory.path()).unwrap();
        assert_eq!(ObjectsRecord::read(directory.path()).unwrap(), Some(record.clone()));
        let hex = "ab".repeat(32);
        assert_eq!(record.key(&hex), format!("core/sha256/ab/ab/{hex}"));
        assert_eq!(record.location(directory.path(), &hex), format!("s3://bucket/core/sha256/ab/ab/{hex}"));
        assert_eq!(object_key("", &hex), format!("sha256/ab/ab/{hex}"));
        fs::write(objects_record_path(directory.path()), "version = 2\nkind = \"local\"\n").unwrap();
        assert!(ObjectsRecord::read(directory.path()).unwrap_err().contains("format version 2"));
        fs::write(objects_record_path(directory.path()), "version = 1\nkind = \"local\"\nsecret = 1\n")
            .unwrap();
        assert!(ObjectsRecord::read(directory.path()).unwrap_err().contains("unknown field"));
    }
}
