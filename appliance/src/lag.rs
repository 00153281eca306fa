//! Uplink lag in time: per lane, how old the oldest record is that the core sink has not yet
//! acked as durable — the data a power cut at the core would find only on this appliance.
//!
//! The ring numbers chunks and stores no clock, so the age comes from the data itself: the
//! timestamp of the first record in the oldest chunk held past the sink's watermark (records
//! within a chunk are in arrival order). This survives restarts of the appliance, unlike send
//! times kept in memory. Finding it costs one ring read and one chunk decompression (≤ 8 MiB,
//! `CHUNK_RAW_BYTES_MAX`), cached per lane until that chunk is acked, so a scrape every few
//! seconds or the demo's live view costs a decompression only when the watermark moved.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use buffer::{ReadLimits, Ring};
use protocol::{ChunkDecompressor, Lane, NO_DICTIONARY, decode_records};

use crate::dictionaries::DictionaryStore;

pub struct LagProbe {
    ring: Ring,
    dictionaries: Arc<DictionaryStore>,
    /// Per lane: the seq of the chunk last looked at and its first record's timestamp.
    oldest: Mutex<[Option<(u64, u64)>; Lane::COUNT]>,
}

impl LagProbe {
    pub fn new(ring: Ring, dictionaries: Arc<DictionaryStore>) -> LagProbe {
        LagProbe { ring, dictionaries, oldest: Mutex::new([None; Lane::COUNT]) }
    }

    /// The age of the oldest unacked record of `lane` at `now`; zero when the sink has acked
    /// everything. A clock set back past the record's timestamp also gives zero.
    pub fn lag(&self, lane: Lane, now: SystemTime) -> Result<Duration, String> {
        let stats = self.ring.stats();
        let lane_stats = stats.lane(lane);
        if lane_stats.acked_through + 1 >= lane_stats.next_seq {
            return Ok(Duration::ZERO);
        }
        let limits = ReadLimits { chunks_max: 1, bytes_max: 1 };
        let chunks = self
            .ring
            .read_from(lane, lane_stats.acked_through + 1, limits)
            .map_err(|error| format!("read the oldest unacked {lane} chunk: {error}"))?;
        // Acked or evicted between the stats and the read: nothing unacked is held any more.
        let Some(chunk) = chunks.into_iter().next() else { return Ok(Duration::ZERO) };
        let cached = self.oldest.lock().expect("lag cache lock")[lane.index()];
        let timestamp_us = match cached {
            Some((seq, timestamp_us)) if seq == chunk.seq => timestamp_us,
            _ => {
                let timestamp_us = self.first_timestamp_us(&chunk)?;
                self.oldest.lock().expect("lag cache lock")[lane.index()] = Some((chunk.seq, timestamp_us));
                timestamp_us
            }
        };
        let now_us = now.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_micros() as u64);
        Ok(Duration::from_micros(now_us.saturating_sub(timestamp_us)))
    }

    fn first_timestamp_us(&self, chunk: &buffer::StoredChunk) -> Result<u64, String> {
        let header = &chunk.header;
        let mut decompressor = ChunkDecompressor::new();
        if header.dict_id != NO_DICTIONARY {
            let dictionary = self.dictionaries.get(header.dict_id).ok_or_else(|| {
                format!(
                    "{} seq {} names dictionary {} this appliance lacks",
                    header.lane, chunk.seq, header.dict_id
                )
            })?;
            decompressor
                .add_dictionary(header.dict_id, &dictionary)
                .map_err(|error| format!("load dictionary {}: {error}", header.dict_id))?;
        }
        let raw = decompressor
            .decompress(header, chunk.body())
            .map_err(|error| format!("decompress {} seq {}: {error}", header.lane, chunk.seq))?;
        let records = decode_records(header, &raw)
            .map_err(|error| format!("decode {} seq {}: {error}", header.lane, chunk.seq))?;
        records
            .first()
            .map(|record| record.timestamp_us)
            .ok_or_else(|| format!("{} seq {} holds no record", header.lane, chunk.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use buffer::RingConfig;
    use protocol::{ChunkBuilder, ChunkCompressor, RecordRef};

    fn append(ring: &Ring, lane: Lane, timestamps_us: &[u64]) -> u64 {
        let mut builder = ChunkBuilder::new(lane, 64 * 1024);
        for (index, timestamp_us) in timestamps_us.iter().enumerate() {
            let key = format!("r{index}");
            let payload = format!("{{\"reading\":{index}}}").repeat(20);
            let record = RecordRef {
                key: &key,
                timestamp_us: *timestamp_us,
                content_type: "application/json",
                payload: payload.as_bytes(),
            };
            builder.push(record).expect("record fits");
        }
        let chunk = builder.seal(&mut ChunkCompressor::new(3), NO_DICTIONARY).expect("seal");
        ring.append(chunk).expect("append")
    }

    #[test]
    fn lag_is_the_age_of_the_first_record_past_the_watermark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = Ring::open(dir.path().join("ring"), RingConfig::with_capacity(8 << 20)).expect("ring");
        let dictionaries = Arc::new(DictionaryStore::open(&dir.path().join("dictionaries")).expect("store"));
        let probe = LagProbe::new(ring.clone(), dictionaries);
        let at = |seconds: u64| UNIX_EPOCH + Duration::from_secs(seconds);
        let check = |lane: Lane, now_s: u64, expected_s: u64| {
            assert_eq!(probe.lag(lane, at(now_s)), Ok(Duration::from_secs(expected_s)), "{lane} at {now_s}");
        };
        check(Lane::Sensor, 1_000, 0);
        let first = append(&ring, Lane::Sensor, &[100_000_000, 101_000_000]);
        let second = append(&ring, Lane::Sensor, &[150_000_000]);
        append(&ring, Lane::Media, &[400_000_000]);
        check(Lane::Sensor, 1_000, 900);
        check(Lane::Sensor, 1_010, 910);
        check(Lane::Media, 1_000, 600);
        check(Lane::Audit, 1_000, 0);
        ring.ack(Lane::Sensor, first).expect("ack");
        check(Lane::Sensor, 1_000, 850);
        ring.ack(Lane::Sensor, second).expect("ack");
        check(Lane::Sensor, 1_000, 0);
        // A clock behind the data gives zero, not a wrapped age.
        check(Lane::Media, 10, 0);
    }
}
