//! Dataset file formats at their boundary with stock readers: tar shards through GNU tar, Python's
//! tarfile and webdataset; Parquet files through the parquet crate's reader and pyarrow.
//!
//! The Python readers (`tests/read_datasets.py`) need `pip install pyarrow webdataset`. Without
//! them the tests that use them fail when `CI` is set and print a loud skip otherwise.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use core_sink::datasets::parquet::{
    DatasetFormatError, OwnedSeriesRow, ParquetShardWriter, SERIES_PAYLOAD_BYTES_MAX, SERIES_TEXT_BYTES_MAX,
    SeriesRow, read_parquet_rows,
};
use core_sink::datasets::tar::{MEMBER_BYTES_MAX, MEMBER_MTIME_SECONDS_MAX, TAR_BLOCK_BYTES, TarShardWriter};
use core_sink::datasets::typed::{Cell, ColumnType};

// ustar header fields, re-declared from POSIX.1 (pax, "ustar Interchange Format") rather than
// taken from the writer under test.
const NAME: std::ops::Range<usize> = 0..100;
const MODE: std::ops::Range<usize> = 100..108;
const UID: std::ops::Range<usize> = 108..116;
const GID: std::ops::Range<usize> = 116..124;
const SIZE: std::ops::Range<usize> = 124..136;
const MTIME: std::ops::Range<usize> = 136..148;
const CHECKSUM: std::ops::Range<usize> = 148..156;
const TYPEFLAG: usize = 156;
const MAGIC: std::ops::Range<usize> = 257..263;
const VERSION: std::ops::Range<usize> = 263..265;
const PREFIX: std::ops::Range<usize> = 345..500;

