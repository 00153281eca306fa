//! A fleet on one machine for end-to-end tests: a CA, a sink (in-process or as a child process
//! that can be killed with SIGKILL), appliances with rings, and helpers that produce records and
//! read back what the sink landed.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use appliance::UplinkConfig;
use buffer::{Ring, RingConfig};
use core_sink::SinkConfig;
use fleet::{FleetCa, IssuedCertificate, Validity};
use protocol::{ChunkBuilder, ChunkDecompressor, Lane, RecordRef};

pub const MIB: u64 = 1024 * 1024;

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub ca: FleetCa,
}

impl Fleet {
    pub fn new() -> Fleet {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = FleetCa::init(&dir.path().join("ca"), "test fleet").expect("CA");
        let server = ca
            .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()], Validity::days(1))
            .expect("server cert");
        server.write_to(&dir.path().join("server"), ca.certificate_pem()).expect("write server cert");
        Fleet { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A sink config on `listen` with fast commit points, so tests see Acks quickly.
    pub fn sink_config(&self, listen: SocketAddr) -> SinkConfig {
        let mut config = SinkConfig::new(listen, self.path());
        config.commit_interval_ms = 20;
        config.transport.idle_timeout_ms = 3_000;
        config.transport.keep_alive_ms = 500;
        config
    }

    pub fn device(&self, device_id: &str) -> IssuedCertificate {
        self.ca.issue_device(device_id, Validity::days(1)).expect("device cert")
    }

    pub fn uplink_config(&self, device_id: &str, sink: SocketAddr) -> UplinkConfig {
        let mut config = UplinkConfig::new(
            sink,
            "localhost",
            device_id,
            self.device(device_id),
            self.ca.certificate_pem(),
        );
        config.transport.idle_timeout_ms = 3_000;
        config.transport.keep_alive_ms = 500;
        config.reconnect_max_ms = 500;
        config.connect_timeout_ms = 2_000;
        config
    }

    pub fn ring_path(&self, device_id: &str) -> PathBuf {
        self.path().join("rings").join(device_id)
    }

    pub fn open_ring(&self, device_id: &str, capacity_bytes: u64) -> Ring {
        Ring::open(self.ring_path(device_id), RingConfig::with_capacity(capacity_bytes)).expect("ring")
    }

    pub fn landing_dir(&self) -> PathBuf {
        self.path().join("landing")
    }
}

// Not every test file uses both.
#[allow(unused_imports)]
pub use testkit::{free_udp_port, wait_until};

/// Waits (at most `limit`) until the sink acknowledged every chunk of `lanes` in `ring`;
/// returns whether it did.
pub async fn wait_drained(ring: &Ring, lanes: &[Lane], limit: std::time::Duration) -> bool {
    wait_until(limit, || {
        let stats = ring.stats();
        lanes.iter().all(|lane| stats.lane(*lane).acked_through + 1 == stats.lane(*lane).next_seq)
    })
    .await
}

/// Record key for (device, lane, n): unique, dot-free, sortable.
pub fn record_key(device: &str, lane: Lane, index: u64) -> String {
    format!("{device}-{}-{index:010}", lane.name())
}

/// A JSON sensor reading of 254–256 bytes (the benchmarks' `sensor_json` in `src/bench_uplink.rs`).
pub fn sensor_payload(index: u64) -> Vec<u8> {
    format!(
        "{{\"sensor\":\"temp-{:03}\",\"seq\":{index},\"celsius\":{:.3},\"humidity\":{:.2},\"status\":\"ok\",\
         \"site\":\"north-yard\",\"firmware\":\"1.4.2\",\"calibration\":{{\"offset\":0.125,\"gain\":1.002}},\
         \"tags\":[\"edge\",\"outdoor\",\"shaded\"],\"note\":\"periodic reading from the simulated sensor bus\"}}",
        index % 64,
        20.0 + (index % 1000) as f64 / 100.0,
        40.0 + (index % 500) as f64 / 10.0
    )
    .into_bytes()
}

