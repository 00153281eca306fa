//! The Rust twin of the image generator in `models/train_classifier.py`: 32×32 8-bit grayscale
//! images of a circle, a square, a triangle (apex up) or horizontal stripes, at a random
//! position and size, with random foreground and background levels and Gaussian pixel noise.
//!
//! The parameters below are the script's; the random streams differ (numpy's PCG64 there, a
//! SplitMix64 here), so the images are drawn from the same distribution but are not the same
//! images: what the model is tested on in Rust was never seen in training.

use image::{GrayImage, ImageEncoder as _};

/// Side of the generated images, in pixels.
pub const SIZE: u32 = 32;
/// Class names in the model's output order (`models/shapes.json` lists the same).
pub const LABELS: [&str; 4] = ["circle", "square", "triangle", "horizontal_stripes"];

const BACKGROUND_RANGE: (f64, f64) = (0.0, 0.35);
const FOREGROUND_RANGE: (f64, f64) = (0.65, 1.0);
const NOISE_SIGMA_RANGE: (f64, f64) = (0.0, 0.12);
const CENTER_RANGE: (f64, f64) = (10.0, 22.0);
const HALF_SIZE_RANGE: (f64, f64) = (5.0, 10.0);
/// Stripe period in rows, upper bound exclusive.
const STRIPE_PERIOD_RANGE: (u64, u64) = (4, 9);

/// A small deterministic generator (SplitMix64); good enough for test images, not for secrets.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn uniform(&mut self, (low, high): (f64, f64)) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Uniform integer in `low..high`.
    pub fn below(&mut self, (low, high): (u64, u64)) -> u64 {
        assert!(low < high);
        low + self.next_u64() % (high - low)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let radius = (-2.0 * (1.0 - self.unit()).ln()).sqrt();
        radius * (2.0 * std::f64::consts::PI * self.unit()).cos()
    }
}

/// One image of class `label_index` (an index into [`LABELS`]).
pub fn draw(random: &mut SplitMix64, label_index: usize) -> GrayImage {
    assert!(label_index < LABELS.len(), "label index {label_index} out of range");
    let background = random.uniform(BACKGROUND_RANGE);
    let foreground = random.uniform(FOREGROUND_RANGE);
    let sigma = random.uniform(NOISE_SIGMA_RANGE);
    let center_x = random.uniform(CENTER_RANGE);
    let center_y = random.uniform(CENTER_RANGE);
    let half = random.uniform(HALF_SIZE_RANGE);
    let period = random.below(STRIPE_PERIOD_RANGE);
    let phase = random.below((0, period));
    let mut image = GrayImage::new(SIZE, SIZE);
    for row in 0..SIZE {
        for column in 0..SIZE {
            // Pixel centres, as in the script.
            let (x, y) = (f64::from(column) + 0.5, f64::from(row) + 0.5);
            let inside = match LABELS[label_index] {
                "circle" => (x - center_x).powi(2) + (y - center_y).powi(2) <= half * half,
                "square" => (x - center_x).abs() <= half && (y - center_y).abs() <= half,
                "triangle" => {
                    let top = center_y - half;
                    y >= top && y <= center_y + half && (x - center_x).abs() <= (y - top) / 2.0
                }
                "horizontal_stripes" => (u64::from(row) + phase) % period < period / 2,
                other => unreachable!("label {other}"),
            };
            let level = if inside { foreground } else { background } + random.normal() * sigma;
            image.put_pixel(column, row, image::Luma([(level * 255.0).round().clamp(0.0, 255.0) as u8]));
        }
    }
    image
}

/// `count` labelled images: labels cycle through the classes so every class is equally present.
pub fn dataset(seed: u64, count: usize) -> Vec<(usize, GrayImage)> {
    let mut random = SplitMix64::new(seed);
    (0..count).map(|index| (index % LABELS.len(), draw(&mut random, index % LABELS.len()))).collect()
}

/// PNG encoding of a grayscale image.
pub fn encode_png(image: &GrayImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::L8)
        .expect("encoding a valid in-memory image cannot fail");
    bytes
}

/// JPEG encoding of a grayscale image at `quality` (1..=100).
pub fn encode_jpeg(image: &GrayImage, quality: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
        .write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::L8)
        .expect("encoding a valid in-memory image cannot fail");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_balanced() {
        let first = dataset(7, 8);
        let second = dataset(7, 8);
        assert_eq!(first, second);
        assert_ne!(dataset(8, 8), first);
        let counts = first.iter().fold([0; 4], |mut counts, (label, _)| {
            counts[*label] += 1;
            counts
        });
        assert_eq!(counts, [2, 2, 2, 2]);
    }

    #[test]
    fn encodings_decode_back() {
        let (_, image) = dataset(1, 1).remove(0);
        let png = encode_png(&image);
        let decoded =
            image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().into_luma8();
        assert_eq!(decoded, image);
        let jpeg = encode_jpeg(&image, 90);
        let decoded =
            image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap().into_luma8();
        assert_eq!(decoded.dimensions(), image.dimensions());
    }
}
