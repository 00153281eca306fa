//! `Board::open` on the sim backend: the real drivers over simulated buses, faults included.

use std::collections::BTreeMap;
use std::path::Path;

use board::board::{Board, BoardError};
use board::device::{SensorError, SensorErrorKind, Unit};
use board::profile::Profile;

fn profile(text: &str) -> Profile {
    Profile::parse(text, Path::new("test.toml")).unwrap()
}

fn sht3x_profile(sim: &str) -> Profile {
    profile(&format!(
        "name = \"t\"\nbackend = \"sim\"\n[[sensors]]\nname = \"env0\"\nkind = \"sht3x\"\nbus = \"i2c-1\"\n\
         address = 0x45\nperiod_ms = 1000\n[sensors.sim]\n{sim}\n"
    ))
}

fn adxl345_profile(range_g: u8, sim: &str) -> Profile {
    profile(&format!(
        "name = \"t\"\nbackend = \"sim\"\n[[sensors]]\nname = \"accel0\"\nkind = \"adxl345\"\n\
         bus = \"spi-0.0\"\nperiod_ms = 10\nrange_g = {range_g}\n[sensors.sim]\n{sim}\n"
    ))
}

fn open(profile: &Profile) -> Board {
    match Board::open(profile) {
        Ok(board) => board,
        Err(error) => panic!("open failed: {error}"),
    }
}

#[test]
fn sim_devkit_opens_and_reads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/sim-devkit.toml");
    let mut board = open(&Profile::load(&path).unwrap());
    assert_eq!(board.name, "sim-devkit");
    let schedule: Vec<(&str, u32)> =
        board.sensors.iter().map(|sensor| (sensor.name.as_str(), sensor.period_ms)).collect();
    assert_eq!(schedule, [("env0", 1000), ("accel0", 10)]);
    // The profile injects faults at a low rate: take the first good reading of each.
    for sensor in &mut board.sensors {
        assert_eq!(sensor.sensor.name(), sensor.name);
        let reading = (0..20).find_map(|_| sensor.sensor.read().ok()).expect("a good reading in 20");
        assert!(!reading.values.is_empty());
    }
    assert_eq!((board.triggers[0].name.as_str(), board.triggers[0].poll_interval_us), ("cam-trigger", 500));
    let camera = &mut board.cameras[0];
    assert_eq!((camera.name.as_str(), camera.fps, camera.source.name()), ("cam0", 5, "cam0"));
    let frame = camera.source.next_frame().unwrap();
    assert_eq!((frame.width, frame.height, frame.sequence), (320, 240, 0));
}

#[test]
fn sht3x_readings_have_names_units_and_noise_bounds() {
    let mut board = open(&sht3x_profile(
        "seed = 5\ntemperature_c = 21.5\nhumidity_pct = 60.0\ntemperature_noise_c = 0.3\nhumidity_noise_pct = 2.0",
    ));
    let sensor = &mut board.sensors[0].sensor;
    for _ in 0..200 {
        let reading = sensor.read().unwrap();
        let names: Vec<(&str, Unit)> = reading.values.iter().map(|value| (value.name, value.unit)).collect();
        assert_eq!(names, [("temperature_c", Unit::Celsius), ("humidity_pct", Unit::Percent)]);
        // Noise plus one raw step of rounding.
        let temperature = reading.get("temperature_c").unwrap();
        let humidity = reading.get("humidity_pct").unwrap();
        assert!((temperature - 21.5).abs() <= 0.303, "{temperature}");
        assert!((humidity - 60.0).abs() <= 2.002, "{humidity}");
    }
}

#[test]
fn adxl345_readings_have_names_units_and_noise_bounds() {
    let mut board =
        open(&adxl345_profile(16, "seed = 9\nacceleration_mg = [100, -250, 1000]\nnoise_mg = 30"));
    let sensor = &mut board.sensors[0].sensor;
    for _ in 0..200 {
        let reading = sensor.read().unwrap();
        let names: Vec<&str> = reading.values.iter().map(|value| value.name).collect();
        assert_eq!(names, ["x_mg", "y_mg", "z_mg"]);
        assert!(reading.values.iter().all(|value| value.unit == Unit::MilliG));
        // Noise plus one LSB (3.9 mg) of truncation.
        for (name, expected) in [("x_mg", 100.0), ("y_mg", -250.0), ("z_mg", 1000.0)] {
            let value = reading.get(name).unwrap();
            assert!((value - expected).abs() <= 34.0, "{name} = {value}");
        }
    }
}

