//! What a caller may send to a model, and how it becomes the f32 tensor the model sees.
//!
//! Three content types are accepted (anything else is refused with [`InputError::UnsupportedMediaType`]):
//!
//! - `image/jpeg`, `image/png`: decoded with the declared format (no sniffing), converted to 8-bit
//!   grayscale, resized to the model's `H`×`W` (triangle filter; a no-op when the size already
//!   matches), then each pixel becomes `(pixel / 255 - mean) / std` with the model's
//!   normalisation. Only models whose input shape is `[1, 1, H, W]` take images. Decoding is
//!   bounded by what the model needs ([`ImageBounds`]): the dimensions the image's header
//!   declares are read first and an image wider than `image_scale_max` × W or taller than
//!   `image_scale_max` × H (default [`IMAGE_SCALE_MAX_DEFAULT`], 8; never over
//!   [`IMAGE_SIDE_PIXELS_MAX`] a side) is refused with [`InputError::ImageTooLarge`] before any
//!   pixel buffer is allocated; the decoder's own allocations are then capped at 8 bytes (16-bit
//!   RGBA) per allowed pixel. A small compressed bomb cannot take the appliance's memory.
//! - [`TENSOR_CONTENT_TYPE`] (`application/x-tensor-f32`), already normalised, little-endian:
//!
//!   ```text
//!   size        field
//!   4           magic       "TF32"
//!   1           rank        u8, 1..=TENSOR_RANK_MAX (8)
//!   4 * rank    dims        u32 each, every dim >= 1, product <= TENSOR_ELEMENTS_MAX (1 048 576)
//!   4 * n       values      f32 each, n = product of dims, all finite
//!   ```
//!
//!   The body must be exactly `5 + 4 * rank + 4 * n` bytes. The same encoding is used for the
//!   "modified input" blob of the evidence, so an auditor can replay exactly what the model saw.
//! - `application/json`: `{"shape": [1, 1, 32, 32], "data": [0.0, ...]}` with the same rules
//!   (row-major data, finite values).
//!
//! A tensor's shape must equal the model's input shape exactly ([`InputError::ShapeMismatch`]).

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};
use serde::Deserialize;

/// Content type of the binary tensor encoding described in the module documentation.
pub const TENSOR_CONTENT_TYPE: &str = "application/x-tensor-f32";
/// Content type of the JSON tensor encoding.
pub const JSON_CONTENT_TYPE: &str = "application/json";
pub const JPEG_CONTENT_TYPE: &str = "image/jpeg";
pub const PNG_CONTENT_TYPE: &str = "image/png";
/// Every content type the API accepts, in the order error messages list them.
pub const ACCEPTED_CONTENT_TYPES: [&str; 4] =
    [JPEG_CONTENT_TYPE, PNG_CONTENT_TYPE, TENSOR_CONTENT_TYPE, JSON_CONTENT_TYPE];
/// The binary tensor encoding's first four bytes.
pub const TENSOR_MAGIC: [u8; 4] = *b"TF32";
/// Most dimensions a tensor may have.
pub const TENSOR_RANK_MAX: usize = 8;
/// Most values a tensor may hold (4 MiB of f32).
pub const TENSOR_ELEMENTS_MAX: usize = 1 << 20;
/// Longest side of an image we decode, in pixels, whatever the model.
pub const IMAGE_SIDE_PIXELS_MAX: u32 = 8192;
/// Default of `image_scale_max`: an image may be 8 times the model's input a side (256×256 for
/// the 32×32 `shapes` model, a 64-fold decode), enough for a camera crop sent as is.
pub const IMAGE_SCALE_MAX_DEFAULT: u32 = 8;
/// Largest `image_scale_max` a config may ask for.
pub const IMAGE_SCALE_LIMIT: u32 = 256;
/// Largest decoded pixel of the formats we accept (16-bit RGBA PNG), bytes.
pub const DECODED_PIXEL_BYTES_MAX: u64 = 8;
/// Room beside the pixels of an image body (container, metadata chunks).
pub const IMAGE_CONTAINER_BYTES_MAX: usize = 64 * 1024;
/// Room per value of a JSON tensor body (`-0.123456789,` is 13 bytes; shortest f32 forms are
/// at most 15).
pub const JSON_VALUE_BYTES_MAX: usize = 32;
/// Room beside the values of a JSON tensor body (`{"shape": [...], "data": [...]}`).
pub const JSON_FRAME_BYTES_MAX: usize = 4096;

