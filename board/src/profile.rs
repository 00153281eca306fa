//! Board profiles: which device sits on which bus and address, in TOML.
//!
//! Layout (every key is checked; unknown keys are errors):
//!
//! ```toml
//! name = "sim-devkit"          # 1..=64 characters
//! backend = "sim"              # "sim": every device simulated; "linux": real buses (feature `linux`)
//!
//! [[sensors]]                  # at most SENSORS_MAX (32)
//! name = "env0"                # unique across sensors, triggers and cameras
//! kind = "sht3x"               # "sht3x" (I2C) or "adxl345" (SPI)
//! bus = "i2c-1"                # sht3x: "i2c-N" -> /dev/i2c-N; adxl345: "spi-B.C" -> /dev/spidevB.C
//! address = 0x44               # sht3x only, required: 0x44 or 0x45
//! period_ms = 1000             # 1..=3 600 000, how often the appliance reads it
//! # adxl345 only: range_g = 2 | 4 | 8 | 16 (default 16), rate_hz = 25..=3200 in powers of two
//! # times 25 (default 100), spi_speed_hz = 100 000..=5 000 000 (default 1 000 000)
//! [sensors.sim]                # optional, used by the sim backend only
//! seed = 1
//! temperature_c = 22.5         # sht3x: -45..=130; humidity_pct 0..=100;
//! temperature_noise_c = 0.1    # sht3x: 0..=10; humidity_noise_pct 0..=50
//! # adxl345: acceleration_mg = [0, 0, 1000], noise_mg = 0..=16 000, device_id = 0xE5
//! fault_rate = 0.01            # 0..=1, fraction of reads with an injected fault
//! faults = ["crc", "nack", "out_of_range"]   # sht3x: crc, nack, out_of_range; adxl345: bus, out_of_range
//!
//! [[triggers]]                 # at most TRIGGERS_MAX (16)
//! name = "cam-trigger"
//! kind = "gpio"
//! chip = "gpiochip0"           # -> /dev/gpiochip0
//! line = 17                    # 0..=1023
//! debounce_us = 2000           # 0..=1 000 000
//! poll_interval_us = 500       # 100..=1 000 000, at most debounce_us when that is not 0
//! [triggers.sim]               # optional: repeating pulse, high_polls high then low_polls low
//! high_polls = 10
//! low_polls = 990
//!
//! [[cameras]]                  # at most CAMERAS_MAX (4)
//! name = "cam0"
//! kind = "sim"                 # "sim", or "v4l2" (simulated by the sim backend)
//! width = 320                  # sim: 32..=1920, v4l2: 1..=1920
//! height = 240                 # sim: 24..=1080, v4l2: 1..=1080
//! fps = 5                      # 1..=120
//! device = "/dev/video0"       # v4l2 only, required
//! [cameras.sim]                # optional: quality 1..=100 (80), seed, noise 0..=32 (4),
//! moving_frames = 20           # moving_frames (1) and still_frames (0): motion cycle
//! still_frames = 5
//! ```
//!
//! Every error names the file and the key, e.g. `profiles/x.toml: sensors[1].address: 0x46 is
//! not an SHT3x address (0x44 or 0x45)`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::camera::{self, SimCameraConfig};
use crate::trigger::DEBOUNCE_US_MAX;

/// Most sensors in one profile.
pub const SENSORS_MAX: usize = 32;
/// Most triggers in one profile.
pub const TRIGGERS_MAX: usize = 16;
/// Most cameras in one profile.
pub const CAMERAS_MAX: usize = 4;
/// Longest device name.
pub const NAME_BYTES_MAX: usize = 64;
/// Largest profile file; a board description is a few kilobytes.
pub const PROFILE_BYTES_MAX: u64 = 256 * 1024;
/// Longest sensor period: one hour.
pub const PERIOD_MS_MAX: u32 = 3_600_000;
/// Fastest SPI clock for the ADXL345 (datasheet: 5 MHz).
pub const ADXL345_SPI_SPEED_HZ_MAX: u32 = 5_000_000;
/// SPI clock used when the profile names none: well below the maximum so long or breadboard
/// wiring still works.
pub const ADXL345_SPI_SPEED_HZ_DEFAULT: u32 = 1_000_000;
/// Slowest SPI clock accepted.
pub const ADXL345_SPI_SPEED_HZ_MIN: u32 = 100_000;
/// Highest GPIO line offset accepted.
pub const GPIO_LINE_MAX: u32 = 1023;
/// Trigger polling interval limits, microseconds.
pub const POLL_INTERVAL_US_MIN: u32 = 100;
/// See `POLL_INTERVAL_US_MIN`.
pub const POLL_INTERVAL_US_MAX: u32 = 1_000_000;

