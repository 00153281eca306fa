//! SHT3x temperature and relative humidity sensor over I2C.
//!
//! Bus layout (SHT3x-DIS datasheet, section 4):
//! - 7-bit address 0x44 (ADDR pin low) or 0x45 (ADDR pin high).
//! - Every command is 16 bits, sent most significant byte first: one I2C write of 2 bytes.
//! - Every data word the sensor returns is 2 bytes (most significant first) followed by one CRC-8
//!   byte over those 2 bytes: polynomial 0x31 (x^8 + x^5 + x^4 + 1), initial value 0xFF, no
//!   reflection, no final XOR. Datasheet example: 0xBEEF -> 0x92.
//! - Single-shot, high repeatability, clock stretching disabled: command 0x2400, then wait
//!   `MEASUREMENT_WAIT_US` (15 000 µs, the datasheet maximum), then read 6 bytes:
//!   temperature MSB, LSB, CRC, humidity MSB, LSB, CRC. Reading before the measurement has
//!   finished is answered with a NACK, which surfaces as `Error::Bus`.
//! - Soft reset: command 0x30A2, then wait `SOFT_RESET_WAIT_US` (1 500 µs).
//! - Read status: command 0xF32D, then read 3 bytes: status MSB, LSB, CRC.
//!
//! Conversion, in fixed point so the driver needs no floating point (raw in 0..=65535):
//! - temperature_millicelsius = -45 000 + round(175 000 * raw / 65 535), range -45 000..=130 000.
//! - humidity_millipercent = round(100 000 * raw / 65 535), range 0..=100 000.
//!
//! Decision on "sensor not ready": raw words are not rejected by value, because every raw word
//! maps into the datasheet's range (0xFFFF is 130.000 °C and 100.000 %RH, both legal limits). A
//! read in which all 6 bytes are 0xFF means nothing drove SDA (sensor absent, unpowered, or a bus
//! adapter that does not report NACK); 0xFFFF's CRC is 0xAC, not 0xFF, so such a read would fail
//! the CRC anyway, but it is reported as the more telling `Error::NoResponse` instead.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// 7-bit I2C address with the ADDR pin tied low.
pub const ADDRESS_DEFAULT: u8 = 0x44;
/// 7-bit I2C address with the ADDR pin tied high.
pub const ADDRESS_ALTERNATE: u8 = 0x45;

/// Single shot, high repeatability, clock stretching disabled.
pub const COMMAND_MEASURE_HIGH_REPEATABILITY: u16 = 0x2400;
/// Soft reset: reloads calibration data and clears the status register's alert bits.
pub const COMMAND_SOFT_RESET: u16 = 0x30A2;
/// Read the 16-bit status register.
pub const COMMAND_READ_STATUS: u16 = 0xF32D;

/// Datasheet maximum measurement duration for high repeatability (table 4: 15 ms).
pub const MEASUREMENT_WAIT_US: u32 = 15_000;
/// Datasheet maximum time from the soft reset command to idle state (table 4: 1.5 ms).
pub const SOFT_RESET_WAIT_US: u32 = 1_500;

/// Bytes in one measurement response: two words of 2 data bytes and 1 CRC byte each.
pub const MEASUREMENT_BYTES: usize = 6;
/// Bytes in one status response: 2 data bytes and 1 CRC byte.
pub const STATUS_BYTES: usize = 3;

const CRC_POLYNOMIAL: u8 = 0x31;
const CRC_INITIAL: u8 = 0xFF;

const TEMPERATURE_SPAN_MILLICELSIUS: i64 = 175_000;
const TEMPERATURE_OFFSET_MILLICELSIUS: i32 = -45_000;
const HUMIDITY_SPAN_MILLIPERCENT: u64 = 100_000;
const RAW_FULL_SCALE: u64 = 65_535;

/// Errors of the SHT3x driver; `E` is the I2C bus error, kept whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error<E> {
    /// The I2C transfer failed (a NACK lands here: sensor absent or measurement not finished).
    #[error("sht3x: i2c bus error: {0:?} (check wiring, address and that the wait was long enough)")]
    Bus(E),
    /// A data word's CRC-8 did not match: the word was corrupted on the bus.
    #[error("sht3x: crc mismatch: computed 0x{expected:02X}, sensor sent 0x{found:02X} (bus noise; retry)")]
    Crc {
        /// CRC-8 computed over the 2 data bytes received.
        expected: u8,
        /// CRC-8 byte the sensor sent.
        found: u8,
    },
    /// Every byte read was 0xFF: nothing drove the data line.
    #[error("sht3x: every byte read was 0xFF (sensor absent or unpowered; check wiring)")]
    NoResponse,
}

/// One measurement in fixed point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Temperature in thousandths of a degree Celsius, -45 000..=130 000.
    pub temperature_millicelsius: i32,
    /// Relative humidity in thousandths of a percent, 0..=100 000.
    pub humidity_millipercent: u32,
}

/// The 16-bit status register (datasheet table 17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Raw register value.
    pub bits: u16,
}

