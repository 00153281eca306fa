//! The appliance daemon end to end: a TOML config with an HTTP source (filters: schema, unit
//! normalisation, tag) and a simulated board camera, a real QUIC uplink to an in-process sink.
//! Checks that the metrics endpoint, scraped over TCP, counts exactly what the test sent and what
//! the filters dropped; that every kept record lands once with its tags and normalised units; and
//! that a filter change in the config file applies without a restart and without losing records.

mod support;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use appliance::config::ApplianceConfig;
use appliance::daemon::Daemon;
use core_sink::Sink;
use protocol::Lane;
use support::harness::{Fleet, wait_drained, wait_until};

const LIMIT: Duration = Duration::from_secs(60);

fn free_tcp_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A minimal HTTP/1.1 client: the request, then the whole response as text.
fn http(address: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// The value of one sample line of a Prometheus text page.
fn metric(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} not in the metrics page:\n{page}"))
        .trim()
        .parse::<f64>()
        .unwrap() as u64
}

fn write_config(
    fleet: &Fleet,
    sink: SocketAddr,
    http_listen: SocketAddr,
    metrics: SocketAddr,
    keep_every: u32,
) {
    let device = fleet.device("edge-1");
    device.write_to(&fleet.path().join("appliance/identity"), fleet.ca.certificate_pem()).unwrap();
    std::fs::write(fleet.path().join("appliance/fleet-ca.pem"), fleet.ca.certificate_pem()).unwrap();
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("board/profiles/sim-devkit.toml");
    let config = format!(
        r#"
data_dir = "."
metrics_listen = "{metrics}"
config_reload_ms = 100
[ring]
capacity_bytes = 67108864
audit_reserved_bytes = 4194304
durability = "sync"
[uplink]
sink = "{sink}"
server_name = "localhost"
identity_dir = "identity"
ca_file = "fleet-ca.pem"

[sources.ingest]
input = {{ kind = "http", listen = "{http_listen}" }}
chunker = {{ chunk_raw_bytes = 4096, chunk_age_max_ms = 50 }}
[[sources.ingest.filters]]
kind = "schema"
fields = [{{ field = "temperature_f", type = "number", min = -100.0, max = 300.0 }}]
[[sources.ingest.filters]]
kind = "normalize_units"
conversions = [{{ field = "temperature_f", to = "temperature_c", conversion = "fahrenheit_to_celsius" }}]
[[sources.ingest.filters]]
kind = "tag"
tags = {{ site = "lab-7" }}
[[sources.ingest.filters]]
kind = "decimate"
keep_every = {keep_every}

[sources.cam]
input = {{ kind = "camera", profile = "{profile}", fps = 20 }}
"#,
        profile = profile.display()
    );
    std::fs::write(fleet.path().join("appliance/appliance.toml"), config).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_counts_what_it_was_sent_and_lands_every_kept_record() {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
    let fleet = Fleet::new();
    std::fs::create_dir_all(fleet.path().join("appliance")).unwrap();
    let sink = Sink::start(fleet.sink_config("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let (http_listen, metrics_listen) = (free_tcp_port(), free_tcp_port());
    write_config(&fleet, sink.local_addr(), http_listen, metrics_listen, 1);
    let config_path = fleet.path().join("appliance/appliance.toml");
    let config = ApplianceConfig::load(&config_path).unwrap();
    let daemon = Daemon::start(config.clone()).await.unwrap();
    assert_eq!(daemon.device_id.as_deref(), Some("edge-1"));

    // 300 readings: every third has no temperature (schema drops it).
    let body: String = (0..300)
        .map(|index| {
            if index % 3 == 2 {
                format!("{{\"key\":\"r-{index}\",\"timestamp_us\":{},\"humidity\":40}}\n", 1_000 + index)
            } else {
                format!(
                    "{{\"key\":\"r-{index}\",\"timestamp_us\":{},\"temperature_f\":212}}\n",
                    1_000 + index
                )
            }
        })
        .collect();
    let response =
        tokio::task::spawn_blocking(move || http(http_listen, "POST", "/v1/records", &body)).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");

    // A filter change in the file applies without a restart: decimate to every 2nd record.
    write_config(&fleet, sink.local_addr(), http_listen, metrics_listen, 2);
    let new_config = ApplianceConfig::load(&config_path).unwrap();
    daemon.apply_reload(&config, &new_config);
    let ingest = daemon.pipeline("ingest").expect("the ingest source runs");
    let reloaded =
        wait_until(LIMIT, || ingest.metrics.filter_reloads.load(std::sync::atomic::Ordering::Relaxed) == 1)
            .await;
    assert!(reloaded, "the filter update was not applied");
    let body: String = (300..400)
        .map(|index| {
            format!("{{\"key\":\"r-{index}\",\"timestamp_us\":{},\"temperature_f\":32}}\n", 1_000 + index)
        })
        .collect();
    let response =
        tokio::task::spawn_blocking(move || http(http_listen, "POST", "/v1/records", &body)).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");

    let settled = wait_until(LIMIT, || {
        ingest.filter_metrics.records_in.load(std::sync::atomic::Ordering::Relaxed) == 400
    })
    .await;
    assert!(settled, "the pipeline did not take all 400 records");
    let page =
        tokio::task::spawn_blocking(move || http(metrics_listen, "GET", "/metrics", "")).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert_eq!(metric(&page, "tributary_filter_records_in_total{source=\"ingest\"}"), 400);
    assert_eq!(metric(&page, "tributary_filter_dropped_total{source=\"ingest\",reason=\"schema\"}"), 100);
    assert_eq!(metric(&page, "tributary_filter_dropped_total{source=\"ingest\",reason=\"decimate\"}"), 50);
    assert_eq!(metric(&page, "tributary_filter_records_out_total{source=\"ingest\"}"), 250);
    assert!(metric(&page, "tributary_ring_capacity_bytes") == 67_108_864);
    // Every appliance-side family the Grafana dashboard queries is one this endpoint exports.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/tributary.json"),
    )
    .unwrap();
    let appliance_side: Vec<String> = telemetry::metric_families_named_in(&dashboard)
        .into_iter()
        .filter(|family| {
            !["tributary_sink_", "tributary_onboarding_", "tributary_replication_"]
                .iter()
                .any(|prefix| family.starts_with(prefix))
        })
        .collect();
    assert!(appliance_side.len() >= 10, "{appliance_side:?}");
    for family in &appliance_side {
        assert!(page.contains(&format!("# TYPE {family} ")), "the dashboard queries {family}, not exported");
    }
    // Lag in time and ack latency per lane (their values are checked in lag.rs and tests/metrics.rs).
    for series in [
        "tributary_uplink_lag_seconds{lane=\"sensor\"} ",
        "tributary_uplink_ack_latency_seconds_count{lane=\"sensor\"} ",
    ] {
        assert!(
            page.lines().any(|line| line.starts_with(series)),
            "{series} not in the metrics page:\n{page}"
        );
    }

    let ring = daemon.ring.clone();
    daemon.shutdown().await.unwrap();
    // The uplink stopped with the daemon; a fresh one drains what is left.
    let uplink = appliance::Uplink::spawn(ring.clone(), {
        let mut uplink = fleet.uplink_config("edge-1", sink.local_addr());
        uplink.dictionaries = Some(std::sync::Arc::new(
            appliance::dictionaries::DictionaryStore::open(&fleet.path().join("appliance/dictionaries"))
                .unwrap(),
        ));
        uplink
    })
    .unwrap();
    let drained = wait_drained(&ring, &Lane::ALL, LIMIT).await;
    assert!(drained, "the ring did not drain: {:?}", ring.stats());
    uplink.stop().await;

    let landed = support::harness::landed_payloads(&fleet.landing_dir(), "edge-1");
    let sensor: Vec<_> = landed.get(&Lane::Sensor).cloned().unwrap_or_default();
    assert_eq!(sensor.len(), 250, "every kept reading lands exactly once");
    let keys: std::collections::BTreeSet<_> = sensor.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(keys.len(), 250);
    for (key, payload) in &sensor {
        let value: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(value["tags"]["site"], "lab-7", "{key}: {value}");
        let celsius = value["temperature_c"].as_f64().unwrap_or_else(|| panic!("{key}: {value}"));
        assert!(celsius == 100.0 || celsius == 0.0, "{key}: {value}");
    }
    let frames = landed.get(&Lane::Media).cloned().unwrap_or_default();
    assert!(!frames.is_empty(), "the camera's frames land");
    assert!(frames.iter().all(|(_, payload)| payload.starts_with(&[0xff, 0xd8])), "frames are JPEG");
    sink.shutdown().await;
}
