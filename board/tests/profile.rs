//! Board profile parsing: the shipped examples load, and every bad value names file and key.

use std::path::{Path, PathBuf};

use board::profile::{Backend, Bus, CameraKind, Profile, ProfileError, SensorKind};

fn profiles_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles")
}

const VALID: &str = r#"
name = "t"
backend = "sim"

[[sensors]]
name = "env0"
kind = "sht3x"
bus = "i2c-1"
address = 0x44
period_ms = 1000

[[sensors]]
name = "accel0"
kind = "adxl345"
bus = "spi-0.0"
period_ms = 10
[sensors.sim]
seed = 3

[[triggers]]
name = "trig"
kind = "gpio"
chip = "gpiochip0"
line = 17
debounce_us = 2000
poll_interval_us = 500

[[cameras]]
name = "cam0"
kind = "sim"
width = 320
height = 240
fps = 5
"#;

#[test]
fn shipped_profiles_load() {
    let sim = Profile::load(&profiles_dir().join("sim-devkit.toml")).unwrap();
    assert_eq!((sim.name.as_str(), sim.backend), ("sim-devkit", Backend::Sim));
    assert_eq!(
        sim.sensors.iter().map(|sensor| sensor.kind).collect::<Vec<_>>(),
        [SensorKind::Sht3x, SensorKind::Adxl345]
    );
    assert_eq!((sim.triggers.len(), sim.cameras.len()), (1, 1));
    let linux = Profile::load(&profiles_dir().join("linux-rpi.toml")).unwrap();
    assert_eq!(linux.backend, Backend::Linux);
    assert_eq!(linux.cameras[0].kind, CameraKind::V4l2);
    assert_eq!(linux.cameras[0].device.as_deref(), Some("/dev/video0"));
}

#[test]
fn missing_file_names_the_path() {
    let error = Profile::load(Path::new("/nonexistent/board.toml")).unwrap_err();
    assert!(matches!(error, ProfileError::Read { .. }));
    assert!(error.to_string().starts_with("/nonexistent/board.toml: cannot read board profile"), "{error}");
}

/// Replaces the first occurrence of `from` in `VALID` (which must exist) by `to`, parses the
/// result as `bad.toml`, and expects an error at `key` whose message contains `message`.
fn check(from: &str, to: &str, key: &str, message: &str) {
    assert!(VALID.contains(from), "{from:?} not in the valid profile");
    let text = VALID.replacen(from, to, 1);
    let error = match Profile::parse(&text, Path::new("bad.toml")) {
        Ok(_) => panic!("{from:?} -> {to:?} parsed"),
        Err(error) => error,
    };
    let shown = error.to_string();
    assert_eq!(error.key(), Some(key), "{from:?} -> {to:?}: {shown}");
    assert!(shown.starts_with(&format!("bad.toml: {key}: ")), "{shown}");
    assert!(shown.contains(message), "{from:?} -> {to:?}: {shown:?} lacks {message:?}");
}

#[test]
fn valid_profile_parses() {
    let profile = Profile::parse(VALID, Path::new("ok.toml")).unwrap();
    assert_eq!(profile.sensors[0].address, Some(0x44));
    assert_eq!(profile.sensors[1].sim.as_ref().and_then(|sim| sim.seed), Some(3));
}

#[test]
fn syntax_and_type_errors_name_the_key() {
    // Unknown keys, at the top, in an array-of-tables entry, and in a sub-table.
    check("backend = \"sim\"", "backend = \"sim\"\ncolour = 1", "colour", "unknown field `colour`");
    check("period_ms = 10\n", "period_ms = 10\nspeed = 1\n", "sensors[1].speed", "unknown field `speed`");
    check("seed = 3", "seed = 3\nsead = 4", "sensors[1].sim.sead", "unknown field `sead`");
    check("fps = 5", "fps = 5\nzoom = 2", "cameras[0].zoom", "unknown field `zoom`");
    check("[sensors.sim]\nseed = 3", "sim = { seed = \"x\" }", "sensors[1].sim.seed", "invalid type");
    check(
        "[sensors.sim]\nseed = 3",
        "sim = { seed = 3, sead = 4 }",
        "sensors[1].sim.sead",
        "unknown field `sead`",
    );
    // Wrong types.
    check("address = 0x44", "address = \"0x44\"", "sensors[0].address", "invalid type");
    check("line = 17", "line = \"17\"", "triggers[0].line", "invalid type");
    check("width = 320", "width = 3.5", "cameras[0].width", "invalid type");
    // Out of the type's range.
    check("address = 0x44", "address = 0x144", "sensors[0].address", "u8");
    check("width = 320", "width = 70000", "cameras[0].width", "u16");
    // Unknown kinds and backends.
    check("kind = \"sht3x\"", "kind = \"bme280\"", "sensors[0].kind", "unknown variant `bme280`");
    check("backend = \"sim\"", "backend = \"rtos\"", "backend", "unknown variant `rtos`");
    check("kind = \"gpio\"", "kind = \"uart\"", "triggers[0].kind", "unknown variant `uart`");
    check("kind = \"sim\"", "kind = \"usb\"", "cameras[0].kind", "unknown variant `usb`");
    // Missing keys.
    check("period_ms = 1000\n", "", "sensors[0].period_ms", "missing field `period_ms`");
}

