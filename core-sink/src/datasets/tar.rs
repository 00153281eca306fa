//! POSIX ustar writer for WebDataset shards, written by hand so that every byte is ours to check.
//!
//! Layout of an archive (POSIX.1-1988 ustar, as read by GNU tar, Python's `tarfile` and
//! `webdataset`):
//!
//! ```text
//! member*  := header (512 bytes) ‖ data (size bytes) ‖ zero padding to the next 512-byte boundary
//! archive  := member* ‖ two zero blocks (1024 bytes)
//! ```
//!
//! Header fields (offset, width): name (0, 100), mode (100, 8) `0000644\0`, uid (108, 8) and gid
//! (116, 8) `0000000\0`, size (124, 12) and mtime (136, 12) as 11 octal digits and NUL, checksum
//! (148, 8) as 6 octal digits, NUL and space, typeflag (156, 1) `'0'`, linkname (157, 100) zero,
//! magic (257, 6) `ustar\0`, version (263, 2) `00`, uname (265, 32) and gname (297, 32) empty,
//! devmajor (329, 8) and devminor (337, 8) `0000000\0`, prefix (345, 155), zero to 512.
//!
//! Limits: a member name is at most 100 bytes in the name field, or up to 256 bytes when split at
//! a '/' into a prefix of at most 155 bytes and a name of at most 100 bytes (`MEMBER_NAME_BYTES_MAX`);
//! a member holds at most 8 GiB − 1 bytes (`MEMBER_BYTES_MAX`, 11 octal digits); mtime is at most
//! 8^11 − 1 seconds (year 2242). Anything beyond is refused with `InvalidInput`, never written in
//! a GNU or pax extension: stock readers must see plain ustar.
//!
//! Names are checked to be safe to extract: relative, '/'-separated, printable ASCII, no empty,
//! "." or ".." components. WebDataset groups members into samples by the name up to the first dot
//! of the last component; choosing keys without dots is the caller's business.
//!
//! After an I/O error the writer refuses further members: the archive behind it is torn.

use std::io::{self, Write};

pub const TAR_BLOCK_BYTES: usize = 512;

/// Width of the ustar name field.
pub const MEMBER_NAME_FIELD_BYTES: usize = 100;
/// Width of the ustar prefix field.
pub const MEMBER_PREFIX_FIELD_BYTES: usize = 155;
/// Longest name a plain ustar header can carry: prefix, the '/' the reader puts back, name.
pub const MEMBER_NAME_BYTES_MAX: usize = MEMBER_PREFIX_FIELD_BYTES + 1 + MEMBER_NAME_FIELD_BYTES;
/// Largest member: the size field holds 11 octal digits.
pub const MEMBER_BYTES_MAX: u64 = OCTAL_11_DIGITS_MAX;
/// Latest mtime: the mtime field holds 11 octal digits.
pub const MEMBER_MTIME_SECONDS_MAX: u64 = OCTAL_11_DIGITS_MAX;

const OCTAL_11_DIGITS_MAX: u64 = (1 << 33) - 1;
const END_OF_ARCHIVE_BYTES: usize = 2 * TAR_BLOCK_BYTES;

const NAME_OFFSET: usize = 0;
const MODE_OFFSET: usize = 100;
const UID_OFFSET: usize = 108;
const GID_OFFSET: usize = 116;
const SIZE_OFFSET: usize = 124;
const MTIME_OFFSET: usize = 136;
const CHECKSUM_OFFSET: usize = 148;
const CHECKSUM_FIELD_BYTES: usize = 8;
const TYPEFLAG_OFFSET: usize = 156;
const MAGIC_OFFSET: usize = 257;
const VERSION_OFFSET: usize = 263;
const DEVMAJOR_OFFSET: usize = 329;
const DEVMINOR_OFFSET: usize = 337;
const PREFIX_OFFSET: usize = 345;
const HEADER_USED_BYTES: usize = PREFIX_OFFSET + MEMBER_PREFIX_FIELD_BYTES;

/// A regular file, readable by its owner and everyone, writable by the owner.
const MODE_REGULAR_FILE: &[u8; 8] = b"0000644\0";
const ID_ROOT: &[u8; 8] = b"0000000\0";
const DEVICE_NUMBER_ZERO: &[u8; 8] = b"0000000\0";
const TYPEFLAG_REGULAR_FILE: u8 = b'0';
const MAGIC_USTAR: &[u8; 6] = b"ustar\0";
const VERSION_USTAR: &[u8; 2] = b"00";

const _: () = assert!(HEADER_USED_BYTES == 500);
const _: () = assert!(HEADER_USED_BYTES <= TAR_BLOCK_BYTES);
const _: () = assert!(MEMBER_BYTES_MAX == 8 * 1024 * 1024 * 1024 - 1);
// The largest checksum (every byte 0xff) fits the 6 octal digits written.
const _: () = assert!(TAR_BLOCK_BYTES * 255 < 8usize.pow(6));

