//! V4L2 MJPEG capture (cargo feature `v4l2`, Linux only) through raw ioctls on `/dev/videoN`.
//!
//! Why raw ioctls: the `v4l` crate's bindings (`v4l2-sys-mit`, `v4l-sys`) run bindgen at build
//! time, which needs libclang on every build machine and the image builder; the five structures
//! and nine ioctls used here are small and stable kernel ABI (include/uapi/linux/videodev2.h).
//!
//! Sequence: QUERYCAP (must offer video capture and streaming I/O), S_FMT to MJPEG (or JPEG) at
//! the profile's size (the driver may pick the nearest size it supports; frames report the size
//! it chose), S_PARM for the frame interval 1/fps (ignored by drivers without
//! V4L2_CAP_TIMEPERFRAME), REQBUFS `BUFFERS_REQUESTED` (4) memory-mapped buffers, QUERYBUF and
//! mmap each, QBUF all, STREAMON. `next_frame` blocks in DQBUF, copies `bytesused` bytes (at most
//! `FRAME_BYTES_MAX`) and queues the buffer again; buffers the driver flags as erroneous or empty
//! are skipped, at most `SKIPPED_BUFFERS_MAX` (8) in a row. Drop stops streaming and unmaps.
//! `timestamp_us` is the driver's capture time (CLOCK_MONOTONIC on current kernels).
//!
//! Structure layouts follow the C definitions through `#[repr(C)]` and libc types, so they hold on
//! 32- and 64-bit targets; the 64-bit sizes and ioctl numbers are checked against videodev2.h in
//! the unit tests. Compile-tested only: the build machine has no camera.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::camera::{CameraError, FRAME_BYTES_MAX, Frame, FrameFormat, FrameSource};
use crate::profile::CameraProfile;

/// Buffers requested from the driver: one being filled, one being read, two spare.
pub const BUFFERS_REQUESTED: u32 = 4;
/// Most buffers accepted if the driver grants more than requested.
pub const BUFFERS_MAX: u32 = 16;
/// Erroneous or empty buffers skipped in a row before `next_frame` gives up.
pub const SKIPPED_BUFFERS_MAX: u32 = 8;

const BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
const MEMORY_MMAP: u32 = 1;
const FIELD_NONE: u32 = 1;
const CAP_VIDEO_CAPTURE: u32 = 0x0000_0001;
const CAP_STREAMING: u32 = 0x0400_0000;
const CAP_DEVICE_CAPS: u32 = 0x8000_0000;
const BUF_FLAG_ERROR: u32 = 0x40;

const fn fourcc(code: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*code)
}
const PIX_FMT_MJPEG: u32 = fourcc(b"MJPG");
const PIX_FMT_JPEG: u32 = fourcc(b"JPEG");

