//! The uniform `Sensor` / `TriggerInput` adapters against embedded-hal-mock transaction lists.
//!
//! Commands and registers are re-declared from the datasheets (see tests/sht3x.rs and
//! tests/accelerometer.rs).

use board::accelerometer::{Adxl345, Range};
use board::device::{
    Adxl345Sensor, GpioTrigger, Reading, Sensor, SensorError, SensorErrorKind, Sht3xSensor, TriggerInput,
    Unit, Value, adxl345_saturation_milli_g,
};
use board::sht3x::Sht3x;
use board::trigger::{Config, RisingEdge};
use embedded_hal::i2c::{ErrorKind as I2cErrorKind, NoAcknowledgeSource};
use embedded_hal_mock::eh1::delay::NoopDelay;
use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as PinTransaction};
use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2cTransaction};
use embedded_hal_mock::eh1::spi::{Mock as SpiMock, Transaction as SpiTransaction};

const SHT3X_ADDRESS: u8 = 0x44;
const MEASURE_HIGH_REPEATABILITY: [u8; 2] = [0x24, 0x00];
const READ_MULTI_BYTE_DATAX0: u8 = 0x80 | 0x40 | 0x32;

/// One SHT3x reading through the adapter; `read_error` makes the mock fail the read.
fn check_sht3x(response: [u8; 6], read_error: Option<I2cErrorKind>, expected: Result<Reading, SensorError>) {
    let mut read = I2cTransaction::read(SHT3X_ADDRESS, response.to_vec());
    if let Some(error) = read_error {
        read = read.with_error(error);
    }
    let expectations = [I2cTransaction::write(SHT3X_ADDRESS, MEASURE_HIGH_REPEATABILITY.to_vec()), read];
    let driver = Sht3x::new(I2cMock::new(&expectations), SHT3X_ADDRESS);
    let mut sensor = Sht3xSensor::new("env0", driver, NoopDelay::new());
    assert_eq!(sensor.name(), "env0");
    assert_eq!(sensor.read(), expected, "response {response:02X?}");
    sensor.destroy().0.destroy().done();
}

fn sht3x_reading(temperature_c: f64, humidity_pct: f64) -> Reading {
    Reading::new(vec![
        Value { name: "temperature_c", value: temperature_c, unit: Unit::Celsius },
        Value { name: "humidity_pct", value: humidity_pct, unit: Unit::Percent },
    ])
}

#[test]
fn sht3x_sensor_converts_and_types_errors() {
    // 0x6666 = 25.000 °C and 40.000 %, CRC 0x93 (datasheet conversion and CRC-8).
    check_sht3x([0x66, 0x66, 0x93, 0x66, 0x66, 0x93], None, Ok(sht3x_reading(25.0, 40.0)));
    // 0x0000 = -45 °C: a valid word, but below the specified -40 °C.
    check_sht3x(
        [0x00, 0x00, 0x81, 0x66, 0x66, 0x93],
        None,
        Err(SensorError::OutOfRange {
            sensor: "env0".into(),
            quantity: "temperature_c",
            value: -45.0,
            min: -40.0,
            max: 125.0,
        }),
    );
    check_sht3x(
        [0x66, 0x66, 0x00, 0x66, 0x66, 0x93],
        None,
        Err(SensorError::Crc { sensor: "env0".into(), expected: 0x93, found: 0x00 }),
    );
    check_sht3x([0xFF; 6], None, Err(SensorError::NoResponse { sensor: "env0".into() }));
    let nack = I2cErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
    check_sht3x(
        [0; 6],
        Some(nack),
        Err(SensorError::Nack { sensor: "env0".into(), detail: format!("{nack:?}") }),
    );
    let bus = I2cErrorKind::ArbitrationLoss;
    check_sht3x(
        [0; 6],
        Some(bus),
        Err(SensorError::Bus { sensor: "env0".into(), detail: format!("{bus:?}") }),
    );
}

