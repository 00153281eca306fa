//! `tributary bench uplink`: appliances → one sink on loopback, durable at both ends (ring in
//! sync mode, sink fsync commit points), measured end to end: from the first append until every
//! ring is fully acked. The sink runs as a child process (`tributary sink`) so each side's CPU and
//! anonymous memory are measured on its own. The peer is a plain sequential write + fsync of the
//! same raw bytes, measured in the same run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use appliance::{Uplink, UplinkConfig};
use buffer::{Ring, RingConfig};
use clap::Args;
use fleet::{FleetCa, Validity};
use protocol::{ChunkBuilder, ChunkCompressor, Lane, RecordRef};

const MIB: u64 = 1024 * 1024;
/// Bound on one run's drain, so a broken build fails instead of hanging.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

#[derive(Args)]
pub struct UplinkArgs {
    /// Directory for rings, the sink's state and landing, and the peer file.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// JSON sensor records per run (254–256 bytes each, `sensor_json`).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// 200 KiB JPEG-like frames per run.
    #[arg(long, default_value_t = 2_000)]
    frames: u64,
    /// Idle devices connected for the sink memory reading.
    #[arg(long, default_value_t = 50)]
    idle_devices: usize,
}

#[derive(Clone, Copy)]
pub(crate) enum Workload {
    SensorRecords,
    Frames,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::SensorRecords => "~255 B JSON records",
            Workload::Frames => "200 KiB frames",
        }
    }
}

/// Per-process readings from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: utime is the 14th field, stime the 15th (1-based).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hertz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hertz
}

pub(crate) fn rss_anon_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

