//! Decision evidence and model records as they arrive in the audit and decisions lanes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::evidence::{Evidence, ModelRecord};

fuzz_target!(|bytes: &[u8]| {
    let _ = Evidence::decode(bytes);
    let _ = ModelRecord::decode(bytes);
});
