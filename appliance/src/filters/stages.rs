//! The filters themselves: validation of one `FilterConfig` into a `Filter`, the per-record
//! decision, and which state survives a reconfiguration.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hasher};

use serde_json::Value;

use super::config::{
    DeadbandConfig, DecimateConfig, DropDuplicatesConfig, FilterConfig, NamedConversion,
    NormalizeUnitsConfig, RateLimitConfig, ScalarValue, SchemaConfig, SchemaField, TagConfig, ValueType,
};
use super::{
    DECIMALS_MAX, DECIMATE_KEEP_EVERY_MAX, DUPLICATE_WINDOW_MAX, DropReason, FIELD_NAME_BYTES_MAX,
    FIELDS_PER_FILTER_MAX, FilterConfigError, JSON_PAYLOAD_BYTES_MAX, RATE_PER_SECOND_MAX,
    STREAM_NAME_BYTES_MAX, STREAMS_PER_FILTER_MAX, TAG_BYTES_MAX, TAGS_PER_FILTER_MAX, Working,
};

const MICROSECONDS_PER_SECOND: u64 = 1_000_000;
const MICROSECONDS_PER_MILLISECOND: u64 = 1_000;

/// One validated filter with its state.
#[derive(Debug)]
pub(super) enum Filter {
    RateLimit(RateLimit),
    Decimate(Decimate),
    Deadband(Deadband),
    DropDuplicates(DropDuplicates),
    Schema(Schema),
    NormalizeUnits(NormalizeUnits),
    Tag(Tag),
}

impl Filter {
    pub(super) fn new(index: usize, config: &FilterConfig) -> Result<Filter, FilterConfigError> {
        let check = Check { index };
        Ok(match config {
            FilterConfig::RateLimit(config) => Filter::RateLimit(RateLimit::new(&check, config)?),
            FilterConfig::Decimate(config) => Filter::Decimate(Decimate::new(&check, config)?),
            FilterConfig::Deadband(config) => Filter::Deadband(Deadband::new(&check, config)?),
            FilterConfig::DropDuplicates(config) => {
                Filter::DropDuplicates(DropDuplicates::new(&check, config)?)
            }
            FilterConfig::Schema(config) => Filter::Schema(Schema::new(&check, config)?),
            FilterConfig::NormalizeUnits(config) => {
                Filter::NormalizeUnits(NormalizeUnits::new(&check, config)?)
            }
            FilterConfig::Tag(config) => Filter::Tag(Tag::new(&check, config)?),
        })
    }

    /// Keeps (`Ok`, possibly after rewriting) or drops the record.
    pub(super) fn apply(&mut self, working: &mut Working) -> Result<(), DropReason> {
        match self {
            Filter::RateLimit(filter) => filter.apply(working),
            Filter::Decimate(filter) => filter.apply(working),
            Filter::Deadband(filter) => filter.apply(working),
            Filter::DropDuplicates(filter) => filter.apply(working),
            Filter::Schema(filter) => filter.apply(working),
            Filter::NormalizeUnits(filter) => filter.apply(working),
            Filter::Tag(filter) => filter.apply(working),
        }
    }

    /// Takes over the state of the filter that held this position before a reconfiguration,
    /// where it still means the same thing; otherwise this filter starts fresh.
    pub(super) fn adopt_state(&mut self, previous: Filter) {
        match (self, previous) {
            (Filter::RateLimit(filter), Filter::RateLimit(previous)) => {
                filter.streams.adopt(previous.streams, |window| window);
            }
            (Filter::Decimate(filter), Filter::Decimate(previous)) => {
                let keep_every = filter.keep_every;
                filter.streams.adopt(previous.streams, |since_kept| since_kept % keep_every);
            }
            (Filter::Deadband(filter), Filter::Deadband(previous)) => filter.adopt(previous),
            (Filter::DropDuplicates(filter), Filter::DropDuplicates(previous)) => {
                filter.recent = previous.recent;
                while filter.recent.len() > filter.window {
                    filter.recent.pop_front();
                }
            }
            // Stateless filters, or a different kind at this position: nothing carries over.
            _ => {}
        }
    }
}

