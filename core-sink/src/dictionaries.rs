//! The sink's durable store of the zstd dictionaries appliances compress with.
//!
//! An appliance sends a dictionary frame on a lane stream before the first chunk of the session
//! that names it. The sink writes it here (temporary name, fsync, rename, fsync directory) before
//! it reads the next frame of that stream, so by the time a chunk compressed with it is acked,
//! the dictionary that decodes it is on disk. Layout: `<dir>/<device>/<dict_id as 8 hex>.zdict`.
//!
//! Invariant: a chunk naming a dictionary is accepted only when this store holds that
//! dictionary for its device (`LaneReader` refuses it otherwise), so the sink can decode every
//! chunk it ever acked.
//! Invariant: a stored dictionary never changes: the id is the content's hash, and a second
//! dictionary under an id is refused.
//! Invariant: a dictionary is stored only after zstd loaded it (`Unusable` otherwise), and a
//! device never holds more than `DEVICE_DICTIONARIES_MAX`: stores are serialised, so concurrent
//! dictionary frames cannot all pass the count check. A stored file that still does not load (a
//! store written by an older build) is skipped by `register_all`, logged once, and the chunks
//! naming it count as undecodable; nothing panics on bytes a device sent.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protocol::{ChunkDecompressor, DICTIONARIES_MAX, dictionary_id};

/// Most dictionaries one device may store at the sink (one decompressor holds at most this many).
pub const DEVICE_DICTIONARIES_MAX: usize = DICTIONARIES_MAX;

#[derive(Debug, thiserror::Error)]
pub enum DictionaryStoreError {
    #[error("{operation} {path}: {source}")]
    Io { operation: &'static str, path: PathBuf, source: std::io::Error },
    #[error(
        "device {device} already has {DEVICE_DICTIONARIES_MAX} dictionaries; refusing dictionary {dict_id}"
    )]
    TooMany { device: String, dict_id: u32 },
    #[error("dictionary {dict_id} of device {device} is not the content id of its bytes")]
    WrongId { device: String, dict_id: u32 },
    #[error("dictionary {dict_id} of device {device} cannot be loaded by zstd: {reason}")]
    Unusable { device: String, dict_id: u32, reason: String },
}

#[derive(Debug)]
pub struct DictionaryStore {
    dir: PathBuf,
    /// (device, dict_id) of every stored dictionary.
    known: Mutex<HashMap<String, HashSet<u32>>>,
    /// Held for the whole of `store`, so the per-device count cannot be passed by racing stores.
    storing: Mutex<()>,
    /// (device, dict_id) of stored files zstd would not load, reported once.
    unusable: Mutex<HashSet<(String, u32)>>,
}

fn io<'path>(
    operation: &'static str,
    path: &'path Path,
) -> impl FnOnce(std::io::Error) -> DictionaryStoreError + 'path {
    move |source| DictionaryStoreError::Io { operation, path: path.to_path_buf(), source }
}

