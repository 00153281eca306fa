//! The inference service: models (hot-swappable), decision ids, the evidence ledger, metrics.
//! The HTTP layer is `api`; this holds everything it serves from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use buffer::Ring;
use protocol::evidence::{EVIDENCE_CONTENT_TYPE, model_record_key};

use crate::http_server::HttpLimits;
use crate::input::{IMAGE_SCALE_LIMIT, IMAGE_SCALE_MAX_DEFAULT};
use crate::ledger::{Ledger, LedgerLimits, chunk_raw_bytes_max, record_bytes};
use crate::metrics::InferenceMetrics;
use crate::model::{Model, ModelError};
use crate::state::{DecisionIds, RecordedModels, StateError};

/// Default largest request body: typical camera JPEGs are 50–500 KiB. A model's own bound
/// (`input::ImageBounds::body_bytes_max`) applies when it is smaller.
pub const BODY_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Largest `body_bytes_max` a config may ask for (a record holds at most
/// `RECORD_PAYLOAD_BYTES_MAX`, and the evidence holds the body).
pub const BODY_BYTES_LIMIT: usize = 4_000_000;
const _: () = assert!(BODY_BYTES_MAX_DEFAULT <= BODY_BYTES_LIMIT);
const _: () = assert!(BODY_BYTES_LIMIT <= protocol::RECORD_PAYLOAD_BYTES_MAX);
/// Default most inputs decoded (and run) at once on blocking threads: the appliance has 2 cores.
pub const DECODES_MAX_DEFAULT: usize = 2;
/// Largest `decodes_max` a config may ask for.
pub const DECODES_LIMIT: usize = 64;
/// How long requests in progress may finish after shutdown before they are cut off.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// Default bound of the evidence queue (requests waiting for their record).
pub const EVIDENCE_QUEUE_DEPTH_MAX_DEFAULT: usize = 1024;
/// Default most evidence records per appended chunk.
pub const BATCH_RECORDS_MAX_DEFAULT: usize = 256;
/// Default `Retry-After` of a 503, in seconds.
pub const RETRY_AFTER_SECONDS_DEFAULT: u32 = 5;
/// Room the evidence needs beside the original input: the decision's fields (names, up to
/// `EVIDENCE_SCORES_MAX` scores, request metadata) and postcard framing.
pub const EVIDENCE_FIELDS_BYTES_MAX: usize = 16 * 1024;

/// Where a model and its sidecar are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSource {
    pub onnx_path: PathBuf,
    pub sidecar_path: PathBuf,
}

impl ModelSource {
    /// `<directory>/<name>.onnx` and `<directory>/<name>.json`.
    pub fn in_directory(directory: impl Into<PathBuf>, name: &str) -> ModelSource {
        let directory = directory.into();
        ModelSource {
            onnx_path: directory.join(format!("{name}.onnx")),
            sidecar_path: directory.join(format!("{name}.json")),
        }
    }

    pub fn load(&self) -> Result<Model, ModelError> {
        Model::load(&self.onnx_path, &self.sidecar_path)
    }
}

/// Whether decisions are recorded. There is one production setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvidenceMode {
    /// Every decision's evidence is durable on the audit lane before it is answered.
    Durable,
    /// Decisions are answered without any record. Only for `tributary bench inference`, to
    /// measure what the record costs; never on an appliance.
    UnrecordedForBenchmark,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferenceConfig {
    /// Decision-id epochs and model-record markers (see `state`).
    pub state_dir: PathBuf,
    /// Models to load at start.
    pub models: Vec<ModelSource>,
    /// The model used when a request names none; `None` is allowed only with a single model.
    pub default_model: Option<String>,
    /// Largest request body; larger ones get 413. Must leave room for the evidence in one audit
    /// chunk of the ring (checked at start).
    pub body_bytes_max: usize,
    /// An image may be at most this many times the model's input height and width (and at most
    /// `input::IMAGE_SIDE_PIXELS_MAX` a side); checked from its header, before decoding.
    pub image_scale_max: u32,
    /// Most inputs decoded and run at once; further requests wait for a slot (counted).
    pub decodes_max: usize,
    /// Connection caps and timeouts of the API's server.
    pub http: HttpLimits,
    pub evidence_queue_depth_max: usize,
    pub batch_records_max: usize,
    pub retry_after_seconds: u32,
    pub evidence: EvidenceMode,
}

