//! What an operator writes: one `[[sources.<name>.filters]]` table per filter, applied in order.
//!
//! Every filter is a TOML table whose `kind` names it; unknown keys are rejected. Validation
//! (ranges, limits, combinations serde cannot express) happens in `FilterChain::from_config` and
//! names the filter's index and the key, e.g. `filters[2].threshold: expected a non-negative
//! number, got -1`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::FilterConfigError;

/// One filter of a source's chain.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterConfig {
    /// Keeps at most `max_per_second` records per second of record time (`timestamp_us`).
    RateLimit(RateLimitConfig),
    /// Keeps the first record and then every `keep_every`-th.
    Decimate(DecimateConfig),
    /// Drops a reading when every configured field changed less than its threshold since the
    /// last kept reading of the same stream.
    Deadband(DeadbandConfig),
    /// Drops a record whose payload equals one of the last `window` kept payloads.
    DropDuplicates(DropDuplicatesConfig),
    /// Drops a JSON reading that lacks a required field, has the wrong type or is out of range.
    Schema(SchemaConfig),
    /// Converts numeric JSON fields between units and renames them.
    NormalizeUnits(NormalizeUnitsConfig),
    /// Adds labels to `SourceRecord::tags`, optionally only when a field has a value.
    Tag(TagConfig),
}

/// The kinds in the order of `FilterConfig`'s variants, as written in `kind = "..."`.
pub const FILTER_KINDS: [&str; 7] =
    ["rate_limit", "decimate", "deadband", "drop_duplicates", "schema", "normalize_units", "tag"];

impl FilterConfig {
    /// The `kind` as written in the configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            FilterConfig::RateLimit(_) => FILTER_KINDS[0],
            FilterConfig::Decimate(_) => FILTER_KINDS[1],
            FilterConfig::Deadband(_) => FILTER_KINDS[2],
            FilterConfig::DropDuplicates(_) => FILTER_KINDS[3],
            FilterConfig::Schema(_) => FILTER_KINDS[4],
            FilterConfig::NormalizeUnits(_) => FILTER_KINDS[5],
            FilterConfig::Tag(_) => FILTER_KINDS[6],
        }
    }

    /// Parses a TOML array of filter tables (the value of `sources.<name>.filters`) one table at
    /// a time, so that every error names the filter's index and, where serde reports it, the key:
    /// `filters[1].threshold: invalid type: string "x", expected f64`.
    ///
    /// Deserializing `Vec<FilterConfig>` directly also works (the daemon's config struct does),
    /// but serde's internally tagged enums lose the key of a wrongly typed value.
    pub fn list_from_toml(filters: &toml::Value) -> Result<Vec<FilterConfig>, FilterConfigError> {
        let toml::Value::Array(tables) = filters else {
            return Err(FilterConfigError::NotAList { found: filters.type_str() });
        };
        if tables.len() > super::FILTERS_PER_CHAIN_MAX {
            return Err(FilterConfigError::TooManyFilters { count: tables.len() });
        }
        tables.iter().enumerate().map(|(index, table)| FilterConfig::from_toml(index, table)).collect()
    }

    fn from_toml(index: usize, table: &toml::Value) -> Result<FilterConfig, FilterConfigError> {
        let invalid =
            |key: &str, expected: String| FilterConfigError::Invalid { index, key: key.to_owned(), expected };
        let toml::Value::Table(table) = table else {
            return Err(invalid("", format!("expected a table, got {}", table.type_str())));
        };
        let kinds = FILTER_KINDS.join(", ");
        let kind = match table.get("kind") {
            None => return Err(invalid("kind", format!("missing; expected one of {kinds}"))),
            Some(toml::Value::String(kind)) => kind.as_str(),
            Some(other) => {
                return Err(invalid("kind", format!("expected a string, got {}", other.type_str())));
            }
        };
        let mut rest = table.clone();
        rest.remove("kind");
        let rest = toml::Value::Table(rest);
        let parsed = match kind {
            "rate_limit" => parse(index, rest).map(FilterConfig::RateLimit),
            "decimate" => parse(index, rest).map(FilterConfig::Decimate),
            "deadband" => parse(index, rest).map(FilterConfig::Deadband),
            "drop_duplicates" => parse(index, rest).map(FilterConfig::DropDuplicates),
            "schema" => parse(index, rest).map(FilterConfig::Schema),
            "normalize_units" => parse(index, rest).map(FilterConfig::NormalizeUnits),
            "tag" => parse(index, rest).map(FilterConfig::Tag),
            unknown => {
                return Err(invalid("kind", format!("unknown kind \"{unknown}\"; expected one of {kinds}")));
            }
        }?;
        assert_eq!(parsed.kind(), kind);
        Ok(parsed)
    }
}