/// With a fault on every read of only one kind, every read fails with that typed error.
fn check_fault(profile: Profile, expected: SensorErrorKind) {
    let mut board = open(&profile);
    let sensor = &mut board.sensors[0].sensor;
    for _ in 0..5 {
        let error = sensor.read().unwrap_err();
        assert_eq!(error.kind(), expected, "{error}");
        assert!(error.to_string().starts_with(&format!("sensor {}: ", sensor.name())), "{error}");
    }
}

#[test]
fn each_injected_fault_surfaces_as_its_typed_error() {
    check_fault(sht3x_profile("fault_rate = 1.0\nfaults = [\"crc\"]"), SensorErrorKind::Crc);
    check_fault(sht3x_profile("fault_rate = 1.0\nfaults = [\"nack\"]"), SensorErrorKind::Nack);
    check_fault(sht3x_profile("fault_rate = 1.0\nfaults = [\"out_of_range\"]"), SensorErrorKind::OutOfRange);
    check_fault(adxl345_profile(16, "fault_rate = 1.0\nfaults = [\"bus\"]"), SensorErrorKind::Bus);
    check_fault(
        adxl345_profile(16, "fault_rate = 1.0\nfaults = [\"out_of_range\"]"),
        SensorErrorKind::OutOfRange,
    );
    check_fault(
        adxl345_profile(2, "fault_rate = 1.0\nfaults = [\"out_of_range\"]"),
        SensorErrorKind::OutOfRange,
    );
    // A real acceleration beyond the range saturates too.
    check_fault(
        adxl345_profile(2, "acceleration_mg = [0, 3000, 0]\nnoise_mg = 0"),
        SensorErrorKind::OutOfRange,
    );
}

#[test]
fn out_of_range_errors_carry_the_value_and_limits() {
    let mut board = open(&sht3x_profile("fault_rate = 1.0\nfaults = [\"out_of_range\"]"));
    let error = board.sensors[0].sensor.read().unwrap_err();
    assert_eq!(
        error,
        SensorError::OutOfRange {
            sensor: "env0".to_string(),
            quantity: "temperature_c",
            value: 130.0,
            min: -40.0,
            max: 125.0
        }
    );
    let mut board = open(&adxl345_profile(2, "acceleration_mg = [0, -3000, 0]\nnoise_mg = 0"));
    let error = board.sensors[0].sensor.read().unwrap_err();
    assert_eq!(
        error,
        SensorError::OutOfRange {
            sensor: "accel0".to_string(),
            quantity: "y_mg",
            value: -2000.0,
            min: -1999.0,
            max: 1995.0
        }
    );
}

/// Mixed random faults at a rate: counted by kind, seeded so the counts are the same every run,
/// and every reading that does succeed is plausible.
fn check_fault_counts(profile: Profile, reads: u32, expected_fault_kinds: &[SensorErrorKind]) {
    let mut board = open(&profile);
    let sensor = &mut board.sensors[0].sensor;
    let mut counts: BTreeMap<SensorErrorKind, u32> = BTreeMap::new();
    let mut good = 0u32;
    for _ in 0..reads {
        match sensor.read() {
            Ok(_) => good += 1,
            Err(error) => *counts.entry(error.kind()).or_default() += 1,
        }
    }
    let faults: u32 = counts.values().sum();
    assert_eq!(good + faults, reads);
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), expected_fault_kinds, "{counts:?}");
    // 10 % of reads, within ±3 standard deviations of the binomial (sqrt(2000 * 0.1 * 0.9) ≈ 13.4).
    assert!((160..=240).contains(&faults), "{faults} faults in {reads} reads: {counts:?}");
}

#[test]
fn random_faults_are_counted_by_kind() {
    check_fault_counts(
        sht3x_profile("seed = 77\nfault_rate = 0.1"),
        2000,
        &[SensorErrorKind::Nack, SensorErrorKind::Crc, SensorErrorKind::OutOfRange],
    );
    check_fault_counts(
        adxl345_profile(16, "seed = 78\nfault_rate = 0.1"),
        2000,
        &[SensorErrorKind::Bus, SensorErrorKind::OutOfRange],
    );
}

#[test]
fn a_nacked_read_does_not_poison_the_next() {
    // One NACK leaves the simulator with no answer pending; the next measurement starts afresh.
    let mut board = open(&sht3x_profile("seed = 3\nfault_rate = 0.5\nfaults = [\"nack\"]"));
    let sensor = &mut board.sensors[0].sensor;
    let results: Vec<bool> = (0..200).map(|_| sensor.read().is_ok()).collect();
    assert!(results.windows(2).any(|pair| pair == [false, true]), "recovers after a NACK");
}

