//! Evidence records: what the appliance's inference API writes to the audit lane, and what the
//! core archive reads back. One record per decision, one record per model version.
//!
//! A record on [`Lane::Audit`](crate::Lane::Audit) whose content type is
//! [`EVIDENCE_CONTENT_TYPE`] holds one [`Evidence`]: the decision, the original input exactly as
//! received and, when the model saw something else (decoded, resized, normalised), that modified
//! input too. Its record key is the decision id. A record whose content type is
//! [`MODEL_CONTENT_TYPE`] holds one [`ModelRecord`] (the model file itself) and its key is
//! `model-<first 32 hex digits of its sha256>`; an appliance sends each model version once before
//! the first decision that names it.
//!
//! Encoding: one version byte ([`EVIDENCE_FORMAT_VERSION`]) then postcard. Decoding treats the
//! bytes as hostile: unknown versions are refused, the input is bounded by the record payload
//! limit before anything is parsed, every blob's sha256 is recomputed and compared, and ids,
//! labels and content types are checked against their bounds.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::record::{RECORD_PAYLOAD_BYTES_MAX, validate_content_type, validate_key};

/// Content type of a decision's evidence record on the audit lane.
pub const EVIDENCE_CONTENT_TYPE: &str = "application/vnd.tributary.evidence";
/// Content type of a model record on the audit lane.
pub const MODEL_CONTENT_TYPE: &str = "application/vnd.tributary.model";
/// The format version this build writes and the only one it reads.
pub const EVIDENCE_FORMAT_VERSION: u8 = 1;
/// Longest decision id, label or model name, in bytes.
pub const EVIDENCE_NAME_BYTES_MAX: usize = 128;
/// Most per-class scores a decision carries.
pub const EVIDENCE_SCORES_MAX: usize = 1024;
/// Longest free-form request field (client address, request id), in bytes.
pub const EVIDENCE_FIELD_BYTES_MAX: usize = 256;

/// A sha256 digest.
pub type Sha256Digest = [u8; 32];

/// The sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256::digest(bytes).into()
}

/// Lower-case hex of a digest (64 characters).
pub fn sha256_hex(digest: &Sha256Digest) -> String {
    use std::fmt::Write as _;
    let mut hex = String::with_capacity(64);
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The record key a model record travels under.
pub fn model_record_key(model_sha256: &Sha256Digest) -> String {
    format!("model-{}", &sha256_hex(model_sha256)[..32])
}

/// Bytes plus what they are and their sha256 (checked on decode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub content_type: String,
    pub sha256: Sha256Digest,
    pub bytes: Vec<u8>,
}

impl Blob {
    /// A blob of `bytes`, hashing them.
    pub fn new(content_type: impl Into<String>, bytes: Vec<u8>) -> Blob {
        Blob { content_type: content_type.into(), sha256: sha256(&bytes), bytes }
    }
}

/// What the caller sent besides the input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct RequestMeta {
    /// The client's address as the API saw it.
    pub client: String,
    /// The caller's own request id, when it sent one.
    pub request_id: Option<String>,
}

/// One decision of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Unique per device; also the record key, so a valid record key (no '.', '/').
    pub decision_id: String,
    /// When the decision was made, microseconds since the Unix epoch.
    pub decided_at_us: u64,
    pub model_name: String,
    pub model_sha256: Sha256Digest,
    pub label: String,
    pub label_index: u32,
    /// The score of `label`, in 0..=1.
    pub score: f32,
    /// Every class's score, in the model's class order.
    pub scores: Vec<f32>,
    /// Time spent in pre-processing and inference, microseconds.
    pub latency_us: u64,
    pub request: RequestMeta,
}

/// Everything needed to interrogate one decision later.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub decision: Decision,
    /// The input exactly as received.
    pub original: Blob,
    /// What the model actually saw, when that differs from the original (e.g. the decoded,
    /// resized image as an f32 tensor).
    pub modified: Option<Blob>,
}

/// One model version, sent once so the archive holds every model a decision names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    /// The model file (ONNX); its sha256 is the model's address.
    pub model: Blob,
}

/// The digest in 64 lower-case hex digits (what `sha256_hex` writes), or `None`.
pub fn parse_sha256_hex(text: &str) -> Option<Sha256Digest> {
    if text.len() != 64 || !text.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).ok()?;
    }
    Some(digest)
}

/// A blob as JSON documents name it (archive leaves, the appliance's `GET /v1/decisions/{id}`):
/// what it is, its sha256 in hex and its length; the bytes stay where they are stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobSummary {
    pub content_type: String,
    /// Lower-case hex.
    pub sha256: String,
    pub bytes: u64,
}

impl BlobSummary {
    pub fn of(blob: &Blob) -> BlobSummary {
        BlobSummary {
            content_type: blob.content_type.clone(),
            sha256: sha256_hex(&blob.sha256),
            bytes: blob.bytes.len() as u64,
        }
    }

