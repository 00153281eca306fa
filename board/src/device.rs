//! Uniform device traits the appliance reads through, whatever the driver or the bus.
//!
//! - `Sensor`: `read()` returns a `Reading`, a short list (at most `READING_VALUES_MAX`, 4) of
//!   named values with units, e.g. `temperature_c` in `Unit::Celsius`. Names end in their unit so
//!   they can become JSON keys as they are. Readings outside the part's specified range are
//!   errors (`SensorError::OutOfRange`), not values: a saturated accelerometer axis or a
//!   temperature above the SHT3x's 125 °C is a fault, never data.
//! - `TriggerInput`: `poll(now_us)` returns a debounced rising edge; the caller passes the clock,
//!   so this crate still reads none.
//!
//! `SensorError` owns strings instead of bus error types so boxed sensors of every bus fit one
//! trait object; `SensorError::kind()` gives a `Copy` tag for counting faults by kind (a NACK is
//! `SensorErrorKind::Nack`, any other bus failure `SensorErrorKind::Bus`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use embedded_hal::delay::DelayNs;
use embedded_hal::digital::InputPin;
use embedded_hal::i2c::{self, I2c};
use embedded_hal::spi::{self, SpiDevice};

use crate::accelerometer::{self, Adxl345, Range};
use crate::sht3x::{self, Sht3x};
use crate::trigger::{self, RisingEdge, Trigger};

/// Most values one reading holds.
pub const READING_VALUES_MAX: usize = 4;

/// SHT3x-DIS specified temperature range (datasheet table 2): -40..=125 °C, in millidegrees.
pub const SHT3X_TEMPERATURE_MILLICELSIUS_SPECIFIED: std::ops::RangeInclusive<i32> = -40_000..=125_000;

/// Unit of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Degrees Celsius.
    Celsius,
    /// Percent (relative humidity).
    Percent,
    /// Thousandths of standard gravity (9.806 65 m/s²).
    MilliG,
}

/// One named value.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Value {
    /// Name ending in the unit, e.g. `temperature_c`, `humidity_pct`, `x_mg`.
    pub name: &'static str,
    /// The value in `unit`.
    pub value: f64,
    /// Unit of `value`.
    pub unit: Unit,
}

/// One reading of a sensor: its named values, in a fixed order per sensor kind.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Reading {
    /// At most `READING_VALUES_MAX` values with distinct names.
    pub values: Vec<Value>,
}

impl Reading {
    /// A reading of the given values; panics on more than `READING_VALUES_MAX` or a repeated name.
    pub fn new(values: Vec<Value>) -> Self {
        assert!(values.len() <= READING_VALUES_MAX, "{} values above {READING_VALUES_MAX}", values.len());
        for (index, value) in values.iter().enumerate() {
            assert!(
                values[..index].iter().all(|earlier| earlier.name != value.name),
                "value name {} repeated",
                value.name
            );
        }
        Self { values }
    }

    /// The value named `name`, if present.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|value| value.name == name).map(|value| value.value)
    }
}

/// What kind of fault a `SensorError` is, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SensorErrorKind {
    /// The device did not acknowledge (I2C NACK).
    Nack,
    /// Any other bus failure.
    Bus,
    /// A checksum did not match.
    Crc,
    /// Nothing drove the bus.
    NoResponse,
    /// The wrong chip answered.
    WrongDeviceId,
    /// A value outside the part's specified range.
    OutOfRange,
}

/// Errors reading a sensor; every variant names the sensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SensorError {
    /// The device did not acknowledge its address or data.
    #[error(
        "sensor {sensor}: not acknowledged on the bus: {detail} (device absent, busy or at another address)"
    )]
    Nack {
        /// Sensor name.
        sensor: String,
        /// The bus error, as the bus reported it.
        detail: String,
    },
    /// Another bus failure.
    #[error("sensor {sensor}: bus error: {detail} (check wiring and bus settings)")]
    Bus {
        /// Sensor name.
        sensor: String,
        /// The bus error, as the bus reported it.
        detail: String,
    },
    /// A checksum did not match.
    #[error(
        "sensor {sensor}: crc mismatch: computed 0x{expected:02X}, device sent 0x{found:02X} (bus noise; retry)"
    )]
    Crc {
        /// Sensor name.
        sensor: String,
        /// CRC computed over the data received.
        expected: u8,
        /// CRC the device sent.
        found: u8,
    },
    /// Every byte read was 0xFF.
    #[error("sensor {sensor}: no response, every byte read was 0xFF (device absent or unpowered)")]
    NoResponse {
        /// Sensor name.
        sensor: String,
    },
    /// The device identifier was not the expected one.
    #[error("sensor {sensor}: device id 0x{found:02X}, expected 0x{expected:02X} (wrong chip or bus)")]
    WrongDeviceId {
        /// Sensor name.
        sensor: String,
        /// Expected identifier.
        expected: u8,
        /// Identifier read.
        found: u8,
    },
    /// A value outside the part's specified range.
    #[error(
        "sensor {sensor}: {quantity} = {value} outside the specified {min}..={max} (saturated or faulty)"
    )]
    OutOfRange {
        /// Sensor name.
        sensor: String,
        /// Value name, e.g. `temperature_c`.
        quantity: &'static str,
        /// The value read.
        value: f64,
        /// Lowest specified value.
        min: f64,
        /// Highest specified value.
        max: f64,
    },
}