/// Validation helpers that name the filter's index and key in their errors.
struct Check {
    index: usize,
}

impl Check {
    fn fail(&self, key: impl Into<String>, expected: impl Into<String>) -> FilterConfigError {
        FilterConfigError::Invalid { index: self.index, key: key.into(), expected: expected.into() }
    }

    fn field_name(&self, key: &str, name: &str) -> Result<String, FilterConfigError> {
        if name.is_empty() || name.len() > FIELD_NAME_BYTES_MAX {
            return Err(self.fail(key, format!("expected a field name of 1..={FIELD_NAME_BYTES_MAX} bytes")));
        }
        Ok(name.to_owned())
    }

    fn range<T: PartialOrd + std::fmt::Display>(
        &self,
        key: &str,
        value: T,
        min: T,
        max: T,
    ) -> Result<T, FilterConfigError> {
        if value < min || value > max {
            return Err(self.fail(key, format!("expected {min}..={max}, got {value}")));
        }
        Ok(value)
    }

    fn count(&self, key: &str, count: usize, max: usize) -> Result<(), FilterConfigError> {
        if count == 0 || count > max {
            return Err(self.fail(key, format!("expected 1..={max} entries, got {count}")));
        }
        Ok(())
    }

    fn finite(&self, key: &str, value: f64) -> Result<f64, FilterConfigError> {
        if !value.is_finite() {
            return Err(self.fail(key, format!("expected a finite number, got {value}")));
        }
        Ok(value)
    }

    fn unique<'a>(
        &self,
        list_key: &str,
        names: impl Iterator<Item = &'a str>,
    ) -> Result<(), FilterConfigError> {
        let mut seen = std::collections::HashSet::new();
        for (position, name) in names.enumerate() {
            if !seen.insert(name) {
                return Err(
                    self.fail(format!("{list_key}[{position}].field"), format!("duplicate field \"{name}\""))
                );
            }
        }
        Ok(())
    }
}

/// Per-stream state, bounded by `STREAMS_PER_FILTER_MAX` (least recently seen forgotten first).
#[derive(Debug)]
struct Streams<S> {
    /// The JSON field naming the stream; `None`: the whole source is one stream.
    field: Option<String>,
    states: HashMap<String, Stream<S>>,
    /// Counts lookups; orders streams by recency deterministically.
    lookups: u64,
}

#[derive(Debug)]
struct Stream<S> {
    last_lookup: u64,
    state: S,
}

impl<S> Streams<S> {
    fn new(field: Option<String>) -> Streams<S> {
        Streams { field, states: HashMap::new(), lookups: 0 }
    }

    /// Streams by the optional `stream_field` key of a filter's config, checked.
    fn configured(check: &Check, stream_field: Option<&str>) -> Result<Streams<S>, FilterConfigError> {
        let field = stream_field.map(|name| check.field_name("stream_field", name)).transpose()?;
        Ok(Streams::new(field))
    }

    /// The stream a record belongs to: the value of the stream field, "" when there is none.
    fn name(&self, working: &mut Working) -> String {
        let Some(field) = &self.field else { return String::new() };
        let Ok(object) = working.object() else { return String::new() };
        let mut name = match object.get(field) {
            Some(Value::String(text)) => text.clone(),
            Some(value @ (Value::Number(_) | Value::Bool(_))) => value.to_string(),
            _ => return String::new(),
        };
        name.truncate(name.floor_char_boundary(STREAM_NAME_BYTES_MAX));
        name
    }

    fn get_or_insert(&mut self, name: String, make: impl FnOnce() -> S) -> &mut S {
        self.lookups += 1;
        if !self.states.contains_key(&name) && self.states.len() >= STREAMS_PER_FILTER_MAX {
            let oldest = self
                .states
                .iter()
                .min_by_key(|(_, stream)| stream.last_lookup)
                .map(|(name, _)| name.clone())
                .expect("the map is full, so not empty");
            self.states.remove(&oldest);
        }
        assert!(self.states.len() < STREAMS_PER_FILTER_MAX || self.states.contains_key(&name));
        let stream = self.states.entry(name).or_insert_with(|| Stream { last_lookup: 0, state: make() });
        stream.last_lookup = self.lookups;
        &mut stream.state
    }

