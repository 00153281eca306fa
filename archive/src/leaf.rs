//! The leaf of the decision log: a canonical JSON encoding of one decision (or one model version)
//! with where it came from and the sha256 of every object it names.
//!
//! ```text
//! {"version":1,"device":"…","lane_seq":7,"record_index":0,
//!  "body":{"kind":"decision","decision":{…},"original":{"content_type":"image/png","sha256":"<64 hex>","bytes":1234},"modified":null}}
//! {"version":1,"device":"…","lane_seq":3,"record_index":0,
//!  "body":{"kind":"model","name":"shapes","model":{"content_type":"application/onnx","sha256":"…","bytes":…}}}
//! ```
//!
//! Canonical means: fields in declaration order, no whitespace, floats in serde_json's shortest
//! round-trip form; [`LeafEntry::decode`] re-encodes what it parsed and refuses bytes that differ,
//! so one leaf has exactly one encoding and its hash names it. Limits: a leaf is at most
//! [`LEAF_BYTES_MAX`] bytes (1024 scores of up to 16 characters plus names stay far below it);
//! unknown fields and unknown versions are refused.

use protocol::evidence::{
    BlobSummary, DecisionSummary, EVIDENCE_FIELD_BYTES_MAX, EVIDENCE_NAME_BYTES_MAX, EVIDENCE_SCORES_MAX,
    Evidence, ModelRecord, Sha256Digest, parse_sha256_hex,
};
use serde::{Deserialize, Serialize};

/// The leaf format this build writes and the only one it reads.
pub const LEAF_FORMAT_VERSION: u32 = 1;
/// Largest encoded leaf.
pub const LEAF_BYTES_MAX: usize = 64 * 1024;
/// Longest device id.
pub const DEVICE_BYTES_MAX: usize = 128;

// A decision with every bound at its maximum still fits a leaf.
const _: () = assert!(
    EVIDENCE_SCORES_MAX * 20 + 8 * EVIDENCE_NAME_BYTES_MAX + 4 * EVIDENCE_FIELD_BYTES_MAX < LEAF_BYTES_MAX
);

// Leaves are built one at a time and never stored in bulk: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LeafBody {
    Decision { decision: DecisionSummary, original: BlobSummary, modified: Option<BlobSummary> },
    Model { name: String, model: BlobSummary },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeafEntry {
    pub version: u32,
    /// The device id from the sink's verified certificate.
    pub device: String,
    /// Seq of the audit-lane chunk the record came in.
    pub lane_seq: u64,
    /// Index of the record in that chunk.
    pub record_index: u32,
    pub body: LeafBody,
}

/// Which namespace an entry's id lives in: decision ids and model keys never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Decision,
    Model,
}

