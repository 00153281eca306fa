//! Control messages (Hello, Welcome, Ack, Error): whatever decodes re-encodes to a message that
//! decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{decode_control, encode_control};

fuzz_target!(|bytes: &[u8]| {
    let Ok(message) = decode_control(bytes) else { return };
    let encoded = encode_control(&message).expect("a decoded message encodes");
    let again = decode_control(&encoded).expect("an encoded message decodes");
    assert_eq!(format!("{message:?}"), format!("{again:?}"));
});
