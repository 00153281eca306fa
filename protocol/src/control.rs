//! Control messages: the handshake, acknowledgements and errors on the control stream.
//!
//! Encoding: [postcard](https://postcard.jamesmunns.com) of [`ControlMessage`], one message per
//! control frame. postcard writes an enum as its variant index (a varint), `u8` (lane and codec
//! ids) as one byte, `u16`/`u32`/`u64` as varints, strings and lists as a varint length then
//! their items, and `[u8; 16]` as 16 bytes.
//!
//! Version 2 added `Hello.ring_id` (after `boot_id`); a version-1 peer is refused.
//!
//! | variant index | message | direction |
//! | --- | --- | --- |
//! | 0 | `Hello` | appliance → sink, first message |
//! | 1 | `Welcome` | sink → appliance, answer to `Hello` |
//! | 2 | `Ack` | sink → appliance, whenever a commit point lands |
//! | 3 | `Error` | either way, before closing |
//!
//! Versioning: `Hello` and `Welcome` carry `protocol_version` as their first field and keep
//! variant indexes 0 and 1 in every future version, so [`decode_control`] reads the version
//! before the rest of the message and refuses any version but [`crate::PROTOCOL_VERSION`] with
//! [`DecodeError::UnsupportedVersion`] even when a later version changed the rest of the layout.
//!
//! Limits, checked on encode and on decode:
//!
//! | bound | value |
//! | --- | --- |
//! | encoded message | [`CONTROL_MESSAGE_BYTES_MAX`] = 2 048 bytes |
//! | `Hello.device_id` | 1..=[`DEVICE_ID_BYTES_MAX`] = 128 bytes |
//! | each list (`lanes`, `codecs`, `dictionary_ids`, `resume`) | ≤ [`CONTROL_LIST_ITEMS_MAX`] = 64 items |
//! | `ErrorMessage.reason` | ≤ [`ERROR_REASON_BYTES_MAX`] = 1 024 bytes |
//! | `SessionLimits.frame_bytes_max` | 2 049 ..= [`FRAME_BYTES_MAX`] = 4 194 345 |
//! | `LaneResume.resume_seq` | ≥ 1 (sequence numbers start at 1) |
//!
//! Decoding allocates at most what the input holds (postcard borrows, serde caps list
//! preallocation), and the input is refused past `CONTROL_MESSAGE_BYTES_MAX` before parsing.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;
use crate::codec::Codec;
use crate::error::{ControlViolation, DecodeError, EncodeError};
use crate::frame::FRAME_BYTES_MAX;
use crate::lane::Lane;

/// Longest device id (the certificate subject), in bytes.
pub const DEVICE_ID_BYTES_MAX: usize = 128;
/// Most items in any list of a control message.
pub const CONTROL_LIST_ITEMS_MAX: usize = 64;
/// Longest human-readable reason in an [`ErrorMessage`], in bytes.
pub const ERROR_REASON_BYTES_MAX: usize = 1024;
/// Most bytes of an encoded control message: a round number above the largest message the
/// bounds above allow (asserted below), so a peer cannot make us parse megabytes of "control".
pub const CONTROL_MESSAGE_BYTES_MAX: usize = 2048;

/// Bytes postcard spends on `value` as a varint (7 bits per byte).
const fn varint_len(value: u64) -> usize {
    let mut length = 1;
    let mut rest = value >> 7;
    while rest != 0 {
        length += 1;
        rest >>= 7;
    }
    length
}

const VARIANT_TAG_BYTES: usize = 1;
const U16_VARINT_BYTES_MAX: usize = varint_len(u16::MAX as u64);
const U32_VARINT_BYTES_MAX: usize = varint_len(u32::MAX as u64);
const U64_VARINT_BYTES_MAX: usize = varint_len(u64::MAX);
const LIST_LENGTH_BYTES_MAX: usize = varint_len(CONTROL_LIST_ITEMS_MAX as u64);

const HELLO_BYTES_MAX: usize = VARIANT_TAG_BYTES
    + U16_VARINT_BYTES_MAX
    + varint_len(DEVICE_ID_BYTES_MAX as u64)
    + DEVICE_ID_BYTES_MAX
    + 16 // boot_id
    + 16 // ring_id
    + (LIST_LENGTH_BYTES_MAX + CONTROL_LIST_ITEMS_MAX) // lanes, one byte each
    + (LIST_LENGTH_BYTES_MAX + CONTROL_LIST_ITEMS_MAX) // codecs, one byte each
    + (LIST_LENGTH_BYTES_MAX + CONTROL_LIST_ITEMS_MAX * (1 + U32_VARINT_BYTES_MAX));
