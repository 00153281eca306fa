//! Simulated devices that speak the real bus bytes, so the drivers run unchanged against them.
//!
//! - `SimSht3x` implements `embedded_hal::i2c::I2c` and answers the SHT3x command set at address
//!   0x44 or 0x45: 0x2400 (measure; 6-byte answer with CRC-8 per word), 0x30A2 (soft reset),
//!   0xF32D (status; 3-byte answer), 0x3041 (clear status). Reading with no answer pending, a
//!   wrong address, or an unknown command is answered with a NACK, as the datasheet says. The
//!   answer is ready at once: the simulator keeps no time, so it cannot catch a missing wait.
//!   Values are configured in fixed point, with optional uniform noise from a seeded xorshift64*
//!   generator (same seed, same readings). Faults: NACK the next N transactions, corrupt the
//!   temperature CRC of the next N measurements, answer the next N measurements with an
//!   out-of-range temperature (raw 0xFFFF = 130 °C, valid CRC), or any of these at random with a
//!   given rate per million measurements from a second seeded generator.
//! - `SimAdxl345` implements `embedded_hal::spi::SpiDevice` over a 64-register file with the
//!   ADXL345 map: first byte of a transaction is the command (bit 7 read, bit 6 multi-byte, bits
//!   5..0 address), later bytes read or write registers, auto-incrementing when multi-byte.
//!   DEVID is configurable to simulate a wrong chip. DATAX0..DATAZ1 (0x32..=0x37) are computed
//!   from the configured milli-g per axis when POWER_CTL's Measure bit is set (0 in standby),
//!   honouring FULL_RES and range (10..=13 bits, saturating), plus optional seeded noise. The
//!   sample is latched once per transaction, as the part latches its data registers during a
//!   burst read, so the six bytes of one burst always belong together. Faults: fail the next N
//!   transactions, latch a saturated (out-of-range) sample for the next N transactions, or either
//!   at random with a given rate per million transactions.
//! - `SimPin` implements `embedded_hal::digital::InputPin` from a scripted list of levels, one per
//!   read, holding the last level after the script ends, or repeating the script forever.
//! - `SimDelay` implements `embedded_hal::delay::DelayNs` without sleeping, adding up the time.

use std::convert::Infallible;

use embedded_hal::delay::DelayNs;
use embedded_hal::digital::{self, InputPin};
use embedded_hal::i2c::{self, I2c, NoAcknowledgeSource};
use embedded_hal::spi::{self, SpiDevice};

use crate::sht3x;

/// Small deterministic generator (xorshift64*), enough for test noise; not for anything secret.
#[derive(Debug, Clone)]
pub struct TinyRng {
    state: u64,
}

impl TinyRng {
    /// Seeds the generator; seed 0 is replaced because xorshift would stay at 0 forever.
    pub fn new(seed: u64) -> Self {
        Self { state: if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed } }
    }

    /// Next pseudo-random 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// True with probability `rate_per_million` / 1 000 000.
    pub fn chance_per_million(&mut self, rate_per_million: u32) -> bool {
        rate_per_million > 0 && self.next_u64() % 1_000_000 < u64::from(rate_per_million)
    }

    /// Uniform index in 0..count; `count` must not be 0.
    pub fn below(&mut self, count: usize) -> usize {
        assert!(count > 0, "below(0)");
        (self.next_u64() % count as u64) as usize
    }

    /// Uniform value in -amplitude..=amplitude (slightly biased by the modulo; fine for noise).
    pub fn symmetric(&mut self, amplitude: u32) -> i64 {
        if amplitude == 0 {
            return 0;
        }
        let span = 2 * u64::from(amplitude) + 1;
        (self.next_u64() % span) as i64 - i64::from(amplitude)
    }
}

