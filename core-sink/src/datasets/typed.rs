//! Typed columns of the sensor dataset: the fields of a record whose payload is a JSON object,
//! each as a nullable Parquet column of its own (`double`, `int64`, `bool`, `string`), beside the
//! raw `payload` column, which always stays.
//!
//! Rules (also in docs/operations.md, "Typed sensor columns"):
//!
//! - A shard's columns are fixed when its first row group is written: the declared columns
//!   (`[datasets.sensor.schema]`), then the dataset's columns from the manifest (every column an
//!   earlier shard had or saw), then fields first seen in the shard's own first row group, in
//!   name order. Inference reads only the shard's own records, so a shard re-derived from the raw
//!   landing after a crash gets the same columns and the same values whatever happened before.
//! - A field first seen after that is a *late* field: its value stays in `payload` for this
//!   shard, the manifest records it, and it becomes a nullable column from the next shard on.
//! - An inferred type: integers only (within int64) → `int64`; integers and fractions →
//!   `double`; `true`/`false` → `bool`; text → `string`; a field with values of several other
//!   kinds takes the kind seen first (the others are conflicts). Nulls say nothing.
//! - A value that does not fit its column's type (text in a `double` column, a fraction in an
//!   `int64` column, an integer above 2^53 in a `double` column, an object) is a *type conflict*:
//!   the typed cell is null, the raw JSON stays in `payload`, the conflict is counted
//!   (`tributary_datasets_type_conflicts_total`) and listed in the manifest. Nothing is coerced,
//!   except an integer of at most 2^53 in a `double` column, which a double holds exactly.
//! - Nested objects and arrays get no column (they stay in `payload`); nor do fields whose name
//!   is not `[A-Za-z_][A-Za-z0-9_]*` of at most `COLUMN_NAME_BYTES_MAX` bytes, or is one of the
//!   fixed columns or the partition column `date`. At most `TYPED_COLUMNS_MAX` typed columns.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most typed columns a shard (and the dataset) gets; later fields stay in `payload` only.
pub const TYPED_COLUMNS_MAX: usize = 256;
/// Longest column name.
pub const COLUMN_NAME_BYTES_MAX: usize = 64;
/// Fields of one payload looked at; the rest stay in `payload` only.
pub const FIELDS_PER_RECORD_MAX: usize = 1024;
/// Type conflicts a manifest lists by place; the rest are only counted.
pub const CONFLICTS_LISTED_MAX: usize = 1024;
/// Largest integer a double holds exactly (2^53).
const DOUBLE_EXACT_INTEGER_MAX: i64 = 1 << 53;
/// Names typed columns cannot take: the fixed columns, and `date`, the partition column readers
/// add from the directory names.
const RESERVED_NAMES: [&str; 9] =
    ["device", "lane", "seq", "index", "key", "timestamp_us", "content_type", "payload", "date"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Double,
    Int64,
    Bool,
    String,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Double => "double",
            ColumnType::Int64 => "int64",
            ColumnType::Bool => "bool",
            ColumnType::String => "string",
        }
    }

    /// The Parquet message-type declaration of an optional column of this type.
    pub fn parquet_declaration(self, name: &str) -> String {
        match self {
            ColumnType::Double => format!("optional double {name};"),
            ColumnType::Int64 => format!("optional int64 {name};"),
            ColumnType::Bool => format!("optional boolean {name};"),
            ColumnType::String => format!("optional binary {name} (STRING);"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypedColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub column_type: ColumnType,
}

/// A value that did not fit its column: where it is and what it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeConflict {
    pub device: String,
    pub seq: u64,
    pub index: u32,
    pub column: String,
    pub expected: ColumnType,
    /// The JSON kind found: `double`, `int64`, `bool`, `string`, `object`, `array`, `big integer`.
    pub found: String,
}

/// One field value of a JSON payload, as far as typed columns care.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    /// A value no column type holds: `object`, `array`, or `big integer` (beyond int64).
    Other(&'static str),
}

/// A typed cell ready for its column.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Double(f64),
    Int64(i64),
    Bool(bool),
    Text(String),
}

