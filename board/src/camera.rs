//! Camera frame sources: a trait the appliance pulls frames from, and a simulated camera.
//!
//! Frame layout: one `Frame` is one complete JPEG image (baseline JFIF, 8-bit YCbCr 4:2:0 from
//! the simulator below quality 90 and 4:4:4 from 90 on, as jpeg-encoder picks; whatever MJPEG
//! the device sends from V4L2), `width` x `height` pixels, at most
//! `FRAME_BYTES_MAX` (4 MiB) of encoded bytes and at most `FRAME_WIDTH_MAX` x `FRAME_HEIGHT_MAX`
//! (1920 x 1080) pixels. `sequence` counts frames from 0 per source; `timestamp_us` is the
//! source's own clock (virtual for the simulator, the driver's monotonic capture time for V4L2),
//! so the board crate reads no clock.
//!
//! `SimCamera` renders a moving scene and encodes it with `jpeg-encoder`:
//! - a background gradient (red grows left to right, green top to bottom, blue fixed at 96), so
//!   background channels stay at or below 200 + noise;
//! - a white disc of radius min(width, height) / 8 that bounces inside the frame below the
//!   counter strip, moving `width / 40` pixels right and `height / 50` pixels down per scene
//!   step (at least 1);
//! - a counter strip at the top: 16 cells, each `max(1, width / 32)` pixels square, showing the
//!   scene step in binary, least significant bit left, yellow for 1 and black for 0;
//! - uniform per-channel noise of ±`noise_amplitude` (at most `NOISE_AMPLITUDE_MAX`, 32), drawn
//!   from a generator seeded by (seed, scene step).
//!
//! The rendering is a pure function of (config, scene step), so a scene that does not advance
//! encodes to byte-identical frames: the motion pattern moves the scene for `moving_frames`
//! frames, then holds it for `still_frames` frames, and repeats, which lets a duplicate-frame
//! filter downstream be tested.

use crate::sim::TinyRng;

/// Largest frame width any source may deliver, pixels.
pub const FRAME_WIDTH_MAX: u16 = 1920;
/// Largest frame height any source may deliver, pixels.
pub const FRAME_HEIGHT_MAX: u16 = 1080;
/// Smallest simulated frame width: the counter strip and the disc need room.
pub const SIM_WIDTH_MIN: u16 = 32;
/// Smallest simulated frame height.
pub const SIM_HEIGHT_MIN: u16 = 24;
/// Largest encoded frame, bytes; MJPEG at 1080p is typically 100 KiB to 1 MiB.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest frame rate a source may be configured for.
pub const FPS_MAX: u32 = 120;
/// Largest per-channel noise of the simulated camera: above it the disc could not be told apart
/// from the background by brightness.
pub const NOISE_AMPLITUDE_MAX: u8 = 32;
/// Cells in the simulated camera's counter strip (bits of the scene step shown).
pub const COUNTER_CELLS: u32 = 16;

const BACKGROUND_BLUE: u8 = 96;
const BACKGROUND_SPAN: u32 = 160;
const BACKGROUND_BASE: u32 = 40;
const DISC_COLOR: [u8; 3] = [255, 255, 255];
const COUNTER_ON: [u8; 3] = [255, 255, 0];
const COUNTER_OFF: [u8; 3] = [0, 0, 0];

// The disc is the only region with a high blue channel: the background's blue stays at 96 ± noise
// and the counter's is 0 ± noise. Keep a 32-level margin on both sides of the midpoint for JPEG
// ringing, so tests can find the disc by its blue channel alone.
const _: () = assert!(BACKGROUND_BLUE as u32 + NOISE_AMPLITUDE_MAX as u32 + 32 < 176);
const _: () = assert!(255 - NOISE_AMPLITUDE_MAX as u32 - 32 > 176);
const _: () = assert!(BACKGROUND_BASE + BACKGROUND_SPAN <= 255);
const _: () = assert!((FRAME_WIDTH_MAX as usize) * (FRAME_HEIGHT_MAX as usize) * 3 / 2 <= FRAME_BYTES_MAX);

/// Encoding of a frame's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFormat {
    /// One complete JPEG (JFIF) image; MJPEG frames from V4L2 may omit the Huffman tables.
    Jpeg,
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Width in pixels, 1..=`FRAME_WIDTH_MAX`.
    pub width: u16,
    /// Height in pixels, 1..=`FRAME_HEIGHT_MAX`.
    pub height: u16,
    /// Frames delivered by this source before this one.
    pub sequence: u64,
    /// Capture time on the source's clock, microseconds (virtual for `SimCamera`).
    pub timestamp_us: u64,
    /// Encoding of `bytes`.
    pub format: FrameFormat,
    /// Encoded image, at most `FRAME_BYTES_MAX` bytes.
    pub bytes: Vec<u8>,
}

