//! Signed checkpoints in the text format of C2SP `tlog-checkpoint` inside a C2SP `signed-note`,
//! and the Ed25519 key that signs them.
//!
//! ```text
//! <origin>\n
//! <tree size, decimal>\n
//! <root hash, base64>\n
//! \n
//! — <key name> <base64(key id (4 bytes) ‖ Ed25519 signature (64 bytes))>\n
//! ```
//!
//! The key name is the origin; the key id is the first 4 bytes of
//! `SHA-256(key name ‖ "\n" ‖ 0x01 ‖ public key)` (0x01 is the signed-note Ed25519 type). The
//! public key is exported as a verifier key `<name>+<key id, 8 hex>+<base64(0x01 ‖ public key)>`.
//! The signature covers the three body lines with their newlines.
//!
//! Parsing treats the text as hostile: at most [`CHECKPOINT_BYTES_MAX`] bytes, UTF-8, exactly
//! three body lines (no extension lines: this build writes none), a canonical decimal size, a
//! 32-byte root, exactly one signature line from the expected key.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use sha2::{Digest as _, Sha256};

use crate::merkle::Hash;

/// Largest checkpoint note.
pub const CHECKPOINT_BYTES_MAX: usize = 1024;
/// Longest origin (and key name).
pub const ORIGIN_BYTES_MAX: usize = 128;
/// Largest key file (a PKCS#8 Ed25519 document is 83 bytes; a verifier key line about 200).
pub const KEY_FILE_BYTES_MAX: usize = 1024;

const SIGNATURE_TYPE_ED25519: u8 = 0x01;
const SIGNATURE_LINE_PREFIX: &str = "\u{2014} ";
const KEY_ID_BYTES: usize = 4;
const SIGNATURE_BYTES: usize = 64;

const _: () = assert!(ORIGIN_BYTES_MAX * 2 + 20 + 44 + 100 < CHECKPOINT_BYTES_MAX);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint of {length} bytes exceeds {CHECKPOINT_BYTES_MAX}")]
    TooLarge { length: usize },
    #[error("checkpoint is malformed: {0}")]
    Malformed(String),
    #[error("checkpoint is signed by key {found:?}, not by {expected:?}")]
    UnknownKey { found: String, expected: String },
    #[error("checkpoint signature does not verify")]
    BadSignature,
    #[error("verifier key is malformed: {0}")]
    BadVerifierKey(String),
}

fn malformed(reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Malformed(reason.into())
}

/// An origin: a non-empty line of printable ASCII without spaces or '+'.
pub fn validate_origin(origin: &str) -> Result<(), String> {
    if origin.is_empty() || origin.len() > ORIGIN_BYTES_MAX {
        return Err(format!("origin of {} bytes: expected 1..={ORIGIN_BYTES_MAX}", origin.len()));
    }
    if !origin.bytes().all(|byte| byte.is_ascii_graphic() && byte != b'+') {
        return Err(format!("origin {origin:?}: only printable ASCII without spaces or '+'"));
    }
    Ok(())
}

/// What a checkpoint commits to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub tree_size: u64,
    pub root_hash: Hash,
}

impl Checkpoint {
    /// The signed body: three lines.
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.tree_size, BASE64.encode(self.root_hash))
    }
}

fn key_id(name: &str, public_key: &[u8; 32]) -> [u8; KEY_ID_BYTES] {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update(b"\n");
    hasher.update([SIGNATURE_TYPE_ED25519]);
    hasher.update(public_key);
    let digest = hasher.finalize();
    digest[..KEY_ID_BYTES].try_into().expect("4 bytes")
}

/// The public half: checks checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    pub name: String,
    pub key_id: [u8; KEY_ID_BYTES],
    pub public_key: [u8; 32],
}

impl Verifier {
    pub fn new(name: &str, public_key: [u8; 32]) -> Verifier {
        Verifier { name: name.to_string(), key_id: key_id(name, &public_key), public_key }
    }

    /// `<name>+<key id hex>+<base64(0x01 ‖ public key)>`.
    pub fn to_text(&self) -> String {
        let mut typed = vec![SIGNATURE_TYPE_ED25519];
        typed.extend_from_slice(&self.public_key);
        let id: String = self.key_id.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("{}+{id}+{}", self.name, BASE64.encode(typed))
    }

