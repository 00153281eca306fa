//! A reader for GUID partition tables (UEFI 2.10 §5.3), enough to check an image without
//! external tools.
//!
//! Layout with 512-byte logical blocks: LBA 0 protective MBR; LBA 1 header ("EFI PART",
//! header size at byte 12, header CRC32 at 16, partition entry LBA at 72, entry count at 80,
//! entry size at 84, entries CRC32 at 88); entries of 128 bytes: type GUID 0..16, unique GUID
//! 16..32, first LBA 32..40, last LBA (inclusive) 40..48, attributes 48..56, name as UTF-16LE
//! 56..128. Limits: at most `ENTRIES_MAX` entries of at most `ENTRY_BYTES_MAX` bytes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub const SECTOR_BYTES: u64 = 512;
pub const ENTRIES_MAX: u32 = 1024;
pub const ENTRY_BYTES_MAX: u32 = 4096;
const SIGNATURE: &[u8; 8] = b"EFI PART";

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("failed to read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: no GPT header at LBA 1 (signature {found:?}, expected \"EFI PART\")")]
    NoHeader { path: String, found: String },
    #[error("{path}: GPT {what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { path: String, what: &'static str, stored: u32, computed: u32 },
    #[error("{path}: GPT header field {field} out of range: {value}")]
    Range { path: String, field: &'static str, value: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Partition {
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba - self.first_lba + 1) * SECTOR_BYTES
    }

    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * SECTOR_BYTES
    }
}

/// Reads the primary GPT of `path`, verifying the header and entry-array CRC32s.
pub fn read_partitions(path: &Path) -> Result<Vec<Partition>, GptError> {
    let name = path.display().to_string();
    let io = |source| GptError::Io { path: name.clone(), source };
    let mut file = File::open(path).map_err(io)?;
    let mut header = [0u8; SECTOR_BYTES as usize];
    file.seek(SeekFrom::Start(SECTOR_BYTES)).map_err(io)?;
    file.read_exact(&mut header).map_err(io)?;
    if &header[0..8] != SIGNATURE {
        return Err(GptError::NoHeader {
            path: name,
            found: String::from_utf8_lossy(&header[0..8]).into_owned(),
        });
    }
    let header_size = u32_at(&header, 12);
    if !(92..=SECTOR_BYTES as u32).contains(&header_size) {
        return Err(GptError::Range { path: name, field: "header size", value: header_size.into() });
    }
    let stored_header_crc = u32_at(&header, 16);
    let mut header_copy = header[..header_size as usize].to_vec();
    header_copy[16..20].fill(0);
    let computed = crc32(&header_copy);
    if computed != stored_header_crc {
        return Err(GptError::Checksum { path: name, what: "header", stored: stored_header_crc, computed });
    }
    let entries_lba = u64_at(&header, 72);
    let entry_count = u32_at(&header, 80);
    let entry_bytes = u32_at(&header, 84);
    if entry_count > ENTRIES_MAX {
        return Err(GptError::Range {
            path: name,
            field: "partition entry count",
            value: entry_count.into(),
        });
    }
    if !(128..=ENTRY_BYTES_MAX).contains(&entry_bytes) || !entry_bytes.is_multiple_of(8) {
        return Err(GptError::Range { path: name, field: "partition entry size", value: entry_bytes.into() });
    }
    let mut entries = vec![0u8; entry_count as usize * entry_bytes as usize];
    file.seek(SeekFrom::Start(entries_lba * SECTOR_BYTES)).map_err(io)?;
    file.read_exact(&mut entries).map_err(io)?;
    let stored_entries_crc = u32_at(&header, 88);
    let computed = crc32(&entries);
    if computed != stored_entries_crc {
        return Err(GptError::Checksum {
            path: name,
            what: "partition entries",
            stored: stored_entries_crc,
            computed,
        });
    }

    let mut partitions = Vec::new();
    for (index, entry) in entries.chunks_exact(entry_bytes as usize).enumerate() {
        if entry[0..16].iter().all(|&byte| byte == 0) {
            continue; // Unused entry.
        }
        let first_lba = u64_at(entry, 32);
        let last_lba = u64_at(entry, 40);
        if last_lba < first_lba {
            return Err(GptError::Range { path: name, field: "partition last LBA", value: last_lba });
        }
        let units: Vec<u16> = entry[56..128]
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
            .take_while(|&unit| unit != 0)
            .collect();
        partitions.push(Partition {
            number: index as u32 + 1,
            name: String::from_utf16_lossy(&units),
            type_guid: guid_string(&entry[0..16]),
            first_lba,
            last_lba,
        });
    }
    Ok(partitions)
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

/// GUIDs are stored mixed-endian: the first three fields little-endian, the rest as bytes.
pub fn guid_string(bytes: &[u8]) -> String {
    assert_eq!(bytes.len(), 16);
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
        u16::from_le_bytes(bytes[4..6].try_into().unwrap()),
        u16::from_le_bytes(bytes[6..8].try_into().unwrap()),
        bytes[8],
        bytes[9],
        bytes[10..16].iter().map(|byte| format!("{byte:02x}")).collect::<String>()
    )
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as GPT uses.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// True when an ext2/3/4 superblock magic (0xEF53 at byte 1080) starts at `offset_bytes`.
pub fn has_ext4_superblock(path: &Path, offset_bytes: u64) -> std::io::Result<bool> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset_bytes + 1080))?;
    let mut magic = [0u8; 2];
    file.read_exact(&mut magic)?;
    Ok(u16::from_le_bytes(magic) == 0xEF53)
}