const WELCOME_BYTES_MAX: usize = VARIANT_TAG_BYTES
    + U16_VARINT_BYTES_MAX
    + (LIST_LENGTH_BYTES_MAX + CONTROL_LIST_ITEMS_MAX * (1 + U64_VARINT_BYTES_MAX))
    + U32_VARINT_BYTES_MAX
    + U64_VARINT_BYTES_MAX
    + U32_VARINT_BYTES_MAX;
const ACK_BYTES_MAX: usize = VARIANT_TAG_BYTES + 1 + U64_VARINT_BYTES_MAX;
const ERROR_BYTES_MAX: usize = VARIANT_TAG_BYTES
    + U16_VARINT_BYTES_MAX
    + varint_len(ERROR_REASON_BYTES_MAX as u64)
    + ERROR_REASON_BYTES_MAX;

const _: () = assert!(CONTROL_MESSAGE_BYTES_MAX >= HELLO_BYTES_MAX);
const _: () = assert!(CONTROL_MESSAGE_BYTES_MAX >= WELCOME_BYTES_MAX);
const _: () = assert!(CONTROL_MESSAGE_BYTES_MAX >= ACK_BYTES_MAX);
const _: () = assert!(CONTROL_MESSAGE_BYTES_MAX >= ERROR_BYTES_MAX);
const _: () = assert!(CONTROL_LIST_ITEMS_MAX >= Lane::COUNT);
// A session must be able to carry every control message in one frame.
const FRAME_BYTES_MIN: usize = 1 + CONTROL_MESSAGE_BYTES_MAX;
const _: () = assert!(FRAME_BYTES_MIN <= FRAME_BYTES_MAX);
const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);

/// Every message on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    Hello(Hello),
    Welcome(Welcome),
    Ack(Ack),
    Error(ErrorMessage),
}

/// The appliance's first message: who it is and what it can send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must stay the first field (see the module doc on versioning).
    pub protocol_version: u16,
    /// The device id; the sink checks it against the client certificate's subject.
    pub device_id: String,
    /// Random per boot, so the sink can tell a reconnect from a reboot in its logs.
    pub boot_id: [u8; 16],
    /// The identity of the appliance's ring: random, made when the ring is created and kept for
    /// its life. Seqs are numbered per ring, so a ring the sink has not seen before (recreated,
    /// reformatted, quarantined) starts a new seq epoch at the sink instead of being taken for a
    /// resend of seqs the sink already holds.
    pub ring_id: [u8; 16],
    /// Lanes this appliance will open streams for.
    pub lanes: Vec<Lane>,
    /// Codecs its chunks may use.
    pub codecs: Vec<Codec>,
    /// The dictionary each lane compresses with, so the sink can refuse early if it lacks one.
    pub dictionary_ids: Vec<LaneDictionary>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneDictionary {
    pub lane: Lane,
    pub dict_id: u32,
}

/// The sink's answer to `Hello`: where to resume each lane, and the session's limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Must stay the first field (see the module doc on versioning).
    pub protocol_version: u16,
    pub resume: Vec<LaneResume>,
    pub limits: SessionLimits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneResume {
    pub lane: Lane,
    /// First seq the sink wants (= durable watermark + 1). Chunks below it are already durable
    /// at the core and the appliance may trim them.
    pub resume_seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionLimits {
    /// Largest frame (kind byte + payload) the sink accepts on this session.
    pub frame_bytes_max: u32,
    /// Most unacknowledged chunk bytes the appliance may have in flight.
    pub in_flight_bytes_max: u64,
    /// How often the sink lands a commit point, so the appliance can size its expectations.
    pub commit_interval_ms: u32,
}

/// Everything up to and including `durable_through` on `lane` is durable at the core; the
/// appliance may delete it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub lane: Lane,
    pub durable_through: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    /// For humans: what failed and what to do next. At most [`ERROR_REASON_BYTES_MAX`] bytes.
    pub reason: String,
}