const TENSOR_HEADER_FIXED_BYTES: usize = TENSOR_MAGIC.len() + 1;
const _: () = assert!(TENSOR_RANK_MAX <= u8::MAX as usize);
const _: () = assert!((TENSOR_ELEMENTS_MAX as u64) * 4 <= u32::MAX as u64);
const _: () = assert!(IMAGE_SCALE_MAX_DEFAULT <= IMAGE_SCALE_LIMIT);
// The largest decode allowed at all stays within 512 MiB of decoder allocations.
const _: () = assert!(
    (IMAGE_SIDE_PIXELS_MAX as u64) * (IMAGE_SIDE_PIXELS_MAX as u64) * DECODED_PIXEL_BYTES_MAX <= 512 << 20
);

/// How large an image a model takes, in pixels a side (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageBounds {
    pub width_max: u32,
    pub height_max: u32,
}

impl ImageBounds {
    /// The bounds for a model with `input_shape` (`[1, 1, H, W]`; `None` for models that take no
    /// images): `scale_max` × each side, at most [`IMAGE_SIDE_PIXELS_MAX`].
    pub fn for_model(input_shape: &[usize], scale_max: u32) -> Option<ImageBounds> {
        let &[1, 1, height, width] = input_shape else { return None };
        let side = |model_side: usize| {
            u32::try_from(model_side).unwrap_or(u32::MAX).saturating_mul(scale_max).min(IMAGE_SIDE_PIXELS_MAX)
        };
        Some(ImageBounds { width_max: side(width), height_max: side(height) })
    }

    /// Most bytes the decoder may allocate for an image within the bounds.
    pub fn decode_bytes_max(self) -> u64 {
        u64::from(self.width_max) * u64::from(self.height_max) * DECODED_PIXEL_BYTES_MAX
    }
}

/// The largest body a model with `input_shape` can need: an image within its bounds stored
/// uncompressed in RGBA plus its container, or its tensor as JSON or binary. The API applies
/// the smaller of this and the configured `body_bytes_max`.
pub fn body_bytes_max_for_model(input_shape: &[usize], image_scale_max: u32) -> usize {
    let elements =
        input_shape.iter().try_fold(1usize, |total, &dim| total.checked_mul(dim)).unwrap_or(usize::MAX);
    let elements = elements.min(TENSOR_ELEMENTS_MAX);
    let binary = TENSOR_HEADER_FIXED_BYTES + 4 * TENSOR_RANK_MAX + 4 * elements;
    let json = JSON_FRAME_BYTES_MAX + JSON_VALUE_BYTES_MAX * elements;
    let image = ImageBounds::for_model(input_shape, image_scale_max).map_or(0, |bounds| {
        usize::try_from(u64::from(bounds.width_max) * u64::from(bounds.height_max) * 4).unwrap_or(usize::MAX)
            + IMAGE_CONTAINER_BYTES_MAX
    });
    binary.max(json).max(image)
}

