//! 3-axis accelerometer over SPI with the ADXL345 register map.
//!
//! Bus layout (ADXL345 datasheet, "SPI" and "Register map"):
//! - 4-wire SPI, mode 3 (CPOL 1, CPHA 1), at most 5 MHz; the caller configures the `SpiDevice`.
//! - The first byte of every transaction is the command: bit 7 set = read, bit 6 set = multi-byte
//!   (the register address increments after each data byte), bits 5..0 = register address
//!   0x00..=0x3F. The data bytes follow in the same transaction (chip select held low).
//! - Registers used: DEVID 0x00 (read-only, always 0xE5), BW_RATE 0x2C (bits 3..0 rate code,
//!   0x0A = 100 Hz), POWER_CTL 0x2D (bit 3 Measure), DATA_FORMAT 0x31 (bit 3 FULL_RES, bits 1..0
//!   range 00 = ±2 g, 01 = ±4 g, 10 = ±8 g, 11 = ±16 g), DATAX0..DATAZ1 0x32..=0x37.
//! - Data: 6 bytes read in one multi-byte burst (command 0xF2), X, Y, Z, each a 16-bit two's
//!   complement value, least significant byte first, right-justified.
//! - Full resolution keeps the scale at 256 LSB/g (3.906 25 mg/LSB) in every range, with 10 bits
//!   at ±2 g up to 13 bits at ±16 g. The driver always sets FULL_RES, so milli-g = raw * 1000 / 256
//!   (rounded towards zero): at most ±16 000 mg nominal, ±32 768 raw saturating at ±128 000 mg.
//!
//! `Adxl345::init` checks DEVID before touching any other register so a wrong chip on the bus
//! (or a floating MISO reading 0x00 / 0xFF) is reported as `Error::WrongDeviceId`, not as data.

use embedded_hal::spi::{Operation, SpiDevice};

/// DEVID register: fixed device identifier.
pub const REGISTER_DEVID: u8 = 0x00;
/// BW_RATE register: output data rate and low-power bit.
pub const REGISTER_BW_RATE: u8 = 0x2C;
/// POWER_CTL register: measure and sleep bits.
pub const REGISTER_POWER_CTL: u8 = 0x2D;
/// DATA_FORMAT register: full resolution, justification and range.
pub const REGISTER_DATA_FORMAT: u8 = 0x31;
/// DATAX0 register: first of the 6 data registers X0, X1, Y0, Y1, Z0, Z1.
pub const REGISTER_DATAX0: u8 = 0x32;

/// Value of DEVID on every ADXL345.
pub const DEVICE_ID: u8 = 0xE5;
/// Command bit 7: read.
pub const COMMAND_READ: u8 = 0x80;
/// Command bit 6: multi-byte transfer.
pub const COMMAND_MULTI_BYTE: u8 = 0x40;
/// Command bits 5..0: register address.
pub const COMMAND_ADDRESS_MASK: u8 = 0x3F;
/// POWER_CTL bit 3: measurement mode (clear = standby).
pub const POWER_CTL_MEASURE: u8 = 0x08;
/// DATA_FORMAT bit 3: full resolution (256 LSB/g in every range).
pub const DATA_FORMAT_FULL_RES: u8 = 0x08;
/// BW_RATE rate code for 100 Hz output data rate (the power-on default).
pub const BW_RATE_100_HZ: u8 = 0x0A;
/// Bytes in one X, Y, Z sample.
pub const SAMPLE_BYTES: usize = 6;
/// Full-resolution scale: least significant bits per g.
pub const LSB_PER_G: i32 = 256;

/// Measurement range, DATA_FORMAT bits 1..0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// ±2 g (10 bits in full resolution).
    G2 = 0b00,
    /// ±4 g (11 bits).
    G4 = 0b01,
    /// ±8 g (12 bits).
    G8 = 0b10,
    /// ±16 g (13 bits).
    G16 = 0b11,
}

/// Settings written by `Adxl345::init`; every field is named because the power-on defaults
/// (±2 g, 10-bit fixed resolution) would silently change the scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Measurement range.
    pub range: Range,
    /// BW_RATE rate code, 0x06 (6.25 Hz) ..= 0x0F (3200 Hz); `BW_RATE_100_HZ` is 100 Hz.
    pub rate_code: u8,
}

