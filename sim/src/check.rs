//! The invariants checked once the world has healed and converged, and the run's report.
//!
//! - Every chunk an honest ring deleted on an Ack, and every chunk still held at the end, is in
//!   the sink's durable data (`MemoryDisk::durable_chunks`) exactly once, unless it can never be
//!   delivered; no chunk is there twice, whatever happened to it (evicted, lost to a power cut or
//!   a recreation, resent after a crash); nothing lost to a power cut is there at all (the ring
//!   served only fsynced chunks).
//! - Durable data per (device, lane) has strictly increasing core seqs, each `base + ring seq` for
//!   a ring the device had, headers intact, every named dictionary stored; the durable watermark
//!   is the last durable seq and the stored one agrees.
//! - Counters: the rings' evicted records equal the ledger's; `LandingStats` equal what the
//!   simulator saw (checked per core incarnation in `sink`).
//! - Checked while running, elsewhere: trims only of durable data (`device`), landing outcomes
//!   and fired faults (`sink`), close codes of honest and hostile sessions, watermarks across
//!   restarts.

use std::collections::BTreeMap;

use protocol::Lane;

use crate::Report;
use crate::ring::Fate;
use crate::sink::record_range;
use crate::world::World;

pub fn final_checks(world: &mut World) -> Result<(), String> {
    let (stats, observed) = world.sink_final_stats();
    if let Some(failure) = world.failure.take() {
        return Err(failure);
    }
    let mut counts: BTreeMap<usize, u32> = BTreeMap::new();
    let core = world.sink.core.as_ref().expect("the sink runs at the end");
    let stored = world.sink.disk.stored();
    for device in &world.devices {
        let id = &device.id;
        for lane in Lane::ALL {
            let mut last_seq = 0u64;
            for (seq, encoded) in world.sink.disk.durable_chunks(id, lane) {
                let context = || format!("{id}/{lane} durable core seq {seq}");
                if seq <= last_seq {
                    return Err(format!("{}: core seqs do not increase (after {last_seq})", context()));
                }
                last_seq = seq;
                let (header, _) =
                    protocol::decode_chunk(&encoded).map_err(|error| format!("{}: {error}", context()))?;
                if header.seq != seq || header.lane != lane {
                    return Err(format!(
                        "{}: the stored header says {} seq {}",
                        context(),
                        header.lane,
                        header.seq
                    ));
                }
                if header.dict_id != protocol::NO_DICTIONARY
                    && !world
                        .sink
                        .dictionaries
                        .get(id)
                        .is_some_and(|stored| stored.contains_key(&header.dict_id))
                {
                    return Err(format!(
                        "{}: names dictionary {:08x}, which the sink does not store",
                        context(),
                        header.dict_id
                    ));
                }
                let (first, last) = record_range(&encoded)
                    .ok_or_else(|| format!("{}: not an honest chunk body", context()))?;
                let owner = world
                    .ledger
                    .owner(first)
                    .ok_or_else(|| format!("{}: record {first} was never appended", context()))?;
                let chunk = &world.ledger.chunks[owner];
                if chunk.device != device.index
                    || chunk.lane != lane
                    || chunk.first_record != first
                    || chunk.first_record + u64::from(chunk.records) - 1 != last
                {
                    return Err(format!("{}: records {first}..{last} belong to {:?}", context(), chunk));
                }
                let epoch_matches = device
                    .identities
                    .iter()
                    .filter(|(storage, _)| *storage == chunk.storage)
                    .any(|(_, ring_id)| {
                        world.ring_bases.get(&(id.clone(), *ring_id)).is_some_and(|epochs| {
                            epochs.iter().any(|bases| bases[lane.index()].checked_add(chunk.seq) == Some(seq))
                        })
                    });
                if !epoch_matches {
                    return Err(format!(
                        "{}: ring seq {} of ring storage {} is not base + ring seq of any of its rings",
                        context(),
                        chunk.seq,
                        chunk.storage
                    ));
                }
                *counts.entry(owner).or_default() += 1;
            }
            let durable = core.durable(id, lane);
            if durable != last_seq {
                return Err(format!(
                    "{id}/{lane}: durable watermark {durable}, but the last durable chunk is seq {last_seq}"
                ));
            }
            let stored_watermark = stored.watermarks.get(&(id.clone(), lane)).copied().unwrap_or(0);
            if stored_watermark != durable {
                return Err(format!(
                    "{id}/{lane}: stored watermark {stored_watermark}, core durable {durable}"
                ));
            }
        }
    }
    for (index, chunk) in world.ledger.chunks.iter().enumerate() {
        let count = counts.get(&index).copied().unwrap_or(0);
        let name = || {
            format!(
                "{} {} seq {} (records {}..{}, ring storage {}, {:?}{})",
                world.devices[chunk.device].id,
                chunk.lane,
                chunk.seq,
                chunk.first_record,
                chunk.first_record + u64::from(chunk.records) - 1,
                chunk.storage,
                chunk.fate,
                chunk.undeliverable.map_or(String::new(), |why| format!(", undeliverable: {why:?}"))
            )
        };
        if count > 1 + chunk.restored {
            return Err(format!("DUPLICATE: {} is in the sink's durable data {count} times", name()));
        }
        if chunk.undeliverable.is_some() {
            if count != 0 {
                return Err(format!("{} reached the sink although it cannot be delivered", name()));
            }
            if chunk.fate == Fate::Trimmed && !chunk.reported_undeliverable {
                return Err(format!("{} was skipped without an Undeliverable event", name()));
            }
            continue;
        }
        match chunk.fate {
            Fate::Trimmed if count == 0 => {
                return Err(format!("ACKED DATA LOST: {} is not in the sink's durable data", name()));
            }
            Fate::InRing => return Err(format!("{} is still unacked after convergence", name())),
            Fate::LostPowerCut if count != 0 => {
                return Err(format!(
                    "{} reached the sink although a power cut took it back before any fsync",
                    name()
                ));
            }
            _ => {}
        }
    }
    for hostile in
        world.hostiles.iter().filter(|hostile| hostile.kind == crate::hostile::HostileKind::Replayer)
    {
        let durable = world.sink.disk.durable_chunks(&hostile.id, Lane::Sensor);
        let expected: Vec<(u64, Vec<u8>)> = (1..=hostile.replayed)
            .map(|seq| (seq, crate::hostile::replayed_chunk(seq).encode(seq)))
            .collect();
        if durable != expected {
            return Err(format!(
                "{}: resent chunks 1..={} landed as {:?}, not exactly once each",
                hostile.id,
                hostile.replayed,
                durable.iter().map(|(seq, _)| *seq).collect::<Vec<_>>()
            ));
        }
    }
    for device in &world.devices {
        let ledger: u64 = world
            .ledger
            .chunks
            .iter()
            .filter(|chunk| chunk.device == device.index && chunk.fate == Fate::Evicted)
            .map(|chunk| u64::from(chunk.records))
            .sum();
        let counted = device.ring.evicted_records() + device.counters.evicted_records_past_rings;
        if ledger != counted {
            return Err(format!(
                "{}: the ring counts {counted} evicted records, the ledger {ledger}",
                device.id
            ));
        }
    }
    if stats.landing_failures != observed.fired_land {
        return Err(format!(
            "landing failures {} != injected land faults {}",
            stats.landing_failures, observed.fired_land
        ));
    }
    Ok(())
}