/// Why a request's input cannot be given to the model. Each variant maps to one HTTP status and
/// one metrics reason (see `api`).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InputError {
    #[error("content type {content_type:?} is not accepted; send one of {}", ACCEPTED_CONTENT_TYPES.join(", "))]
    UnsupportedMediaType { content_type: String },
    #[error("body is not a valid {content_type} image: {reason}")]
    NotAnImage { content_type: &'static str, reason: String },
    #[error(
        "{content_type} image declares {width}x{height} pixels; this model takes images of at most \
         {width_max}x{height_max} (image_scale_max times its input size): scale it down before sending"
    )]
    ImageTooLarge { content_type: &'static str, width: u32, height: u32, width_max: u32, height_max: u32 },
    #[error("model {model} takes tensors of shape {shape:?}, not images (images need [1, 1, H, W])")]
    ImagesNotAccepted { model: String, shape: Vec<usize> },
    #[error("malformed tensor: {0}")]
    MalformedTensor(String),
    #[error("tensor shape {found:?} does not match the model's input shape {expected:?}")]
    ShapeMismatch { found: Vec<usize>, expected: Vec<usize> },
}

/// A dense row-major f32 tensor: what the model is given.
#[derive(Clone, Debug, PartialEq)]
pub struct InputTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl InputTensor {
    /// A tensor from its parts, checking rank, element count and finiteness.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<InputTensor, InputError> {
        let elements = checked_elements(&shape)?;
        if data.len() != elements {
            return Err(InputError::MalformedTensor(format!(
                "shape {shape:?} holds {elements} values but {} were sent",
                data.len()
            )));
        }
        if let Some(index) = data.iter().position(|value| !value.is_finite()) {
            return Err(InputError::MalformedTensor(format!("value at index {index} is not finite")));
        }
        Ok(InputTensor { shape, data })
    }

    /// The binary encoding ([`TENSOR_CONTENT_TYPE`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes =
            Vec::with_capacity(TENSOR_HEADER_FIXED_BYTES + 4 * self.shape.len() + 4 * self.data.len());
        bytes.extend_from_slice(&TENSOR_MAGIC);
        bytes.push(u8::try_from(self.shape.len()).expect("rank checked at construction"));
        for &dim in &self.shape {
            bytes.extend_from_slice(&u32::try_from(dim).expect("dims checked at construction").to_le_bytes());
        }
        for value in &self.data {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    /// Parses the binary encoding; the input is hostile.
    pub fn decode(bytes: &[u8]) -> Result<InputTensor, InputError> {
        let malformed = |problem: String| InputError::MalformedTensor(problem);
        if bytes.len() < TENSOR_HEADER_FIXED_BYTES {
            return Err(malformed(format!(
                "{} bytes is shorter than the {TENSOR_HEADER_FIXED_BYTES}-byte header",
                bytes.len()
            )));
        }
        if bytes[..4] != TENSOR_MAGIC {
            return Err(malformed(format!("magic {:?} is not \"TF32\"", &bytes[..4])));
        }
        let rank = usize::from(bytes[4]);
        if !(1..=TENSOR_RANK_MAX).contains(&rank) {
            return Err(malformed(format!("rank {rank} is not in 1..={TENSOR_RANK_MAX}")));
        }
        let dims_end = TENSOR_HEADER_FIXED_BYTES + 4 * rank;
        let Some(dims) = bytes.get(TENSOR_HEADER_FIXED_BYTES..dims_end) else {
            return Err(malformed(format!("{} bytes cannot hold {rank} dims", bytes.len())));
        };
        let shape: Vec<usize> = dims
            .chunks_exact(4)
            .map(|dim| u32::from_le_bytes(dim.try_into().expect("chunks of 4")) as usize)
            .collect();
        let elements = checked_elements(&shape)?;
        let expected_bytes = dims_end + 4 * elements;
        if bytes.len() != expected_bytes {
            return Err(malformed(format!(
                "shape {shape:?} needs {expected_bytes} bytes, the body has {}",
                bytes.len()
            )));
        }
        let data = bytes[dims_end..]
            .chunks_exact(4)
            .map(|value| f32::from_le_bytes(value.try_into().expect("chunks of 4")))
            .collect();
        InputTensor::new(shape, data)
    }

    /// Parses the JSON encoding `{"shape": [...], "data": [...]}`.
    pub fn from_json(bytes: &[u8]) -> Result<InputTensor, InputError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct JsonTensor {
            shape: Vec<usize>,
            data: Vec<f32>,
        }
        let parsed: JsonTensor = serde_json::from_slice(bytes)
            .map_err(|error| InputError::MalformedTensor(format!("JSON tensor does not parse: {error}")))?;
        InputTensor::new(parsed.shape, parsed.data)
    }

    /// Checks the shape against a model's input shape.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<(), InputError> {
        if self.shape != expected {
            return Err(InputError::ShapeMismatch { found: self.shape.clone(), expected: expected.to_vec() });
        }
        Ok(())
    }
}