pub(crate) struct SinkProcess {
    pub(crate) child: Child,
    pub(crate) address: std::net::SocketAddr,
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        // SIGTERM: the sink commits what is pending and exits.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A fresh sink directory under `dir` (the fleet CA's certificate, a server certificate, a
/// config ending with `extra_config`) and a sink child process serving it.
pub(crate) fn start_sink(dir: &Path, ca: &FleetCa, extra_config: &str) -> Result<SinkProcess> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("ca"))?;
    std::fs::copy(ca.directory().join("ca.pem"), dir.join("ca").join("ca.pem"))?;
    ca.issue_server(&["localhost".into()], Validity::days(1))?
        .write_to(&dir.join("server"), ca.certificate_pem())?;
    let config = dir.join("sink.toml");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\nlanding_dir = \"landing\"\nca_dir = \"ca\"\n\
             server_certificate_dir = \"server\"\nrevocation_file = \"ca/revoked.txt\"\ncommit_interval_ms = 20\n{extra_config}"
        ),
    )?;
    let executable = std::env::current_exe()?;
    let mut child = Command::new(executable)
        .args(["sink", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start the sink child")?;
    let stdout = child.stdout.take().context("sink stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let address = line.trim().rsplit(' ').next().unwrap_or_default().parse().context("sink address")?;
    Ok(SinkProcess { child, address })
}

/// An uplink for `device` (a fresh certificate from `ca`) to the sink child, on `runtime`.
fn spawn_uplink(
    runtime: &tokio::runtime::Runtime,
    ring: &Ring,
    sink: &SinkProcess,
    ca: &FleetCa,
    device: &str,
) -> Result<Uplink> {
    let identity = ca.issue_device(device, Validity::days(1))?;
    let config = UplinkConfig::new(sink.address, "localhost", device, identity, ca.certificate_pem());
    let _guard = runtime.enter();
    Uplink::spawn(ring.clone(), config)
}

/// The benchmarks' sensor reading: 254–256 bytes of JSON, varying with `index`. The same
/// reading as `tests/support/harness.rs`'s `sensor_payload` (the tests cannot link the binary).
pub(crate) fn sensor_json(index: u64) -> String {
    format!(
        "{{\"sensor\":\"temp-{:03}\",\"seq\":{index},\"celsius\":{:.3},\"humidity\":{:.2},\"status\":\"ok\",\
         \"site\":\"north-yard\",\"firmware\":\"1.4.2\",\"calibration\":{{\"offset\":0.125,\"gain\":1.002}},\
         \"tags\":[\"edge\",\"outdoor\",\"shaded\"],\"note\":\"periodic reading from the simulated sensor bus\"}}",
        index % 64,
        20.0 + (index % 1000) as f64 / 100.0,
        40.0 + (index % 500) as f64 / 10.0
    )
}

fn produce(ring: &Ring, workload: Workload, device: &str, count: u64) -> Result<u64> {
    let mut compressor = ChunkCompressor::new(1);
    let mut raw_bytes = 0u64;
    match workload {
        Workload::SensorRecords => {
            let mut builder = ChunkBuilder::new(Lane::Sensor, 128 * 1024);
            for index in 0..count {
                let key = format!("{device}-{index:010}");
                let payload = sensor_json(index);
                raw_bytes += payload.len() as u64;
                let record = RecordRef {
                    key: &key,
                    timestamp_us: index,
                    content_type: "application/json",
                    payload: payload.as_bytes(),
                };
                builder.push(record)?;
                if builder.is_full() {
                    ring.append(builder.seal(&mut compressor, 0)?)?;
                }
            }
            if !builder.is_empty() {
                ring.append(builder.seal(&mut compressor, 0)?)?;
            }
        }
        Workload::Frames => {
            let mut state = 0x2545_F491_4F6C_DD1Du64;
            let mut frame = vec![0u8; 200 * 1024];
            for index in 0..count {
                for byte in frame.iter_mut() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *byte = state as u8;
                }
                let key = format!("{device}-frame-{index:08}");
                let record =
                    RecordRef { key: &key, timestamp_us: index, content_type: "image/jpeg", payload: &frame };
                let mut builder = ChunkBuilder::new(Lane::Media, 256 * 1024);
                builder.push(record)?;
                raw_bytes += frame.len() as u64;
                ring.append(builder.seal_raw())?;
            }
        }
    }
    Ok(raw_bytes)
}

pub(crate) struct RunResult {
    pub(crate) items_per_second: f64,
    pub(crate) megabytes_per_second: f64,
    pub(crate) bench_cpu_seconds_per_gigabyte: f64,
    pub(crate) sink_cpu_seconds_per_gigabyte: f64,
    pub(crate) bench_rss_anon_bytes: u64,
    pub(crate) sink_rss_anon_bytes: u64,
}

pub(crate) fn run_case(
    base: &Path,
    ca: &FleetCa,
    workload: Workload,
    appliances: usize,
    total: u64,
) -> Result<RunResult> {
    let dir = base.join(format!("run-{}-{appliances}", matches!(workload, Workload::Frames) as u8));
    let sink = start_sink(&dir, ca, "")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let per_appliance = total / appliances as u64;
    let lane = match workload {
        Workload::SensorRecords => Lane::Sensor,
        Workload::Frames => Lane::Media,
    };
    let mut rings = Vec::new();
    let mut uplinks = Vec::new();
    for index in 0..appliances {
        let device = format!("bench-{index:02}");
        let ring_bytes = match workload {
            Workload::SensorRecords => (per_appliance * 120).max(64 * MIB),
            Workload::Frames => (per_appliance * 260 * 1024).max(64 * MIB),
        };
        let ring = Ring::open(dir.join("rings").join(&device), RingConfig::with_capacity(ring_bytes))?;
        uplinks.push(spawn_uplink(&runtime, &ring, &sink, ca, &device)?);
        rings.push((device, ring));
    }
    let bench_cpu_before = cpu_seconds(std::process::id());
    let sink_cpu_before = cpu_seconds(sink.child.id());
    let started = Instant::now();
    let raw_bytes: u64 = std::thread::scope(|scope| -> Result<u64> {
        let producers: Vec<_> = rings
            .iter()
            .map(|(device, ring)| scope.spawn(move || produce(ring, workload, device, per_appliance)))
            .collect();
        let mut bytes = 0;
        for producer in producers {
            bytes += producer.join().expect("producer thread")?;
        }
        Ok(bytes)
    })?;
    let mut bench_rss = rss_anon_bytes(std::process::id());
    let mut sink_rss = rss_anon_bytes(sink.child.id());
    loop {
        let drained = rings.iter().all(|(_, ring)| {
            let stats = ring.stats();
            stats.lane(lane).acked_through + 1 == stats.lane(lane).next_seq
        });
        bench_rss = bench_rss.max(rss_anon_bytes(std::process::id()));
        sink_rss = sink_rss.max(rss_anon_bytes(sink.child.id()));
        if drained {
            break;
        }
        anyhow::ensure!(started.elapsed() < DRAIN_LIMIT, "not drained after {DRAIN_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = started.elapsed().as_secs_f64();
    let gigabytes = raw_bytes as f64 / 1e9;
    let result = RunResult {
        items_per_second: (per_appliance * appliances as u64) as f64 / seconds,
        megabytes_per_second: raw_bytes as f64 / 1e6 / seconds,
        bench_cpu_seconds_per_gigabyte: (cpu_seconds(std::process::id()) - bench_cpu_before) / gigabytes,
        sink_cpu_seconds_per_gigabyte: (cpu_seconds(sink.child.id()) - sink_cpu_before) / gigabytes,
        bench_rss_anon_bytes: bench_rss,
        sink_rss_anon_bytes: sink_rss,
    };
    runtime.block_on(async {
        for uplink in uplinks {
            uplink.stop().await;
        }
    });
    drop(rings);
    drop(sink);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result)
}

/// Sink anonymous memory with `devices` appliances connected and idle.
fn idle_devices_memory(base: &Path, ca: &FleetCa, devices: usize) -> Result<u64> {
    let dir = base.join("idle");
    let sink = start_sink(&dir, ca, "")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut uplinks = Vec::new();
    let mut rings = Vec::new();
    for index in 0..devices {
        let device = format!("idle-{index:02}");
        let ring = Ring::open(dir.join("rings").join(&device), RingConfig::with_capacity(16 * MIB))?;
        produce(&ring, Workload::SensorRecords, &device, 1_000)?;
        uplinks.push(spawn_uplink(&runtime, &ring, &sink, ca, &device)?);
        rings.push(ring);
    }
    let started = Instant::now();
    while !rings.iter().all(|ring| {
        ring.stats().lane(Lane::Sensor).acked_through + 1 == ring.stats().lane(Lane::Sensor).next_seq
    }) {
        anyhow::ensure!(started.elapsed() < DRAIN_LIMIT, "idle devices did not drain");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_anon_bytes(sink.child.id());
    runtime.block_on(async {
        for uplink in uplinks {
            uplink.stop().await;
        }
    });
    drop(sink);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rss)
}

pub fn bench_uplink(args: &UplinkArgs) -> Result<()> {
    let base = args.dir.join("tributary-bench-uplink");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let ca = FleetCa::init(&base.join("fleet-ca"), "bench fleet")?;
    println!(
        "tributary bench uplink: ring sync mode, sink commit every 20 ms with fsync, loopback, in {}",
        base.display()
    );
    println!(
        "{:<20} {:>10} {:>12} {:>8} {:>10} {:>9} {:>14} {:>14} {:>12} {:>12}",
        "workload",
        "appliances",
        "items/s",
        "MB/s",
        "peer MB/s",
        "ratio",
        "edge CPU s/GB",
        "sink CPU s/GB",
        "edge RssAnon",
        "sink RssAnon"
    );
    for (workload, total) in [(Workload::SensorRecords, args.records), (Workload::Frames, args.frames)] {
        for appliances in [1usize, 16] {
            let result = run_case(&base, &ca, workload, appliances, total)?;
            let raw = match workload {
                Workload::SensorRecords => total * 255,
                Workload::Frames => total * 200 * 1024,
            };
            let peer = crate::bench::baseline(&base, raw, 256 * 1024)?;
            println!(
                "{:<20} {:>10} {:>12.0} {:>8.1} {:>10.1} {:>9.2} {:>14.2} {:>14.2} {:>10.1}Mi {:>10.1}Mi",
                workload.name(),
                appliances,
                result.items_per_second,
                result.megabytes_per_second,
                peer / 1e6,
                result.megabytes_per_second * 1e6 / peer,
                result.bench_cpu_seconds_per_gigabyte,
                result.sink_cpu_seconds_per_gigabyte,
                result.bench_rss_anon_bytes as f64 / MIB as f64,
                result.sink_rss_anon_bytes as f64 / MIB as f64,
            );
        }
    }
    let idle = idle_devices_memory(&base, &ca, args.idle_devices)?;
    println!(
        "sink RssAnon with {} connected devices: {:.1} MiB (target <= 256 MiB)",
        args.idle_devices,
        idle as f64 / MIB as f64
    );
    println!(
        "targets: 335 B records >= 400000 records/s; frames >= 0.80 of the peer; edge RssAnon <= 64 MiB per appliance"
    );
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
