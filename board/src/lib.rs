//! Board drivers for Tributary appliances: sensors read through embedded-hal 1.0 traits.
//!
//! Every driver is generic over the embedded-hal 1.0 bus traits (`I2c`, `SpiDevice`, `InputPin`,
//! `DelayNs`), keeps the bus error inside its own `Error<BusError>`, does no heap allocation, reads
//! no clock of its own, and hands the bus back through `destroy()` (after eldruin's drivers).
//!
//! Modules:
//! - `sht3x`: temperature and relative humidity over I2C (SHT3x command set, CRC-8 checked).
//! - `accelerometer`: 3-axis accelerometer over SPI (ADXL345 register map), milli-g per axis.
//! - `trigger`: debounced rising-edge timestamps from a polled GPIO input and a caller's clock.
//! - `sim`: simulated devices that answer the same bus bytes, so the same driver code runs in
//!   tests and on machines without the hardware; seeded noise and injectable or random faults.
//! - `camera`: the `FrameSource` trait, `Frame` (one JPEG) and `SimCamera`, which renders a
//!   moving scene and encodes real JPEG frames (identical frames while the scene holds still).
//! - `device`: the uniform `Sensor` trait (`read() -> Reading` of named values with units),
//!   `SensorError` with a countable `kind()`, and the `TriggerInput` trait, with adapters from
//!   the drivers above.
//! - `profile`: TOML board profiles (which device on which bus and address), strictly checked.
//! - `board`: `Board::open(&Profile)` opens every device as boxed trait objects, from the
//!   simulator (backend `sim`) or real buses (backend `linux`).
//! - `linux` (cargo feature `linux`): `/dev/i2c-N`, `/dev/spidevB.C` and GPIO character devices
//!   through linux-embedded-hal. Compile-tested only.
//! - `v4l2` (cargo feature `v4l2`): MJPEG capture from `/dev/videoN` through raw ioctls.
//!   Compile-tested only.
//!
//! Invariant: the default build has no OS-specific dependency and the crate reads no clock;
//! timestamps come from the caller (`TriggerInput::poll(now_us)`), from a simulated frame
//! counter, or from the V4L2 driver. Out of scope for now: the systemd watchdog.

pub mod accelerometer;
pub mod board;
pub mod camera;
pub mod device;
#[cfg(all(feature = "linux", target_os = "linux"))]
pub mod linux;
pub mod profile;
pub mod sht3x;
pub mod sim;
pub mod trigger;
#[cfg(all(feature = "v4l2", target_os = "linux"))]
pub mod v4l2;