/// Deserializes one filter's table and turns toml's error into one that names the key.
fn parse<T: serde::de::DeserializeOwned>(index: usize, table: toml::Value) -> Result<T, FilterConfigError> {
    table.try_into().map_err(|error: toml::de::Error| {
        // toml records the key path of a wrongly typed value only in its Display ("in `a.b`");
        // unknown and missing fields name the key in the message itself.
        let rendered = error.to_string();
        let message = error.message().trim_end().to_owned();
        let from_path = rendered.lines().rev().find_map(|line| line.strip_prefix("in `")?.strip_suffix('`'));
        let from_message = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|prefix| message.strip_prefix(prefix)?.split('`').next());
        let key = from_path.or(from_message).unwrap_or("").to_owned();
        FilterConfigError::Invalid { index, key, expected: message }
    })
}

/// `kind = "rate_limit"`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Records kept per second of record time, 1..=`RATE_PER_SECOND_MAX`.
    pub max_per_second: u32,
    /// A JSON field whose value names the stream (e.g. "sensor") to limit each stream on its
    /// own; absent: the whole source is one stream.
    #[serde(default)]
    pub stream_field: Option<String>,
}

/// `kind = "decimate"`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecimateConfig {
    /// Keep one record out of this many, 1..=`DECIMATE_KEEP_EVERY_MAX` (1 keeps everything).
    pub keep_every: u32,
    /// As for `rate_limit`: absent means the whole source is one stream.
    #[serde(default)]
    pub stream_field: Option<String>,
}

/// `kind = "deadband"`: either `field` + `threshold` for one field, or `fields = [...]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadbandConfig {
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default)]
    pub fields: Vec<DeadbandField>,
    /// The JSON field naming the stream; readings without it share one stream. Default "sensor".
    #[serde(default = "default_stream_field")]
    pub stream_field: String,
    /// Keep a reading anyway when the stream's last kept reading is at least this old (record
    /// time), so a flat signal still reports; absent: no such heartbeat.
    #[serde(default)]
    pub max_silence_ms: Option<u64>,
}

fn default_stream_field() -> String {
    "sensor".to_owned()
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadbandField {
    pub field: String,
    /// A change strictly smaller than this (absolute, in the field's unit) is not significant.
    pub threshold: f64,
}

/// `kind = "drop_duplicates"`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DropDuplicatesConfig {
    /// How many recent kept payload hashes to compare against, 1..=`DUPLICATE_WINDOW_MAX`.
    pub window: usize,
}

/// `kind = "schema"`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    pub fields: Vec<SchemaField>,
    /// Larger payloads are dropped unparsed; at most (and by default) `JSON_PAYLOAD_BYTES_MAX`.
    #[serde(default)]
    pub payload_bytes_max: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaField {
    pub field: String,
    #[serde(rename = "type")]
    pub value_type: ValueType,
    /// Default true; an optional field is checked only when present.
    #[serde(default = "default_true")]
    pub required: bool,
    /// Inclusive bounds, only for `type = "number"`.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Number,
    String,
    Bool,
}

/// `kind = "normalize_units"`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeUnitsConfig {
    pub conversions: Vec<UnitConversion>,
}

/// Either a named `conversion` or the generic `value * scale + offset` (scale defaults to 1,
/// offset to 0), never both.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnitConversion {
    pub field: String,
    /// The field to write the converted value to (the source field is removed); absent: in place.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub conversion: Option<NamedConversion>,
    #[serde(default)]
    pub scale: Option<f64>,
    #[serde(default)]
    pub offset: Option<f64>,
    /// Round the result to this many decimal places, 0..=`DECIMALS_MAX`; absent: no rounding
    /// (3300 mV * 0.001 is then written as 3.3000000000000003).
    #[serde(default)]
    pub decimals: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NamedConversion {
    FahrenheitToCelsius,
    CelsiusToFahrenheit,
    KelvinToCelsius,
    CelsiusToKelvin,
    PascalToHectopascal,
    HectopascalToPascal,
}

impl NamedConversion {
    pub fn apply(self, value: f64) -> f64 {
        // Written as the textbook formulas rather than one scale and offset, so that exact
        // inputs (212 °F) give exact outputs (100 °C).
        match self {
            NamedConversion::FahrenheitToCelsius => (value - 32.0) * 5.0 / 9.0,
            NamedConversion::CelsiusToFahrenheit => value * 9.0 / 5.0 + 32.0,
            NamedConversion::KelvinToCelsius => value - 273.15,
            NamedConversion::CelsiusToKelvin => value + 273.15,
            NamedConversion::PascalToHectopascal => value / 100.0,
            NamedConversion::HectopascalToPascal => value * 100.0,
        }
    }
}

/// `kind = "tag"`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TagConfig {
    /// Labels to add (an existing label of the same name is overwritten).
    pub tags: BTreeMap<String, String>,
    /// Absent: tag every record.
    #[serde(default)]
    pub when: Option<TagCondition>,
}

/// Matches a JSON reading whose top-level `field` equals `equals` (numbers compare as f64).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TagCondition {
    pub field: String,
    pub equals: ScalarValue,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged, expecting = "expected a string, a number or a boolean")]
pub enum ScalarValue {
    Bool(bool),
    Number(f64),
    String(String),
}
