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
//!   tests and on machines without the hardware.
//!
//! Out of scope for now: a `linux` backend (linux-embedded-hal over `/dev/i2c-*`, `/dev/spidev*`,
//! GPIO character devices, systemd watchdog), the camera frame source trait and the watchdog.
//! On Linux a caller can already pass any embedded-hal 1.0 implementation to these drivers.

pub mod accelerometer;
pub mod sht3x;
pub mod sim;
pub mod trigger;
