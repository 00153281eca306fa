//! Shared helpers for the integration tests in `tests/`: each test file includes them with
//! `mod support;` and uses the modules it needs.

pub mod harness;
pub mod raw_device;
