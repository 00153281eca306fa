//! Board-backed sources: periodic sensor readings (`kind = "board"`) and camera frames
//! (`kind = "camera"`), both opened from a board profile (`board::profile`, layout in
//! board/src/profile.rs) through `board::board::Board::open`, so the simulator and real buses
//! go through the same code.
//!
//! `board`: every sensor of the profile is read every `period_ms` (its own, from the profile);
//! a reading becomes one `application/json` record on the sensor lane (unless `lane` overrides),
//! `{"sensor": "<name>", "<value name with unit>": <number>, ...}`, e.g.
//! `{"sensor":"env0","temperature_c":22.51,"humidity_pct":41.2}`. A failed reading is counted
//! by kind (`sensor_nack`, `sensor_crc`, `sensor_out_of_range`, ...), logged at the 1st, 2nd,
//! 4th, 8th, ... occurrence of its kind, and skipped; the source keeps reading.
//!
//! `camera`: one camera of the profile (`camera` names it; may be left out when the profile has
//! exactly one) delivers frames at `fps` (default: the profile's), each one `image/jpeg` record
//! on the media lane (unless `lane` overrides) tagged `camera = <name>`. A failed frame is
//! counted (`camera_frame`) and skipped; a frame over `RECORD_PAYLOAD_BYTES_MAX` is counted
//! (`frame_too_large`) and dropped.
//!
//! Only the devices a source uses are opened: the `board` source opens the profile's sensors,
//! the `camera` source its one camera. Timestamps are the wall clock when the reading or frame
//! was taken, in microseconds. Readings are paced by a `Schedule` that never bunches up: a
//! device that fell behind skips to one period from now instead of catching up in a burst.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use board::board::{Board, BoardCamera, BoardSensor};
use board::camera::{CameraError, FrameFormat};
use board::device::{Reading, SensorErrorKind};
use board::profile::Profile;
use protocol::{Lane, RECORD_PAYLOAD_BYTES_MAX};
use serde::Deserialize;
use serde_json::{Map, Number, Value};
use tracing::{info, warn};

use super::json_lines::JSON_CONTENT_TYPE;
use super::metrics::{SourceErrorKind, SourceMetrics};
use super::{
    Delivery, Handover, KeySequence, SourceConfigError, check_path, check_range, lane_setting, now_us,
    sleep_until_unless_stopped, validate_source_name,
};
use crate::source::{RecordSender, Source, SourceRecord, StopSignal};

/// Settings of a `board` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardConfig {
    /// The board profile (TOML) whose sensors are read.
    pub profile: PathBuf,
    /// Lane of the readings (default "sensor").
    #[serde(default)]
    pub lane: Option<String>,
}

/// Settings of a `camera` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// The board profile (TOML) that describes the camera.
    pub profile: PathBuf,
    /// The camera's name in the profile; may be left out when it has exactly one camera.
    #[serde(default)]
    pub camera: Option<String>,
    /// Frames per second taken, 1..=120 (default: the profile's `fps`).
    #[serde(default)]
    pub fps: Option<u32>,
    /// Lane of the frames (default "media").
    #[serde(default)]
    pub lane: Option<String>,
}

/// Loads and checks a profile, naming the config key on failure.
fn load_profile(source_name: &str, path: &Path) -> Result<Profile, SourceConfigError> {
    check_path(source_name, "profile", path)?;
    Profile::load(path).map_err(|error| SourceConfigError::Device {
        source_name: source_name.to_string(),
        key: "profile",
        error: error.to_string(),
    })
}

/// Opens the devices left in `profile`, naming the config key on failure.
fn open_board(source_name: &str, profile: &Profile) -> Result<Board, SourceConfigError> {
    Board::open(profile).map_err(|error| SourceConfigError::Device {
        source_name: source_name.to_string(),
        key: "profile",
        error: error.to_string(),
    })
}

/// When each of a few devices is next due; hands out the earliest, sleeping until then.
struct Schedule {
    periods: Vec<Duration>,
    next_due: Vec<Instant>,
}

impl Schedule {
    /// Every device is due at once, then every period.
    fn new(periods: Vec<Duration>) -> Schedule {
        assert!(!periods.is_empty(), "a schedule needs a device");
        assert!(periods.iter().all(|period| !period.is_zero()), "periods are checked to be positive");
        let now = Instant::now();
        Schedule { next_due: vec![now; periods.len()], periods }
    }

    /// Sleeps until the earliest device is due and returns its index; `None` once `stop` is set.
    fn wait_next(&mut self, stop: &StopSignal) -> Option<usize> {
        let (index, due) = self.next_due.iter().copied().enumerate().min_by_key(|&(_, due)| due)?;
        if !sleep_until_unless_stopped(due, stop) {
            return None;
        }
        let now = Instant::now();
        let mut next = due + self.periods[index];
        if next <= now {
            next = now + self.periods[index];
        }
        self.next_due[index] = next;
        Some(index)
    }
}

