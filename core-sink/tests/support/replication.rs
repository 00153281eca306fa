//! Shared by the replication tests: a sink's published sources (dataset shards with manifests, as
//! the datasets pipeline publishes them, and a real archive fed through the archive feed) that grow
//! on demand, and helpers to compare a directory replica with them.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use core_sink::SinkConfig;
use core_sink::archive_feed::{ArchiveConfig, ArchiveFeed, ArchiveFeedMetrics};
use core_sink::datasets::DatasetsConfig;
use core_sink::datasets::manifest::{Manifest, ShardEntry};
use core_sink::dictionaries::DictionaryStore;
use core_sink::landing::{Committer as _, RawLanding};
use core_sink::replication::ReplicationConfig;
use protocol::evidence::{sha256, sha256_hex};

use super::support::{MIB, drain, land};

pub const DATASETS: [(&str, &str, &str); 2] =
    [("media", "webdataset", "tar"), ("sensor", "parquet", "parquet")];

/// A sink's published datasets and archive under a temporary directory.
pub struct Site {
    _directory: tempfile::TempDir,
    pub base: PathBuf,
    landing: RawLanding,
    seqs: BTreeMap<String, u64>,
    next_decision: u32,
    with_model: bool,
    pub shard_bytes: usize,
}

impl Site {
    pub fn new() -> Site {
        let directory = tempfile::tempdir().unwrap();
        let base = directory.path().to_path_buf();
        for name in ["t0", "t1", "manifests", "replica"] {
            std::fs::create_dir_all(base.join(name)).unwrap();
        }
        let mut landing = RawLanding::new(&base.join("landing"), 64 * MIB);
        landing.recover(None).unwrap();
        Site {
            _directory: directory,
            base,
            landing,
            seqs: BTreeMap::new(),
            next_decision: 0,
            with_model: true,
            shard_bytes: 20_000,
        }
    }

    pub fn manifest_path(&self, dataset: &str) -> PathBuf {
        self.base.join("manifests").join(dataset).join("manifest.json")
    }

    pub fn manifest(&self, dataset: &str) -> Manifest {
        Manifest::read(&self.manifest_path(dataset)).unwrap().unwrap()
    }

    /// Publishes `count` more shards of each dataset as the pipeline does: the shard file first,
    /// then the manifest replaced; shards alternate between the two targets.
    pub fn publish_shards(&mut self, count: u64) {
        for (dataset, kind, extension) in DATASETS {
            let mut manifest = Manifest::read(&self.manifest_path(dataset))
                .unwrap()
                .unwrap_or_else(|| Manifest::empty(dataset, kind));
            for _ in 0..count {
                let shard_seq = manifest.next_shard_seq;
                let target = (shard_seq % 2) as usize;
                let name = format!("{dataset}-node0-t{target}-{shard_seq:08}.{extension}");
                let bytes: Vec<u8> = (0..self.shard_bytes)
                    .map(|index| {
                        (index as u64)
                            .wrapping_mul(2_654_435_761)
                            .wrapping_add(shard_seq * 7 + dataset.len() as u64) as u8
                    })
                    .collect();
                let path = self.base.join(format!("t{target}")).join(dataset).join(&name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
                manifest.shards.push(ShardEntry {
                    relative_path: format!("{dataset}/{name}"),
                    columns: Vec::new(),
                    name,
                    path,
                    target,
                    shard_seq,
                    bytes: bytes.len() as u64,
                    samples: 10,
                    sha256: sha256_hex(&sha256(&bytes)),
                    time_range_us: [shard_seq, shard_seq + 1],
                    ranges: Vec::new(),
                });
                manifest.next_shard_seq += 1;
            }
            manifest.write(&self.manifest_path(dataset)).unwrap();
        }
    }

    /// Archives `count` more decisions of device cam-01 through the real archive feed (a signed
    /// checkpoint every 4 entries and at the end).
    pub fn archive_decisions(&mut self, count: u32) {
        let numbers = self.next_decision..self.next_decision + count;
        self.next_decision += count;
        let checkpoint = land(&mut self.landing, "cam-01", self.with_model, numbers, &mut self.seqs);
        self.with_model = false;
        let mut config = ArchiveConfig::new(self.base.join("archive"), self.base.join("review"));
        config.checkpoint_every_entries = 4;
        let dictionaries = Arc::new(DictionaryStore::open(&self.base.join("dictionaries")).unwrap());
        let mut feed = ArchiveFeed::open(
            config,
            &self.base.join("landing"),
            dictionaries,
            Arc::new(ArchiveFeedMetrics::default()),
        )
        .unwrap();
        drain(&mut feed, &checkpoint);
        feed.persist().unwrap();
        let _ = self.landing.checkpoint();
    }

    /// The raw landing's checkpoint now (everything landed is committed).
    pub fn landing_checkpoint(&self) -> Vec<u8> {
        self.landing.checkpoint()
    }

    pub fn archive_root(&self) -> PathBuf {
        self.base.join("archive")
    }

    /// The sink's config with `replication`.
    pub fn config(&self, replication: ReplicationConfig) -> SinkConfig {
        let mut config = SinkConfig::new("127.0.0.1:0".parse().unwrap(), &self.base);
        config.datasets = Some(DatasetsConfig::with_targets(
            vec![self.base.join("t0"), self.base.join("t1")],
            self.base.join("manifests"),
        ));
        config.archive = Some(ArchiveConfig::new(self.archive_root(), self.base.join("review")));
        config.replication = Some(replication);
        config
    }

    /// The same as a TOML file for the `core-sink` binary; `replication` is the body of the
    /// `[replication]` section and its replicas.
    pub fn config_file(&self, replication: &str) -> PathBuf {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nlanding_dir = \"landing\"\nca_dir = \"ca\"\n\
             server_certificate_dir = \"server\"\n\n[datasets]\ntargets = [\"t0\", \"t1\"]\nmanifest_dir = \"manifests\"\n\n\
             [archive]\nroot = \"archive\"\nreview_dir = \"review\"\ncheckpoint_every_entries = 4\n\n[replication]\n{replication}\n"
        );
        let path = self.base.join("sink.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Every file a directory replica must hold for the sources as they are, with its bytes:
    /// shards and manifests (the log segments and objects are checked by `verify`).
    pub fn expected_dataset_files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        for (dataset, _, _) in DATASETS {
            let manifest = self.manifest(dataset);
            for shard in &manifest.shards {
                files.insert(
                    format!("datasets/{dataset}/{}", shard.name),
                    std::fs::read(&shard.path).unwrap(),
                );
            }
            files.insert(
                format!("datasets/{dataset}/manifest.json"),
                std::fs::read(self.manifest_path(dataset)).unwrap(),
            );
        }
        files
    }
}

/// Every file under `root` (relative path → bytes), hidden ones included.
pub fn files_under(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                files.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}