/// A whole board.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Board name.
    pub name: String,
    /// Where the devices come from.
    pub backend: Backend,
    /// Sensors read on a period.
    #[serde(default)]
    pub sensors: Vec<SensorProfile>,
    /// Trigger inputs.
    #[serde(default)]
    pub triggers: Vec<TriggerProfile>,
    /// Cameras.
    #[serde(default)]
    pub cameras: Vec<CameraProfile>,
}

/// Where the devices come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Every device simulated (`board::sim`, `SimCamera`), driven by the same driver code.
    Sim,
    /// Real buses through linux-embedded-hal (cargo feature `linux`).
    Linux,
}

/// Sensor chips the board knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    /// SHT3x temperature and humidity over I2C.
    Sht3x,
    /// ADXL345 accelerometer over SPI.
    Adxl345,
}

/// One sensor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorProfile {
    /// Unique name.
    pub name: String,
    /// Chip.
    pub kind: SensorKind,
    /// `i2c-N` or `spi-B.C`.
    pub bus: String,
    /// I2C address (sht3x).
    pub address: Option<u8>,
    /// Reading period, milliseconds.
    pub period_ms: u32,
    /// Measurement range in g (adxl345).
    pub range_g: Option<u8>,
    /// Output data rate in Hz (adxl345).
    pub rate_hz: Option<u32>,
    /// SPI clock in Hz (adxl345).
    pub spi_speed_hz: Option<u32>,
    /// Simulator settings.
    pub sim: Option<SimSensorProfile>,
}

/// Injected fault names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultName {
    /// I2C NACK (sht3x).
    Nack,
    /// Corrupted CRC (sht3x).
    Crc,
    /// A reading outside the specified range.
    OutOfRange,
    /// SPI transaction failure (adxl345).
    Bus,
}

/// Simulator settings of a sensor.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SimSensorProfile {
    /// Seed of noise and faults (default 1).
    pub seed: Option<u64>,
    /// sht3x temperature, °C (default 22).
    pub temperature_c: Option<f64>,
    /// sht3x humidity, % (default 45).
    pub humidity_pct: Option<f64>,
    /// sht3x temperature noise, ± °C (default 0.1).
    pub temperature_noise_c: Option<f64>,
    /// sht3x humidity noise, ± % (default 0.5).
    pub humidity_noise_pct: Option<f64>,
    /// adxl345 acceleration X, Y, Z in milli-g (default [0, 0, 1000]).
    pub acceleration_mg: Option<[i32; 3]>,
    /// adxl345 noise, ± milli-g (default 8).
    pub noise_mg: Option<u32>,
    /// adxl345 DEVID (default 0xE5; anything else simulates a wrong chip).
    pub device_id: Option<u8>,
    /// Fraction of reads with an injected fault, 0..=1 (default 0).
    pub fault_rate: Option<f64>,
    /// Faults to choose among (default: all the kind supports).
    pub faults: Option<Vec<FaultName>>,
}

/// Trigger kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    /// A GPIO input line.
    Gpio,
}

/// One trigger input.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerProfile {
    /// Unique name.
    pub name: String,
    /// Input kind.
    pub kind: TriggerKind,
    /// GPIO chip, e.g. `gpiochip0`.
    pub chip: String,
    /// Line offset on the chip.
    pub line: u32,
    /// Debounce, microseconds.
    pub debounce_us: u64,
    /// How often the appliance polls, microseconds.
    pub poll_interval_us: u32,
    /// Simulated pulse train.
    pub sim: Option<SimTriggerProfile>,
}

