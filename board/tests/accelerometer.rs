//! ADXL345-style accelerometer driver against embedded-hal-mock SPI transaction lists.
//!
//! Register addresses and bits are re-declared from the ADXL345 datasheet register map.

use board::accelerometer::{Acceleration, Adxl345, Config, Error, Range};
use embedded_hal::spi::ErrorKind;
use embedded_hal_mock::eh1::spi::{Mock as SpiMock, Transaction as SpiTransaction};

const DEVID: u8 = 0x00;
const BW_RATE: u8 = 0x2C;
const POWER_CTL: u8 = 0x2D;
const DATA_FORMAT: u8 = 0x31;
const DATAX0: u8 = 0x32;
const DEVICE_ID: u8 = 0xE5;
const READ: u8 = 0x80;
const MULTI_BYTE: u8 = 0x40;
const MEASURE: u8 = 0x08;
const FULL_RES: u8 = 0x08;
const RANGE_16_G: u8 = 0b11;
const RATE_100_HZ: u8 = 0x0A;

fn read_register(register: u8, value: u8) -> Vec<SpiTransaction<u8>> {
    vec![
        SpiTransaction::transaction_start(),
        SpiTransaction::write_vec(vec![READ | register]),
        SpiTransaction::read_vec(vec![value]),
        SpiTransaction::transaction_end(),
    ]
}

fn write_register(register: u8, value: u8) -> Vec<SpiTransaction<u8>> {
    vec![
        SpiTransaction::transaction_start(),
        SpiTransaction::write_vec(vec![register, value]),
        SpiTransaction::transaction_end(),
    ]
}

fn init_sequence(config_data_format: u8, rate: u8) -> Vec<SpiTransaction<u8>> {
    [
        read_register(DEVID, DEVICE_ID),
        write_register(DATA_FORMAT, config_data_format),
        write_register(BW_RATE, rate),
        write_register(POWER_CTL, MEASURE),
    ]
    .concat()
}

/// Init, then one burst read answering `data`; compares the converted sample.
fn check(data: [u8; 6], expected: Acceleration) {
    let mut expectations = init_sequence(FULL_RES | RANGE_16_G, RATE_100_HZ);
    expectations.extend([
        SpiTransaction::transaction_start(),
        SpiTransaction::write_vec(vec![READ | MULTI_BYTE | DATAX0]),
        SpiTransaction::read_vec(data.to_vec()),
        SpiTransaction::transaction_end(),
    ]);
    let mut driver = Adxl345::new(SpiMock::new(&expectations));
    driver.init(Config::default()).unwrap();
    assert_eq!(driver.acceleration().unwrap(), expected, "data {data:02X?}");
    driver.destroy().done();
}

fn acceleration(x_milli_g: i32, y_milli_g: i32, z_milli_g: i32) -> Acceleration {
    Acceleration { x_milli_g, y_milli_g, z_milli_g }
}

#[test]
fn samples_convert_to_milli_g() {
    // 256 LSB/g in full resolution, little-endian two's complement.
    check([0x00, 0x00, 0x00, 0x00, 0x00, 0x01], acceleration(0, 0, 1000));
    check([0x00, 0xFF, 0x80, 0x00, 0x00, 0xF0], acceleration(-1000, 500, -16_000));
    check([0x01, 0x00, 0xFF, 0xFF, 0xFF, 0x0F], acceleration(3, -3, 15_996));
}

#[test]
fn init_writes_configured_range_and_rate() {
    let expectations = init_sequence(FULL_RES | 0b01, 0x0F);
    let mut driver = Adxl345::new(SpiMock::new(&expectations));
    driver.init(Config { range: Range::G4, rate_code: 0x0F }).unwrap();
    driver.destroy().done();
}

#[test]
fn wrong_device_id_is_typed_and_touches_nothing_else() {
    for found in [0x00, 0xFF, 0xE6] {
        let expectations = read_register(DEVID, found);
        let mut driver = Adxl345::new(SpiMock::new(&expectations));
        assert_eq!(driver.init(Config::default()), Err(Error::WrongDeviceId { expected: DEVICE_ID, found }));
        driver.destroy().done();
    }
}

#[test]
fn error_messages_carry_context() {
    let error: Error<ErrorKind> = Error::WrongDeviceId { expected: DEVICE_ID, found: 0x00 };
    assert_eq!(
        error.to_string(),
        "adxl345: device id 0x00, expected 0xE5 (wrong chip, or MISO floating; check SPI mode 3)"
    );
}