/// Settings of a simulated SHT3x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimSht3xConfig {
    /// 7-bit address the simulator answers to (0x44 or 0x45).
    pub address: u8,
    /// Temperature it reports, thousandths of a degree Celsius (clamped to -45 000..=130 000).
    pub temperature_millicelsius: i32,
    /// Relative humidity it reports, thousandths of a percent (clamped to 0..=100 000).
    pub humidity_millipercent: u32,
    /// Uniform noise added to each temperature reading, ± this many millidegrees.
    pub temperature_noise_millicelsius: u32,
    /// Uniform noise added to each humidity reading, ± this many millipercent.
    pub humidity_noise_millipercent: u32,
    /// Seed of the noise generator.
    pub seed: u64,
}

/// Status register after power-on: alert pending (bit 15) and reset detected (bit 4).
const SHT3X_STATUS_POWER_ON: u16 = 0x8010;
const SHT3X_STATUS_RESET_DETECTED: u16 = 1 << 4;
const SHT3X_STATUS_COMMAND_FAILED: u16 = 1 << 1;
const SHT3X_COMMAND_CLEAR_STATUS: u16 = 0x3041;

/// Largest random fault rate: every operation.
pub const FAULT_RATE_PER_MILLION_MAX: u32 = 1_000_000;
/// Seed offset of the fault generator, so faults do not shift the noise sequence.
const FAULT_SEED_SALT: u64 = 0xD1B5_4A32_D192_ED03;

/// A fault the simulated SHT3x can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sht3xFault {
    /// The read after the measurement command is NACKed (as when the measurement is not ready).
    Nack,
    /// The temperature word's CRC byte is inverted.
    Crc,
    /// The temperature word is 0xFFFF (130 °C, valid CRC): above the specified -40..=125 °C.
    OutOfRange,
}

/// A fault the simulated ADXL345 can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adxl345Fault {
    /// The transaction fails with `spi::ErrorKind::Other`.
    Bus,
    /// The sample latched for the transaction is saturated on the X axis (+32 g asked for).
    OutOfRange,
}

/// Random faults: each operation draws a fault with probability `rate_per_million` / 10^6,
/// choosing uniformly among `kinds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomFaults<K> {
    /// Faults per million operations, 0..=`FAULT_RATE_PER_MILLION_MAX`.
    pub rate_per_million: u32,
    /// Fault kinds to choose among; empty means none.
    pub kinds: Vec<K>,
    /// Seed of the fault generator (salted, so it may equal the noise seed).
    pub seed: u64,
}

#[derive(Debug, Clone)]
struct FaultDraw<K> {
    faults: RandomFaults<K>,
    rng: TinyRng,
}

impl<K: Copy> FaultDraw<K> {
    fn new(faults: RandomFaults<K>) -> Self {
        assert!(
            faults.rate_per_million <= FAULT_RATE_PER_MILLION_MAX,
            "fault rate {} per million above {FAULT_RATE_PER_MILLION_MAX}",
            faults.rate_per_million
        );
        let rng = TinyRng::new(faults.seed ^ FAULT_SEED_SALT);
        Self { faults, rng }
    }

