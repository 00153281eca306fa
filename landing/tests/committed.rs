//! The reader of committed raw landing (`landing::committed`) at its boundary: landing written by
//! the real `RawLanding`, then read from a checkpoint and a position. Every case goes through one
//! `check`: what is yielded (seqs in order) and how reading ends (the committed end at a
//! position, or damage at a file and offset).

use std::path::{Path, PathBuf};

use landing::{CommittedLanding, Committer, Damage, RawLanding, ReadError, ReadPosition, read_landed_file};
use protocol::{CHUNK_ENCODED_BYTES_MAX, CHUNK_HEADER_LEN, Codec, DecodeError, Lane, SealedChunk};

const DEVICE: &str = "cam-01";
/// Body bytes of every test chunk: records are `4 + 40 + 60 = 104` bytes.
const BODY_BYTES: usize = 60;
const RECORD_BYTES: u64 = (4 + CHUNK_HEADER_LEN + BODY_BYTES) as u64;
/// Files rotate after three records.
const ROTATE_BYTES: u64 = 3 * RECORD_BYTES;

fn encoded(lane: Lane, seq: u64) -> Vec<u8> {
    let body: Vec<u8> = (0..BODY_BYTES).map(|index| (seq as usize * 7 + index) as u8).collect();
    SealedChunk::new(lane, Codec::Raw, 0, 1, BODY_BYTES as u32, body).expect("valid chunk").encode(seq)
}

struct Landing {
    _directory: tempfile::TempDir,
    dir: PathBuf,
    raw: RawLanding,
}

impl Landing {
    fn new() -> Landing {
        let directory = tempfile::tempdir().expect("tempdir");
        let dir = directory.path().join("landing");
        let mut raw = RawLanding::new(&dir, ROTATE_BYTES);
        raw.recover(None).expect("recover");
        Landing { _directory: directory, dir, raw }
    }

    fn land(&mut self, lane: Lane, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            let encoded = encoded(lane, seq);
            let (header, _) = protocol::decode_chunk(&encoded).expect("decodes");
            self.raw.land(DEVICE, &header, &encoded).expect("land");
        }
    }

    fn commit(&mut self) -> Vec<u8> {
        self.raw.commit().expect("commit");
        self.raw.checkpoint()
    }

    fn file(&self, lane: Lane, first_seq: u64) -> PathBuf {
        self.dir.join("raw").join(DEVICE).join(lane.name()).join(format!("{first_seq:020}.tcr"))
    }

    fn patch(&self, lane: Lane, first_seq: u64, offset: u64, bytes: &[u8]) {
        let path = self.file(lane, first_seq);
        let mut contents = std::fs::read(&path).expect("read");
        let offset = offset as usize;
        contents[offset..offset + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&path, contents).expect("write");
    }

    fn append(&self, lane: Lane, first_seq: u64, bytes: &[u8]) {
        use std::io::Write as _;
        let path = self.file(lane, first_seq);
        let mut file = std::fs::OpenOptions::new().append(true).open(path).expect("open");
        file.write_all(bytes).expect("append");
    }
}

/// How reading ends.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The committed end, with the reader at this position.
    Committed(ReadPosition),
    /// Damage in the file that starts at `file_first_seq`, at `offset`.
    Damaged { file_first_seq: u64, offset: u64, damage: Damage },
}

fn first_seq_of(path: &Path) -> u64 {
    path.file_stem()
        .and_then(|stem| stem.to_str())
        .and_then(|stem| stem.parse().ok())
        .expect("a landing file")
}