    pub fn digest(&self) -> Option<Sha256Digest> {
        parse_sha256_hex(&self.sha256)
    }
}

/// A `Decision` as JSON documents show it: the one definition of the decision schema that the
/// archive's leaves (`archive::leaf`, canonical JSON hashed into the log) and the appliance's
/// `GET /v1/decisions/{id}` (`inference::RecordedDecision`, flattened) both use. Digests are in
/// lower-case hex and the request fields are inlined. The field order is part of the leaf's
/// canonical encoding: do not reorder or rename fields (a new leaf format version would be
/// needed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionSummary {
    pub decision_id: String,
    pub decided_at_us: u64,
    pub model_name: String,
    pub model_sha256: String,
    pub label: String,
    pub label_index: u32,
    pub score: f32,
    pub scores: Vec<f32>,
    pub latency_us: u64,
    pub client: String,
    pub request_id: Option<String>,
}

impl DecisionSummary {
    pub fn of(decision: &Decision) -> DecisionSummary {
        DecisionSummary {
            decision_id: decision.decision_id.clone(),
            decided_at_us: decision.decided_at_us,
            model_name: decision.model_name.clone(),
            model_sha256: sha256_hex(&decision.model_sha256),
            label: decision.label.clone(),
            label_index: decision.label_index,
            score: decision.score,
            scores: decision.scores.clone(),
            latency_us: decision.latency_us,
            client: decision.request.client.clone(),
            request_id: decision.request.request_id.clone(),
        }
    }
}

/// Why evidence bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvidenceError {
    #[error("evidence record is empty")]
    Empty,
    #[error(
        "evidence format version {0} is not supported (this build reads version {EVIDENCE_FORMAT_VERSION})"
    )]
    UnsupportedVersion(u8),
    #[error("evidence record of {len} bytes exceeds the record payload limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("evidence record does not parse: {0}")]
    Malformed(String),
    #[error("evidence record has trailing bytes after the encoded value")]
    TrailingBytes,
    #[error("{field}: {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error("{field}: sha256 does not match its bytes")]
    DigestMismatch { field: &'static str },
}