impl SensorError {
    /// The fault's kind.
    pub fn kind(&self) -> SensorErrorKind {
        match self {
            SensorError::Nack { .. } => SensorErrorKind::Nack,
            SensorError::Bus { .. } => SensorErrorKind::Bus,
            SensorError::Crc { .. } => SensorErrorKind::Crc,
            SensorError::NoResponse { .. } => SensorErrorKind::NoResponse,
            SensorError::WrongDeviceId { .. } => SensorErrorKind::WrongDeviceId,
            SensorError::OutOfRange { .. } => SensorErrorKind::OutOfRange,
        }
    }
}

/// A sensor the appliance reads on a schedule.
pub trait Sensor {
    /// The sensor's name from the board profile.
    fn name(&self) -> &str;
    /// Takes one reading (blocking for the sensor's conversion time).
    fn read(&mut self) -> Result<Reading, SensorError>;
}

impl<T: Sensor + ?Sized> Sensor for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn read(&mut self) -> Result<Reading, SensorError> {
        (**self).read()
    }
}

fn i2c_error(sensor: &str, error: impl i2c::Error) -> SensorError {
    let detail = format!("{error:?}");
    match error.kind() {
        i2c::ErrorKind::NoAcknowledge(_) => SensorError::Nack { sensor: sensor.to_string(), detail },
        _ => SensorError::Bus { sensor: sensor.to_string(), detail },
    }
}

fn spi_error(sensor: &str, error: impl spi::Error) -> SensorError {
    SensorError::Bus { sensor: sensor.to_string(), detail: format!("{error:?} ({:?})", error.kind()) }
}

/// Converts an SHT3x driver error, keeping its kind.
pub fn sht3x_error<E: i2c::Error>(sensor: &str, error: sht3x::Error<E>) -> SensorError {
    match error {
        sht3x::Error::Bus(bus) => i2c_error(sensor, bus),
        sht3x::Error::Crc { expected, found } => {
            SensorError::Crc { sensor: sensor.to_string(), expected, found }
        }
        sht3x::Error::NoResponse => SensorError::NoResponse { sensor: sensor.to_string() },
    }
}

/// Converts an accelerometer driver error, keeping its kind.
pub fn adxl345_error<E: spi::Error>(sensor: &str, error: accelerometer::Error<E>) -> SensorError {
    match error {
        accelerometer::Error::Bus(bus) => spi_error(sensor, bus),
        accelerometer::Error::WrongDeviceId { expected, found } => {
            SensorError::WrongDeviceId { sensor: sensor.to_string(), expected, found }
        }
    }
}

/// SHT3x as a `Sensor`: values `temperature_c` and `humidity_pct`.
pub struct Sht3xSensor<I2C, DELAY> {
    name: String,
    driver: Sht3x<I2C>,
    delay: DELAY,
}

impl<I2C: I2c, DELAY: DelayNs> Sht3xSensor<I2C, DELAY> {
    /// Wraps a driver and the delay it waits for conversions with; does no I/O.
    pub fn new(name: impl Into<String>, driver: Sht3x<I2C>, delay: DELAY) -> Self {
        Self { name: name.into(), driver, delay }
    }

    /// Gives the driver and the delay back.
    pub fn destroy(self) -> (Sht3x<I2C>, DELAY) {
        (self.driver, self.delay)
    }
}

impl<I2C: I2c, DELAY: DelayNs> Sensor for Sht3xSensor<I2C, DELAY> {
    fn name(&self) -> &str {
        &self.name
    }

    fn read(&mut self) -> Result<Reading, SensorError> {
        let measurement =
            self.driver.measure(&mut self.delay).map_err(|error| sht3x_error(&self.name, error))?;
        let temperature = measurement.temperature_millicelsius;
        if !SHT3X_TEMPERATURE_MILLICELSIUS_SPECIFIED.contains(&temperature) {
            return Err(SensorError::OutOfRange {
                sensor: self.name.clone(),
                quantity: "temperature_c",
                value: f64::from(temperature) / 1000.0,
                min: f64::from(*SHT3X_TEMPERATURE_MILLICELSIUS_SPECIFIED.start()) / 1000.0,
                max: f64::from(*SHT3X_TEMPERATURE_MILLICELSIUS_SPECIFIED.end()) / 1000.0,
            });
        }
        // Humidity cannot leave 0..=100 %: the conversion maps every raw word into it.
        Ok(Reading::new(vec![
            Value { name: "temperature_c", value: f64::from(temperature) / 1000.0, unit: Unit::Celsius },
            Value {
                name: "humidity_pct",
                value: f64::from(measurement.humidity_millipercent) / 1000.0,
                unit: Unit::Percent,
            },
        ]))
    }
}

