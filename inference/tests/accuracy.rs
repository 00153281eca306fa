//! The committed model (`models/shapes.onnx`) against images generated in Rust by
//! `inference::synthetic` — never seen in training — through the same pre-processing the API
//! uses (PNG and JPEG decoding, grayscale, normalisation), and through the raw tensor path.

use std::path::PathBuf;

use inference::input::{InputKind, InputTensor, prepare};
use inference::synthetic::{LABELS, dataset, encode_jpeg, encode_png};
use inference::{Model, ModelSource};

/// Held-out images per run.
const HELD_OUT_IMAGES: usize = 2_000;
/// Chance is 0.25 with four balanced classes; the committed model measures 0.9985 on this set
/// (0.9992 on the script's own held-out set); the bound leaves room for a retrained model.
const ACCURACY_MIN: f64 = 0.95;

fn shapes_model() -> Model {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
    ModelSource::in_directory(models, "shapes").load().expect("models/shapes.onnx loads")
}

#[test]
fn committed_model_matches_its_sidecar() {
    let model = shapes_model();
    assert_eq!(model.name(), "shapes");
    assert_eq!(model.labels(), LABELS);
    assert_eq!(model.input_shape(), [1, 1, 32, 32]);
    assert!(model.onnx_bytes().len() < 1024 * 1024, "model must stay under 1 MiB");
    assert_eq!(model.sha256(), &protocol::evidence::sha256(model.onnx_bytes()));
}

#[test]
fn accuracy_on_rust_generated_images_is_far_above_chance() {
    let model = shapes_model();
    let images = dataset(0x5EED_2026, HELD_OUT_IMAGES);
    let mut correct = [0usize; 3];
    let mut confusion = [[0usize; 4]; 4];
    for (label, image) in &images {
        let encodings = [(InputKind::Png, encode_png(image)), (InputKind::Jpeg, encode_jpeg(image, 90))];
        for (path, (kind, bytes)) in encodings.iter().enumerate() {
            let (tensor, modified) =
                prepare(*kind, bytes, model.name(), model.input_shape(), model.normalisation()).unwrap();
            assert!(modified);
            let decided = model.classify(&tensor).unwrap();
            assert_eq!(decided.scores.len(), 4);
            assert!((decided.scores.iter().sum::<f32>() - 1.0).abs() < 1e-3, "scores are probabilities");
            assert_eq!(decided.label, LABELS[decided.label_index as usize]);
            correct[path] += usize::from(decided.label_index as usize == *label);
            if path == 0 {
                confusion[*label][decided.label_index as usize] += 1;
            }
        }
        // The raw tensor path, through its wire encoding, gives what the PNG path gave.
        let (tensor, _) =
            prepare(InputKind::Png, &encodings[0].1, "shapes", &[1, 1, 32, 32], model.normalisation())
                .unwrap();
        let (from_wire, modified) =
            prepare(InputKind::Tensor, &tensor.encode(), "shapes", &[1, 1, 32, 32], model.normalisation())
                .unwrap();
        assert!(!modified);
        assert_eq!(from_wire, tensor);
        correct[2] += usize::from(model.classify(&from_wire).unwrap().label_index as usize == *label);
    }
    let accuracy = correct.map(|count| count as f64 / HELD_OUT_IMAGES as f64);
    println!(
        "accuracy on {HELD_OUT_IMAGES} Rust-generated images: png {:.4}, jpeg q90 {:.4}, tensor {:.4}",
        accuracy[0], accuracy[1], accuracy[2]
    );
    println!("confusion (rows: truth, columns: decided; png): {confusion:?}");
    for value in accuracy {
        assert!(value >= ACCURACY_MIN, "accuracy {value} below {ACCURACY_MIN}");
    }
    assert_eq!(correct[0], correct[2], "PNG and its tensor are the same input");
}

#[test]
fn larger_images_are_resized_and_colour_is_dropped() {
    let model = shapes_model();
    let (label, image) = dataset(3, 1).remove(0);
    // The same picture at 96×96 in RGB: resized back to 32×32, converted to grayscale.
    let big = image::imageops::resize(&image, 96, 96, image::imageops::FilterType::Nearest);
    let rgb = image::DynamicImage::ImageLuma8(big).into_rgb8();
    let mut png = Vec::new();
    rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let (tensor, _) =
        prepare(InputKind::Png, &png, "shapes", model.input_shape(), model.normalisation()).unwrap();
    assert_eq!(tensor.shape, [1, 1, 32, 32]);
    assert_eq!(model.classify(&tensor).unwrap().label_index as usize, label);
    assert!(InputTensor::new(vec![1, 1, 32, 32], tensor.data.clone()).is_ok());
}
