//! The simulated camera's frames decoded back with an independent JPEG decoder.

use board::camera::{CameraError, Frame, FrameFormat, FrameSource, SimCamera, SimCameraConfig};

/// The disc is the only region whose blue channel is high (module docs of `board::camera`).
const DISC_BLUE_THRESHOLD: u8 = 176;

struct Decoded {
    width: u16,
    height: u16,
    rgb: Vec<u8>,
}

fn decode(frame: &Frame) -> Decoded {
    assert_eq!(frame.format, FrameFormat::Jpeg);
    assert_eq!(&frame.bytes[..2], &[0xFF, 0xD8], "JPEG start-of-image marker");
    let mut decoder = jpeg_decoder::Decoder::new(&frame.bytes[..]);
    let rgb = decoder.decode().expect("frame decodes");
    let info = decoder.info().expect("header read");
    assert_eq!(info.pixel_format, jpeg_decoder::PixelFormat::RGB24);
    Decoded { width: info.width, height: info.height, rgb }
}

/// Centroid of the pixels whose blue channel is above the threshold, in pixels.
fn disc_centroid(decoded: &Decoded) -> (f64, f64) {
    let (mut sum_x, mut sum_y, mut count) = (0.0, 0.0, 0u32);
    for y in 0..u32::from(decoded.height) {
        for x in 0..u32::from(decoded.width) {
            let index = ((y * u32::from(decoded.width) + x) * 3) as usize;
            if decoded.rgb[index + 2] > DISC_BLUE_THRESHOLD {
                sum_x += f64::from(x);
                sum_y += f64::from(y);
                count += 1;
            }
        }
    }
    assert!(count > 0, "no disc pixels found");
    (sum_x / f64::from(count), sum_y / f64::from(count))
}

/// Reads the counter strip: cell `i` is yellow (red channel high) when bit `i` is set.
fn counter_value(decoded: &Decoded) -> u64 {
    let cell_px = (u32::from(decoded.width) / 32).max(1);
    let mut value = 0u64;
    for cell in 0..16u32 {
        let x = cell * cell_px + cell_px / 2;
        let y = cell_px / 2;
        let index = ((y * u32::from(decoded.width) + x) * 3) as usize;
        if decoded.rgb[index] > 128 {
            value |= 1 << cell;
        }
    }
    value
}

fn config(width: u16, height: u16) -> SimCameraConfig {
    SimCameraConfig {
        width,
        height,
        fps: 5,
        quality: 90,
        seed: 7,
        noise_amplitude: 4,
        moving_frames: 1,
        still_frames: 0,
    }
}

/// The first `frames` frames of a fresh camera: dimensions, timestamps, disc position and counter
/// checked against the camera's own description of the scene.
fn check_scene(config: SimCameraConfig, frames: u64) {
    let mut camera = SimCamera::new("cam0", config);
    let mut previous_centroid: Option<(f64, f64)> = None;
    for sequence in 0..frames {
        let frame = camera.next_frame().unwrap();
        assert_eq!((frame.sequence, frame.width, frame.height), (sequence, config.width, config.height));
        assert_eq!(frame.timestamp_us, sequence * 1_000_000 / u64::from(config.fps));
        let decoded = decode(&frame);
        assert_eq!((decoded.width, decoded.height), (config.width, config.height), "{config:?}");
        let step = camera.scene_step_of(sequence);
        let expected = camera.disc_position(step);
        let (x, y) = disc_centroid(&decoded);
        // Ringing around the disc's edge moves the centroid by well under a pixel; allow 1.5.
        assert!(
            (x - f64::from(expected.x_px)).abs() <= 1.5 && (y - f64::from(expected.y_px)).abs() <= 1.5,
            "frame {sequence}: centroid ({x:.1}, {y:.1}), expected {expected:?} for {config:?}"
        );
        assert_eq!(counter_value(&decoded), step, "frame {sequence} counter");
        if let Some((previous_x, previous_y)) = previous_centroid {
            let moved = (x - previous_x).hypot(y - previous_y);
            assert!(moved >= 1.0, "frame {sequence}: disc moved only {moved:.2} px");
        }
        previous_centroid = Some((x, y));
    }
}

#[test]
fn frames_decode_and_the_disc_moves() {
    check_scene(config(320, 240), 12);
    check_scene(config(64, 48), 40); // long enough to bounce off the walls
    check_scene(config(33, 25), 6); // odd sizes, below one JPEG block multiple
    check_scene(SimCameraConfig { noise_amplitude: 0, quality: 50, ..config(160, 120) }, 6);
}

/// Which consecutive frames are byte-identical for a motion pattern.
fn check_motion(moving_frames: u32, still_frames: u32, expected_same_as_previous: &[bool]) {
    let mut camera =
        SimCamera::new("cam0", SimCameraConfig { moving_frames, still_frames, ..config(64, 48) });
    let mut previous = camera.next_frame().unwrap();
    for (index, &same) in expected_same_as_previous.iter().enumerate() {
        let frame = camera.next_frame().unwrap();
        assert_eq!(
            frame.bytes == previous.bytes,
            same,
            "moving {moving_frames}, still {still_frames}: frame {}",
            index + 1
        );
        assert_eq!(frame.sequence, previous.sequence + 1, "sequence advances even when still");
        previous = frame;
    }
}

#[test]
fn still_scene_gives_identical_frames() {
    check_motion(1, 0, &[false, false, false, false]);
    check_motion(2, 3, &[false, true, true, true, false, false, true, true, true, false]);
    check_motion(1, 2, &[true, true, false, true, true, false]);
    check_motion(0, 1, &[true, true, true]);
}

#[test]
fn same_seed_same_frames_other_seed_other_noise() {
    let frames = |config: SimCameraConfig| -> Vec<Vec<u8>> {
        let mut camera = SimCamera::new("cam0", config);
        (0..3).map(|_| camera.next_frame().unwrap().bytes).collect()
    };
    assert_eq!(frames(config(64, 48)), frames(config(64, 48)));
    assert_ne!(frames(config(64, 48)), frames(SimCameraConfig { seed: 8, ..config(64, 48) }));
}

#[test]
fn config_limits_are_checked() {
    let check = |config: SimCameraConfig, expected: Result<(), &str>| {
        assert_eq!(config.validate(), expected.map_err(str::to_string), "{config:?}");
    };
    check(config(320, 240), Ok(()));
    check(config(1920, 1080), Ok(()));
    check(config(31, 240), Err("width 31 outside 32..=1920"));
    check(config(320, 1081), Err("height 1081 outside 24..=1080"));
    check(SimCameraConfig { fps: 0, ..config(320, 240) }, Err("fps 0 outside 1..=120"));
    check(SimCameraConfig { quality: 0, ..config(320, 240) }, Err("quality 0 outside 1..=100"));
    check(SimCameraConfig { quality: 101, ..config(320, 240) }, Err("quality 101 outside 1..=100"));
    check(SimCameraConfig { noise_amplitude: 33, ..config(320, 240) }, Err("noise 33 above 32"));
    check(
        SimCameraConfig { moving_frames: 0, still_frames: 0, ..config(320, 240) },
        Err("moving_frames and still_frames are both 0"),
    );
}

#[test]
fn boxed_sources_are_frame_sources() {
    let mut source: Box<dyn FrameSource + Send> = Box::new(SimCamera::new("cam7", config(64, 48)));
    assert_eq!(source.name(), "cam7");
    let frame: Result<Frame, CameraError> = source.next_frame();
    assert_eq!(frame.unwrap().sequence, 0);
}
