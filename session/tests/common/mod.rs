//! Helpers shared by the session tests: frames and control messages as a peer puts them on a
//! stream.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use protocol::{
    Codec, ControlMessage, FrameKind, Hello, Lane, PROTOCOL_VERSION, encode_control, encode_frame,
};

/// `payload` framed as `kind`.
pub fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(kind, payload, &mut out).expect("test frames fit");
    out
}

/// `message` as a control frame.
pub fn control(message: &ControlMessage) -> Vec<u8> {
    frame(FrameKind::Control, &encode_control(message).expect("encodes"))
}

/// A Hello from `device` (boot id `[1; 16]`, ring id `[2; 16]`) offering every lane and codec and
/// no dictionary.
pub fn hello(device: &str) -> ControlMessage {
    ControlMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        device_id: device.into(),
        boot_id: [1; 16],
        ring_id: [2; 16],
        lanes: Lane::ALL.to_vec(),
        codecs: Codec::ALL.to_vec(),
        dictionary_ids: Vec::new(),
    })
}