impl Default for Config {
    fn default() -> Self {
        Self { range: Range::G16, rate_code: BW_RATE_100_HZ }
    }
}

/// Errors of the accelerometer driver; `E` is the SPI bus error, kept whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error<E> {
    /// The SPI transaction failed.
    #[error("adxl345: spi bus error: {0:?} (check wiring and chip select)")]
    Bus(E),
    /// DEVID did not read 0xE5.
    #[error(
        "adxl345: device id 0x{found:02X}, expected 0x{expected:02X} (wrong chip, or MISO floating; check SPI mode 3)"
    )]
    WrongDeviceId {
        /// 0xE5.
        expected: u8,
        /// What DEVID read.
        found: u8,
    },
}

/// One sample in thousandths of standard gravity per axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acceleration {
    /// X axis, milli-g.
    pub x_milli_g: i32,
    /// Y axis, milli-g.
    pub y_milli_g: i32,
    /// Z axis, milli-g.
    pub z_milli_g: i32,
}

/// Converts a full-resolution raw value to milli-g (rounded towards zero).
pub fn milli_g_from_raw(raw: i16) -> i32 {
    i32::from(raw) * 1000 / LSB_PER_G
}

/// ADXL345-style accelerometer driver over any embedded-hal 1.0 SPI device.
pub struct Adxl345<SPI> {
    spi: SPI,
}

impl<SPI: SpiDevice> Adxl345<SPI> {
    /// Wraps the bus; does no I/O. Call `init` before reading samples.
    pub fn new(spi: SPI) -> Self {
        Self { spi }
    }

    /// Checks DEVID, then writes DATA_FORMAT, BW_RATE and finally POWER_CTL (measure), so the
    /// first sample is already taken with the configured format. The bus stays in the driver on
    /// error, so `destroy` still returns it.
    pub fn init(&mut self, config: Config) -> Result<(), Error<SPI::Error>> {
        assert!(
            (0x06..=0x0F).contains(&config.rate_code),
            "rate code {} out of 0x06..=0x0F",
            config.rate_code
        );
        let found = self.read_register(REGISTER_DEVID)?;
        if found != DEVICE_ID {
            return Err(Error::WrongDeviceId { expected: DEVICE_ID, found });
        }
        self.write_register(REGISTER_DATA_FORMAT, DATA_FORMAT_FULL_RES | config.range as u8)?;
        self.write_register(REGISTER_BW_RATE, config.rate_code)?;
        self.write_register(REGISTER_POWER_CTL, POWER_CTL_MEASURE)?;
        Ok(())
    }

    /// Gives the bus back.
    pub fn destroy(self) -> SPI {
        self.spi
    }

    /// Reads one register (single-byte read: command 0x80 | address).
    pub fn read_register(&mut self, register: u8) -> Result<u8, Error<SPI::Error>> {
        assert_eq!(register & !COMMAND_ADDRESS_MASK, 0, "register 0x{register:02X} above 0x3F");
        let mut value = [0u8; 1];
        self.spi
            .transaction(&mut [Operation::Write(&[COMMAND_READ | register]), Operation::Read(&mut value)])
            .map_err(Error::Bus)?;
        Ok(value[0])
    }

    /// Writes one register (single-byte write: address, value).
    pub fn write_register(&mut self, register: u8, value: u8) -> Result<(), Error<SPI::Error>> {
        assert_eq!(register & !COMMAND_ADDRESS_MASK, 0, "register 0x{register:02X} above 0x3F");
        self.spi.write(&[register, value]).map_err(Error::Bus)
    }

    /// Reads X, Y and Z in one multi-byte burst so the three axes belong to the same sample.
    pub fn acceleration(&mut self) -> Result<Acceleration, Error<SPI::Error>> {
        let mut data = [0u8; SAMPLE_BYTES];
        self.spi
            .transaction(&mut [
                Operation::Write(&[COMMAND_READ | COMMAND_MULTI_BYTE | REGISTER_DATAX0]),
                Operation::Read(&mut data),
            ])
            .map_err(Error::Bus)?;
        let axis = |index: usize| milli_g_from_raw(i16::from_le_bytes([data[index], data[index + 1]]));
        Ok(Acceleration { x_milli_g: axis(0), y_milli_g: axis(2), z_milli_g: axis(4) })
    }
}
