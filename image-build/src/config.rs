//! The image description: one TOML file, read with `deny_unknown_fields`.
//!
//! Layout (every key below is required unless marked optional):
//!
//! ```toml
//! [image]
//! name = "tributary-appliance"   # output file stem: [A-Za-z0-9._-], 1..=64 characters
//! version = "0.1.0"              # bundle version: 1..=64 characters, no whitespace
//! board = "qemu-x86_64"          # a board profile name (see `board.rs`)
//! architecture = "amd64"         # Debian architecture; must match the board profile
//! suite = "bookworm"             # optional, default "bookworm"
//!
//! [appliance]
//! binary = "appliance"           # executable installed as /usr/bin/appliance
//! config = "appliance.toml"      # installed as /etc/tributary/appliance.toml
//! watchdog_sec = 30              # optional, 5..=3600, default 30
//! health_settle_sec = 10         # optional, 0..=600, default 10
//! health_wait_sec = 120          # optional, 1..=3600, default 120
//! health_check_command = ["/usr/bin/appliance", "--version"]  # optional argv
//!
//! [identity]
//! files = ["claim.pem", "claim.key"]  # copied to the data partition under identity/
//!
//! [packages]
//! extra = ["ca-certificates"]    # optional Debian packages, at most 64
//!
//! [partitions]
//! slot_mib = 512                 # each root slot (A and B), 128..=65536
//! data_mib = 256                 # data partition, 16..=1048576
//!
//! [signing]                      # optional; absent: test keys are generated
//! certificate = "signing.cert.pem"
//! key = "signing.key.pem"
//! keyring = "keyring.pem"
//! ```
//!
//! Relative paths are resolved against the directory of the TOML file. Every error names the
//! file, the dotted key and what was expected.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::board::{self, Architecture, BoardProfile};

/// Smallest root slot: a minimal bookworm rootfs with a kernel and RAUC is about 300 MiB.
pub const SLOT_MIB_MIN: u64 = 128;
pub const SLOT_MIB_MAX: u64 = 65_536;
pub const DATA_MIB_MIN: u64 = 16;
pub const DATA_MIB_MAX: u64 = 1_048_576;
pub const EXTRA_PACKAGES_MAX: usize = 64;
pub const IDENTITY_FILES_MAX: usize = 16;
pub const WATCHDOG_SEC_MIN: u32 = 5;
pub const WATCHDOG_SEC_MAX: u32 = 3600;
pub const HEALTH_SETTLE_SEC_MAX: u32 = 600;
pub const HEALTH_WAIT_SEC_MAX: u32 = 3600;
pub const NAME_CHARS_MAX: usize = 64;

const _: () = assert!(SLOT_MIB_MIN < SLOT_MIB_MAX && DATA_MIB_MIN < DATA_MIB_MAX);
const _: () = assert!(WATCHDOG_SEC_MIN < WATCHDOG_SEC_MAX);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("failed to read {file}: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: invalid TOML: {reason}")]
    Syntax { file: PathBuf, reason: String },
    #[error("{file}: key `{key}`: expected {expected}{}", found_suffix(found))]
    Invalid { file: PathBuf, key: String, expected: String, found: Option<String> },
}

fn found_suffix(found: &Option<String>) -> String {
    match found {
        Some(found) => format!(", found {found}"),
        None => String::new(),
    }
}

