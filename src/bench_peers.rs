//! `tributary bench peers`: the same store-and-forward workloads through Tributary and through
//! the peers users would deploy instead, in the same run, as ratios.
//!
//! - Tributary: an appliance daemon (a child process, `tributary appliance`) with a
//!   `json_socket` source, no filters, ring `sync`, streaming to a sink child with datasets on two
//!   targets, until the sink acked every chunk; 200 KiB frames through `bench uplink`'s path (a
//!   ring fed in process, one appliance).
//! - NATS 2.9 (Debian's `nats-server`): an edge server as a leaf node of a core server, JetStream
//!   on both (domains `edge` and `core`), an `EDGE` file stream on the edge capturing the subject
//!   and a `CORE` file stream on the core sourcing it; publishes wait for JetStream's ack (a
//!   window of them in flight); done when `CORE` holds every message.
//! - Mosquitto 2.0 (Debian's `mosquitto`): an edge broker bridging `readings/#` to a core broker
//!   at QoS 1 with persistence and unbounded queues; a persistent QoS 1 subscriber on the core;
//!   done when it received every message.
//!
//! Nothing is installed: a peer whose binary is missing is skipped and named. The configs are
//! `deploy/bench/` (templates; `{{PORT}}`-style fields are filled in here) and
//! `docs/benchmarks.md` says what durability each peer really gives.

