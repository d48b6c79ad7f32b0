"""Export a torch.nn.Module to an in-memory ONNX ModelProto (TorchScript exporter)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx

# Newest IR version every supported onnxruntime release can load.
MAX_IR_VERSION = 10


def _import_torch():
    try:
        import torch
    except ImportError as exc:  # torch is an optional extra
        raise ValueError(
            "from_torch needs PyTorch; install the `torch` extra (pip install 'onnx-prune[torch]')"
        ) from exc
    return torch


def _as_tuple(example_inputs):
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _default_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}{i}" for i in range(count)]


def _batch_axes(names: list[str], extra: dict | None) -> dict:
    axes = {name: {0: "batch"} for name in names}
    for name, more in (extra or {}).items():
        axes.setdefault(name, {}).update(more)
    return axes


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's warnings and diagnostic prints; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def from_torch(
    module,
    example_inputs,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
    dynamic_axes: dict | None = None,
) -> onnx.ModelProto:
    """Trace `module` on `example_inputs` and return the ONNX model.

    With `dynamic_batch`, axis 0 of every input and output is named "batch";
    `dynamic_axes` ({name: {axis: label}}) adds further symbolic axes.
    """
    torch = _import_torch()
    inputs = _as_tuple(example_inputs)
    input_names = list(input_names or _default_names("input", len(inputs)))
    module.eval()
    with torch.no_grad():
        n_outputs = len(_as_tuple(module(*inputs)))
    output_names = list(output_names or _default_names("output", n_outputs))
    axes = _batch_axes(input_names + output_names, dynamic_axes) if dynamic_batch else dynamic_axes

    buffer = io.BytesIO()
    # Not under no_grad: that would trace nn.MultiheadAttention's fused fast path,
    # which has no ONNX symbolic.
    with _quiet():
        torch.onnx.export(
            module,
            inputs,
            buffer,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model
