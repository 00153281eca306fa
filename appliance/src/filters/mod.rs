//! The filters stage: data preparation at the edge, between a source and the chunker.
//!
//! A source's `FilterChain` applies its configured filters in order to each `SourceRecord` and
//! either keeps the (possibly rewritten) record or drops it with a `DropReason`. Filters are
//! deterministic: they read the record's `timestamp_us`, never the clock, so the same records
//! give the same verdicts.
//!
//! Filters (see `config.rs` for the TOML):
//! - `rate_limit`: at most N records per second of record time (fixed one-second windows of
//!   `timestamp_us`), per source or per stream.
//! - `decimate`: the first record and then every k-th, per source or per stream.
//! - `deadband`: drops a reading whose configured fields all changed less than their thresholds
//!   since the stream's last kept reading; a reading missing a field is kept.
//! - `drop_duplicates`: drops a payload equal to one of the last N kept payloads (64-bit SipHash
//!   plus length; a false match needs a 2^-64 collision).
//! - `schema`: drops a JSON reading that is not an object of the required typed fields.
//! - `normalize_units`: converts numeric fields (named conversions or scale/offset).
//! - `tag`: adds labels to `SourceRecord::tags`.
//!
//! A stream is the value of a top-level JSON field (`stream_field`, "sensor" for deadband),
//! because record keys are unique per record; records without that field share one stream.
//!
//! JSON is parsed at most once per record and only when a filter needs it, only for a JSON
//! content type ("application/json", "*+json") and only up to `JSON_PAYLOAD_BYTES_MAX` bytes;
//! serde_json refuses nesting deeper than 127 levels, invalid UTF-8 and out-of-range numbers, so
//! hostile payloads are "not JSON", never a panic. A rewritten payload is serialized once, after
//! the last filter (keys then come out sorted).
//!
//! Limits: 32 filters per chain (`FILTERS_PER_CHAIN_MAX`); JSON parsed up to 64 KiB
//! (`JSON_PAYLOAD_BYTES_MAX`) and 127 levels of nesting (serde_json); per filter at most 1 024
//! streams of state (`STREAMS_PER_FILTER_MAX`, the least recently seen is forgotten first, which
//! only makes a filter keep more), stream names cut to 128 bytes, a duplicate window of at most
//! 1 024 hashes of 16 bytes (`DUPLICATE_WINDOW_MAX`), 64 fields or conversions
//! (`FIELDS_PER_FILTER_MAX`) and 32 labels (`TAGS_PER_FILTER_MAX`) of 128 bytes per filter. A
//! chain's state is therefore bounded by roughly 32 × 1 024 × (128 + 64 × 16) bytes ≈ 37 MiB in
//! the worst case and a few KiB in practice.
//!
//! Stateful filters remember what they themselves passed ("the last kept reading" is the last
//! reading the deadband passed, even if a later filter dropped it), so a filter's behaviour does
//! not depend on the filters after it.
//!
//! Invariant: every record given to `FilterChain::apply` is counted once in `records_in` and
//! once in either `records_out` or one drop reason, also across `reconfigure`.

mod config;
mod stages;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::source::SourceRecord;

pub use config::{
    DeadbandConfig, DeadbandField, DecimateConfig, DropDuplicatesConfig, FILTER_KINDS, FilterConfig,
    NamedConversion, NormalizeUnitsConfig, RateLimitConfig, ScalarValue, SchemaConfig, SchemaField,
    TagCondition, TagConfig, UnitConversion, ValueType,
};

