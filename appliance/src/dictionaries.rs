//! The appliance's durable store of the zstd dictionaries its chunkers trained.
//!
//! A dictionary is written here (temporary name, fsync, rename, fsync directory) before the
//! first chunk compressed with it is appended to the ring, and it is never deleted: a chunk in
//! the ring may name it until the sink acks it, and the uplink sends it ahead of such chunks in
//! every session. Layout: `<dir>/<dict_id as 8 hex>.zdict`, and `<dir>/current-<source>` naming
//! the dictionary a source's chunker uses now, so a restarted appliance keeps compressing with it.
//!
//! Invariant: a chunk in the ring that names a dictionary has that dictionary in this store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protocol::{DICTIONARIES_MAX, dictionary_id};

/// Most dictionaries an appliance keeps; the sink keeps as many per device. A chunker that
/// would need more stops retraining and keeps its current dictionary.
pub const APPLIANCE_DICTIONARIES_MAX: usize = DICTIONARIES_MAX;

#[derive(Debug, thiserror::Error)]
pub enum DictionaryStoreError {
    #[error("{operation} {path}: {source}")]
    Io { operation: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the dictionary store {dir} already holds {APPLIANCE_DICTIONARIES_MAX} dictionaries")]
    Full { dir: PathBuf },
    #[error("{path} does not hold the dictionary its name says (damaged)")]
    Damaged { path: PathBuf },
}

#[derive(Debug)]
pub struct DictionaryStore {
    dir: PathBuf,
    /// Every stored dictionary, by id (bounded by `APPLIANCE_DICTIONARIES_MAX`).
    dictionaries: Mutex<HashMap<u32, Arc<Vec<u8>>>>,
}

fn io<'path>(
    operation: &'static str,
    path: &'path Path,
) -> impl FnOnce(std::io::Error) -> DictionaryStoreError + 'path {
    move |source| DictionaryStoreError::Io { operation, path: path.to_path_buf(), source }
}

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DictionaryStoreError> {
    // A temporary left by an interrupted write ends in `.partial` and is removed at `open`.
    durable::write(&dir.join(name), bytes).map_err(|error| DictionaryStoreError::Io {
        operation: error.operation,
        path: error.path,
        source: error.source,
    })
}

impl DictionaryStore {
    /// Opens (creating) the store and loads every dictionary, checking each against its id.
    pub fn open(dir: &Path) -> Result<DictionaryStore, DictionaryStoreError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut dictionaries = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(io("read", dir))? {
            let path = entry.map_err(io("read", dir))?.path();
            let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            if name.ends_with(".partial") {
                std::fs::remove_file(&path).map_err(io("remove", &path))?;
                continue;
            }
            let Some(id) = name.strip_suffix(".zdict").and_then(|hex| u32::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            let bytes = std::fs::read(&path).map_err(io("read", &path))?;
            if dictionary_id(&bytes) != id {
                return Err(DictionaryStoreError::Damaged { path });
            }
            dictionaries.insert(id, Arc::new(bytes));
        }
        Ok(DictionaryStore { dir: dir.to_path_buf(), dictionaries: Mutex::new(dictionaries) })
    }

    /// Stores `dictionary` durably and returns its id; a no-op for a dictionary already stored.
    pub fn put(&self, dictionary: Vec<u8>) -> Result<u32, DictionaryStoreError> {
        let id = dictionary_id(&dictionary);
        if self.get(id).is_some() {
            return Ok(id);
        }
        if self.len() >= APPLIANCE_DICTIONARIES_MAX {
            return Err(DictionaryStoreError::Full { dir: self.dir.clone() });
        }
        write_durably(&self.dir, &format!("{id:08x}.zdict"), &dictionary)?;
        self.dictionaries.lock().expect("dictionary store lock").insert(id, Arc::new(dictionary));
        Ok(id)
    }

    pub fn get(&self, dict_id: u32) -> Option<Arc<Vec<u8>>> {
        self.dictionaries.lock().expect("dictionary store lock").get(&dict_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.dictionaries.lock().expect("dictionary store lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dictionary `source`'s chunker used last, if it is still here.
    pub fn current(&self, source: &str) -> Option<(u32, Arc<Vec<u8>>)> {
        let text = std::fs::read_to_string(self.dir.join(format!("current-{source}"))).ok()?;
        let id = u32::from_str_radix(text.trim(), 16).ok()?;
        self.get(id).map(|bytes| (id, bytes))
    }

    /// Records that `source`'s chunker now compresses with `dict_id`.
    pub fn set_current(&self, source: &str, dict_id: u32) -> Result<(), DictionaryStoreError> {
        assert!(self.get(dict_id).is_some(), "set_current({source}, {dict_id}) of a dictionary not stored");
        write_durably(&self.dir, &format!("current-{source}"), format!("{dict_id:08x}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let dictionary = b"dictionary bytes".to_vec();
        let id = {
            let store = DictionaryStore::open(dir.path()).unwrap();
            let id = store.put(dictionary.clone()).unwrap();
            assert_eq!(store.put(dictionary.clone()).unwrap(), id);
            store.set_current("env", id).unwrap();
            id
        };
        let store = DictionaryStore::open(dir.path()).unwrap();
        assert_eq!(store.current("env").map(|(id, bytes)| (id, bytes.to_vec())), Some((id, dictionary)));
        assert_eq!(store.current("other"), None);
        std::fs::write(dir.path().join(format!("{id:08x}.zdict")), b"changed").unwrap();
        assert!(matches!(DictionaryStore::open(dir.path()), Err(DictionaryStoreError::Damaged { .. })));
    }
}