use std::io::{BufRead as _, BufReader, BufWriter, Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use fleet::{FleetCa, Validity};

use crate::bench_uplink::{
    RunResult, Workload, cpu_seconds, rss_anon_bytes, run_case, sensor_json, start_sink,
};

const MIB: f64 = 1024.0 * 1024.0;
/// Bound on one case, so a broken peer fails the run instead of hanging it.
const CASE_LIMIT: Duration = Duration::from_secs(600);
/// Publishes awaiting their JetStream ack, per connection.
const NATS_ACK_WINDOW: u64 = 4096;
/// Longest protocol line or message read from a NATS server (its `max_payload` is 1 MiB).
const NATS_LINE_BYTES_MAX: usize = 4096;
const NATS_PAYLOAD_BYTES_MAX: usize = 1024 * 1024;
const NATS_SUBJECT: &str = "readings";
const MQTT_TOPIC: &str = "readings/bench";

#[derive(Args)]
pub struct PeersArgs {
    /// Directory for every process's data (on the disk you want to measure).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// JSON records (about 255 B each, `bench uplink`'s sensor reading) per run.
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// 200 KiB frames per run (64 KiB messages for the NATS frame case: the same bytes).
    #[arg(long, default_value_t = 1_000)]
    frames: u64,
    /// Client connections writing records (Tributary's socket, NATS publishers).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Skip the peers (only Tributary's own figures).
    #[arg(long)]
    tributary_only: bool,
    /// Write an SVG bar chart of the results here (each group scaled to its largest bar).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// The records workload's label: `sensor_json` lines are 254–256 bytes.
const RECORDS_WORKLOAD: &str = "~255 B JSON records";

/// One measured case of one system.
#[derive(Clone)]
struct Reading {
    system: &'static str,
    workload: String,
    items_per_second: f64,
    megabytes_per_second: f64,
    edge_cpu_seconds_per_gigabyte: f64,
    edge_rss_anon_bytes: u64,
}

impl Reading {
    fn print(&self) {
        println!(
            "{:<34} {:<24} {:>11.0} {:>8.1} {:>14.2} {:>10.1}Mi",
            self.system,
            self.workload,
            self.items_per_second,
            self.megabytes_per_second,
            self.edge_cpu_seconds_per_gigabyte,
            self.edge_rss_anon_bytes as f64 / MIB,
        );
    }
}

/// A child process killed (SIGTERM, then waited) when dropped.
struct Process {
    child: Child,
    name: String,
}

impl Process {
    fn spawn(command: &mut Command, name: &str) -> Result<Self> {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Self { child, name: name.to_string() })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// A config template from `deploy/bench/` with `{{NAME}}` fields filled in.
fn render(template: &str, fields: &[(&str, String)]) -> String {
    fields
        .iter()
        .fold(template.to_string(), |text, (name, value)| text.replace(&format!("{{{{{name}}}}}"), value))
}

fn wait_for_port(port: u16, process: &mut Process) -> Result<()> {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        process.ensure_running()?;
        ensure!(started.elapsed() < Duration::from_secs(20), "{} does not listen on {port}", process.name);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn poll_until(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    while !done()? {
        ensure!(started.elapsed() < CASE_LIMIT, "{what}: not done after {CASE_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `clients` threads each writing their share of `count` items through `write_share`.
fn in_parallel(
    clients: usize,
    count: u64,
    write_share: impl Fn(usize, std::ops::Range<u64>) -> Result<()> + Sync,
) -> Result<()> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|client| {
                let per_client = count.div_ceil(clients as u64);
                let range =
                    (client as u64 * per_client).min(count)..((client as u64 + 1) * per_client).min(count);
                let write_share = &write_share;
                scope.spawn(move || write_share(client, range))
            })
            .collect();
        handles.into_iter().try_for_each(|handle| handle.join().expect("client thread"))
    })
}

/// Edge CPU and peak anonymous memory of one process over a case.
struct EdgeMeter {
    pid: u32,
    cpu_before: f64,
    rss_peak: AtomicU64,
}

impl EdgeMeter {
    fn start(pid: u32) -> Self {
        Self { pid, cpu_before: cpu_seconds(pid), rss_peak: AtomicU64::new(rss_anon_bytes(pid)) }
    }

    fn sample(&self) {
        self.rss_peak.fetch_max(rss_anon_bytes(self.pid), Ordering::Relaxed);
    }

    fn reading(
        &self,
        system: &'static str,
        workload: String,
        items: u64,
        bytes: u64,
        seconds: f64,
    ) -> Reading {
        Reading {
            system,
            workload,
            items_per_second: items as f64 / seconds,
            megabytes_per_second: bytes as f64 / 1e6 / seconds,
            edge_cpu_seconds_per_gigabyte: (cpu_seconds(self.pid) - self.cpu_before) / (bytes as f64 / 1e9),
            edge_rss_anon_bytes: self.rss_peak.load(Ordering::Relaxed),
        }
    }
}

/// The sum over every label set of one metric family on a Prometheus text page.
fn metric_sum(page: &str, family: &str) -> f64 {
    page.lines()
        .filter(|line| {
            line.strip_prefix(family).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut page = String::new();
    stream.take(16 * 1024 * 1024).read_to_string(&mut page)?;
    Ok(page)
}

/// Records through the appliance daemon's `json_socket` source to a sink with datasets.
fn tributary_records(base: &Path, ca: &FleetCa, records: u64, clients: usize) -> Result<Reading> {
    let dir = base.join("tributary-records");
    let sink = start_sink(
        &dir.join("sink"),
        ca,
        "\n[datasets]\ntargets = [\"targets/ost0\", \"targets/ost1\"]\nmanifest_dir = \"manifests\"\n",
    )?;
    let edge = dir.join("edge");
    std::fs::create_dir_all(&edge)?;
    ca.issue_device("bench-edge", Validity::days(1))?
        .write_to(&edge.join("identity"), ca.certificate_pem())?;
    std::fs::write(edge.join("fleet-ca.pem"), ca.certificate_pem())?;
    let metrics_port = free_port()?;
    let ring_bytes = (records * 160).max(256 << 20);
    let config = render(
        include_str!("../deploy/bench/appliance.toml"),
        &[
            ("METRICS_PORT", metrics_port.to_string()),
            ("RING_BYTES", ring_bytes.to_string()),
            ("SINK", sink.address.to_string()),
        ],
    );
    std::fs::write(edge.join("appliance.toml"), config)?;
    let mut appliance = Process::spawn(
        Command::new(std::env::current_exe()?)
            .args(["appliance", "--config"])
            .arg(edge.join("appliance.toml")),
        "the appliance daemon",
    )?;
    wait_for_port(metrics_port, &mut appliance)?;
    let socket = edge.join("intake.sock");
    poll_until("the intake socket", || Ok(socket.exists()))?;

    let meter = EdgeMeter::start(appliance.pid());
    let payload_bytes = AtomicU64::new(0);
    let started = Instant::now();
    in_parallel(clients, records, |client, range| {
        let mut writer = BufWriter::with_capacity(256 * 1024, UnixStream::connect(&socket)?);
        for index in range {
            let line = sensor_json(index);
            payload_bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
            writeln!(writer, "{line}").with_context(|| format!("client {client} writes record {index}"))?;
        }
        writer.flush()?;
        Ok(())
    })?;
    poll_until("the sink's acks", || {
        meter.sample();
        appliance.ensure_running()?;
        let page = http_get(metrics_port, "/metrics")?;
        Ok(metric_sum(&page, "tributary_chunker_records_total") as u64 >= records
            && metric_sum(&page, "tributary_ring_lag_chunks") == 0.0)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let reading = meter.reading(
        "tributary (daemon, sync, fsync)",
        RECORDS_WORKLOAD.into(),
        records,
        payload_bytes.load(Ordering::Relaxed),
        seconds,
    );
    drop(appliance);
    drop(sink);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(reading)
}

fn tributary_frames(base: &Path, ca: &FleetCa, frames: u64) -> Result<Reading> {
    let RunResult {
        items_per_second,
        megabytes_per_second,
        bench_cpu_seconds_per_gigabyte,
        bench_rss_anon_bytes,
        ..
    } = run_case(base, ca, Workload::Frames, 1, frames)?;
    Ok(Reading {
        system: "tributary (ring sync, fsync)",
        workload: "200 KiB frames".into(),
        items_per_second,
        megabytes_per_second,
        edge_cpu_seconds_per_gigabyte: bench_cpu_seconds_per_gigabyte,
        edge_rss_anon_bytes: bench_rss_anon_bytes,
    })
}

/// The writing half of a NATS connection, shared by the publisher and the reader answering PINGs.
#[derive(Clone)]
struct NatsWriter(Arc<std::sync::Mutex<BufWriter<TcpStream>>>);

impl NatsWriter {
    fn send(&self, bytes: &[u8]) -> Result<()> {
        let mut writer = self.0.lock().expect("NATS writer");
        writer.write_all(bytes)?;
        writer.flush()?;
        Ok(())
    }

    fn publish_buffered(&self, subject: &str, reply: &str, payload: &[u8]) -> Result<()> {
        let mut writer = self.0.lock().expect("NATS writer");
        write!(writer, "PUB {subject} {reply} {}\r\n", payload.len())?;
        writer.write_all(payload)?;
        writer.write_all(b"\r\n")?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(self.0.lock().expect("NATS writer").flush()?)
    }

    fn subscribe(&self, subject: &str, sid: u32) -> Result<()> {
        self.send(format!("SUB {subject} {sid}\r\n").as_bytes())
    }
}

/// A minimal NATS client (the text protocol over TCP): what the benchmark needs of it, publish
/// with a reply subject and request/reply, with every line and payload bounded.
struct NatsConnection {
    reader: BufReader<TcpStream>,
    writer: NatsWriter,
}

/// One message the server delivered.
struct NatsMessage {
    subject: String,
    payload: Vec<u8>,
}

impl NatsConnection {
    fn connect(port: u16) -> Result<Self> {
        let stream =
            TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connect to NATS on {port}"))?;
        stream.set_nodelay(true)?;
        let mut connection = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: NatsWriter(Arc::new(std::sync::Mutex::new(BufWriter::with_capacity(256 * 1024, stream)))),
        };
        let info = connection.read_line()?;
        ensure!(info.starts_with("INFO "), "NATS greeting is not INFO: {info}");
        connection.writer.send(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"lang\":\"rust\",\"version\":\"0\",\"protocol\":1}\r\nPING\r\n",
        )?;
        loop {
            match connection.read_line()?.as_str() {
                "PONG" => return Ok(connection),
                "+OK" | "PING" => {}
                other => bail!("NATS refused the connection: {other}"),
            }
        }
    }

    fn read_line(&mut self) -> Result<String> {
        let mut line = Vec::new();
        (&mut self.reader).take(NATS_LINE_BYTES_MAX as u64).read_until(b'\n', &mut line)?;
        ensure!(line.ends_with(b"\r\n"), "NATS line unterminated or longer than {NATS_LINE_BYTES_MAX} bytes");
        line.truncate(line.len() - 2);
        Ok(String::from_utf8(line)?)
    }

    /// The next message, answering the server's PINGs on the way.
    fn next_message(&mut self) -> Result<NatsMessage> {
        loop {
            let line = self.read_line()?;
            if line == "PING" {
                self.writer.send(b"PONG\r\n")?;
                continue;
            }
            if line == "PONG" || line == "+OK" {
                continue;
            }
            let Some(rest) = line.strip_prefix("MSG ") else { bail!("unexpected NATS line: {line}") };
            let fields: Vec<&str> = rest.split(' ').collect();
            ensure!((3..=4).contains(&fields.len()), "malformed NATS MSG line: {line}");
            let length: usize = fields[fields.len() - 1].parse().context("NATS MSG length")?;
            ensure!(length <= NATS_PAYLOAD_BYTES_MAX, "NATS message of {length} bytes");
            let mut payload = vec![0u8; length + 2];
            self.reader.read_exact(&mut payload)?;
            ensure!(payload.ends_with(b"\r\n"), "NATS payload not followed by CRLF");
            payload.truncate(length);
            return Ok(NatsMessage { subject: fields[0].to_string(), payload });
        }
    }

    /// Request/reply: the answer as JSON, an `error` in it refused.
    fn request(&mut self, subject: &str, payload: &str) -> Result<serde_json::Value> {
        self.writer.subscribe("_INBOX.bench.request", 1)?;
        self.writer.publish_buffered(subject, "_INBOX.bench.request", payload.as_bytes())?;
        self.writer.send(b"UNSUB 1 1\r\n")?;
        let answer = self.next_message()?;
        let value: serde_json::Value = serde_json::from_slice(&answer.payload)
            .with_context(|| format!("answer to {subject} is not JSON"))?;
        if let Some(error) = value.get("error") {
            bail!("{subject}: {error}");
        }
        Ok(value)
    }
}

struct NatsPair {
    // Field order: the edge stops before the core.
    edge: Process,
    _core: Process,
    edge_port: u16,
    core_port: u16,
}

fn start_nats(dir: &Path) -> Result<NatsPair> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let (core_port, leaf_port, edge_port) = (free_port()?, free_port()?, free_port()?);
    let fields = [
        ("CORE_PORT", core_port.to_string()),
        ("LEAF_PORT", leaf_port.to_string()),
        ("EDGE_PORT", edge_port.to_string()),
        ("DIR", dir.display().to_string()),
    ];
    for side in ["core", "edge"] {
        let template = match side {
            "core" => include_str!("../deploy/bench/nats-core.conf"),
            _ => include_str!("../deploy/bench/nats-edge.conf"),
        };
        std::fs::write(dir.join(format!("{side}.conf")), render(template, &fields))?;
    }
    let mut core = Process::spawn(
        Command::new("nats-server").arg("-c").arg(dir.join("core.conf")),
        "nats-server (core)",
    )?;
    wait_for_port(core_port, &mut core)?;
    let mut edge = Process::spawn(
        Command::new("nats-server").arg("-c").arg(dir.join("edge.conf")),
        "nats-server (edge)",
    )?;
    wait_for_port(edge_port, &mut edge)?;
    let mut edge_client = NatsConnection::connect(edge_port)?;
    edge_client.request(
        "$JS.API.STREAM.CREATE.EDGE",
        &format!("{{\"name\":\"EDGE\",\"subjects\":[\"{NATS_SUBJECT}\"],\"storage\":\"file\",\"max_msgs\":-1,\"max_bytes\":-1}}"),
    )?;
    let mut core_client = NatsConnection::connect(core_port)?;
    // The leaf connection may not be up yet: the stream sources EDGE once it is.
    core_client.request(
        "$JS.API.STREAM.CREATE.CORE",
        "{\"name\":\"CORE\",\"storage\":\"file\",\"sources\":[{\"name\":\"EDGE\",\"external\":{\"api\":\"$JS.edge.API\"}}]}",
    )?;
    Ok(NatsPair { edge, _core: core, edge_port, core_port })
}

fn nats_case(
    base: &Path,
    workload: &str,
    messages: u64,
    payload_of: impl Fn(u64) -> Vec<u8> + Sync,
    clients: usize,
) -> Result<Reading> {
    let dir = base.join("nats");
    let nats = start_nats(&dir)?;
    let meter = EdgeMeter::start(nats.edge.pid());
    let bytes = AtomicU64::new(0);
    let started = Instant::now();
    in_parallel(clients, messages, |client, range| {
        let mut acks = NatsConnection::connect(nats.edge_port)?;
        let inbox = format!("_INBOX.bench.{client}");
        acks.writer.subscribe(&inbox, 1)?;
        let publisher = acks.writer.clone();
        let total = range.end - range.start;
        let acked = AtomicU64::new(0);
        std::thread::scope(|scope| -> Result<()> {
            let reader = scope.spawn(|| -> Result<()> {
                while acked.load(Ordering::Acquire) < total {
                    let message = acks.next_message()?;
                    ensure!(message.subject == inbox, "NATS delivered {} on the ack inbox", message.subject);
                    let text = String::from_utf8_lossy(&message.payload);
                    ensure!(!text.contains("\"error\""), "JetStream refused a publish: {text}");
                    acked.fetch_add(1, Ordering::Release);
                }
                Ok(())
            });
            let mut sent = 0u64;
            for index in range {
                while sent - acked.load(Ordering::Acquire) >= NATS_ACK_WINDOW && !reader.is_finished() {
                    publisher.flush()?;
                    std::thread::yield_now();
                }
                let payload = payload_of(index);
                bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
                publisher.publish_buffered(NATS_SUBJECT, &inbox, &payload)?;
                sent += 1;
            }
            publisher.flush()?;
            reader.join().expect("ack reader")
        })
    })?;
    let mut core_client = NatsConnection::connect(nats.core_port)?;
    poll_until("the CORE stream", || {
        meter.sample();
        let info = core_client.request("$JS.API.STREAM.INFO.CORE", "")?;
        Ok(info["state"]["messages"].as_u64().unwrap_or(0) >= messages)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let reading = meter.reading(
        "nats 2.9 (leaf + JetStream)",
        workload.into(),
        messages,
        bytes.load(Ordering::Relaxed),
        seconds,
    );
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(reading)
}

fn frame(index: u64, bytes: usize) -> Vec<u8> {
    crate::bench::noise(bytes, 0x2545_F491_4F6C_DD1D ^ index)
}

fn mosquitto_case(base: &Path, records: u64) -> Result<Reading> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let dir = base.join("mosquitto");
    let _ = std::fs::remove_dir_all(&dir);
    let (core_port, edge_port) = (free_port()?, free_port()?);
    let fields = [
        ("CORE_PORT", core_port.to_string()),
        ("EDGE_PORT", edge_port.to_string()),
        ("DIR", dir.display().to_string()),
    ];
    let mut processes = Vec::new();
    for (side, template, port) in [
        ("core", include_str!("../deploy/bench/mosquitto-core.conf"), core_port),
        ("edge", include_str!("../deploy/bench/mosquitto-edge.conf"), edge_port),
    ] {
        std::fs::create_dir_all(dir.join(side))?;
        std::fs::write(dir.join(format!("{side}.conf")), render(template, &fields))?;
        let mut process = Process::spawn(
            Command::new("mosquitto").arg("-c").arg(dir.join(format!("{side}.conf"))),
            &format!("mosquitto ({side})"),
        )?;
        wait_for_port(port, &mut process)?;
        processes.push(process);
    }
    let options = |id: &str, port: u16| {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_clean_session(false).set_keep_alive(Duration::from_secs(30)).set_inflight(1000);
        options.set_max_packet_size(1 << 20, 1 << 20);
        options
    };
    let (subscriber, mut subscriber_events) = Client::new(options("bench-core", core_port), 65_536);
    subscriber.subscribe(MQTT_TOPIC, QoS::AtLeastOnce)?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let subscriber_thread = std::thread::spawn(move || -> Result<()> {
        for event in subscriber_events.iter() {
            if let Event::Incoming(Packet::Publish(_)) = event.context("core subscriber")? {
                if counter.fetch_add(1, Ordering::Release) + 1 >= records {
                    return Ok(());
                }
            }
        }
        Ok(())
    });
    // The bridge subscribes on the core once connected: wait until a probe crosses it.
    std::thread::sleep(Duration::from_millis(500));
    let meter = EdgeMeter::start(processes[1].pid());
    let (publisher, mut publisher_events) = Client::new(options("bench-edge", edge_port), 65_536);
    let publisher_thread = std::thread::spawn(move || -> Result<()> {
        for event in publisher_events.iter() {
            if let Event::Incoming(Packet::Disconnect) = event.context("edge publisher")? {
                return Ok(());
            }
        }
        Ok(())
    });
    let mut bytes = 0u64;
    let started = Instant::now();
    for index in 0..records {
        let payload = sensor_json(index).into_bytes();
        bytes += payload.len() as u64;
        publisher.publish(MQTT_TOPIC, QoS::AtLeastOnce, false, payload)?;
        if index % 4096 == 0 {
            meter.sample();
        }
    }
    poll_until("the core subscriber", || {
        meter.sample();
        ensure!(
            !subscriber_thread.is_finished() || received.load(Ordering::Acquire) >= records,
            "core subscriber stopped"
        );
        Ok(received.load(Ordering::Acquire) >= records)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let reading =
        meter.reading("mosquitto 2.0 (bridge, QoS 1)", RECORDS_WORKLOAD.into(), records, bytes, seconds);
    let _ = publisher.disconnect();
    let _ = subscriber.disconnect();
    drop(processes);
    let _ = subscriber_thread.join();
    let _ = publisher_thread.join();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(reading)
}

fn ratio_line(label: &str, ours: f64, peer: f64, target: f64) {
    let ratio = ours / peer;
    let verdict = if ratio >= target { "met" } else { "MISSED" };
    println!("{label:<58} {ratio:>6.2}  (target >= {target:.2}: {verdict})");
}

pub fn run(args: PeersArgs) -> Result<()> {
    let base = args.dir.join("tributary-bench-peers");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let ca = FleetCa::init(&base.join("fleet-ca"), "bench fleet")?;
    println!("tributary bench peers: store-and-forward edge → core on loopback, in {}", base.display());
    println!(
        "{:<34} {:<24} {:>11} {:>8} {:>14} {:>12}",
        "system", "workload", "items/s", "MB/s", "edge CPU s/GB", "edge RssAnon"
    );
    let records = tributary_records(&base, &ca, args.records, args.clients)?;
    records.print();
    let frames = tributary_frames(&base, &ca, args.frames)?;
    frames.print();
    // Per system: (records, frames) readings, for the plot.
    let mut plotted: Vec<(&str, Option<Reading>, Option<Reading>)> = Vec::new();
    let tributary_plotted = ("tributary", Some(records.clone()), Some(frames.clone()));
    if args.tributary_only {
        plotted.push(tributary_plotted);
        return write_plot(args.plot.as_deref(), &plotted);
    }
    plotted.push(tributary_plotted);
    if on_path("nats-server") {
        let nats_records = nats_case(
            &base,
            RECORDS_WORKLOAD,
            args.records,
            |index| sensor_json(index).into_bytes(),
            args.clients,
        )?;
        nats_records.print();
        let nats_frames =
            nats_case(&base, "64 KiB messages", args.frames * 200 / 64, |index| frame(index, 64 * 1024), 1)?;
        nats_frames.print();
        plotted.push(("nats (leaf + JetStream)", Some(nats_records.clone()), Some(nats_frames.clone())));
        ratio_line(
            "records/s, tributary / nats",
            records.items_per_second,
            nats_records.items_per_second,
            5.0,
        );
        ratio_line(
            "frame MB/s, tributary 200 KiB / nats 64 KiB",
            frames.megabytes_per_second,
            nats_frames.megabytes_per_second,
            2.0,
        );
    } else {
        println!("nats-server not on PATH: skipped (Debian: apt-get install nats-server)");
    }
    if on_path("mosquitto") {
        let mosquitto = mosquitto_case(&base, args.records)?;
        mosquitto.print();
        plotted.push(("mosquitto (bridge, QoS 1)", Some(mosquitto.clone()), None));
        ratio_line(
            "records/s, tributary / mosquitto",
            records.items_per_second,
            mosquitto.items_per_second,
            1.0,
        );
    } else {
        println!("mosquitto not on PATH: skipped (Debian: apt-get install mosquitto)");
    }
    let _ = std::fs::remove_dir_all(&base);
    write_plot(args.plot.as_deref(), &plotted)
}

/// Groups: records/s, frame MB/s, edge CPU s/GB (records), edge MiB; one bar per system.
fn write_plot(plot: Option<&Path>, systems: &[(&str, Option<Reading>, Option<Reading>)]) -> Result<()> {
    let Some(plot) = plot else { return Ok(()) };
    type Pick = fn(&(&str, Option<Reading>, Option<Reading>)) -> Option<f64>;
    let measures: [(&str, Pick); 4] = [
        ("records/s (k)", |system| system.1.as_ref().map(|reading| reading.items_per_second / 1e3)),
        ("frames MB/s", |system| system.2.as_ref().map(|reading| reading.megabytes_per_second)),
        ("edge CPU s/GB, records", |system| {
            system.1.as_ref().map(|reading| reading.edge_cpu_seconds_per_gigabyte)
        }),
        ("edge MiB, records", |system| {
            system.1.as_ref().map(|reading| reading.edge_rss_anon_bytes as f64 / (1024.0 * 1024.0))
        }),
    ];
    let groups: Vec<crate::bench::BarGroup> = measures
        .iter()
        .map(|(label, pick)| crate::bench::BarGroup {
            label: (*label).to_owned(),
            values: systems.iter().map(pick).collect(),
        })
        .collect();
    let names: Vec<&str> = systems.iter().map(|system| system.0).collect();
    let svg = crate::bench::grouped_bar_svg(
        "tributary bench peers: store-and-forward edge to core, same run (each group on its own scale)",
        &names,
        &groups,
        true,
        |value| format!("{value:.1}"),
    );
    std::fs::write(plot, svg).with_context(|| format!("write {}", plot.display()))?;
    println!("plot written to {}", plot.display());
    Ok(())
}