/// Most filters in one chain.
pub const FILTERS_PER_CHAIN_MAX: usize = 32;
/// Largest payload parsed as JSON; larger ones are treated as not JSON (and fail `schema`).
pub const JSON_PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Most streams whose state one filter keeps; beyond it the least recently seen is forgotten.
pub const STREAMS_PER_FILTER_MAX: usize = 1024;
/// Longest stream name kept; longer values of the stream field are truncated.
pub const STREAM_NAME_BYTES_MAX: usize = 128;
/// Largest `drop_duplicates.window`.
pub const DUPLICATE_WINDOW_MAX: usize = 1024;
/// Most fields (deadband, schema) or conversions (normalize_units) in one filter.
pub const FIELDS_PER_FILTER_MAX: usize = 64;
/// Longest configured field name.
pub const FIELD_NAME_BYTES_MAX: usize = 128;
/// Most labels one tag filter adds.
pub const TAGS_PER_FILTER_MAX: usize = 32;
/// Longest label name and label value.
pub const TAG_BYTES_MAX: usize = 128;
/// Largest `rate_limit.max_per_second`.
pub const RATE_PER_SECOND_MAX: u32 = 1_000_000;
/// Most decimal places a unit conversion rounds to (10^15 still scales f64 exactly).
pub const DECIMALS_MAX: u32 = 15;
/// Largest `decimate.keep_every`.
pub const DECIMATE_KEEP_EVERY_MAX: u32 = 1_000_000;

const _: () = assert!(STREAM_NAME_BYTES_MAX <= JSON_PAYLOAD_BYTES_MAX);
const _: () = assert!(FIELD_NAME_BYTES_MAX <= JSON_PAYLOAD_BYTES_MAX);

/// A configuration the chain refuses; the message names the filter's index and key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FilterConfigError {
    #[error("filters: expected an array of tables, got {found}")]
    NotAList { found: &'static str },
    #[error("filters: {count} filters configured, at most {FILTERS_PER_CHAIN_MAX} allowed")]
    TooManyFilters { count: usize },
    #[error("filters[{index}]{}{key}: {expected}", if key.is_empty() { "" } else { "." })]
    Invalid { index: usize, key: String, expected: String },
}

/// Why a record was dropped; `as_str` is the metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    RateLimit,
    Decimate,
    Deadband,
    Duplicate,
    Schema,
    /// A unit conversion gave a value JSON cannot hold (infinite).
    Conversion,
}

impl DropReason {
    pub const COUNT: usize = 6;
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::RateLimit,
        DropReason::Decimate,
        DropReason::Deadband,
        DropReason::Duplicate,
        DropReason::Schema,
        DropReason::Conversion,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::RateLimit => "rate_limit",
            DropReason::Decimate => "decimate",
            DropReason::Deadband => "deadband",
            DropReason::Duplicate => "duplicate",
            DropReason::Schema => "schema",
            DropReason::Conversion => "conversion",
        }
    }

    /// Index into per-reason arrays of length `DropReason::COUNT`.
    pub fn index(self) -> usize {
        self as usize
    }
}

const _: () = {
    let mut index = 0;
    while index < DropReason::COUNT {
        assert!(DropReason::ALL[index] as usize == index);
        index += 1;
    }
};

/// What the chain decided for one record.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Keep(SourceRecord),
    Drop { reason: DropReason },
}

/// Counters the daemon renders (shared with the chain's thread; relaxed, monotonic).
#[derive(Debug, Default)]
pub struct FilterMetrics {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    /// Indexed by `DropReason::index`.
    pub dropped: [AtomicU64; DropReason::COUNT],
}

impl FilterMetrics {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> FilterCounts {
        FilterCounts {
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            dropped: DropReason::ALL.map(|reason| self.dropped(reason)),
        }
    }
}

/// A plain copy of `FilterMetrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterCounts {
    pub records_in: u64,
    pub records_out: u64,
    pub dropped: [u64; DropReason::COUNT],
}

impl FilterCounts {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

// The daemon moves a chain onto its filter-stage thread.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<FilterChain>();
};

/// A source's filters, applied in order.
#[derive(Debug)]
pub struct FilterChain {
    configs: Vec<FilterConfig>,
    filters: Vec<stages::Filter>,
    metrics: Arc<FilterMetrics>,
}

impl FilterChain {
    /// Validates and builds a chain; an empty configuration keeps every record unchanged.
    pub fn from_config(configs: &[FilterConfig]) -> Result<FilterChain, FilterConfigError> {
        Ok(FilterChain {
            configs: configs.to_vec(),
            filters: build(configs)?,
            metrics: Arc::new(FilterMetrics::default()),
        })
    }