    fn draw(&mut self) -> Option<K> {
        if self.faults.kinds.is_empty() || !self.rng.chance_per_million(self.faults.rate_per_million) {
            return None;
        }
        Some(self.faults.kinds[self.rng.below(self.faults.kinds.len())])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sht3xAnswer {
    None,
    Measurement([u8; sht3x::MEASUREMENT_BYTES]),
    Status([u8; sht3x::STATUS_BYTES]),
}

/// Simulated SHT3x on an I2C bus.
#[derive(Debug, Clone)]
pub struct SimSht3x {
    config: SimSht3xConfig,
    rng: TinyRng,
    answer: Sht3xAnswer,
    status_bits: u16,
    nack_transactions: u32,
    corrupt_crc_measurements: u32,
    out_of_range_measurements: u32,
    random_faults: Option<FaultDraw<Sht3xFault>>,
    measurements: u64,
}

/// Inverse of the datasheet conversion, rounded to nearest and clamped to a 16-bit word.
fn raw_from_scaled(value: i64, offset: i64, span: i64) -> u16 {
    let raw = ((value - offset) * 65_535 + span / 2).div_euclid(span);
    raw.clamp(0, 65_535) as u16
}

/// Two data bytes followed by their CRC-8.
fn word_with_crc(word: u16) -> [u8; 3] {
    let [high, low] = word.to_be_bytes();
    [high, low, sht3x::crc8(&[high, low])]
}

impl SimSht3x {
    /// A powered-on sensor with nothing to answer yet.
    pub fn new(config: SimSht3xConfig) -> Self {
        assert!(
            config.address == sht3x::ADDRESS_DEFAULT || config.address == sht3x::ADDRESS_ALTERNATE,
            "simulated sht3x address must be 0x44 or 0x45"
        );
        Self {
            config,
            rng: TinyRng::new(config.seed),
            answer: Sht3xAnswer::None,
            status_bits: SHT3X_STATUS_POWER_ON,
            nack_transactions: 0,
            corrupt_crc_measurements: 0,
            out_of_range_measurements: 0,
            random_faults: None,
            measurements: 0,
        }
    }

    /// Answers the next `count` measurements with raw temperature 0xFFFF (130 °C, valid CRC).
    pub fn inject_out_of_range(&mut self, count: u32) {
        self.out_of_range_measurements += count;
    }

    /// Draws a fault for every measurement command from now on (replacing earlier settings).
    pub fn set_random_faults(&mut self, faults: RandomFaults<Sht3xFault>) {
        self.random_faults = Some(FaultDraw::new(faults));
    }

    /// Changes the temperature reported from the next measurement on.
    pub fn set_temperature_millicelsius(&mut self, temperature_millicelsius: i32) {
        self.config.temperature_millicelsius = temperature_millicelsius;
    }

    /// Changes the humidity reported from the next measurement on.
    pub fn set_humidity_millipercent(&mut self, humidity_millipercent: u32) {
        self.config.humidity_millipercent = humidity_millipercent;
    }

    /// NACKs the address of the next `count` transactions (as an absent or busy sensor would).
    pub fn inject_nack(&mut self, count: u32) {
        self.nack_transactions += count;
    }

    /// Flips the temperature CRC byte of the next `count` measurements.
    pub fn inject_corrupt_crc(&mut self, count: u32) {
        self.corrupt_crc_measurements += count;
    }

    /// Measurements started since power-on.
    pub fn measurements(&self) -> u64 {
        self.measurements
    }

    fn measure(&mut self) -> [u8; sht3x::MEASUREMENT_BYTES] {
        self.measurements += 1;
        match self.random_faults.as_mut().and_then(FaultDraw::draw) {
            None => {}
            // The read that follows is NACKed, as when the controller reads too early.
            Some(Sht3xFault::Nack) => self.nack_transactions += 1,
            Some(Sht3xFault::Crc) => self.corrupt_crc_measurements += 1,
            Some(Sht3xFault::OutOfRange) => self.out_of_range_measurements += 1,
        }
        let temperature = i64::from(self.config.temperature_millicelsius)
            + self.rng.symmetric(self.config.temperature_noise_millicelsius);
        let humidity = i64::from(self.config.humidity_millipercent)
            + self.rng.symmetric(self.config.humidity_noise_millipercent);
        let mut temperature_word = word_with_crc(raw_from_scaled(temperature, -45_000, 175_000));
        if self.out_of_range_measurements > 0 {
            self.out_of_range_measurements -= 1;
            temperature_word = word_with_crc(0xFFFF);
        }
        let humidity_word = word_with_crc(raw_from_scaled(humidity, 0, 100_000));
        if self.corrupt_crc_measurements > 0 {
            self.corrupt_crc_measurements -= 1;
            temperature_word[2] ^= 0xFF;
        }
        let mut answer = [0u8; sht3x::MEASUREMENT_BYTES];
        answer[..3].copy_from_slice(&temperature_word);
        answer[3..].copy_from_slice(&humidity_word);
        answer
    }

    fn command(&mut self, bytes: &[u8]) -> Result<(), i2c::ErrorKind> {
        let nack = i2c::ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data);
        let Ok(pair) = <[u8; 2]>::try_from(bytes) else {
            self.status_bits |= SHT3X_STATUS_COMMAND_FAILED;
            return Err(nack);
        };
        self.status_bits &= !SHT3X_STATUS_COMMAND_FAILED;
        match u16::from_be_bytes(pair) {
            sht3x::COMMAND_MEASURE_HIGH_REPEATABILITY => {
                self.answer = Sht3xAnswer::Measurement(self.measure());
            }
            sht3x::COMMAND_SOFT_RESET => {
                self.answer = Sht3xAnswer::None;
                self.status_bits = SHT3X_STATUS_POWER_ON;
            }
            sht3x::COMMAND_READ_STATUS => {
                self.answer = Sht3xAnswer::Status(word_with_crc(self.status_bits));
            }
            SHT3X_COMMAND_CLEAR_STATUS => {
                self.status_bits &= !(SHT3X_STATUS_POWER_ON | SHT3X_STATUS_RESET_DETECTED);
            }
            _ => {
                self.status_bits |= SHT3X_STATUS_COMMAND_FAILED;
                return Err(nack);
            }
        }
        Ok(())
    }

    fn read(&mut self, buffer: &mut [u8]) -> Result<(), i2c::ErrorKind> {
        let answer: &[u8] = match &self.answer {
            Sht3xAnswer::None => return Err(i2c::ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)),
            Sht3xAnswer::Measurement(bytes) => bytes,
            Sht3xAnswer::Status(bytes) => bytes,
        };
        // Past the answer the sensor releases SDA, so the controller reads 0xFF.
        for (index, slot) in buffer.iter_mut().enumerate() {
            *slot = answer.get(index).copied().unwrap_or(0xFF);
        }
        self.answer = Sht3xAnswer::None;
        Ok(())
    }
}