    pub fn parse(text: &str) -> Result<Verifier, CheckpointError> {
        let bad = |reason: &str| CheckpointError::BadVerifierKey(reason.to_string());
        if text.len() > KEY_FILE_BYTES_MAX {
            return Err(bad("too long"));
        }
        let text = text.trim_end_matches('\n');
        // The name holds no '+'; the base64 key may.
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected name+id+key"));
        };
        validate_origin(name).map_err(|reason| bad(&reason))?;
        let typed = BASE64.decode(key).map_err(|_| bad("key is not base64"))?;
        let [kind, public_key @ ..] = typed.as_slice() else { return Err(bad("empty key")) };
        if *kind != SIGNATURE_TYPE_ED25519 {
            return Err(bad("not an Ed25519 key"));
        }
        let public_key: [u8; 32] = public_key.try_into().map_err(|_| bad("Ed25519 keys are 32 bytes"))?;
        let verifier = Verifier::new(name, public_key);
        let expected_id: String = verifier.key_id.iter().map(|byte| format!("{byte:02x}")).collect();
        if id != expected_id {
            return Err(bad("key id does not match the key"));
        }
        Ok(verifier)
    }

    /// Parses a signed checkpoint note and checks its signature.
    pub fn open(&self, note: &[u8]) -> Result<Checkpoint, CheckpointError> {
        if note.len() > CHECKPOINT_BYTES_MAX {
            return Err(CheckpointError::TooLarge { length: note.len() });
        }
        let text = std::str::from_utf8(note).map_err(|_| malformed("not UTF-8"))?;
        let (body, signatures) = text.split_once("\n\n").ok_or_else(|| malformed("no blank line"))?;
        let body = format!("{body}\n");
        let lines: Vec<&str> = body.lines().collect();
        let [origin, size, root] = lines[..] else {
            return Err(malformed(format!("{} body lines, expected 3", lines.len())));
        };
        validate_origin(origin).map_err(malformed)?;
        let tree_size: u64 = size.parse().map_err(|_| malformed("tree size is not a number"))?;
        if tree_size.to_string() != size {
            return Err(malformed("tree size is not canonical decimal"));
        }
        let root_hash: Hash = BASE64
            .decode(root)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| malformed("root hash is not 32 base64 bytes"))?;
        let signature_lines: Vec<&str> =
            signatures.strip_suffix('\n').unwrap_or("\u{0}").split('\n').collect();
        let [line] = signature_lines[..] else {
            return Err(malformed("expected exactly one signature line ending in a newline"));
        };
        let rest = line.strip_prefix(SIGNATURE_LINE_PREFIX).ok_or_else(|| malformed("signature line"))?;
        let (name, signature) = rest.split_once(' ').ok_or_else(|| malformed("signature line"))?;
        let signature = BASE64.decode(signature).map_err(|_| malformed("signature is not base64"))?;
        if signature.len() != KEY_ID_BYTES + SIGNATURE_BYTES {
            return Err(malformed("signature is not key id and 64 bytes"));
        }
        if name != self.name || signature[..KEY_ID_BYTES] != self.key_id {
            let hex = |id: &[u8]| id.iter().map(|byte| format!("{byte:02x}")).collect::<String>();
            return Err(CheckpointError::UnknownKey {
                found: format!("{name}+{}", hex(&signature[..KEY_ID_BYTES])),
                expected: format!("{}+{}", self.name, hex(&self.key_id)),
            });
        }
        UnparsedPublicKey::new(&ED25519, &self.public_key)
            .verify(body.as_bytes(), &signature[KEY_ID_BYTES..])
            .map_err(|_| CheckpointError::BadSignature)?;
        let checkpoint = Checkpoint { origin: origin.to_string(), tree_size, root_hash };
        assert_eq!(checkpoint.body(), body, "a parsed checkpoint re-encodes to its signed body");
        Ok(checkpoint)
    }
}

/// The private half: signs checkpoints.
pub struct Signer {
    key_pair: Ed25519KeyPair,
    verifier: Verifier,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Signer").field("verifier", &self.verifier).finish_non_exhaustive()
    }
}

/// Where an archive keeps its keys.
pub fn signing_key_path(root: &Path) -> PathBuf {
    root.join("keys").join("checkpoint-signing.pk8")
}

pub fn verifier_key_path(root: &Path) -> PathBuf {
    root.join("keys").join("checkpoint.vkey")
}