#[test]
fn bad_values_name_the_key() {
    check("address = 0x44", "address = 0x46", "sensors[0].address", "0x46 is not an SHT3x address");
    check("address = 0x44\n", "", "sensors[0].address", "required for kind sht3x");
    check("bus = \"i2c-1\"", "bus = \"i2c-one\"", "sensors[0].bus", "neither");
    check("bus = \"i2c-1\"", "bus = \"spi-0.1\"", "sensors[0].bus", "sht3x sits on an I2C bus");
    check("bus = \"spi-0.0\"", "bus = \"i2c-2\"", "sensors[1].bus", "adxl345 sits on an SPI bus");
    check("period_ms = 1000", "period_ms = 0", "sensors[0].period_ms", "0 outside 1..=3600000");
    check(
        "period_ms = 10\n",
        "period_ms = 10\naddress = 0x53\n",
        "sensors[1].address",
        "not used by kind adxl345",
    );
    check(
        "period_ms = 10\n",
        "period_ms = 10\nrange_g = 3\n",
        "sensors[1].range_g",
        "3 is not one of 2, 4, 8, 16",
    );
    check("period_ms = 10\n", "period_ms = 10\nrate_hz = 99\n", "sensors[1].rate_hz", "99 is not one of");
    check(
        "period_ms = 10\n",
        "period_ms = 10\nspi_speed_hz = 9000000\n",
        "sensors[1].spi_speed_hz",
        "outside",
    );
    check(
        "period_ms = 1000",
        "period_ms = 1000\nrange_g = 4",
        "sensors[0].range_g",
        "not used by kind sht3x",
    );
    check("seed = 3", "seed = 3\nfault_rate = 1.5", "sensors[1].sim.fault_rate", "1.5 outside 0..=1");
    check(
        "seed = 3",
        "seed = 3\nfaults = [\"crc\"]",
        "sensors[1].sim.faults",
        "not supported by kind adxl345",
    );
    check("seed = 3", "seed = 3\nfaults = [\"jam\"]", "sensors[1].sim.faults", "unknown variant `jam`");
    check("seed = 3", "seed = 3\ntemperature_c = 20.0", "sensors[1].sim.temperature_c", "not used by kind");
    check("name = \"accel0\"", "name = \"env0\"", "sensors[1].name", "already used by sensors[0].name");
    check("name = \"cam0\"", "name = \"trig\"", "cameras[0].name", "already used by triggers[0].name");
    check("name = \"env0\"", "name = \"env 0\"", "sensors[0].name", "may hold only");
    check("name = \"t\"", "name = \"\"", "name", "1..=64 bytes");
    check("line = 17", "line = 5000", "triggers[0].line", "5000 above 1023");
    check("debounce_us = 2000", "debounce_us = 2000000", "triggers[0].debounce_us", "above 1000000");
    check(
        "poll_interval_us = 500",
        "poll_interval_us = 5000",
        "triggers[0].poll_interval_us",
        "above debounce_us",
    );
    check("chip = \"gpiochip0\"", "chip = \"/dev/gpiochip0\"", "triggers[0].chip", "not a GPIO chip name");
    check("width = 320", "width = 0", "cameras[0].width", "0 outside 1..=1920");
    check("height = 240", "height = 2000", "cameras[0].height", "2000 outside 1..=1080");
    check("fps = 5", "fps = 500", "cameras[0].fps", "fps 500 outside 1..=120");
    check("fps = 5", "fps = 5\ndevice = \"/dev/video0\"", "cameras[0].device", "not used by kind sim");
    check("kind = \"sim\"", "kind = \"v4l2\"", "cameras[0].device", "required for kind v4l2");
    check("fps = 5", "fps = 5\n[cameras.sim]\nquality = 0", "cameras[0].sim.quality", "quality 0 outside");
}

#[test]
fn second_device_on_the_same_address_is_rejected() {
    let text = VALID.replacen(
        "[[sensors]]\nname = \"accel0\"",
        "[[sensors]]\nname = \"env1\"\nkind = \"sht3x\"\nbus = \"i2c-1\"\naddress = 0x44\nperiod_ms = 5\n\n[[sensors]]\nname = \"accel0\"",
        1,
    );
    let error = Profile::parse(&text, Path::new("bad.toml")).unwrap_err();
    assert_eq!(error.key(), Some("sensors[1].address"), "{error}");
    assert!(error.to_string().contains("address 0x44 on i2c-1 already used by env0"), "{error}");
}

#[test]
fn bus_names_parse() {
    let check = |text: &str, expected: Option<Bus>| assert_eq!(Bus::parse(text), expected, "{text}");
    check("i2c-1", Some(Bus::I2c { number: 1 }));
    check("i2c-12", Some(Bus::I2c { number: 12 }));
    check("spi-0.0", Some(Bus::Spi { bus: 0, chip_select: 0 }));
    check("spi-1.2", Some(Bus::Spi { bus: 1, chip_select: 2 }));
    check("i2c-", None);
    check("i2c-+1", None);
    check("i2c-99999", None);
    check("spi-0", None);
    check("spi-0.", None);
    check("uart-0", None);
    assert_eq!(Bus::I2c { number: 1 }.device_path(), "/dev/i2c-1");
    assert_eq!(Bus::Spi { bus: 0, chip_select: 1 }.device_path(), "/dev/spidev0.1");
}