impl i2c::ErrorType for SimSht3x {
    type Error = i2c::ErrorKind;
}

impl I2c for SimSht3x {
    fn transaction(&mut self, address: u8, operations: &mut [i2c::Operation<'_>]) -> Result<(), Self::Error> {
        if address != self.config.address {
            return Err(i2c::ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address));
        }
        if self.nack_transactions > 0 {
            self.nack_transactions -= 1;
            return Err(i2c::ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address));
        }
        for operation in operations {
            match operation {
                i2c::Operation::Write(bytes) => self.command(bytes)?,
                i2c::Operation::Read(buffer) => self.read(buffer)?,
            }
        }
        Ok(())
    }
}

/// Number of registers in the ADXL345 map (addresses 0x00..=0x3F).
pub const ADXL345_REGISTERS: usize = 64;
const ADXL345_REGISTER_INT_SOURCE: u8 = 0x30;
const ADXL345_REGISTER_FIFO_STATUS: u8 = 0x39;
const ADXL345_DATA_REGISTERS: core::ops::RangeInclusive<u8> = 0x32..=0x37;

/// Simulated ADXL345 on an SPI device (chip select handled by the transaction).
#[derive(Debug, Clone)]
pub struct SimAdxl345 {
    registers: [u8; ADXL345_REGISTERS],
    acceleration_milli_g: [i32; 3],
    noise_milli_g: u32,
    rng: TinyRng,
    latched_milli_g: [i32; 3],
    failing_transactions: u32,
    out_of_range_transactions: u32,
    random_faults: Option<FaultDraw<Adxl345Fault>>,
}

/// Acceleration asked of a saturating fault: twice the widest range, so every range clips.
const ADXL345_OUT_OF_RANGE_MILLI_G: i32 = 32_000;

struct SpiSession {
    command: Option<u8>,
    address: u8,
}

impl SimAdxl345 {
    /// A powered-on device (standby, BW_RATE 0x0A) whose DEVID reads `device_id` (0xE5 for a
    /// genuine part).
    pub fn new(device_id: u8) -> Self {
        let mut registers = [0u8; ADXL345_REGISTERS];
        registers[usize::from(crate::accelerometer::REGISTER_DEVID)] = device_id;
        registers[usize::from(crate::accelerometer::REGISTER_BW_RATE)] = crate::accelerometer::BW_RATE_100_HZ;
        Self {
            registers,
            acceleration_milli_g: [0; 3],
            noise_milli_g: 0,
            rng: TinyRng::new(1),
            latched_milli_g: [0; 3],
            failing_transactions: 0,
            out_of_range_transactions: 0,
            random_faults: None,
        }
    }

