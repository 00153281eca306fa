//! The appliance's session state machine driven by a hostile (or broken) sink: arbitrary control
//! bytes, Welcomes and Acks with arbitrary seqs and limits, interleaved with ring reads. Never
//! panics; the device never trims (Acked) past what it sent or the sink held at the Welcome, and
//! its trims never go back.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use protocol::{
    Ack, Codec, ControlMessage, FrameKind, Lane, LaneResume, PROTOCOL_VERSION, SealedChunk, SessionLimits,
    Welcome, dictionary_id, encode_control, encode_frame,
};
use session::{DeviceConfig, DeviceEvent, DeviceSession};

#[derive(Arbitrary, Debug)]
enum Op {
    Control(Vec<u8>),
    Welcome {
        resume: Vec<(u8, u64)>,
        frame_bytes_max: u32,
        in_flight_bytes_max: u64,
        commit_interval_ms: u32,
    },
    Ack {
        lane: u8,
        through: u64,
    },
    /// Answer the outstanding ring read with this many chunks (0 = nothing new).
    /// `dictionary`: 0 none, 1 and 2 the store's two dictionaries, otherwise an id it lacks.
    Read {
        chunks: u8,
        dictionary: u32,
        body_bytes: u16,
    },
    Written {
        lane: u8,
        bytes: u32,
    },
    ControlFinished,
    Advance(u16),
}

fn lane(id: u8) -> Lane {
    Lane::ALL[id as usize % Lane::COUNT]
}

fn control(message: &ControlMessage) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    encode_frame(FrameKind::Control, &encode_control(message).ok()?, &mut out).ok()?;
    Some(out)
}

fuzz_target!(|input: ([u16; Lane::COUNT], Vec<Op>)| {
    let (ring_next, ops) = input;
    let ring_next_seqs = ring_next.map(|next| u64::from(next).max(1));
    let config = DeviceConfig {
        device_id: "cam-01".into(),
        boot_id: [1; 16],
        ring_id: [2; 16],
        lanes: Lane::ALL.to_vec(),
        welcome_timeout: Duration::from_secs(10),
        read_chunks_max: 64,
        read_bytes_max: 1 << 20,
        idle_poll: Duration::from_millis(100),
        in_flight_bytes_max: 8 << 20,
    };
    let store = [vec![0x11u8; 64], b"a second dictionary, longer than the first one".to_vec()];
    let mut now = Instant::now();
    let mut session = DeviceSession::new(config, ring_next_seqs, now);
    let mut outstanding = Vec::new();
    let mut sent_through = [0u64; Lane::COUNT];
    let mut welcomed_at = [0u64; Lane::COUNT];
    let mut trimmed = [0u64; Lane::COUNT];
    for op in ops.into_iter().take(256) {
        match op {
            Op::Control(bytes) => session.handle_control_bytes(now, &bytes),
            Op::Welcome { resume, frame_bytes_max, in_flight_bytes_max, commit_interval_ms } => {
                let resume: Vec<LaneResume> = resume
                    .into_iter()
                    .take(8)
                    .map(|(id, seq)| LaneResume { lane: lane(id), resume_seq: seq })
                    .collect();
                for lane_resume in &resume {
                    let held = lane_resume.resume_seq.saturating_sub(1);
                    welcomed_at[lane_resume.lane.index()] = welcomed_at[lane_resume.lane.index()].max(held);
                }
                let welcome = ControlMessage::Welcome(Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    resume,
                    limits: SessionLimits { frame_bytes_max, in_flight_bytes_max, commit_interval_ms },
                });
                if let Some(bytes) = control(&welcome) {
                    session.handle_control_bytes(now, &bytes);
                }
            }
            Op::Ack { lane: id, through } => {
                if let Some(bytes) =
                    control(&ControlMessage::Ack(Ack { lane: lane(id), durable_through: through }))
                {
                    session.handle_control_bytes(now, &bytes);
                }
            }
            Op::Read { chunks, dictionary: choice, body_bytes } => {
                let dict_id = match choice {
                    0 => protocol::NO_DICTIONARY,
                    1 | 2 => dictionary_id(&store[choice as usize - 1]),
                    other => other,
                };
                if let Some(request) = outstanding.pop() {
                    let request: session::ReadRequest = request;
                    let mut answer = Vec::new();
                    for offset in 0..u64::from(chunks % 16) {
                        // A ring never holds seq 0.
                        let Some(seq) = request.from_seq.max(1).checked_add(offset) else { break };
                        let body = vec![0x5a; usize::from(body_bytes % 4096)];
                        let raw_len = body.len() as u32;
                        let Ok(chunk) = SealedChunk::new(request.lane, Codec::Raw, dict_id, 1, raw_len, body)
                        else {
                            break;
                        };
                        answer.push((seq, chunk.encode(seq)));
                    }
                    // The appliance's store is content-addressed: what it returns hashes to the id.
                    let mut dictionary =
                        |id: u32| store.iter().find(|bytes| dictionary_id(bytes) == id).cloned();
                    let summary = session.handle_read(now, request.lane, answer.clone(), &mut dictionary);
                    if summary.chunks > 0 {
                        let last = answer.last().map_or(0, |(seq, _)| *seq);
                        sent_through[request.lane.index()] = sent_through[request.lane.index()].max(last);
                    }
                }
            }
            Op::Written { lane: id, bytes } => session.handle_written(lane(id), bytes as usize),
            Op::ControlFinished => session.handle_control_finished(),
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms));
                session.handle_timeout(now);
            }
        }
        while let Some(request) = session.poll_read(now) {
            assert!(request.chunks_max >= 1 && request.bytes_max >= 1);
            outstanding.push(request);
        }
        while session.poll_transmit().is_some() {}
        while let Some(event) = session.poll_event() {
            if let DeviceEvent::Acked { lane, through } = event {
                let index = lane.index();
                assert!(through >= trimmed[index], "trim went back on {lane}");
                assert!(
                    through <= sent_through[index].max(welcomed_at[index]),
                    "trimmed {lane} through {through}, past what was sent ({}) or held at the Welcome ({})",
                    sent_through[index],
                    welcomed_at[index]
                );
                trimmed[index] = through;
            }
        }
    }
});
