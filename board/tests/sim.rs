//! The real drivers against the simulated devices, including injected faults.

use board::accelerometer::{self, Acceleration, Adxl345, Config, Range};
use board::sht3x::{self, Measurement, Sht3x};
use board::sim::{
    Adxl345Fault, RandomFaults, Sht3xFault, SimAdxl345, SimDelay, SimPin, SimSht3x, SimSht3xConfig,
};
use embedded_hal::i2c::{ErrorKind as I2cErrorKind, I2c, NoAcknowledgeSource};
use embedded_hal::spi::{ErrorKind as SpiErrorKind, SpiDevice};

const SHT3X_ADDRESS: u8 = 0x44;
const ADXL345_DEVICE_ID: u8 = 0xE5;
/// Datasheet table 4: high repeatability measurement takes at most 15 ms.
const SHT3X_MEASUREMENT_WAIT_NS: u64 = 15_000_000;

fn sim_sht3x(temperature_millicelsius: i32, humidity_millipercent: u32) -> SimSht3x {
    SimSht3x::new(SimSht3xConfig {
        address: SHT3X_ADDRESS,
        temperature_millicelsius,
        humidity_millipercent,
        temperature_noise_millicelsius: 0,
        humidity_noise_millipercent: 0,
        seed: 1,
    })
}

/// Round trip through the simulator's raw encoding and the driver's conversion; one raw step is
/// 175 000 / 65 535 ≈ 2.7 millidegrees and 100 000 / 65 535 ≈ 1.5 millipercent.
fn check_sht3x(temperature_millicelsius: i32, humidity_millipercent: u32, expected: Measurement) {
    let mut driver = Sht3x::new(sim_sht3x(temperature_millicelsius, humidity_millipercent), SHT3X_ADDRESS);
    let mut delay = SimDelay::default();
    assert_eq!(driver.measure(&mut delay), Ok(expected));
    assert_eq!(delay.elapsed_ns, SHT3X_MEASUREMENT_WAIT_NS);
}

fn measurement(temperature_millicelsius: i32, humidity_millipercent: u32) -> Measurement {
    Measurement { temperature_millicelsius, humidity_millipercent }
}

#[test]
fn sht3x_round_trips_through_simulator() {
    check_sht3x(25_000, 40_000, measurement(25_000, 40_000));
    check_sht3x(-45_000, 0, measurement(-45_000, 0));
    check_sht3x(130_000, 100_000, measurement(130_000, 100_000));
    check_sht3x(21_337, 55_555, measurement(21_336, 55_555));
    // Beyond the sensor's range the simulator saturates like the 16-bit word does.
    check_sht3x(200_000, 150_000, measurement(130_000, 100_000));
    check_sht3x(-60_000, 0, measurement(-45_000, 0));
}

#[test]
fn sht3x_noise_is_bounded_and_seeded() {
    let config = SimSht3xConfig {
        address: SHT3X_ADDRESS,
        temperature_millicelsius: 20_000,
        humidity_millipercent: 50_000,
        temperature_noise_millicelsius: 300,
        humidity_noise_millipercent: 1_000,
        seed: 42,
    };
    let mut first = Sht3x::new(SimSht3x::new(config), SHT3X_ADDRESS);
    let mut second = Sht3x::new(SimSht3x::new(config), SHT3X_ADDRESS);
    let mut delay = SimDelay::default();
    let mut distinct = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let reading = first.measure(&mut delay).unwrap();
        assert_eq!(second.measure(&mut delay).unwrap(), reading, "same seed, same readings");
        // Noise bound plus one raw step of rounding.
        assert!((reading.temperature_millicelsius - 20_000).abs() <= 303, "{reading:?}");
        assert!(reading.humidity_millipercent.abs_diff(50_000) <= 1_002, "{reading:?}");
        distinct.insert(reading.temperature_millicelsius);
    }
    assert!(distinct.len() > 10, "noise produced only {} distinct temperatures", distinct.len());
    assert_eq!(first.destroy().measurements(), 100);
}

#[test]
fn sht3x_injected_crc_fault_surfaces_as_crc_error() {
    let mut simulator = sim_sht3x(25_000, 40_000);
    simulator.inject_corrupt_crc(1);
    let mut driver = Sht3x::new(simulator, SHT3X_ADDRESS);
    let mut delay = SimDelay::default();
    // 25.000 °C encodes as 0x6666, whose CRC is 0x93; the simulator sends it inverted.
    assert_eq!(driver.measure(&mut delay), Err(sht3x::Error::Crc { expected: 0x93, found: 0x6C }));
    assert_eq!(driver.measure(&mut delay), Ok(measurement(25_000, 40_000)), "fault was one-shot");
}