impl FieldValue {
    /// The JSON kind, named like the column type that would hold it.
    pub fn kind(&self) -> &'static str {
        match self {
            FieldValue::Null => "null",
            FieldValue::Bool(_) => "bool",
            FieldValue::Int(_) => "int64",
            FieldValue::Float(_) => "double",
            FieldValue::Text(_) => "string",
            FieldValue::Other(kind) => kind,
        }
    }

    /// The column type a value of this kind infers, if any.
    fn inferred_type(&self) -> Option<ColumnType> {
        match self {
            FieldValue::Bool(_) => Some(ColumnType::Bool),
            FieldValue::Int(_) => Some(ColumnType::Int64),
            FieldValue::Float(_) => Some(ColumnType::Double),
            FieldValue::Text(_) => Some(ColumnType::String),
            FieldValue::Null | FieldValue::Other(_) => None,
        }
    }

    /// The cell this value makes in a column of `column_type`: `Ok(None)` for a null,
    /// `Err(())` for a type conflict.
    pub fn cell(&self, column_type: ColumnType) -> Result<Option<Cell>, ()> {
        match (self, column_type) {
            (FieldValue::Null, _) => Ok(None),
            (FieldValue::Float(value), ColumnType::Double) => Ok(Some(Cell::Double(*value))),
            // Exact in a double: no information lost, so not a conflict.
            (FieldValue::Int(value), ColumnType::Double)
                if value.unsigned_abs() <= DOUBLE_EXACT_INTEGER_MAX as u64 =>
            {
                Ok(Some(Cell::Double(*value as f64)))
            }
            (FieldValue::Int(value), ColumnType::Int64) => Ok(Some(Cell::Int64(*value))),
            (FieldValue::Bool(value), ColumnType::Bool) => Ok(Some(Cell::Bool(*value))),
            (FieldValue::Text(value), ColumnType::String) => Ok(Some(Cell::Text(value.clone()))),
            _ => Err(()),
        }
    }

    /// Rough memory held, for the writer's buffered-bytes bound.
    pub fn bytes(&self) -> u64 {
        let text = if let FieldValue::Text(text) = self { text.len() } else { 0 };
        (std::mem::size_of::<FieldValue>() + text) as u64
    }
}

/// Whether a JSON field may become a typed column of this name.
pub fn valid_column_name(name: &str) -> bool {
    let mut characters = name.chars();
    let Some(first) = characters.next() else { return false };
    name.len() <= COLUMN_NAME_BYTES_MAX
        && (first.is_ascii_alphabetic() || first == '_')
        && characters.all(|character| character.is_ascii_alphanumeric() || character == '_')
        && !RESERVED_NAMES.contains(&name)
}

/// The fields of a payload that is a JSON object and may become columns, in name order; nothing
/// for any other payload (bytes are from a device: anything that does not parse is just not
/// typed). At most `FIELDS_PER_RECORD_MAX`. A name given twice keeps its last value (as a JSON
/// object map does).
///
/// Parsed in one pass without building a `serde_json::Value` tree: nested objects and arrays are
/// skipped (they only need their kind), and only names that can be columns are copied. This is
/// the series writer's per-row cost (`tributary bench sink`, "parquet series").
pub fn payload_fields(payload: &[u8]) -> Vec<(Cow<'_, str>, FieldValue)> {
    let first = payload.iter().find(|byte| !byte.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Vec::new();
    }
    // Skipped nested strings are not checked for UTF-8 by the parser; the whole payload is.
    if std::str::from_utf8(payload).is_err() {
        return Vec::new();
    }
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let Ok(PayloadFields(mut fields)) = PayloadFields::deserialize(&mut deserializer) else {
        return Vec::new();
    };
    if deserializer.end().is_err() {
        return Vec::new();
    }
    // Stable, so among equal names the last one given stays last.
    fields.sort_by(|(left, _), (right, _)| left.cmp(right));
    let mut unique: Vec<(Cow<'_, str>, FieldValue)> =
        Vec::with_capacity(fields.len().min(FIELDS_PER_RECORD_MAX));
    for (name, value) in fields {
        if unique.last().is_some_and(|(last, _)| *last == name) {
            unique.last_mut().expect("checked above").1 = value;
        } else if unique.len() == FIELDS_PER_RECORD_MAX {
            break;
        } else {
            unique.push((name, value));
        }
    }
    unique
}

/// A JSON object's fields whose names can be columns, in document order.
struct PayloadFields<'de>(Vec<(Cow<'de, str>, FieldValue)>);

impl<'de> Deserialize<'de> for PayloadFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> serde::de::Visitor<'de> for ObjectVisitor {
            type Value = PayloadFields<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PayloadFields<'de>, A::Error> {
                let mut fields = Vec::new();
                while let Some(FieldName(name)) = map.next_key()? {
                    let value: FieldValue = map.next_value()?;
                    if valid_column_name(&name) {
                        fields.push((name, value));
                    }
                }
                Ok(PayloadFields(fields))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// An object member's name, borrowed from the payload unless it holds escapes.
