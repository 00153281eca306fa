//! Counters of one source, shared with the daemon that renders them as Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use inference::http_server::{ConnectionEvent, ConnectionObserver};

/// Why a source dropped an input or failed an operation; one counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceErrorKind {
    /// A line or body was not JSON, or not a JSON object.
    InvalidJson,
    /// A JSON object carried an unusable `key` or `timestamp_us`.
    InvalidRecord,
    /// A JSON line longer than the configured maximum.
    LineTooLong,
    /// An HTTP body longer than the configured maximum, or with too many records.
    BodyTooLarge,
    /// A file larger than the configured maximum (moved to `rejected/`).
    FileTooLarge,
    /// A connection turned away because the source already serves its maximum.
    TooManyConnections,
    /// Reading a file, moving it, or talking to a client failed.
    Io,
    /// A sensor did not acknowledge on its bus.
    SensorNack,
    /// Another bus failure talking to a sensor.
    SensorBus,
    /// A sensor's data failed its checksum.
    SensorCrc,
    /// Nothing answered on a sensor's bus.
    SensorNoResponse,
    /// The wrong chip answered.
    SensorWrongDeviceId,
    /// A sensor value outside the part's specified range (or not a finite number).
    SensorOutOfRange,
    /// A camera failed to deliver a frame.
    CameraFrame,
    /// A camera frame larger than a record may be.
    FrameTooLarge,
    /// A connection closed because its request headers were not complete in time.
    HeaderTimeout,
    /// A request answered 408 because its body was not complete in time.
    BodyTimeout,
    /// A connection closed because it sent nothing (or no complete line) for too long.
    IdleTimeout,
}

impl SourceErrorKind {
    pub const COUNT: usize = 18;
    pub const ALL: [SourceErrorKind; SourceErrorKind::COUNT] = [
        SourceErrorKind::InvalidJson,
        SourceErrorKind::InvalidRecord,
        SourceErrorKind::LineTooLong,
        SourceErrorKind::BodyTooLarge,
        SourceErrorKind::FileTooLarge,
        SourceErrorKind::TooManyConnections,
        SourceErrorKind::Io,
        SourceErrorKind::SensorNack,
        SourceErrorKind::SensorBus,
        SourceErrorKind::SensorCrc,
        SourceErrorKind::SensorNoResponse,
        SourceErrorKind::SensorWrongDeviceId,
        SourceErrorKind::SensorOutOfRange,
        SourceErrorKind::CameraFrame,
        SourceErrorKind::FrameTooLarge,
        SourceErrorKind::HeaderTimeout,
        SourceErrorKind::BodyTimeout,
        SourceErrorKind::IdleTimeout,
    ];