/// The Python reader script, next to the workspace's other tests.
fn read_datasets_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/read_datasets.py")
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Deterministic bytes (xorshift), so failures reproduce.
fn pseudo_random_bytes(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn run(command: &mut Command) -> (String, String) {
    let output = command.output().unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    (stdout, stderr)
}

// ---------------------------------------------------------------------------------------------
// tar

struct Member {
    name: String,
    mtime_seconds: u64,
    data: Vec<u8>,
}

fn member(name: &str, mtime_seconds: u64, data: Vec<u8>) -> Member {
    Member { name: name.to_owned(), mtime_seconds, data }
}

fn write_archive(members: &[Member]) -> Vec<u8> {
    let mut writer = TarShardWriter::new(Vec::new());
    let mut expected_bytes = 0u64;
    for member in members {
        writer.append_file(&member.name, member.mtime_seconds, &member.data).expect("append member");
        expected_bytes += (TAR_BLOCK_BYTES + member.data.len().next_multiple_of(TAR_BLOCK_BYTES)) as u64;
        assert_eq!(writer.bytes_written(), expected_bytes);
    }
    assert_eq!(writer.members(), members.len() as u64);
    let archive = writer.finish().expect("finish archive");
    assert_eq!(archive.len() as u64, expected_bytes + 2 * TAR_BLOCK_BYTES as u64);
    assert!(archive[archive.len() - 2 * TAR_BLOCK_BYTES..].iter().all(|byte| *byte == 0));
    archive
}

/// Writes `members`, then checks every header by the POSIX rules and the archive through GNU tar
/// (listing and extraction) and Python's tarfile.
fn check_tar(members: &[Member]) {
    let archive = write_archive(members);
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("shard.tar");
    std::fs::write(&path, &archive).expect("write archive");

    // Headers, read with the offsets above.
    let mut offset = 0;
    for member in members {
        let header: &[u8] = &archive[offset..offset + TAR_BLOCK_BYTES];
        check_header_checksum(header);
        let prefix = field_text(&header[PREFIX]);
        let name = field_text(&header[NAME]);
        let full_name = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        assert_eq!(full_name, member.name);
        assert_eq!(&header[MODE], b"0000644\0");
        assert_eq!(&header[UID], b"0000000\0");
        assert_eq!(&header[GID], b"0000000\0");
        assert_eq!(octal_field(&header[SIZE]), member.data.len() as u64);
        assert_eq!(octal_field(&header[MTIME]), member.mtime_seconds);
        assert_eq!(header[TYPEFLAG], b'0');
        assert_eq!(&header[MAGIC], b"ustar\0");
        assert_eq!(&header[VERSION], b"00");
        offset += TAR_BLOCK_BYTES;
        assert_eq!(&archive[offset..offset + member.data.len()], member.data.as_slice());
        offset += member.data.len().next_multiple_of(TAR_BLOCK_BYTES);
    }

    // GNU tar: the listing shows each member as a regular file of the right size and mode, with
    // no warning (a torn end or a bad checksum makes tar warn or fail).
    let (listing, warnings) = run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("-tvf")
        .arg(&path)
        .env("LC_ALL", "C")
        .env("TZ", "UTC"));
    assert_eq!(warnings, "", "GNU tar warned");
    let listed: Vec<(String, u64, String)> = listing
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(fields.len() >= 6, "unexpected tar listing line {line:?}");
            let size = fields[2].parse().unwrap_or_else(|_| panic!("size in {line:?}"));
            (fields[0].to_owned(), size, fields[5..].join(" "))
        })
        .collect();
    let expected: Vec<(String, u64, String)> = members
        .iter()
        .map(|member| ("-rw-r--r--".to_owned(), member.data.len() as u64, member.name.clone()))
        .collect();
    assert_eq!(listed, expected);

    // GNU tar extraction gives back the bytes and the mtime.
    let extracted = directory.path().join("extracted");
    std::fs::create_dir(&extracted).expect("extraction directory");
    run(Command::new("tar").arg("-xf").arg(&path).arg("-C").arg(&extracted).arg("--no-same-owner"));
    for member in members {
        let path = extracted.join(&member.name);
        assert_eq!(std::fs::read(&path).expect("extracted member"), member.data, "{}", member.name);
        let modified = std::fs::metadata(&path).and_then(|metadata| metadata.modified()).expect("mtime");
        let modified_seconds = modified.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
        assert_eq!(modified_seconds, member.mtime_seconds, "{}", member.name);
    }

    // Python's tarfile in streaming mode, as webdataset opens shards.
    let script = "import hashlib, json, sys, tarfile\n\
        with tarfile.open(sys.argv[1], mode='r|') as archive:\n\
        \x20   for info in archive:\n\
        \x20       data = archive.extractfile(info).read() if info.isreg() else b''\n\
        \x20       print(json.dumps([info.name, info.size, info.mtime, info.mode, info.uid, info.gid,\n\
        \x20                         info.isreg(), hashlib.sha256(data).hexdigest()]))\n";
    let (stdout, _) = run(Command::new("python3").arg("-c").arg(script).arg(&path));
    let seen: Vec<String> = stdout.lines().map(str::to_owned).collect();
    let expected: Vec<String> = members
        .iter()
        .map(|member| {
            format!(
                "[{:?}, {}, {}, 420, 0, 0, true, \"{}\"]",
                member.name,
                member.data.len(),
                member.mtime_seconds,
                sha256_hex(&member.data)
            )
        })
        .collect();
    assert_eq!(seen, expected);
}

fn field_text(field: &[u8]) -> String {
    let end = field.iter().position(|byte| *byte == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec()).expect("ASCII field")
}

fn octal_field(field: &[u8]) -> u64 {
    let text = field_text(field);
    u64::from_str_radix(text.trim(), 8).unwrap_or_else(|_| panic!("octal field {text:?}"))
}

/// POSIX: the sum of all header bytes as unsigned, the checksum field counted as spaces, stored
/// as octal followed by NUL or space.
fn check_header_checksum(header: &[u8]) {
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(offset, byte)| if CHECKSUM.contains(&offset) { u64::from(b' ') } else { u64::from(*byte) })
        .sum();
    let stored = &header[CHECKSUM];
    assert_eq!(&stored[6..], b"\0 ", "checksum terminator");
    assert_eq!(octal_field(&stored[..6]), sum, "checksum");
}