/// Writes a ustar archive member by member to `out`. Each member costs three `write_all` calls;
/// give it a `BufWriter` when `out` is a file and members are small.
pub struct TarShardWriter<W: Write> {
    out: W,
    bytes_written: u64,
    members: u64,
    /// Set when a write failed: the archive is torn and must not be continued.
    failed: bool,
}

impl<W: Write> TarShardWriter<W> {
    pub fn new(out: W) -> Self {
        TarShardWriter { out, bytes_written: 0, members: 0, failed: false }
    }

    /// One regular-file member. `name` is relative, '/'-separated, no "..", no leading '/', ASCII;
    /// up to 100 bytes in the name field, longer names split into the 155-byte ustar prefix at a
    /// '/'; longer than that -> `io::ErrorKind::InvalidInput`. Mode 0644, uid/gid 0, uname/gname
    /// empty, typeflag '0', magic "ustar\0" version "00". Data is padded to 512 bytes.
    pub fn append_file(&mut self, name: &str, mtime_seconds: u64, data: &[u8]) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(format!(
                "tar shard: refusing member {name:?}: an earlier write failed and the archive is torn"
            )));
        }
        let header = member_header(name, mtime_seconds, data.len() as u64)?;
        let padding_bytes = padding_bytes(data.len() as u64);
        let result = self.write_member(&header, data, padding_bytes);
        if result.is_err() {
            self.failed = true;
        }
        result.map_err(|error| {
            io::Error::new(error.kind(), format!("tar shard: failed to write member {name:?}: {error}"))
        })
    }

    fn write_member(
        &mut self,
        header: &[u8; TAR_BLOCK_BYTES],
        data: &[u8],
        padding: usize,
    ) -> io::Result<()> {
        const ZEROS: [u8; TAR_BLOCK_BYTES] = [0; TAR_BLOCK_BYTES];
        assert!(padding < TAR_BLOCK_BYTES);
        let bytes_before = self.bytes_written;
        self.out.write_all(header)?;
        self.out.write_all(data)?;
        self.out.write_all(&ZEROS[..padding])?;
        self.bytes_written += (TAR_BLOCK_BYTES + data.len() + padding) as u64;
        self.members += 1;
        assert!(self.bytes_written.is_multiple_of(TAR_BLOCK_BYTES as u64));
        assert!(self.bytes_written > bytes_before);
        Ok(())
    }

    /// Bytes written so far, headers and padding included (the end-of-archive blocks only after
    /// `finish`).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Members appended so far.
    pub fn members(&self) -> u64 {
        self.members
    }

    /// Writes the two zero end-of-archive blocks, flushes, returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.failed {
            return Err(io::Error::other("tar shard: not finishing: an earlier write failed"));
        }
        let context = |error: io::Error| {
            io::Error::new(
                error.kind(),
                format!("tar shard: failed to write the end of the archive: {error}"),
            )
        };
        self.out.write_all(&[0; END_OF_ARCHIVE_BYTES]).map_err(context)?;
        self.out.flush().map_err(context)?;
        self.bytes_written += END_OF_ARCHIVE_BYTES as u64;
        Ok(self.out)
    }
}

/// Zero bytes after `size` bytes of data up to the next block boundary.
pub fn padding_bytes(size: u64) -> usize {
    let remainder = (size % TAR_BLOCK_BYTES as u64) as usize;
    if remainder == 0 { 0 } else { TAR_BLOCK_BYTES - remainder }
}

