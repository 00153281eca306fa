//! `core-sink restore --from DIR --to DIR` (or `--config FILE --replica NAME`): rebuilds the
//! datasets and the archive from a replica (directory or bucket) into a new directory:
//!
//! ```text
//! <to>/archive/log/{entries,index,checkpoints}   each the chain of its segments from byte 0
//! <to>/archive/keys/checkpoint.vkey (and checkpoint-signing.pk8 when the replica has it, 0600)
//! <to>/archive/objects/sha256/ab/cd/<hex>        local objects, each checked against its address
//! <to>/datasets/targets/<target>/<dataset>/<shard>   every shard the replica's manifest lists,
//!                                                 checked against the manifest's sha256
//! <to>/datasets/manifests/<dataset>/manifest.json  the manifest with the restored paths
//! <to>/review/review-<seq>.tar                    the archive feed's review shards
//! <to>/landing/raw/<device>/<lane>/<first seq>.tcr   committed raw landing files, each the chain
//!                                                 of its segments from byte 0
//! ```
//!
//! `<to>` must be missing or empty. Objects are restored locally whatever store the source used
//! (no `objects.toml` is written, so the audit commands read them under `<to>/archive`). The log
//! files are written and fsynced; `RESTORED` is written last (atomically): a tree without it is an
//! interrupted restore. A sink pointed at the result (`[archive] root`, `[datasets] targets` and
//! `manifest_dir`) reads the datasets and verifies the archive; the restored raw landing holds the
//! committed records as landed (`landing::read_landed_file` reads them), not the sink's state.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use protocol::evidence::{sha256, sha256_hex};

use super::replica::Replica;
use super::{ReplicationError, SEGMENT_BYTES_MAX, list_segments, parse_range_name, segment_chain};
use crate::datasets::manifest::{MANIFEST_BYTES_MAX, Manifest};

/// What a restore wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub log_bytes: u64,
    pub objects: u64,
    pub datasets: u64,
    pub shards: u64,
    pub shard_bytes: u64,
    pub review_shards: u64,
    pub landing_files: u64,
    pub landing_bytes: u64,
}