fn sensor_error_kind(kind: SensorErrorKind) -> SourceErrorKind {
    match kind {
        SensorErrorKind::Nack => SourceErrorKind::SensorNack,
        SensorErrorKind::Bus => SourceErrorKind::SensorBus,
        SensorErrorKind::Crc => SourceErrorKind::SensorCrc,
        SensorErrorKind::NoResponse => SourceErrorKind::SensorNoResponse,
        SensorErrorKind::WrongDeviceId => SourceErrorKind::SensorWrongDeviceId,
        SensorErrorKind::OutOfRange => SourceErrorKind::SensorOutOfRange,
    }
}

/// Counts an error and logs it at the 1st, 2nd, 4th, 8th, ... of its kind.
fn count_and_log(
    source_name: &str,
    metrics: &SourceMetrics,
    kind: SourceErrorKind,
    error: &dyn std::fmt::Display,
) {
    let count = metrics.count_error(kind);
    if count.is_power_of_two() {
        warn!(source = %source_name, kind = kind.name(), count, %error, "skipped a reading");
    }
}

/// A reading as the JSON object the sensor lane carries; `None` if a value is not finite.
pub fn reading_payload(sensor_name: &str, reading: &Reading) -> Option<Vec<u8>> {
    let mut object = Map::new();
    object.insert("sensor".to_string(), Value::String(sensor_name.to_string()));
    for value in &reading.values {
        object.insert(value.name.to_string(), Value::Number(Number::from_f64(value.value)?));
    }
    Some(Value::Object(object).to_string().into_bytes())
}

/// Periodic JSON readings of every sensor of a board profile.
pub struct BoardSource {
    name: String,
    lane: Lane,
    sensors: Vec<BoardSensor>,
    keys: KeySequence,
    metrics: Arc<SourceMetrics>,
}

impl BoardSource {
    /// Loads the profile and opens its sensors (and nothing else).
    pub fn open(
        name: &str,
        config: &BoardConfig,
        metrics: Arc<SourceMetrics>,
    ) -> Result<BoardSource, SourceConfigError> {
        validate_source_name(name)?;
        let lane = lane_setting(name, config.lane.as_deref(), Lane::Sensor)?;
        let mut profile = load_profile(name, &config.profile)?;
        if profile.sensors.is_empty() {
            let found = format!("{} with no [[sensors]]", config.profile.display());
            return Err(SourceConfigError::invalid(
                name,
                "profile",
                "a board profile with at least one sensor",
                found,
            ));
        }
        profile.cameras.clear();
        profile.triggers.clear();
        let board = open_board(name, &profile)?;
        Ok(BoardSource {
            name: name.to_string(),
            lane,
            sensors: board.sensors,
            keys: KeySequence::starting_now(name),
            metrics,
        })
    }

    fn record(&self, sensor_name: &str, reading: &Reading) -> Option<SourceRecord> {
        Some(SourceRecord {
            lane: self.lane,
            key: self.keys.next_key(),
            timestamp_us: now_us(),
            content_type: JSON_CONTENT_TYPE.to_string(),
            payload: reading_payload(sensor_name, reading)?,
            tags: Default::default(),
        })
    }
}

impl Source for BoardSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(mut self: Box<Self>, out: RecordSender, stop: StopSignal) -> anyhow::Result<()> {
        let periods =
            self.sensors.iter().map(|sensor| Duration::from_millis(u64::from(sensor.period_ms))).collect();
        let mut schedule = Schedule::new(periods);
        info!(source = %self.name, sensors = self.sensors.len(), "board source reading");
        while let Some(index) = schedule.wait_next(&stop) {
            let sensor = &mut self.sensors[index];
            let sensor_name = sensor.name.clone();
            let reading = match sensor.sensor.read() {
                Ok(reading) => reading,
                Err(error) => {
                    count_and_log(&self.name, &self.metrics, sensor_error_kind(error.kind()), &error);
                    continue;
                }
            };
            let Some(record) = self.record(&sensor_name, &reading) else {
                let error = format!("sensor {sensor_name}: a value is not a finite number: {reading:?}");
                count_and_log(&self.name, &self.metrics, SourceErrorKind::SensorOutOfRange, &error);
                continue;
            };
            match Handover::new(&out, record, &stop, &self.metrics).deliver_blocking() {
                Delivery::Sent => {}
                Delivery::Stopped | Delivery::Disconnected => return Ok(()),
            }
        }
        Ok(())
    }
}

/// JPEG frames of one camera of a board profile.
pub struct CameraSource {
    name: String,
    lane: Lane,
    fps: u32,
    camera: BoardCamera,
    keys: KeySequence,
    metrics: Arc<SourceMetrics>,
}