#[test]
fn sht3x_injected_nack_surfaces_as_bus_error() {
    let mut simulator = sim_sht3x(25_000, 40_000);
    simulator.inject_nack(1);
    let mut driver = Sht3x::new(simulator, SHT3X_ADDRESS);
    let mut delay = SimDelay::default();
    let nack = I2cErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
    assert_eq!(driver.measure(&mut delay), Err(sht3x::Error::Bus(nack)));
    assert_eq!(driver.measure(&mut delay), Ok(measurement(25_000, 40_000)));
}

#[test]
fn sht3x_wrong_address_is_nacked() {
    let mut driver = Sht3x::new(sim_sht3x(25_000, 40_000), 0x45);
    let nack = I2cErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
    assert_eq!(driver.measure(&mut SimDelay::default()), Err(sht3x::Error::Bus(nack)));
}

#[test]
fn sht3x_simulator_speaks_datasheet_bytes() {
    let mut simulator = sim_sht3x(25_000, 40_000);
    let mut response = [0u8; 6];
    // Reading with no measurement pending is NACKed.
    assert_eq!(
        simulator.read(SHT3X_ADDRESS, &mut response),
        Err(I2cErrorKind::NoAcknowledge(NoAcknowledgeSource::Address))
    );
    simulator.write(SHT3X_ADDRESS, &[0x24, 0x00]).unwrap();
    simulator.read(SHT3X_ADDRESS, &mut response).unwrap();
    assert_eq!(response, [0x66, 0x66, 0x93, 0x66, 0x66, 0x93]);
    // Unknown commands are NACKed.
    assert_eq!(
        simulator.write(SHT3X_ADDRESS, &[0x12, 0x34]),
        Err(I2cErrorKind::NoAcknowledge(NoAcknowledgeSource::Data))
    );
}

#[test]
fn sht3x_status_and_reset_through_simulator() {
    let mut driver = Sht3x::new(sim_sht3x(25_000, 40_000), SHT3X_ADDRESS);
    let mut delay = SimDelay::default();
    let status = driver.read_status().unwrap();
    assert!(status.reset_detected() && status.alert_pending());
    let mut simulator = driver.destroy();
    simulator.write(SHT3X_ADDRESS, &[0x30, 0x41]).unwrap(); // clear status
    let mut driver = Sht3x::new(simulator, SHT3X_ADDRESS);
    assert_eq!(driver.read_status().unwrap().bits, 0);
    driver.soft_reset(&mut delay).unwrap();
    assert!(driver.read_status().unwrap().reset_detected());
}

fn check_adxl345(config: Config, set_milli_g: [i32; 3], expected: Acceleration) {
    let mut simulator = SimAdxl345::new(ADXL345_DEVICE_ID);
    simulator.set_acceleration_milli_g(set_milli_g[0], set_milli_g[1], set_milli_g[2]);
    let mut driver = Adxl345::new(simulator);
    driver.init(config).unwrap();
    assert_eq!(driver.acceleration().unwrap(), expected, "{config:?} {set_milli_g:?}");
}

fn acceleration(x_milli_g: i32, y_milli_g: i32, z_milli_g: i32) -> Acceleration {
    Acceleration { x_milli_g, y_milli_g, z_milli_g }
}

#[test]
fn adxl345_round_trips_through_simulator() {
    let range_16_g = Config { range: Range::G16, rate_code: 0x0A };
    check_adxl345(range_16_g, [0, 0, 1_000], acceleration(0, 0, 1_000));
    // ±16 g is 13 bits: +16 g saturates at 4 095 LSB = 15 996 mg, -16 g is exactly -4 096 LSB.
    check_adxl345(range_16_g, [-1_000, 500, 16_000], acceleration(-1_000, 500, 15_996));
    check_adxl345(range_16_g, [-16_000, 0, 0], acceleration(-16_000, 0, 0));
    // 3.906 25 mg per LSB: 10 mg reads back as 2 LSB = 7 mg.
    check_adxl345(range_16_g, [10, -10, 0], acceleration(7, -7, 0));
    // ±2 g is 10 bits: saturates at 511 LSB = 1 996 mg and -512 LSB = -2 000 mg.
    let range_2_g = Config { range: Range::G2, rate_code: 0x0A };
    check_adxl345(range_2_g, [3_000, -3_000, 1_000], acceleration(1_996, -2_000, 1_000));
}

