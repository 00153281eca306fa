//! Boundary tests of the filters stage: tables of records in, verdicts out, through one chain
//! built from TOML exactly as an operator writes it.

use std::collections::BTreeMap;

use protocol::Lane;

use super::*;

fn reading(timestamp_ms: u64, json: &str) -> SourceRecord {
    record(timestamp_ms, "application/json", json.as_bytes())
}

fn frame(timestamp_ms: u64, bytes: &[u8]) -> SourceRecord {
    SourceRecord { lane: Lane::Media, ..record(timestamp_ms, "image/jpeg", bytes) }
}

fn record(timestamp_ms: u64, content_type: &str, payload: &[u8]) -> SourceRecord {
    SourceRecord {
        lane: Lane::Sensor,
        key: format!("device-{timestamp_ms:010}"),
        timestamp_us: timestamp_ms * 1_000,
        content_type: content_type.to_owned(),
        payload: payload.to_vec(),
        tags: BTreeMap::new(),
    }
}

/// Parses `[[filters]]` tables the way the daemon parses `[[sources.<name>.filters]]`.
fn parse_filters(filters_toml: &str) -> Result<Vec<FilterConfig>, FilterConfigError> {
    let table: toml::Table = toml::from_str(filters_toml).expect("test TOML is valid TOML");
    let filters = table.get("filters").cloned().unwrap_or(toml::Value::Array(Vec::new()));
    FilterConfig::list_from_toml(&filters)
}

fn chain(filters_toml: &str) -> FilterChain {
    FilterChain::from_config(&parse_filters(filters_toml).expect("test config parses"))
        .expect("test config is valid")
}

