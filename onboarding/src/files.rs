//! Device-side files: durable writes through `durable` (temporary file with its final mode,
//! fsync, rename, fsync of the directory), so a power cut leaves the old file or the new one, and
//! bounded reads.

use std::fs::File;
use std::io::{ErrorKind, Read as _};
use std::path::Path;

use crate::OnboardingError;

/// Mode of the device's private key.
pub(crate) const PRIVATE_MODE: u32 = 0o600;
/// Mode of the device's config and sink address.
pub(crate) const PUBLIC_MODE: u32 = 0o644;
/// Longest device-side JSON file read (config, sink address).
pub(crate) const STATE_FILE_BYTES_MAX: u64 = 64 * 1024;

/// Writes `bytes` to `path` durably with `mode` (`durable`: temporary file, fsync, rename, fsync
/// of the directory), creating the directory if needed.
pub(crate) fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<(), OnboardingError> {
    durable::Options::default()
        .mode(mode)
        .create_directory()
        .write(path, bytes)
        .map_err(|error| OnboardingError::io(error.operation, &error.path, error.source))
}

/// Reads a file of at most `bytes_max` bytes; `Ok(None)` if it does not exist.
pub(crate) fn read_bounded(path: &Path, bytes_max: u64) -> Result<Option<Vec<u8>>, OnboardingError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(OnboardingError::io("open", path, source)),
    };
    let mut bytes = Vec::new();
    file.take(bytes_max + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| OnboardingError::io("read", path, source))?;
    if bytes.len() as u64 > bytes_max {
        return Err(OnboardingError::File {
            path: path.to_path_buf(),
            problem: format!("larger than {bytes_max} bytes"),
        });
    }
    Ok(Some(bytes))
}

/// Reads and parses a JSON file; `Ok(None)` if it does not exist.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, OnboardingError> {
    match read_bounded(path, STATE_FILE_BYTES_MAX)? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| OnboardingError::File {
            path: path.to_path_buf(),
            problem: format!("not valid JSON: {error}"),
        }),
        None => Ok(None),
    }
}

pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), OnboardingError> {
    let bytes = serde_json::to_vec_pretty(value).expect("device state serializes");
    write_durably(path, &bytes, PUBLIC_MODE)
}