#[test]
fn adxl345_init_sets_registers_in_simulator() {
    let mut driver = Adxl345::new(SimAdxl345::new(ADXL345_DEVICE_ID));
    driver.init(Config { range: Range::G8, rate_code: 0x0C }).unwrap();
    let simulator = driver.destroy();
    assert_eq!(simulator.register(0x31), 0x08 | 0b10, "DATA_FORMAT: FULL_RES, ±8 g");
    assert_eq!(simulator.register(0x2C), 0x0C, "BW_RATE");
    assert_eq!(simulator.register(0x2D), 0x08, "POWER_CTL: Measure");
}

#[test]
fn adxl345_standby_reads_zero() {
    let mut simulator = SimAdxl345::new(ADXL345_DEVICE_ID);
    simulator.set_acceleration_milli_g(1_000, 1_000, 1_000);
    let mut driver = Adxl345::new(simulator);
    assert_eq!(driver.acceleration().unwrap(), acceleration(0, 0, 0), "no init: still in standby");
}

#[test]
fn adxl345_wrong_device_id_is_typed() {
    let mut driver = Adxl345::new(SimAdxl345::new(0x00));
    assert_eq!(
        driver.init(Config::default()),
        Err(accelerometer::Error::WrongDeviceId { expected: ADXL345_DEVICE_ID, found: 0x00 })
    );
    assert_eq!(driver.destroy().register(0x2D), 0, "nothing written after a wrong id");
}

#[test]
fn adxl345_injected_bus_error_is_typed() {
    let mut simulator = SimAdxl345::new(ADXL345_DEVICE_ID);
    simulator.inject_bus_error(1);
    let mut driver = Adxl345::new(simulator);
    assert_eq!(driver.init(Config::default()), Err(accelerometer::Error::Bus(SpiErrorKind::Other)));
    assert_eq!(driver.init(Config::default()), Ok(()));
}

#[test]
fn adxl345_simulator_handles_full_duplex_transfers() {
    let mut simulator = SimAdxl345::new(ADXL345_DEVICE_ID);
    // Command byte (read bit 0x80, register DEVID 0x00) then a dummy byte, clocked full duplex.
    let mut buffer = [0x80, 0x00];
    simulator.transfer_in_place(&mut buffer).unwrap();
    assert_eq!(buffer[1], ADXL345_DEVICE_ID);
    // Multi-byte write across BW_RATE and POWER_CTL, then a multi-byte read back.
    simulator.write(&[0x40 | 0x2C, 0x0D, 0x08]).unwrap();
    let mut read = [0u8; 3];
    simulator.transfer(&mut read, &[0x80 | 0x40 | 0x2C]).unwrap();
    assert_eq!(read, [0x00, 0x0D, 0x08]);
    // DEVID is read-only.
    simulator.write(&[0x00, 0x12]).unwrap();
    assert_eq!(simulator.register(0x00), ADXL345_DEVICE_ID);
}

#[test]
fn sht3x_injected_out_of_range_is_a_valid_word_at_130_c() {
    let mut simulator = sim_sht3x(25_000, 40_000);
    simulator.inject_out_of_range(1);
    let mut driver = Sht3x::new(simulator, SHT3X_ADDRESS);
    let mut delay = SimDelay::default();
    // Raw 0xFFFF with a valid CRC: the driver accepts it; the Sensor adapter rejects it.
    assert_eq!(driver.measure(&mut delay), Ok(measurement(130_000, 40_000)));
    assert_eq!(driver.measure(&mut delay), Ok(measurement(25_000, 40_000)), "fault was one-shot");
}