impl DictionaryStore {
    /// Opens (creating) the store and indexes what it holds; temporary files of an interrupted
    /// write are removed.
    pub fn open(dir: &Path) -> Result<DictionaryStore, DictionaryStoreError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut known: HashMap<String, HashSet<u32>> = HashMap::new();
        for device_entry in std::fs::read_dir(dir).map_err(io("read", dir))? {
            let device_entry = device_entry.map_err(io("read", dir))?;
            let device_dir = device_entry.path();
            if !device_dir.is_dir() {
                continue;
            }
            let device = device_entry.file_name().to_string_lossy().into_owned();
            for entry in std::fs::read_dir(&device_dir).map_err(io("read", &device_dir))? {
                let path = entry.map_err(io("read", &device_dir))?.path();
                let name =
                    path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
                if name.ends_with(".partial") {
                    std::fs::remove_file(&path).map_err(io("remove", &path))?;
                    continue;
                }
                if let Some(id) =
                    name.strip_suffix(".zdict").and_then(|hex| u32::from_str_radix(hex, 16).ok())
                {
                    known.entry(device.clone()).or_default().insert(id);
                }
            }
        }
        Ok(DictionaryStore {
            dir: dir.to_path_buf(),
            known: Mutex::new(known),
            storing: Mutex::new(()),
            unusable: Mutex::new(HashSet::new()),
        })
    }

    fn path(&self, device: &str, dict_id: u32) -> PathBuf {
        self.dir.join(device).join(format!("{dict_id:08x}.zdict"))
    }

    /// The ids of every dictionary stored for `device`.
    pub fn ids(&self, device: &str) -> Vec<u32> {
        self.known
            .lock()
            .expect("dictionary index lock")
            .get(device)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn contains(&self, device: &str, dict_id: u32) -> bool {
        self.known
            .lock()
            .expect("dictionary index lock")
            .get(device)
            .is_some_and(|ids| ids.contains(&dict_id))
    }

    /// Stores `dictionary` durably; a no-op when it is already stored. Blocking (fsync): call
    /// it off the async threads.
    pub fn store(&self, device: &str, dict_id: u32, dictionary: &[u8]) -> Result<(), DictionaryStoreError> {
        if dictionary_id(dictionary) != dict_id {
            return Err(DictionaryStoreError::WrongId { device: device.to_string(), dict_id });
        }
        // Load it before storing: a dictionary the sink stored must be one it can decode with.
        ChunkDecompressor::new().add_dictionary(dict_id, dictionary).map_err(|error| {
            DictionaryStoreError::Unusable { device: device.to_string(), dict_id, reason: error.to_string() }
        })?;
        let _storing = self.storing.lock().expect("dictionary store lock");
        if self.contains(device, dict_id) {
            return Ok(());
        }
        let count = self.known.lock().expect("dictionary index lock").get(device).map_or(0, HashSet::len);
        if count >= DEVICE_DICTIONARIES_MAX {
            return Err(DictionaryStoreError::TooMany { device: device.to_string(), dict_id });
        }
        // A temporary left by an interrupted write ends in `.partial` and is removed at `open`.
        durable::Options::default()
            .create_directory()
            .write(&self.path(device, dict_id), dictionary)
            .map_err(|error| DictionaryStoreError::Io {
                operation: error.operation,
                path: error.path,
                source: error.source,
            })?;
        self.known
            .lock()
            .expect("dictionary index lock")
            .entry(device.to_string())
            .or_default()
            .insert(dict_id);
        Ok(())
    }

    /// The dictionary's bytes, checked against its id.
    pub fn load(&self, device: &str, dict_id: u32) -> Result<Option<Vec<u8>>, DictionaryStoreError> {
        let path = self.path(device, dict_id);
        match std::fs::read(&path) {
            Ok(bytes) if dictionary_id(&bytes) == dict_id => Ok(Some(bytes)),
            Ok(_) => Err(DictionaryStoreError::WrongId { device: device.to_string(), dict_id }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DictionaryStoreError::Io { operation: "read", path, source }),
        }
    }

    /// Registers every stored dictionary of `device` with `decompressor` that it lacks; returns
    /// the dictionary bytes added.
    pub fn register_all(
        &self,
        device: &str,
        decompressor: &mut ChunkDecompressor,
        registered: &mut HashSet<u32>,
    ) -> Result<u64, DictionaryStoreError> {
        let mut added = 0u64;
        let ids: Vec<u32> = self
            .known
            .lock()
            .expect("dictionary index lock")
            .get(device)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        for id in ids {
            if registered.contains(&id)
                || self.unusable.lock().expect("dictionary store lock").contains(&(device.to_string(), id))
            {
                continue;
            }
            if let Some(bytes) = self.load(device, id)? {
                match decompressor.add_dictionary(id, &bytes) {
                    Ok(()) => {
                        registered.insert(id);
                        added += bytes.len() as u64;
                    }
                    Err(error) => {
                        // Stores check this before writing, so only a file from an older build or
                        // damaged at rest gets here; chunks naming it stay undecodable.
                        if self
                            .unusable
                            .lock()
                            .expect("dictionary store lock")
                            .insert((device.to_string(), id))
                        {
                            tracing::error!(%device, dict_id = id, %error, "stored dictionary cannot be loaded; chunks naming it are skipped");
                        }
                    }
                }
            }
        }
        Ok(added)
    }
}

