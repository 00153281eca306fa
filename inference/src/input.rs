//! What a caller may send to a model, and how it becomes the f32 tensor the model sees.
//!
//! Three content types are accepted (anything else is refused with [`InputError::UnsupportedMediaType`]):
//!
//! - `image/jpeg`, `image/png`: decoded with the declared format (no sniffing), converted to 8-bit
//!   grayscale, resized to the model's `H`×`W` (triangle filter; a no-op when the size already
//!   matches), then each pixel becomes `(pixel / 255 - mean) / std` with the model's
//!   normalisation. Only models whose input shape is `[1, 1, H, W]` take images. Decoding is
//!   bounded: at most [`IMAGE_SIDE_PIXELS_MAX`] pixels a side and [`IMAGE_DECODE_BYTES_MAX`] bytes
//!   of decoder allocations, so a small compressed bomb cannot take the appliance's memory.
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
/// Longest side of an image we decode, in pixels.
pub const IMAGE_SIDE_PIXELS_MAX: u32 = 8192;
/// Most bytes the image decoder may allocate for one image.
pub const IMAGE_DECODE_BYTES_MAX: u64 = 256 * 1024 * 1024;

const TENSOR_HEADER_FIXED_BYTES: usize = TENSOR_MAGIC.len() + 1;
const _: () = assert!(TENSOR_RANK_MAX <= u8::MAX as usize);
const _: () = assert!((TENSOR_ELEMENTS_MAX as u64) * 4 <= u32::MAX as u64);

/// Why a request's input cannot be given to the model. Each variant maps to one HTTP status and
/// one metrics reason (see `api`).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InputError {
    #[error("content type {content_type:?} is not accepted; send one of {}", ACCEPTED_CONTENT_TYPES.join(", "))]
    UnsupportedMediaType { content_type: String },
    #[error("body is not a valid {content_type} image: {reason}")]
    NotAnImage { content_type: &'static str, reason: String },
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
/// input). The shape is checked.
pub fn prepare(
    kind: InputKind,
    bytes: &[u8],
    model_name: &str,
    input_shape: &[usize],
    normalisation: Normalisation,
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
            let gray = decode_grayscale(bytes, format, kind.content_type())?;
            (image_to_tensor(&gray, height, width, normalisation), true)
        }
    };
    tensor.expect_shape(input_shape)?;
    Ok((tensor, modified))
}

/// Decodes `bytes` as `format` into 8-bit grayscale, within the decode limits.
pub fn decode_grayscale(
    bytes: &[u8],
    format: ImageFormat,
    content_type: &'static str,
) -> Result<image::GrayImage, InputError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(IMAGE_SIDE_PIXELS_MAX);
    limits.max_image_height = Some(IMAGE_SIDE_PIXELS_MAX);
    limits.max_alloc = Some(IMAGE_DECODE_BYTES_MAX);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|error| InputError::NotAnImage { content_type, reason: error.to_string() })?;
    Ok(decoded.into_luma8())
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