impl CameraSource {
    /// Loads the profile and opens the one camera (and nothing else).
    pub fn open(
        name: &str,
        config: &CameraConfig,
        metrics: Arc<SourceMetrics>,
    ) -> Result<CameraSource, SourceConfigError> {
        validate_source_name(name)?;
        let lane = lane_setting(name, config.lane.as_deref(), Lane::Media)?;
        let mut profile = load_profile(name, &config.profile)?;
        let names: Vec<&str> = profile.cameras.iter().map(|camera| camera.name.as_str()).collect();
        let wanted = match (&config.camera, names.as_slice()) {
            (Some(wanted), _) if names.contains(&wanted.as_str()) => wanted.clone(),
            (None, [only]) => only.to_string(),
            (found, _) => {
                let expected = format!("one of the profile's cameras {names:?}");
                let found = found.as_ref().map_or("nothing".to_string(), |found| format!("{found:?}"));
                return Err(SourceConfigError::invalid(name, "camera", expected, found));
            }
        };
        profile.sensors.clear();
        profile.triggers.clear();
        profile.cameras.retain(|camera| camera.name == wanted);
        let mut board = open_board(name, &profile)?;
        let camera = board.cameras.pop().expect("the profile holds the wanted camera");
        let fps = check_range(
            name,
            "fps",
            config.fps.unwrap_or(camera.fps),
            1..=board::camera::FPS_MAX,
            "frames per second",
        )?;
        Ok(CameraSource {
            name: name.to_string(),
            lane,
            fps,
            camera,
            keys: KeySequence::starting_now(name),
            metrics,
        })
    }

    fn record(&self, payload: Vec<u8>) -> SourceRecord {
        SourceRecord {
            lane: self.lane,
            key: self.keys.next_key(),
            timestamp_us: now_us(),
            content_type: "image/jpeg".to_string(),
            payload,
            tags: [("camera".to_string(), self.camera.name.clone())].into(),
        }
    }
}

impl Source for CameraSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(mut self: Box<Self>, out: RecordSender, stop: StopSignal) -> anyhow::Result<()> {
        let mut schedule = Schedule::new(vec![Duration::from_secs(1) / self.fps]);
        info!(source = %self.name, camera = %self.camera.name, fps = self.fps, "camera source capturing");
        while schedule.wait_next(&stop).is_some() {
            let frame = match self.camera.source.next_frame() {
                Ok(frame) => frame,
                Err(error) => {
                    let kind = match error {
                        CameraError::FrameTooLarge { .. } => SourceErrorKind::FrameTooLarge,
                        _ => SourceErrorKind::CameraFrame,
                    };
                    count_and_log(&self.name, &self.metrics, kind, &error);
                    continue;
                }
            };
            match frame.format {
                FrameFormat::Jpeg => {}
            }
            if frame.bytes.len() > RECORD_PAYLOAD_BYTES_MAX {
                let error = format!("frame of {} bytes above {RECORD_PAYLOAD_BYTES_MAX}", frame.bytes.len());
                count_and_log(&self.name, &self.metrics, SourceErrorKind::FrameTooLarge, &error);
                continue;
            }
            let record = self.record(frame.bytes);
            match Handover::new(&out, record, &stop, &self.metrics).deliver_blocking() {
                Delivery::Sent => {}
                Delivery::Stopped | Delivery::Disconnected => return Ok(()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use board::device::{Unit, Value as SensorValue};

    #[test]
    fn readings_become_json_objects_named_by_unit() {
        let reading = Reading::new(vec![
            SensorValue { name: "temperature_c", value: 22.5, unit: Unit::Celsius },
            SensorValue { name: "humidity_pct", value: 41.0, unit: Unit::Percent },
        ]);
        let payload: Value = serde_json::from_slice(&reading_payload("env0", &reading).unwrap()).unwrap();
        assert_eq!(
            payload,
            serde_json::json!({ "sensor": "env0", "temperature_c": 22.5, "humidity_pct": 41.0 })
        );
        let broken = Reading::new(vec![SensorValue { name: "x_mg", value: f64::NAN, unit: Unit::MilliG }]);
        assert_eq!(reading_payload("acc0", &broken), None);
    }

    #[test]
    fn schedule_hands_out_the_earliest_device_and_stops() {
        let mut schedule = Schedule::new(vec![Duration::from_secs(3600), Duration::from_millis(1)]);
        let stop = StopSignal::new();
        let mut order = vec![schedule.wait_next(&stop), schedule.wait_next(&stop), schedule.wait_next(&stop)];
        order.sort();
        // Both are due at once; after that only the fast one comes round again.
        assert_eq!(order, [Some(0), Some(1), Some(1)]);
        stop.stop();
        assert_eq!(schedule.wait_next(&stop), None);
    }
}