#[derive(Debug)]
enum Expect {
    /// Kept with its payload and tags unchanged.
    Keep,
    /// Kept with this JSON payload (compared as JSON values).
    Rewritten(&'static str),
    /// Kept with exactly these tags.
    Tagged(&'static [(&'static str, &'static str)]),
    Drop(DropReason),
}

/// Feeds the records in order through one chain and compares every verdict; also checks that
/// every record was counted exactly once.
fn check(filters_toml: &str, cases: &[(SourceRecord, Expect)]) {
    let mut chain = chain(filters_toml);
    run(&mut chain, cases);
    let counts = chain.metrics().snapshot();
    assert_eq!(counts.records_in, cases.len() as u64);
}

fn run(chain: &mut FilterChain, cases: &[(SourceRecord, Expect)]) {
    for (position, (input, expected)) in cases.iter().enumerate() {
        let verdict = chain.apply(input.clone());
        let context = format!(
            "case {position}: {:?} expected {expected:?}, got {verdict:?}",
            String::from_utf8_lossy(&input.payload)
        );
        assert!(input.payload.len() < 1024, "cases print their records on failure; keep them short");
        match (expected, verdict) {
            (Expect::Keep, Verdict::Keep(output)) => assert_eq!(&output, input, "{context}"),
            (Expect::Rewritten(json), Verdict::Keep(output)) => {
                let expected: serde_json::Value = serde_json::from_str(json).expect("test JSON");
                let actual: serde_json::Value =
                    serde_json::from_slice(&output.payload).expect("rewritten JSON parses");
                assert_eq!(actual, expected, "{context}");
                assert_eq!(SourceRecord { payload: input.payload.clone(), ..output }, *input, "{context}");
            }
            (Expect::Tagged(tags), Verdict::Keep(output)) => {
                let tags: BTreeMap<String, String> =
                    tags.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
                assert_eq!(output.tags, tags, "{context}");
                assert_eq!(SourceRecord { tags: input.tags.clone(), ..output }, *input, "{context}");
            }
            (Expect::Drop(reason), Verdict::Drop { reason: actual }) => {
                assert_eq!(actual, *reason, "{context}")
            }
            _ => panic!("{context}"),
        }
    }
    let counts = chain.metrics().snapshot();
    assert_eq!(counts.records_in, counts.records_out + counts.dropped_total(), "every record accounted for");
}

use Expect::{Drop, Keep, Rewritten, Tagged};

fn env(timestamp_ms: u64, sensor: &str, temperature_c: f64) -> SourceRecord {
    reading(timestamp_ms, &format!(r#"{{"sensor":"{sensor}","temperature_c":{temperature_c:?}}}"#))
}

#[test]
fn rate_limit_keeps_at_most_n_per_second_of_record_time() {
    let limit = "[[filters]]\nkind = \"rate_limit\"\nmax_per_second = 2";
    check(
        limit,
        &[
            (env(0, "env0", 20.0), Keep),
            (env(100, "env0", 20.0), Keep),
            (env(200, "env0", 20.0), Drop(DropReason::RateLimit)),
            (frame(999, b"frame"), Drop(DropReason::RateLimit)),
            (env(1_000, "env0", 20.0), Keep),
            (env(1_001, "env1", 20.0), Keep),
            (env(1_002, "env0", 20.0), Drop(DropReason::RateLimit)),
            // A step back in source time counts against the current window.
            (env(500, "env0", 20.0), Drop(DropReason::RateLimit)),
            (env(2_500, "env0", 20.0), Keep),
        ],
    );
    let per_sensor = "[[filters]]\nkind = \"rate_limit\"\nmax_per_second = 1\nstream_field = \"sensor\"";
    check(
        per_sensor,
        &[
            (env(0, "env0", 20.0), Keep),
            (env(10, "env1", 20.0), Keep),
            (env(20, "env0", 20.0), Drop(DropReason::RateLimit)),
            // Records without the stream field share one stream of their own.
            (frame(30, b"frame"), Keep),
            (frame(40, b"frame"), Drop(DropReason::RateLimit)),
            (env(1_000, "env0", 20.0), Keep),
        ],
    );
}

#[test]
fn decimate_keeps_first_then_every_kth() {
    let every_third = "[[filters]]\nkind = \"decimate\"\nkeep_every = 3";
    let cases: Vec<_> = (0..7)
        .map(|index| {
            (env(index, "env0", 20.0), if index % 3 == 0 { Keep } else { Drop(DropReason::Decimate) })
        })
        .collect();
    check(every_third, &cases);
    let per_sensor = "[[filters]]\nkind = \"decimate\"\nkeep_every = 2\nstream_field = \"sensor\"";
    check(
        per_sensor,
        &[
            (env(0, "env0", 20.0), Keep),
            (env(1, "env1", 20.0), Keep),
            (env(2, "env0", 20.0), Drop(DropReason::Decimate)),
            (env(3, "env1", 20.0), Drop(DropReason::Decimate)),
            (env(4, "env0", 20.0), Keep),
        ],
    );
    check(
        "[[filters]]\nkind = \"decimate\"\nkeep_every = 1",
        &[(env(0, "env0", 1.0), Keep), (env(1, "env0", 1.0), Keep)],
    );
}

#[test]
fn deadband_drops_insignificant_changes_per_sensor() {
    let deadband = "[[filters]]\nkind = \"deadband\"\nfield = \"temperature_c\"\nthreshold = 0.5";
    check(
        deadband,
        &[
            (env(0, "env0", 21.0), Keep),
            (env(1, "env0", 21.4), Drop(DropReason::Deadband)),
            // Compared with the last kept reading (21.0), not the last seen one.
            (env(2, "env0", 21.49), Drop(DropReason::Deadband)),
            (env(3, "env0", 21.5), Keep),
            (env(4, "env0", 21.1), Drop(DropReason::Deadband)),
            (env(5, "env1", 21.5), Keep),
            (env(6, "env1", 21.5), Drop(DropReason::Deadband)),
            // A reading missing the field, or with a non-number, is not deadbanded.
            (reading(7, r#"{"sensor":"env0","humidity_pct":40.0}"#), Keep),
            (reading(8, r#"{"sensor":"env0","temperature_c":"hot"}"#), Keep),
            (frame(9, b"\xff\xd8jpeg"), Keep),
            (reading(10, "not json"), Keep),
            (env(11, "env0", 20.9), Keep),
            // Readings without the stream field form one stream.
            (reading(12, r#"{"temperature_c":5.0}"#), Keep),
            (reading(13, r#"{"temperature_c":5.2}"#), Drop(DropReason::Deadband)),
        ],
    );
}

#[test]
fn deadband_needs_every_field_insignificant_and_honours_max_silence() {
    let two_fields = r#"
        [[filters]]
        kind = "deadband"
        fields = [{ field = "temperature_c", threshold = 0.5 }, { field = "humidity_pct", threshold = 2 }]
        max_silence_ms = 1000
    "#;
    let both = |timestamp_ms, temperature_c: f64, humidity_pct: f64| {
        reading(
            timestamp_ms,
            &format!(
                r#"{{"sensor":"env0","temperature_c":{temperature_c:?},"humidity_pct":{humidity_pct:?}}}"#
            ),
        )
    };
    check(
        two_fields,
        &[
            (both(0, 21.0, 40.0), Keep),
            (both(100, 21.1, 41.0), Drop(DropReason::Deadband)),
            (both(200, 21.1, 42.5), Keep),
            (both(300, 21.1, 42.5), Drop(DropReason::Deadband)),
            (env(400, "env0", 21.1), Keep),
            (both(1_199, 21.1, 42.5), Drop(DropReason::Deadband)),
            // The last kept reading is 1 000 ms old: kept as a heartbeat.
            (both(1_400, 21.1, 42.5), Keep),
            (both(1_500, 21.1, 42.5), Drop(DropReason::Deadband)),
        ],
    );
}

#[test]
fn drop_duplicates_compares_with_the_last_n_kept_payloads() {
    let window_two = "[[filters]]\nkind = \"drop_duplicates\"\nwindow = 2";
    check(
        window_two,
        &[
            (frame(0, b"A"), Keep),
            (frame(1, b"A"), Drop(DropReason::Duplicate)),
            (frame(2, b"B"), Keep),
            (frame(3, b"C"), Keep),
            // A left the window when C was kept.
            (frame(4, b"A"), Keep),
            (frame(5, b"B"), Keep),
            (frame(6, b"B"), Drop(DropReason::Duplicate)),
            (frame(7, b""), Keep),
            (frame(8, b""), Drop(DropReason::Duplicate)),
            (reading(9, r#"{"sensor":"env0"}"#), Keep),
            (reading(10, r#"{"sensor":"env0"}"#), Drop(DropReason::Duplicate)),
        ],
    );
}

const SCHEMA: &str = r#"
    [[filters]]
    kind = "schema"
    payload_bytes_max = 200
    fields = [
        { field = "sensor", type = "string" },
        { field = "temperature_c", type = "number", min = -40, max = 125 },
        { field = "ok", type = "bool", required = false },
    ]
"#;

#[test]
fn schema_drops_readings_that_do_not_match() {
    let schema = DropReason::Schema;
    let long = format!(r#"{{"sensor":"env0","temperature_c":1,"padding":"{}"}}"#, "x".repeat(200));
    check(
        SCHEMA,
        &[
            (reading(0, r#"{"sensor":"env0","temperature_c":21.5}"#), Keep),
            (reading(1, r#"{"sensor":"env0","temperature_c":-40,"ok":true,"extra":[1,2]}"#), Keep),
            (reading(2, r#"{"sensor":"env0","temperature_c":125,"ok":null}"#), Keep),
            (reading(3, r#"{"temperature_c":21.5}"#), Drop(schema)),
            (reading(4, r#"{"sensor":null,"temperature_c":21.5}"#), Drop(schema)),
            (reading(5, r#"{"sensor":7,"temperature_c":21.5}"#), Drop(schema)),
            (reading(6, r#"{"sensor":"env0","temperature_c":"21.5"}"#), Drop(schema)),
            (reading(7, r#"{"sensor":"env0","temperature_c":125.01}"#), Drop(schema)),
            (reading(8, r#"{"sensor":"env0","temperature_c":-40.5}"#), Drop(schema)),
            (reading(9, r#"{"sensor":"env0","temperature_c":21.5,"ok":"yes"}"#), Drop(schema)),
            (reading(10, r#"[{"sensor":"env0","temperature_c":21.5}]"#), Drop(schema)),
            (reading(11, r#"{"sensor":"env0","temperature_c":21.5"#), Drop(schema)),
            (reading(12, &long), Drop(schema)),
            (frame(13, b"\xff\xd8\xff\xe0"), Drop(schema)),
            (record(14, "application/json; charset=utf-8", br#"{"sensor":"env0","temperature_c":1}"#), Keep),
            (record(15, "application/vnd.tributary+json", br#"{"sensor":"env0","temperature_c":1}"#), Keep),
            (record(16, "text/plain", br#"{"sensor":"env0","temperature_c":1}"#), Drop(schema)),
        ],
    );
}

/// Payloads meant to break a parser; every filter must answer without panicking, and the
/// schema check must drop them.
fn hostile_payloads() -> Vec<Vec<u8>> {
    let deep_arrays = format!(r#"{{"sensor":{}1{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
    let deep_objects = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let nested_under_limit =
        format!(r#"{{"sensor":"env0","temperature_c":1,"x":{}1{}}}"#, "[".repeat(126), "]".repeat(126));
    let huge_integer = format!(r#"{{"sensor":"env0","temperature_c":1{}}}"#, "0".repeat(400));
    let long_sensor = format!(r#"{{"sensor":"{}","temperature_c":1}}"#, "é".repeat(20_000));
    vec![
        deep_arrays.into_bytes(),
        deep_objects.into_bytes(),
        nested_under_limit.into_bytes(),
        br#"{"sensor":"env0","temperature_c":1e400}"#.to_vec(),
        br#"{"sensor":"env0","temperature_c":-1e400}"#.to_vec(),
        huge_integer.into_bytes(),
        br#"{"sensor":"env0","temperature_c":NaN}"#.to_vec(),
        b"{\"sensor\":\"env\xff\xfe\",\"temperature_c\":1}".to_vec(),
        b"\xff\xfe\x00\x00".to_vec(),
        br#"{"sensor":"\ud800","temperature_c":1}"#.to_vec(),
        br#"{"sensor":"env0","sensor":"env1","temperature_c":1}"#.to_vec(),
        long_sensor.into_bytes(),
        vec![b'{'; JSON_PAYLOAD_BYTES_MAX + 1],
        Vec::new(),
        b"null".to_vec(),
        b"\"just a string\"".to_vec(),
    ]
}

#[test]
fn hostile_json_never_panics() {
    let everything = r#"
        [[filters]]
        kind = "tag"
        tags = { site = "plant-3" }
        when = { field = "sensor", equals = "env0" }
        [[filters]]
        kind = "normalize_units"
        conversions = [{ field = "temperature_c", scale = 1e300 }]
        [[filters]]
        kind = "deadband"
        field = "temperature_c"
        threshold = 0.5
        [[filters]]
        kind = "rate_limit"
        max_per_second = 1000
        stream_field = "sensor"
        [[filters]]
        kind = "decimate"
        keep_every = 1
        stream_field = "sensor"
        [[filters]]
        kind = "drop_duplicates"
        window = 4
    "#;
    let mut everything = chain(everything);
    let mut schema = chain(
        "[[filters]]\nkind = \"schema\"\nfields = [{ field = \"sensor\", type = \"string\" }, { field = \"temperature_c\", type = \"number\" }]",
    );
    for (position, payload) in hostile_payloads().into_iter().enumerate() {
        let hostile = record(position as u64, "application/json", &payload);
        let _ = everything.apply(hostile.clone());
        let kept = matches!(schema.apply(hostile), Verdict::Keep(_));
        // Valid JSON after all: nested 127 levels (just under serde_json's limit), duplicate
        // keys (the last wins, as in serde_json) and a 40 KB sensor name.
        let valid = [2, 10, 11].contains(&position);
        assert_eq!(kept, valid, "payload {position}");
    }
    assert_eq!(schema.metrics().snapshot().records_out, 3);
    let counts = everything.metrics().snapshot();
    assert_eq!(counts.records_in, counts.records_out + counts.dropped_total());
}

#[test]
fn normalize_units_converts_and_renames() {
    let normalize = r#"
        [[filters]]
        kind = "normalize_units"
        conversions = [
            { field = "temperature_f", to = "temperature_c", conversion = "fahrenheit_to_celsius" },
            { field = "pressure_pa", to = "pressure_hpa", conversion = "pascal_to_hectopascal" },
            { field = "voltage_mv", to = "voltage_v", scale = 0.001, decimals = 3 },
            { field = "current_ma", to = "current_a", scale = 0.001 },
            { field = "level", scale = 2, offset = -1 },
        ]
    "#;
    check(
        normalize,
        &[
            (
                reading(0, r#"{"sensor":"env0","temperature_f":212,"pressure_pa":101325}"#),
                Rewritten(r#"{"sensor":"env0","temperature_c":100.0,"pressure_hpa":1013.25}"#),
            ),
            (
                reading(1, r#"{"sensor":"env0","temperature_f":32.0}"#),
                Rewritten(r#"{"sensor":"env0","temperature_c":0.0}"#),
            ),
            // Without `decimals` the binary floating-point result is written as it is.
            (
                reading(2, r#"{"voltage_mv":3300,"current_ma":3300}"#),
                Rewritten(r#"{"voltage_v":3.3,"current_a":3.3000000000000003}"#),
            ),
            (reading(3, r#"{"level":5}"#), Rewritten(r#"{"level":9.0}"#)),
            // Absent or non-numeric fields are left alone, byte for byte.
            (reading(4, r#"{"sensor":"env0", "temperature_c":21.5}"#), Keep),
            (reading(5, r#"{"temperature_f":"hot"}"#), Keep),
            (frame(6, b"\xff\xd8"), Keep),
            (reading(7, "not json"), Keep),
        ],
    );
    let overflow =
        "[[filters]]\nkind = \"normalize_units\"\nconversions = [{ field = \"x\", scale = 1e300 }]";
    check(
        overflow,
        &[
            (reading(0, r#"{"x":1e10}"#), Drop(DropReason::Conversion)),
            (reading(1, r#"{"x":1}"#), Rewritten(r#"{"x":1e300}"#)),
        ],
    );
}

#[test]
fn tag_adds_labels_optionally_when_a_field_matches() {
    let always = "[[filters]]\nkind = \"tag\"\ntags = { site = \"plant-3\", line = \"2\" }";
    check(
        always,
        &[
            (env(0, "env0", 1.0), Tagged(&[("line", "2"), ("site", "plant-3")])),
            (frame(1, b"\xff\xd8"), Tagged(&[("line", "2"), ("site", "plant-3")])),
        ],
    );
    let when = r#"
        [[filters]]
        kind = "tag"
        tags = { alarm = "true" }
        when = { field = "status", equals = "alarm" }
        [[filters]]
        kind = "tag"
        tags = { level = "one" }
        when = { field = "level", equals = 1 }
        [[filters]]
        kind = "tag"
        tags = { door = "open" }
        when = { field = "open", equals = true }
    "#;
    check(
        when,
        &[
            (reading(0, r#"{"status":"alarm"}"#), Tagged(&[("alarm", "true")])),
            (reading(1, r#"{"status":"ok"}"#), Keep),
            (reading(2, r#"{"status":1}"#), Keep),
            (reading(3, r#"{"level":1.0}"#), Tagged(&[("level", "one")])),
            (reading(4, r#"{"level":"1"}"#), Keep),
            (reading(5, r#"{"open":true,"status":"alarm"}"#), Tagged(&[("alarm", "true"), ("door", "open")])),
            (reading(6, r#"{"open":false}"#), Keep),
            (frame(7, b"\xff\xd8"), Keep),
        ],
    );
}

#[test]
fn a_chain_applies_filters_in_order_and_parses_once() {
    let pipeline = r#"
        [[filters]]
        kind = "schema"
        fields = [{ field = "sensor", type = "string" }, { field = "temperature_f", type = "number" }]
        [[filters]]
        kind = "normalize_units"
        conversions = [{ field = "temperature_f", to = "temperature_c", conversion = "fahrenheit_to_celsius" }]
        [[filters]]
        kind = "deadband"
        field = "temperature_c"
        threshold = 0.5
        [[filters]]
        kind = "drop_duplicates"
        window = 8
        [[filters]]
        kind = "tag"
        tags = { site = "plant-3" }
    "#;
    let fahrenheit = |timestamp_ms, value: f64| {
        reading(timestamp_ms, &format!(r#"{{"sensor":"env0","temperature_f":{value:?}}}"#))
    };
    let mut chain = chain(pipeline);
    for (position, (input, expected)) in [
        (fahrenheit(0, 50.0), Some(r#"{"sensor":"env0","temperature_c":10.0}"#)),
        (fahrenheit(1, 50.5), None), // 10.28 °C: inside the deadband.
        (reading(2, r#"{"sensor":"env0"}"#), None), // Fails the schema.
        (fahrenheit(3, 59.0), Some(r#"{"sensor":"env0","temperature_c":15.0}"#)),
    ]
    .into_iter()
    .enumerate()
    {
        match (chain.apply(input), expected) {
            (Verdict::Keep(output), Some(json)) => {
                assert_eq!(output.payload, json.as_bytes(), "case {position}: keys come out sorted, compact");
                assert_eq!(output.tags.get("site").map(String::as_str), Some("plant-3"), "case {position}");
            }
            (Verdict::Drop { .. }, None) => {}
            (verdict, expected) => panic!("case {position}: expected {expected:?}, got {verdict:?}"),
        }
    }
    let counts = chain.metrics().snapshot();
    assert_eq!(counts.records_in, 4);
    assert_eq!(counts.records_out, 2);
    assert_eq!(counts.dropped(DropReason::Deadband), 1);
    assert_eq!(counts.dropped(DropReason::Schema), 1);
}

/// Parses and validates `filters_toml`; the error's message must be exactly `expected`.
fn check_config_error(filters_toml: &str, expected: &str) {
    let error = match parse_filters(filters_toml) {
        Err(error) => error,
        Ok(configs) => FilterChain::from_config(&configs).expect_err(filters_toml),
    };
    assert_eq!(error.to_string(), expected, "{filters_toml}");
}

#[test]
fn config_errors_name_the_filter_and_key() {
    let cases: &[(&str, &str)] = &[
        // Serde-level: unknown key, wrong type, missing key, unknown kind.
        (
            "[[filters]]\nkind = \"rate_limit\"\nmax_per_second = 10\nburst = 20",
            "filters[0].burst: unknown field `burst`, expected `max_per_second` or `stream_field`",
        ),
        (
            "[[filters]]\nkind = \"decimate\"\nkeep_every = 2\n[[filters]]\nkind = \"rate_limit\"\nmax_per_second = \"ten\"",
            "filters[1].max_per_second: invalid type: string \"ten\", expected u32",
        ),
        ("[[filters]]\nkind = \"rate_limit\"", "filters[0].max_per_second: missing field `max_per_second`"),
        (
            "[[filters]]\nkind = \"drop_duplicates\"\nwindow = -1",
            "filters[0].window: invalid value: integer `-1`, expected usize",
        ),
        (
            "[[filters]]\nmax_per_second = 10",
            "filters[0].kind: missing; expected one of rate_limit, decimate, deadband, drop_duplicates, schema, normalize_units, tag",
        ),
        ("[[filters]]\nkind = 3", "filters[0].kind: expected a string, got integer"),
        (
            "[[filters]]\nkind = \"dedupe\"",
            "filters[0].kind: unknown kind \"dedupe\"; expected one of rate_limit, decimate, deadband, drop_duplicates, schema, normalize_units, tag",
        ),
        ("filters = [1]", "filters[0]: expected a table, got integer"),
        ("filters = 1", "filters: expected an array of tables, got integer"),
        (
            "[[filters]]\nkind = \"schema\"\nfields = [{ field = \"x\", type = \"integer\" }]",
            "filters[0].fields.type: unknown variant `integer`, expected one of `number`, `string`, `bool`",
        ),
        // Validation: ranges, combinations, limits.
        (
            "[[filters]]\nkind = \"tag\"\ntags = { a = \"b\" }\n[[filters]]\nkind = \"deadband\"\nfield = \"temperature_c\"\nthreshold = -0.5",
            "filters[1].threshold: expected a non-negative number, got -0.5",
        ),
        (
            "[[filters]]\nkind = \"deadband\"\nfield = \"t\"\nthreshold = nan",
            "filters[0].threshold: expected a non-negative number, got NaN",
        ),
        (
            "[[filters]]\nkind = \"deadband\"\nthreshold = 1",
            "filters[0].field: missing; `threshold` needs a `field`",
        ),
        (
            "[[filters]]\nkind = \"deadband\"\nfield = \"t\"",
            "filters[0].threshold: missing; `field` needs a `threshold`",
        ),
        (
            "[[filters]]\nkind = \"deadband\"",
            "filters[0].fields: missing; expected `field` and `threshold`, or `fields`",
        ),
        (
            "[[filters]]\nkind = \"deadband\"\nfield = \"t\"\nthreshold = 1\nfields = [{ field = \"h\", threshold = 1 }]",
            "filters[0].fields: expected either `field` and `threshold`, or `fields`, not both",
        ),
        (
            "[[filters]]\nkind = \"deadband\"\nfields = [{ field = \"t\", threshold = 1 }, { field = \"h\", threshold = -1 }]",
            "filters[0].fields[1].threshold: expected a non-negative number, got -1",
        ),
        (
            "[[filters]]\nkind = \"deadband\"\nfields = [{ field = \"t\", threshold = 1 }, { field = \"\", threshold = 1 }]",
            "filters[0].fields[1].field: expected a field name of 1..=128 bytes",
        ),
        (
            "[[filters]]\nkind = \"deadband\"\nfields = [{ field = \"t\", threshold = 1 }, { field = \"t\", threshold = 2 }]",
            "filters[0].fields[1].field: duplicate field \"t\"",
        ),
        (
            "[[filters]]\nkind = \"deadband\"\nfield = \"t\"\nthreshold = 1\nmax_silence_ms = 0",
            "filters[0].max_silence_ms: expected at least 1, got 0",
        ),
        (
            "[[filters]]\nkind = \"rate_limit\"\nmax_per_second = 0",
            "filters[0].max_per_second: expected 1..=1000000, got 0",
        ),
        (
            "[[filters]]\nkind = \"rate_limit\"\nmax_per_second = 1\nstream_field = \"\"",
            "filters[0].stream_field: expected a field name of 1..=128 bytes",
        ),
        (
            "[[filters]]\nkind = \"decimate\"\nkeep_every = 0",
            "filters[0].keep_every: expected 1..=1000000, got 0",
        ),
        (
            "[[filters]]\nkind = \"drop_duplicates\"\nwindow = 5000",
            "filters[0].window: expected 1..=1024, got 5000",
        ),
        ("[[filters]]\nkind = \"schema\"\nfields = []", "filters[0].fields: expected 1..=64 entries, got 0"),
        (
            "[[filters]]\nkind = \"schema\"\nfields = [{ field = \"s\", type = \"string\", min = 1 }]",
            "filters[0].fields[0].min: expected only with type = \"number\"",
        ),
        (
            "[[filters]]\nkind = \"schema\"\nfields = [{ field = \"t\", type = \"number\", min = 5, max = 1 }]",
            "filters[0].fields[0].max: expected at least min (5), got 1",
        ),
        (
            "[[filters]]\nkind = \"schema\"\nfields = [{ field = \"t\", type = \"number\", max = inf }]",
            "filters[0].fields[0].max: expected a finite number, got inf",
        ),
        (
            "[[filters]]\nkind = \"schema\"\npayload_bytes_max = 100000\nfields = [{ field = \"t\", type = \"number\" }]",
            "filters[0].payload_bytes_max: expected 1..=65536, got 100000",
        ),
        (
            "[[filters]]\nkind = \"normalize_units\"\nconversions = [{ field = \"t\", conversion = \"fahrenheit_to_celsius\", scale = 2 }]",
            "filters[0].conversions[0].scale: expected either `conversion` or `scale`/`offset`, not both",
        ),
        (
            "[[filters]]\nkind = \"normalize_units\"\nconversions = [{ field = \"t\", to = \"u\" }]",
            "filters[0].conversions[0].conversion: missing; expected `conversion` or `scale`/`offset`",
        ),
        (
            "[[filters]]\nkind = \"normalize_units\"\nconversions = [{ field = \"t\", scale = 1, decimals = 16 }]",
            "filters[0].conversions[0].decimals: expected 0..=15, got 16",
        ),
        (
            "[[filters]]\nkind = \"normalize_units\"\nconversions = [{ field = \"t\", conversion = \"furlongs_to_metres\" }]",
            "filters[0].conversions.conversion: unknown variant `furlongs_to_metres`, expected one of `fahrenheit_to_celsius`, `celsius_to_fahrenheit`, `kelvin_to_celsius`, `celsius_to_kelvin`, `pascal_to_hectopascal`, `hectopascal_to_pascal`",
        ),
        ("[[filters]]\nkind = \"tag\"\ntags = {}", "filters[0].tags: expected 1..=32 entries, got 0"),
        (
            "[[filters]]\nkind = \"tag\"\ntags = { \"bad\\nname\" = \"x\" }",
            "filters[0].tags.bad\\nname: expected a name and a value of 1..=128 bytes without control characters",
        ),
        (
            "[[filters]]\nkind = \"tag\"\ntags = { a = \"b\" }\nwhen = { field = \"x\", equals = nan }",
            "filters[0].when.equals: expected a finite number, got NaN",
        ),
        (
            "[[filters]]\nkind = \"tag\"\ntags = { a = \"b\" }\nwhen = { field = \"x\", equals = [1] }",
            "filters[0].when.equals: expected a string, a number or a boolean",
        ),
    ];
    for (filters_toml, expected) in cases {
        check_config_error(filters_toml, expected);
    }
    let too_many = "[[filters]]\nkind = \"decimate\"\nkeep_every = 1\n".repeat(FILTERS_PER_CHAIN_MAX + 1);
    check_config_error(&too_many, "filters: 33 filters configured, at most 32 allowed");
    let configs = vec![FilterConfig::Decimate(DecimateConfig { keep_every: 1, stream_field: None }); 33];
    assert_eq!(
        FilterChain::from_config(&configs).unwrap_err(),
        FilterConfigError::TooManyFilters { count: 33 }
    );
}

/// The daemon may deserialize `Vec<FilterConfig>` as part of its own config struct; that path
/// must accept the same tables and reject unknown keys too.
#[test]
fn direct_serde_agrees_with_list_from_toml() {
    #[derive(serde::Deserialize)]
    struct Source {
        filters: Vec<FilterConfig>,
    }
    #[derive(serde::Serialize)]
    struct Wrapper<'a> {
        filters: &'a [FilterConfig],
    }
    let every_kind = r#"
        [[filters]]
        kind = "rate_limit"
        max_per_second = 10
        [[filters]]
        kind = "decimate"
        keep_every = 5
        stream_field = "sensor"
        [[filters]]
        kind = "deadband"
        field = "temperature_c"
        threshold = 0.05
        [[filters]]
        kind = "drop_duplicates"
        window = 16
        [[filters]]
        kind = "schema"
        fields = [{ field = "sensor", type = "string" }, { field = "temperature_c", type = "number", min = -40, max = 125 }]
        [[filters]]
        kind = "normalize_units"
        conversions = [{ field = "temperature_f", to = "temperature_c", conversion = "fahrenheit_to_celsius" }]
        [[filters]]
        kind = "tag"
        tags = { site = "plant-3" }
        when = { field = "sensor", equals = "env0" }
    "#;
    let direct: Source = toml::from_str(every_kind).expect("direct deserialization");
    let listed = parse_filters(every_kind).expect("list_from_toml");
    assert_eq!(direct.filters, listed);
    let kinds: Vec<&str> = listed.iter().map(FilterConfig::kind).collect();
    assert_eq!(kinds, FILTER_KINDS);
    FilterChain::from_config(&listed).expect("valid");
    let round_trip: Source =
        toml::from_str(&toml::to_string(&Wrapper { filters: &listed }).expect("serializes"))
            .expect("parses back");
    assert_eq!(round_trip.filters, listed);
    let unknown = "[[filters]]\nkind = \"deadband\"\nfield = \"t\"\nthreshold = 1\nthreshhold = 2";
    let error = toml::from_str::<Source>(unknown).err().expect("unknown key rejected").to_string();
    assert!(error.contains("unknown field `threshhold`"), "{error}");
}

fn configs(filters_toml: &str) -> Vec<FilterConfig> {
    parse_filters(filters_toml).expect("test config parses")
}

#[test]
fn reconfigure_midway_loses_no_record_and_applies_from_the_next() {
    let before = r#"
        [[filters]]
        kind = "deadband"
        field = "temperature_c"
        threshold = 0.5
        [[filters]]
        kind = "drop_duplicates"
        window = 4
        [[filters]]
        kind = "rate_limit"
        max_per_second = 100
    "#;
    let after = r#"
        [[filters]]
        kind = "deadband"
        fields = [{ field = "temperature_c", threshold = 2.0 }]
        [[filters]]
        kind = "drop_duplicates"
        window = 1
        [[filters]]
        kind = "decimate"
        keep_every = 2
    "#;
    let mut chain = chain(before);
    let mut verdicts = Vec::new();
    let mut feed = |chain: &mut FilterChain, cases: &[(SourceRecord, Expect)]| {
        run(chain, cases);
        verdicts.extend(cases.iter().map(|(_, expected)| match expected {
            Drop(reason) => Some(*reason),
            _ => None,
        }));
    };
    feed(
        &mut chain,
        &[
            (env(0, "env0", 20.0), Keep),
            (env(1, "env0", 20.2), Drop(DropReason::Deadband)),
            (env(2, "env0", 21.0), Keep),
            (frame(3, b"A"), Keep),
            (frame(4, b"B"), Keep),
            (frame(5, b"A"), Drop(DropReason::Duplicate)),
        ],
    );
    chain.reconfigure(&configs(after)).expect("valid new config");
    assert_eq!(chain.config(), configs(after).as_slice());
    feed(
        &mut chain,
        &[
            // Deadband kept env0's last value (21.0) and applies the new 2.0 threshold at once.
            (env(6, "env0", 22.5), Drop(DropReason::Deadband)),
            // The duplicate window kept its most recent hash (B) and shrank to one.
            (frame(7, b"B"), Drop(DropReason::Duplicate)),
            // A left the shrunk window, so it passes; decimate is new at this position and
            // keeps its first record.
            (frame(8, b"A"), Keep),
            (frame(9, b"C"), Drop(DropReason::Decimate)),
            (env(10, "env0", 23.5), Keep),
        ],
    );
    let counts = chain.metrics().snapshot();
    assert_eq!(counts.records_in, verdicts.len() as u64);
    assert_eq!(counts.records_out, verdicts.iter().filter(|reason| reason.is_none()).count() as u64);
    for reason in DropReason::ALL {
        let expected = verdicts.iter().filter(|verdict| **verdict == Some(reason)).count() as u64;
        assert_eq!(counts.dropped(reason), expected, "{}", reason.as_str());
    }
}

#[test]
fn a_rejected_reconfiguration_leaves_the_old_chain_in_force() {
    let before = "[[filters]]\nkind = \"deadband\"\nfield = \"temperature_c\"\nthreshold = 0.5";
    let mut chain = chain(before);
    run(&mut chain, &[(env(0, "env0", 20.0), Keep)]);
    let bad = vec![FilterConfig::Deadband(DeadbandConfig {
        field: Some("temperature_c".to_owned()),
        threshold: Some(-1.0),
        fields: Vec::new(),
        stream_field: "sensor".to_owned(),
        max_silence_ms: None,
    })];
    let error = chain.reconfigure(&bad).expect_err("negative threshold");
    assert_eq!(error.to_string(), "filters[0].threshold: expected a non-negative number, got -1");
    assert_eq!(chain.config(), configs(before).as_slice());
    run(&mut chain, &[(env(1, "env0", 20.4), Drop(DropReason::Deadband)), (env(2, "env0", 20.5), Keep)]);
    assert_eq!(chain.metrics().snapshot().records_in, 3);
}

#[test]
fn reconfigure_keeps_state_only_where_it_still_means_the_same() {
    let every_second = "[[filters]]\nkind = \"decimate\"\nkeep_every = 2";
    let mut chain = chain(every_second);
    run(&mut chain, &[(env(0, "env0", 1.0), Keep)]);
    // Same kind, same position: the counter carries over (one record since the last kept).
    chain.reconfigure(&configs("[[filters]]\nkind = \"decimate\"\nkeep_every = 3")).expect("valid");
    run(
        &mut chain,
        &[
            (env(1, "env0", 1.0), Drop(DropReason::Decimate)),
            (env(2, "env0", 1.0), Drop(DropReason::Decimate)),
            (env(3, "env0", 1.0), Keep),
            (env(4, "env0", 1.0), Drop(DropReason::Decimate)),
        ],
    );
    // A different stream field names different streams: start fresh.
    chain
        .reconfigure(&configs("[[filters]]\nkind = \"decimate\"\nkeep_every = 3\nstream_field = \"sensor\""))
        .expect("valid");
    run(&mut chain, &[(env(5, "env0", 1.0), Keep), (env(6, "env0", 1.0), Drop(DropReason::Decimate))]);
    // Deadband: values of fields still configured survive; a new field starts without one.
    let deadband = "[[filters]]\nkind = \"deadband\"\nfield = \"temperature_c\"\nthreshold = 1";
    let mut chain = super::tests::chain(deadband);
    let both = |timestamp_ms, temperature_c: f64, humidity_pct: f64| {
        reading(
            timestamp_ms,
            &format!(
                r#"{{"sensor":"env0","temperature_c":{temperature_c:?},"humidity_pct":{humidity_pct:?}}}"#
            ),
        )
    };
    run(&mut chain, &[(both(0, 20.0, 40.0), Keep)]);
    let two_fields = "[[filters]]\nkind = \"deadband\"\nfields = [{ field = \"humidity_pct\", threshold = 1 }, { field = \"temperature_c\", threshold = 1 }]";
    chain.reconfigure(&configs(two_fields)).expect("valid");
    run(
        &mut chain,
        &[
            // No humidity value yet: kept, and humidity is remembered from now on.
            (both(1, 20.1, 40.0), Keep),
            (both(2, 20.2, 40.5), Drop(DropReason::Deadband)),
        ],
    );
    // A different kind at the position: nothing carries over.
    chain.reconfigure(&configs("[[filters]]\nkind = \"decimate\"\nkeep_every = 2")).expect("valid");
    run(&mut chain, &[(both(3, 20.2, 40.5), Keep)]);
}

#[test]
fn stream_state_is_bounded_and_forgets_the_least_recently_seen() {
    let deadband = "[[filters]]\nkind = \"deadband\"\nfield = \"temperature_c\"\nthreshold = 1";
    let mut cases: Vec<_> = (0..=STREAMS_PER_FILTER_MAX as u64)
        .map(|index| (env(index, &format!("s{index}"), 20.0), Keep))
        .collect();
    cases.push((env(2_000, "s1", 20.0), Drop(DropReason::Deadband)));
    // s0 was forgotten to make room for the last new stream, so its reading is kept.
    cases.push((env(2_001, "s0", 20.0), Keep));
    cases.push((env(2_002, "s0", 20.0), Drop(DropReason::Deadband)));
    check(deadband, &cases);
}
