//! JSON objects as records, shared by the socket and HTTP sources: the line format
//! (`RecordMaker`, `read_line_bounded`), the settings both read the same way
//! (`lane_and_connections`) and the way records reach the pipeline (`Intake`).
//!
//! Input: one JSON object per line (UTF-8, '\n' ends a line, a '\r' before it and surrounding
//! whitespace are ignored, blank lines are skipped). An object may carry `"key"` (a string that
//! passes `protocol::validate_key`) and `"timestamp_us"` (an unsigned integer, microseconds since
//! the Unix epoch); a missing key is generated (`<source>-<sequence>`) and a missing timestamp is
//! the time of arrival. The payload is the line as sent (trimmed), content type
//! `application/json`, so nothing the client wrote is lost or reformatted.
//!
//! Limits: a line is at most the source's `line_bytes_max` (default `LINE_BYTES_DEFAULT`, 64 KiB;
//! at most `LINE_BYTES_LIMIT`, 1 MiB, well below `RECORD_PAYLOAD_BYTES_MAX`); serde_json bounds
//! nesting at 128 levels. A problem names the line (1-based) and what was wrong, and never
//! echoes more than `ECHO_BYTES_MAX` bytes of the input.

use std::io;
use std::sync::Arc;

use protocol::{Lane, RECORD_PAYLOAD_BYTES_MAX};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _};

use super::metrics::{SourceErrorKind, SourceMetrics};
use super::{Delivery, Handover, KeySequence, SourceConfigError, check_range, lane_setting, now_us, stopped};
use crate::source::{RecordSender, SourceRecord, StopSignal};

/// Default longest JSON line.
pub(crate) const LINE_BYTES_DEFAULT: usize = 64 * 1024;
/// Largest `line_bytes_max` a config may ask for.
pub(crate) const LINE_BYTES_LIMIT: usize = 1024 * 1024;
/// Most bytes of a client's input repeated in an error message.
const ECHO_BYTES_MAX: usize = 64;
/// Default most open connections.
pub(crate) const CONNECTIONS_DEFAULT: usize = 16;
/// Largest `connections_max` a config may ask for.
pub(crate) const CONNECTIONS_LIMIT: usize = 1024;

const _: () = assert!(LINE_BYTES_DEFAULT <= LINE_BYTES_LIMIT);
const _: () = assert!(LINE_BYTES_LIMIT <= RECORD_PAYLOAD_BYTES_MAX);

pub(crate) const JSON_CONTENT_TYPE: &str = "application/json";

pub(crate) fn connections_default() -> usize {
    CONNECTIONS_DEFAULT
}

/// The lane (default sensor) and the connection limit, which every JSON source reads and checks
/// the same way.
pub(crate) fn lane_and_connections(
    name: &str,
    lane: Option<&str>,
    connections_max: usize,
) -> Result<(Lane, usize), SourceConfigError> {
    let lane = lane_setting(name, lane, Lane::Sensor)?;
    let connections_max =
        check_range(name, "connections_max", connections_max, 1..=CONNECTIONS_LIMIT, "connections")?;
    Ok((lane, connections_max))
}

/// What every request or connection of one JSON source shares: how lines become records, the
/// source's counters and the way to the pipeline.
pub(crate) struct Intake {
    pub(crate) records: RecordMaker,
    pub(crate) metrics: Arc<SourceMetrics>,
    out: RecordSender,
    stop: StopSignal,
    /// Set when the pipeline hung up, so the server ends too.
    finished: StopSignal,
}

impl Intake {
    pub(crate) fn new(
        records: RecordMaker,
        metrics: Arc<SourceMetrics>,
        out: RecordSender,
        stop: StopSignal,
    ) -> Intake {
        Intake { records, metrics, out, stop, finished: StopSignal::new() }
    }

    /// Hands one record to the pipeline, waiting while it is behind. Anything but `Sent` ends the
    /// whole server too: the source is stopping, or the pipeline hung up.
    pub(crate) async fn deliver(&self, record: SourceRecord) -> Delivery {
        let delivery = Handover::new(&self.out, record, &self.stop, &self.metrics).deliver_async().await;
        if delivery != Delivery::Sent {
            self.finished.stop();
        }
        delivery
    }