/// Why a peer is closing the session. The discriminant is the wire id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    UnsupportedVersion = 1,
    BadFrame = 2,
    BadChunk = 3,
    Unauthorized = 4,
    DeviceMismatch = 5,
    LimitExceeded = 6,
    Internal = 7,
    ShuttingDown = 8,
}

impl ErrorCode {
    /// Every code, in id order.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::UnsupportedVersion,
        ErrorCode::BadFrame,
        ErrorCode::BadChunk,
        ErrorCode::Unauthorized,
        ErrorCode::DeviceMismatch,
        ErrorCode::LimitExceeded,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
    ];

    pub fn id(self) -> u16 {
        self as u16
    }

    /// The code with wire id `id`, or [`DecodeError::UnknownErrorCode`].
    pub fn from_id(id: u16) -> Result<ErrorCode, DecodeError> {
        ErrorCode::ALL.into_iter().find(|code| code.id() == id).ok_or(DecodeError::UnknownErrorCode(id))
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::BadChunk => "bad_chunk",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::DeviceMismatch => "device_mismatch",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }
}

serde_as_wire_id!(ErrorCode, u16, serialize_u16);

impl fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

fn check_bytes(field: &'static str, text: &str, max: usize) -> Result<(), ControlViolation> {
    if text.len() > max {
        return Err(ControlViolation::TooManyBytes { field, length: text.len(), max });
    }
    Ok(())
}

fn check_items<T>(field: &'static str, items: &[T]) -> Result<(), ControlViolation> {
    if items.len() > CONTROL_LIST_ITEMS_MAX {
        return Err(ControlViolation::TooManyItems {
            field,
            count: items.len(),
            max: CONTROL_LIST_ITEMS_MAX,
        });
    }
    Ok(())
}

fn check_range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ControlViolation> {
    if !(min..=max).contains(&value) {
        return Err(ControlViolation::OutOfRange { field, value, min, max });
    }
    Ok(())
}

impl ControlMessage {
    /// Checks the message's bounds (see the module doc). [`encode_control`] and
    /// [`decode_control`] both call it, so nothing out of bounds is sent or accepted.
    pub fn validate(&self) -> Result<(), ControlViolation> {
        match self {
            ControlMessage::Hello(hello) => {
                if hello.device_id.is_empty() {
                    return Err(ControlViolation::Empty { field: "hello.device_id" });
                }
                check_bytes("hello.device_id", &hello.device_id, DEVICE_ID_BYTES_MAX)?;
                check_items("hello.lanes", &hello.lanes)?;
                check_items("hello.codecs", &hello.codecs)?;
                check_items("hello.dictionary_ids", &hello.dictionary_ids)
            }
            ControlMessage::Welcome(welcome) => {
                check_items("welcome.resume", &welcome.resume)?;
                for resume in &welcome.resume {
                    check_range("welcome.resume.resume_seq", resume.resume_seq, 1, u64::MAX)?;
                }
                check_range(
                    "welcome.limits.frame_bytes_max",
                    u64::from(welcome.limits.frame_bytes_max),
                    FRAME_BYTES_MIN as u64,
                    FRAME_BYTES_MAX as u64,
                )
            }
            ControlMessage::Ack(_) => Ok(()),
            ControlMessage::Error(error) => {
                check_bytes("error.reason", &error.reason, ERROR_REASON_BYTES_MAX)
            }
        }
    }
}

/// Serializes a control message after checking its bounds.
pub fn encode_control(message: &ControlMessage) -> Result<Vec<u8>, EncodeError> {
    message.validate()?;
    let bytes = postcard::to_allocvec(message)
        .map_err(|error| EncodeError::ControlSerialize { reason: error.to_string() })?;
    assert!(
        bytes.len() <= CONTROL_MESSAGE_BYTES_MAX,
        "a validated control message encoded to {} bytes, above {CONTROL_MESSAGE_BYTES_MAX}",
        bytes.len()
    );
    Ok(bytes)
}