/// Errors of a frame source.
#[derive(Debug, thiserror::Error)]
pub enum CameraError {
    /// The JPEG encoder refused the image.
    #[error("camera {camera}: jpeg encoding failed: {reason}")]
    Encode {
        /// Camera name.
        camera: String,
        /// The encoder's message.
        reason: String,
    },
    /// A frame was larger than `FRAME_BYTES_MAX`.
    #[error(
        "camera {camera}: frame of {bytes} bytes above the maximum {max} bytes (lower resolution or quality)"
    )]
    FrameTooLarge {
        /// Camera name.
        camera: String,
        /// Size of the frame.
        bytes: usize,
        /// `FRAME_BYTES_MAX`.
        max: usize,
    },
    /// A device operation failed.
    #[error("camera {camera}: {operation} on {device} failed: {source}")]
    Device {
        /// Camera name.
        camera: String,
        /// Device path, e.g. `/dev/video0`.
        device: String,
        /// What was attempted, e.g. `open`.
        operation: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The device cannot deliver what the profile asks for.
    #[error("camera {camera}: {reason}")]
    Unsupported {
        /// Camera name.
        camera: String,
        /// What is missing, e.g. `device offers no MJPEG format`.
        reason: String,
    },
}

/// Anything that delivers camera frames, one at a time, blocking until the next one is ready.
pub trait FrameSource {
    /// The camera's name from the board profile.
    fn name(&self) -> &str;
    /// The next frame.
    fn next_frame(&mut self) -> Result<Frame, CameraError>;
}

impl<T: FrameSource + ?Sized> FrameSource for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn next_frame(&mut self) -> Result<Frame, CameraError> {
        (**self).next_frame()
    }
}

/// Settings of a simulated camera; every field matters to what the frames look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimCameraConfig {
    /// Width in pixels, `SIM_WIDTH_MIN..=FRAME_WIDTH_MAX`.
    pub width: u16,
    /// Height in pixels, `SIM_HEIGHT_MIN..=FRAME_HEIGHT_MAX`.
    pub height: u16,
    /// Frames per second of the virtual clock, 1..=`FPS_MAX`; sets `timestamp_us` only (the
    /// simulator never sleeps).
    pub fps: u32,
    /// JPEG quality, 1..=100.
    pub quality: u8,
    /// Seed of the noise generator.
    pub seed: u64,
    /// Per-channel noise, ±this much, 0..=`NOISE_AMPLITUDE_MAX`.
    pub noise_amplitude: u8,
    /// Frames during which the scene moves, per motion cycle.
    pub moving_frames: u32,
    /// Frames during which the scene holds still (identical frames), per motion cycle.
    pub still_frames: u32,
}

impl Default for SimCameraConfig {
    fn default() -> Self {
        Self {
            width: 320,
            height: 240,
            fps: 5,
            quality: 80,
            seed: 1,
            noise_amplitude: 4,
            moving_frames: 1,
            still_frames: 0,
        }
    }
}

impl SimCameraConfig {
    /// Checks every field against its limit; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(SIM_WIDTH_MIN..=FRAME_WIDTH_MAX).contains(&self.width) {
            return Err(format!("width {} outside {SIM_WIDTH_MIN}..={FRAME_WIDTH_MAX}", self.width));
        }
        if !(SIM_HEIGHT_MIN..=FRAME_HEIGHT_MAX).contains(&self.height) {
            return Err(format!("height {} outside {SIM_HEIGHT_MIN}..={FRAME_HEIGHT_MAX}", self.height));
        }
        if !(1..=FPS_MAX).contains(&self.fps) {
            return Err(format!("fps {} outside 1..={FPS_MAX}", self.fps));
        }
        if !(1..=100).contains(&self.quality) {
            return Err(format!("quality {} outside 1..=100", self.quality));
        }
        if self.noise_amplitude > NOISE_AMPLITUDE_MAX {
            return Err(format!("noise {} above {NOISE_AMPLITUDE_MAX}", self.noise_amplitude));
        }
        if self.moving_frames == 0 && self.still_frames == 0 {
            return Err("moving_frames and still_frames are both 0".to_string());
        }
        Ok(())
    }
}

/// Where the simulated disc is in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscPosition {
    /// Centre column, pixels from the left.
    pub x_px: u32,
    /// Centre row, pixels from the top.
    pub y_px: u32,
    /// Radius, pixels.
    pub radius_px: u32,
}

/// Simulated camera producing real JPEG frames of a moving scene.
#[derive(Debug, Clone)]
pub struct SimCamera {
    name: String,
    config: SimCameraConfig,
    sequence: u64,
    scene_step: u64,
    rgb: Vec<u8>,
}

/// Position along a path bouncing between `low` and `high` after `travel` pixels.
fn bounce(low: u32, high: u32, travel: u64) -> u32 {
    let span = u64::from(high.saturating_sub(low));
    if span == 0 {
        return low;
    }
    let phase = travel % (2 * span);
    let offset = if phase <= span { phase } else { 2 * span - phase };
    low + offset as u32
}