/// Lowest and highest milli-g an axis reads in `range` with full resolution (10 + range code bits
/// at 256 LSB/g); readings at either end are saturated.
pub fn adxl345_saturation_milli_g(range: Range) -> (i32, i32) {
    let bits = 10 + range as u32;
    let limit = 1i32 << (bits - 1);
    (accelerometer::milli_g_from_raw((-limit) as i16), accelerometer::milli_g_from_raw((limit - 1) as i16))
}

const ADXL345_AXES: [&str; 3] = ["x_mg", "y_mg", "z_mg"];

/// Initialised ADXL345 as a `Sensor`: values `x_mg`, `y_mg`, `z_mg`.
pub struct Adxl345Sensor<SPI> {
    name: String,
    driver: Adxl345<SPI>,
    range: Range,
}

impl<SPI: SpiDevice> Adxl345Sensor<SPI> {
    /// Wraps a driver that `Adxl345::init` already configured for `range`; does no I/O.
    pub fn new(name: impl Into<String>, driver: Adxl345<SPI>, range: Range) -> Self {
        Self { name: name.into(), driver, range }
    }

    /// Gives the driver back.
    pub fn destroy(self) -> Adxl345<SPI> {
        self.driver
    }
}

impl<SPI: SpiDevice> Sensor for Adxl345Sensor<SPI> {
    fn name(&self) -> &str {
        &self.name
    }

    fn read(&mut self) -> Result<Reading, SensorError> {
        let sample = self.driver.acceleration().map_err(|error| adxl345_error(&self.name, error))?;
        let (low, high) = adxl345_saturation_milli_g(self.range);
        let axes = [sample.x_milli_g, sample.y_milli_g, sample.z_milli_g];
        let mut values = Vec::with_capacity(axes.len());
        for (name, milli_g) in ADXL345_AXES.into_iter().zip(axes) {
            if milli_g <= low || milli_g >= high {
                return Err(SensorError::OutOfRange {
                    sensor: self.name.clone(),
                    quantity: name,
                    value: f64::from(milli_g),
                    min: f64::from(low + 1),
                    max: f64::from(high - 1),
                });
            }
            values.push(Value { name, value: f64::from(milli_g), unit: Unit::MilliG });
        }
        Ok(Reading::new(values))
    }
}

/// Errors of a trigger input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// Reading the pin failed.
    #[error("trigger {trigger}: reading the pin failed: {detail}")]
    Pin {
        /// Trigger name.
        trigger: String,
        /// The pin's error.
        detail: String,
    },
}

/// A debounced trigger input the appliance polls.
pub trait TriggerInput {
    /// The trigger's name from the board profile.
    fn name(&self) -> &str;
    /// Reads the pin once at `now_us` (the caller's monotonic clock, never going backwards);
    /// returns the rising edge this poll accepted, stamped with the first poll that saw it high.
    fn poll(&mut self, now_us: u64) -> Result<Option<RisingEdge>, TriggerError>;
}

type SharedClock = Box<dyn FnMut() -> u64 + Send>;

/// A `Trigger` driver over any input pin as a `TriggerInput`.
pub struct GpioTrigger<PIN> {
    name: String,
    trigger: Trigger<PIN, SharedClock>,
    now_us: Arc<AtomicU64>,
}

impl<PIN: InputPin> GpioTrigger<PIN> {
    /// Wraps the pin; does no I/O.
    pub fn new(name: impl Into<String>, pin: PIN, config: trigger::Config) -> Self {
        let now_us = Arc::new(AtomicU64::new(0));
        let clock_now_us = Arc::clone(&now_us);
        let clock: SharedClock = Box::new(move || clock_now_us.load(Ordering::Relaxed));
        Self { name: name.into(), trigger: Trigger::new(pin, clock, config), now_us }
    }

    /// Gives the pin back.
    pub fn destroy(self) -> PIN {
        self.trigger.destroy().0
    }
}

impl<PIN: InputPin> TriggerInput for GpioTrigger<PIN> {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll(&mut self, now_us: u64) -> Result<Option<RisingEdge>, TriggerError> {
        // The driver reads its clock once per poll; hand it the caller's time through the cell.
        self.now_us.store(now_us, Ordering::Relaxed);
        self.trigger
            .poll()
            .map_err(|error| TriggerError::Pin { trigger: self.name.clone(), detail: format!("{error:?}") })
    }
}

impl<T: TriggerInput + ?Sized> TriggerInput for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn poll(&mut self, now_us: u64) -> Result<Option<RisingEdge>, TriggerError> {
        (**self).poll(now_us)
    }
}