/// Dictionary bytes a [`DecompressorCache`] keeps loaded by default: four devices at their full
/// quota (64 dictionaries of 1 MiB), far more than the few a device uses in practice.
pub const DECOMPRESSOR_CACHE_BYTES_MAX: u64 =
    4 * (DEVICE_DICTIONARIES_MAX * protocol::DICTIONARY_BYTES_MAX) as u64;

/// Per-device decompressors with their dictionaries loaded, for readers of committed landing
/// (the datasets pipeline and the archive feed). Bounded: when the dictionary bytes loaded pass
/// `bytes_max`, the least recently used devices are dropped (their dictionaries are loaded again
/// from the store when one of their chunks comes by).
pub struct DecompressorCache {
    bytes_max: u64,
    bytes: u64,
    uses: u64,
    evictions: u64,
    devices: HashMap<String, CachedDecompressor>,
}

#[derive(Default)]
struct CachedDecompressor {
    decompressor: ChunkDecompressor,
    registered: HashSet<u32>,
    bytes: u64,
    last_used: u64,
}

impl DecompressorCache {
    pub fn new(bytes_max: u64) -> DecompressorCache {
        DecompressorCache { bytes_max, bytes: 0, uses: 0, evictions: 0, devices: HashMap::new() }
    }

    /// Decompresses a committed chunk of `device`, loading its dictionaries from `store` if the
    /// chunk names one not loaded yet. The outer error is the store's (I/O); the inner one is
    /// the chunk's (it cannot be decoded: damage at rest, a dictionary zstd will not load).
    pub fn decompress(
        &mut self,
        store: &DictionaryStore,
        device: &str,
        header: &protocol::ChunkHeader,
        body: &[u8],
    ) -> Result<Result<Vec<u8>, protocol::DecodeError>, DictionaryStoreError> {
        self.uses += 1;
        let entry = self.devices.entry(device.to_string()).or_default();
        entry.last_used = self.uses;
        if header.dict_id != protocol::NO_DICTIONARY && !entry.registered.contains(&header.dict_id) {
            let added = store.register_all(device, &mut entry.decompressor, &mut entry.registered)?;
            entry.bytes += added;
            self.bytes += added;
        }
        let raw = entry.decompressor.decompress(header, body);
        self.evict_beyond_bound(device);
        Ok(raw)
    }

    /// Drops least recently used devices (never `keep`, the one just used) while over the bound.
    fn evict_beyond_bound(&mut self, keep: &str) {
        while self.bytes > self.bytes_max {
            let Some(victim) = self
                .devices
                .iter()
                .filter(|(device, _)| device.as_str() != keep)
                .min_by_key(|(_, cached)| cached.last_used)
                .map(|(device, _)| device.clone())
            else {
                return;
            };
            let cached = self.devices.remove(&victim).expect("chosen above");
            self.bytes -= cached.bytes;
            self.evictions += 1;
        }
    }