    /// Resolves once the source is asked to stop or the pipeline hung up.
    pub(crate) async fn stopped(&self) {
        stopped(&self.stop, &self.finished).await;
    }
}

/// Why a line did not become a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LineProblem {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("\"key\" must be a string of {rule}, found {0}", rule = protocol::record::KEY_RULE)]
    InvalidKey(String),
    #[error("\"timestamp_us\" must be an unsigned integer (microseconds since the Unix epoch), found {0}")]
    InvalidTimestamp(String),
    #[error("line longer than {bytes_max} bytes")]
    TooLong { bytes_max: usize },
}

impl LineProblem {
    pub(crate) fn kind(&self) -> SourceErrorKind {
        match self {
            LineProblem::InvalidJson(_) | LineProblem::NotAnObject(_) => SourceErrorKind::InvalidJson,
            LineProblem::InvalidKey(_) | LineProblem::InvalidTimestamp(_) => SourceErrorKind::InvalidRecord,
            LineProblem::TooLong { .. } => SourceErrorKind::LineTooLong,
        }
    }
}

/// Turns JSON lines into records for one source.
#[derive(Debug)]
pub(crate) struct RecordMaker {
    lane: Lane,
    keys: Arc<KeySequence>,
}

impl RecordMaker {
    pub(crate) fn new(lane: Lane, keys: Arc<KeySequence>) -> RecordMaker {
        RecordMaker { lane, keys }
    }

    /// The record for one line, `None` for a blank line.
    pub(crate) fn record_from_line(&self, line: &[u8]) -> Result<Option<SourceRecord>, LineProblem> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(None);
        }
        // Checked whole first: `RecordFields` skips the values it does not keep without
        // building them, and skipping does not validate UTF-8 inside strings.
        let text = std::str::from_utf8(line).map_err(|error| LineProblem::InvalidJson(error.to_string()))?;
        let fields: RecordFields =
            serde_json::from_str(text).map_err(|error| LineProblem::InvalidJson(error.to_string()))?;
        let (key, timestamp_us) = match fields {
            RecordFields::NotAnObject(found) => return Err(LineProblem::NotAnObject(found)),
            RecordFields::Object { key, timestamp_us } => (key, timestamp_us),
        };
        let key = match key {
            None => self.keys.next_key(),
            Some(Value::String(key)) if protocol::validate_key(&key).is_ok() => key,
            Some(other) => return Err(LineProblem::InvalidKey(echo_value(&other))),
        };
        let timestamp_us = match timestamp_us {
            None => now_us(),
            Some(value) => value.as_u64().ok_or_else(|| LineProblem::InvalidTimestamp(echo_value(&value)))?,
        };
        Ok(Some(SourceRecord {
            lane: self.lane,
            key,
            timestamp_us,
            content_type: JSON_CONTENT_TYPE.to_string(),
            payload: line.to_vec(),
            tags: Default::default(),
        }))
    }
}

/// What a line's JSON holds for the record: the two members the record is made of, every other
/// member parsed (so the line is checked as JSON, nesting bound included) but not kept. Parsing
/// into a `Value` tree instead cost an allocation per member and per string and was the intake's
/// top entry in `perf` (docs/benchmarks.md, "Against the peers"). Of a repeated member the last
/// wins, as in a `Value` map.
enum RecordFields {
    Object {
        key: Option<Value>,
        timestamp_us: Option<Value>,
    },
    /// The JSON type found instead of an object.
    NotAnObject(&'static str),
}

impl<'de> serde::Deserialize<'de> for RecordFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RecordFieldsVisitor)
    }
}

/// A member name of the line's object, compared without allocating.
enum MemberName {
    Key,
    TimestampUs,
    Other,
}

impl<'de> serde::Deserialize<'de> for MemberName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl serde::de::Visitor<'_> for NameVisitor {
            type Value = MemberName;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a member name")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<MemberName, E> {
                Ok(match name {
                    "key" => MemberName::Key,
                    "timestamp_us" => MemberName::TimestampUs,
                    _ => MemberName::Other,
                })
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