    /// Adds uniform noise of ±`amplitude_milli_g` per axis to every latched sample.
    pub fn set_noise(&mut self, amplitude_milli_g: u32, seed: u64) {
        self.noise_milli_g = amplitude_milli_g;
        self.rng = TinyRng::new(seed);
    }

    /// Latches a saturated sample (X at +32 g) for the next `count` transactions.
    pub fn inject_out_of_range(&mut self, count: u32) {
        self.out_of_range_transactions += count;
    }

    /// Draws a fault for every transaction from now on (replacing earlier settings).
    pub fn set_random_faults(&mut self, faults: RandomFaults<Adxl345Fault>) {
        self.random_faults = Some(FaultDraw::new(faults));
    }

    fn latch_sample(&mut self) {
        for (latched, base) in self.latched_milli_g.iter_mut().zip(self.acceleration_milli_g) {
            let noisy = i64::from(base) + self.rng.symmetric(self.noise_milli_g);
            *latched = noisy.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
        }
        if self.out_of_range_transactions > 0 {
            self.out_of_range_transactions -= 1;
            self.latched_milli_g[0] = ADXL345_OUT_OF_RANGE_MILLI_G;
        }
    }

    /// Sets the acceleration the device measures, milli-g per axis X, Y, Z.
    pub fn set_acceleration_milli_g(&mut self, x: i32, y: i32, z: i32) {
        self.acceleration_milli_g = [x, y, z];
    }

    /// Fails the next `count` transactions with `spi::ErrorKind::Other`, changing nothing.
    pub fn inject_bus_error(&mut self, count: u32) {
        self.failing_transactions += count;
    }

    /// Current value of a register as the device holds it (data registers not computed).
    pub fn register(&self, address: u8) -> u8 {
        self.registers[usize::from(address & crate::accelerometer::COMMAND_ADDRESS_MASK)]
    }

    fn data_register(&self, address: u8) -> u8 {
        let power_ctl = self.registers[usize::from(crate::accelerometer::REGISTER_POWER_CTL)];
        if power_ctl & crate::accelerometer::POWER_CTL_MEASURE == 0 {
            return 0;
        }
        let data_format = self.registers[usize::from(crate::accelerometer::REGISTER_DATA_FORMAT)];
        let range_code = u32::from(data_format & 0b11);
        let full_resolution = data_format & crate::accelerometer::DATA_FORMAT_FULL_RES != 0;
        // Full resolution: 256 LSB/g and 10 + range_code bits; otherwise 10 bits over the range.
        let (lsb_per_g, bits) =
            if full_resolution { (256i64, 10 + range_code) } else { (256i64 >> range_code, 10) };
        let limit = 1i64 << (bits - 1);
        let offset = address - crate::accelerometer::REGISTER_DATAX0;
        let milli_g = i64::from(self.latched_milli_g[usize::from(offset / 2)]);
        let raw = (milli_g * lsb_per_g / 1000).clamp(-limit, limit - 1) as i16;
        raw.to_le_bytes()[usize::from(offset % 2)]
    }

    fn exchange(&mut self, session: &mut SpiSession, byte_in: u8) -> u8 {
        let Some(command) = session.command else {
            session.command = Some(byte_in);
            session.address = byte_in & crate::accelerometer::COMMAND_ADDRESS_MASK;
            return 0;
        };
        let address = session.address;
        let byte_out = if command & crate::accelerometer::COMMAND_READ != 0 {
            if ADXL345_DATA_REGISTERS.contains(&address) {
                self.data_register(address)
            } else {
                self.registers[usize::from(address)]
            }
        } else {
            let read_only = address == crate::accelerometer::REGISTER_DEVID
                || address == ADXL345_REGISTER_INT_SOURCE
                || address == ADXL345_REGISTER_FIFO_STATUS
                || ADXL345_DATA_REGISTERS.contains(&address);
            if !read_only {
                self.registers[usize::from(address)] = byte_in;
            }
            0
        };
        if command & crate::accelerometer::COMMAND_MULTI_BYTE != 0 {
            session.address = (address + 1) & crate::accelerometer::COMMAND_ADDRESS_MASK;
        }
        byte_out
    }
}

