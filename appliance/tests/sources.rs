//! Sources at their boundaries: files in a directory, lines on a Unix socket, HTTP requests on
//! loopback, and the config that builds them. Every wait is bounded by `WAIT`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::{Duration, Instant};

use appliance::sources::{
    AfterSend, BoardConfig, CameraConfig, DirectoryConfig, HttpConfig, HttpSource, JsonSocketConfig,
    SourceConfig, SourceErrorKind, SourceMetrics, build_source,
};
use appliance::{Source, SourceRecord, StopSignal};
use protocol::Lane;
use serde_json::Value;

/// Longest any test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
/// Channel capacity between a source and the test, unless a test needs backpressure.
const CHANNEL_RECORDS_MAX: usize = 64;

/// A source running on its own thread.
struct Running {
    records: Receiver<SourceRecord>,
    stop: StopSignal,
    ended: Receiver<anyhow::Result<()>>,
    metrics: Arc<SourceMetrics>,
}

fn start(source: Box<dyn Source>, metrics: Arc<SourceMetrics>, channel_records_max: usize) -> Running {
    let (out, records) = sync_channel(channel_records_max);
    let (ended_sender, ended) = sync_channel(1);
    let stop = StopSignal::new();
    let stop_for_source = stop.clone();
    std::thread::spawn(move || {
        let _ = ended_sender.send(source.run(out, stop_for_source));
    });
    Running { records, stop, ended, metrics }
}

fn start_built(name: &str, config: SourceConfig) -> Running {
    let (source, metrics) = build_source(name, &config).expect("config is valid");
    assert_eq!(source.name(), name);
    start(source, metrics, CHANNEL_RECORDS_MAX)
}

impl Running {
    fn next_record(&self) -> SourceRecord {
        self.records.recv_timeout(WAIT).expect("a record within the wait")
    }

    /// Connects to the socket source at `socket_path` until a new connection gets a line
    /// through (`after` says what it waits for, on timeout).
    fn wait_until_a_new_connection_is_served(&self, socket_path: &Path, after: &str) {
        wait_until(&format!("a new connection is served {after}"), || {
            let (mut stream, _) = connect(socket_path);
            stream.write_all(b"{\"n\":2}\n").is_ok()
                && self
                    .records
                    .recv_timeout(Duration::from_millis(100))
                    .is_ok_and(|record| record.payload == b"{\"n\":2}")
        });
    }

    /// Stops the source and checks that `run` returns, and returns Ok, within the wait.
    fn stop_and_join(self) -> Arc<SourceMetrics> {
        self.stop.stop();
        let ended = self.ended.recv_timeout(WAIT).expect("run returns soon after stop");
        ended.expect("run ends without error");
        self.metrics
    }
}

/// Polls `condition` until it holds or the wait is over.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn names_in(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn fast_directory(path: &Path) -> DirectoryConfig {
    DirectoryConfig { poll_interval_ms: 10, ..DirectoryConfig::new(path) }
}

// ---------------------------------------------------------------------------------------------
// Directory watcher

