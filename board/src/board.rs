//! Opens every device a `Profile` names, as boxed trait objects ready to read.
//!
//! The sim backend builds `board::sim` devices and `SimCamera`s and puts the real drivers
//! (`Sht3x`, `Adxl345`, `Trigger`) on top, so the demo and the tests run the same driver code
//! as a board; simulated sensors never sleep (`SimDelay`). The linux backend (cargo feature
//! `linux`) opens `/dev/i2c-N`, `/dev/spidevB.C` and `/dev/gpiochipN` instead.
//!
//! Opening an ADXL345 runs `Adxl345::init` (device id check, range, rate, measure), so a wrong
//! chip fails `Board::open` rather than every read. Simulated random faults start after that.

use std::path::Path;

use crate::accelerometer::{self, Adxl345, Range};
use crate::camera::{CameraError, FrameSource, SimCamera};
use crate::device::{self, Adxl345Sensor, GpioTrigger, Sensor, SensorError, Sht3xSensor, TriggerInput};
use crate::profile::{
    self, Backend, CameraProfile, FaultName, Profile, ProfileError, SensorKind, SensorProfile, TriggerProfile,
};
use crate::sht3x::Sht3x;
use crate::sim::{
    Adxl345Fault, RandomFaults, Sht3xFault, SimAdxl345, SimDelay, SimPin, SimSht3x, SimSht3xConfig,
};
use crate::trigger;

/// Simulated pulse when a trigger's profile has no `sim` table: 10 polls high out of 1000.
const SIM_TRIGGER_HIGH_POLLS_DEFAULT: u32 = 10;
/// See `SIM_TRIGGER_HIGH_POLLS_DEFAULT`.
const SIM_TRIGGER_LOW_POLLS_DEFAULT: u32 = 990;
/// Longest simulated pulse cycle, so the scripted pin stays small.
const SIM_TRIGGER_CYCLE_POLLS_MAX: u32 = 1_000_000;

/// An opened sensor and its schedule.
pub struct BoardSensor {
    /// Name from the profile (also `sensor.name()`).
    pub name: String,
    /// Chip.
    pub kind: SensorKind,
    /// How often to read it, milliseconds.
    pub period_ms: u32,
    /// The sensor.
    pub sensor: Box<dyn Sensor + Send>,
}

/// An opened trigger input and how often to poll it.
pub struct BoardTrigger {
    /// Name from the profile.
    pub name: String,
    /// How often to call `poll`, microseconds.
    pub poll_interval_us: u32,
    /// The trigger.
    pub trigger: Box<dyn TriggerInput + Send>,
}

/// An opened camera.
pub struct BoardCamera {
    /// Name from the profile.
    pub name: String,
    /// Frames per second the profile asks for; `next_frame` blocks on real cameras, not on the
    /// simulator, so the caller paces simulated cameras with this.
    pub fps: u32,
    /// The camera.
    pub source: Box<dyn FrameSource + Send>,
}

/// Every device of a board, opened.
pub struct Board {
    /// Board name from the profile.
    pub name: String,
    /// Backend the devices came from.
    pub backend: Backend,
    /// Sensors, in profile order.
    pub sensors: Vec<BoardSensor>,
    /// Trigger inputs, in profile order.
    pub triggers: Vec<BoardTrigger>,
    /// Cameras, in profile order.
    pub cameras: Vec<BoardCamera>,
}