/// Reads (DEVICE, lane) from `from` under `checkpoint` to its end; checks the seqs yielded, the
/// positions handed out with them, and the end. Damage is reported again by the next call, with
/// the reader's position still before it.
fn check(landing: &Landing, checkpoint: &[u8], lane: Lane, from: ReadPosition, seqs: &[u64], end: End) {
    let committed = CommittedLanding::new(&landing.dir, checkpoint).expect("checkpoint parses");
    let mut reader = committed.read(DEVICE, lane, from).expect("files list");
    let mut yielded = Vec::new();
    let mut last_position = from;
    let outcome = loop {
        match reader.next_chunk() {
            Ok(Some(chunk)) => {
                assert_eq!(chunk.header.lane, lane);
                assert_eq!(chunk.encoded, encoded(lane, chunk.header.seq), "seq {}", chunk.header.seq);
                assert_eq!(chunk.body().len(), BODY_BYTES);
                assert!(chunk.position > last_position, "positions move forward");
                assert_eq!(chunk.position.through_seq, chunk.header.seq);
                last_position = chunk.position;
                yielded.push(chunk.header.seq);
            }
            Ok(None) => break End::Committed(reader.position()),
            Err(ReadError::Damaged { path, offset, damage }) => {
                break End::Damaged { file_first_seq: first_seq_of(&path), offset, damage };
            }
            Err(error) => panic!("unexpected error: {error}"),
        }
    };
    assert_eq!(yielded, seqs, "seqs yielded from {from:?}");
    assert_eq!(outcome, end, "end after {seqs:?}");
    if let End::Damaged { offset, .. } = &outcome {
        assert_eq!(reader.position(), last_position, "the position stays before the damage");
        match reader.next_chunk() {
            Err(ReadError::Damaged { offset: again, .. }) => {
                assert_eq!(again, *offset, "the same damage again")
            }
            other => panic!("damage not reported again: {other:?}"),
        }
    }
}

fn at(file_first_seq: u64, records: u64, through_seq: u64) -> ReadPosition {
    ReadPosition { file_first_seq, offset: records * RECORD_BYTES, through_seq }
}

/// Seqs 1..=8 of the sensor lane committed: files 1 (1..=3), 4 (4..=6), 7 (7..=8, committed).
fn eight_committed() -> (Landing, Vec<u8>) {
    let mut landing = Landing::new();
    landing.land(Lane::Sensor, 1..=8);
    let checkpoint = landing.commit();
    assert_eq!(String::from_utf8_lossy(&checkpoint), format!("{DEVICE} sensor 7 {}\n", 2 * RECORD_BYTES));
    (landing, checkpoint)
}

#[test]
fn reads_every_committed_chunk_across_rotated_files() {
    let (landing, checkpoint) = eight_committed();
    let sensor = Lane::Sensor;
    check(
        &landing,
        &checkpoint,
        sensor,
        ReadPosition::default(),
        &[1, 2, 3, 4, 5, 6, 7, 8],
        End::Committed(at(7, 2, 8)),
    );
    // Other lanes and devices have nothing committed.
    check(
        &landing,
        &checkpoint,
        Lane::Media,
        ReadPosition::default(),
        &[],
        End::Committed(ReadPosition::default()),
    );
    check(&landing, b"", sensor, ReadPosition::default(), &[], End::Committed(ReadPosition::default()));
    let committed = CommittedLanding::new(&landing.dir, &checkpoint).expect("parses");
    assert_eq!(committed.lanes().collect::<Vec<_>>(), vec![(DEVICE, sensor)]);
}

#[test]
fn resumes_from_a_position_in_the_middle_of_a_file() {
    let (landing, checkpoint) = eight_committed();
    let sensor = Lane::Sensor;
    // After seq 5: the second record of file 4.
    check(&landing, &checkpoint, sensor, at(4, 2, 5), &[6, 7, 8], End::Committed(at(7, 2, 8)));
    // At the end of a sealed file: the next file.
    check(&landing, &checkpoint, sensor, at(4, 3, 6), &[7, 8], End::Committed(at(7, 2, 8)));
    // At the committed end: nothing.
    check(&landing, &checkpoint, sensor, at(7, 2, 8), &[], End::Committed(at(7, 2, 8)));
    // From an older offset, chunks at or below `through_seq` are passed over, not yielded again.
    check(&landing, &checkpoint, sensor, at(1, 0, 5), &[6, 7, 8], End::Committed(at(7, 2, 8)));
    // A position in a file that is gone: reading goes on with the next file.
    check(&landing, &checkpoint, sensor, at(2, 1, 3), &[4, 5, 6, 7, 8], End::Committed(at(7, 2, 8)));
}