impl EntryKind {
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Decision => "decision",
            EntryKind::Model => "model",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeafError {
    #[error("leaf of {length} bytes exceeds {LEAF_BYTES_MAX}")]
    TooLarge { length: usize },
    #[error("leaf does not parse: {0}")]
    Malformed(String),
    #[error("leaf format version {0} is not supported (this build reads version {LEAF_FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("leaf is not in canonical form")]
    NotCanonical,
    #[error("leaf field {field}: {problem}")]
    Invalid { field: &'static str, problem: String },
}

fn invalid(field: &'static str, problem: impl Into<String>) -> LeafError {
    LeafError::Invalid { field, problem: problem.into() }
}

/// A device id the archive accepts: it becomes part of file names in review datasets.
pub fn validate_device(device: &str) -> Result<(), LeafError> {
    if device.is_empty() || device.len() > DEVICE_BYTES_MAX {
        return Err(invalid("device", format!("length {} is not in 1..={DEVICE_BYTES_MAX}", device.len())));
    }
    if !device.bytes().all(|byte| byte.is_ascii_graphic()) || device.contains('/') {
        return Err(invalid("device", "only printable ASCII without '/' is allowed"));
    }
    Ok(())
}

impl LeafEntry {
    pub fn decision(device: &str, lane_seq: u64, record_index: u32, evidence: &Evidence) -> LeafEntry {
        let decision = &evidence.decision;
        LeafEntry {
            version: LEAF_FORMAT_VERSION,
            device: device.to_string(),
            lane_seq,
            record_index,
            body: LeafBody::Decision {
                decision: DecisionSummary::of(decision),
                original: BlobSummary::of(&evidence.original),
                modified: evidence.modified.as_ref().map(BlobSummary::of),
            },
        }
    }

    pub fn model(device: &str, lane_seq: u64, record_index: u32, record: &ModelRecord) -> LeafEntry {
        LeafEntry {
            version: LEAF_FORMAT_VERSION,
            device: device.to_string(),
            lane_seq,
            record_index,
            body: LeafBody::Model { name: record.name.clone(), model: BlobSummary::of(&record.model) },
        }
    }

    pub fn kind(&self) -> EntryKind {
        match self.body {
            LeafBody::Decision { .. } => EntryKind::Decision,
            LeafBody::Model { .. } => EntryKind::Model,
        }
    }

    /// The entry's id within its kind: the decision id, or the model's record key.
    pub fn id(&self) -> String {
        match &self.body {
            LeafBody::Decision { decision, .. } => decision.decision_id.clone(),
            LeafBody::Model { model, .. } => format!("model-{}", &model.sha256[..32.min(model.sha256.len())]),
        }
    }

    /// Every object the entry names, with its role.
    pub fn objects(&self) -> Vec<(&'static str, Sha256Digest)> {
        let digest = |text: &str| parse_sha256_hex(text).expect("validated leaves hold valid digests");
        match &self.body {
            LeafBody::Decision { decision, original, modified } => {
                let mut objects = vec![("original", digest(&original.sha256))];
                if let Some(modified) = modified {
                    objects.push(("modified", digest(&modified.sha256)));
                }
                objects.push(("model", digest(&decision.model_sha256)));
                objects
            }
            LeafBody::Model { model, .. } => vec![("model", digest(&model.sha256))],
        }
    }

    pub fn validate(&self) -> Result<(), LeafError> {
        if self.version != LEAF_FORMAT_VERSION {
            return Err(LeafError::UnsupportedVersion(self.version));
        }
        validate_device(&self.device)?;
        let check_name = |field: &'static str, value: &str| {
            if value.is_empty()
                || value.len() > EVIDENCE_NAME_BYTES_MAX
                || value.chars().any(char::is_control)
            {
                return Err(invalid(field, format!("length {} or control characters", value.len())));
            }
            Ok(())
        };
        let check_object = |field: &'static str, object: &BlobSummary| {
            if object.digest().is_none() {
                return Err(invalid(field, "sha256 is not 64 lower-case hex digits"));
            }
            protocol::validate_content_type(&object.content_type)
                .map_err(|error| invalid(field, error.to_string()))
        };
        match &self.body {
            LeafBody::Decision { decision, original, modified } => {
                check_name("decision.decision_id", &decision.decision_id)?;
                protocol::validate_key(&decision.decision_id)
                    .map_err(|error| invalid("decision.decision_id", error.to_string()))?;
                check_name("decision.model_name", &decision.model_name)?;
                check_name("decision.label", &decision.label)?;
                if parse_sha256_hex(&decision.model_sha256).is_none() {
                    return Err(invalid("decision.model_sha256", "not 64 lower-case hex digits"));
                }
                if decision.scores.len() > EVIDENCE_SCORES_MAX {
                    return Err(invalid("decision.scores", format!("{} scores", decision.scores.len())));
                }
                // JSON has no NaN or infinity: serde_json would write them as null and the leaf
                // would no longer read back.
                if !decision.score.is_finite() || decision.scores.iter().any(|score| !score.is_finite()) {
                    return Err(invalid("decision.scores", "scores must be finite"));
                }
                if decision.client.len() > EVIDENCE_FIELD_BYTES_MAX
                    || decision.request_id.as_ref().is_some_and(|id| id.len() > EVIDENCE_FIELD_BYTES_MAX)
                {
                    return Err(invalid(
                        "decision.request",
                        format!("longer than {EVIDENCE_FIELD_BYTES_MAX}"),
                    ));
                }
                check_object("original", original)?;
                if let Some(modified) = modified {
                    check_object("modified", modified)?;
                }
            }
            LeafBody::Model { name, model } => {
                check_name("model.name", name)?;
                check_object("model", model)?;
            }
        }
        Ok(())
    }