    /// Takes the previous filter's streams when they are named by the same field.
    fn adopt(&mut self, previous: Streams<S>, mut convert: impl FnMut(S) -> S) {
        if self.field != previous.field {
            return;
        }
        self.lookups = previous.lookups;
        self.states = previous
            .states
            .into_iter()
            .map(|(name, stream)| {
                (name, Stream { last_lookup: stream.last_lookup, state: convert(stream.state) })
            })
            .collect();
    }
}

/// `rate_limit`: fixed one-second windows of record time. A record older than the stream's
/// current window (a source clock step back) counts against the current window, so going back
/// and forth cannot reopen windows.
#[derive(Debug)]
pub(super) struct RateLimit {
    max_per_second: u32,
    streams: Streams<RateWindow>,
}

#[derive(Debug)]
struct RateWindow {
    second: u64,
    kept: u32,
}

impl RateLimit {
    fn new(check: &Check, config: &RateLimitConfig) -> Result<RateLimit, FilterConfigError> {
        let max_per_second = check.range("max_per_second", config.max_per_second, 1, RATE_PER_SECOND_MAX)?;
        Ok(RateLimit { max_per_second, streams: Streams::configured(check, config.stream_field.as_deref())? })
    }

    fn apply(&mut self, working: &mut Working) -> Result<(), DropReason> {
        let second = working.record.timestamp_us / MICROSECONDS_PER_SECOND;
        let name = self.streams.name(working);
        let window = self.streams.get_or_insert(name, || RateWindow { second, kept: 0 });
        if second > window.second {
            *window = RateWindow { second, kept: 0 };
        }
        if window.kept >= self.max_per_second {
            return Err(DropReason::RateLimit);
        }
        window.kept += 1;
        Ok(())
    }
}

/// `decimate`: keeps a stream's first record, then every `keep_every`-th.
#[derive(Debug)]
pub(super) struct Decimate {
    keep_every: u32,
    /// Per stream: records seen since the last kept one, `0..keep_every`.
    streams: Streams<u32>,
}

impl Decimate {
    fn new(check: &Check, config: &DecimateConfig) -> Result<Decimate, FilterConfigError> {
        let keep_every = check.range("keep_every", config.keep_every, 1, DECIMATE_KEEP_EVERY_MAX)?;
        Ok(Decimate { keep_every, streams: Streams::configured(check, config.stream_field.as_deref())? })
    }

    fn apply(&mut self, working: &mut Working) -> Result<(), DropReason> {
        let name = self.streams.name(working);
        let since_kept = self.streams.get_or_insert(name, || 0);
        assert!(*since_kept < self.keep_every);
        let keep = *since_kept == 0;
        *since_kept = (*since_kept + 1) % self.keep_every;
        if keep { Ok(()) } else { Err(DropReason::Decimate) }
    }
}

/// `deadband`: compares each reading with the stream's last reading this filter passed.
#[derive(Debug)]
pub(super) struct Deadband {
    /// (field, threshold) pairs.
    fields: Vec<(String, f64)>,
    max_silence_us: Option<u64>,
    streams: Streams<DeadbandState>,
}

#[derive(Debug)]
struct DeadbandState {
    /// The last passed value of each field in `fields`, by position.
    values: Vec<Option<f64>>,
    passed_at_us: u64,
}