fn checked_elements(shape: &[usize]) -> Result<usize, InputError> {
    if !(1..=TENSOR_RANK_MAX).contains(&shape.len()) {
        return Err(InputError::MalformedTensor(format!(
            "rank {} is not in 1..={TENSOR_RANK_MAX}",
            shape.len()
        )));
    }
    let mut elements = 1usize;
    for &dim in shape {
        if dim == 0 {
            return Err(InputError::MalformedTensor(format!("shape {shape:?} has a zero dimension")));
        }
        elements =
            elements.checked_mul(dim).filter(|&total| total <= TENSOR_ELEMENTS_MAX).ok_or_else(|| {
                InputError::MalformedTensor(format!(
                    "shape {shape:?} holds more than {TENSOR_ELEMENTS_MAX} values"
                ))
            })?;
    }
    Ok(elements)
}

/// How an image's pixels become model values: `(pixel / 255 - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct Normalisation {
    pub mean: f32,
    pub std: f32,
}

/// The kind of body a request carries, from its content type (parameters such as `; charset`
/// are ignored, case-insensitive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Jpeg,
    Png,
    Tensor,
    JsonTensor,
}

impl InputKind {
    pub fn from_content_type(content_type: &str) -> Result<InputKind, InputError> {
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            JPEG_CONTENT_TYPE => Ok(InputKind::Jpeg),
            PNG_CONTENT_TYPE => Ok(InputKind::Png),
            TENSOR_CONTENT_TYPE => Ok(InputKind::Tensor),
            JSON_CONTENT_TYPE => Ok(InputKind::JsonTensor),
            _ => Err(InputError::UnsupportedMediaType {
                content_type: content_type.chars().take(64).collect(),
            }),
        }
    }

    /// The canonical content type recorded as the original blob's type.
    pub fn content_type(self) -> &'static str {
        match self {
            InputKind::Jpeg => JPEG_CONTENT_TYPE,
            InputKind::Png => PNG_CONTENT_TYPE,
            InputKind::Tensor => TENSOR_CONTENT_TYPE,
            InputKind::JsonTensor => JSON_CONTENT_TYPE,
        }
    }
}

/// The tensor a model with `input_shape` and `normalisation` sees for `bytes` of `kind`, and
/// whether it differs from the bytes as received (so the evidence stores it as the modified
/// input). The shape is checked. Images are bounded by the default `image_scale_max`.
pub fn prepare(
    kind: InputKind,
    bytes: &[u8],
    model_name: &str,
    input_shape: &[usize],
    normalisation: Normalisation,
) -> Result<(InputTensor, bool), InputError> {
    prepare_within(kind, bytes, model_name, input_shape, normalisation, IMAGE_SCALE_MAX_DEFAULT)
}