/// Outcome letters of `reads` measurements with random faults: '.' ok, 'n' NACK, 'c' CRC, 'o' 130 °C.
fn sht3x_fault_pattern(rate_per_million: u32, kinds: Vec<Sht3xFault>, seed: u64, reads: usize) -> String {
    let mut simulator = sim_sht3x(25_000, 40_000);
    simulator.set_random_faults(RandomFaults { rate_per_million, kinds, seed });
    let mut driver = Sht3x::new(simulator, SHT3X_ADDRESS);
    let mut delay = SimDelay::default();
    (0..reads)
        .map(|_| match driver.measure(&mut delay) {
            Ok(reading) if reading.temperature_millicelsius == 130_000 => 'o',
            Ok(_) => '.',
            Err(sht3x::Error::Bus(_)) => 'n',
            Err(sht3x::Error::Crc { .. }) => 'c',
            Err(sht3x::Error::NoResponse) => '?',
        })
        .collect()
}

#[test]
fn sht3x_random_faults_follow_rate_kinds_and_seed() {
    let all = vec![Sht3xFault::Nack, Sht3xFault::Crc, Sht3xFault::OutOfRange];
    assert_eq!(sht3x_fault_pattern(0, all.clone(), 1, 50), ".".repeat(50));
    assert_eq!(sht3x_fault_pattern(1_000_000, vec![Sht3xFault::Crc], 1, 20), "c".repeat(20));
    assert_eq!(sht3x_fault_pattern(1_000_000, vec![], 1, 20), ".".repeat(20), "no kinds, no faults");
    let pattern = sht3x_fault_pattern(300_000, all.clone(), 5, 300);
    assert_eq!(pattern, sht3x_fault_pattern(300_000, all.clone(), 5, 300), "same seed, same faults");
    assert_ne!(pattern, sht3x_fault_pattern(300_000, all, 6, 300));
    for letter in ['.', 'n', 'c', 'o'] {
        assert!(pattern.contains(letter), "{letter} missing from {pattern}");
    }
}

#[test]
fn adxl345_noise_is_bounded_and_seeded() {
    let sample = |seed: u64| {
        let mut simulator = SimAdxl345::new(ADXL345_DEVICE_ID);
        simulator.set_acceleration_milli_g(0, 500, 1_000);
        simulator.set_noise(50, seed);
        let mut driver = Adxl345::new(simulator);
        driver.init(Config::default()).unwrap();
        (0..100).map(|_| driver.acceleration().unwrap()).collect::<Vec<_>>()
    };
    let samples = sample(3);
    assert_eq!(samples, sample(3));
    assert_ne!(samples, sample(4));
    for reading in &samples {
        // Noise plus one LSB (3.9 mg) of truncation.
        assert!(reading.x_milli_g.abs() <= 54 && (reading.y_milli_g - 500).abs() <= 54, "{reading:?}");
        assert!((reading.z_milli_g - 1_000).abs() <= 54, "{reading:?}");
    }
    let distinct: std::collections::BTreeSet<i32> = samples.iter().map(|reading| reading.x_milli_g).collect();
    assert!(distinct.len() > 5, "{distinct:?}");
}

#[test]
fn adxl345_injected_out_of_range_saturates_x() {
    let mut simulator = SimAdxl345::new(ADXL345_DEVICE_ID);
    simulator.set_acceleration_milli_g(0, 0, 1_000);
    let mut driver = Adxl345::new(simulator);
    driver.init(Config { range: Range::G4, rate_code: 0x0A }).unwrap();
    let mut simulator = driver.destroy();
    simulator.inject_out_of_range(1);
    let mut driver = Adxl345::new(simulator);
    // ±4 g is 11 bits: saturates at 1 023 LSB = 3 996 mg.
    assert_eq!(driver.acceleration().unwrap(), acceleration(3_996, 0, 1_000));
    assert_eq!(driver.acceleration().unwrap(), acceleration(0, 0, 1_000));
}

#[test]
fn adxl345_random_bus_faults_are_typed() {
    let mut simulator = SimAdxl345::new(ADXL345_DEVICE_ID);
    simulator.set_random_faults(RandomFaults {
        rate_per_million: 1_000_000,
        kinds: vec![Adxl345Fault::Bus],
        seed: 1,
    });
    let mut driver = Adxl345::new(simulator);
    assert_eq!(driver.acceleration(), Err(accelerometer::Error::Bus(SpiErrorKind::Other)));
}

#[test]
fn repeating_pin_cycles_its_script() {
    use embedded_hal::digital::InputPin;
    let mut pin = SimPin::repeating(vec![false, true, true]);
    let levels: Vec<bool> = (0..7).map(|_| pin.is_high().unwrap()).collect();
    assert_eq!(levels, [false, true, true, false, true, true, false]);
    assert_eq!(pin.reads(), 7);
}