    /// Dictionary bytes loaded now (at most `bytes_max`, or one device's if that is more).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Devices dropped so far to stay within the bound.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_durably_and_reindexes() {
        let dir = tempfile::tempdir().unwrap();
        let dictionary = b"some dictionary bytes".to_vec();
        let id = dictionary_id(&dictionary);
        {
            let store = DictionaryStore::open(dir.path()).unwrap();
            assert!(!store.contains("dev-1", id));
            store.store("dev-1", id, &dictionary).unwrap();
            store.store("dev-1", id, &dictionary).unwrap();
            assert!(matches!(
                store.store("dev-1", id ^ 1, &dictionary),
                Err(DictionaryStoreError::WrongId { .. })
            ));
        }
        std::fs::write(dir.path().join("dev-1").join("00000001.partial"), b"torn").unwrap();
        let store = DictionaryStore::open(dir.path()).unwrap();
        assert!(store.contains("dev-1", id));
        assert!(!store.contains("dev-2", id));
        assert_eq!(store.load("dev-1", id).unwrap(), Some(dictionary));
        assert!(!dir.path().join("dev-1").join("00000001.partial").exists());
    }

    /// zstd's dictionary magic followed by bytes that are no entropy tables.
    fn garbage_with_magic(seed: u8) -> Vec<u8> {
        let mut bytes = vec![0x37, 0xA4, 0x30, 0xEC];
        bytes.extend((0..200u8).map(|index| index.wrapping_mul(31).wrapping_add(seed)));
        bytes
    }

    #[test]
    fn a_dictionary_zstd_cannot_load_is_refused_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = DictionaryStore::open(dir.path()).unwrap();
        let garbage = garbage_with_magic(0);
        let id = dictionary_id(&garbage);
        assert!(ChunkDecompressor::new().add_dictionary(id, &garbage).is_err(), "zstd must refuse it");
        let refused = store.store("dev-1", id, &garbage);
        assert!(matches!(refused, Err(DictionaryStoreError::Unusable { .. })), "{refused:?}");
        assert!(!store.contains("dev-1", id));
        assert!(!store.path("dev-1", id).exists());
    }

    #[test]
    fn a_stored_file_zstd_cannot_load_is_skipped_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = garbage_with_magic(1);
        let id = dictionary_id(&garbage);
        let good = b"a raw-content dictionary".to_vec();
        let good_id = dictionary_id(&good);
        // What an older build (which stored without loading) left behind.
        std::fs::create_dir_all(dir.path().join("dev-1")).unwrap();
        std::fs::write(dir.path().join("dev-1").join(format!("{id:08x}.zdict")), &garbage).unwrap();
        let store = DictionaryStore::open(dir.path()).unwrap();
        store.store("dev-1", good_id, &good).unwrap();
        let mut decompressor = ChunkDecompressor::new();
        let mut registered = HashSet::new();
        for _ in 0..2 {
            store.register_all("dev-1", &mut decompressor, &mut registered).unwrap();
            assert_eq!(registered, HashSet::from([good_id]));
        }
    }

    #[test]
    fn racing_stores_never_pass_the_per_device_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(DictionaryStore::open(dir.path()).unwrap());
        let dictionary = |index: usize| format!("raw-content dictionary number {index}").into_bytes();
        for index in 0..DEVICE_DICTIONARIES_MAX - 2 {
            let bytes = dictionary(index);
            store.store("dev-1", dictionary_id(&bytes), &bytes).unwrap();
        }
        let threads: Vec<_> = (0..8)
            .map(|thread| {
                let store = store.clone();
                let bytes = dictionary(1_000 + thread);
                std::thread::spawn(move || store.store("dev-1", dictionary_id(&bytes), &bytes).is_ok())
            })
            .collect();
        let stored = threads.into_iter().map(|thread| thread.join().unwrap()).filter(|ok| *ok).count();
        assert_eq!(stored, 2);
        assert_eq!(store.ids("dev-1").len(), DEVICE_DICTIONARIES_MAX);
        let files = std::fs::read_dir(dir.path().join("dev-1")).unwrap().count();
        assert_eq!(files, DEVICE_DICTIONARIES_MAX);
    }

    #[test]
    fn the_decompressor_cache_stays_within_its_bound_and_reloads_what_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = DictionaryStore::open(dir.path()).unwrap();
        let dictionary = format!("raw-content dictionary {}", "shared words ".repeat(64)).into_bytes();
        let id = dictionary_id(&dictionary);
        let devices = ["dev-1", "dev-2", "dev-3"];
        for device in devices {
            store.store(device, id, &dictionary).unwrap();
        }
        let mut compressor = protocol::ChunkCompressor::new(3);
        compressor.add_dictionary(id, &dictionary).unwrap();
        let raw = "shared words ".repeat(200).into_bytes();
        let (codec, body) = compressor.compress(&raw, id).unwrap();
        let encoded =
            protocol::SealedChunk::new(protocol::Lane::Sensor, codec, id, 1, raw.len() as u32, body)
                .unwrap()
                .encode(1);
        let (header, body) = protocol::decode_chunk(&encoded).unwrap();

        // Room for two devices' dictionaries: the third evicts the least recently used.
        let mut cache = DecompressorCache::new(2 * dictionary.len() as u64);
        for device in devices.into_iter().chain(devices) {
            assert_eq!(cache.decompress(&store, device, &header, body).unwrap().unwrap(), raw, "{device}");
            assert!(cache.bytes() <= 2 * dictionary.len() as u64, "{} bytes loaded", cache.bytes());
        }
        assert_eq!(cache.evictions(), 4, "every device but the two most recent was dropped and reloaded");
    }
}