impl Status {
    /// Bit 15: at least one alert is pending.
    pub fn alert_pending(self) -> bool {
        self.bits & (1 << 15) != 0
    }
    /// Bit 13: the internal heater is on.
    pub fn heater_on(self) -> bool {
        self.bits & (1 << 13) != 0
    }
    /// Bit 4: a reset (power-on, soft reset or reset pin) happened since the last clear.
    pub fn reset_detected(self) -> bool {
        self.bits & (1 << 4) != 0
    }
    /// Bit 1: the last command was not processed (invalid or failed its checksum).
    pub fn last_command_failed(self) -> bool {
        self.bits & (1 << 1) != 0
    }
    /// Bit 0: the checksum of the last write transfer failed.
    pub fn write_checksum_failed(self) -> bool {
        self.bits & 1 != 0
    }
}

/// CRC-8 as the SHT3x computes it: polynomial 0x31, initial value 0xFF, no reflection, no final XOR.
pub fn crc8(bytes: &[u8]) -> u8 {
    let mut crc = CRC_INITIAL;
    for &byte in bytes {
        crc ^= byte;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 { (crc << 1) ^ CRC_POLYNOMIAL } else { crc << 1 };
        }
    }
    crc
}

/// Converts a raw temperature word to thousandths of a degree Celsius, rounding to nearest.
pub fn temperature_millicelsius_from_raw(raw: u16) -> i32 {
    let scaled = (TEMPERATURE_SPAN_MILLICELSIUS * i64::from(raw) + (RAW_FULL_SCALE as i64) / 2)
        / RAW_FULL_SCALE as i64;
    let result = TEMPERATURE_OFFSET_MILLICELSIUS + scaled as i32;
    assert!((-45_000..=130_000).contains(&result));
    result
}

/// Converts a raw humidity word to thousandths of a percent, rounding to nearest.
pub fn humidity_millipercent_from_raw(raw: u16) -> u32 {
    let result = (HUMIDITY_SPAN_MILLIPERCENT * u64::from(raw) + RAW_FULL_SCALE / 2) / RAW_FULL_SCALE;
    assert!(result <= HUMIDITY_SPAN_MILLIPERCENT);
    result as u32
}

/// Checks one 3-byte word (2 data bytes and their CRC) and returns the data.
fn checked_word<E>(word: &[u8]) -> Result<u16, Error<E>> {
    assert_eq!(word.len(), 3, "a data word is 2 bytes and 1 crc byte");
    let expected = crc8(&word[..2]);
    let found = word[2];
    if expected != found {
        return Err(Error::Crc { expected, found });
    }
    Ok(u16::from_be_bytes([word[0], word[1]]))
}

/// SHT3x driver over any embedded-hal 1.0 I2C bus.
pub struct Sht3x<I2C> {
    i2c: I2C,
    address: u8,
}

impl<I2C: I2c> Sht3x<I2C> {
    /// Wraps the bus; does no I/O. `address` is `ADDRESS_DEFAULT` or `ADDRESS_ALTERNATE`.
    pub fn new(i2c: I2C, address: u8) -> Self {
        assert!(
            address == ADDRESS_DEFAULT || address == ADDRESS_ALTERNATE,
            "sht3x address must be 0x44 or 0x45, got 0x{address:02X}"
        );
        Self { i2c, address }
    }

    /// Gives the bus back.
    pub fn destroy(self) -> I2C {
        self.i2c
    }

    fn command(&mut self, command: u16) -> Result<(), Error<I2C::Error>> {
        self.i2c.write(self.address, &command.to_be_bytes()).map_err(Error::Bus)
    }

    /// Single-shot high-repeatability measurement; blocks `MEASUREMENT_WAIT_US` on `delay`.
    pub fn measure(&mut self, delay: &mut impl DelayNs) -> Result<Measurement, Error<I2C::Error>> {
        self.command(COMMAND_MEASURE_HIGH_REPEATABILITY)?;
        delay.delay_us(MEASUREMENT_WAIT_US);
        let mut response = [0u8; MEASUREMENT_BYTES];
        self.i2c.read(self.address, &mut response).map_err(Error::Bus)?;
        if response.iter().all(|&byte| byte == 0xFF) {
            return Err(Error::NoResponse);
        }
        let temperature_raw = checked_word(&response[0..3])?;
        let humidity_raw = checked_word(&response[3..6])?;
        Ok(Measurement {
            temperature_millicelsius: temperature_millicelsius_from_raw(temperature_raw),
            humidity_millipercent: humidity_millipercent_from_raw(humidity_raw),
        })
    }

    /// Soft reset; blocks `SOFT_RESET_WAIT_US` on `delay` so the next command is accepted.
    pub fn soft_reset(&mut self, delay: &mut impl DelayNs) -> Result<(), Error<I2C::Error>> {
        self.command(COMMAND_SOFT_RESET)?;
        delay.delay_us(SOFT_RESET_WAIT_US);
        Ok(())
    }

    /// Reads the status register.
    pub fn read_status(&mut self) -> Result<Status, Error<I2C::Error>> {
        self.command(COMMAND_READ_STATUS)?;
        let mut response = [0u8; STATUS_BYTES];
        self.i2c.read(self.address, &mut response).map_err(Error::Bus)?;
        if response.iter().all(|&byte| byte == 0xFF) {
            return Err(Error::NoResponse);
        }
        Ok(Status { bits: checked_word(&response)? })
    }
}