struct FieldName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> serde::de::Visitor<'de> for NameVisitor {
            type Value = FieldName<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a member name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, name: &'de str) -> Result<FieldName<'de>, E> {
                Ok(FieldName(Cow::Borrowed(name)))
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<FieldName<'de>, E> {
                Ok(FieldName(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

impl<'de> Deserialize<'de> for FieldValue {
    /// The value's kind and, for scalars, the value; nested objects and arrays are read past.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> serde::de::Visitor<'de> for ValueVisitor {
            type Value = FieldValue;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<FieldValue, E> {
                Ok(FieldValue::Null)
            }
            fn visit_bool<E>(self, value: bool) -> Result<FieldValue, E> {
                Ok(FieldValue::Bool(value))
            }
            fn visit_i64<E>(self, value: i64) -> Result<FieldValue, E> {
                Ok(FieldValue::Int(value))
            }
            fn visit_u64<E>(self, value: u64) -> Result<FieldValue, E> {
                Ok(i64::try_from(value).map_or(FieldValue::Other("big integer"), FieldValue::Int))
            }
            fn visit_f64<E>(self, value: f64) -> Result<FieldValue, E> {
                Ok(FieldValue::Float(value))
            }
            fn visit_str<E>(self, value: &str) -> Result<FieldValue, E> {
                Ok(FieldValue::Text(value.to_owned()))
            }
            fn visit_string<E>(self, value: String) -> Result<FieldValue, E> {
                Ok(FieldValue::Text(value))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<FieldValue, A::Error> {
                while items.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(FieldValue::Other("array"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut members: A) -> Result<FieldValue, A::Error> {
                while members.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(FieldValue::Other("object"))
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

/// Infers column types from fields seen in order: integers only → int64, integers and
/// fractions → double, otherwise the first kind seen. Deterministic in the order given.
#[derive(Default)]
pub struct Inference {
    seen: BTreeMap<String, InferredKinds>,
}

#[derive(Clone, Copy)]
struct InferredKinds {
    first: ColumnType,
    integers: bool,
    fractions: bool,
}

impl Inference {
    pub fn observe(&mut self, name: &str, value: &FieldValue) {
        let Some(column_type) = value.inferred_type() else { return };
        if !self.seen.contains_key(name) {
            if self.seen.len() >= FIELDS_PER_RECORD_MAX {
                return;
            }
            // Copies the name once per new field, not once per row.
            let first = InferredKinds { first: column_type, integers: false, fractions: false };
            self.seen.insert(name.to_owned(), first);
        }
        let kinds = self.seen.get_mut(name).expect("inserted above");
        kinds.integers |= column_type == ColumnType::Int64;
        kinds.fractions |= column_type == ColumnType::Double;
    }

    /// The inferred columns, in name order.
    pub fn columns(&self) -> Vec<TypedColumn> {
        self.seen
            .iter()
            .map(|(name, kinds)| {
                let numeric = matches!(kinds.first, ColumnType::Int64 | ColumnType::Double);
                let column_type = if numeric && kinds.fractions { ColumnType::Double } else { kinds.first };
                TypedColumn { name: name.clone(), column_type }
            })
            .collect()
    }
}

/// `base` followed by the columns of `more` whose names it lacks, at most `TYPED_COLUMNS_MAX`.
pub fn merge_columns(base: &[TypedColumn], more: &[TypedColumn]) -> Vec<TypedColumn> {
    let mut merged = base.to_vec();
    merged.truncate(TYPED_COLUMNS_MAX);
    for column in more {
        if merged.len() >= TYPED_COLUMNS_MAX {
            break;
        }
        if !merged.iter().any(|existing| existing.name == column.name) {
            merged.push(column.clone());
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The straightforward definition `payload_fields` must agree with: a full `Value` parse.
    fn full_parse(payload: &[u8]) -> Vec<(String, FieldValue)> {
        fn from_json(value: serde_json::Value) -> FieldValue {
            use serde_json::Value;
            match value {
                Value::Null => FieldValue::Null,
                Value::Bool(value) => FieldValue::Bool(value),
                Value::Number(number) => match number.as_i64() {
                    Some(integer) => FieldValue::Int(integer),
                    None if number.is_f64() => FieldValue::Float(number.as_f64().expect("f64 number")),
                    None => FieldValue::Other("big integer"),
                },
                Value::String(text) => FieldValue::Text(text),
                Value::Array(_) => FieldValue::Other("array"),
                Value::Object(_) => FieldValue::Other("object"),
            }
        }
        if payload.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
            return Vec::new();
        }
        let Ok(object) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload) else {
            return Vec::new();
        };
        object
            .into_iter()
            .filter(|(name, _)| valid_column_name(name))
            .take(FIELDS_PER_RECORD_MAX)
            .map(|(name, value)| (name, from_json(value)))
            .collect()
    }

    fn json_value(depth: u32) -> BoxedStrategy<String> {
        let scalar = prop_oneof![
            Just("null".to_owned()),
            any::<bool>().prop_map(|value| value.to_string()),
            any::<i64>().prop_map(|value| value.to_string()),
            any::<u64>().prop_map(|value| value.to_string()),
            (-1e9f64..1e9).prop_map(|value| format!("{value:?}")),
            "[a-z \\\"\u{e9}\u{1F600}]{0,8}".prop_map(|text| format!("\"{text}\"")),
            Just("\"\\u00e9\\n\"".to_owned()),
        ];
        if depth == 0 {
            return scalar.boxed();
        }
        prop_oneof![
            4 => scalar,
            1 => prop::collection::vec(json_value(depth - 1), 0..3).prop_map(|items| format!("[{}]", items.join(","))),
            1 => json_object(depth - 1),
        ]
        .boxed()
    }

    fn json_object(depth: u32) -> BoxedStrategy<String> {
        let name = prop_oneof![
            Just("a".to_owned()),
            Just("b_2".to_owned()),
            Just("device".to_owned()),
            Just("1x".to_owned()),
            Just("a b".to_owned()),
            Just("\\u0061".to_owned()),
            "[A-Za-z_][A-Za-z0-9_]{0,6}",
        ];
        prop::collection::vec((name, json_value(depth)), 0..6)
            .prop_map(|members| {
                let members: Vec<String> =
                    members.iter().map(|(name, value)| format!("\"{name}\": {value}")).collect();
                format!("{{{}}}", members.join(", "))
            })
            .boxed()
    }

    /// A generated object, sometimes cut short, padded or with a byte changed.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        (json_object(2), 0u8..6, any::<prop::sample::Index>(), any::<u8>()).prop_map(
            |(object, damage, at, byte)| {
                let mut bytes = object.into_bytes();
                let at = at.index(bytes.len() + 1);
                match damage {
                    0 => bytes.truncate(at),
                    1 => bytes.insert(at, byte),
                    2 => bytes.extend_from_slice(b" x"),
                    3 => bytes.splice(0..0, *b"  \n").for_each(drop),
                    _ => {}
                }
                bytes
            },
        )
    }

    proptest! {
        #[test]
        fn fields_agree_with_a_full_parse(payload in payload()) {
            let fields: Vec<(String, FieldValue)> =
                payload_fields(&payload).into_iter().map(|(name, value)| (name.into_owned(), value)).collect();
            prop_assert_eq!(fields, full_parse(&payload), "{}", String::from_utf8_lossy(&payload));
        }
    }

    fn check(payload: &str, column_type: ColumnType, expected: Result<Option<Cell>, ()>) {
        let fields = payload_fields(payload.as_bytes());
        assert_eq!(fields.len(), 1, "{payload}");
        assert_eq!(fields[0].1.cell(column_type), expected, "{payload} as {column_type:?}");
    }

    #[test]
    fn cells_are_never_coerced_except_exact_integers_into_doubles() {
        check(r#"{"a": 21.5}"#, ColumnType::Double, Ok(Some(Cell::Double(21.5))));
        check(r#"{"a": 21}"#, ColumnType::Double, Ok(Some(Cell::Double(21.0))));
        check(r#"{"a": 9007199254740993}"#, ColumnType::Double, Err(()));
        check(r#"{"a": 21.5}"#, ColumnType::Int64, Err(()));
        check(r#"{"a": "21"}"#, ColumnType::Int64, Err(()));
        check(r#"{"a": true}"#, ColumnType::String, Err(()));
        check(r#"{"a": null}"#, ColumnType::Bool, Ok(None));
        check(r#"{"a": {"b": 1}}"#, ColumnType::String, Err(()));
        check(r#"{"a": 18446744073709551615}"#, ColumnType::Int64, Err(()));
    }

    #[test]
    fn only_json_objects_with_plain_names_are_typed() {
        assert!(payload_fields(b"[1, 2]").is_empty());
        assert!(payload_fields(b"{\"a\": ").is_empty());
        assert!(payload_fields(&[0xff, 0x00]).is_empty());
        let fields = payload_fields(br#"{"b": 1, "a b": 2, "device": 3, "date": 4, "_a1": 5, "1a": 6}"#);
        let names: Vec<&str> = fields.iter().map(|(name, _)| name.as_ref()).collect();
        assert_eq!(names, ["_a1", "b"]);
    }

    #[test]
    fn inference_widens_integers_to_doubles_only() {
        let mut inference = Inference::default();
        for payload in
            [r#"{"t": 20, "n": 1, "s": "x", "m": 1}"#, r#"{"t": 20.5, "n": 2, "s": 3, "m": "y", "z": null}"#]
        {
            for (name, value) in payload_fields(payload.as_bytes()) {
                inference.observe(&name, &value);
            }
        }
        let columns: Vec<(String, ColumnType)> =
            inference.columns().into_iter().map(|column| (column.name, column.column_type)).collect();
        assert_eq!(
            columns,
            [
                ("m".to_string(), ColumnType::Int64),
                ("n".to_string(), ColumnType::Int64),
                ("s".to_string(), ColumnType::String),
                ("t".to_string(), ColumnType::Double),
            ]
        );
    }
}