fn failed(path: &Path, reason: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::Source { path: path.to_path_buf(), reason: reason.to_string() }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ReplicationError> {
    let directory = path.parent().expect("restored files live in a directory");
    fs::create_dir_all(directory).map_err(|error| failed(directory, error))?;
    durable::Options::default()
        .mode(mode)
        .keep_existing()
        .write(path, bytes)
        .map_err(|error| failed(path, error))
}

/// Writes the new file `path` from the chain of `segments` from byte 0 (an error when a segment
/// lies beyond a gap), fsynced; returns its length.
fn restore_chain(
    replica: &dyn Replica,
    segments: &[(u64, u64, String, u64)],
    path: &Path,
) -> Result<u64, ReplicationError> {
    let (chain, end) = segment_chain(segments);
    if let Some(stray) = segments.iter().find(|segment| segment.0 >= end) {
        return Err(failed(
            path,
            format!(
                "the replica's segments stop at byte {end} but {} starts later (a segment is missing; run `core-sink replicate --repair`)",
                stray.2
            ),
        ));
    }
    let mut output =
        OpenOptions::new().write(true).create_new(true).open(path).map_err(|error| failed(path, error))?;
    for (start, segment_end, key, _) in &chain {
        let bytes = replica
            .get(key, SEGMENT_BYTES_MAX.max(segment_end - start))?
            .ok_or_else(|| failed(path, format!("{key} vanished while restoring")))?;
        if bytes.len() as u64 != segment_end - start {
            return Err(failed(
                path,
                format!("{key} holds {} bytes, its name says {}", bytes.len(), segment_end - start),
            ));
        }
        output.write_all(&bytes).map_err(|error| failed(path, error))?;
    }
    output.sync_all().map_err(|error| failed(path, error))?;
    Ok(end)
}

/// Restores `replica` into `to`; `object_bytes_max` bounds each object read.
pub fn restore(
    replica: &dyn Replica,
    to: &Path,
    object_bytes_max: u64,
) -> Result<RestoreReport, ReplicationError> {
    if to.exists() && fs::read_dir(to).map_err(|error| failed(to, error))?.next().is_some() {
        return Err(failed(to, "not empty: restore writes into a new directory"));
    }
    let mut report = RestoreReport::default();
    let archive_root = to.join("archive");
    let log = archive_root.join("log");
    let has_archive = !replica.list("archive/log/entries/")?.is_empty();
    if has_archive {
        fs::create_dir_all(&log).map_err(|error| failed(&log, error))?;
        for file in ["entries", "index", "checkpoints"] {
            report.log_bytes += restore_chain(replica, &list_segments(replica, file)?, &log.join(file))?;
        }
        durable::sync_directory(&log).map_err(|error| failed(&log, error))?;
        for (name, mode) in [
            ("checkpoint.vkey", fleet::files::PUBLIC_MODE),
            ("checkpoint-signing.pk8", fleet::files::PRIVATE_MODE),
        ] {
            if let Some(bytes) = replica.get(&format!("archive/keys/{name}"), 64 * 1024)? {
                write_new(&archive_root.join("keys").join(name), &bytes, mode)?;
            }
        }
        for (key, _) in replica.list("archive/objects/")? {
            let hex = key.rsplit('/').next().unwrap_or_default().to_string();
            let digest = protocol::evidence::parse_sha256_hex(&hex)
                .ok_or_else(|| failed(Path::new(&key), "not an object address"))?;
            let bytes = replica
                .get(&key, object_bytes_max)?
                .ok_or_else(|| failed(Path::new(&key), "vanished while restoring"))?;
            if sha256(&bytes) != digest {
                return Err(failed(
                    Path::new(&key),
                    "does not hash to its address (run `core-sink replicate verify`)",
                ));
            }
            write_new(
                &archive::objects::object_path(&archive_root, &digest),
                &bytes,
                fleet::files::PUBLIC_MODE,
            )?;
            report.objects += 1;
        }
    }
    // Datasets: every manifest on the replica, and the shards it lists.
    let mut manifests = BTreeMap::new();
    for (key, _) in replica.list("datasets/")? {
        if let Some(dataset) =
            key.strip_prefix("datasets/").and_then(|rest| rest.strip_suffix("/manifest.json"))
            && !dataset.contains('/')
        {
            manifests.insert(dataset.to_string(), key);
        }
    }
    for (dataset, key) in manifests {
        let bytes = replica
            .get(&key, MANIFEST_BYTES_MAX)?
            .ok_or_else(|| failed(Path::new(&key), "vanished while restoring"))?;
        let mut manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|error| failed(Path::new(&key), error))?;
        for shard in &mut manifest.shards {
            let shard_key = format!("datasets/{dataset}/{}", shard.name);
            super::replica::validate_key(&shard_key).map_err(|reason| failed(Path::new(&key), reason))?;
            let bytes = replica.get(&shard_key, object_bytes_max)?.ok_or_else(|| {
                failed(
                    Path::new(&shard_key),
                    "listed in the replica's manifest but missing (run `core-sink replicate --repair`)",
                )
            })?;
            let found = sha256_hex(&sha256(&bytes));
            if found != shard.sha256 {
                return Err(failed(
                    Path::new(&shard_key),
                    format!("sha256 {found}, the manifest says {}", shard.sha256),
                ));
            }
            let path: PathBuf = to
                .join("datasets")
                .join("targets")
                .join(shard.target.to_string())
                .join(&dataset)
                .join(&shard.name);
            write_new(&path, &bytes, fleet::files::PUBLIC_MODE)?;
            shard.path = path;
            report.shards += 1;
            report.shard_bytes += bytes.len() as u64;
        }
        let path = to.join("datasets").join("manifests").join(&dataset).join("manifest.json");
        manifest.write(&path).map_err(|error| failed(&path, error))?;
        report.datasets += 1;
    }
    // Review shards: every one the replica holds.
    for (key, _) in replica.list("review/")? {
        let name = key.strip_prefix("review/").unwrap_or_default();
        if name.contains('/') || !name.ends_with(".tar") {
            continue;
        }
        let bytes = replica
            .get(&key, object_bytes_max)?
            .ok_or_else(|| failed(Path::new(&key), "vanished while restoring"))?;
        write_new(&to.join("review").join(name), &bytes, fleet::files::PUBLIC_MODE)?;
        report.review_shards += 1;
    }
    // Raw landing: per file, the chain of its segments from byte 0.
    let mut files: BTreeMap<String, Vec<(u64, u64, String, u64)>> = BTreeMap::new();
    for (key, size) in replica.list("landing/raw/")? {
        let Some((file, range)) = key.rsplit_once('/') else { continue };
        if let Some((start, end)) = parse_range_name(range) {
            files.entry(file.to_string()).or_default().push((start, end, key.clone(), size));
        }
    }
    for (file, segments) in files {
        let parts: Vec<&str> = file.split('/').collect();
        let [_, _, device, lane, first_seq] = parts[..] else {
            return Err(failed(Path::new(&file), "not landing/raw/<device>/<lane>/<first seq>"));
        };
        let lane: protocol::Lane =
            lane.parse().map_err(|_| failed(Path::new(&file), format!("unknown lane {lane:?}")))?;
        let first_seq: u64 = first_seq
            .parse()
            .map_err(|_| failed(Path::new(&file), "the file's first seq is not a number"))?;
        let path = crate::landing::raw_file_path(&to.join("landing"), device, lane, first_seq);
        let directory = path.parent().expect("landing files live in a directory");
        fs::create_dir_all(directory).map_err(|error| failed(directory, error))?;
        report.landing_bytes += restore_chain(replica, &segments, &path)?;
        durable::sync_directory(directory).map_err(|error| failed(directory, error))?;
        report.landing_files += 1;
    }
    let summary = format!(
        "restored by core-sink: {} log bytes, {} objects, {} datasets, {} shards\n",
        report.log_bytes, report.objects, report.datasets, report.shards
    );
    write_new(&to.join("RESTORED"), summary.as_bytes(), fleet::files::PUBLIC_MODE)?;
    Ok(report)
}