/// [`prepare`] with images bounded by `image_scale_max` × the model's input size.
pub fn prepare_within(
    kind: InputKind,
    bytes: &[u8],
    model_name: &str,
    input_shape: &[usize],
    normalisation: Normalisation,
    image_scale_max: u32,
) -> Result<(InputTensor, bool), InputError> {
    let (tensor, modified) = match kind {
        InputKind::Tensor => (InputTensor::decode(bytes)?, false),
        InputKind::JsonTensor => (InputTensor::from_json(bytes)?, true),
        InputKind::Jpeg | InputKind::Png => {
            let &[1, 1, height, width] = input_shape else {
                return Err(InputError::ImagesNotAccepted {
                    model: model_name.to_string(),
                    shape: input_shape.to_vec(),
                });
            };
            let format = if kind == InputKind::Jpeg { ImageFormat::Jpeg } else { ImageFormat::Png };
            let bounds = ImageBounds::for_model(input_shape, image_scale_max)
                .expect("an image input shape was matched above");
            let gray = decode_grayscale(bytes, format, kind.content_type(), bounds)?;
            (image_to_tensor(&gray, height, width, normalisation), true)
        }
    };
    tensor.expect_shape(input_shape)?;
    Ok((tensor, modified))
}

/// Decodes `bytes` as `format` into 8-bit grayscale within `bounds`: the dimensions its header
/// declares are checked before any pixel buffer exists, and the decoder's allocations are capped.
pub fn decode_grayscale(
    bytes: &[u8],
    format: ImageFormat,
    content_type: &'static str,
    bounds: ImageBounds,
) -> Result<image::GrayImage, InputError> {
    let not_an_image =
        |error: image::ImageError| InputError::NotAnImage { content_type, reason: error.to_string() };
    let mut limits = Limits::default();
    limits.max_image_width = Some(bounds.width_max);
    limits.max_image_height = Some(bounds.height_max);
    limits.max_alloc = Some(bounds.decode_bytes_max());
    // Reads the header only (the image crate allocates no pixels for `into_dimensions`).
    let mut header = ImageReader::with_format(Cursor::new(bytes), format);
    header.limits(no_dimension_limits(limits.clone()));
    let (width, height) = header.into_dimensions().map_err(not_an_image)?;
    if width > bounds.width_max || height > bounds.height_max {
        return Err(InputError::ImageTooLarge {
            content_type,
            width,
            height,
            width_max: bounds.width_max,
            height_max: bounds.height_max,
        });
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    let decoded = reader.decode().map_err(not_an_image)?;
    Ok(decoded.into_luma8())
}

/// `limits` without the dimension bounds, so reading a header reports the dimensions it
/// declares (and [`InputError::ImageTooLarge`] can name them) instead of a decoder error.
fn no_dimension_limits(mut limits: Limits) -> Limits {
    limits.max_image_width = None;
    limits.max_image_height = None;
    limits
}

/// Resizes (when needed) and normalises a grayscale image into a `[1, 1, height, width]` tensor.
pub fn image_to_tensor(
    gray: &image::GrayImage,
    height: usize,
    width: usize,
    normalisation: Normalisation,
) -> InputTensor {
    let (target_width, target_height) = (
        u32::try_from(width).expect("model width fits u32"),
        u32::try_from(height).expect("model height fits u32"),
    );
    let resized;
    let pixels = if gray.dimensions() == (target_width, target_height) {
        gray
    } else {
        resized =
            image::imageops::resize(gray, target_width, target_height, image::imageops::FilterType::Triangle);
        &resized
    };
    let data: Vec<f32> = pixels
        .as_raw()
        .iter()
        .map(|&pixel| (f32::from(pixel) / 255.0 - normalisation.mean) / normalisation.std)
        .collect();
    assert_eq!(data.len(), height * width);
    InputTensor { shape: vec![1, 1, height, width], data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8], expected: Result<&[usize], &str>) {
        match (InputTensor::decode(bytes), expected) {
            (Ok(tensor), Ok(shape)) => {
                assert_eq!(tensor.shape, shape);
                assert_eq!(tensor.encode(), bytes, "encoding is canonical");
            }
            (Err(error), Err(fragment)) => {
                assert!(error.to_string().contains(fragment), "{error} does not mention {fragment:?}")
            }
            (got, expected) => panic!("decode gave {got:?}, expected {expected:?}"),
        }
    }

    fn header(rank: u8, dims: &[u32]) -> Vec<u8> {
        let mut bytes = b"TF32".to_vec();
        bytes.push(rank);
        for dim in dims {
            bytes.extend_from_slice(&dim.to_le_bytes());
        }
        bytes
    }

    fn with_values(mut bytes: Vec<u8>, values: &[f32]) -> Vec<u8> {
        for value in values {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn binary_tensor_boundaries() {
        check(&with_values(header(2, &[1, 3]), &[0.0, 1.5, -2.0]), Ok(&[1, 3]));
        check(&with_values(header(1, &[1]), &[7.0]), Ok(&[1]));
        check(b"", Err("shorter than the 5-byte header"));
        check(b"TF33\x01\x01\x00\x00\x00", Err("is not \"TF32\""));
        check(&header(0, &[]), Err("rank 0 is not in 1..=8"));
        check(&header(9, &[1; 9]), Err("rank 9 is not in 1..=8"));
        check(&header(2, &[1]), Err("cannot hold 2 dims"));
        check(&header(2, &[1, 0]), Err("has a zero dimension"));
        check(&header(2, &[u32::MAX, u32::MAX]), Err("more than 1048576 values"));
        check(&with_values(header(1, &[2]), &[1.0]), Err("needs 17 bytes, the body has 13"));
        check(&with_values(header(1, &[1]), &[1.0, 2.0]), Err("needs 13 bytes, the body has 17"));
        check(&with_values(header(1, &[2]), &[1.0, f32::NAN]), Err("index 1 is not finite"));
        check(&with_values(header(1, &[1]), &[f32::INFINITY]), Err("index 0 is not finite"));
    }

    #[test]
    fn json_tensor_and_shape() {
        let tensor = InputTensor::from_json(br#"{"shape":[1,2],"data":[0.5,1]}"#).unwrap();
        assert_eq!(tensor, InputTensor { shape: vec![1, 2], data: vec![0.5, 1.0] });
        assert_eq!(
            tensor.expect_shape(&[1, 1, 32, 32]),
            Err(InputError::ShapeMismatch { found: vec![1, 2], expected: vec![1, 1, 32, 32] })
        );
        let error = InputTensor::from_json(br#"{"shape":[1,2],"data":[0.5]}"#).unwrap_err();
        assert!(error.to_string().contains("holds 2 values but 1 were sent"), "{error}");
        assert!(InputTensor::from_json(b"not json").is_err());
        assert!(InputTensor::from_json(br#"{"shape":[1],"data":[1],"extra":1}"#).is_err());
    }

    #[test]
    fn content_types() {
        assert_eq!(InputKind::from_content_type("image/PNG"), Ok(InputKind::Png));
        assert_eq!(
            InputKind::from_content_type("application/json; charset=utf-8"),
            Ok(InputKind::JsonTensor)
        );
        assert!(matches!(
            InputKind::from_content_type("text/plain"),
            Err(InputError::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn images_are_refused_when_not_images() {
        let normalisation = Normalisation { mean: 0.5, std: 0.5 };
        let error = prepare(InputKind::Png, b"GIF89a", "m", &[1, 1, 32, 32], normalisation).unwrap_err();
        assert!(matches!(error, InputError::NotAnImage { content_type: "image/png", .. }), "{error}");
        let error = prepare(InputKind::Jpeg, &[0xff; 64], "m", &[1, 1, 32, 32], normalisation).unwrap_err();
        assert!(matches!(error, InputError::NotAnImage { content_type: "image/jpeg", .. }), "{error}");
        let error = prepare(InputKind::Png, b"", "m", &[1, 1024], normalisation).unwrap_err();
        assert!(matches!(error, InputError::ImagesNotAccepted { .. }), "{error}");
    }
}