/// Simulated trigger: a repeating pulse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimTriggerProfile {
    /// Polls the line reads high per cycle, at least 1.
    pub high_polls: u32,
    /// Polls the line reads low per cycle, at least 1.
    pub low_polls: u32,
}

/// Camera kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraKind {
    /// `SimCamera`.
    Sim,
    /// A V4L2 MJPEG device (simulated by the sim backend).
    V4l2,
}

/// One camera.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraProfile {
    /// Unique name.
    pub name: String,
    /// Camera kind.
    pub kind: CameraKind,
    /// Width, pixels.
    pub width: u16,
    /// Height, pixels.
    pub height: u16,
    /// Frames per second.
    pub fps: u32,
    /// Device path (v4l2).
    pub device: Option<String>,
    /// Simulator settings.
    pub sim: Option<SimCameraProfile>,
}

/// Simulator settings of a camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SimCameraProfile {
    /// JPEG quality (default 80).
    pub quality: Option<u8>,
    /// Noise seed (default 1).
    pub seed: Option<u64>,
    /// Per-channel noise (default 4).
    pub noise: Option<u8>,
    /// Moving frames per motion cycle (default 1).
    pub moving_frames: Option<u32>,
    /// Still frames per motion cycle (default 0).
    pub still_frames: Option<u32>,
}

/// Errors loading a profile; each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("{}: cannot read board profile: {source}", path.display())]
    Read {
        /// Profile path.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A key is missing, unknown, of the wrong type or has a bad value.
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        /// Profile path.
        path: PathBuf,
        /// Dotted key, e.g. `sensors[1].address`; empty for the whole file.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ProfileError {
    /// The key at fault, if the error is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ProfileError::Read { .. } => None,
            ProfileError::Invalid { key, .. } => Some(key),
        }
    }
}

/// An I2C or SPI bus named in a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bus {
    /// `/dev/i2c-N`.
    I2c {
        /// Adapter number N.
        number: u32,
    },
    /// `/dev/spidevB.C`.
    Spi {
        /// Bus number B.
        bus: u32,
        /// Chip select C.
        chip_select: u32,
    },
}

impl Bus {
    /// Parses `i2c-N` or `spi-B.C`.
    pub fn parse(text: &str) -> Option<Bus> {
        let number = |digits: &str| -> Option<u32> {
            if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        };
        if let Some(rest) = text.strip_prefix("i2c-") {
            return Some(Bus::I2c { number: number(rest)? });
        }
        let (bus, chip_select) = text.strip_prefix("spi-")?.split_once('.')?;
        Some(Bus::Spi { bus: number(bus)?, chip_select: number(chip_select)? })
    }

    /// Device node of the bus on Linux.
    pub fn device_path(&self) -> String {
        match self {
            Bus::I2c { number } => format!("/dev/i2c-{number}"),
            Bus::Spi { bus, chip_select } => format!("/dev/spidev{bus}.{chip_select}"),
        }
    }
}

/// ADXL345 rate code for an output data rate in Hz (datasheet table 7), 25..=3200 Hz.
pub fn adxl345_rate_code(rate_hz: u32) -> Option<u8> {
    const RATES: [(u32, u8); 8] = [
        (25, 0x08),
        (50, 0x09),
        (100, 0x0A),
        (200, 0x0B),
        (400, 0x0C),
        (800, 0x0D),
        (1600, 0x0E),
        (3200, 0x0F),
    ];
    RATES.iter().find(|(hz, _)| *hz == rate_hz).map(|(_, code)| *code)
}

/// Faults each sensor kind can simulate.
pub fn supported_faults(kind: SensorKind) -> &'static [FaultName] {
    match kind {
        SensorKind::Sht3x => &[FaultName::Crc, FaultName::Nack, FaultName::OutOfRange],
        SensorKind::Adxl345 => &[FaultName::Bus, FaultName::OutOfRange],
    }
}