#[test]
fn wrong_chip_fails_open_with_typed_error() {
    let error = match Board::open(&adxl345_profile(16, "device_id = 0x00")) {
        Ok(_) => panic!("opened a wrong chip"),
        Err(error) => error,
    };
    match error {
        BoardError::Sensor(SensorError::WrongDeviceId { sensor, expected: 0xE5, found: 0x00 }) => {
            assert_eq!(sensor, "accel0")
        }
        other => panic!("unexpected {other}"),
    }
}

/// A simulated trigger pulse train polled on a virtual clock: edge timestamps in microseconds.
fn check_trigger(high_polls: u32, low_polls: u32, debounce_us: u64, polls: u64, expected_edges_us: &[u64]) {
    const POLL_INTERVAL_US: u64 = 250;
    let mut board = open(&profile(&format!(
        "name = \"t\"\nbackend = \"sim\"\n[[triggers]]\nname = \"trig\"\nkind = \"gpio\"\nchip = \"gpiochip0\"\n\
         line = 4\ndebounce_us = {debounce_us}\npoll_interval_us = {POLL_INTERVAL_US}\n[triggers.sim]\n\
         high_polls = {high_polls}\nlow_polls = {low_polls}\n"
    )));
    let trigger = &mut board.triggers[0].trigger;
    let mut edges = Vec::new();
    for poll in 0..polls {
        if let Some(edge) = trigger.poll(poll * POLL_INTERVAL_US).unwrap() {
            edges.push(edge.timestamp_us);
        }
    }
    assert_eq!(edges, expected_edges_us, "high {high_polls}, low {low_polls}, debounce {debounce_us}");
}

#[test]
fn simulated_trigger_pulses_are_debounced_edges() {
    // Low for polls 0..15, high 15..20, repeating every 20 polls of 250 µs.
    check_trigger(5, 15, 1_000, 60, &[3_750, 8_750, 13_750]);
    // A pulse of 2 polls (250 µs held) is shorter than the 1 ms debounce: no edges.
    check_trigger(2, 18, 1_000, 60, &[]);
    check_trigger(2, 18, 0, 60, &[4_500, 9_500, 14_500]);
}

#[test]
fn v4l2_cameras_are_simulated_on_the_sim_backend() {
    let mut board = open(&profile(
        "name = \"t\"\nbackend = \"sim\"\n[[cameras]]\nname = \"cam1\"\nkind = \"v4l2\"\ndevice = \"/dev/video0\"\n\
         width = 64\nheight = 48\nfps = 10\n",
    ));
    let frame = board.cameras[0].source.next_frame().unwrap();
    assert_eq!((frame.width, frame.height), (64, 48));
}

#[cfg(not(feature = "linux"))]
#[test]
fn linux_backend_without_the_feature_says_which_feature() {
    let mut linux = sht3x_profile("");
    linux.backend = board::profile::Backend::Linux;
    let error = match Board::open(&linux) {
        Ok(_) => panic!("opened without the feature"),
        Err(error) => error,
    };
    assert!(matches!(error, BoardError::BackendNotBuilt { feature: "linux", .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "board t: backend linux needs cargo feature linux (rebuild with --features linux)"
    );
}

#[cfg(feature = "linux")]
#[test]
fn linux_backend_reports_missing_device_nodes() {
    // No I2C adapter 99 exists on a build or CI machine; the error names the node.
    let mut linux = profile(
        "name = \"t\"\nbackend = \"linux\"\n[[sensors]]\nname = \"env0\"\nkind = \"sht3x\"\nbus = \"i2c-99\"\n\
         address = 0x44\nperiod_ms = 1000\n",
    );
    let error = match Board::open(&linux) {
        Ok(_) => panic!("opened /dev/i2c-99"),
        Err(error) => error,
    };
    assert!(matches!(&error, BoardError::Open { path, .. } if path == "/dev/i2c-99"), "{error}");
    linux.sensors.clear();
    linux.triggers.push(board::profile::TriggerProfile {
        name: "trig".to_string(),
        kind: board::profile::TriggerKind::Gpio,
        chip: "gpiochip99".to_string(),
        line: 1,
        debounce_us: 1000,
        poll_interval_us: 500,
        sim: None,
    });
    let error = match Board::open(&linux) {
        Ok(_) => panic!("opened /dev/gpiochip99"),
        Err(error) => error,
    };
    assert!(matches!(&error, BoardError::Open { path, .. } if path == "/dev/gpiochip99"), "{error}");
}