/// Errors opening a board.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    /// The profile is invalid.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The backend was not compiled in.
    #[error(
        "board {board}: backend {backend} needs cargo feature {feature} (rebuild with --features {feature})"
    )]
    BackendNotBuilt {
        /// Board name.
        board: String,
        /// Backend named by the profile.
        backend: &'static str,
        /// Cargo feature that provides it.
        feature: &'static str,
    },
    /// A device node could not be opened or configured.
    #[error("{device}: cannot open {path}: {reason}")]
    Open {
        /// Device name from the profile.
        device: String,
        /// Device node, e.g. `/dev/i2c-1`.
        path: String,
        /// The operating system's or driver's error.
        reason: String,
    },
    /// A sensor failed while being set up (e.g. wrong device id).
    #[error(transparent)]
    Sensor(#[from] SensorError),
    /// A camera failed while being set up.
    #[error(transparent)]
    Camera(#[from] CameraError),
}

impl Board {
    /// Opens every device of a profile; validates it again first, so a profile built in code
    /// gets the same checks as one loaded from a file.
    pub fn open(profile: &Profile) -> Result<Board, BoardError> {
        profile.validate(Path::new("<board profile>"))?;
        let mut board = Board {
            name: profile.name.clone(),
            backend: profile.backend,
            sensors: Vec::with_capacity(profile.sensors.len()),
            triggers: Vec::with_capacity(profile.triggers.len()),
            cameras: Vec::with_capacity(profile.cameras.len()),
        };
        for sensor in &profile.sensors {
            let opened = match profile.backend {
                Backend::Sim => open_sim_sensor(sensor)?,
                Backend::Linux => open_linux_sensor(&profile.name, sensor)?,
            };
            board.sensors.push(BoardSensor {
                name: sensor.name.clone(),
                kind: sensor.kind,
                period_ms: sensor.period_ms,
                sensor: opened,
            });
        }
        for trigger in &profile.triggers {
            let opened = match profile.backend {
                Backend::Sim => open_sim_trigger(trigger),
                Backend::Linux => open_linux_trigger(&profile.name, trigger)?,
            };
            board.triggers.push(BoardTrigger {
                name: trigger.name.clone(),
                poll_interval_us: trigger.poll_interval_us,
                trigger: opened,
            });
        }
        for camera in &profile.cameras {
            let source: Box<dyn FrameSource + Send> = match (profile.backend, camera.kind) {
                (Backend::Linux, profile::CameraKind::V4l2) => open_v4l2_camera(&profile.name, camera)?,
                _ => Box::new(SimCamera::new(camera.name.clone(), profile::sim_camera_config(camera))),
            };
            board.cameras.push(BoardCamera { name: camera.name.clone(), fps: camera.fps, source });
        }
        Ok(board)
    }
}

/// Accelerometer range for a profile's `range_g` (validated to 2, 4, 8 or 16; default 16).
pub fn adxl345_range(range_g: Option<u8>) -> Range {
    match range_g.unwrap_or(16) {
        2 => Range::G2,
        4 => Range::G4,
        8 => Range::G8,
        _ => Range::G16,
    }
}

/// Driver settings for a validated adxl345 sensor profile.
pub fn adxl345_config(sensor: &SensorProfile) -> accelerometer::Config {
    let rate_code = profile::adxl345_rate_code(sensor.rate_hz.unwrap_or(100)).expect("rate validated");
    accelerometer::Config { range: adxl345_range(sensor.range_g), rate_code }
}

fn rate_per_million(fault_rate: Option<f64>) -> u32 {
    (fault_rate.unwrap_or(0.0) * 1_000_000.0).round() as u32
}

fn fault_names(sensor: &SensorProfile) -> Vec<FaultName> {
    let sim = sensor.sim.as_ref();
    match sim.and_then(|sim| sim.faults.clone()) {
        Some(faults) => faults,
        None => profile::supported_faults(sensor.kind).to_vec(),
    }
}

fn milli(value: f64) -> i64 {
    (value * 1000.0).round() as i64
}

fn open_sim_sensor(sensor: &SensorProfile) -> Result<Box<dyn Sensor + Send>, BoardError> {
    let sim = sensor.sim.clone().unwrap_or_default();
    let seed = sim.seed.unwrap_or(1);
    let faults = rate_per_million(sim.fault_rate);
    match sensor.kind {
        SensorKind::Sht3x => {
            let address = sensor.address.expect("address validated for sht3x");
            let mut device = SimSht3x::new(SimSht3xConfig {
                address,
                temperature_millicelsius: milli(sim.temperature_c.unwrap_or(22.0)) as i32,
                humidity_millipercent: milli(sim.humidity_pct.unwrap_or(45.0)) as u32,
                temperature_noise_millicelsius: milli(sim.temperature_noise_c.unwrap_or(0.1)) as u32,
                humidity_noise_millipercent: milli(sim.humidity_noise_pct.unwrap_or(0.5)) as u32,
                seed,
            });
            if faults > 0 {
                let kinds = fault_names(sensor)
                    .into_iter()
                    .map(|fault| match fault {
                        FaultName::Nack => Sht3xFault::Nack,
                        FaultName::Crc => Sht3xFault::Crc,
                        _ => Sht3xFault::OutOfRange,
                    })
                    .collect();
                device.set_random_faults(RandomFaults { rate_per_million: faults, kinds, seed });
            }
            Ok(Box::new(Sht3xSensor::new(
                sensor.name.clone(),
                Sht3x::new(device, address),
                SimDelay::default(),
            )))
        }
        SensorKind::Adxl345 => {
            let mut device = SimAdxl345::new(sim.device_id.unwrap_or(accelerometer::DEVICE_ID));
            let [x, y, z] = sim.acceleration_mg.unwrap_or([0, 0, 1_000]);
            device.set_acceleration_milli_g(x, y, z);
            device.set_noise(sim.noise_mg.unwrap_or(8), seed);
            let config = adxl345_config(sensor);
            let mut driver = Adxl345::new(device);
            driver.init(config).map_err(|error| device::adxl345_error(&sensor.name, error))?;
            let mut device = driver.destroy();
            if faults > 0 {
                let kinds = fault_names(sensor)
                    .into_iter()
                    .map(|fault| match fault {
                        FaultName::Bus => Adxl345Fault::Bus,
                        _ => Adxl345Fault::OutOfRange,
                    })
                    .collect();
                device.set_random_faults(RandomFaults { rate_per_million: faults, kinds, seed });
            }
            Ok(Box::new(Adxl345Sensor::new(sensor.name.clone(), Adxl345::new(device), config.range)))
        }
    }
}

fn open_sim_trigger(trigger: &TriggerProfile) -> Box<dyn TriggerInput + Send> {
    let (high, low) = match trigger.sim {
        Some(sim) => (sim.high_polls, sim.low_polls),
        None => (SIM_TRIGGER_HIGH_POLLS_DEFAULT, SIM_TRIGGER_LOW_POLLS_DEFAULT),
    };
    let high = high.min(SIM_TRIGGER_CYCLE_POLLS_MAX / 2);
    let low = low.min(SIM_TRIGGER_CYCLE_POLLS_MAX / 2);
    let mut levels = vec![true; high as usize];
    levels.extend(std::iter::repeat_n(false, low as usize));
    // Start low so the first poll learns a resting low level and the first pulse is an edge.
    levels.rotate_left(high as usize);
    let pin = SimPin::repeating(levels);
    Box::new(GpioTrigger::new(
        trigger.name.clone(),
        pin,
        trigger::Config { debounce_us: trigger.debounce_us },
    ))
}

#[cfg(all(feature = "linux", target_os = "linux"))]
fn open_linux_sensor(_board: &str, sensor: &SensorProfile) -> Result<Box<dyn Sensor + Send>, BoardError> {
    let bus = profile::Bus::parse(&sensor.bus).expect("bus validated");
    crate::linux::open_sensor(sensor, bus)
}

#[cfg(not(all(feature = "linux", target_os = "linux")))]
fn open_linux_sensor(board: &str, _sensor: &SensorProfile) -> Result<Box<dyn Sensor + Send>, BoardError> {
    Err(BoardError::BackendNotBuilt { board: board.to_string(), backend: "linux", feature: "linux" })
}

#[cfg(all(feature = "linux", target_os = "linux"))]
fn open_linux_trigger(
    _board: &str,
    trigger: &TriggerProfile,
) -> Result<Box<dyn TriggerInput + Send>, BoardError> {
    crate::linux::open_trigger(trigger)
}

#[cfg(not(all(feature = "linux", target_os = "linux")))]
fn open_linux_trigger(
    board: &str,
    _trigger: &TriggerProfile,
) -> Result<Box<dyn TriggerInput + Send>, BoardError> {
    Err(BoardError::BackendNotBuilt { board: board.to_string(), backend: "linux", feature: "linux" })
}

#[cfg(all(feature = "v4l2", target_os = "linux"))]
fn open_v4l2_camera(_board: &str, camera: &CameraProfile) -> Result<Box<dyn FrameSource + Send>, BoardError> {
    Ok(Box::new(crate::v4l2::V4l2Camera::open(camera)?))
}

#[cfg(not(all(feature = "v4l2", target_os = "linux")))]
fn open_v4l2_camera(board: &str, _camera: &CameraProfile) -> Result<Box<dyn FrameSource + Send>, BoardError> {
    Err(BoardError::BackendNotBuilt {
        board: board.to_string(),
        backend: "linux (v4l2 camera)",
        feature: "v4l2",
    })
}
