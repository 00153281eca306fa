//! Soak: write many times the capacity with mixed chunk sizes (1 KiB – 1 MiB) under
//! `drop_oldest`, the case where LMDB's free list fragments with large values. The file must stay
//! within capacity + 15 % and every append must succeed (eviction, never MAP_FULL errors).
//! Append rates over the run are reported by `tributary bench buffer`, not asserted here.
//!
//! `TRIBUTARY_SOAK_FACTOR` sets how many capacities to write (default 10; CI runs the default).

mod common;

use buffer::{Durability, MAP_HEADROOM_PERCENT, ReadLimits, RingConfig};
use common::{MIB, Rng, chunk, open};
use protocol::Lane;

#[test]
fn ten_capacities_of_mixed_sizes_stay_within_the_file_bound() {
    let factor: u64 = std::env::var("TRIBUTARY_SOAK_FACTOR").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let mut config = RingConfig::with_capacity(64 * MIB);
    config.durability = Durability::Periodic { sync_interval_ms: 100 };
    let ring = open(&path, config.clone());
    let file_bound = config.capacity_bytes + config.capacity_bytes * MAP_HEADROOM_PERCENT / 100;

    let mut rng = Rng(42);
    let mut written = 0u64;
    let mut appended = [0u64; Lane::COUNT];
    let mut largest_file = 0u64;
    let mut step = 0u64;
    while written < factor * config.capacity_bytes {
        // Mostly sensor, some media; every 16th step the core acks part of the sensor lane.
        let lane = if rng.below(4) == 0 { Lane::Media } else { Lane::Sensor };
        let len = rng.size_between(1024, 1024 * 1024);
        let seq = ring
            .append(chunk(lane, step, len))
            .unwrap_or_else(|error| panic!("append {step} ({len} bytes): {error}"));
        appended[lane.index()] = seq;
        written += len as u64;
        step += 1;
        if step.is_multiple_of(16) {
            let sensor = ring.stats();
            let sensor = sensor.lane(Lane::Sensor);
            ring.ack(Lane::Sensor, sensor.acked_through + (sensor.next_seq - 1 - sensor.acked_through) / 4)
                .unwrap();
        }
        if step.is_multiple_of(64) {
            let stats = ring.stats();
            largest_file = largest_file.max(stats.file_bytes);
            assert!(
                stats.file_bytes <= file_bound,
                "step {step}: file {} > bound {file_bound}",
                stats.file_bytes
            );
        }
    }
    ring.sync().unwrap();
    let stats = ring.stats();
    largest_file = largest_file.max(stats.file_bytes);
    assert!(largest_file <= file_bound, "file grew to {largest_file}, bound {file_bound}");
    let shared_pool = config.capacity_bytes - config.audit_reserved_bytes;
    let used: u64 = stats.lanes.iter().map(|lane| lane.bytes_used).sum();
    assert!(used <= shared_pool, "accounted {used} > pool {shared_pool}");
    assert!(
        stats.lane(Lane::Sensor).evicted_chunks + stats.lane(Lane::Media).evicted_chunks > 0,
        "eviction happened"
    );
    for lane in [Lane::Sensor, Lane::Media] {
        assert_eq!(stats.lane(lane).next_seq - 1, appended[lane.index()]);
        assert_eq!(
            stats.lane(lane).rejected_chunks,
            0,
            "{lane}: drop_oldest never rejects when it can evict"
        );
    }
    // What survives is intact and ends with the newest chunk.
    let held =
        ring.read_from(Lane::Media, 0, ReadLimits { chunks_max: usize::MAX, bytes_max: usize::MAX }).unwrap();
    assert_eq!(held.last().map(|stored| stored.seq), Some(appended[Lane::Media.index()]));
    for stored in held {
        assert_eq!(stored.body().len(), stored.header.body_len as usize);
    }
    eprintln!(
        "soak: wrote {} MiB into a {} MiB ring; largest file {} MiB (bound {} MiB); map-full retries {}",
        written / MIB,
        config.capacity_bytes / MIB,
        largest_file / MIB,
        file_bound / MIB,
        stats.map_full_retries
    );
}