#[test]
fn directory_takes_complete_files_and_moves_them_after_sending() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path();
    std::fs::write(path.join("frame.jpg"), b"jpeg bytes").unwrap();
    std::fs::write(path.join("reading.json"), br#"{"t":1}"#).unwrap();
    std::fs::write(path.join("upload.png.partial"), b"half a png").unwrap();
    std::fs::write(path.join(".hidden.jpg"), b"hidden").unwrap();
    std::fs::create_dir(path.join("subdirectory")).unwrap();
    let running = start_built("camera-drop", SourceConfig::Directory(fast_directory(path)));

    let mut records = vec![running.next_record(), running.next_record()];
    records.sort_by(|left, right| left.content_type.cmp(&right.content_type));
    let summary: Vec<_> = records
        .iter()
        .map(|record| {
            (record.content_type.as_str(), record.lane, record.payload.as_slice(), &record.tags["file_name"])
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("application/json", Lane::Sensor, &br#"{"t":1}"#[..], &"reading.json".to_string()),
            ("image/jpeg", Lane::Media, &b"jpeg bytes"[..], &"frame.jpg".to_string()),
        ]
    );
    for record in &records {
        assert!(record.key.starts_with("camera-drop-"), "{}", record.key);
        assert!(protocol::validate_key(&record.key).is_ok());
        assert!(record.timestamp_us > 0);
    }
    assert_ne!(records[0].key, records[1].key);
    wait_until("both files are in done/", || names_in(&path.join("done")) == ["frame.jpg", "reading.json"]);

    // Partial and hidden files stay; once renamed to a complete name the file is taken.
    assert_eq!(names_in(path), [".hidden.jpg", "done", "rejected", "subdirectory", "upload.png.partial"]);
    std::fs::rename(path.join("upload.png.partial"), path.join("upload.png")).unwrap();
    let record = running.next_record();
    assert_eq!((record.content_type.as_str(), record.payload.as_slice()), ("image/png", &b"half a png"[..]));
    wait_until("upload.png is in done/", || path.join("done/upload.png").exists());

    // A second file of the same name does not overwrite the first in done/.
    std::fs::write(path.join("frame.jpg"), b"second frame").unwrap();
    let record = running.next_record();
    let prefixed = format!("{}-frame.jpg", record.key);
    wait_until("the second frame.jpg is in done/ under a prefixed name", || {
        path.join("done").join(&prefixed).exists()
    });
    assert_eq!(std::fs::read(path.join("done/frame.jpg")).unwrap(), b"jpeg bytes");

    let metrics = running.stop_and_join();
    assert_eq!(metrics.records_produced(), 4);
    assert_eq!(metrics.payload_bytes_produced(), (10 + 7 + 10 + 12) as u64);
}

#[test]
fn directory_moves_a_file_only_after_the_pipeline_took_it() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path();
    let (source, metrics) = build_source("slow", &SourceConfig::Directory(fast_directory(path))).unwrap();
    // Room for one record: the second file waits until the test receives the first.
    let running = start(source, metrics, 1);
    std::fs::write(path.join("a.bin"), b"a").unwrap();
    wait_until("a.bin is sent and moved", || path.join("done/a.bin").exists());
    std::fs::write(path.join("b.bin"), b"b").unwrap();
    // b.bin stays while the channel is full; give the watcher many polls to get it wrong.
    std::thread::sleep(Duration::from_millis(200));
    assert!(path.join("b.bin").exists(), "b.bin must stay until the pipeline takes it");
    assert!(!path.join("done/b.bin").exists());
    assert_eq!(running.next_record().payload, b"a");
    assert_eq!(running.next_record().payload, b"b");
    wait_until("b.bin is moved", || path.join("done/b.bin").exists());
    // The stop signal also ends a source that is waiting on a full channel.
    std::fs::write(path.join("c.bin"), b"c").unwrap();
    std::fs::write(path.join("d.bin"), b"d").unwrap();
    wait_until("c.bin is sent", || path.join("done/c.bin").exists());
    running.stop_and_join();
    assert!(path.join("d.bin").exists(), "a file not sent is not moved");
}

#[test]
fn directory_rejects_files_over_the_size_limit_and_keeps_going() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path();
    std::fs::write(path.join("big.bin"), [7u8; 11]).unwrap();
    std::fs::write(path.join("fits.bin"), [7u8; 10]).unwrap();
    let config = DirectoryConfig { file_bytes_max: 10, ..fast_directory(path) };
    let running = start_built("sized", SourceConfig::Directory(config));
    let record = running.next_record();
    assert_eq!(record.payload.len(), 10);
    wait_until("big.bin is in rejected/", || path.join("rejected/big.bin").exists());
    assert_eq!(running.metrics.errors(SourceErrorKind::FileTooLarge), 1);
    assert_eq!(running.records.try_recv().ok(), None, "the large file produced no record");
    let metrics = running.stop_and_join();
    assert_eq!(metrics.records_produced(), 1);
}

#[test]
fn directory_deletes_sent_files_when_asked_to() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path();
    std::fs::write(path.join("gone.json"), b"{}").unwrap();
    let config =
        DirectoryConfig { after_send: AfterSend::Delete, lane: Some("media".into()), ..fast_directory(path) };
    let running = start_built("deleting", SourceConfig::Directory(config));
    let record = running.next_record();
    assert_eq!((record.lane, record.content_type.as_str()), (Lane::Media, "application/json"));
    wait_until("gone.json is deleted", || !path.join("gone.json").exists());
    assert!(names_in(&path.join("done")).is_empty());
    running.stop_and_join();
}

#[test]
fn directory_source_returns_when_the_pipeline_hangs_up() {
    let directory = tempfile::tempdir().unwrap();
    let running = start_built("orphan", SourceConfig::Directory(fast_directory(directory.path())));
    drop(running.records);
    std::fs::write(directory.path().join("late.bin"), b"late").unwrap();
    let ended = running.ended.recv_timeout(WAIT).expect("run returns once nobody listens");
    assert!(ended.is_ok());
    assert!(directory.path().join("late.bin").exists(), "a file nobody took stays");
}

// ---------------------------------------------------------------------------------------------
// JSON lines on a Unix socket