impl spi::ErrorType for SimAdxl345 {
    type Error = spi::ErrorKind;
}

impl SpiDevice for SimAdxl345 {
    fn transaction(&mut self, operations: &mut [spi::Operation<'_, u8>]) -> Result<(), Self::Error> {
        match self.random_faults.as_mut().and_then(FaultDraw::draw) {
            None => {}
            Some(Adxl345Fault::Bus) => self.failing_transactions += 1,
            Some(Adxl345Fault::OutOfRange) => self.out_of_range_transactions += 1,
        }
        if self.failing_transactions > 0 {
            self.failing_transactions -= 1;
            return Err(spi::ErrorKind::Other);
        }
        self.latch_sample();
        let mut session = SpiSession { command: None, address: 0 };
        for operation in operations {
            match operation {
                spi::Operation::Write(bytes) => {
                    for &byte in bytes.iter() {
                        self.exchange(&mut session, byte);
                    }
                }
                spi::Operation::Read(buffer) => {
                    for slot in buffer.iter_mut() {
                        *slot = self.exchange(&mut session, 0);
                    }
                }
                spi::Operation::Transfer(read, write) => {
                    for index in 0..read.len().max(write.len()) {
                        let byte_out = self.exchange(&mut session, write.get(index).copied().unwrap_or(0));
                        if let Some(slot) = read.get_mut(index) {
                            *slot = byte_out;
                        }
                    }
                }
                spi::Operation::TransferInPlace(buffer) => {
                    for slot in buffer.iter_mut() {
                        *slot = self.exchange(&mut session, *slot);
                    }
                }
                spi::Operation::DelayNs(_) => {}
            }
        }
        Ok(())
    }
}

/// Simulated input pin replaying a script of levels (`true` = high), one per read.
#[derive(Debug, Clone)]
pub struct SimPin {
    levels: Vec<bool>,
    next: usize,
    repeat: bool,
}

impl SimPin {
    /// A pin that reads `levels` in order and then holds the last one (low if empty).
    pub fn new(levels: Vec<bool>) -> Self {
        Self { levels, next: 0, repeat: false }
    }

    /// A pin that reads `levels` in order, over and over; `levels` must not be empty.
    pub fn repeating(levels: Vec<bool>) -> Self {
        assert!(!levels.is_empty(), "a repeating pin needs at least one level");
        Self { levels, next: 0, repeat: true }
    }

    /// Reads done so far.
    pub fn reads(&self) -> usize {
        self.next
    }

    fn read(&mut self) -> bool {
        if self.repeat {
            let level = self.levels[self.next % self.levels.len()];
            self.next += 1;
            return level;
        }
        let level = match self.levels.get(self.next) {
            Some(&level) => level,
            None => self.levels.last().copied().unwrap_or(false),
        };
        self.next += 1;
        level
    }
}

impl digital::ErrorType for SimPin {
    type Error = Infallible;
}

impl InputPin for SimPin {
    fn is_high(&mut self) -> Result<bool, Self::Error> {
        Ok(self.read())
    }

    fn is_low(&mut self) -> Result<bool, Self::Error> {
        Ok(!self.read())
    }
}

/// Delay that does not sleep but adds up the nanoseconds asked for.
#[derive(Debug, Clone, Default)]
pub struct SimDelay {
    /// Total delay requested so far, nanoseconds.
    pub elapsed_ns: u64,
}

impl DelayNs for SimDelay {
    fn delay_ns(&mut self, ns: u32) {
        self.elapsed_ns += u64::from(ns);
    }
}