struct RecordFieldsVisitor;

impl<'de> serde::de::Visitor<'de> for RecordFieldsVisitor {
    type Value = RecordFields;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RecordFields, A::Error> {
        let (mut key, mut timestamp_us) = (None, None);
        while let Some(name) = map.next_key::<MemberName>()? {
            match name {
                MemberName::Key => key = Some(map.next_value::<Value>()?),
                MemberName::TimestampUs => timestamp_us = Some(map.next_value::<Value>()?),
                MemberName::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(RecordFields::Object { key, timestamp_us })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<RecordFields, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(RecordFields::NotAnObject("an array"))
    }

    fn visit_unit<E>(self) -> Result<RecordFields, E> {
        Ok(RecordFields::NotAnObject("null"))
    }

    fn visit_bool<E>(self, _: bool) -> Result<RecordFields, E> {
        Ok(RecordFields::NotAnObject("a boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<RecordFields, E> {
        Ok(RecordFields::NotAnObject("a number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<RecordFields, E> {
        Ok(RecordFields::NotAnObject("a number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<RecordFields, E> {
        Ok(RecordFields::NotAnObject("a number"))
    }

    fn visit_str<E>(self, _: &str) -> Result<RecordFields, E> {
        Ok(RecordFields::NotAnObject("a string"))
    }
}

/// A short rendering of a client's value for an error message.
fn echo_value(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= ECHO_BYTES_MAX {
        return text;
    }
    format!("{}…", &text[..text.floor_char_boundary(ECHO_BYTES_MAX)])
}

/// What `read_line_bounded` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// `line` holds one line without its '\n' (the last line may lack the '\n').
    Line,
    /// The line was longer than the maximum; it was read and discarded up to its '\n'.
    TooLong,
    /// The peer closed the stream.
    End,
}

/// Reads one line into `line`, never buffering more than `bytes_max` bytes of it: a longer line
/// is skipped to its end so the stream stays usable.
pub(crate) async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    bytes_max: usize,
) -> io::Result<LineRead> {
    line.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => LineRead::TooLong,
                (false, true) => LineRead::End,
                (false, false) => LineRead::Line,
            });
        }
        let newline = available.iter().position(|&byte| byte == b'\n');
        let content = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if line.len() + content.len() > bytes_max {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(content);
            }
        }
        let consumed = newline.map_or(available.len(), |position| position + 1);
        reader.consume(consumed);
        if newline.is_some() {
            return Ok(if too_long { LineRead::TooLong } else { LineRead::Line });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maker() -> RecordMaker {
        RecordMaker::new(Lane::Sensor, Arc::new(KeySequence::starting_now("test")))
    }

    fn check(line: &str, expected: Result<Option<(&str, u64)>, LineProblem>) {
        let found = maker().record_from_line(line.as_bytes());
        match (found, expected) {
            (Ok(Some(record)), Ok(Some((key, timestamp_us)))) => {
                assert_eq!((record.key.as_str(), record.timestamp_us), (key, timestamp_us), "{line}");
                assert_eq!(record.payload, line.trim().as_bytes());
                assert_eq!(record.content_type, JSON_CONTENT_TYPE);
                assert_eq!(record.lane, Lane::Sensor);
            }
            (found, expected) => assert_eq!(found.map(|record| record.map(|_| ("", 0))), expected, "{line}"),
        }
    }

    #[test]
    fn lines_become_records_or_clear_problems() {
        check(r#"{"key":"a-1","timestamp_us":5,"t":1}"#, Ok(Some(("a-1", 5))));
        check(" {\"key\":\"a-2\",\"timestamp_us\":7}\r", Ok(Some(("a-2", 7))));
        check("   ", Ok(None));
        check("[1]", Err(LineProblem::NotAnObject("an array")));
        check("42", Err(LineProblem::NotAnObject("a number")));
        check(r#"{"key":"a.b"}"#, Err(LineProblem::InvalidKey("\"a.b\"".to_string())));
        // One key rule at both ends: what the core's tar writer cannot hold is refused here.
        check(r#"{"key":"kamera-ü"}"#, Err(LineProblem::InvalidKey("\"kamera-ü\"".to_string())));
        check(r#"{"key":"room 12"}"#, Err(LineProblem::InvalidKey("\"room 12\"".to_string())));
        check(r#"{"key":7}"#, Err(LineProblem::InvalidKey("7".to_string())));
        check(r#"{"timestamp_us":-1}"#, Err(LineProblem::InvalidTimestamp("-1".to_string())));
        check(r#"{"timestamp_us":"now"}"#, Err(LineProblem::InvalidTimestamp("\"now\"".to_string())));
        assert!(matches!(maker().record_from_line(b"{\"a\":"), Err(LineProblem::InvalidJson(_))));
        assert!(matches!(maker().record_from_line(&[0xFF, b'{']), Err(LineProblem::InvalidJson(_))));
    }

    #[test]
    fn generated_keys_and_timestamps_fill_gaps() {
        let record = maker().record_from_line(br#"{"temperature_millicelsius":21000}"#).unwrap().unwrap();
        assert!(record.key.starts_with("test-"));
        assert!(protocol::validate_key(&record.key).is_ok());
        assert!(record.timestamp_us > 0);
    }

    #[test]
    fn long_values_are_echoed_short() {
        let line = format!(r#"{{"key":"{}"}}"#, "k".repeat(1000));
        let Err(LineProblem::InvalidKey(echo)) = maker().record_from_line(line.as_bytes()) else {
            panic!("a 1000-byte key must be refused");
        };
        assert!(echo.len() <= ECHO_BYTES_MAX + '…'.len_utf8());
    }

    #[tokio::test]
    async fn bounded_reader_skips_long_lines_and_keeps_going() {
        let input: &[u8] = b"short\n0123456789abcdef\nlast";
        // A tiny buffer makes lines span several fills.
        let mut reader = tokio::io::BufReader::with_capacity(3, input);
        let mut line = Vec::new();
        let mut found = Vec::new();
        loop {
            let read = read_line_bounded(&mut reader, &mut line, 8).await.unwrap();
            found.push((read, String::from_utf8(line.clone()).unwrap()));
            if read == LineRead::End {
                break;
            }
        }
        let expected = [
            (LineRead::Line, "short"),
            (LineRead::TooLong, ""),
            (LineRead::Line, "last"),
            (LineRead::End, ""),
        ];
        assert_eq!(found, expected.map(|(read, text)| (read, text.to_string())));
    }

    fn json_type_name(value: &Value) -> &'static str {
        match value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }

    /// The line as the intake read it before `RecordFields`: a whole `Value` tree (the oracle
    /// of `fields_agree_with_a_full_parse`). `Ok(Some((key, timestamp)))`, `None` where the line
    /// leaves it to be generated.
    #[allow(clippy::type_complexity)]
    fn full_parse(line: &[u8]) -> Result<Option<(Option<String>, Option<u64>)>, LineProblem> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(None);
        }
        let value: Value =
            serde_json::from_slice(line).map_err(|error| LineProblem::InvalidJson(error.to_string()))?;
        let Value::Object(object) = value else {
            return Err(LineProblem::NotAnObject(json_type_name(&value)));
        };
        let key = match object.get("key") {
            None => None,
            Some(Value::String(key)) if protocol::validate_key(key).is_ok() => Some(key.clone()),
            Some(other) => return Err(LineProblem::InvalidKey(echo_value(other))),
        };
        let timestamp_us = match object.get("timestamp_us") {
            None => None,
            Some(value) => {
                Some(value.as_u64().ok_or_else(|| LineProblem::InvalidTimestamp(echo_value(value)))?)
            }
        };
        Ok(Some((key, timestamp_us)))
    }

    /// Lines shaped like what a client might send, right or wrong: JSON tokens in any order.
    fn json_ish_line() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let token = prop_oneof![
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just("[".to_owned()),
            Just("]".to_owned()),
            Just(",".to_owned()),
            Just(":".to_owned()),
            Just("\"key\"".to_owned()),
            Just("\"timestamp_us\"".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            any::<i64>().prop_map(|number| number.to_string()),
            any::<u64>().prop_map(|number| number.to_string()),
            any::<f64>().prop_map(|number| number.to_string()),
            "[ -~]{0,80}".prop_map(|text| format!("{text:?}")),
            any::<String>().prop_map(|text| format!("{text:?}")),
            Just(" \r\t".to_owned()),
        ];
        prop_oneof![
            proptest::collection::vec(token, 0..24).prop_map(|tokens| tokens.concat().into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..256),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2_000))]

        /// Any bytes a client sends become a record whose key the core accepts and whose payload
        /// is exactly the trimmed line, or a problem whose message stays short.
        #[test]
        fn any_line_is_a_valid_record_or_a_short_problem(line in json_ish_line()) {
            match maker().record_from_line(&line) {
                Ok(Some(record)) => {
                    proptest::prop_assert!(protocol::validate_key(&record.key).is_ok(), "{:?}", record.key);
                    proptest::prop_assert_eq!(record.payload.as_slice(), line.trim_ascii());
                    proptest::prop_assert!(record.payload.len() <= RECORD_PAYLOAD_BYTES_MAX);
                }
                Ok(None) => proptest::prop_assert!(line.trim_ascii().is_empty()),
                Err(problem) => {
                    proptest::prop_assert!(problem.to_string().len() <= 320, "{problem}");
                }
            }
        }

        /// The record made without a `Value` tree is the one a full parse into `Value` makes:
        /// same acceptance, same key and timestamp, same problem kind.
        #[test]
        fn fields_agree_with_a_full_parse(line in json_ish_line()) {
            let full = full_parse(&line);
            match (maker().record_from_line(&line), full) {
                (Ok(Some(record)), Ok(Some((key, timestamp_us)))) => {
                    if let Some(key) = key {
                        proptest::prop_assert_eq!(record.key, key);
                    }
                    if let Some(timestamp_us) = timestamp_us {
                        proptest::prop_assert_eq!(record.timestamp_us, timestamp_us);
                    }
                }
                (Ok(None), Ok(None)) => {}
                (Err(found), Err(expected)) => proptest::prop_assert_eq!(found.kind(), expected.kind(), "{} vs {}", found, expected),
                (found, expected) => proptest::prop_assert!(false, "{:?}: {:?} vs {:?}", String::from_utf8_lossy(&line), found.map(|record| record.map(|record| record.key)), expected),
            }
        }

        /// However the input is split into reads, the bounded reader returns the same lines as a
        /// plain split on '\n', each at most `bytes_max` long, and marks the longer ones.
        #[test]
        fn the_bounded_reader_agrees_with_a_plain_split(
            input in proptest::collection::vec(proptest::prop_oneof![proptest::prelude::Just(b'\n'), proptest::prelude::any::<u8>()], 0..600),
            capacity in 1usize..64,
            bytes_max in 1usize..40,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let found = runtime.block_on(async {
                let mut reader = tokio::io::BufReader::with_capacity(capacity, input.as_slice());
                let mut line = Vec::new();
                let mut found = Vec::new();
                loop {
                    match read_line_bounded(&mut reader, &mut line, bytes_max).await.unwrap() {
                        LineRead::End => break,
                        LineRead::TooLong => found.push(None),
                        LineRead::Line => {
                            assert!(line.len() <= bytes_max);
                            found.push(Some(line.clone()));
                        }
                    }
                }
                found
            });
            let mut expected: Vec<Option<Vec<u8>>> = input
                .split(|&byte| byte == b'\n')
                .map(|piece| (piece.len() <= bytes_max).then(|| piece.to_vec()))
                .collect();
            // A final '\n' (or empty input) leaves no last line.
            if expected.last() == Some(&Some(Vec::new())) {
                expected.pop();
            }
            proptest::prop_assert_eq!(found, expected);
        }
    }
}