/// Appends `count` records (keys `record_key(device, lane, first..first+count)`) to the ring in
/// zstd chunks of about 64 KiB raw. Returns the seqs appended.
pub fn produce(ring: &Ring, device: &str, lane: Lane, first: u64, count: u64) -> Vec<u64> {
    let records = (first..first + count)
        .map(|index| (record_key(device, lane, index), 1_700_000_000_000_000 + index, sensor_payload(index)));
    testkit::append_json_records(ring, lane, records)
}

/// Every record the sink landed for `device`, per lane, in file order: (seq, key).
pub fn landed_records(landing_dir: &Path, device: &str) -> BTreeMap<Lane, Vec<(u64, String)>> {
    let mut landed = BTreeMap::new();
    for_each_landed_record(landing_dir, device, |lane, seq, record| {
        landed.entry(lane).or_insert_with(Vec::new).push((seq, record.key.to_string()));
    });
    landed
}

/// Every record the sink landed for `device`, per lane, in file order: (key, payload).
pub fn landed_payloads(landing_dir: &Path, device: &str) -> BTreeMap<Lane, Vec<(String, Vec<u8>)>> {
    let mut landed = BTreeMap::new();
    for_each_landed_record(landing_dir, device, |lane, _, record| {
        landed.entry(lane).or_insert_with(Vec::new).push((record.key.to_string(), record.payload.to_vec()));
    });
    landed
}

/// Decodes every landed chunk of `device` with the dictionaries the sink stored (the sink's
/// state directory is the landing directory's sibling `state`, as `SinkConfig::new` lays out).
fn for_each_landed_record(
    landing_dir: &Path,
    device: &str,
    mut visit: impl FnMut(Lane, u64, protocol::RecordRef<'_>),
) {
    let mut decompressor = ChunkDecompressor::new();
    let dictionaries_dir = landing_dir.parent().expect("landing dir has a parent").join("state/dictionaries");
    let store = core_sink::dictionaries::DictionaryStore::open(&dictionaries_dir).expect("dictionary store");
    store
        .register_all(device, &mut decompressor, &mut std::collections::HashSet::new())
        .expect("dictionaries");
    for lane in Lane::ALL {
        let directory = landing_dir.join("raw").join(device).join(lane.name());
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&directory) {
            Ok(entries) => entries.map(|entry| entry.expect("dir entry").path()).collect(),
            Err(_) => continue,
        };
        files.sort();
        for file in files {
            for (header, encoded) in
                core_sink::landing::read_landed_file(&file).expect("landed file is intact")
            {
                let (_, body) = protocol::decode_chunk(&encoded).expect("chunk");
                let raw = decompressor.decompress(&header, body).expect("decompress");
                for record in protocol::records(&raw) {
                    visit(lane, header.seq, record.expect("record"));
                }
            }
        }
    }
}

/// Asserts that the sink landed exactly `expected` keys for (device, lane): each once, in order.
pub fn assert_landed_exactly_once(
    landed: &BTreeMap<Lane, Vec<(u64, String)>>,
    lane: Lane,
    expected: &[String],
) {
    let records = landed.get(&lane).map(Vec::as_slice).unwrap_or_default();
    let keys: Vec<&String> = records.iter().map(|(_, key)| key).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), keys.len(), "{lane}: {} duplicate records landed", keys.len() - sorted.len());
    assert!(records.windows(2).all(|pair| pair[0].0 <= pair[1].0), "{lane}: chunks landed out of seq order");
    assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "{lane}: records landed out of order");
    let expected_refs: Vec<&String> = expected.iter().collect();
    if keys != expected_refs {
        let missing = expected.iter().filter(|key| !keys.contains(key)).count();
        panic!("{lane}: landed {} records, expected {} ({missing} missing)", keys.len(), expected.len());
    }
}