#[test]
fn tar_members_round_trip_through_gnu_tar_and_python_tarfile() {
    let mtime_seconds = 1_700_000_000;
    check_tar(&[]);
    check_tar(&[member("empty.txt", mtime_seconds, Vec::new())]);
    check_tar(&[
        member("dev-1/key-000001.jpg", mtime_seconds, pseudo_random_bytes(1, 1000)),
        member("dev-1/key-000001.json", mtime_seconds + 1, br#"{"label":"cat"}"#.to_vec()),
        member("dev-1/key-000002.jpg", 0, pseudo_random_bytes(2, 512)),
        member("dev-1/key-000002.json", MEMBER_MTIME_SECONDS_MAX, pseudo_random_bytes(3, 513)),
        member("dev-1/empty.bin", mtime_seconds, Vec::new()),
    ]);
    check_tar(&[member("big/one-mebibyte.bin", mtime_seconds, pseudo_random_bytes(4, 1024 * 1024))]);
}

#[test]
fn tar_long_names_split_into_the_ustar_prefix() {
    let directory = format!("{}/{}", "d".repeat(100), "e".repeat(54)); // 155 bytes: the whole prefix field
    let longest = format!("{directory}/{}", "f".repeat(100));
    assert_eq!(longest.len(), core_sink::datasets::tar::MEMBER_NAME_BYTES_MAX);
    assert_eq!(longest.len(), 256);
    let exactly_name_field = "n".repeat(100);
    let just_over = format!("{}/{}", "a".repeat(50), "b".repeat(50)); // 101 bytes
    check_tar(&[
        member(&exactly_name_field, 1, b"fits the name field".to_vec()),
        member(&just_over, 2, b"split at its only slash".to_vec()),
        member(&longest, 3, pseudo_random_bytes(5, 700)),
        member(&format!("x/{}/y.json", "z".repeat(140)), 4, Vec::new()),
    ]);

    let mut writer = TarShardWriter::new(Vec::new());
    writer.append_file(&longest, 3, b"data").expect("append");
    let archive = writer.finish().expect("finish");
    assert_eq!(field_text(&archive[PREFIX]), directory);
    assert_eq!(field_text(&archive[NAME]), "f".repeat(100));
}

/// `Ok` when the writer takes the name, the error kind otherwise; a refused member writes nothing.
fn check_member_name(name: &str, expected: Result<(), ErrorKind>) {
    let mut writer = TarShardWriter::new(Vec::new());
    let result = writer.append_file(name, 0, b"data").map_err(|error| error.kind());
    assert_eq!(result, expected, "name {name:?}");
    if expected.is_err() {
        assert_eq!(writer.bytes_written(), 0);
        assert_eq!(writer.members(), 0);
        // The writer stays usable after a refused name.
        writer.append_file("after.bin", 0, b"").expect("append after a refusal");
        assert_eq!(writer.finish().expect("finish").len(), 3 * TAR_BLOCK_BYTES);
    }
}

#[test]
fn tar_member_names_are_checked() {
    let refused = Err(ErrorKind::InvalidInput);
    check_member_name("a", Ok(()));
    check_member_name("dev-1/key-000001.jpg", Ok(()));
    check_member_name(&"n".repeat(100), Ok(()));
    check_member_name(&format!("{}/{}", "p".repeat(155), "n".repeat(100)), Ok(()));
    check_member_name("", refused);
    check_member_name(&"n".repeat(101), refused); // too long and nowhere to split
    check_member_name(&format!("{}/{}", "p".repeat(155), "n".repeat(101)), refused); // name part 101
    check_member_name(&format!("{}/{}", "p".repeat(156), "n".repeat(10)), refused); // prefix 156
    check_member_name(&format!("{}/{}", "p".repeat(155), "n".repeat(100)).replacen('p', "pp", 1), refused);
    check_member_name(&"a/".repeat(150), refused); // 300 bytes
    // 189 bytes, but no '/' leaves both parts within their fields.
    check_member_name(&format!("x/{}/y.json", "z".repeat(180)), refused);
    check_member_name("/etc/passwd", refused);
    check_member_name("../escape", refused);
    check_member_name("a/../b", refused);
    check_member_name("a/./b", refused);
    check_member_name("a//b", refused);
    check_member_name("directory/", refused);
    check_member_name("caf\u{e9}.jpg", refused);
    check_member_name("nul\0byte", refused);
    check_member_name("new\nline", refused);
    check_member_name("back\\slash", refused);
}

#[test]
fn tar_member_size_and_mtime_limits() {
    // The header alone decides; no 8 GiB buffer is needed to test the size bound.
    let header =
        core_sink::datasets::tar::member_header("big.bin", 0, MEMBER_BYTES_MAX).expect("largest member");
    check_header_checksum(&header);
    assert_eq!(&header[SIZE], b"77777777777\0");
    let error =
        core_sink::datasets::tar::member_header("big.bin", 0, MEMBER_BYTES_MAX + 1).expect_err("too big");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    assert!(error.to_string().contains("big.bin"), "{error}");

    let mut writer = TarShardWriter::new(Vec::new());
    let error =
        writer.append_file("late.bin", MEMBER_MTIME_SECONDS_MAX + 1, b"").expect_err("mtime too late");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    assert_eq!(writer.bytes_written(), 0);
}

/// A sink that fails after `budget` bytes, like a full disk.
struct FailingWriter {
    budget: usize,
}

impl std::io::Write for FailingWriter {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        if self.budget == 0 {
            return Err(std::io::Error::new(ErrorKind::StorageFull, "disk full"));
        }
        let written = buffer.len().min(self.budget);
        self.budget -= written;
        Ok(written)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn tar_writer_refuses_to_continue_a_torn_archive() {
    let mut writer = TarShardWriter::new(FailingWriter { budget: TAR_BLOCK_BYTES + 10 });
    let error = writer.append_file("a.bin", 0, &[7; 100]).expect_err("disk full");
    assert_eq!(error.kind(), ErrorKind::StorageFull);
    assert!(error.to_string().contains("a.bin"), "{error}");
    let error = writer.append_file("b.bin", 0, b"").expect_err("torn archive");
    assert!(error.to_string().contains("torn"), "{error}");
    assert!(writer.finish().is_err());
}

// ---------------------------------------------------------------------------------------------
// parquet

fn series_rows(count: usize) -> Vec<OwnedSeriesRow> {
    (0..count)
        .map(|row| {
            let device = format!("dev-{}", row % 3);
            OwnedSeriesRow {
                device,
                lane: if row % 2 == 0 { "telemetry".to_owned() } else { "events".to_owned() },
                seq: 1 + (row / 100) as u64,
                index: (row % 100) as u32,
                key: format!("sensor/{row:06}"),
                timestamp_us: 1_700_000_000_000_000 + row as i64 * 1_000,
                content_type: "application/json".to_owned(),
                payload: format!(r#"{{"temperature_c":{},"row":{row}}}"#, 20 + row % 7).into_bytes(),
            }
        })
        .collect()
}

fn write_parquet(path: &Path, rows: &[OwnedSeriesRow], row_group_rows: usize) -> u64 {
    let file = std::fs::File::create(path).expect("create parquet file");
    let mut writer = ParquetShardWriter::new(file, row_group_rows).expect("parquet writer");
    let mut approximate_bytes = writer.approximate_bytes();
    for row in rows {
        let row_groups = writer.row_groups();
        writer.append(&row.as_row()).expect("append row");
        // A buffered row adds at least its payload; a written row group replaces the buffered
        // estimate with the compressed bytes.
        if writer.row_groups() == row_groups {
            assert!(writer.approximate_bytes() >= approximate_bytes + row.payload.len() as u64);
        }
        approximate_bytes = writer.approximate_bytes();
    }
    assert_eq!(writer.rows(), rows.len() as u64);
    assert_eq!(writer.row_groups(), (rows.len() / row_group_rows) as u64);
    let file = writer.finish().expect("finish parquet file");
    file.sync_all().expect("fsync");
    let length = std::fs::metadata(path).expect("metadata").len();
    // Rows count uncompressed before they are written; the compressed file is smaller.
    assert!(length <= approximate_bytes + 64 * 1024, "file {length} bytes, estimate {approximate_bytes}");
    length
}

#[test]
fn parquet_rows_round_trip_across_row_groups_with_zstd_columns() {
    use parquet::file::reader::FileReader as _;

    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("series.parquet");
    let mut rows = series_rows(10_000);
    // Edges: extreme integers, empty and non-ASCII texts, binary and empty payloads.
    rows[0].seq = u64::MAX;
    rows[0].index = u32::MAX;
    rows[0].timestamp_us = i64::MIN;
    rows[1].timestamp_us = i64::MAX;
    rows[1].key = "\u{e9}t\u{e9}/\u{1f321}".to_owned();
    rows[2].payload = Vec::new();
    rows[3].payload = pseudo_random_bytes(6, 100_000);
    rows[4].key = String::new();
    write_parquet(&path, &rows, 3_000);

    assert_eq!(read_parquet_rows(&path).expect("read rows"), rows);

    let reader = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&path).expect("open"))
        .expect("parquet reader");
    let metadata = reader.metadata();
    let groups: Vec<i64> = metadata.row_groups().iter().map(|group| group.num_rows()).collect();
    assert_eq!(groups, [3_000, 3_000, 3_000, 1_000]);
    // The fixed columns, then one per JSON field, inferred from the first row group.
    let (columns, typed_rows) = core_sink::datasets::parquet::read_parquet_typed(&path).expect("typed rows");
    let names: Vec<(&str, ColumnType)> =
        columns.iter().map(|column| (column.name.as_str(), column.column_type)).collect();
    assert_eq!(names, [("row", ColumnType::Int64), ("temperature_c", ColumnType::Int64)]);
    assert_eq!(typed_rows[9_999].1["row"], Cell::Int64(9_999));
    assert!(typed_rows[3].1.is_empty(), "a payload that is not JSON has only nulls");
    for group in metadata.row_groups() {
        assert_eq!(group.num_columns(), 10);
        for column in group.columns() {
            assert!(
                matches!(column.compression(), parquet::basic::Compression::ZSTD(_)),
                "column {} is {:?}",
                column.column_path(),
                column.compression()
            );
            let has_statistics = column.statistics().is_some();
            assert_eq!(
                has_statistics,
                column.column_path().string() != "payload",
                "{}",
                column.column_path()
            );
        }
    }
}

#[test]
fn parquet_settings_and_rows_are_checked() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("checked.parquet");
    let file = || std::fs::File::create(&path).expect("create");

    for row_group_rows in [0, core_sink::datasets::parquet::ROW_GROUP_ROWS_MAX + 1] {
        let error = ParquetShardWriter::new(file(), row_group_rows).err().expect("row_group_rows refused");
        assert!(matches!(error, DatasetFormatError::Setting { setting: "row_group_rows", .. }), "{error}");
    }

    let mut writer = ParquetShardWriter::new(file(), 10).expect("writer");
    let good = series_rows(1).remove(0);
    let long_text = "k".repeat(SERIES_TEXT_BYTES_MAX + 1);
    let large_payload = vec![0u8; SERIES_PAYLOAD_BYTES_MAX + 1];
    for (column, row) in [
        ("key", SeriesRow { key: &long_text, ..good.as_row() }),
        ("device", SeriesRow { device: &long_text, ..good.as_row() }),
        ("payload", SeriesRow { payload: &large_payload, ..good.as_row() }),
    ] {
        let error = writer.append(&row).expect_err("row refused");
        assert!(
            matches!(&error, DatasetFormatError::RowRefused { row: 0, seq: 1, problem, .. } if problem.starts_with(column)),
            "{error}"
        );
    }
    // A refused row leaves the writer usable.
    assert_eq!(writer.rows(), 0);
    writer.append(&good.as_row()).expect("append after refusals");
    writer.finish().expect("finish");
    assert_eq!(read_parquet_rows(&path).expect("read"), [good]);

    // A file with no rows still has a footer and reads as empty.
    write_parquet(&path, &[], 10);
    assert_eq!(read_parquet_rows(&path).expect("read empty"), []);

    // A torn file (no footer) is an error, not an empty result.
    let length = write_parquet(&path, &series_rows(100), 10);
    let bytes = std::fs::read(&path).expect("read file");
    std::fs::write(&path, &bytes[..length as usize - 10]).expect("truncate");
    let error = read_parquet_rows(&path).expect_err("torn file");
    assert!(matches!(error, DatasetFormatError::Read { .. }), "{error}");
    assert!(error.to_string().contains("checked.parquet"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Python stock readers

/// Whether pyarrow and webdataset import. Without them: fail under CI, skip loudly otherwise.
fn python_readers_available(test: &str) -> bool {
    let imported = Command::new("python3")
        .args(["-c", "import pyarrow, webdataset"])
        .output()
        .is_ok_and(|output| output.status.success());
    if imported {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: python3 cannot import pyarrow and webdataset, and CI is set: pip install pyarrow webdataset"
    );
    // Straight to stderr, not through eprintln!: the test harness captures the macros and would
    // hide the skip of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "\n\
         ************************************************************************\n\
         SKIPPED {test}: python3 cannot import pyarrow and webdataset.\n\
         Run `pip install pyarrow webdataset` to check the files with the stock readers.\n\
         ************************************************************************\n"
    );
    false
}

fn read_datasets(kind: &str, paths: &[&Path]) -> Vec<serde_json::Value> {
    let (stdout, _) = run(Command::new("python3").arg(read_datasets_script()).arg(kind).args(paths));
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("JSON line {line:?}")))
        .collect()
}