    /// Replaces the configuration between two records. On error the old chain stays in force.
    /// A filter of the same kind at the same position keeps the state that still applies
    /// (deadband last values of fields still configured, the duplicate window, rate windows and
    /// decimation counters when the stream field is unchanged); counters are never reset.
    pub fn reconfigure(&mut self, configs: &[FilterConfig]) -> Result<(), FilterConfigError> {
        let mut filters = build(configs)?;
        let previous = std::mem::take(&mut self.filters);
        for (filter, old) in filters.iter_mut().zip(previous) {
            filter.adopt_state(old);
        }
        self.filters = filters;
        self.configs = configs.to_vec();
        Ok(())
    }

    /// Runs the record through every filter; stops at the first that drops it.
    pub fn apply(&mut self, record: SourceRecord) -> Verdict {
        self.metrics.records_in.fetch_add(1, Ordering::Relaxed);
        let mut working = Working::new(record);
        for filter in &mut self.filters {
            if let Err(reason) = filter.apply(&mut working) {
                self.metrics.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
                return Verdict::Drop { reason };
            }
        }
        self.metrics.records_out.fetch_add(1, Ordering::Relaxed);
        Verdict::Keep(working.into_record())
    }

    pub fn metrics(&self) -> Arc<FilterMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The configuration in force.
    pub fn config(&self) -> &[FilterConfig] {
        &self.configs
    }
}

fn build(configs: &[FilterConfig]) -> Result<Vec<stages::Filter>, FilterConfigError> {
    if configs.len() > FILTERS_PER_CHAIN_MAX {
        return Err(FilterConfigError::TooManyFilters { count: configs.len() });
    }
    configs.iter().enumerate().map(|(index, config)| stages::Filter::new(index, config)).collect()
}

/// Why a record's payload is not usable as a JSON object (kept for debugging; filters only
/// need to know that it is not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JsonProblem {
    NotJsonContentType,
    TooLarge,
    Invalid,
    NotAnObject,
}

enum Json {
    Unparsed,
    Object { object: Map<String, Value>, modified: bool },
    Unusable(JsonProblem),
}

/// A record on its way through the chain, with its payload parsed at most once.
struct Working {
    record: SourceRecord,
    json: Json,
}

impl Working {
    fn new(record: SourceRecord) -> Working {
        Working { record, json: Json::Unparsed }
    }

    fn parse(&mut self) {
        if let Json::Unparsed = self.json {
            self.json = match parse_object(&self.record) {
                Ok(object) => Json::Object { object, modified: false },
                Err(problem) => Json::Unusable(problem),
            };
        }
    }

    fn object(&mut self) -> Result<&Map<String, Value>, JsonProblem> {
        self.parse();
        match &self.json {
            Json::Object { object, .. } => Ok(object),
            Json::Unusable(problem) => Err(*problem),
            Json::Unparsed => unreachable!("parsed above"),
        }
    }

    /// The object for rewriting; the payload is re-serialized when the record leaves the chain.
    fn object_mut(&mut self) -> Result<&mut Map<String, Value>, JsonProblem> {
        self.parse();
        match &mut self.json {
            Json::Object { object, modified } => {
                *modified = true;
                Ok(object)
            }
            Json::Unusable(problem) => Err(*problem),
            Json::Unparsed => unreachable!("parsed above"),
        }
    }

    /// The current payload bytes, including rewrites by earlier filters.
    fn payload(&mut self) -> &[u8] {
        self.flush();
        &self.record.payload
    }

    fn flush(&mut self) {
        if let Json::Object { object, modified } = &mut self.json
            && *modified
        {
            self.record.payload = serde_json::to_vec(object).expect("a JSON map with string keys serializes");
            *modified = false;
        }
    }

    fn into_record(mut self) -> SourceRecord {
        self.flush();
        self.record
    }
}

fn parse_object(record: &SourceRecord) -> Result<Map<String, Value>, JsonProblem> {
    if !is_json_content_type(&record.content_type) {
        return Err(JsonProblem::NotJsonContentType);
    }
    if record.payload.len() > JSON_PAYLOAD_BYTES_MAX {
        return Err(JsonProblem::TooLarge);
    }
    match serde_json::from_slice::<Value>(&record.payload) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(JsonProblem::NotAnObject),
        Err(_) => Err(JsonProblem::Invalid),
    }
}

fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("text/json")
        || essence.len() > 5 && essence.as_bytes()[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
}