impl ConfigError {
    /// The dotted key the error is about, when it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    image: RawImage,
    appliance: RawAppliance,
    identity: RawIdentity,
    #[serde(default)]
    packages: RawPackages,
    partitions: RawPartitions,
    signing: Option<RawSigning>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    name: String,
    version: String,
    board: String,
    architecture: String,
    suite: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppliance {
    binary: PathBuf,
    config: PathBuf,
    watchdog_sec: Option<u32>,
    health_settle_sec: Option<u32>,
    health_wait_sec: Option<u32>,
    health_check_command: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    files: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackages {
    #[serde(default)]
    extra: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartitions {
    slot_mib: u64,
    data_mib: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    certificate: PathBuf,
    key: PathBuf,
    keyring: PathBuf,
}

/// A validated image description; paths are absolute or relative to the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    pub source_file: PathBuf,
    pub name: String,
    pub version: String,
    pub board: &'static BoardProfile,
    pub suite: String,
    pub appliance: ApplianceConfig,
    pub identity_files: Vec<PathBuf>,
    pub extra_packages: Vec<String>,
    pub partitions: Partitions,
    pub signing: Option<SigningPaths>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplianceConfig {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub watchdog_sec: u32,
    pub health_settle_sec: u32,
    /// Bound on waiting for the appliance to become active (its Restart= attempts included).
    pub health_wait_sec: u32,
    pub health_check_command: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions {
    pub slot_mib: u64,
    pub data_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningPaths {
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub keyring: PathBuf,
}

impl ImageConfig {
    /// Reads and validates the file; checks that every named input file exists.
    pub fn load(file: &Path) -> Result<ImageConfig, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|error| ConfigError::Read { file: file.to_path_buf(), reason: error.to_string() })?;
        Self::parse(&text, file)
    }

    /// Parses `text` as if read from `file` (relative paths resolve against its directory).
    pub fn parse(text: &str, file: &Path) -> Result<ImageConfig, ConfigError> {
        let raw = parse_raw(text, file)?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let invalid = |key: &str, expected: &str, found: Option<String>| ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            expected: expected.to_string(),
            found,
        };

        if !is_simple_name(&raw.image.name) {
            return Err(invalid(
                "image.name",
                "1 to 64 characters from A-Z a-z 0-9 . _ -",
                Some(format!("{:?}", raw.image.name)),
            ));
        }
        if raw.image.version.is_empty()
            || raw.image.version.len() > NAME_CHARS_MAX
            || raw.image.version.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "image.version",
                "1 to 64 characters without whitespace",
                Some(format!("{:?}", raw.image.version)),
            ));
        }
        let board = board::find(&raw.image.board).ok_or_else(|| {
            invalid(
                "image.board",
                &format!("one of the board profiles: {}", board::names().join(", ")),
                Some(format!("{:?}", raw.image.board)),
            )
        })?;
        let architecture: Architecture = raw.image.architecture.parse().map_err(|_| {
            invalid(
                "image.architecture",
                "\"amd64\" or \"arm64\"",
                Some(format!("{:?}", raw.image.architecture)),
            )
        })?;
        if architecture != board.architecture {
            return Err(invalid(
                "image.architecture",
                &format!("{:?} (the architecture of board {})", board.architecture.debian_name(), board.name),
                Some(format!("{:?}", raw.image.architecture)),
            ));
        }
        let suite = raw.image.suite.unwrap_or_else(|| "bookworm".to_string());
        if !is_debian_package_name(&suite) {
            return Err(invalid(
                "image.suite",
                "a Debian suite name such as \"bookworm\"",
                Some(format!("{suite:?}")),
            ));
        }

        let binary = existing_file(&base, &raw.appliance.binary, "appliance.binary", file)?;
        if !is_executable(&binary) {
            return Err(invalid(
                "appliance.binary",
                "an executable file (mode +x)",
                Some(format!("{} without execute permission", binary.display())),
            ));
        }
        let appliance_config = existing_file(&base, &raw.appliance.config, "appliance.config", file)?;
        let watchdog_sec = raw.appliance.watchdog_sec.unwrap_or(30);
        if !(WATCHDOG_SEC_MIN..=WATCHDOG_SEC_MAX).contains(&watchdog_sec) {
            return Err(invalid(
                "appliance.watchdog_sec",
                &format!("seconds in {WATCHDOG_SEC_MIN}..={WATCHDOG_SEC_MAX}"),
                Some(watchdog_sec.to_string()),
            ));
        }
        let health_settle_sec = raw.appliance.health_settle_sec.unwrap_or(10);
        if health_settle_sec > HEALTH_SETTLE_SEC_MAX {
            return Err(invalid(
                "appliance.health_settle_sec",
                &format!("seconds in 0..={HEALTH_SETTLE_SEC_MAX}"),
                Some(health_settle_sec.to_string()),
            ));
        }
        let health_wait_sec = raw.appliance.health_wait_sec.unwrap_or(120);
        if !(1..=HEALTH_WAIT_SEC_MAX).contains(&health_wait_sec) {
            return Err(invalid(
                "appliance.health_wait_sec",
                &format!("seconds in 1..={HEALTH_WAIT_SEC_MAX}"),
                Some(health_wait_sec.to_string()),
            ));
        }
        if let Some(command) = &raw.appliance.health_check_command {
            let bad = command.is_empty()
                || !command[0].starts_with('/')
                || command.iter().any(|argument| argument.contains('\n') || argument.contains('\0'));
            if bad {
                return Err(invalid(
                    "appliance.health_check_command",
                    "a non-empty argv whose first element is an absolute path inside the image",
                    Some(format!("{command:?}")),
                ));
            }
        }

