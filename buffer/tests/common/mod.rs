//! Helpers shared by the ring's integration tests.
#![allow(dead_code)]

use buffer::{Ring, RingConfig};
use protocol::{Codec, Lane, SealedChunk};

/// splitmix64: a tiny deterministic generator so tests can regenerate any chunk's bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// Log-uniform size in `low..=high`, so small and large chunks both occur often.
    pub fn size_between(&mut self, low: usize, high: usize) -> usize {
        let (low_log, high_log) = ((low as f64).ln(), (high as f64).ln());
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((low_log + unit * (high_log - low_log)).exp() as usize).clamp(low, high)
    }
}

/// Deterministic body bytes for (lane, tag, len): any test can check a chunk byte for byte.
pub fn body_bytes(lane: Lane, tag: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(tag.wrapping_mul(31).wrapping_add(lane.id() as u64 + 1));
    let mut body = Vec::with_capacity(len + 8);
    while body.len() < len {
        body.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    body.truncate(len);
    body
}

/// A raw-codec chunk whose body is `body_bytes(lane, tag, len)`. The ring does not look inside
/// bodies, so one "record" of arbitrary bytes is enough here.
pub fn chunk(lane: Lane, tag: u64, len: usize) -> SealedChunk {
    SealedChunk::new(lane, Codec::Raw, 0, 1, len as u32, body_bytes(lane, tag, len)).expect("valid chunk")
}

pub fn open(path: &std::path::Path, config: RingConfig) -> Ring {
    Ring::open(path, config).unwrap_or_else(|error| panic!("open {}: {error}", path.display()))
}

pub const MIB: u64 = 1024 * 1024;