impl Deadband {
    fn new(check: &Check, config: &DeadbandConfig) -> Result<Deadband, FilterConfigError> {
        let both = "expected either `field` and `threshold`, or `fields`, not both";
        // (field, threshold, key prefix for errors: "" for the shorthand, "fields[i]." for the list)
        let mut fields = Vec::new();
        match (&config.field, config.threshold) {
            (Some(_), _) | (_, Some(_)) if !config.fields.is_empty() => {
                return Err(check.fail("fields", both));
            }
            (Some(field), Some(threshold)) => fields.push((field.as_str(), threshold, String::new())),
            (Some(_), None) => return Err(check.fail("threshold", "missing; `field` needs a `threshold`")),
            (None, Some(_)) => return Err(check.fail("field", "missing; `threshold` needs a `field`")),
            (None, None) => {
                if config.fields.is_empty() {
                    return Err(
                        check.fail("fields", "missing; expected `field` and `threshold`, or `fields`")
                    );
                }
                check.count("fields", config.fields.len(), FIELDS_PER_FILTER_MAX)?;
                check.unique("fields", config.fields.iter().map(|entry| entry.field.as_str()))?;
                for (position, entry) in config.fields.iter().enumerate() {
                    fields.push((entry.field.as_str(), entry.threshold, format!("fields[{position}].")));
                }
            }
        }
        let fields = fields
            .into_iter()
            .map(|(field, threshold, prefix)| {
                let field = check.field_name(&format!("{prefix}field"), field)?;
                if !(threshold.is_finite() && threshold >= 0.0) {
                    return Err(check.fail(
                        format!("{prefix}threshold"),
                        format!("expected a non-negative number, got {threshold}"),
                    ));
                }
                Ok((field, threshold))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stream_field = check.field_name("stream_field", &config.stream_field)?;
        let max_silence_us = match config.max_silence_ms {
            None => None,
            Some(0) => return Err(check.fail("max_silence_ms", "expected at least 1, got 0")),
            Some(milliseconds) => Some(milliseconds.saturating_mul(MICROSECONDS_PER_MILLISECOND)),
        };
        Ok(Deadband { fields, max_silence_us, streams: Streams::new(Some(stream_field)) })
    }

    fn apply(&mut self, working: &mut Working) -> Result<(), DropReason> {
        let name = self.streams.name(working);
        let timestamp_us = working.record.timestamp_us;
        let Ok(object) = working.object() else {
            return Ok(()); // Not a JSON reading: nothing to compare.
        };
        let values: Vec<Option<f64>> =
            self.fields.iter().map(|(field, _)| object.get(field).and_then(Value::as_f64)).collect();
        let field_count = self.fields.len();
        let state = self.streams.get_or_insert(name, || DeadbandState {
            values: vec![None; field_count],
            passed_at_us: timestamp_us,
        });
        let insignificant = values.iter().zip(&state.values).zip(&self.fields).all(|((value, last), (_, threshold))| {
            matches!((value, last), (Some(value), Some(last)) if (value - last).abs() < *threshold)
        });
        let silent_too_long = self
            .max_silence_us
            .is_some_and(|silence_us| timestamp_us.saturating_sub(state.passed_at_us) >= silence_us);
        if insignificant && !silent_too_long {
            return Err(DropReason::Deadband);
        }
        for (last, value) in state.values.iter_mut().zip(values) {
            if value.is_some() {
                *last = value;
            }
        }
        state.passed_at_us = timestamp_us;
        Ok(())
    }

    /// Keeps last values of the fields still configured (matched by name).
    fn adopt(&mut self, previous: Deadband) {
        let positions: Vec<Option<usize>> = self
            .fields
            .iter()
            .map(|(field, _)| previous.fields.iter().position(|(previous_field, _)| previous_field == field))
            .collect();
        self.streams.adopt(previous.streams, |state| DeadbandState {
            values: positions
                .iter()
                .map(|position| position.and_then(|position| state.values[position]))
                .collect(),
            passed_at_us: state.passed_at_us,
        });
    }
}

/// `drop_duplicates`: the hashes of the last `window` payloads this filter passed.
#[derive(Debug)]
pub(super) struct DropDuplicates {
    window: usize,
    recent: VecDeque<Fingerprint>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    payload_bytes: usize,
    hash: u64,
}

impl Fingerprint {
    fn of(payload: &[u8]) -> Fingerprint {
        // SipHash with fixed keys: deterministic within a process, which is as long as the
        // window lives.
        let mut hasher = DefaultHasher::new();
        hasher.write(payload);
        Fingerprint { payload_bytes: payload.len(), hash: hasher.finish() }
    }
}

impl DropDuplicates {
    fn new(check: &Check, config: &DropDuplicatesConfig) -> Result<DropDuplicates, FilterConfigError> {
        let window = check.range("window", config.window, 1, DUPLICATE_WINDOW_MAX)?;
        Ok(DropDuplicates { window, recent: VecDeque::with_capacity(window) })
    }

    fn apply(&mut self, working: &mut Working) -> Result<(), DropReason> {
        let fingerprint = Fingerprint::of(working.payload());
        if self.recent.contains(&fingerprint) {
            return Err(DropReason::Duplicate);
        }
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent.push_back(fingerprint);
        assert!(self.recent.len() <= self.window);
        Ok(())
    }
}

/// `schema`: a JSON object with the configured fields. `null` counts as absent.
#[derive(Debug)]
pub(super) struct Schema {
    fields: Vec<SchemaField>,
    payload_bytes_max: usize,
}

impl Schema {
    fn new(check: &Check, config: &SchemaConfig) -> Result<Schema, FilterConfigError> {
        check.count("fields", config.fields.len(), FIELDS_PER_FILTER_MAX)?;
        check.unique("fields", config.fields.iter().map(|entry| entry.field.as_str()))?;
        for (position, entry) in config.fields.iter().enumerate() {
            check.field_name(&format!("fields[{position}].field"), &entry.field)?;
            for (name, bound) in [("min", entry.min), ("max", entry.max)] {
                let key = format!("fields[{position}].{name}");
                let Some(bound) = bound else { continue };
                if entry.value_type != ValueType::Number {
                    return Err(check.fail(key, "expected only with type = \"number\""));
                }
                check.finite(&key, bound)?;
            }
            if let (Some(min), Some(max)) = (entry.min, entry.max)
                && min > max
            {
                return Err(check.fail(
                    format!("fields[{position}].max"),
                    format!("expected at least min ({min}), got {max}"),
                ));
            }
        }
        let payload_bytes_max = match config.payload_bytes_max {
            None => JSON_PAYLOAD_BYTES_MAX,
            Some(bytes) => check.range("payload_bytes_max", bytes, 1, JSON_PAYLOAD_BYTES_MAX)?,
        };
        Ok(Schema { fields: config.fields.clone(), payload_bytes_max })
    }

    fn apply(&mut self, working: &mut Working) -> Result<(), DropReason> {
        if working.record.payload.len() > self.payload_bytes_max {
            return Err(DropReason::Schema);
        }
        let object = working.object().map_err(|_| DropReason::Schema)?;
        let valid = self.fields.iter().all(|field| match object.get(&field.field) {
            None | Some(Value::Null) => !field.required,
            Some(value) => match (field.value_type, value) {
                (ValueType::Number, Value::Number(number)) => number.as_f64().is_some_and(|number| {
                    field.min.is_none_or(|min| number >= min) && field.max.is_none_or(|max| number <= max)
                }),
                (ValueType::String, Value::String(_)) | (ValueType::Bool, Value::Bool(_)) => true,
                _ => false,
            },
        });
        if valid { Ok(()) } else { Err(DropReason::Schema) }
    }
}

/// `normalize_units`: rewrites numeric fields; a field that is absent or not a number is left
/// alone (a `schema` filter in front is the place to require it).
#[derive(Debug)]
pub(super) struct NormalizeUnits {
    conversions: Vec<Conversion>,
}

#[derive(Debug)]
struct Conversion {
    field: String,
    to: String,
    formula: Formula,
    /// Rounding factor 10^decimals.
    rounding: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
enum Formula {
    Named(NamedConversion),
    Linear { scale: f64, offset: f64 },
}

impl NormalizeUnits {
    fn new(check: &Check, config: &NormalizeUnitsConfig) -> Result<NormalizeUnits, FilterConfigError> {
        check.count("conversions", config.conversions.len(), FIELDS_PER_FILTER_MAX)?;
        let conversions = config
            .conversions
            .iter()
            .enumerate()
            .map(|(position, entry)| {
                let key = |name: &str| format!("conversions[{position}].{name}");
                let field = check.field_name(&key("field"), &entry.field)?;
                let to = match &entry.to {
                    Some(to) => check.field_name(&key("to"), to)?,
                    None => field.clone(),
                };
                let formula = match (entry.conversion, entry.scale, entry.offset) {
                    (Some(named), None, None) => Formula::Named(named),
                    (Some(_), _, _) => {
                        let extra = if entry.scale.is_some() { "scale" } else { "offset" };
                        return Err(check
                            .fail(key(extra), "expected either `conversion` or `scale`/`offset`, not both"));
                    }
                    (None, None, None) => {
                        return Err(check
                            .fail(key("conversion"), "missing; expected `conversion` or `scale`/`offset`"));
                    }
                    (None, scale, offset) => Formula::Linear {
                        scale: check.finite(&key("scale"), scale.unwrap_or(1.0))?,
                        offset: check.finite(&key("offset"), offset.unwrap_or(0.0))?,
                    },
                };
                let rounding = match entry.decimals {
                    None => None,
                    Some(decimals) => {
                        Some(10f64.powi(check.range(&key("decimals"), decimals, 0, DECIMALS_MAX)? as i32))
                    }
                };
                Ok(Conversion { field, to, formula, rounding })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NormalizeUnits { conversions })
    }

    fn apply(&mut self, working: &mut Working) -> Result<(), DropReason> {
        for conversion in &self.conversions {
            let Ok(object) = working.object() else {
                return Ok(()); // Not a JSON reading: nothing to convert.
            };
            let Some(value) = object.get(&conversion.field).and_then(Value::as_f64) else { continue };
            let converted = match conversion.formula {
                Formula::Named(named) => named.apply(value),
                Formula::Linear { scale, offset } => value * scale + offset,
            };
            let converted = match conversion.rounding {
                // Scaling a huge value may overflow to infinity, which the check below drops.
                Some(factor) => (converted * factor).round() / factor,
                None => converted,
            };
            let number = serde_json::Number::from_f64(converted).ok_or(DropReason::Conversion)?;
            let object = working.object_mut().expect("parsed as an object above");
            object.remove(&conversion.field);
            object.insert(conversion.to.clone(), Value::Number(number));
        }
        Ok(())
    }
}

/// `tag`: adds labels, optionally only to readings whose field equals a value.
#[derive(Debug)]
pub(super) struct Tag {
    tags: Vec<(String, String)>,
    when: Option<(String, ScalarValue)>,
}

impl Tag {
    fn new(check: &Check, config: &TagConfig) -> Result<Tag, FilterConfigError> {
        check.count("tags", config.tags.len(), TAGS_PER_FILTER_MAX)?;
        let label = |text: &str| {
            !text.is_empty() && text.len() <= TAG_BYTES_MAX && !text.chars().any(char::is_control)
        };
        for (name, value) in &config.tags {
            if !label(name) || !label(value) {
                return Err(check.fail(
                    format!("tags.{}", name.escape_debug()),
                    format!(
                        "expected a name and a value of 1..={TAG_BYTES_MAX} bytes without control characters"
                    ),
                ));
            }
        }
        let when = match &config.when {
            None => None,
            Some(condition) => {
                let field = check.field_name("when.field", &condition.field)?;
                if let ScalarValue::Number(number) = condition.equals {
                    check.finite("when.equals", number)?;
                }
                Some((field, condition.equals.clone()))
            }
        };
        let tags = config.tags.iter().map(|(name, value)| (name.clone(), value.clone())).collect();
        Ok(Tag { tags, when })
    }

    fn apply(&mut self, working: &mut Working) -> Result<(), DropReason> {
        if let Some((field, expected)) = &self.when {
            let matches = working.object().ok().and_then(|object| object.get(field)).is_some_and(|value| {
                match (expected, value) {
                    (ScalarValue::Bool(expected), Value::Bool(value)) => expected == value,
                    (ScalarValue::Number(expected), Value::Number(value)) => {
                        value.as_f64() == Some(*expected)
                    }
                    (ScalarValue::String(expected), Value::String(value)) => expected == value,
                    _ => false,
                }
            });
            if !matches {
                return Ok(());
            }
        }
        for (name, value) in &self.tags {
            working.record.tags.insert(name.clone(), value.clone());
        }
        Ok(())
    }
}