/// Writes a TOML config for a sink child process on `listen`, with datasets on two targets
/// (`ost0`, `ost1`) and small, short-lived shards so kills land during shard writing.
pub fn write_sink_config(fleet: &Fleet, listen: SocketAddr) -> PathBuf {
    let path = fleet.path().join("sink.toml");
    let text = format!(
        "listen = \"{listen}\"\nstate_dir = \"state\"\nlanding_dir = \"landing\"\nca_dir = \"ca\"\n\
         server_certificate_dir = \"server\"\nrevocation_file = \"ca/revoked.txt\"\ncommit_interval_ms = 20\n\
         [transport]\nidle_timeout_ms = 3000\nkeep_alive_ms = 500\n\
         [datasets]\ntargets = [\"ost0\", \"ost1\"]\nmanifest_dir = \"manifests\"\nshard_bytes_max = 1048576\n\
         shard_age_max_ms = 300\n"
    );
    std::fs::write(&path, text).expect("write sink config");
    path
}

/// Appends `count` JPEG-like media records (random bytes, 5–50 KiB, content type image/jpeg) in
/// raw chunks of up to 256 KiB; returns (key, sha256 hex of the payload) for each.
pub fn produce_media(ring: &Ring, device: &str, first: u64, count: u64) -> Vec<(String, String)> {
    use sha2::Digest as _;
    let mut produced = Vec::new();
    let mut builder = ChunkBuilder::new(Lane::Media, 256 * 1024);
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ first;
    for index in first..first + count {
        let key = record_key(device, Lane::Media, index);
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = 5 * 1024 + (state % (45 * 1024)) as usize;
        let payload: Vec<u8> = (0..len)
            .map(|i| {
                let x = state.wrapping_add(i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
                (x >> 56) as u8
            })
            .collect();
        let digest: String =
            sha2::Sha256::digest(&payload).iter().map(|byte| format!("{byte:02x}")).collect();
        let record = RecordRef {
            key: &key,
            timestamp_us: 1_700_000_000_000_000 + index,
            content_type: "image/jpeg",
            payload: &payload,
        };
        if builder.raw_len() + record.encoded_len() > 256 * 1024 && !builder.is_empty() {
            ring.append(builder.seal_raw()).expect("append");
        }
        builder.push(record).expect("valid record");
        produced.push((key, digest));
    }
    if !builder.is_empty() {
        ring.append(builder.seal_raw()).expect("append");
    }
    produced
}

/// Runs `tests/read_datasets.py` (the stock Python readers) and returns its JSON lines.
/// Fails when the readers are missing and `CI` is set; otherwise returns `None` with a message.
pub fn python_read(kind: &str, files: &[PathBuf]) -> Option<Vec<serde_json::Value>> {
    let probe = std::process::Command::new("python3")
        .args([
            "-c",
            "import pyarrow, webdataset, duckdb, importlib.util; assert importlib.util.find_spec('wids')",
        ])
        .output();
    if !probe.as_ref().is_ok_and(|output| output.status.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have pyarrow, webdataset, duckdb and wids installed (.ci/run does)"
        );
        eprintln!("SKIPPING the Python reader check: `pip install pyarrow webdataset duckdb wids` to run it");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("read_datasets.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .arg(kind)
        .args(files)
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "read_datasets.py {kind} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect(),
    )
}

/// The body of a test that, re-executed as a child process with `variable` set to a config path,
/// runs a sink until killed (prints "listening on ADDRESS"; SIGTERM stops it cleanly). Without
/// the variable it returns at once (the test binary's normal run). Logs go to stderr at
/// `TRIBUTARY_LOG` (default `default_level`).
pub fn run_sink_child(variable: &str, default_level: &str) {
    let Ok(config) = std::env::var(variable) else { return };
    let config = SinkConfig::load(Path::new(&config)).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRIBUTARY_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(core_sink::run_until_signal(config)).unwrap();
}
