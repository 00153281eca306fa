//! Lanes: the four streams of data an appliance sends, each with its own sequence numbers, ring
//! reservation, eviction policy and uplink stream.
//!
//! On the wire a lane is its one-byte id. The ids are stable forever (a new lane gets a new id,
//! an old id is never reused); an unknown id is an error, never mapped to a default lane.
//!
//! | id | name | priority | carries |
//! | --- | --- | --- | --- |
//! | 0 | `audit` | 1 (highest) | decisions' original inputs, never evicted while unacked |
//! | 1 | `decisions` | 2 | inference decisions |
//! | 2 | `sensor` | 3 | sensor series |
//! | 3 | `media` | 4 (lowest) | camera frames and other large blobs |

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::error::DecodeError;

/// One of the four data streams. The discriminant is the wire id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Lane {
    Audit = 0,
    Decisions = 1,
    Sensor = 2,
    Media = 3,
}

impl Lane {
    /// How many lanes exist; ids are `0..COUNT`.
    pub const COUNT: usize = 4;

    /// Every lane in priority order, highest first. Priority order and id order are the same
    /// on purpose, so `Ord` on `Lane` is priority order too.
    pub const ALL: [Lane; Lane::COUNT] = [Lane::Audit, Lane::Decisions, Lane::Sensor, Lane::Media];

    /// The lane's stable wire id.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The lane with wire id `id`, or [`DecodeError::UnknownLane`].
    pub fn from_id(id: u8) -> Result<Lane, DecodeError> {
        Lane::ALL.get(usize::from(id)).copied().ok_or(DecodeError::UnknownLane(id))
    }

    /// The lane's name in configuration, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Audit => "audit",
            Lane::Decisions => "decisions",
            Lane::Sensor => "sensor",
            Lane::Media => "media",
        }
    }

    /// The lane's index into per-lane arrays of length [`Lane::COUNT`]; equal to its id.
    pub fn index(self) -> usize {
        usize::from(self.id())
    }
}

// `ALL` is indexed by id in `from_id`; this keeps the two in step.
const _: () = {
    let mut index = 0;
    while index < Lane::COUNT {
        assert!(Lane::ALL[index] as usize == index);
        index += 1;
    }
};

serde_as_wire_id!(Lane, u8, serialize_u8);

impl fmt::Display for Lane {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A lane name in configuration or on a command line that is not one of the four.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("unknown lane {value:?} (accepted: audit, decisions, sensor, media)")]
pub struct ParseLaneError {
    /// The rejected text, cut to at most [`crate::ERROR_ECHO_BYTES_MAX`] bytes.
    pub value: String,
}

impl FromStr for Lane {
    type Err = ParseLaneError;

    fn from_str(text: &str) -> Result<Lane, ParseLaneError> {
        Lane::ALL
            .into_iter()
            .find(|lane| lane.name() == text)
            .ok_or_else(|| ParseLaneError { value: crate::error::echo(text) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_indexes_agree() {
        for (index, lane) in Lane::ALL.into_iter().enumerate() {
            assert_eq!(lane.index(), index);
            assert_eq!(Lane::from_id(lane.id()), Ok(lane));
            assert_eq!(lane.name().parse::<Lane>(), Ok(lane));
            assert_eq!(lane.to_string(), lane.name());
        }
    }

    #[test]
    fn unknown_id_and_name_are_rejected_with_the_value() {
        for id in 4..=u8::MAX {
            assert_eq!(Lane::from_id(id), Err(DecodeError::UnknownLane(id)));
        }
        assert_eq!(
            DecodeError::UnknownLane(7).to_string(),
            "unknown lane id 7 (known: 0 audit, 1 decisions, 2 sensor, 3 media)"
        );
        let error = "Audit".parse::<Lane>().unwrap_err();
        assert_eq!(error.to_string(), "unknown lane \"Audit\" (accepted: audit, decisions, sensor, media)");
    }

    #[test]
    fn priority_order_is_id_order() {
        let mut sorted = Lane::ALL;
        sorted.sort();
        assert_eq!(sorted, Lane::ALL);
        assert_eq!(Lane::ALL[0], Lane::Audit);
        assert_eq!(Lane::ALL[Lane::COUNT - 1], Lane::Media);
    }

    #[test]
    fn serde_uses_the_one_byte_id() {
        for lane in Lane::ALL {
            let bytes = postcard::to_allocvec(&lane).expect("a lane serializes");
            assert_eq!(bytes, [lane.id()]);
            assert_eq!(postcard::from_bytes::<Lane>(&bytes), Ok(lane));
        }
        assert!(postcard::from_bytes::<Lane>(&[4]).is_err());
    }
}