impl InferenceConfig {
    pub fn new(state_dir: impl Into<PathBuf>, models: Vec<ModelSource>) -> InferenceConfig {
        InferenceConfig {
            state_dir: state_dir.into(),
            models,
            default_model: None,
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            image_scale_max: IMAGE_SCALE_MAX_DEFAULT,
            decodes_max: DECODES_MAX_DEFAULT,
            http: HttpLimits::default(),
            evidence_queue_depth_max: EVIDENCE_QUEUE_DEPTH_MAX_DEFAULT,
            batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
            retry_after_seconds: RETRY_AFTER_SECONDS_DEFAULT,
            evidence: EvidenceMode::Durable,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid inference configuration: {key}: {problem}")]
    Config { key: &'static str, problem: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start the evidence writer thread: {0}")]
    Writer(std::io::Error),
}

/// The models being served, swapped as a whole.
#[derive(Debug)]
pub struct ModelSet {
    by_name: BTreeMap<String, Arc<Model>>,
    default_model: Option<String>,
}

impl ModelSet {
    pub fn get(&self, name: Option<&str>) -> Result<&Arc<Model>, String> {
        let name = match (name, &self.default_model) {
            (Some(name), _) => name,
            (None, Some(default)) => default.as_str(),
            (None, None) => {
                return Err(format!(
                    "no model named and no default; name one of {:?} with ?model=",
                    self.names()
                ));
            }
        };
        self.by_name
            .get(name)
            .ok_or_else(|| format!("model {name:?} is not loaded; loaded models: {:?}", self.names()))
    }

    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }
}

pub struct InferenceService {
    pub(crate) config: InferenceConfig,
    models: RwLock<Arc<ModelSet>>,
    pub(crate) ids: DecisionIds,
    pub(crate) ledger: Ledger,
    pub(crate) metrics: Arc<InferenceMetrics>,
    /// One permit per decode running on a blocking thread (`decodes_max`).
    pub(crate) decodes: Arc<tokio::sync::Semaphore>,
    chunk_raw_bytes_max: usize,
}

impl InferenceService {
    /// Loads `config.models`, prepares the state directory and starts the evidence writer on
    /// `ring`'s audit lane. Needs no runtime; the router it serves needs tokio.
    pub fn start(config: InferenceConfig, ring: Ring) -> Result<Arc<InferenceService>, ServiceError> {
        let models = config.models.iter().map(ModelSource::load).collect::<Result<Vec<_>, _>>()?;
        let config_problem = |key, problem| Err(ServiceError::Config { key, problem });
        if !(1..=BODY_BYTES_LIMIT).contains(&config.body_bytes_max) {
            return config_problem(
                "body_bytes_max",
                format!("{} is not in 1..={BODY_BYTES_LIMIT}", config.body_bytes_max),
            );
        }
        if !(1..=IMAGE_SCALE_LIMIT).contains(&config.image_scale_max) {
            return config_problem(
                "image_scale_max",
                format!("{} is not in 1..={IMAGE_SCALE_LIMIT}", config.image_scale_max),
            );
        }
        if !(1..=DECODES_LIMIT).contains(&config.decodes_max) {
            return config_problem(
                "decodes_max",
                format!("{} is not in 1..={DECODES_LIMIT}", config.decodes_max),
            );
        }
        if let Err(error) = config.http.validate() {
            return config_problem(error.key, format!("{} is not in {}", error.found, error.expected));
        }
        if !(1..=1 << 20).contains(&config.evidence_queue_depth_max) {
            return config_problem(
                "evidence_queue_depth_max",
                format!("{} is not in 1..=1048576", config.evidence_queue_depth_max),
            );
        }
        if !(1..=protocol::CHUNK_RECORDS_MAX as usize).contains(&config.batch_records_max) {
            return config_problem(
                "batch_records_max",
                format!("{} is not in 1..={}", config.batch_records_max, protocol::CHUNK_RECORDS_MAX),
            );
        }
        let chunk_raw_bytes_max = chunk_raw_bytes_max(ring.config());
        let ids = DecisionIds::start(&config.state_dir)?;
        let recorded = RecordedModels::open(&config.state_dir)?;
        let metrics = Arc::new(InferenceMetrics::default());
        let limits = LedgerLimits {
            queue_depth_max: config.evidence_queue_depth_max,
            batch_records_max: config.batch_records_max,
            chunk_raw_bytes_max,
        };
        let ledger = Ledger::start(ring, recorded, limits, metrics.clone()).map_err(ServiceError::Writer)?;
        let service = InferenceService {
            models: RwLock::new(Arc::new(ModelSet { by_name: BTreeMap::new(), default_model: None })),
            ids,
            ledger,
            metrics,
            decodes: Arc::new(tokio::sync::Semaphore::new(config.decodes_max)),
            chunk_raw_bytes_max,
            config,
        };
        service.set_models(models, service.config.default_model.clone())?;
        tracing::info!(
            models = ?service.models().names(),
            chunk_raw_bytes_max,
            body_bytes_max = service.config.body_bytes_max,
            image_scale_max = service.config.image_scale_max,
            decodes_max = service.config.decodes_max,
            http = ?service.config.http,
            "inference service started"
        );
        Ok(Arc::new(service))
    }

    /// Replaces the served models at once; requests already running finish with the model they
    /// started with. Refuses (and keeps the current set) if a name repeats, the default is not
    /// among them, or a model's record or evidence cannot fit one audit chunk.
    pub fn set_models(&self, models: Vec<Model>, default_model: Option<String>) -> Result<(), ServiceError> {
        let problem = |key, problem| Err(ServiceError::Config { key, problem });
        let mut by_name = BTreeMap::new();
        for model in models {
            let model_record = record_bytes(
                &model_record_key(model.sha256()),
                protocol::evidence::MODEL_CONTENT_TYPE,
                model.onnx_bytes().len() + model.name().len() + 128,
            );
            if model_record > self.chunk_raw_bytes_max {
                return problem(
                    "models",
                    format!(
                        "model {} ({} bytes) does not fit one audit chunk of this ring ({} bytes); raise the ring's capacity",
                        model.name(),
                        model.onnx_bytes().len(),
                        self.chunk_raw_bytes_max
                    ),
                );
            }
            let evidence = self.evidence_record_bytes_max(model.input_elements());
            if evidence > self.chunk_raw_bytes_max {
                return problem(
                    "body_bytes_max",
                    format!(
                        "evidence of a {}-byte body for model {} may take {evidence} bytes, more than one audit chunk of \
                         this ring ({} bytes); lower body_bytes_max or raise the ring's capacity",
                        self.config.body_bytes_max,
                        model.name(),
                        self.chunk_raw_bytes_max
                    ),
                );
            }
            let name = model.name().to_string();
            if by_name.insert(name.clone(), Arc::new(model)).is_some() {
                return problem("models", format!("two models are named {name}"));
            }
        }
        let default_model = match default_model {
            Some(name) if !by_name.contains_key(&name) => {
                return problem(
                    "default_model",
                    format!("{name} is not among the models {:?}", by_name.keys().collect::<Vec<_>>()),
                );
            }
            Some(name) => Some(name),
            None if by_name.len() == 1 => by_name.keys().next().cloned(),
            None => None,
        };
        let set = Arc::new(ModelSet { by_name, default_model });
        tracing::info!(models = ?set.names(), default = ?set.default_model, "serving models");
        *self.models.write().unwrap_or_else(std::sync::PoisonError::into_inner) = set;
        Ok(())
    }

    /// Loads `sources` and swaps them in (see [`InferenceService::set_models`]).
    pub fn reload_models(
        &self,
        sources: &[ModelSource],
        default_model: Option<String>,
    ) -> Result<(), ServiceError> {
        let models = sources.iter().map(ModelSource::load).collect::<Result<Vec<_>, _>>()?;
        self.set_models(models, default_model)
    }

    /// The models being served now.
    pub fn models(&self) -> Arc<ModelSet> {
        self.models.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn metrics(&self) -> &Arc<InferenceMetrics> {
        &self.metrics
    }

    pub fn config(&self) -> &InferenceConfig {
        &self.config
    }

    /// The most bytes one audit chunk holds on this service's ring.
    pub fn chunk_raw_bytes_max(&self) -> usize {
        self.chunk_raw_bytes_max
    }

    /// The largest evidence record a request may produce for a model with `input_elements`
    /// input values: the body, the modified tensor and the decision's fields.
    fn evidence_record_bytes_max(&self, input_elements: usize) -> usize {
        let modified = 5 + 4 * crate::input::TENSOR_RANK_MAX + 4 * input_elements;
        record_bytes(
            &"9".repeat(protocol::RECORD_KEY_BYTES_MAX),
            EVIDENCE_CONTENT_TYPE,
            self.config.body_bytes_max + modified + EVIDENCE_FIELDS_BYTES_MAX,
        )
    }
}
