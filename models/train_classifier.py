#!/usr/bin/env python3
"""Trains `shapes`, the appliance's demonstration image classifier, and exports it as ONNX.

The data is synthetic and generated here: 32x32 8-bit grayscale images of one of four classes
(see LABELS) at a random position and size, with random foreground/background levels and
Gaussian pixel noise. The Rust twin of this generator is `inference::synthetic` (keep the two in
step: the Rust test measures the committed model's accuracy on images it generates itself).

The model is a two-layer perceptron, trained with plain numpy (mini-batch Adam, cross-entropy), and
exported with onnx.helper using only plain operators tract runs well (opset 13):

    input [1,1,32,32] f32 -> Flatten -> Gemm(1024->HIDDEN) -> Relu -> Gemm(HIDDEN->4) -> Softmax -> scores [1,4]

Outputs, next to this script:
    shapes.onnx  the model (its sha256 is the model's address)
    shapes.json  name, labels in class order, input shape, normalisation

Normalisation (applied by the runner before inference): value = (pixel / 255 - mean) / std.

Reproducible: every random draw comes from numpy's PCG64 seeded with SEED and the ONNX
serialisation is deterministic, so two runs with the same numpy and BLAS build (and BLAS thread
count, which can change float summation order) give byte-identical files. The committed files
came from numpy 2.4.6 and onnx 1.23.2; the run takes about a minute of CPU.

Needs: numpy, onnx (pip install numpy onnx). CI does not retrain.
"""

import hashlib
import json
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20261126
SIZE = 32
LABELS = ["circle", "square", "triangle", "horizontal_stripes"]
MEAN = 0.5
STD = 0.5
HIDDEN = 64
TRAIN_SAMPLES = 40_000
TEST_SAMPLES = 4_000
EPOCHS = 30
BATCH = 128
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4

# Generator parameters (the Rust twin uses the same ones).
BACKGROUND_RANGE = (0.0, 0.35)
FOREGROUND_RANGE = (0.65, 1.0)
NOISE_SIGMA_RANGE = (0.0, 0.12)
CENTER_RANGE = (10.0, 22.0)
HALF_SIZE_RANGE = (5.0, 10.0)
STRIPE_PERIOD_RANGE = (4, 9)  # integers, upper bound exclusive


def draw(rng, label_index):
    """One image of class `label_index` as a (32, 32) uint8 array."""
    background = rng.uniform(*BACKGROUND_RANGE)
    foreground = rng.uniform(*FOREGROUND_RANGE)
    sigma = rng.uniform(*NOISE_SIGMA_RANGE)
    center_x = rng.uniform(*CENTER_RANGE)
    center_y = rng.uniform(*CENTER_RANGE)
    half = rng.uniform(*HALF_SIZE_RANGE)
    period = int(rng.integers(*STRIPE_PERIOD_RANGE))
    phase = int(rng.integers(0, period))
    # Pixel centres.
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    label = LABELS[label_index]
    if label == "circle":
        mask = (x - center_x) ** 2 + (y - center_y) ** 2 <= half**2
    elif label == "square":
        mask = (np.abs(x - center_x) <= half) & (np.abs(y - center_y) <= half)
    elif label == "triangle":
        # Apex up at (cx, cy - half), base from (cx - half, cy + half) to (cx + half, cy + half):
        # inside when below the apex row, above the base and within the widening half-width.
        inside_rows = (y >= center_y - half) & (y <= center_y + half)
        half_width = (y - (center_y - half)) / 2.0
        mask = inside_rows & (np.abs(x - center_x) <= half_width)
    elif label == "horizontal_stripes":
        rows = np.arange(SIZE)[:, None] + np.zeros((1, SIZE), dtype=np.int64)
        mask = ((rows + phase) % period) < (period // 2)
    else:
        raise AssertionError(label)
    image = np.where(mask, foreground, background)
    image = image + rng.normal(0.0, 1.0, size=(SIZE, SIZE)) * sigma
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def dataset(rng, count):
    labels = rng.integers(0, len(LABELS), size=count)
    images = np.stack([draw(rng, int(label)) for label in labels])
    return images, labels


def normalise(images):
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD).reshape(len(images), -1)


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def forward(params, inputs):
    hidden = np.maximum(inputs @ params["w1"].T + params["b1"], 0.0)
    return hidden, softmax(hidden @ params["w2"].T + params["b2"])