        if raw.identity.files.is_empty() || raw.identity.files.len() > IDENTITY_FILES_MAX {
            return Err(invalid(
                "identity.files",
                &format!("1 to {IDENTITY_FILES_MAX} bootstrap claim identity files"),
                Some(format!("{} files", raw.identity.files.len())),
            ));
        }
        let mut identity_files = Vec::with_capacity(raw.identity.files.len());
        let mut seen_names = std::collections::BTreeSet::new();
        for (index, path) in raw.identity.files.iter().enumerate() {
            let key = format!("identity.files[{index}]");
            let resolved = existing_file(&base, path, &key, file)?;
            let name =
                resolved.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            if !seen_names.insert(name.clone()) {
                return Err(invalid(&key, "file names that are unique", Some(format!("a second {name:?}"))));
            }
            identity_files.push(resolved);
        }

        if raw.packages.extra.len() > EXTRA_PACKAGES_MAX {
            return Err(invalid(
                "packages.extra",
                &format!("at most {EXTRA_PACKAGES_MAX} packages"),
                Some(raw.packages.extra.len().to_string()),
            ));
        }
        for (index, package) in raw.packages.extra.iter().enumerate() {
            if !is_debian_package_name(package) {
                return Err(invalid(
                    &format!("packages.extra[{index}]"),
                    "a Debian package name (lowercase letters, digits, + - .; at least 2 characters)",
                    Some(format!("{package:?}")),
                ));
            }
        }

        let partitions = Partitions { slot_mib: raw.partitions.slot_mib, data_mib: raw.partitions.data_mib };
        if !(SLOT_MIB_MIN..=SLOT_MIB_MAX).contains(&partitions.slot_mib) {
            return Err(invalid(
                "partitions.slot_mib",
                &format!("MiB in {SLOT_MIB_MIN}..={SLOT_MIB_MAX}"),
                Some(partitions.slot_mib.to_string()),
            ));
        }
        if !(DATA_MIB_MIN..=DATA_MIB_MAX).contains(&partitions.data_mib) {
            return Err(invalid(
                "partitions.data_mib",
                &format!("MiB in {DATA_MIB_MIN}..={DATA_MIB_MAX}"),
                Some(partitions.data_mib.to_string()),
            ));
        }

        let signing = match raw.signing {
            None => None,
            Some(signing) => Some(SigningPaths {
                certificate: existing_file(&base, &signing.certificate, "signing.certificate", file)?,
                key: existing_file(&base, &signing.key, "signing.key", file)?,
                keyring: existing_file(&base, &signing.keyring, "signing.keyring", file)?,
            }),
        };

        Ok(ImageConfig {
            source_file: file.to_path_buf(),
            name: raw.image.name,
            version: raw.image.version,
            board,
            suite,
            appliance: ApplianceConfig {
                binary,
                config: appliance_config,
                watchdog_sec,
                health_settle_sec,
                health_wait_sec,
                health_check_command: raw.appliance.health_check_command,
            },
            identity_files,
            extra_packages: raw.packages.extra,
            partitions,
            signing,
        })
    }
}

fn parse_raw(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|error| ConfigError::Syntax {
        file: file.to_path_buf(),
        reason: one_line(error.message()),
    })?;
    serde_path_to_error::deserialize::<_, RawConfig>(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let message = one_line(error.inner().message());
        // serde reports an unknown or missing field at its parent; name the field itself.
        let field = backticked(&message);
        let key = match (message.starts_with("unknown field") || message.starts_with("missing field"), field)
        {
            (true, Some(field)) if path == "." => field.to_string(),
            (true, Some(field)) if path != field && !path.ends_with(&format!(".{field}")) => {
                format!("{path}.{field}")
            }
            _ => path,
        };
        let expected = if message.starts_with("unknown field") {
            format!("no such key ({message})")
        } else if message.starts_with("missing field") {
            "this key to be present".to_string()
        } else {
            message
        };
        ConfigError::Invalid { file: file.to_path_buf(), key, expected, found: None }
    })
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let length = message[start..].find('`')?;
    Some(&message[start..start + length])
}

fn existing_file(base: &Path, path: &Path, key: &str, file: &Path) -> Result<PathBuf, ConfigError> {
    let resolved = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
    if resolved.is_file() {
        Ok(resolved)
    } else {
        Err(ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            expected: "a path to an existing file (relative paths start at the TOML file's directory)"
                .to_string(),
            found: Some(format!("{} (no such file)", resolved.display())),
        })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|metadata| metadata.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn is_simple_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_CHARS_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.')
}

/// Debian policy 5.6.1: lowercase alphanumerics and `+ - .`, at least two characters, starting
/// with an alphanumeric.
pub fn is_debian_package_name(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= NAME_CHARS_MAX
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
}