    /// The `kind` label in metrics.
    pub fn name(self) -> &'static str {
        match self {
            SourceErrorKind::InvalidJson => "invalid_json",
            SourceErrorKind::InvalidRecord => "invalid_record",
            SourceErrorKind::LineTooLong => "line_too_long",
            SourceErrorKind::BodyTooLarge => "body_too_large",
            SourceErrorKind::FileTooLarge => "file_too_large",
            SourceErrorKind::TooManyConnections => "too_many_connections",
            SourceErrorKind::Io => "io",
            SourceErrorKind::SensorNack => "sensor_nack",
            SourceErrorKind::SensorBus => "sensor_bus",
            SourceErrorKind::SensorCrc => "sensor_crc",
            SourceErrorKind::SensorNoResponse => "sensor_no_response",
            SourceErrorKind::SensorWrongDeviceId => "sensor_wrong_device_id",
            SourceErrorKind::SensorOutOfRange => "sensor_out_of_range",
            SourceErrorKind::CameraFrame => "camera_frame",
            SourceErrorKind::FrameTooLarge => "frame_too_large",
            SourceErrorKind::HeaderTimeout => "header_timeout",
            SourceErrorKind::BodyTimeout => "body_timeout",
            SourceErrorKind::IdleTimeout => "idle_timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

// `ALL` is indexed by discriminant in `index`; this keeps the two in step.
const _: () = {
    let mut index = 0;
    while index < SourceErrorKind::COUNT {
        assert!(SourceErrorKind::ALL[index] as usize == index);
        index += 1;
    }
};

/// What one source produced and what went wrong, counted since it was built.
#[derive(Debug, Default)]
pub struct SourceMetrics {
    records_produced: AtomicU64,
    payload_bytes_produced: AtomicU64,
    errors: [AtomicU64; SourceErrorKind::COUNT],
    connections_queued: AtomicU64,
}

/// The HTTP source's server reports here: refusals and timeouts are errors by kind, waiting for
/// a slot is counted on its own.
impl ConnectionObserver for SourceMetrics {
    fn connection_event(&self, event: ConnectionEvent) {
        match event {
            ConnectionEvent::Refused => {
                self.count_error(SourceErrorKind::TooManyConnections);
            }
            ConnectionEvent::HeaderTimeout => {
                self.count_error(SourceErrorKind::HeaderTimeout);
            }
            ConnectionEvent::IdleTimeout => {
                self.count_error(SourceErrorKind::IdleTimeout);
            }
            ConnectionEvent::Queued => {
                self.connections_queued.fetch_add(1, Ordering::Relaxed);
            }
            ConnectionEvent::Accepted | ConnectionEvent::Closed => {}
        }
    }
}

impl SourceMetrics {
    /// Records handed to the pipeline.
    pub fn records_produced(&self) -> u64 {
        self.records_produced.load(Ordering::Relaxed)
    }

    /// Payload bytes of the records handed to the pipeline.
    pub fn payload_bytes_produced(&self) -> u64 {
        self.payload_bytes_produced.load(Ordering::Relaxed)
    }

    /// Connections that found every slot taken and waited for one (HTTP source).
    pub fn connections_queued(&self) -> u64 {
        self.connections_queued.load(Ordering::Relaxed)
    }

    /// Errors of one kind.
    pub fn errors(&self, kind: SourceErrorKind) -> u64 {
        self.errors[kind.index()].load(Ordering::Relaxed)
    }

    pub(crate) fn count_record(&self, payload_bytes: usize) {
        self.records_produced.fetch_add(1, Ordering::Relaxed);
        self.payload_bytes_produced.fetch_add(payload_bytes as u64, Ordering::Relaxed);
    }

    /// Counts one error; returns how many of that kind there are now, so callers can log the
    /// first and then ever fewer (at powers of two) instead of flooding the log.
    pub(crate) fn count_error(&self, kind: SourceErrorKind) -> u64 {
        self.errors[kind.index()].fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Appends every source's counters to `out` in the Prometheus text format, one family each:
/// `tributary_source_records_total{source}`, `tributary_source_payload_bytes_total{source}`,
/// `tributary_source_connections_queued_total{source}` and
/// `tributary_source_errors_total{source,kind}`.
pub fn render_prometheus(sources: &[(&str, &SourceMetrics)], out: &mut String) {
    type Value = fn(&SourceMetrics) -> u64;
    let families: [(&str, &str, Value); 3] = [
        ("tributary_source_records_total", "Records a source handed to the pipeline.", |metrics| {
            metrics.records_produced()
        }),
        (
            "tributary_source_payload_bytes_total",
            "Payload bytes a source handed to the pipeline.",
            |metrics| metrics.payload_bytes_produced(),
        ),
        (
            "tributary_source_connections_queued_total",
            "Connections that waited for a slot (every connections_max slot was taken).",
            |metrics| metrics.connections_queued(),
        ),
    ];
    for (family, help, value) in families {
        let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
        for (name, metrics) in sources {
            let _ = writeln!(out, "{family}{{source=\"{}\"}} {}", escape_label(name), value(metrics));
        }
    }
    let family = "tributary_source_errors_total";
    let _ = writeln!(out, "# HELP {family} Inputs a source dropped or operations that failed, by kind.");
    let _ = writeln!(out, "# TYPE {family} counter");
    for (name, metrics) in sources {
        for kind in SourceErrorKind::ALL {
            let _ = writeln!(
                out,
                "{family}{{source=\"{}\",kind=\"{}\"}} {}",
                escape_label(name),
                kind.name(),
                metrics.errors(kind)
            );
        }
    }
}

/// Escapes a Prometheus label value (backslash, double quote; names hold no newlines).
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_and_kind() {
        let metrics = SourceMetrics::default();
        metrics.count_record(10);
        metrics.count_record(5);
        metrics.count_error(SourceErrorKind::LineTooLong);
        let mut text = String::new();
        render_prometheus(&[("say\"hi", &metrics)], &mut text);
        assert!(text.contains("tributary_source_records_total{source=\"say\\\"hi\"} 2\n"), "{text}");
        assert!(text.contains("tributary_source_payload_bytes_total{source=\"say\\\"hi\"} 15\n"));
        assert!(
            text.contains("tributary_source_errors_total{source=\"say\\\"hi\",kind=\"line_too_long\"} 1\n")
        );
        assert_eq!(text.matches("tributary_source_errors_total{").count(), SourceErrorKind::COUNT);
    }
}