#[test]
fn never_reads_past_the_committed_end() {
    let (mut landing, checkpoint) = eight_committed();
    let sensor = Lane::Sensor;
    // Written after the commit: seq 9 fills file 7, seq 10 starts file 10, then a torn record.
    landing.land(sensor, 9..=10);
    landing.append(sensor, 10, &[0x55; 30]);
    let all_eight = [1, 2, 3, 4, 5, 6, 7, 8];
    check(&landing, &checkpoint, sensor, ReadPosition::default(), &all_eight, End::Committed(at(7, 2, 8)));
    // The next commit seals file 7 whole and commits file 10 up to seq 10; the torn record
    // stays past the committed length.
    let next = landing.commit();
    assert_eq!(String::from_utf8_lossy(&next), format!("{DEVICE} sensor 10 {RECORD_BYTES}\n"));
    check(&landing, &next, sensor, at(7, 2, 8), &[9, 10], End::Committed(at(10, 1, 10)));
    // A reader still holding the older checkpoint stops where it ends.
    check(&landing, &checkpoint, sensor, at(7, 1, 7), &[8], End::Committed(at(7, 2, 8)));
}

#[test]
fn reports_damage_with_its_file_and_offset() {
    let sensor = Lane::Sensor;
    let header_crc_offset = 4 + 36;
    let body_offset = 4 + CHUNK_HEADER_LEN as u64;
    // (what, file, offset in the file, bytes written there, what the reader reports)
    let cases: Vec<(&str, u64, u64, Vec<u8>, Damage)> = vec![
        (
            "a flipped body byte",
            4,
            RECORD_BYTES + body_offset + 10,
            vec![0xff],
            Damage::Chunk(DecodeError::BodyCrcMismatch { stored: 0, computed: 0 }),
        ),
        (
            "a flipped header crc",
            4,
            RECORD_BYTES + header_crc_offset,
            vec![0, 0, 0, 0],
            Damage::Chunk(DecodeError::HeaderCrcMismatch { stored: 0, computed: 0 }),
        ),
        (
            "a zeroed length prefix",
            1,
            2 * RECORD_BYTES,
            vec![0; 4],
            Damage::Chunk(DecodeError::ChunkHeaderTruncated { needed: CHUNK_HEADER_LEN, available: 0 }),
        ),
        (
            "a length prefix over the limit",
            7,
            RECORD_BYTES,
            (CHUNK_ENCODED_BYTES_MAX as u32 + 1).to_le_bytes().to_vec(),
            Damage::RecordTooLarge {
                length: CHUNK_ENCODED_BYTES_MAX as u64 + 1,
                max: CHUNK_ENCODED_BYTES_MAX,
            },
        ),
        (
            "a length prefix past the committed end",
            7,
            RECORD_BYTES,
            ((RECORD_BYTES - 4 + 1) as u32).to_le_bytes().to_vec(),
            Damage::Truncated { needed: RECORD_BYTES + 1, available: RECORD_BYTES },
        ),
        (
            "a length prefix past the end of a sealed file",
            4,
            2 * RECORD_BYTES,
            ((RECORD_BYTES - 4 + 1) as u32).to_le_bytes().to_vec(),
            Damage::Truncated { needed: RECORD_BYTES + 1, available: RECORD_BYTES },
        ),
    ];
    for (what, file, offset, bytes, damage) in cases {
        let (landing, checkpoint) = eight_committed();
        landing.patch(sensor, file, offset, &bytes);
        let record = offset / RECORD_BYTES;
        let damage = match damage {
            // The kind is given; the CRCs in it are those of the patched bytes.
            Damage::Chunk(kind) => {
                let contents = std::fs::read(landing.file(sensor, file)).expect("read");
                let start = (record * RECORD_BYTES) as usize;
                let length =
                    u32::from_le_bytes(contents[start..start + 4].try_into().expect("4 bytes")) as usize;
                let error = protocol::decode_chunk(&contents[start + 4..start + 4 + length]).expect_err(what);
                assert_eq!(std::mem::discriminant(&error), std::mem::discriminant(&kind), "{what}: {error}");
                Damage::Chunk(error)
            }
            damage => damage,
        };
        let before: Vec<u64> = (1..file + record).collect();
        let end = End::Damaged { file_first_seq: file, offset: record * RECORD_BYTES, damage };
        check(&landing, &checkpoint, sensor, ReadPosition::default(), &before, end);
    }
    // The message names the file and the offset.
    let error = ReadError::Damaged {
        path: PathBuf::from("/landing/raw/cam-01/sensor/00000000000000000004.tcr"),
        offset: 104,
        damage: Damage::RecordTooLarge { length: 5_000_000, max: CHUNK_ENCODED_BYTES_MAX },
    };
    assert_eq!(
        error.to_string(),
        format!(
            "committed landing /landing/raw/cam-01/sensor/00000000000000000004.tcr is damaged at offset 104: \
             the length prefix says 5000000 bytes, above the chunk limit of {CHUNK_ENCODED_BYTES_MAX}"
        )
    );
}