impl Signer {
    pub fn from_pkcs8(name: &str, pkcs8: &[u8]) -> Result<Signer, String> {
        validate_origin(name)?;
        let key_pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|error| format!("signing key: {error}"))?;
        let public_key: [u8; 32] =
            key_pair.public_key().as_ref().try_into().map_err(|_| "public key size")?;
        Ok(Signer { key_pair, verifier: Verifier::new(name, public_key) })
    }

    /// Loads the archive's signing key, generating it (mode 0600) and exporting the verifier key
    /// on first use.
    pub fn load_or_create(root: &Path, name: &str) -> Result<Signer, String> {
        let path = signing_key_path(root);
        let pkcs8 = match fs::metadata(&path) {
            Ok(metadata) if metadata.len() > KEY_FILE_BYTES_MAX as u64 => {
                return Err(format!("{}: {} bytes is not a key", path.display(), metadata.len()));
            }
            Ok(_) => fs::read(&path).map_err(|error| format!("{}: {error}", path.display()))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let directory = path.parent().expect("keys directory");
                fs::create_dir_all(directory).map_err(|error| format!("{}: {error}", directory.display()))?;
                let document = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                    .map_err(|_| "generating the signing key failed".to_string())?;
                durable::Options::default()
                    .mode(0o600)
                    .keep_existing()
                    .write(&path, document.as_ref())
                    .map_err(|error| error.to_string())?;
                tracing::info!(path = %path.display(), "generated the archive's checkpoint signing key");
                document.as_ref().to_vec()
            }
            Err(error) => return Err(format!("{}: {error}", path.display())),
        };
        let signer = Signer::from_pkcs8(name, &pkcs8)?;
        let verifier_path = verifier_key_path(root);
        let text = format!("{}\n", signer.verifier.to_text());
        match fs::read_to_string(&verifier_path) {
            Ok(published) if published == text => {}
            // A published key is never replaced: another origin or another signing key would
            // make every earlier checkpoint unverifiable.
            Ok(published) => {
                return Err(format!(
                    "{} holds {:?}, which is not the key of {} under origin {name:?} (the origin and the \
                     signing key of an archive cannot change)",
                    verifier_path.display(),
                    published.trim_end(),
                    path.display()
                ));
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                write_synced(&verifier_path, text.as_bytes())?;
            }
            Err(error) => return Err(format!("{}: {error}", verifier_path.display())),
        }
        Ok(signer)
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The signed note of `checkpoint`.
    pub fn sign(&self, checkpoint: &Checkpoint) -> Vec<u8> {
        assert_eq!(checkpoint.origin, self.verifier.name, "the key name is the origin");
        let body = checkpoint.body();
        let signature = self.key_pair.sign(body.as_bytes());
        let mut signed = self.verifier.key_id.to_vec();
        signed.extend_from_slice(signature.as_ref());
        let note =
            format!("{body}\n{SIGNATURE_LINE_PREFIX}{} {}\n", self.verifier.name, BASE64.encode(signed));
        assert!(note.len() <= CHECKPOINT_BYTES_MAX);
        note.into_bytes()
    }
}

/// Writes `bytes` to `path` through a temporary file, fsyncing file and directory.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    durable::write(path, bytes).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        let document = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Signer::from_pkcs8("tributary.example/archive", document.as_ref()).unwrap()
    }

    #[test]
    fn signs_and_opens() {
        let signer = self::signer();
        let checkpoint =
            Checkpoint { origin: "tributary.example/archive".into(), tree_size: 42, root_hash: [7; 32] };
        let note = signer.sign(&checkpoint);
        assert_eq!(signer.verifier().open(&note), Ok(checkpoint.clone()));
        let verifier = Verifier::parse(&signer.verifier().to_text()).unwrap();
        assert_eq!(&verifier, signer.verifier());
        assert_eq!(verifier.open(&note), Ok(checkpoint));
        let other_key = self::signer();
        assert!(matches!(other_key.verifier().open(&note), Err(CheckpointError::UnknownKey { .. })));
    }

    #[test]
    fn refuses_tampered_or_hostile_notes() {
        let signer = signer();
        let note = signer.sign(&Checkpoint {
            origin: "tributary.example/archive".into(),
            tree_size: 42,
            root_hash: [7; 32],
        });
        let text = String::from_utf8(note.clone()).unwrap();
        let check = |input: &[u8], expected: fn(&CheckpointError) -> bool| {
            let result = signer.verifier().open(input);
            assert!(result.as_ref().is_err_and(expected), "{:?}: {result:?}", String::from_utf8_lossy(input));
        };
        check(text.replace("\n42\n", "\n43\n").as_bytes(), |error| *error == CheckpointError::BadSignature);
        check(text.replace("\n42\n", "\n042\n").as_bytes(), |error| {
            matches!(error, CheckpointError::Malformed(_))
        });
        check(text.replace("\n\n", "\nextension\n\n").as_bytes(), |error| {
            matches!(error, CheckpointError::Malformed(_))
        });
        check(&note[..note.len() - 1], |error| matches!(error, CheckpointError::Malformed(_)));
        check(&[b'x'; CHECKPOINT_BYTES_MAX + 1], |error| matches!(error, CheckpointError::TooLarge { .. }));
        // Every single flipped bit is refused.
        for position in 0..note.len() {
            for bit in 0..8 {
                let mut flipped = note.clone();
                flipped[position] ^= 1 << bit;
                assert!(
                    signer.verifier().open(&flipped).is_err(),
                    "flip of bit {bit} at {position} accepted"
                );
            }
        }
        // Arbitrary bytes never panic.
        let mut state = 0x5151_u64;
        for length in 0..2000 {
            let mut bytes = note.clone();
            for _ in 0..length % 7 + 1 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let position = (state >> 33) as usize % bytes.len();
                bytes[position] = (state >> 20) as u8;
            }
            bytes.truncate((state >> 40) as usize % (bytes.len() + 1));
            let _ = signer.verifier().open(&bytes);
            let _ = Verifier::parse(&String::from_utf8_lossy(&bytes));
        }
    }
}