#[repr(C)]
#[derive(Clone, Copy)]
struct Capability {
    driver: [u8; 16],
    card: [u8; 32],
    bus_info: [u8; 32],
    version: u32,
    capabilities: u32,
    device_caps: u32,
    reserved: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PixFormat {
    width: u32,
    height: u32,
    pixelformat: u32,
    field: u32,
    bytesperline: u32,
    sizeimage: u32,
    colorspace: u32,
    private: u32,
    flags: u32,
    ycbcr_encoding: u32,
    quantization: u32,
    transfer_function: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
union FormatUnion {
    pix: PixFormat,
    raw: [u8; 200],
    // `struct v4l2_window` holds pointers, which gives the C union pointer alignment.
    align: [usize; 0],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Format {
    kind: u32,
    fmt: FormatUnion,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RequestBuffers {
    count: u32,
    kind: u32,
    memory: u32,
    capabilities: u32,
    flags: u8,
    reserved: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Timecode {
    kind: u32,
    flags: u32,
    frames: u8,
    seconds: u8,
    minutes: u8,
    hours: u8,
    userbits: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
union BufferLocation {
    offset: u32,
    userptr: libc::c_ulong,
    planes: *mut libc::c_void,
    fd: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Buffer {
    index: u32,
    kind: u32,
    bytesused: u32,
    flags: u32,
    field: u32,
    timestamp: libc::timeval,
    timecode: Timecode,
    sequence: u32,
    memory: u32,
    m: BufferLocation,
    length: u32,
    reserved2: u32,
    request_fd: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Fraction {
    numerator: u32,
    denominator: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CaptureParm {
    capability: u32,
    capturemode: u32,
    timeperframe: Fraction,
    extendedmode: u32,
    readbuffers: u32,
    reserved: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
union StreamParmUnion {
    capture: CaptureParm,
    raw: [u8; 200],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct StreamParm {
    kind: u32,
    parm: StreamParmUnion,
}

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(direction: u32, number: u32, size: usize) -> u32 {
    assert!(size < (1 << 14), "ioctl argument too large for the size field");
    (direction << 30) | ((size as u32) << 16) | ((b'V' as u32) << 8) | number
}

const VIDIOC_QUERYCAP: u32 = ioc(IOC_READ, 0, size_of::<Capability>());
const VIDIOC_S_FMT: u32 = ioc(IOC_READ | IOC_WRITE, 5, size_of::<Format>());
const VIDIOC_REQBUFS: u32 = ioc(IOC_READ | IOC_WRITE, 8, size_of::<RequestBuffers>());
const VIDIOC_QUERYBUF: u32 = ioc(IOC_READ | IOC_WRITE, 9, size_of::<Buffer>());
const VIDIOC_QBUF: u32 = ioc(IOC_READ | IOC_WRITE, 15, size_of::<Buffer>());
const VIDIOC_DQBUF: u32 = ioc(IOC_READ | IOC_WRITE, 17, size_of::<Buffer>());
const VIDIOC_STREAMON: u32 = ioc(IOC_WRITE, 18, size_of::<libc::c_int>());
const VIDIOC_STREAMOFF: u32 = ioc(IOC_WRITE, 19, size_of::<libc::c_int>());
const VIDIOC_S_PARM: u32 = ioc(IOC_READ | IOC_WRITE, 22, size_of::<StreamParm>());

/// All-zero value of a plain C structure, as the V4L2 API expects before filling fields in.
fn zeroed<T: Copy>() -> T {
    // SAFETY: only used with the `#[repr(C)]` structures above, made of integers, byte arrays,
    // a nullable pointer and `timeval`; all-zero bytes are a valid value of each.
    unsafe { std::mem::zeroed() }
}

/// One memory-mapped driver buffer.
struct Mapping {
    address: *mut libc::c_void,
    length: usize,
}

/// A V4L2 camera delivering MJPEG frames.
pub struct V4l2Camera {
    name: String,
    device: String,
    file: OwnedFd,
    mappings: Vec<Mapping>,
    width: u16,
    height: u16,
    sequence: u64,
}

// SAFETY: the mappings are private to this value, only read through `&mut self` in
// `next_frame`, and unmapped in `Drop`; nothing else aliases them, so moving the camera to
// another thread is sound.
unsafe impl Send for V4l2Camera {}

impl V4l2Camera {
    /// Opens and starts streaming the profile's device (kind v4l2, validated).
    pub fn open(profile: &CameraProfile) -> Result<V4l2Camera, CameraError> {
        let device = profile.device.clone().expect("device validated for kind v4l2");
        let path = CString::new(device.clone()).map_err(|_| CameraError::Unsupported {
            camera: profile.name.clone(),
            reason: format!("device path {device:?} holds a NUL byte"),
        })?;
        // Blocking reads: `next_frame` waits in DQBUF for the next frame.
        // SAFETY: `path` is a valid NUL-terminated string.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(CameraError::Device {
                camera: profile.name.clone(),
                device,
                operation: "open",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a file descriptor we just opened and own.
        let file = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut camera = V4l2Camera {
            name: profile.name.clone(),
            device,
            file,
            mappings: Vec::new(),
            width: profile.width,
            height: profile.height,
            sequence: 0,
        };
        camera.start(profile)?;
        Ok(camera)
    }

    fn ioctl<T>(&self, request: u32, argument: &mut T, operation: &'static str) -> Result<(), CameraError> {
        loop {
            // SAFETY: `argument` is the structure this request number was computed for (its size
            // is encoded in `request`), borrowed mutably for the duration of the call.
            let result = unsafe {
                libc::ioctl(self.file.as_raw_fd(), request as _, argument as *mut T as *mut libc::c_void)
            };
            if result >= 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(self.device_error(operation, error));
            }
        }
    }

    fn device_error(&self, operation: &'static str, source: io::Error) -> CameraError {
        CameraError::Device { camera: self.name.clone(), device: self.device.clone(), operation, source }
    }

    fn unsupported(&self, reason: String) -> CameraError {
        CameraError::Unsupported { camera: self.name.clone(), reason: format!("{}: {reason}", self.device) }
    }

    fn start(&mut self, profile: &CameraProfile) -> Result<(), CameraError> {
        let mut capability: Capability = zeroed();
        self.ioctl(VIDIOC_QUERYCAP, &mut capability, "VIDIOC_QUERYCAP")?;
        let capabilities = if capability.capabilities & CAP_DEVICE_CAPS != 0 {
            capability.device_caps
        } else {
            capability.capabilities
        };
        if capabilities & CAP_VIDEO_CAPTURE == 0 || capabilities & CAP_STREAMING == 0 {
            return Err(self.unsupported(format!(
                "no video capture with streaming I/O (capabilities 0x{capabilities:08X})"
            )));
        }

        let mut format: Format = zeroed();
        format.kind = BUF_TYPE_VIDEO_CAPTURE;
        format.fmt.pix = PixFormat {
            width: u32::from(profile.width),
            height: u32::from(profile.height),
            pixelformat: PIX_FMT_MJPEG,
            field: FIELD_NONE,
            ..zeroed()
        };
        self.ioctl(VIDIOC_S_FMT, &mut format, "VIDIOC_S_FMT")?;
        // SAFETY: S_FMT on a capture buffer type fills the `pix` member.
        let chosen = unsafe { format.fmt.pix };
        if chosen.pixelformat != PIX_FMT_MJPEG && chosen.pixelformat != PIX_FMT_JPEG {
            let code = chosen.pixelformat.to_le_bytes();
            return Err(self.unsupported(format!(
                "no MJPEG format (driver chose {:?})",
                String::from_utf8_lossy(&code)
            )));
        }
        let width = u16::try_from(chosen.width).ok().filter(|width| *width <= crate::camera::FRAME_WIDTH_MAX);
        let height =
            u16::try_from(chosen.height).ok().filter(|height| *height <= crate::camera::FRAME_HEIGHT_MAX);
        let (Some(width), Some(height)) = (width, height) else {
            return Err(self
                .unsupported(format!("driver chose {}x{}, above the maximum", chosen.width, chosen.height)));
        };
        self.width = width;
        self.height = height;

        let mut parameters: StreamParm = zeroed();
        parameters.kind = BUF_TYPE_VIDEO_CAPTURE;
        parameters.parm.capture =
            CaptureParm { timeperframe: Fraction { numerator: 1, denominator: profile.fps }, ..zeroed() };
        // A driver without a settable frame interval answers EINVAL or ENOTTY and keeps its own
        // rate, which is fine for a trigger-driven or paced reader; any other error is real.
        if let Err(error) = self.ioctl(VIDIOC_S_PARM, &mut parameters, "VIDIOC_S_PARM") {
            let benign = matches!(
                &error,
                CameraError::Device { source, .. }
                    if matches!(source.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY))
            );
            if !benign {
                return Err(error);
            }
        }

        let mut request: RequestBuffers = zeroed();
        request.count = BUFFERS_REQUESTED;
        request.kind = BUF_TYPE_VIDEO_CAPTURE;
        request.memory = MEMORY_MMAP;
        self.ioctl(VIDIOC_REQBUFS, &mut request, "VIDIOC_REQBUFS")?;
        if request.count < 2 || request.count > BUFFERS_MAX {
            return Err(
                self.unsupported(format!("driver granted {} buffers, need 2..={BUFFERS_MAX}", request.count))
            );
        }
        for index in 0..request.count {
            let mut buffer = self.capture_buffer(index);
            self.ioctl(VIDIOC_QUERYBUF, &mut buffer, "VIDIOC_QUERYBUF")?;
            let length = buffer.length as usize;
            // SAFETY: QUERYBUF with MMAP memory fills `offset`.
            let offset = unsafe { buffer.m.offset };
            // SAFETY: maps `length` bytes of the driver's buffer at the offset it gave us; the
            // result is checked against MAP_FAILED before use.
            let address = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    length,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.file.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if address == libc::MAP_FAILED {
                return Err(self.device_error("mmap", io::Error::last_os_error()));
            }
            self.mappings.push(Mapping { address, length });
            self.ioctl(VIDIOC_QBUF, &mut buffer, "VIDIOC_QBUF")?;
        }
        let mut kind = BUF_TYPE_VIDEO_CAPTURE as libc::c_int;
        self.ioctl(VIDIOC_STREAMON, &mut kind, "VIDIOC_STREAMON")
    }

    fn capture_buffer(&self, index: u32) -> Buffer {
        let mut buffer: Buffer = zeroed();
        buffer.index = index;
        buffer.kind = BUF_TYPE_VIDEO_CAPTURE;
        buffer.memory = MEMORY_MMAP;
        buffer
    }
}

impl FrameSource for V4l2Camera {
    fn name(&self) -> &str {
        &self.name
    }

    fn next_frame(&mut self) -> Result<Frame, CameraError> {
        for _ in 0..=SKIPPED_BUFFERS_MAX {
            let mut buffer = self.capture_buffer(0);
            self.ioctl(VIDIOC_DQBUF, &mut buffer, "VIDIOC_DQBUF")?;
            let mapping = self.mappings.get(buffer.index as usize).ok_or_else(|| {
                self.unsupported(format!(
                    "driver returned buffer {} of {}",
                    buffer.index,
                    self.mappings.len()
                ))
            })?;
            let used = buffer.bytesused as usize;
            let frame = if buffer.flags & BUF_FLAG_ERROR != 0 || used == 0 {
                None
            } else if used > FRAME_BYTES_MAX || used > mapping.length {
                self.ioctl(VIDIOC_QBUF, &mut buffer, "VIDIOC_QBUF")?;
                return Err(CameraError::FrameTooLarge {
                    camera: self.name.clone(),
                    bytes: used,
                    max: FRAME_BYTES_MAX,
                });
            } else {
                // SAFETY: the buffer is dequeued, so the driver does not write it until QBUF;
                // `used` is within the mapping's length (checked above).
                let bytes =
                    unsafe { std::slice::from_raw_parts(mapping.address as *const u8, used) }.to_vec();
                let timestamp_us = (buffer.timestamp.tv_sec as u64)
                    .saturating_mul(1_000_000)
                    .saturating_add(buffer.timestamp.tv_usec as u64);
                Some(Frame {
                    width: self.width,
                    height: self.height,
                    sequence: self.sequence,
                    timestamp_us,
                    format: FrameFormat::Jpeg,
                    bytes,
                })
            };
            self.ioctl(VIDIOC_QBUF, &mut buffer, "VIDIOC_QBUF")?;
            if let Some(frame) = frame {
                self.sequence += 1;
                return Ok(frame);
            }
        }
        Err(self.unsupported(format!("{} erroneous or empty buffers in a row", SKIPPED_BUFFERS_MAX + 1)))
    }
}

impl Drop for V4l2Camera {
    fn drop(&mut self) {
        let mut kind = BUF_TYPE_VIDEO_CAPTURE as libc::c_int;
        // Errors cannot be reported from drop; the file is closed below anyway, which stops the
        // stream in the kernel too.
        let _ = self.ioctl(VIDIOC_STREAMOFF, &mut kind, "VIDIOC_STREAMOFF");
        for mapping in self.mappings.drain(..) {
            // SAFETY: each mapping came from a successful mmap of exactly this length and is
            // unmapped once.
            unsafe { libc::munmap(mapping.address, mapping.length) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes and request numbers printed from linux/videodev2.h by a C program on x86_64.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn layouts_and_requests_match_videodev2_h() {
        assert_eq!(size_of::<Capability>(), 104);
        assert_eq!(size_of::<Format>(), 208);
        assert_eq!(std::mem::offset_of!(Format, fmt), 8);
        assert_eq!(size_of::<PixFormat>(), 48);
        assert_eq!(size_of::<RequestBuffers>(), 20);
        assert_eq!(size_of::<Buffer>(), 88);
        assert_eq!(std::mem::offset_of!(Buffer, timestamp), 24);
        assert_eq!(std::mem::offset_of!(Buffer, sequence), 56);
        assert_eq!(std::mem::offset_of!(Buffer, m), 64);
        assert_eq!(std::mem::offset_of!(Buffer, length), 72);
        assert_eq!(size_of::<StreamParm>(), 204);
        let requests = [
            (VIDIOC_QUERYCAP, 0x8068_5600),
            (VIDIOC_S_FMT, 0xc0d0_5605),
            (VIDIOC_REQBUFS, 0xc014_5608),
            (VIDIOC_QUERYBUF, 0xc058_5609),
            (VIDIOC_QBUF, 0xc058_560f),
            (VIDIOC_DQBUF, 0xc058_5611),
            (VIDIOC_STREAMON, 0x4004_5612),
            (VIDIOC_STREAMOFF, 0x4004_5613),
            (VIDIOC_S_PARM, 0xc0cc_5616),
        ];
        for (computed, header) in requests {
            assert_eq!(computed, header, "0x{computed:08x} != 0x{header:08x}");
        }
        assert_eq!(PIX_FMT_MJPEG, 0x4750_4a4d);
    }

    #[test]
    fn missing_device_is_a_device_error() {
        let profile = CameraProfile {
            name: "cam0".to_string(),
            kind: crate::profile::CameraKind::V4l2,
            width: 640,
            height: 480,
            fps: 10,
            device: Some("/dev/video-does-not-exist".to_string()),
            sim: None,
        };
        match V4l2Camera::open(&profile) {
            Err(CameraError::Device { operation: "open", device, .. }) => {
                assert_eq!(device, "/dev/video-does-not-exist")
            }
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => panic!("opened a missing device"),
        }
    }
}