#[test]
fn reports_a_file_shorter_than_committed_a_foreign_lane_and_seqs_out_of_order() {
    let sensor = Lane::Sensor;
    let (landing, checkpoint) = eight_committed();
    // The committed file lost its last record.
    let file = landing.file(sensor, 7);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open")
        .set_len(RECORD_BYTES + 10)
        .expect("truncate");
    check(
        &landing,
        &checkpoint,
        sensor,
        ReadPosition::default(),
        &[1, 2, 3, 4, 5, 6, 7],
        End::Damaged {
            file_first_seq: 7,
            offset: RECORD_BYTES,
            damage: Damage::ShorterThanCommitted { length: RECORD_BYTES + 10, committed: 2 * RECORD_BYTES },
        },
    );

    // The record after seq 4 (where seq 5 belongs) replaced: a media chunk in the sensor lane's
    // files, then seq 2 again.
    for (replacement, damage) in [
        (encoded(Lane::Media, 5), Damage::WrongLane { expected: sensor, found: Lane::Media }),
        (encoded(sensor, 2), Damage::SeqNotIncreasing { previous: 4, seq: 2 }),
    ] {
        let (landing, checkpoint) = eight_committed();
        landing.patch(sensor, 4, RECORD_BYTES + 4, &replacement);
        check(
            &landing,
            &checkpoint,
            sensor,
            ReadPosition::default(),
            &[1, 2, 3, 4],
            End::Damaged { file_first_seq: 4, offset: RECORD_BYTES, damage },
        );
    }
}

#[test]
fn bounds_a_step_by_bytes_read() {
    let (landing, checkpoint) = eight_committed();
    let committed = CommittedLanding::new(&landing.dir, &checkpoint).expect("parses");
    let mut position = ReadPosition::default();
    let mut steps = Vec::new();
    // Two records per step: a step stops once it has read at least its budget.
    let step_bytes_max = 2 * RECORD_BYTES - 1;
    loop {
        let mut reader = committed.read(DEVICE, Lane::Sensor, position).expect("lists");
        let mut seqs = Vec::new();
        while reader.bytes_read() < step_bytes_max {
            let Some(chunk) = reader.next_chunk().expect("intact") else { break };
            seqs.push(chunk.header.seq);
        }
        position = reader.position();
        if seqs.is_empty() {
            break;
        }
        assert_eq!(reader.bytes_read(), seqs.len() as u64 * RECORD_BYTES);
        steps.push(seqs);
    }
    assert_eq!(steps, vec![vec![1, 2], vec![3, 4], vec![5, 6], vec![7, 8]]);
}

#[test]
fn malformed_checkpoints_are_refused() {
    let directory = tempfile::tempdir().expect("tempdir");
    for (checkpoint, line) in [
        (&b"cam-01 sensor 1\n"[..], 1),
        (b"cam-01 sensor 1 10\ncam-01 nolane 1 10\n", 2),
        (b"cam-01 sensor x 10\n", 1),
        (b"cam-01 sensor 1 -1\n", 1),
    ] {
        match CommittedLanding::new(directory.path(), checkpoint) {
            Err(landing::LandingError::Checkpoint { line: reported, .. }) => {
                assert_eq!(reported, line, "{}", String::from_utf8_lossy(checkpoint))
            }
            other => panic!("{}: {other:?}", String::from_utf8_lossy(checkpoint)),
        }
    }
}

#[test]
fn read_landed_file_reads_a_whole_file_and_reports_damage() {
    let (landing, _) = eight_committed();
    let chunks = read_landed_file(&landing.file(Lane::Sensor, 4)).expect("intact");
    let seqs: Vec<u64> = chunks.iter().map(|(header, _)| header.seq).collect();
    assert_eq!(seqs, vec![4, 5, 6]);
    assert!(chunks.iter().all(|(header, bytes)| *bytes == encoded(Lane::Sensor, header.seq)));
    landing.append(Lane::Sensor, 4, &[1, 2]);
    match read_landed_file(&landing.file(Lane::Sensor, 4)) {
        Err(ReadError::Damaged { offset, damage, .. }) => {
            assert_eq!((offset, damage), (3 * RECORD_BYTES, Damage::Truncated { needed: 4, available: 2 }))
        }
        other => panic!("{other:?}"),
    }
}