    /// The canonical bytes, validated and checked to read back as the same leaf.
    pub fn encode(&self) -> Result<Vec<u8>, LeafError> {
        self.validate()?;
        let bytes = serde_json::to_vec(self).map_err(|error| LeafError::Malformed(error.to_string()))?;
        if bytes.len() > LEAF_BYTES_MAX {
            return Err(LeafError::TooLarge { length: bytes.len() });
        }
        let read_back = LeafEntry::decode(&bytes)?;
        assert_eq!(&read_back, self, "a leaf must read back as written");
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<LeafEntry, LeafError> {
        if bytes.len() > LEAF_BYTES_MAX {
            return Err(LeafError::TooLarge { length: bytes.len() });
        }
        let leaf: LeafEntry =
            serde_json::from_slice(bytes).map_err(|error| LeafError::Malformed(error.to_string()))?;
        leaf.validate()?;
        let canonical = serde_json::to_vec(&leaf).map_err(|error| LeafError::Malformed(error.to_string()))?;
        if canonical != bytes {
            return Err(LeafError::NotCanonical);
        }
        Ok(leaf)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use protocol::evidence::{Blob, Decision, RequestMeta, sha256};

    pub(crate) fn evidence(id: &str, score: f32) -> Evidence {
        Evidence {
            decision: Decision {
                decision_id: id.into(),
                decided_at_us: 1_700_000_000_000_000,
                model_name: "shapes".into(),
                model_sha256: sha256(b"model"),
                label: "circle".into(),
                label_index: 1,
                score,
                scores: vec![0.1, score, 0.3],
                latency_us: 1200,
                request: RequestMeta { client: "127.0.0.1:5555".into(), request_id: None },
            },
            original: Blob::new("image/png", vec![1, 2, 3]),
            modified: Some(Blob::new("application/x-tensor-f32", vec![0; 16])),
        }
    }

    #[test]
    fn round_trips_canonically() {
        for score in [0.0f32, 1.0, 0.1, 1e-30, 0.333_333_34, -0.0] {
            let leaf = LeafEntry::decision("cam-01", 7, 2, &evidence("d-1", score.abs()));
            let bytes = leaf.encode().unwrap();
            assert_eq!(LeafEntry::decode(&bytes).unwrap(), leaf);
        }
        let model = LeafEntry::model("cam-01", 1, 0, &ModelRecord::new("shapes", vec![1; 10]));
        assert_eq!(LeafEntry::decode(&model.encode().unwrap()).unwrap(), model);
        assert!(model.id().starts_with("model-") && model.id().len() == 38);
    }

    #[test]
    fn refuses_what_is_not_canonical_or_valid() {
        let bytes = LeafEntry::decision("cam-01", 7, 2, &evidence("d-1", 0.5)).encode().unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let check = |input: String, expected: fn(&LeafError) -> bool| {
            let result = LeafEntry::decode(input.as_bytes());
            assert!(result.as_ref().is_err_and(expected), "{input}: {result:?}");
        };
        check(text.replace(",\"lane_seq\"", ", \"lane_seq\""), |error| *error == LeafError::NotCanonical);
        check(text.replace("\"version\":1", "\"version\":2"), |error| {
            *error == LeafError::UnsupportedVersion(2)
        });
        check(text.replace("\"lane_seq\":7", "\"lane_seq\":7,\"extra\":1"), |error| {
            matches!(error, LeafError::Malformed(_))
        });
        check(text.replace("cam-01", "cam/01"), |error| {
            matches!(error, LeafError::Invalid { field: "device", .. })
        });
        check(text.replace("\"score\":0.5", "\"score\":null"), |error| {
            matches!(error, LeafError::Malformed(_))
        });
        check(text[..text.len() - 1].to_string(), |error| matches!(error, LeafError::Malformed(_)));
        let mut nan = evidence("d-1", 0.5);
        nan.decision.scores[0] = f32::NAN;
        assert!(matches!(
            LeafEntry::decision("cam", 1, 0, &nan).encode(),
            Err(LeafError::Invalid { field: "decision.scores", .. })
        ));
        assert!(matches!(
            LeafEntry::decode(&vec![b' '; LEAF_BYTES_MAX + 1]),
            Err(LeafError::TooLarge { length }) if length == LEAF_BYTES_MAX + 1
        ));
    }
}
