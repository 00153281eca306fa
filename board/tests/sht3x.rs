//! SHT3x driver against embedded-hal-mock transaction lists.
//!
//! Addresses, commands and CRC parameters are re-declared here from the SHT3x-DIS datasheet
//! rather than imported, so a wrong constant in the driver fails these tests.

use board::sht3x::{self, Error, Measurement, Sht3x};
use embedded_hal::i2c::ErrorKind;
use embedded_hal_mock::eh1::delay::{CheckedDelay, NoopDelay, Transaction as DelayTransaction};
use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2cTransaction};

const ADDRESS: u8 = 0x44;
const ADDRESS_ALTERNATE: u8 = 0x45;
const MEASURE_HIGH_REPEATABILITY: [u8; 2] = [0x24, 0x00];
const SOFT_RESET: [u8; 2] = [0x30, 0xA2];
const READ_STATUS: [u8; 2] = [0xF3, 0x2D];
/// Datasheet table 4: high repeatability measurement takes at most 15 ms.
const MEASUREMENT_WAIT_US: u32 = 15_000;
/// Datasheet table 4: soft reset takes at most 1.5 ms.
const SOFT_RESET_WAIT_US: u32 = 1_500;

/// One measurement response through the mock: `response` is what the sensor sends.
fn check(response: [u8; 6], expected: Result<Measurement, Error<ErrorKind>>) {
    let expectations = [
        I2cTransaction::write(ADDRESS, MEASURE_HIGH_REPEATABILITY.to_vec()),
        I2cTransaction::read(ADDRESS, response.to_vec()),
    ];
    let mut driver = Sht3x::new(I2cMock::new(&expectations), ADDRESS);
    assert_eq!(driver.measure(&mut NoopDelay::new()), expected, "response {response:02X?}");
    driver.destroy().done();
}

fn measurement(temperature_millicelsius: i32, humidity_millipercent: u32) -> Measurement {
    Measurement { temperature_millicelsius, humidity_millipercent }
}

#[test]
fn crc8_matches_datasheet_and_known_words() {
    // (data word, CRC-8): 0xBEEF -> 0x92 is the datasheet example (section 4.12).
    let table: [(u16, u8); 5] =
        [(0xBEEF, 0x92), (0x0000, 0x81), (0xFFFF, 0xAC), (0x6666, 0x93), (0x8000, 0xA2)];
    for (word, crc) in table {
        assert_eq!(sht3x::crc8(&word.to_be_bytes()), crc, "word 0x{word:04X}");
    }
}

#[test]
fn measurement_conversions() {
    check([0x66, 0x66, 0x93, 0x66, 0x66, 0x93], Ok(measurement(25_000, 40_000)));
    check([0x00, 0x00, 0x81, 0x00, 0x00, 0x81], Ok(measurement(-45_000, 0)));
    check([0xFF, 0xFF, 0xAC, 0xFF, 0xFF, 0xAC], Ok(measurement(130_000, 100_000)));
    check([0x80, 0x00, 0xA2, 0xBE, 0xEF, 0x92], Ok(measurement(42_501, 74_585)));
}

#[test]
fn crc_mismatch_is_typed() {
    check([0x66, 0x66, 0x94, 0x66, 0x66, 0x93], Err(Error::Crc { expected: 0x93, found: 0x94 }));
    check([0x66, 0x66, 0x93, 0xBE, 0xEF, 0x00], Err(Error::Crc { expected: 0x92, found: 0x00 }));
}

#[test]
fn all_ones_is_no_response() {
    check([0xFF; 6], Err(Error::NoResponse));
}

#[test]
fn measurement_waits_datasheet_maximum() {
    let expectations = [
        I2cTransaction::write(ADDRESS_ALTERNATE, MEASURE_HIGH_REPEATABILITY.to_vec()),
        I2cTransaction::read(ADDRESS_ALTERNATE, vec![0x66, 0x66, 0x93, 0x66, 0x66, 0x93]),
    ];
    let mut delay = CheckedDelay::new(&[DelayTransaction::delay_us(MEASUREMENT_WAIT_US)]);
    let mut driver = Sht3x::new(I2cMock::new(&expectations), ADDRESS_ALTERNATE);
    assert_eq!(driver.measure(&mut delay), Ok(measurement(25_000, 40_000)));
    driver.destroy().done();
    delay.done();
}

#[test]
fn nack_on_read_is_bus_error() {
    let nack = ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address);
    let expectations = [
        I2cTransaction::write(ADDRESS, MEASURE_HIGH_REPEATABILITY.to_vec()),
        I2cTransaction::read(ADDRESS, vec![0; 6]).with_error(nack),
    ];
    let mut driver = Sht3x::new(I2cMock::new(&expectations), ADDRESS);
    assert_eq!(driver.measure(&mut NoopDelay::new()), Err(Error::Bus(nack)));
    driver.destroy().done();
}

#[test]
fn soft_reset_and_status() {
    let expectations = [
        I2cTransaction::write(ADDRESS, SOFT_RESET.to_vec()),
        I2cTransaction::write(ADDRESS, READ_STATUS.to_vec()),
        // 0x8010: alert pending (bit 15) and reset detected (bit 4), CRC 0xE1.
        I2cTransaction::read(ADDRESS, vec![0x80, 0x10, 0xE1]),
        I2cTransaction::write(ADDRESS, READ_STATUS.to_vec()),
        I2cTransaction::read(ADDRESS, vec![0x80, 0x10, 0x00]),
    ];
    let mut delay = CheckedDelay::new(&[DelayTransaction::delay_us(SOFT_RESET_WAIT_US)]);
    let mut driver = Sht3x::new(I2cMock::new(&expectations), ADDRESS);
    driver.soft_reset(&mut delay).unwrap();
    let status = driver.read_status().unwrap();
    assert_eq!(status.bits, 0x8010);
    assert!(status.alert_pending() && status.reset_detected());
    assert!(!status.heater_on() && !status.last_command_failed() && !status.write_checksum_failed());
    assert_eq!(driver.read_status(), Err(Error::Crc { expected: 0xE1, found: 0x00 }));
    driver.destroy().done();
    delay.done();
}

#[test]
fn error_messages_carry_context() {
    let error: Error<ErrorKind> = Error::Crc { expected: 0x92, found: 0x00 };
    assert_eq!(error.to_string(), "sht3x: crc mismatch: computed 0x92, sensor sent 0x00 (bus noise; retry)");
}
