//! Small, careful file operations shared by the CA, issued certificates and the revocation list.
//!
//! Every write goes through `durable` (hidden temporary file, fsync, rename or no-clobber hard
//! link, fsync of the directory): a reader sees the old file or the new one, never a torn one,
//! even across a power loss. Every read is bounded by a named maximum before anything is
//! allocated.

use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::FleetError;

/// Mode of private key files: readable and writable by the owner only.
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode of certificates and the revocation list (before the umask): world-readable.
pub const PUBLIC_MODE: u32 = 0o644;

pub(crate) fn io_error(operation: &'static str, path: &Path, source: std::io::Error) -> FleetError {
    FleetError::Io { operation, path: path.to_path_buf(), source }
}

pub(crate) fn create_directory(directory: &Path) -> Result<(), FleetError> {
    fs::create_dir_all(directory).map_err(|source| io_error("create directory", directory, source))
}

impl From<durable::Error> for FleetError {
    fn from(error: durable::Error) -> FleetError {
        FleetError::Io { operation: error.operation, path: error.path, source: error.source }
    }
}

/// Writes `bytes` to `path` durably (`durable`: temporary file with `mode`, fsync, rename,
/// fsync of the directory), replacing what is there.
pub(crate) fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FleetError> {
    Ok(durable::Options::default().mode(mode).write(path, bytes)?)
}

/// Reads a whole file of at most `bytes_max` bytes; `Ok(None)` if it does not exist.
pub fn read_bounded(path: &Path, bytes_max: u64) -> Result<Option<Vec<u8>>, FleetError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error("open", path, source)),
    };
    let length = file.metadata().map_err(|source| io_error("stat", path, source))?.len();
    if length > bytes_max {
        return Err(FleetError::FileTooLarge { path: path.to_path_buf(), length, max: bytes_max });
    }
    let mut bytes = Vec::with_capacity(length as usize);
    // take() guards against a file that grows between the stat and the read.
    file.take(bytes_max + 1).read_to_end(&mut bytes).map_err(|source| io_error("read", path, source))?;
    if bytes.len() as u64 > bytes_max {
        return Err(FleetError::FileTooLarge {
            path: path.to_path_buf(),
            length: bytes.len() as u64,
            max: bytes_max,
        });
    }
    Ok(Some(bytes))
}

/// Reads a text file that must exist, naming `hint` (what creates it) when it does not.
pub(crate) fn read_required_text(path: &Path, bytes_max: u64, hint: &str) -> Result<String, FleetError> {
    let bytes = read_bounded(path, bytes_max)?.ok_or_else(|| {
        io_error("read", path, std::io::Error::new(ErrorKind::NotFound, format!("file not found ({hint})")))
    })?;
    String::from_utf8(bytes).map_err(|error| {
        io_error(
            "read",
            path,
            std::io::Error::new(ErrorKind::InvalidData, format!("not UTF-8 text: {error}")),
        )
    })
}

/// Warns when a private key file is readable by anyone but its owner: the key still works, but
/// the operator should know.
pub(crate) fn warn_if_exposed(path: &Path) {
    if let Ok(metadata) = fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "private key file is accessible to group or others (run chmod 600 on it)"
            );
        }
    }
}