/// One burst read through an ADXL345 adapter (driver assumed initialised for `range`).
/// (The SPI mock cannot inject bus errors; tests/board.rs covers them through `SimAdxl345`.)
fn check_adxl345(range: Range, data: [u8; 6], expected: Result<Vec<f64>, SensorErrorKind>) {
    let expectations = vec![
        SpiTransaction::transaction_start(),
        SpiTransaction::write_vec(vec![READ_MULTI_BYTE_DATAX0]),
        SpiTransaction::read_vec(data.to_vec()),
        SpiTransaction::transaction_end(),
    ];
    let mut sensor = Adxl345Sensor::new("accel0", Adxl345::new(SpiMock::new(&expectations)), range);
    let result = sensor.read();
    match (&result, &expected) {
        (Ok(reading), Ok(values)) => {
            assert_eq!(reading.values.iter().map(|value| value.value).collect::<Vec<_>>(), *values);
            assert_eq!(
                reading.values.iter().map(|value| value.name).collect::<Vec<_>>(),
                ["x_mg", "y_mg", "z_mg"]
            );
        }
        (Err(error), Err(kind)) => assert_eq!(error.kind(), *kind, "{error}"),
        _ => panic!("{data:02X?}: got {result:?}, expected {expected:?}"),
    }
    sensor.destroy().destroy().done();
}

#[test]
fn adxl345_sensor_converts_and_rejects_saturation() {
    // Little-endian 16-bit per axis at 256 LSB/g: 256 = 1000 mg, -128 = -500 mg.
    check_adxl345(Range::G16, [0, 0, 0x80, 0xFF, 0, 1], Ok(vec![0.0, -500.0, 1000.0]));
    // ±16 g is 13 bits: 4095 is the positive end.
    check_adxl345(Range::G16, [0xFF, 0x0F, 0, 0, 0, 1], Err(SensorErrorKind::OutOfRange));
    check_adxl345(Range::G16, [0xFE, 0x0F, 0, 0, 0, 1], Ok(vec![15992.0, 0.0, 1000.0]));
    // ±2 g is 10 bits: -512 is the negative end.
    check_adxl345(Range::G2, [0, 0, 0x00, 0xFE, 0, 1], Err(SensorErrorKind::OutOfRange));
    check_adxl345(Range::G2, [0, 0, 0x01, 0xFE, 0, 1], Ok(vec![0.0, -1996.0, 1000.0]));
}

#[test]
fn adxl345_saturation_limits_per_range() {
    let check = |range: Range, expected: (i32, i32)| assert_eq!(adxl345_saturation_milli_g(range), expected);
    check(Range::G2, (-2_000, 1_996));
    check(Range::G4, (-4_000, 3_996));
    check(Range::G8, (-8_000, 7_996));
    check(Range::G16, (-16_000, 15_996));
}

#[test]
fn gpio_trigger_takes_the_callers_clock() {
    let expectations = [
        PinTransaction::get(State::Low),
        PinTransaction::get(State::High),
        PinTransaction::get(State::High),
        PinTransaction::get(State::High),
    ];
    let mut trigger = GpioTrigger::new("trig", PinMock::new(&expectations), Config { debounce_us: 1_000 });
    assert_eq!(trigger.name(), "trig");
    assert_eq!(trigger.poll(10_000), Ok(None));
    assert_eq!(trigger.poll(10_500), Ok(None));
    assert_eq!(trigger.poll(11_000), Ok(None));
    assert_eq!(trigger.poll(11_500), Ok(Some(RisingEdge { timestamp_us: 10_500 })));
    trigger.destroy().done();
}

#[test]
fn readings_serialize_with_names_and_units() {
    let json = serde_json::to_string(&sht3x_reading(21.5, 40.25)).unwrap();
    assert_eq!(
        json,
        r#"{"values":[{"name":"temperature_c","value":21.5,"unit":"celsius"},{"name":"humidity_pct","value":40.25,"unit":"percent"}]}"#
    );
    assert_eq!(sht3x_reading(21.5, 40.25).get("humidity_pct"), Some(40.25));
    assert_eq!(sht3x_reading(21.5, 40.25).get("x_mg"), None);
}