/// A WebDataset sample: its key and its members' bytes by extension.
type Sample = (String, BTreeMap<String, Vec<u8>>);

#[test]
fn webdataset_reads_tar_shards_as_samples() {
    if !python_readers_available("webdataset_reads_tar_shards_as_samples") {
        return;
    }
    let directory = tempfile::tempdir().expect("temporary directory");
    // Samples in key order, each key's members together, as webdataset groups them.
    let shards: Vec<Vec<Sample>> = vec![
        (1..=3)
            .map(|sample| {
                let files = BTreeMap::from([
                    ("jpg".to_owned(), pseudo_random_bytes(sample, 5_000 + sample as usize)),
                    ("json".to_owned(), format!(r#"{{"sample":{sample}}}"#).into_bytes()),
                ]);
                (format!("dev-1/key-{sample:06}"), files)
            })
            .collect(),
        vec![("dev-2/key-000001".to_owned(), BTreeMap::from([("json".to_owned(), b"{}".to_vec())]))],
        Vec::new(),
    ];
    let mut paths = Vec::new();
    for (shard_index, samples) in shards.iter().enumerate() {
        let mut writer = TarShardWriter::new(Vec::new());
        for (key, files) in samples {
            for (extension, data) in files {
                writer.append_file(&format!("{key}.{extension}"), 1_700_000_000, data).expect("append");
            }
        }
        let path = directory.path().join(format!("shard-{shard_index:06}.tar"));
        std::fs::write(&path, writer.finish().expect("finish")).expect("write shard");
        paths.push(path);
    }

    let path_refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let seen = read_datasets("webdataset", &path_refs);
    let expected: Vec<serde_json::Value> = shards
        .iter()
        .flatten()
        .map(|(key, files)| {
            let files: serde_json::Map<String, serde_json::Value> =
                files.iter().map(|(extension, data)| (extension.clone(), sha256_hex(data).into())).collect();
            serde_json::json!({ "key": key, "files": files })
        })
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn pyarrow_reads_parquet_series() {
    if !python_readers_available("pyarrow_reads_parquet_series") {
        return;
    }
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("series.parquet");
    let mut rows = series_rows(2_500);
    rows[0].seq = u64::MAX;
    rows[0].index = u32::MAX;
    rows[1].key = "\u{e9}t\u{e9}".to_owned();
    rows[2].payload = pseudo_random_bytes(7, 10_000);
    rows[3].timestamp_us = -1;
    write_parquet(&path, &rows, 1_000);

    let seen = read_datasets("parquet", &[&path]);
    let expected: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "device": row.device,
                "lane": row.lane,
                "seq": row.seq,
                "index": row.index,
                "key": row.key,
                "timestamp_us": row.timestamp_us,
                "content_type": row.content_type,
                "payload_sha256": sha256_hex(&row.payload),
                // Inferred from the first row group: both fields are integers.
                "typed": if row.payload.starts_with(b"{") {
                    serde_json::from_slice::<serde_json::Value>(&row.payload).expect("json payload")
                } else {
                    serde_json::json!({})
                },
            })
        })
        .collect();
    assert_eq!(seen.len(), expected.len());
    for (index, (seen, expected)) in seen.iter().zip(&expected).enumerate() {
        assert_eq!(seen, expected, "row {index}");
    }
}

#[test]
fn read_datasets_fails_on_torn_files() {
    if !python_readers_available("read_datasets_fails_on_torn_files") {
        return;
    }
    let directory = tempfile::tempdir().expect("temporary directory");
    let mut writer = TarShardWriter::new(Vec::new());
    writer.append_file("dev-1/key-000001.jpg", 0, &pseudo_random_bytes(8, 4096)).expect("append");
    let archive = writer.finish().expect("finish");
    let tar_path = directory.path().join("torn.tar");
    std::fs::write(&tar_path, &archive[..1000]).expect("write torn shard");

    let parquet_path = directory.path().join("torn.parquet");
    let length = write_parquet(&parquet_path, &series_rows(10), 10);
    let bytes = std::fs::read(&parquet_path).expect("read");
    std::fs::write(&parquet_path, &bytes[..length as usize / 2]).expect("write torn file");

    for (kind, path) in [("webdataset", &tar_path), ("parquet", &parquet_path)] {
        let output = Command::new("python3")
            .arg(read_datasets_script())
            .arg(kind)
            .arg(path)
            .output()
            .expect("run read_datasets.py");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{kind}: {stderr}");
        assert!(stderr.starts_with("read_datasets: "), "{kind}: {stderr}");
    }
}
