//! A classifier model: an ONNX file run by tract, plus its sidecar JSON.
//!
//! The sidecar (`<name>.json` next to `<name>.onnx`, written by `models/train_classifier.py`):
//!
//! ```json
//! { "name": "shapes", "labels": ["circle", "square", "triangle", "horizontal_stripes"],
//!   "input_shape": [1, 1, 32, 32], "normalisation": { "mean": 0.5, "std": 0.5 } }
//! ```
//!
//! Unknown sidecar fields (such as `training`) are ignored. A model is addressed by the sha256
//! of its ONNX bytes. Loading checks the model end to end: it is optimised for exactly the
//! sidecar's input shape and run once on zeros, and must give one finite score per label.
//!
//! Limits: ONNX file up to [`MODEL_BYTES_MAX`] (64 MiB; the service further requires that it fits
//! one audit chunk of its ring), sidecar up to [`SIDECAR_BYTES_MAX`], names up to
//! `EVIDENCE_NAME_BYTES_MAX` bytes of `[A-Za-z0-9_-]`, 1..=`EVIDENCE_SCORES_MAX` labels.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::evidence::{EVIDENCE_NAME_BYTES_MAX, EVIDENCE_SCORES_MAX, Sha256Digest, sha256, sha256_hex};
use serde::Deserialize;
use tract_onnx::prelude::*;

use crate::input::{InputTensor, Normalisation};

/// Largest ONNX file we load.
pub const MODEL_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest sidecar JSON we read.
pub const SIDECAR_BYTES_MAX: usize = 64 * 1024;

/// Why a model cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { what: &'static str, len: usize, max: usize },
    #[error("model sidecar is invalid: {0}")]
    Sidecar(String),
    #[error("model {name}: tract cannot load or optimise it: {reason}")]
    Load { name: String, reason: String },
    #[error("model {name}: inference failed: {reason}")]
    Run { name: String, reason: String },
    #[error("model {name}: gave {found} scores for {labels} labels")]
    OutputMismatch { name: String, found: usize, labels: usize },
    #[error("model {name}: score at index {index} is {value}, not a probability")]
    BadScore { name: String, index: usize, value: f32 },
}

/// The sidecar JSON of a model.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
pub struct ModelSpec {
    pub name: String,
    /// Class names in the model's output order.
    pub labels: Vec<String>,
    pub input_shape: Vec<usize>,
    pub normalisation: Normalisation,
}

impl ModelSpec {
    pub fn from_json(bytes: &[u8]) -> Result<ModelSpec, ModelError> {
        if bytes.len() > SIDECAR_BYTES_MAX {
            return Err(ModelError::TooLarge { what: "sidecar", len: bytes.len(), max: SIDECAR_BYTES_MAX });
        }
        let spec: ModelSpec =
            serde_json::from_slice(bytes).map_err(|error| ModelError::Sidecar(error.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |problem: String| Err(ModelError::Sidecar(problem));
        if self.name.is_empty()
            || self.name.len() > EVIDENCE_NAME_BYTES_MAX
            || !self.name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
        {
            return invalid(format!(
                "name {:?} must be 1..={EVIDENCE_NAME_BYTES_MAX} bytes of [A-Za-z0-9_-]",
                self.name
            ));
        }
        if !(1..=EVIDENCE_SCORES_MAX).contains(&self.labels.len()) {
            return invalid(format!("{} labels is not in 1..={EVIDENCE_SCORES_MAX}", self.labels.len()));
        }
        for label in &self.labels {
            if label.is_empty()
                || label.len() > EVIDENCE_NAME_BYTES_MAX
                || label.chars().any(char::is_control)
            {
                return invalid(format!(
                    "label {label:?} must be 1..={EVIDENCE_NAME_BYTES_MAX} bytes without control characters"
                ));
            }
        }
        // The tensor rules (rank, element count) are the ones requests are held to.
        InputTensor::new(self.input_shape.clone(), vec![0.0; self.input_elements_checked()?])
            .map_err(|error| ModelError::Sidecar(format!("input_shape: {error}")))?;
        let Normalisation { mean, std } = self.normalisation;
        if !mean.is_finite() || !std.is_finite() || std <= 0.0 {
            return invalid(format!("normalisation mean {mean} / std {std}: need finite values, std > 0"));
        }
        Ok(())
    }

    fn input_elements_checked(&self) -> Result<usize, ModelError> {
        self.input_shape
            .iter()
            .try_fold(1usize, |total, &dim| total.checked_mul(dim))
            .filter(|&total| (1..=crate::input::TENSOR_ELEMENTS_MAX).contains(&total))
            .ok_or_else(|| {
                ModelError::Sidecar(format!("input_shape {:?} is empty or too large", self.input_shape))
            })
    }
}

/// The result of one inference.
#[derive(Clone, Debug, PartialEq)]
pub struct Classification {
    pub label: String,
    pub label_index: u32,
    pub score: f32,
    /// Every class's score, in label order.
    pub scores: Vec<f32>,
}

/// A loaded, optimised model. Cheap to share (`Arc<Model>`); `classify` takes `&self` and may run
/// on many threads at once.
pub struct Model {
    spec: ModelSpec,
    sha256: Sha256Digest,
    onnx: Arc<[u8]>,
    plan: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Model")
            .field("name", &self.spec.name)
            .field("sha256", &self.sha256_hex())
            .field("onnx_bytes", &self.onnx.len())
            .finish()
    }
}

impl Model {
    /// Loads `onnx_path` with its sidecar `sidecar_path`.
    pub fn load(onnx_path: &Path, sidecar_path: &Path) -> Result<Model, ModelError> {
        let onnx = read_bounded(onnx_path, MODEL_BYTES_MAX)?;
        let spec = ModelSpec::from_json(&read_bounded(sidecar_path, SIDECAR_BYTES_MAX)?)?;
        Model::from_bytes(onnx, spec)
    }

