//! Config parsing: a valid file parses; every bad value is an error naming the file and the key.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use image_build::config::{ConfigError, ImageConfig};

const VALID: &str = r#"
[image]
name = "tributary-appliance"
version = "0.1.0"
board = "qemu-x86_64"
architecture = "amd64"

[appliance]
binary = "appliance"
config = "appliance.toml"
watchdog_sec = 20
health_settle_sec = 5
health_check_command = ["/usr/bin/appliance", "--version"]

[identity]
files = ["claim.cert.pem", "claim.key.pem"]

[packages]
extra = ["ca-certificates"]

[partitions]
slot_mib = 1024
data_mib = 64
"#;

/// A directory with the input files VALID names; `appliance` is a shell script standing in for
/// the appliance binary (only its existence and mode matter to the parser).
fn fixture() -> tempfile::TempDir {
    let directory = tempfile::tempdir().unwrap();
    let write = |name: &str, content: &str, mode: u32| {
        let path = directory.path().join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("appliance", "#!/bin/sh\n# STAND-IN for the appliance binary.\nexit 0\n", 0o755);
    write("not-executable", "data", 0o644);
    write("appliance.toml", "", 0o644);
    write("claim.cert.pem", "TEST CLAIM CERT", 0o644);
    write("claim.key.pem", "TEST CLAIM KEY", 0o600);
    std::fs::create_dir(directory.path().join("other")).unwrap();
    write("other/claim.cert.pem", "TEST CLAIM CERT 2", 0o644);
    directory
}

fn parse(text: &str, directory: &Path) -> (Result<ImageConfig, ConfigError>, PathBuf) {
    let file = directory.join("image.toml");
    (ImageConfig::parse(text, &file), file)
}

/// `replace` is applied to VALID; `expected` is the key named by the error and a fragment of
/// the message, or None when the result must parse.
fn check(replace: (&str, &str), expected: Option<(&str, &str)>) {
    let directory = fixture();
    assert!(VALID.contains(replace.0), "fixture text {:?} not in VALID", replace.0);
    let text = VALID.replacen(replace.0, replace.1, 1);
    let (result, file) = parse(&text, directory.path());
    match (result, expected) {
        (Ok(_), None) => {}
        (Err(error), Some((key, fragment))) => {
            let message = error.to_string();
            assert_eq!(error.key(), Some(key), "wrong key in: {message}");
            assert!(
                message.starts_with(&format!("{}: key `{key}`", file.display())),
                "no file/key in: {message}"
            );
            assert!(message.contains(fragment), "{fragment:?} not in: {message}");
        }
        (Ok(_), Some((key, _))) => panic!("{replace:?} parsed, expected an error about {key}"),
        (Err(error), None) => panic!("{replace:?} failed: {error}"),
    }
}

#[test]
fn valid_file_parses_with_paths_relative_to_the_file() {
    let directory = fixture();
    let (result, _) = parse(VALID, directory.path());
    let config = result.unwrap();
    assert_eq!(config.name, "tributary-appliance");
    assert_eq!(config.board.name, "qemu-x86_64");
    assert_eq!(config.suite, "bookworm");
    assert_eq!(config.appliance.binary, directory.path().join("appliance"));
    assert_eq!(config.appliance.watchdog_sec, 20);
    assert_eq!(config.identity_files.len(), 2);
    assert_eq!(config.extra_packages, ["ca-certificates"]);
    assert_eq!(config.partitions.slot_mib, 1024);
    assert_eq!(config.partitions.data_mib, 64);
    assert_eq!(config.signing, None);
}

#[test]
fn defaults_apply_to_optional_keys() {
    check(("watchdog_sec = 20\n", ""), None);
    check(("[packages]\nextra = [\"ca-certificates\"]\n", ""), None);
    check(("health_check_command = [\"/usr/bin/appliance\", \"--version\"]\n", ""), None);
}

#[test]
fn bad_values_name_file_and_key() {
    check(("name = \"tributary-appliance\"", "name = \"has space\""), Some(("image.name", "A-Z a-z 0-9")));
    check(("name = \"tributary-appliance\"", "name = \"\""), Some(("image.name", "1 to 64")));
    check(("version = \"0.1.0\"", "version = \"0.1 beta\""), Some(("image.version", "without whitespace")));
    check(("board = \"qemu-x86_64\"", "board = \"raspberry\""), Some(("image.board", "qemu-x86_64")));
    check(
        ("architecture = \"amd64\"", "architecture = \"sparc\""),
        Some(("image.architecture", "\"arm64\"")),
    );
    check(
        ("architecture = \"amd64\"", "architecture = \"arm64\""),
        Some(("image.architecture", "board qemu-x86_64")),
    );
    check(("[image]\n", "[image]\nsuite = \"Bookworm!\"\n"), Some(("image.suite", "suite name")));
    check(("binary = \"appliance\"", "binary = \"missing\""), Some(("appliance.binary", "no such file")));
    check(
        ("binary = \"appliance\"", "binary = \"not-executable\""),
        Some(("appliance.binary", "executable")),
    );
    check(
        ("config = \"appliance.toml\"", "config = \"nope.toml\""),
        Some(("appliance.config", "existing file")),
    );
    check(("watchdog_sec = 20", "watchdog_sec = 1"), Some(("appliance.watchdog_sec", "5..=3600")));
    check(
        ("health_settle_sec = 5", "health_settle_sec = 5\nhealth_wait_sec = 0"),
        Some(("appliance.health_wait_sec", "1..=3600")),
    );
    check(
        ("health_settle_sec = 5", "health_settle_sec = 601"),
        Some(("appliance.health_settle_sec", "0..=600")),
    );
    check(
        ("[\"/usr/bin/appliance\", \"--version\"]", "[\"appliance\"]"),
        Some(("appliance.health_check_command", "absolute path")),
    );
    check(
        ("[\"/usr/bin/appliance\", \"--version\"]", "[]"),
        Some(("appliance.health_check_command", "non-empty")),
    );
    check(
        ("files = [\"claim.cert.pem\", \"claim.key.pem\"]", "files = []"),
        Some(("identity.files", "1 to 16")),
    );
    check(
        ("files = [\"claim.cert.pem\", \"claim.key.pem\"]", "files = [\"claim.cert.pem\", \"gone.pem\"]"),
        Some(("identity.files[1]", "no such file")),
    );
    check(
        (
            "files = [\"claim.cert.pem\", \"claim.key.pem\"]",
            "files = [\"claim.cert.pem\", \"other/claim.cert.pem\"]",
        ),
        Some(("identity.files[1]", "unique")),
    );
    check(
        ("extra = [\"ca-certificates\"]", "extra = [\"Bad_Name\"]"),
        Some(("packages.extra[0]", "Debian package")),
    );
    check(("slot_mib = 1024", "slot_mib = 64"), Some(("partitions.slot_mib", "128..=65536")));
    check(("data_mib = 64", "data_mib = 8"), Some(("partitions.data_mib", "16..=1048576")));
}

#[test]
fn type_errors_name_the_dotted_key() {
    check(("slot_mib = 1024", "slot_mib = \"big\""), Some(("partitions.slot_mib", "invalid type")));
    check(("slot_mib = 1024", "slot_mib = -1"), Some(("partitions.slot_mib", "invalid value")));
    check(("watchdog_sec = 20", "watchdog_sec = 2.5"), Some(("appliance.watchdog_sec", "invalid type")));
    check(
        ("files = [\"claim.cert.pem\", \"claim.key.pem\"]", "files = \"claim.cert.pem\""),
        Some(("identity.files", "sequence")),
    );
}

#[test]
fn unknown_and_missing_keys_are_named() {
    check(("slot_mib = 1024", "slot_mib = 1024\nslots = 3"), Some(("partitions.slots", "no such key")));
    check(("[packages]", "[pakages]"), Some(("pakages", "no such key")));
    check(("data_mib = 64\n", ""), Some(("partitions.data_mib", "present")));
}

#[test]
fn signing_paths_must_exist() {
    let with_signing = format!(
        "{VALID}\n[signing]\ncertificate = \"claim.cert.pem\"\nkey = \"nope.pem\"\nkeyring = \"claim.cert.pem\"\n"
    );
    let directory = fixture();
    let (result, _) = parse(&with_signing, directory.path());
    let error = result.unwrap_err();
    assert_eq!(error.key(), Some("signing.key"));
}

#[test]
fn syntax_errors_name_the_file() {
    let directory = fixture();
    let (result, file) = parse("[image\nname = ", directory.path());
    let error = result.unwrap_err();
    assert!(matches!(error, ConfigError::Syntax { .. }));
    assert!(error.to_string().starts_with(&file.display().to_string()));
}

#[test]
fn unreadable_file_is_named() {
    let error = ImageConfig::load(Path::new("/nonexistent/image.toml")).unwrap_err();
    assert_eq!(error.to_string().split(':').next(), Some("failed to read /nonexistent/image.toml"));
}