fn check_name(field: &'static str, value: &str) -> Result<(), EvidenceError> {
    if value.is_empty() || value.len() > EVIDENCE_NAME_BYTES_MAX {
        return Err(EvidenceError::Invalid {
            field,
            problem: format!("length {} is not in 1..={EVIDENCE_NAME_BYTES_MAX}", value.len()),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(EvidenceError::Invalid { field, problem: "contains a control character".into() });
    }
    Ok(())
}

fn check_field(field: &'static str, value: &str) -> Result<(), EvidenceError> {
    if value.len() > EVIDENCE_FIELD_BYTES_MAX {
        return Err(EvidenceError::Invalid {
            field,
            problem: format!("length {} exceeds {EVIDENCE_FIELD_BYTES_MAX}", value.len()),
        });
    }
    Ok(())
}

fn check_blob(field: &'static str, blob: &Blob) -> Result<(), EvidenceError> {
    validate_content_type(&blob.content_type)
        .map_err(|error| EvidenceError::Invalid { field, problem: error.to_string() })?;
    if sha256(&blob.bytes) != blob.sha256 {
        return Err(EvidenceError::DigestMismatch { field });
    }
    Ok(())
}

impl Evidence {
    /// Checks every bound and digest. [`Evidence::encode`] and [`Evidence::decode`] both call it,
    /// so the appliance cannot write what the core would refuse.
    pub fn validate(&self) -> Result<(), EvidenceError> {
        let decision = &self.decision;
        check_name("decision.decision_id", &decision.decision_id)?;
        validate_key(&decision.decision_id).map_err(|error| EvidenceError::Invalid {
            field: "decision.decision_id",
            problem: error.to_string(),
        })?;
        check_name("decision.model_name", &decision.model_name)?;
        check_name("decision.label", &decision.label)?;
        if decision.scores.len() > EVIDENCE_SCORES_MAX {
            return Err(EvidenceError::Invalid {
                field: "decision.scores",
                problem: format!("{} scores exceed {EVIDENCE_SCORES_MAX}", decision.scores.len()),
            });
        }
        if !decision.score.is_finite() || !(0.0..=1.0).contains(&decision.score) {
            return Err(EvidenceError::Invalid {
                field: "decision.score",
                problem: format!("{} is not in 0..=1", decision.score),
            });
        }
        check_field("decision.request.client", &decision.request.client)?;
        if let Some(request_id) = &decision.request.request_id {
            check_field("decision.request.request_id", request_id)?;
        }
        check_blob("original", &self.original)?;
        if let Some(modified) = &self.modified {
            check_blob("modified", modified)?;
        }
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, EvidenceError> {
        self.validate()?;
        encode_versioned(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Evidence, EvidenceError> {
        let evidence: Evidence = decode_versioned(bytes)?;
        evidence.validate()?;
        Ok(evidence)
    }
}

impl ModelRecord {
    pub fn new(name: impl Into<String>, model_bytes: Vec<u8>) -> ModelRecord {
        ModelRecord { name: name.into(), model: Blob::new("application/onnx", model_bytes) }
    }

    pub fn validate(&self) -> Result<(), EvidenceError> {
        check_name("model.name", &self.name)?;
        check_blob("model", &self.model)
    }

    pub fn encode(&self) -> Result<Vec<u8>, EvidenceError> {
        self.validate()?;
        encode_versioned(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<ModelRecord, EvidenceError> {
        let record: ModelRecord = decode_versioned(bytes)?;
        record.validate()?;
        Ok(record)
    }
}

fn encode_versioned<T: Serialize>(value: &T) -> Result<Vec<u8>, EvidenceError> {
    let mut bytes = vec![EVIDENCE_FORMAT_VERSION];
    let body = postcard::to_allocvec(value).map_err(|error| EvidenceError::Malformed(error.to_string()))?;
    bytes.extend_from_slice(&body);
    if bytes.len() > RECORD_PAYLOAD_BYTES_MAX {
        return Err(EvidenceError::TooLarge { len: bytes.len(), max: RECORD_PAYLOAD_BYTES_MAX });
    }
    Ok(bytes)
}

fn decode_versioned<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, EvidenceError> {
    if bytes.len() > RECORD_PAYLOAD_BYTES_MAX {
        return Err(EvidenceError::TooLarge { len: bytes.len(), max: RECORD_PAYLOAD_BYTES_MAX });
    }
    let (&version, body) = bytes.split_first().ok_or(EvidenceError::Empty)?;
    if version != EVIDENCE_FORMAT_VERSION {
        return Err(EvidenceError::UnsupportedVersion(version));
    }
    // postcard allocates a Vec<u8> only after slicing that many bytes out of the input, so the
    // input length bounds every allocation.
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|error| EvidenceError::Malformed(error.to_string()))?;
    if !rest.is_empty() {
        return Err(EvidenceError::TrailingBytes);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence() -> Evidence {
        Evidence {
            decision: Decision {
                decision_id: "d-000001".into(),
                decided_at_us: 1_700_000_000_000_000,
                model_name: "shapes".into(),
                model_sha256: sha256(b"model"),
                label: "circle".into(),
                label_index: 1,
                score: 0.9,
                scores: vec![0.05, 0.9, 0.05],
                latency_us: 1200,
                request: RequestMeta { client: "127.0.0.1:5555".into(), request_id: Some("r1".into()) },
            },
            original: Blob::new("image/png", vec![1, 2, 3]),
            modified: Some(Blob::new("application/x-tensor-f32", vec![0; 16])),
        }
    }

    #[test]
    fn round_trips() {
        let evidence = evidence();
        let bytes = evidence.encode().unwrap();
        assert_eq!(Evidence::decode(&bytes).unwrap(), evidence);
        let model = ModelRecord::new("shapes", vec![9; 100]);
        assert_eq!(ModelRecord::decode(&model.encode().unwrap()).unwrap(), model);
        assert_eq!(model_record_key(&model.model.sha256).len(), 38);
    }

    #[test]
    fn refuses_bad_bytes() {
        let bytes = evidence().encode().unwrap();
        assert_eq!(Evidence::decode(&[]), Err(EvidenceError::Empty));
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 2;
        assert_eq!(Evidence::decode(&wrong_version), Err(EvidenceError::UnsupportedVersion(2)));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(Evidence::decode(&trailing), Err(EvidenceError::TrailingBytes));
        for cut in 1..bytes.len() {
            assert!(Evidence::decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        // Flip the last byte of the original's payload: its digest no longer matches.
        let mut tampered = evidence();
        tampered.original.bytes[0] ^= 1;
        let encoded = encode_versioned(&tampered).unwrap();
        assert_eq!(Evidence::decode(&encoded), Err(EvidenceError::DigestMismatch { field: "original" }));
    }

    #[test]
    fn refuses_bad_fields() {
        let mut bad_id = evidence();
        bad_id.decision.decision_id = "a.b".into();
        assert!(matches!(bad_id.encode(), Err(EvidenceError::Invalid { field: "decision.decision_id", .. })));
        let mut bad_score = evidence();
        bad_score.decision.score = f32::NAN;
        assert!(matches!(bad_score.encode(), Err(EvidenceError::Invalid { field: "decision.score", .. })));
        let mut long_label = evidence();
        long_label.decision.label = "x".repeat(EVIDENCE_NAME_BYTES_MAX + 1);
        assert!(matches!(long_label.encode(), Err(EvidenceError::Invalid { field: "decision.label", .. })));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x1234_5678_u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 300)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (state >> 56) as u8
                })
                .collect();
            let mut versioned = bytes.clone();
            if let Some(first) = versioned.first_mut() {
                *first = EVIDENCE_FORMAT_VERSION;
            }
            let _ = Evidence::decode(&versioned);
            let _ = ModelRecord::decode(&versioned);
        }
    }
}