impl World {
    pub fn report(&self) -> Report {
        let mut report = Report {
            seed: self.seed,
            virtual_us: self.queue.now,
            events: self.queue.processed,
            ..Report::default()
        };
        report.devices = self.devices.len();
        report.hostiles = self
            .hostiles
            .iter()
            .map(|hostile| (hostile.id.clone(), hostile.attempts, hostile.closes.len()))
            .collect();
        for chunk in &self.ledger.chunks {
            let records = u64::from(chunk.records);
            report.chunks += 1;
            report.records += records;
            if let Some(why) = chunk.undeliverable {
                report.undeliverable_records += records;
                *report.undeliverable_chunks.entry(format!("{why:?}")).or_default() += 1;
                if chunk.reported_undeliverable {
                    *report.undeliverable_chunks.entry("reported".to_string()).or_default() += 1;
                }
                continue;
            }
            match chunk.fate {
                Fate::Trimmed => report.delivered_records += records,
                Fate::Evicted => report.evicted_records += records,
                Fate::LostPowerCut => report.power_cut_records += records,
                Fate::LostRecreation | Fate::LostRestore => report.recreation_records += records,
                Fate::InRing => {}
            }
        }
        report.landing = self.sink.past_stats;
        if let Some(core) = &self.sink.core {
            let stats = core.stats();
            report.landing.chunks_landed += stats.chunks_landed;
            report.landing.duplicates_dropped += stats.duplicates_dropped;
            report.landing.fenced_chunks += stats.fenced_chunks;
            report.landing.landing_failures += stats.landing_failures;
            report.landing.commits += stats.commits;
            report.landing.commit_failures += stats.commit_failures;
            report.landing.epochs_started += stats.epochs_started;
            report.landing.sessions_granted += stats.sessions_granted;
        }
        report.faults = format!("{:?}", self.tally);
        report.evictions_undone = self.tally.evictions_undone;
        report.duplicated_records = self
            .ledger
            .chunks
            .iter()
            .filter(|chunk| chunk.restored > 0)
            .map(|chunk| u64::from(chunk.records))
            .sum();
        report.sink_closes = self.sink.closes.clone();
        report.grants_over_pending = self.sink.grants_over_pending;
        report.max_restores_of_a_chunk =
            self.ledger.chunks.iter().map(|chunk| chunk.restored).max().unwrap_or(0);
        report.ring_identity_renewals =
            self.devices.iter().map(|device| device.counters.ring_identity_renewals).sum();
        report
    }
}