impl SimCamera {
    /// A camera at scene step 0; panics on a config that fails `SimCameraConfig::validate`.
    pub fn new(name: impl Into<String>, config: SimCameraConfig) -> Self {
        if let Err(reason) = config.validate() {
            panic!("invalid simulated camera config: {reason}");
        }
        let pixels = usize::from(config.width) * usize::from(config.height);
        Self { name: name.into(), config, sequence: 0, scene_step: 0, rgb: vec![0; pixels * 3] }
    }

    /// The settings the camera was built with.
    pub fn config(&self) -> &SimCameraConfig {
        &self.config
    }

    fn counter_cell_px(&self) -> u32 {
        (u32::from(self.config.width) / 32).max(1)
    }

    /// Where the disc is drawn at `scene_step`.
    pub fn disc_position(&self, scene_step: u64) -> DiscPosition {
        let width = u32::from(self.config.width);
        let height = u32::from(self.config.height);
        let radius_px = (width.min(height) / 8).max(2);
        let top = self.counter_cell_px() + radius_px;
        let x_step = u64::from((width / 40).max(1));
        let y_step = u64::from((height / 50).max(1));
        DiscPosition {
            x_px: bounce(radius_px, width - 1 - radius_px, scene_step * x_step),
            y_px: bounce(top.min(height - 1 - radius_px), height - 1 - radius_px, scene_step * y_step),
            radius_px,
        }
    }

    /// Scene step the frame with this sequence number shows: frame 0 shows step 0, and frame `n`
    /// advances the scene by one over frame `n - 1` when `n` falls in the moving part of its
    /// motion cycle (`n % (moving_frames + still_frames) < moving_frames`), else repeats it.
    pub fn scene_step_of(&self, sequence: u64) -> u64 {
        let moving = u64::from(self.config.moving_frames);
        if moving == 0 {
            return 0;
        }
        let cycle = moving + u64::from(self.config.still_frames);
        // Frames 0..=sequence inside the moving part, less frame 0, which shows the start.
        let count = sequence + 1;
        (count / cycle) * moving + (count % cycle).min(moving) - 1
    }

    fn render(&mut self, scene_step: u64) {
        let width = u32::from(self.config.width);
        let height = u32::from(self.config.height);
        let disc = self.disc_position(scene_step);
        let cell_px = self.counter_cell_px();
        let radius_squared = i64::from(disc.radius_px) * i64::from(disc.radius_px);
        let mut rng = TinyRng::new(self.config.seed ^ scene_step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let noise = u32::from(self.config.noise_amplitude);
        for y in 0..height {
            for x in 0..width {
                let cell = x / cell_px;
                let color = if y < cell_px && cell < COUNTER_CELLS {
                    if scene_step >> cell & 1 == 1 { COUNTER_ON } else { COUNTER_OFF }
                } else {
                    let dx = i64::from(x) - i64::from(disc.x_px);
                    let dy = i64::from(y) - i64::from(disc.y_px);
                    if dx * dx + dy * dy <= radius_squared {
                        DISC_COLOR
                    } else {
                        [
                            (BACKGROUND_BASE + BACKGROUND_SPAN * x / (width - 1)) as u8,
                            (BACKGROUND_BASE + BACKGROUND_SPAN * y / (height - 1)) as u8,
                            BACKGROUND_BLUE,
                        ]
                    }
                };
                let index = ((y * width + x) * 3) as usize;
                for (channel, value) in color.into_iter().enumerate() {
                    let noisy = i64::from(value) + rng.symmetric(noise);
                    self.rgb[index + channel] = noisy.clamp(0, 255) as u8;
                }
            }
        }
    }
}

impl FrameSource for SimCamera {
    fn name(&self) -> &str {
        &self.name
    }

    fn next_frame(&mut self) -> Result<Frame, CameraError> {
        let scene_step = self.scene_step_of(self.sequence);
        self.render(scene_step);
        self.scene_step = scene_step;
        let mut bytes = Vec::new();
        let encoder = jpeg_encoder::Encoder::new(&mut bytes, self.config.quality);
        encoder
            .encode(&self.rgb, self.config.width, self.config.height, jpeg_encoder::ColorType::Rgb)
            .map_err(|error| CameraError::Encode { camera: self.name.clone(), reason: error.to_string() })?;
        if bytes.len() > FRAME_BYTES_MAX {
            return Err(CameraError::FrameTooLarge {
                camera: self.name.clone(),
                bytes: bytes.len(),
                max: FRAME_BYTES_MAX,
            });
        }
        let frame = Frame {
            width: self.config.width,
            height: self.config.height,
            sequence: self.sequence,
            timestamp_us: self.sequence * 1_000_000 / u64::from(self.config.fps),
            format: FrameFormat::Jpeg,
            bytes,
        };
        self.sequence += 1;
        Ok(frame)
    }
}