/// Parses one control message: rejects input over [`CONTROL_MESSAGE_BYTES_MAX`], trailing
/// bytes, out-of-bounds fields, unknown ids, and a `Hello`/`Welcome` whose protocol_version is
/// not [`PROTOCOL_VERSION`] ([`DecodeError::UnsupportedVersion`]).
pub fn decode_control(bytes: &[u8]) -> Result<ControlMessage, DecodeError> {
    if bytes.len() > CONTROL_MESSAGE_BYTES_MAX {
        return Err(DecodeError::ControlTooLarge { length: bytes.len(), max: CONTROL_MESSAGE_BYTES_MAX });
    }
    check_version(bytes)?;
    let (message, rest) = postcard::take_from_bytes::<ControlMessage>(bytes).map_err(malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::ControlTrailingBytes { count: rest.len() });
    }
    message.validate()?;
    Ok(message)
}

const HELLO_VARIANT_INDEX: u32 = 0;
const WELCOME_VARIANT_INDEX: u32 = 1;

/// Reads the version of a `Hello` or `Welcome` before anything else, so a peer speaking another
/// version gets "unsupported version", not whatever error its unfamiliar layout would cause.
fn check_version(bytes: &[u8]) -> Result<(), DecodeError> {
    let Ok((variant_index, rest)) = postcard::take_from_bytes::<u32>(bytes) else {
        // Not even a variant index: let the full decode report it.
        return Ok(());
    };
    if variant_index != HELLO_VARIANT_INDEX && variant_index != WELCOME_VARIANT_INDEX {
        return Ok(());
    }
    let Ok((found, _)) = postcard::take_from_bytes::<u16>(rest) else {
        return Ok(());
    };
    if found != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found, supported: PROTOCOL_VERSION });
    }
    Ok(())
}

fn malformed(error: postcard::Error) -> DecodeError {
    let reason = match error {
        // Our own deserializers (lane, codec, error code) and serde's enum visitor report
        // through serde's custom error, whose message postcard drops; name the likely causes.
        postcard::Error::SerdeDeCustom => "unknown message kind, lane id, codec id or error code".to_owned(),
        other => other.to_string(),
    };
    DecodeError::ControlMalformed { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn largest_messages() -> Vec<ControlMessage> {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            device_id: "d".repeat(DEVICE_ID_BYTES_MAX),
            boot_id: [0xff; 16],
            ring_id: [0xee; 16],
            lanes: vec![Lane::Media; CONTROL_LIST_ITEMS_MAX],
            codecs: vec![Codec::Zstd; CONTROL_LIST_ITEMS_MAX],
            dictionary_ids: vec![
                LaneDictionary { lane: Lane::Media, dict_id: u32::MAX };
                CONTROL_LIST_ITEMS_MAX
            ],
        };
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            resume: vec![LaneResume { lane: Lane::Media, resume_seq: u64::MAX }; CONTROL_LIST_ITEMS_MAX],
            limits: SessionLimits {
                frame_bytes_max: FRAME_BYTES_MAX as u32,
                in_flight_bytes_max: u64::MAX,
                commit_interval_ms: u32::MAX,
            },
        };
        vec![
            ControlMessage::Hello(hello),
            ControlMessage::Welcome(welcome),
            ControlMessage::Ack(Ack { lane: Lane::Media, durable_through: u64::MAX }),
            ControlMessage::Error(ErrorMessage {
                code: ErrorCode::ShuttingDown,
                reason: "r".repeat(ERROR_REASON_BYTES_MAX),
            }),
        ]
    }

    #[test]
    fn the_largest_messages_fit_within_the_computed_bounds() {
        let bounds = [HELLO_BYTES_MAX, WELCOME_BYTES_MAX, ACK_BYTES_MAX, ERROR_BYTES_MAX];
        for (message, bound) in largest_messages().into_iter().zip(bounds) {
            let bytes = encode_control(&message).expect("within bounds");
            // The bounds assume the widest varints; real versions and codes are narrower.
            assert!(bytes.len() <= bound, "{} > {bound}", bytes.len());
            assert!(bytes.len() + 4 >= bound, "{} far below {bound}", bytes.len());
            assert_eq!(decode_control(&bytes), Ok(message));
        }
    }

    #[test]
    fn error_codes_round_trip_and_unknown_is_rejected() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_id(code.id()), Ok(code));
        }
        assert_eq!(ErrorCode::from_id(0), Err(DecodeError::UnknownErrorCode(0)));
        assert_eq!(ErrorCode::from_id(9), Err(DecodeError::UnknownErrorCode(9)));
    }
}