    /// Loads a model from its ONNX bytes and an already parsed sidecar.
    pub fn from_bytes(onnx: Vec<u8>, spec: ModelSpec) -> Result<Model, ModelError> {
        if onnx.len() > MODEL_BYTES_MAX {
            return Err(ModelError::TooLarge { what: "model", len: onnx.len(), max: MODEL_BYTES_MAX });
        }
        spec.validate()?;
        let load_error =
            |error: TractError| ModelError::Load { name: spec.name.clone(), reason: format!("{error:#}") };
        let plan = tract_onnx::onnx()
            .model_for_read(&mut onnx.as_slice())
            .and_then(|model| model.with_input_fact(0, f32::fact(spec.input_shape.as_slice()).into()))
            .and_then(|model| model.into_optimized())
            .and_then(|model| model.into_runnable())
            .map_err(load_error)?;
        let model = Model { sha256: sha256(&onnx), onnx: onnx.into(), plan, spec };
        let zeros = vec![0.0; model.input_elements()];
        model.classify(&InputTensor::new(model.spec.input_shape.clone(), zeros).expect("validated shape"))?;
        Ok(model)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn labels(&self) -> &[String] {
        &self.spec.labels
    }

    pub fn input_shape(&self) -> &[usize] {
        &self.spec.input_shape
    }

    pub fn input_elements(&self) -> usize {
        self.spec.input_shape.iter().product()
    }

    pub fn normalisation(&self) -> Normalisation {
        self.spec.normalisation
    }

    pub fn sha256(&self) -> &Sha256Digest {
        &self.sha256
    }

    pub fn sha256_hex(&self) -> String {
        sha256_hex(&self.sha256)
    }

    /// The ONNX file as loaded (what the model record carries).
    pub fn onnx_bytes(&self) -> &Arc<[u8]> {
        &self.onnx
    }

    /// Runs the model on `input`, whose shape must be the model's input shape.
    pub fn classify(&self, input: &InputTensor) -> Result<Classification, ModelError> {
        assert_eq!(input.shape, self.spec.input_shape, "callers check the shape first");
        let run_error = |error: TractError| ModelError::Run {
            name: self.spec.name.clone(),
            reason: format!("{error:#}"),
        };
        let tensor = Tensor::from_shape(&input.shape, &input.data).map_err(run_error)?;
        let outputs = self.plan.run(tvec!(tensor.into_tvalue())).map_err(run_error)?;
        let output = outputs.first().ok_or_else(|| ModelError::OutputMismatch {
            name: self.spec.name.clone(),
            found: 0,
            labels: self.spec.labels.len(),
        })?;
        let scores: Vec<f32> =
            output.to_plain_array_view::<f32>().map_err(run_error)?.iter().copied().collect();
        if scores.len() != self.spec.labels.len() {
            return Err(ModelError::OutputMismatch {
                name: self.spec.name.clone(),
                found: scores.len(),
                labels: self.spec.labels.len(),
            });
        }
        if let Some((index, &value)) =
            scores.iter().enumerate().find(|(_, value)| !value.is_finite() || !(0.0..=1.0).contains(*value))
        {
            return Err(ModelError::BadScore { name: self.spec.name.clone(), index, value });
        }
        let (label_index, &score) = scores
            .iter()
            .enumerate()
            .max_by(|(_, left), (_, right)| left.total_cmp(right))
            .expect("at least one label");
        Ok(Classification {
            label: self.spec.labels[label_index].clone(),
            label_index: u32::try_from(label_index).expect("labels bounded by EVIDENCE_SCORES_MAX"),
            score,
            scores,
        })
    }
}

fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, ModelError> {
    let read_error = |source| ModelError::Read { path: path.to_path_buf(), source };
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > max as u64 {
        return Err(ModelError::TooLarge {
            what: "file",
            len: usize::try_from(len).unwrap_or(usize::MAX),
            max,
        });
    }
    std::fs::read(path).map_err(read_error)
}