fn connect(path: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let stream = UnixStream::connect(path).expect("the socket accepts connections");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn read_answer(reader: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("an answer within the wait");
    let answer: Value = serde_json::from_str(&line).expect("answers are JSON");
    answer["error"].as_str().expect("answers carry an error").to_string()
}

#[test]
fn socket_accepts_valid_lines_and_answers_invalid_ones_while_serving_on() {
    let directory = tempfile::tempdir().unwrap();
    let socket_path = directory.path().join("records.sock");
    let config = JsonSocketConfig { line_bytes_max: 256, ..JsonSocketConfig::new(&socket_path) };
    let running = start_built("socket", SourceConfig::JsonSocket(config));
    let (mut stream, mut reader) = connect(&socket_path);
    let long_line = format!(r#"{{"padding":"{}"}}"#, "x".repeat(1000));
    let input = [
        r#"{"key":"given-key","timestamp_us":1234,"temperature_millicelsius":21000}"#,
        r#"{"temperature_millicelsius": oops}"#,
        &long_line,
        r#"{"key":"has.dot"}"#,
        "",
        r#"["not", "an", "object"]"#,
        "{\"humidity_millipercent\":45000}\r",
    ];
    for line in input {
        stream.write_all(line.as_bytes()).unwrap();
        stream.write_all(b"\n").unwrap();
    }
    let first = running.next_record();
    assert_eq!((first.key.as_str(), first.timestamp_us, first.lane), ("given-key", 1234, Lane::Sensor));
    assert_eq!(first.content_type, "application/json");
    assert_eq!(first.payload, input[0].as_bytes());
    let second = running.next_record();
    assert!(second.key.starts_with("socket-"), "{}", second.key);
    assert_eq!(second.payload, br#"{"humidity_millipercent":45000}"#);

    let answers: Vec<String> = (0..4).map(|_| read_answer(&mut reader)).collect();
    assert!(answers[0].starts_with("line 2: invalid JSON: "), "{}", answers[0]);
    assert_eq!(answers[1], "line 3: line longer than 256 bytes");
    assert!(answers[2].starts_with("line 4: \"key\" must be a string"), "{}", answers[2]);
    assert_eq!(answers[3], "line 6: expected a JSON object, found an array");

    // The same connection goes on serving, and so does a new one.
    stream.write_all(b"{\"after\":\"errors\"}\n").unwrap();
    assert_eq!(running.next_record().payload, br#"{"after":"errors"}"#);
    let (mut second_stream, _) = connect(&socket_path);
    second_stream.write_all(b"{\"from\":\"second\"}").unwrap();
    drop(second_stream); // A last line without '\n' still counts.
    assert_eq!(running.next_record().payload, br#"{"from":"second"}"#);

    let metrics = running.stop_and_join();
    assert_eq!(metrics.records_produced(), 4);
    assert_eq!(metrics.errors(SourceErrorKind::InvalidJson), 2);
    assert_eq!(metrics.errors(SourceErrorKind::LineTooLong), 1);
    assert_eq!(metrics.errors(SourceErrorKind::InvalidRecord), 1);
    assert!(!socket_path.exists(), "the socket file is removed when the source ends");
}

#[test]
fn socket_turns_away_connections_over_the_limit() {
    let directory = tempfile::tempdir().unwrap();
    let socket_path = directory.path().join("limited.sock");
    let config = JsonSocketConfig { connections_max: 1, ..JsonSocketConfig::new(&socket_path) };
    let running = start_built("limited", SourceConfig::JsonSocket(config));
    let (mut first, first_reader) = connect(&socket_path);
    first.write_all(b"{\"n\":1}\n").unwrap();
    running.next_record(); // The first connection is being served.
    let (_second, mut second_reader) = connect(&socket_path);
    let answer = read_answer(&mut second_reader);
    assert_eq!(answer, "too many connections (at most 1); try again later");
    assert_eq!(running.metrics.errors(SourceErrorKind::TooManyConnections), 1);
    drop((first, first_reader));
    running.wait_until_a_new_connection_is_served(&socket_path, "after the first closed");
    running.stop_and_join();
}

#[test]
fn socket_replaces_a_stale_socket_file_but_nothing_else() {
    let directory = tempfile::tempdir().unwrap();
    let socket_path = directory.path().join("stale.sock");
    let stale = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    drop(stale);
    let running = start_built("stale", SourceConfig::JsonSocket(JsonSocketConfig::new(&socket_path)));
    running.stop_and_join();

    let regular_file = directory.path().join("regular");
    std::fs::write(&regular_file, b"keep me").unwrap();
    let Err(error) = build_source("clash", &SourceConfig::JsonSocket(JsonSocketConfig::new(&regular_file)))
    else {
        panic!("a regular file in the socket's place must be refused");
    };
    assert!(error.to_string().starts_with("source \"clash\": key \"path\": cannot listen on"), "{error}");
    assert_eq!(std::fs::read(&regular_file).unwrap(), b"keep me");
}

#[test]
fn socket_source_stops_promptly_with_idle_and_busy_clients() {
    let directory = tempfile::tempdir().unwrap();
    let socket_path = directory.path().join("stop.sock");
    let (source, metrics) =
        build_source("stopping", &SourceConfig::JsonSocket(JsonSocketConfig::new(&socket_path))).unwrap();
    // A channel of one record that nobody drains: the second line leaves the source waiting.
    let running = start(source, metrics, 1);
    let (_idle, _) = connect(&socket_path);
    let (mut busy, _) = connect(&socket_path);
    busy.write_all(b"{\"n\":1}\n{\"n\":2}\n").unwrap();
    wait_until("the first line was taken", || running.metrics.records_produced() == 1);
    running.stop_and_join();
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// One HTTP/1.1 request on a fresh connection; the status and the body parsed as JSON.
fn request(address: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(address).expect("the server accepts connections");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // One write, so a body the server refuses unread is already in its buffer when it answers.
    let mut message = head.into_bytes();
    message.extend_from_slice(body);
    stream.write_all(&message).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8(response).expect("responses are UTF-8");
    let status =
        response.get(9..12).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("{response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn start_http(config: HttpConfig) -> (Running, SocketAddr) {
    let metrics = Arc::new(SourceMetrics::default());
    let source = HttpSource::bind("web", &config, metrics.clone()).expect("loopback port 0 binds");
    let address = source.local_address();
    (start(Box::new(source), metrics, CHANNEL_RECORDS_MAX), address)
}

fn loopback_any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
fn http_accepts_json_lines_and_single_objects() {
    let (running, address) = start_http(HttpConfig::new(loopback_any_port()));
    let lines = b"{\"key\":\"k-1\",\"timestamp_us\":10,\"v\":1}\n\n{\"v\":2}\r\n{\"v\":3}\n";
    assert_eq!(request(address, "POST", "/v1/records", lines), (202, serde_json::json!({ "accepted": 3 })));
    let records: Vec<SourceRecord> = (0..3).map(|_| running.next_record()).collect();
    assert_eq!((records[0].key.as_str(), records[0].timestamp_us), ("k-1", 10));
    assert_eq!(records[1].payload, br#"{"v":2}"#);
    assert!(records[2].key.starts_with("web-"));
    assert!(
        records.iter().all(|record| record.lane == Lane::Sensor && record.content_type == "application/json")
    );

    let pretty = b"{\n  \"sensor\": \"env0\",\n  \"temperature_millicelsius\": 21000\n}\n";
    assert_eq!(request(address, "POST", "/v1/records", pretty), (202, serde_json::json!({ "accepted": 1 })));
    let record = running.next_record();
    let payload: Value = serde_json::from_slice(&record.payload).unwrap();
    assert_eq!(payload["temperature_millicelsius"], 21000);
    let metrics = running.stop_and_join();
    assert_eq!(metrics.records_produced(), 4);
}

#[test]
fn http_refuses_bad_bodies_whole_with_clear_answers_and_serves_on() {
    let config = HttpConfig { body_bytes_max: 1024, ..HttpConfig::new(loopback_any_port()) };
    let (running, address) = start_http(config);

    let (status, answer) =
        request(address, "POST", "/v1/records", b"{\"v\":1}\nnot json\n{\"key\":\"a/b\"}\n");
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "2 of 3 lines refused; nothing was accepted");
    let problems = answer["problems"].as_array().unwrap();
    assert!(problems[0].as_str().unwrap().starts_with("line 2: invalid JSON: "), "{problems:?}");
    assert!(problems[1].as_str().unwrap().starts_with("line 3: \"key\" must be a string"), "{problems:?}");

    let (status, answer) = request(address, "POST", "/v1/records", b" \n");
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("empty request body; send one JSON object or JSON lines"))
    );

    let (status, answer) = request(address, "POST", "/v1/records", &[b' '; 1025]);
    assert_eq!(status, 413);
    assert_eq!(answer["error"], "request body larger than 1024 bytes; send fewer records per request");

    let (status, answer) = request(address, "POST", "/v1/elsewhere", b"{}");
    assert_eq!((status, answer["error"].as_str()), (404, Some("no such path; POST records to /v1/records")));
    assert_eq!(request(address, "GET", "/v1/records", b"").0, 405);

    // Nothing from the refused bodies reached the pipeline, and the server still serves.
    assert_eq!(request(address, "POST", "/v1/records", b"{\"after\":1}").0, 202);
    assert_eq!(running.next_record().payload, br#"{"after":1}"#);
    let metrics = running.stop_and_join();
    assert_eq!(metrics.records_produced(), 1);
    assert_eq!(metrics.errors(SourceErrorKind::InvalidJson), 2);
    assert_eq!(metrics.errors(SourceErrorKind::InvalidRecord), 1);
    assert_eq!(metrics.errors(SourceErrorKind::BodyTooLarge), 1);
}

#[test]
fn http_refuses_bodies_with_too_many_records() {
    let (running, address) = start_http(HttpConfig::new(loopback_any_port()));
    let body = "{}\n".repeat(appliance::sources::RECORDS_PER_BODY_MAX + 1);
    let (status, answer) = request(address, "POST", "/v1/records", body.as_bytes());
    assert_eq!(status, 413);
    assert_eq!(answer["error"], "request body holds more than 10000 records; send fewer per request");
    assert_eq!(running.records.try_recv().ok(), None);
    running.stop_and_join();
}

#[test]
fn http_closes_idle_connections_so_waiting_clients_get_served() {
    let config =
        HttpConfig { connections_max: 1, idle_timeout_ms: 200, ..HttpConfig::new(loopback_any_port()) };
    let (running, address) = start_http(config);
    let mut idle = TcpStream::connect(address).unwrap();
    idle.set_read_timeout(Some(WAIT)).unwrap();
    // The only slot goes to the idle client; this request waits in the backlog until it is closed.
    assert_eq!(request(address, "POST", "/v1/records", b"{}").0, 202);
    let mut unanswered = Vec::new();
    let closed = idle.read_to_end(&mut unanswered).map_or(true, |_| unanswered.is_empty());
    assert!(closed, "the idle connection was closed without an answer: {unanswered:?}");
    running.stop_and_join();
}

#[test]
fn http_source_stops_promptly_with_an_idle_connection_open() {
    let (running, address) = start_http(HttpConfig::new(loopback_any_port()));
    let _idle = TcpStream::connect(address).unwrap();
    assert_eq!(request(address, "POST", "/v1/records", b"{}").0, 202);
    running.stop_and_join();
}

// ---------------------------------------------------------------------------------------------
// Config

#[derive(serde::Deserialize)]
struct DaemonConfig {
    sources: std::collections::BTreeMap<String, SourceConfig>,
}

#[test]
fn toml_examples_parse_to_the_configs_they_mean() {
    let text = r#"
        [sources.camera-drop]
        kind = "directory"
        path = "/data/incoming"
        poll_interval_ms = 500
        file_bytes_max = 2000000
        after_send = "delete"

        [sources.local-sensors]
        kind = "json_socket"
        path = "/run/tributary/sensors.sock"
        line_bytes_max = 4096

        [sources.web]
        kind = "http"
        listen = "127.0.0.1:8081"
        lane = "sensor"

        [sources.devkit-sensors]
        kind = "board"
        profile = "board/profiles/sim-devkit.toml"

        [sources.devkit-camera]
        kind = "camera"
        profile = "board/profiles/sim-devkit.toml"
        camera = "cam0"
        fps = 2
    "#;
    let config: DaemonConfig = toml::from_str(text).unwrap();
    let devkit = std::path::PathBuf::from("board/profiles/sim-devkit.toml");
    let expected = [
        (
            "devkit-camera",
            SourceConfig::Camera(CameraConfig {
                profile: devkit.clone(),
                camera: Some("cam0".into()),
                fps: Some(2),
                lane: None,
            }),
        ),
        ("devkit-sensors", SourceConfig::Board(BoardConfig { profile: devkit.clone(), lane: None })),
        (
            "camera-drop",
            SourceConfig::Directory(DirectoryConfig {
                poll_interval_ms: 500,
                file_bytes_max: 2_000_000,
                after_send: AfterSend::Delete,
                ..DirectoryConfig::new("/data/incoming")
            }),
        ),
        (
            "local-sensors",
            SourceConfig::JsonSocket(JsonSocketConfig {
                line_bytes_max: 4096,
                ..JsonSocketConfig::new("/run/tributary/sensors.sock")
            }),
        ),
        (
            "web",
            SourceConfig::Http(HttpConfig {
                lane: Some("sensor".into()),
                ..HttpConfig::new("127.0.0.1:8081".parse().unwrap())
            }),
        ),
    ];
    let expected: std::collections::BTreeMap<String, SourceConfig> =
        expected.into_iter().map(|(name, config)| (name.to_string(), config)).collect();
    assert_eq!(config.sources, expected);
}

#[test]
fn unknown_kinds_and_keys_are_refused_by_name() {
    let check = |text: &str, expected: &str| {
        let error =
            toml::from_str::<SourceConfig>(text).err().unwrap_or_else(|| panic!("{text} must not parse"));
        assert!(error.to_string().contains(expected), "{text}: {error}");
    };
    check("kind = \"ftp\"", "unknown variant `ftp`");
    check("kind = \"http\"\nlisten = \"127.0.0.1:1\"\nbody_max = 1", "unknown field `body_max`");
    check("kind = \"directory\"", "missing field `path`");
    check("kind = \"directory\"\npath = \"/x\"\nafter_send = \"shred\"", "unknown variant `shred`");
}

#[test]
fn invalid_values_are_refused_naming_the_key_and_what_was_expected() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path();
    let check = |name: &str, config: SourceConfig, expected: &str| {
        let Err(error) = build_source(name, &config) else { panic!("{config:?} must be refused") };
        assert_eq!(error.to_string(), expected);
    };
    check(
        "dir",
        SourceConfig::Directory(DirectoryConfig { poll_interval_ms: 0, ..DirectoryConfig::new(path) }),
        "source \"dir\": key \"poll_interval_ms\": expected 10..=3600000 milliseconds, found 0",
    );
    check(
        "dir",
        SourceConfig::Directory(DirectoryConfig::new(path.join("missing"))),
        &format!(
            "source \"dir\": key \"path\": expected an existing directory, found {:?} (missing or not a directory)",
            path.join("missing").display().to_string()
        ),
    );
    check(
        "dir",
        SourceConfig::Directory(DirectoryConfig { file_bytes_max: 5_000_000, ..DirectoryConfig::new(path) }),
        "source \"dir\": key \"file_bytes_max\": expected 1..=4194145 bytes, found 5000000",
    );
    check(
        "dir",
        SourceConfig::Directory(DirectoryConfig { lane: Some("video".into()), ..DirectoryConfig::new(path) }),
        "source \"dir\": key \"lane\": expected one of \"audit\", \"decisions\", \"sensor\", \"media\", found \"video\"",
    );
    check(
        "bad.name",
        SourceConfig::Directory(DirectoryConfig::new(path)),
        "source \"bad.name\": key \"name\": expected a source name of 1..=59 bytes of printable ASCII without \
         space, '.', '/' or '\\', found \"bad.name\"",
    );
    check(
        "sock",
        SourceConfig::JsonSocket(JsonSocketConfig {
            connections_max: 0,
            ..JsonSocketConfig::new(path.join("s"))
        }),
        "source \"sock\": key \"connections_max\": expected 1..=1024 connections, found 0",
    );
    check(
        "web",
        SourceConfig::Http(HttpConfig { body_bytes_max: 0, ..HttpConfig::new(loopback_any_port()) }),
        "source \"web\": key \"body_bytes_max\": expected 1..=4000000 bytes, found 0",
    );
    let taken = std::net::TcpListener::bind(loopback_any_port()).unwrap();
    let Err(error) = build_source("web", &SourceConfig::Http(HttpConfig::new(taken.local_addr().unwrap())))
    else {
        panic!("a taken port must be refused");
    };
    assert!(
        error.to_string().starts_with("source \"web\": key \"listen\": cannot listen on 127.0.0.1:"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Board profiles: sensors and cameras from the simulator

/// A simulated board: a flaky SHT3x (three reads in ten fail), an accelerometer, two cameras.
const TEST_PROFILE: &str = r#"
name = "test-kit"
backend = "sim"

[[sensors]]
name = "env0"
kind = "sht3x"
bus = "i2c-1"
address = 0x44
period_ms = 2
[sensors.sim]
seed = 3
temperature_c = 22.5
humidity_pct = 41.0
fault_rate = 0.3
faults = ["crc", "nack", "out_of_range"]

[[sensors]]
name = "accel0"
kind = "adxl345"
bus = "spi-0.0"
period_ms = 2
[sensors.sim]
acceleration_mg = [0, 0, 1000]

[[cameras]]
name = "cam0"
kind = "sim"
width = 64
height = 48
fps = 5

[[cameras]]
name = "cam1"
kind = "sim"
width = 32
height = 24
fps = 5
"#;

fn write_profile(directory: &Path) -> std::path::PathBuf {
    let path = directory.join("test-kit.toml");
    std::fs::write(&path, TEST_PROFILE).unwrap();
    path
}

#[test]
fn board_source_reads_every_sensor_and_skips_bad_readings() {
    let directory = tempfile::tempdir().unwrap();
    let profile = write_profile(directory.path());
    let config = SourceConfig::Board(BoardConfig { profile, lane: None });
    let running = start_built("board", config);
    let mut per_sensor = std::collections::BTreeMap::<String, Vec<Value>>::new();
    while per_sensor.values().filter(|readings| readings.len() >= 10).count() < 2 {
        let record = running.next_record();
        assert_eq!((record.lane, record.content_type.as_str()), (Lane::Sensor, "application/json"));
        assert!(record.key.starts_with("board-") && protocol::validate_key(&record.key).is_ok());
        let reading: Value = serde_json::from_slice(&record.payload).expect("readings are JSON");
        let sensor = reading["sensor"].as_str().expect("readings name their sensor").to_string();
        per_sensor.entry(sensor).or_default().push(reading);
    }
    assert_eq!(per_sensor.keys().collect::<Vec<_>>(), ["accel0", "env0"]);
    for reading in &per_sensor["env0"] {
        let temperature_c = reading["temperature_c"].as_f64().unwrap();
        let humidity_pct = reading["humidity_pct"].as_f64().unwrap();
        assert!((22.0..23.0).contains(&temperature_c) && (40.0..42.0).contains(&humidity_pct), "{reading}");
    }
    for reading in &per_sensor["accel0"] {
        let z_mg = reading["z_mg"].as_f64().unwrap();
        assert!((900.0..1100.0).contains(&z_mg) && reading["x_mg"].is_number(), "{reading}");
    }
    let metrics = running.stop_and_join();
    // The sensor kinds are the ones whose metrics label starts `sensor_`.
    let sensor_errors: u64 = SourceErrorKind::ALL
        .iter()
        .filter(|kind| kind.name().starts_with("sensor_"))
        .map(|&kind| metrics.errors(kind))
        .sum();
    assert!(sensor_errors > 0, "the flaky sensor's faults are counted");
    let all_errors: u64 = SourceErrorKind::ALL.iter().map(|&kind| metrics.errors(kind)).sum();
    assert_eq!(all_errors, sensor_errors, "only sensor faults happened");
}

/// Width and height from a JPEG's start-of-frame segment (SOF0..SOF2).
fn jpeg_dimensions(jpeg: &[u8]) -> Option<(u16, u16)> {
    let mut position = 2;
    while position + 9 <= jpeg.len() {
        let (marker, kind) = (jpeg[position], jpeg[position + 1]);
        if marker != 0xFF {
            return None;
        }
        let length = usize::from(u16::from_be_bytes([jpeg[position + 2], jpeg[position + 3]]));
        if (0xC0..=0xC2).contains(&kind) {
            let height = u16::from_be_bytes([jpeg[position + 5], jpeg[position + 6]]);
            let width = u16::from_be_bytes([jpeg[position + 7], jpeg[position + 8]]);
            return Some((width, height));
        }
        position += 2 + length;
    }
    None
}

#[test]
fn camera_source_sends_jpeg_frames_of_the_named_camera() {
    let directory = tempfile::tempdir().unwrap();
    let profile = write_profile(directory.path());
    let config = CameraConfig { profile, camera: Some("cam0".into()), fps: Some(50), lane: None };
    let running = start_built("camera", SourceConfig::Camera(config));
    let frames: Vec<SourceRecord> = (0..3).map(|_| running.next_record()).collect();
    for frame in &frames {
        assert_eq!((frame.lane, frame.content_type.as_str()), (Lane::Media, "image/jpeg"));
        assert_eq!(frame.tags["camera"], "cam0");
        assert!(frame.payload.starts_with(&[0xFF, 0xD8]) && frame.payload.ends_with(&[0xFF, 0xD9]));
        assert_eq!(jpeg_dimensions(&frame.payload), Some((64, 48)));
    }
    assert!(frames[0].key < frames[1].key && frames[1].key < frames[2].key);
    let metrics = running.stop_and_join();
    assert!(metrics.records_produced() >= 3);
    assert!(SourceErrorKind::ALL.iter().all(|&kind| metrics.errors(kind) == 0));
}

#[test]
fn board_configs_are_refused_naming_the_key() {
    let directory = tempfile::tempdir().unwrap();
    let profile = write_profile(directory.path());
    let check = |config: SourceConfig, expected: &str| {
        let Err(error) = build_source("kit", &config) else { panic!("{config:?} must be refused") };
        assert!(error.to_string().starts_with(expected), "{error}");
    };
    let camera = |camera: Option<&str>, fps: Option<u32>| {
        SourceConfig::Camera(CameraConfig {
            profile: profile.clone(),
            camera: camera.map(Into::into),
            fps,
            lane: None,
        })
    };
    check(
        camera(Some("cam9"), None),
        "source \"kit\": key \"camera\": expected one of the profile's cameras [\"cam0\", \"cam1\"], found \"cam9\"",
    );
    check(
        camera(None, None),
        "source \"kit\": key \"camera\": expected one of the profile's cameras [\"cam0\", \"cam1\"], found nothing",
    );
    check(
        camera(Some("cam1"), Some(0)),
        "source \"kit\": key \"fps\": expected 1..=120 frames per second, found 0",
    );
    let missing = directory.path().join("missing.toml");
    check(
        SourceConfig::Board(BoardConfig { profile: missing.clone(), lane: None }),
        &format!("source \"kit\": key \"profile\": {}: cannot read board profile", missing.display()),
    );
    std::fs::write(&missing, TEST_PROFILE.replace("address = 0x44", "address = 0x46")).unwrap();
    check(
        SourceConfig::Board(BoardConfig { profile: missing.clone(), lane: None }),
        &format!("source \"kit\": key \"profile\": {}: sensors[0].address", missing.display()),
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile clients (issue 15): limits set small in the config; the tests assert what happens
// (closed, refused, 408), never how fast.

/// Writes `prefix`, then one more byte every 20 ms, never finishing; true once the server has
/// closed the connection (a write fails or a read ends), false if it is still open after `WAIT`.
fn trickle_until_closed(
    mut stream: impl std::io::Write,
    mut reader: impl std::io::Read + Send + 'static,
    prefix: &[u8],
) -> bool {
    let (closed_sender, closed) = sync_channel(1);
    std::thread::spawn(move || {
        let mut buffer = [0u8; 256];
        // Any answer, end of stream or error means the server let go.
        while reader.read(&mut buffer).is_ok_and(|read| read > 0) {}
        let _ = closed_sender.send(());
    });
    let deadline = Instant::now() + WAIT;
    for &byte in prefix.iter().chain(std::iter::repeat(&b'a')) {
        if Instant::now() > deadline {
            return false;
        }
        if stream.write_all(&[byte]).is_err() || closed.try_recv().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unreachable!("the trickle is endless")
}

/// Posts `body` until the answer is not a 503 (every slot taken), within `WAIT`.
fn request_eventually(address: SocketAddr, body: &[u8]) -> (u16, Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "a well-behaved client was never served");
        if let Ok(mut stream) = TcpStream::connect(address) {
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut message = format!(
                "POST /v1/records HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            message.extend_from_slice(body);
            let mut response = Vec::new();
            // A refused connection may be reset before its 503 is read: try again.
            if stream.write_all(&message).is_ok() && stream.read_to_end(&mut response).is_ok() {
                let response = String::from_utf8_lossy(&response);
                let status = response.get(9..12).and_then(|code| code.parse::<u16>().ok());
                if let Some(status) = status.filter(|&status| status != 503) {
                    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
                    return (status, serde_json::from_str(body).unwrap_or(Value::Null));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hostile_http_config() -> HttpConfig {
    HttpConfig {
        connections_max: 1,
        connections_queued_max: 0,
        header_timeout_ms: 1_000,
        body_timeout_ms: 1_000,
        // Far longer than the trickle's 20 ms: only the header and body timeouts can fire.
        idle_timeout_ms: 60_000,
        ..HttpConfig::new(loopback_any_port())
    }
}

#[test]
fn http_cuts_off_a_slowloris_client_and_then_serves_a_well_behaved_one() {
    let (running, address) = start_http(hostile_http_config());
    let slow = TcpStream::connect(address).unwrap();
    let reader = slow.try_clone().unwrap();
    let slow_thread = std::thread::spawn(move || {
        trickle_until_closed(slow, reader, b"POST /v1/records HTTP/1.1\r\nHost: test\r\nX-Padding: ")
    });
    // While the slow client holds the only slot, others are refused; once the header timeout
    // cuts it off, a well-behaved client is served.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(request_eventually(address, b"{\"n\":1}").0, 202);
    assert!(slow_thread.join().unwrap(), "the slow client was never cut off");
    assert_eq!(running.next_record().payload, b"{\"n\":1}");
    let metrics = running.stop_and_join();
    assert_eq!(metrics.errors(SourceErrorKind::HeaderTimeout), 1);
    assert!(metrics.errors(SourceErrorKind::TooManyConnections) >= 1, "the slot was held, others refused");
}

#[test]
fn http_queues_connections_to_a_bound_and_refuses_the_rest_with_503() {
    let config = HttpConfig { connections_queued_max: 1, header_timeout_ms: 60_000, ..hostile_http_config() };
    let (running, address) = start_http(config);
    let mut holder = TcpStream::connect(address).unwrap();
    holder.write_all(b"POST /v1/records HTTP/1.1\r\n").unwrap();
    let mut queued = TcpStream::connect(address).unwrap();
    wait_until("the second connection is queued", || running.metrics.connections_queued() == 1);
    let mut refused = TcpStream::connect(address).unwrap();
    refused.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = Vec::new();
    refused.read_to_end(&mut answer).expect("the refused connection is answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert_eq!(running.metrics.errors(SourceErrorKind::TooManyConnections), 1);
    // The queued connection is served once the slot is free.
    drop(holder);
    queued.set_read_timeout(Some(WAIT)).unwrap();
    queued
        .write_all(
            b"POST /v1/records HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        .unwrap();
    let mut answer = Vec::new();
    queued.read_to_end(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 202 "));
    running.stop_and_join();
}

#[test]
fn http_answers_408_to_a_trickled_body_and_413_to_a_large_one() {
    let config = HttpConfig { connections_max: 4, body_bytes_max: 1024, ..hostile_http_config() };
    let (running, address) = start_http(config);
    assert_eq!(request(address, "POST", "/v1/records", &[b' '; 1025]).0, 413);
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(b"POST /v1/records HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n").unwrap();
    let mut writer = stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline && writer.write_all(b" ").is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    // Closed, by FIN or (the rest of the body unread) by reset; not still open at the wait's end.
    let still_open = read.as_ref().is_err_and(|error| {
        matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    });
    assert!(!still_open, "the connection was not closed after the 408: {read:?}");
    trickle.join().unwrap();
    let metrics = running.stop_and_join();
    assert_eq!(metrics.errors(SourceErrorKind::BodyTimeout), 1);
    assert_eq!(metrics.errors(SourceErrorKind::BodyTooLarge), 1);
}

#[test]
fn socket_closes_a_connection_that_trickles_a_line_and_serves_the_next() {
    let directory = tempfile::tempdir().unwrap();
    let socket_path = directory.path().join("slow.sock");
    let config =
        JsonSocketConfig { connections_max: 1, idle_timeout_ms: 300, ..JsonSocketConfig::new(&socket_path) };
    let running = start_built("slow", SourceConfig::JsonSocket(config));
    let (slow, reader) = connect(&socket_path);
    assert!(
        trickle_until_closed(slow, reader.into_inner(), b"{\"padding\":\""),
        "a client trickling one line was never cut off"
    );
    assert_eq!(running.metrics.errors(SourceErrorKind::IdleTimeout), 1);
    running.wait_until_a_new_connection_is_served(&socket_path, "after the slow one was closed");
    running.stop_and_join();
}
