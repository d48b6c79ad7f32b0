"""Keras models exported by tf2onnx (models/keras/export.py): graphs from another framework than
torch, shipped as files (TensorFlow is not a dependency). Their weights are Keras's seeded random
initialisation."""

from __future__ import annotations

from pathlib import Path

import onnx

from .feeds import InputSpec, image, tokens

FOLDER = Path(__file__).parent / "keras"
BATCH = 2

# name -> (family, input specs at the zoo's batch)
KERAS = {
    "keras_cnn": ("cnn", {"image": image(BATCH, 64, 64, 3)}),  # NHWC, as Keras feeds images
    "keras_encoder": ("transformer", {"input_ids": tokens(BATCH, 32, 512)}),
}


def load_keras(name: str) -> onnx.ModelProto:
    return onnx.load(str(FOLDER / f"{name}.onnx"))


def input_specs(name: str) -> dict[str, InputSpec]:
    return KERAS[name][1]