def train(rng, inputs, labels):
    features = inputs.shape[1]
    classes = len(LABELS)
    params = {
        "w1": (rng.normal(size=(HIDDEN, features)) * np.sqrt(2.0 / features)).astype(np.float32),
        "b1": np.zeros(HIDDEN, dtype=np.float32),
        "w2": (rng.normal(size=(classes, HIDDEN)) * np.sqrt(2.0 / HIDDEN)).astype(np.float32),
        "b2": np.zeros(classes, dtype=np.float32),
    }
    first = {name: np.zeros_like(value) for name, value in params.items()}
    second = {name: np.zeros_like(value) for name, value in params.items()}
    step = 0
    one_hot = np.eye(classes, dtype=np.float32)[labels]
    for epoch in range(EPOCHS):
        order = rng.permutation(len(inputs))
        loss_sum = 0.0
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            x, target = inputs[batch], one_hot[batch]
            hidden, probabilities = forward(params, x)
            loss_sum += float(-np.log(probabilities[target == 1] + 1e-9).sum())
            grad_logits = (probabilities - target) / len(batch)
            grads = {
                "w2": grad_logits.T @ hidden,
                "b2": grad_logits.sum(axis=0),
            }
            grad_hidden = (grad_logits @ params["w2"]) * (hidden > 0)
            grads["w1"] = grad_hidden.T @ x
            grads["b1"] = grad_hidden.sum(axis=0)
            step += 1
            for name in params:
                grad = grads[name] + WEIGHT_DECAY * params[name]
                first[name] = 0.9 * first[name] + 0.1 * grad
                second[name] = 0.999 * second[name] + 0.001 * grad * grad
                corrected_first = first[name] / (1 - 0.9**step)
                corrected_second = second[name] / (1 - 0.999**step)
                params[name] = (
                    params[name] - LEARNING_RATE * corrected_first / (np.sqrt(corrected_second) + 1e-8)
                ).astype(np.float32)
        print(f"epoch {epoch + 1:2}/{EPOCHS}: loss {loss_sum / len(inputs):.4f}", file=sys.stderr)
    return params


def export(params, path):
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["hidden_linear"], transB=1),
        helper.make_node("Relu", ["hidden_linear"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    initializers = [numpy_helper.from_array(params[name], name) for name in ["w1", "b1", "w2", "b2"]]
    graph = helper.make_graph(
        nodes,
        "shapes",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, len(LABELS)])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tributary train_classifier.py"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def main():
    out_dir = pathlib.Path(__file__).resolve().parent
    rng = np.random.default_rng(SEED)
    train_images, train_labels = dataset(rng, TRAIN_SAMPLES)
    test_images, test_labels = dataset(rng, TEST_SAMPLES)
    params = train(rng, normalise(train_images), train_labels)
    _, probabilities = forward(params, normalise(test_images))
    accuracy = float((probabilities.argmax(axis=1) == test_labels).mean())
    print(f"held-out accuracy on {TEST_SAMPLES} images: {accuracy:.4f}", file=sys.stderr)
    model_path = out_dir / "shapes.onnx"
    export(params, model_path)
    sidecar = {
        "name": "shapes",
        "labels": LABELS,
        "input_shape": [1, 1, SIZE, SIZE],
        "normalisation": {"mean": MEAN, "std": STD},
        "training": {
            "script": "models/train_classifier.py",
            "seed": SEED,
            "train_samples": TRAIN_SAMPLES,
            "held_out_samples": TEST_SAMPLES,
            "held_out_accuracy": round(accuracy, 4),
        },
    }
    (out_dir / "shapes.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    print(f"wrote {model_path} ({model_path.stat().st_size} bytes, sha256 {digest})", file=sys.stderr)


if __name__ == "__main__":
    main()
