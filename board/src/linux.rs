//! Linux backend (cargo feature `linux`): real buses through linux-embedded-hal for the same
//! drivers the simulator runs.
//!
//! - I2C: `/dev/i2c-N` (`I2cdev`); the kernel maps a NACK to ENXIO (address) or ENODEV (data),
//!   which linux-embedded-hal reports as `NoAcknowledge`, so it becomes `SensorError::Nack`.
//! - SPI: `/dev/spidevB.C` (`SpidevDevice`, kernel-driven chip select), configured for the
//!   ADXL345: mode 3, 8 bits per word, the profile's `spi_speed_hz` (default 1 MHz).
//! - GPIO: `/dev/gpiochipN` line requested as an input with consumer label `tributary`.
//! - Delays sleep the thread (`linux_embedded_hal::Delay`).
//!
//! Compile-tested only: the build machine has no I2C, SPI or GPIO devices.

use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
use linux_embedded_hal::spidev::{SpiModeFlags, SpidevOptions};
use linux_embedded_hal::{CdevPin, Delay, I2cdev, SpidevDevice};

use crate::accelerometer::Adxl345;
use crate::board::{BoardError, adxl345_config};
use crate::device::{self, Adxl345Sensor, GpioTrigger, Sensor, Sht3xSensor, TriggerInput};
use crate::profile::{ADXL345_SPI_SPEED_HZ_DEFAULT, Bus, SensorKind, SensorProfile, TriggerProfile};
use crate::sht3x::Sht3x;
use crate::trigger;

/// Consumer label shown for requested GPIO lines (`gpioinfo`).
const GPIO_CONSUMER: &str = "tributary";

fn open_error(device: &str, path: &str, reason: impl std::fmt::Display) -> BoardError {
    BoardError::Open { device: device.to_string(), path: path.to_string(), reason: reason.to_string() }
}

/// Opens a validated sensor profile on its bus.
pub fn open_sensor(sensor: &SensorProfile, bus: Bus) -> Result<Box<dyn Sensor + Send>, BoardError> {
    let path = bus.device_path();
    match sensor.kind {
        SensorKind::Sht3x => {
            let address = sensor.address.expect("address validated for sht3x");
            let i2c = I2cdev::new(&path).map_err(|error| open_error(&sensor.name, &path, error))?;
            Ok(Box::new(Sht3xSensor::new(sensor.name.clone(), Sht3x::new(i2c, address), Delay)))
        }
        SensorKind::Adxl345 => {
            let mut spi =
                SpidevDevice::open(&path).map_err(|error| open_error(&sensor.name, &path, error))?;
            let options = SpidevOptions::new()
                .bits_per_word(8)
                .max_speed_hz(sensor.spi_speed_hz.unwrap_or(ADXL345_SPI_SPEED_HZ_DEFAULT))
                .mode(SpiModeFlags::SPI_MODE_3)
                .build();
            spi.configure(&options).map_err(|error| open_error(&sensor.name, &path, error))?;
            let config = adxl345_config(sensor);
            let mut driver = Adxl345::new(spi);
            driver.init(config).map_err(|error| device::adxl345_error(&sensor.name, error))?;
            Ok(Box::new(Adxl345Sensor::new(sensor.name.clone(), driver, config.range)))
        }
    }
}

/// Requests a validated trigger's GPIO line as an input.
pub fn open_trigger(profile: &TriggerProfile) -> Result<Box<dyn TriggerInput + Send>, BoardError> {
    let path = format!("/dev/{}", profile.chip);
    let error = |reason: &dyn std::fmt::Display| open_error(&profile.name, &path, reason);
    let mut chip = Chip::new(&path).map_err(|reason| error(&reason))?;
    let line = chip.get_line(profile.line).map_err(|reason| error(&reason))?;
    let handle = line.request(LineRequestFlags::INPUT, 0, GPIO_CONSUMER).map_err(|reason| error(&reason))?;
    let pin = CdevPin::new(handle).map_err(|reason| error(&reason))?;
    Ok(Box::new(GpioTrigger::new(
        profile.name.clone(),
        pin,
        trigger::Config { debounce_us: profile.debounce_us },
    )))
}