/// The 512-byte ustar header of a regular file, checksum included.
pub fn member_header(name: &str, mtime_seconds: u64, size: u64) -> io::Result<[u8; TAR_BLOCK_BYTES]> {
    let (prefix, short_name) = split_member_name(name)?;
    if size > MEMBER_BYTES_MAX {
        return Err(invalid_input(format!(
            "tar member {name:?}: {size} bytes is above the ustar limit of {MEMBER_BYTES_MAX} bytes"
        )));
    }
    if mtime_seconds > MEMBER_MTIME_SECONDS_MAX {
        return Err(invalid_input(format!(
            "tar member {name:?}: mtime {mtime_seconds} s is above the ustar limit of {MEMBER_MTIME_SECONDS_MAX} s"
        )));
    }

    let mut header = [0u8; TAR_BLOCK_BYTES];
    header[NAME_OFFSET..NAME_OFFSET + short_name.len()].copy_from_slice(short_name.as_bytes());
    header[MODE_OFFSET..MODE_OFFSET + 8].copy_from_slice(MODE_REGULAR_FILE);
    header[UID_OFFSET..UID_OFFSET + 8].copy_from_slice(ID_ROOT);
    header[GID_OFFSET..GID_OFFSET + 8].copy_from_slice(ID_ROOT);
    header[SIZE_OFFSET..SIZE_OFFSET + 12].copy_from_slice(&octal_11_digits(size));
    header[MTIME_OFFSET..MTIME_OFFSET + 12].copy_from_slice(&octal_11_digits(mtime_seconds));
    header[TYPEFLAG_OFFSET] = TYPEFLAG_REGULAR_FILE;
    header[MAGIC_OFFSET..MAGIC_OFFSET + 6].copy_from_slice(MAGIC_USTAR);
    header[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(VERSION_USTAR);
    header[DEVMAJOR_OFFSET..DEVMAJOR_OFFSET + 8].copy_from_slice(DEVICE_NUMBER_ZERO);
    header[DEVMINOR_OFFSET..DEVMINOR_OFFSET + 8].copy_from_slice(DEVICE_NUMBER_ZERO);
    header[PREFIX_OFFSET..PREFIX_OFFSET + prefix.len()].copy_from_slice(prefix.as_bytes());

    // POSIX: the checksum is the sum of all header bytes as unsigned, with the checksum field
    // itself taken as eight spaces; written as six octal digits, NUL, space (as Python and GNU
    // tar write it).
    header[CHECKSUM_OFFSET..CHECKSUM_OFFSET + CHECKSUM_FIELD_BYTES].fill(b' ');
    let checksum = header_checksum(&header);
    let digits = format!("{checksum:06o}");
    assert_eq!(digits.len(), 6);
    header[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 6].copy_from_slice(digits.as_bytes());
    header[CHECKSUM_OFFSET + 6] = 0;
    header[CHECKSUM_OFFSET + 7] = b' ';
    assert!(header_checksum_is_valid(&header));
    Ok(header)
}

/// Sum of the header bytes with the checksum field counted as spaces.
pub fn header_checksum(header: &[u8; TAR_BLOCK_BYTES]) -> u32 {
    let checksum_field = CHECKSUM_OFFSET..CHECKSUM_OFFSET + CHECKSUM_FIELD_BYTES;
    header
        .iter()
        .enumerate()
        .map(
            |(offset, &byte)| {
                if checksum_field.contains(&offset) { u32::from(b' ') } else { u32::from(byte) }
            },
        )
        .sum()
}

/// Whether the octal number stored in the checksum field equals the computed sum.
pub fn header_checksum_is_valid(header: &[u8; TAR_BLOCK_BYTES]) -> bool {
    let field = &header[CHECKSUM_OFFSET..CHECKSUM_OFFSET + CHECKSUM_FIELD_BYTES];
    let digits: Vec<u8> = field.iter().copied().filter(|byte| *byte != 0 && *byte != b' ').collect();
    let Ok(text) = std::str::from_utf8(&digits) else { return false };
    u32::from_str_radix(text, 8).is_ok_and(|stored| stored == header_checksum(header))
}

/// Splits a checked name into (prefix, name) fields; the prefix is empty when the name fits.
pub fn split_member_name(name: &str) -> io::Result<(&str, &str)> {
    check_member_name(name)?;
    if name.len() <= MEMBER_NAME_FIELD_BYTES {
        return Ok(("", name));
    }
    // Split at the rightmost '/' that keeps the prefix within its field (as Python's tarfile
    // does); the reader joins prefix, '/', name.
    let split = name.match_indices('/').map(|(offset, _)| offset).rfind(|&offset| {
        offset <= MEMBER_PREFIX_FIELD_BYTES && name.len() - offset - 1 <= MEMBER_NAME_FIELD_BYTES
    });
    match split {
        Some(offset) => {
            let (prefix, rest) = (&name[..offset], &name[offset + 1..]);
            assert!(!prefix.is_empty() && prefix.len() <= MEMBER_PREFIX_FIELD_BYTES);
            assert!(!rest.is_empty() && rest.len() <= MEMBER_NAME_FIELD_BYTES);
            Ok((prefix, rest))
        }
        None => Err(invalid_input(format!(
            "tar member name of {} bytes does not fit ustar: it needs a '/' leaving at most \
             {MEMBER_PREFIX_FIELD_BYTES} bytes before and {MEMBER_NAME_FIELD_BYTES} after ({name:?})",
            name.len()
        ))),
    }
}

fn check_member_name(name: &str) -> io::Result<()> {
    let refuse = |reason: &str| Err(invalid_input(format!("tar member name {name:?} refused: {reason}")));
    if name.is_empty() {
        return refuse("empty");
    }
    if name.len() > MEMBER_NAME_BYTES_MAX {
        return refuse(&format!("{} bytes, above the ustar limit of {MEMBER_NAME_BYTES_MAX}", name.len()));
    }
    if !name.bytes().all(|byte| byte.is_ascii_graphic() || byte == b' ') {
        return refuse("only printable ASCII is allowed");
    }
    if name.contains('\\') {
        return refuse("'\\' is not a path separator here");
    }
    if name.starts_with('/') {
        return refuse("absolute");
    }
    if name.split('/').any(|component| component.is_empty() || component == "." || component == "..") {
        return refuse("empty, \".\" or \"..\" component");
    }
    Ok(())
}

fn octal_11_digits(value: u64) -> [u8; 12] {
    assert!(value <= OCTAL_11_DIGITS_MAX);
    let mut field = [0u8; 12];
    field[..11].copy_from_slice(format!("{value:011o}").as_bytes());
    field
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}