impl Profile {
    /// Reads, parses and validates a profile file.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let read_error = |source| ProfileError::Read { path: path.to_path_buf(), source };
        let length = std::fs::metadata(path).map_err(read_error)?.len();
        if length > PROFILE_BYTES_MAX {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                key: String::new(),
                message: format!("{length} bytes above the maximum {PROFILE_BYTES_MAX} bytes"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Profile::parse(&text, path)
    }

    /// Parses and validates profile text; `path` only names the origin in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Profile, ProfileError> {
        let profile: Profile = toml::from_str(text).map_err(|error| {
            let (key, location) = match error.span() {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    (key_at(text, span.start, error.message()), format!(" (line {line}, column {column})"))
                }
                None => (String::new(), String::new()),
            };
            ProfileError::Invalid {
                path: path.to_path_buf(),
                key,
                message: format!("{}{location}", error.message().trim_end()),
            }
        })?;
        profile.validate(path)?;
        Ok(profile)
    }

    /// Checks every value against its limits and the kind it belongs to.
    pub fn validate(&self, path: &Path) -> Result<(), ProfileError> {
        let invalid =
            |key: String, message: String| ProfileError::Invalid { path: path.to_path_buf(), key, message };
        check_name(&self.name).map_err(|message| invalid("name".to_string(), message))?;
        for (list, count, max) in [
            ("sensors", self.sensors.len(), SENSORS_MAX),
            ("triggers", self.triggers.len(), TRIGGERS_MAX),
            ("cameras", self.cameras.len(), CAMERAS_MAX),
        ] {
            if count > max {
                return Err(invalid(list.to_string(), format!("{count} entries above the maximum {max}")));
            }
        }
        let names = self
            .sensors
            .iter()
            .enumerate()
            .map(|(index, sensor)| (format!("sensors[{index}].name"), &sensor.name))
            .chain(
                self.triggers
                    .iter()
                    .enumerate()
                    .map(|(index, t)| (format!("triggers[{index}].name"), &t.name)),
            )
            .chain(
                self.cameras.iter().enumerate().map(|(index, c)| (format!("cameras[{index}].name"), &c.name)),
            );
        let mut seen: Vec<(String, &String)> = Vec::new();
        for (key, name) in names {
            check_name(name).map_err(|message| invalid(key.clone(), message))?;
            if let Some((first_key, _)) = seen.iter().find(|(_, earlier)| *earlier == name) {
                return Err(invalid(key, format!("name {name:?} already used by {first_key}")));
            }
            seen.push((key, name));
        }
        let mut buses: Vec<(Bus, Option<u8>, String)> = Vec::new();
        for (index, sensor) in self.sensors.iter().enumerate() {
            let key = |field: &str| format!("sensors[{index}].{field}");
            let (bus, address) =
                validate_sensor(sensor).map_err(|(field, message)| invalid(key(field), message))?;
            if let Some((_, _, other)) = buses
                .iter()
                .find(|(other_bus, other_address, _)| *other_bus == bus && *other_address == address)
            {
                let what = match address {
                    Some(address) => format!("address 0x{address:02X} on {}", sensor.bus),
                    None => format!("bus {}", sensor.bus),
                };
                let field = if address.is_some() { "address" } else { "bus" };
                return Err(invalid(key(field), format!("{what} already used by {other}")));
            }
            buses.push((bus, address, sensor.name.clone()));
        }
        for (index, trigger) in self.triggers.iter().enumerate() {
            validate_trigger(trigger)
                .map_err(|(field, message)| invalid(format!("triggers[{index}].{field}"), message))?;
        }
        for (index, camera) in self.cameras.iter().enumerate() {
            validate_camera(camera)
                .map_err(|(field, message)| invalid(format!("cameras[{index}].{field}"), message))?;
        }
        Ok(())
    }
}

type FieldError = (&'static str, String);

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!("name must be 1..={NAME_BYTES_MAX} bytes, got {}", name.len()));
    }
    if !name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' || byte == b'.')
    {
        return Err(format!("name {name:?} may hold only ASCII letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

fn not_used(field: &'static str, kind: &str) -> FieldError {
    (field, format!("not used by kind {kind}"))
}

fn check_range_f64(field: &'static str, value: Option<f64>, low: f64, high: f64) -> Result<(), FieldError> {
    match value {
        Some(value) if !(low..=high).contains(&value) => {
            Err((field, format!("{value} outside {low}..={high}")))
        }
        _ => Ok(()),
    }
}

fn validate_sensor(sensor: &SensorProfile) -> Result<(Bus, Option<u8>), FieldError> {
    if sensor.period_ms == 0 || sensor.period_ms > PERIOD_MS_MAX {
        return Err(("period_ms", format!("{} outside 1..={PERIOD_MS_MAX}", sensor.period_ms)));
    }
    let bus = Bus::parse(&sensor.bus)
        .ok_or(("bus", format!("{:?} is neither \"i2c-N\" nor \"spi-B.C\"", sensor.bus)))?;
    let sim = sensor.sim.clone().unwrap_or_default();
    check_range_f64("sim.fault_rate", sim.fault_rate, 0.0, 1.0)?;
    if let Some(faults) = &sim.faults {
        for fault in faults {
            if !supported_faults(sensor.kind).contains(fault) {
                return Err((
                    "sim.faults",
                    format!("fault {fault:?} not supported by kind {:?}", sensor.kind).to_lowercase(),
                ));
            }
        }
    }
    match sensor.kind {
        SensorKind::Sht3x => {
            if !matches!(bus, Bus::I2c { .. }) {
                return Err(("bus", format!("sht3x sits on an I2C bus (\"i2c-N\"), got {:?}", sensor.bus)));
            }
            let address = sensor.address.ok_or(("address", "required for kind sht3x".to_string()))?;
            if address != crate::sht3x::ADDRESS_DEFAULT && address != crate::sht3x::ADDRESS_ALTERNATE {
                return Err(("address", format!("0x{address:02X} is not an SHT3x address (0x44 or 0x45)")));
            }
            for (field, present) in [
                ("range_g", sensor.range_g.is_some()),
                ("rate_hz", sensor.rate_hz.is_some()),
                ("spi_speed_hz", sensor.spi_speed_hz.is_some()),
                ("sim.acceleration_mg", sim.acceleration_mg.is_some()),
                ("sim.noise_mg", sim.noise_mg.is_some()),
                ("sim.device_id", sim.device_id.is_some()),
            ] {
                if present {
                    return Err(not_used(field, "sht3x"));
                }
            }
            check_range_f64("sim.temperature_c", sim.temperature_c, -45.0, 130.0)?;
            check_range_f64("sim.humidity_pct", sim.humidity_pct, 0.0, 100.0)?;
            check_range_f64("sim.temperature_noise_c", sim.temperature_noise_c, 0.0, 10.0)?;
            check_range_f64("sim.humidity_noise_pct", sim.humidity_noise_pct, 0.0, 50.0)?;
            Ok((bus, Some(address)))
        }
        SensorKind::Adxl345 => {
            if !matches!(bus, Bus::Spi { .. }) {
                return Err((
                    "bus",
                    format!("adxl345 sits on an SPI bus (\"spi-B.C\"), got {:?}", sensor.bus),
                ));
            }
            for (field, present) in [
                ("address", sensor.address.is_some()),
                ("sim.temperature_c", sim.temperature_c.is_some()),
                ("sim.humidity_pct", sim.humidity_pct.is_some()),
                ("sim.temperature_noise_c", sim.temperature_noise_c.is_some()),
                ("sim.humidity_noise_pct", sim.humidity_noise_pct.is_some()),
            ] {
                if present {
                    return Err(not_used(field, "adxl345"));
                }
            }
            if let Some(range_g) = sensor.range_g
                && !matches!(range_g, 2 | 4 | 8 | 16)
            {
                return Err(("range_g", format!("{range_g} is not one of 2, 4, 8, 16")));
            }
            if let Some(rate_hz) = sensor.rate_hz
                && adxl345_rate_code(rate_hz).is_none()
            {
                return Err((
                    "rate_hz",
                    format!("{rate_hz} is not one of 25, 50, 100, 200, 400, 800, 1600, 3200"),
                ));
            }
            if let Some(speed) = sensor.spi_speed_hz
                && !(ADXL345_SPI_SPEED_HZ_MIN..=ADXL345_SPI_SPEED_HZ_MAX).contains(&speed)
            {
                return Err((
                    "spi_speed_hz",
                    format!("{speed} outside {ADXL345_SPI_SPEED_HZ_MIN}..={ADXL345_SPI_SPEED_HZ_MAX}"),
                ));
            }
            if let Some(noise) = sim.noise_mg
                && noise > 16_000
            {
                return Err(("sim.noise_mg", format!("{noise} above 16000")));
            }
            Ok((bus, None))
        }
    }
}

fn validate_trigger(trigger: &TriggerProfile) -> Result<(), FieldError> {
    if trigger.chip.is_empty()
        || trigger.chip.len() > NAME_BYTES_MAX
        || !trigger.chip.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    {
        return Err(("chip", format!("{:?} is not a GPIO chip name like \"gpiochip0\"", trigger.chip)));
    }
    if trigger.line > GPIO_LINE_MAX {
        return Err(("line", format!("{} above {GPIO_LINE_MAX}", trigger.line)));
    }
    if trigger.debounce_us > DEBOUNCE_US_MAX {
        return Err(("debounce_us", format!("{} above {DEBOUNCE_US_MAX}", trigger.debounce_us)));
    }
    if !(POLL_INTERVAL_US_MIN..=POLL_INTERVAL_US_MAX).contains(&trigger.poll_interval_us) {
        return Err((
            "poll_interval_us",
            format!("{} outside {POLL_INTERVAL_US_MIN}..={POLL_INTERVAL_US_MAX}", trigger.poll_interval_us),
        ));
    }
    if trigger.debounce_us > 0 && u64::from(trigger.poll_interval_us) > trigger.debounce_us {
        return Err((
            "poll_interval_us",
            format!(
                "{} above debounce_us {}: the debounce could not see a level hold",
                trigger.poll_interval_us, trigger.debounce_us
            ),
        ));
    }
    if let Some(sim) = trigger.sim {
        if sim.high_polls == 0 {
            return Err(("sim.high_polls", "must be at least 1".to_string()));
        }
        if sim.low_polls == 0 {
            return Err(("sim.low_polls", "must be at least 1".to_string()));
        }
    }
    Ok(())
}

/// Simulator settings of a camera profile, defaults filled in.
pub fn sim_camera_config(camera: &CameraProfile) -> SimCameraConfig {
    let sim = camera.sim.unwrap_or_default();
    let defaults = SimCameraConfig::default();
    SimCameraConfig {
        width: camera.width,
        height: camera.height,
        fps: camera.fps,
        quality: sim.quality.unwrap_or(defaults.quality),
        seed: sim.seed.unwrap_or(defaults.seed),
        noise_amplitude: sim.noise.unwrap_or(defaults.noise_amplitude),
        moving_frames: sim.moving_frames.unwrap_or(defaults.moving_frames),
        still_frames: sim.still_frames.unwrap_or(defaults.still_frames),
    }
}

fn validate_camera(camera: &CameraProfile) -> Result<(), FieldError> {
    if camera.width == 0 || camera.width > camera::FRAME_WIDTH_MAX {
        return Err(("width", format!("{} outside 1..={}", camera.width, camera::FRAME_WIDTH_MAX)));
    }
    if camera.height == 0 || camera.height > camera::FRAME_HEIGHT_MAX {
        return Err(("height", format!("{} outside 1..={}", camera.height, camera::FRAME_HEIGHT_MAX)));
    }
    match (camera.kind, &camera.device) {
        (CameraKind::Sim, Some(_)) => return Err(not_used("device", "sim")),
        (CameraKind::V4l2, None) => return Err(("device", "required for kind v4l2".to_string())),
        (CameraKind::V4l2, Some(device)) if !device.starts_with("/dev/") => {
            return Err(("device", format!("{device:?} is not under /dev/")));
        }
        _ => {}
    }
    // Every camera may be simulated (the sim backend simulates v4l2 cameras too), so the
    // simulator's limits apply to all of them.
    sim_camera_config(camera).validate().map_err(|message| {
        let field = match message.split_whitespace().next() {
            Some("width") => "width",
            Some("height") => "height",
            Some("fps") => "fps",
            Some("quality") => "sim.quality",
            Some("noise") => "sim.noise",
            _ => "sim.moving_frames",
        };
        (field, message)
    })
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |index| index + 1) + 1;
    (line, column)
}

/// Best-effort dotted key for a parse error at `offset`: the table from the last header before
/// it (arrays of tables get their index) and the key on the error's line. Missing fields are
/// named from the message, since their span covers the whole table.
fn key_at(text: &str, offset: usize, message: &str) -> String {
    let offset = offset.min(text.len());
    let mut array_counts: Vec<(String, usize)> = Vec::new();
    let mut table = String::new();
    let mut line_start = 0;
    let mut error_line = "";
    let mut column = 0;
    for line in text.split_inclusive('\n') {
        let line_end = line_start + line.len();
        let trimmed = line.trim();
        if let Some(header) = trimmed.strip_prefix("[[").and_then(|rest| rest.split("]]").next()) {
            let header = header.trim().to_string();
            match array_counts.iter_mut().find(|(name, _)| *name == header) {
                Some((_, count)) => *count += 1,
                None => array_counts.push((header.clone(), 1)),
            }
            table = header;
        } else if let Some(header) = trimmed.strip_prefix('[').and_then(|rest| rest.split(']').next()) {
            table = header.trim().to_string();
        }
        if offset < line_end || line_end == text.len() {
            error_line = line;
            column = offset - line_start;
            break;
        }
        line_start = line_end;
    }
    // Give each array-of-tables prefix its current index: `sensors.sim` -> `sensors[1].sim`.
    let mut path = String::new();
    let mut prefix = String::new();
    for part in table.split('.').filter(|part| !part.is_empty()) {
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(part);
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(part);
        if let Some((_, count)) = array_counts.iter().find(|(name, _)| *name == prefix) {
            path.push_str(&format!("[{}]", count - 1));
        }
    }
    let trimmed_line = error_line.trim_start();
    let key = if let Some(field) =
        message.split("missing field `").nth(1).and_then(|rest| rest.split('`').next())
    {
        Some(field.to_string())
    } else if trimmed_line.starts_with('[') {
        None
    } else {
        // The key is the last `name =` before the error's column on its line (inline tables may
        // hold several), or the word at the column when the error points at a key itself.
        let upto = &error_line[..column.min(error_line.len())];
        let at = &error_line[column.min(error_line.len())..];
        let word =
            at.split(|c: char| c == '=' || c == ',' || c == '}' || c.is_whitespace()).next().unwrap_or("");
        let points_at_key = !word.is_empty() && at[word.len()..].trim_start().starts_with('=');
        let candidate = match upto.rfind('=') {
            Some(end) if !points_at_key => {
                upto[..end].rsplit([',', '{']).next().unwrap_or("").trim().to_string()
            }
            _ => word.to_string(),
        };
        // One level of inline table: `sim = { seed = "x" }` -> `sim.seed`.
        let outer = upto.rfind('{').and_then(|brace| {
            let before = &upto[..brace];
            let equals = before.rfind('=')?;
            let name = before[..equals].rsplit([',', '{']).next()?.trim();
            (!name.is_empty()).then(|| name.to_string())
        });
        match outer {
            Some(outer) if !candidate.is_empty() && outer != candidate => {
                Some(format!("{outer}.{candidate}"))
            }
            _ => (!candidate.is_empty()).then_some(candidate),
        }
    };
    match (path.is_empty(), key) {
        (_, None) => path,
        (true, Some(key)) => key,
        (false, Some(key)) => format!("{path}.{key}"),
    }
}
