"""Export a torch.nn.Module to an in-memory ONNX ModelProto (TorchScript exporter)."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping

import onnx

from onnx_prune.errors import UserError

# Newest IR version every supported onnxruntime release can load.
MAX_IR_VERSION = 10


def _import_torch():
    try:
        import torch
    except ImportError as exc:  # torch is an optional extra
        raise UserError("exporting a torch module needs PyTorch: pip install torch (then the `zoo` extra)") from exc
    return torch


def _as_tuple(example_inputs):
    # a list is the module's arguments, as a tuple is (onnx_prune.compile reads its batch so)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _keyword_call(torch, module, names):
    """`module` called with keyword arguments (a tokenizer's {input_ids, attention_mask}), as a
    module that takes them by position in the dict's order: torch's exporters take positions."""

    class KeywordCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(**dict(zip(names, args)))

    return KeywordCall()


def _outputs(results) -> tuple[tuple, list[str]]:
    """The module's results as the exporters flatten them, and their names: output, output0,
    output1, ...; a single dict of tensors (transformers' ModelOutput, which the exporters flatten
    in its order, leaving out None) gives its tensors, named by its keys."""
    if len(results) == 1 and isinstance(results[0], Mapping):
        tensors = {str(k): v for k, v in results[0].items() if v is not None}
        if tensors and all(hasattr(v, "shape") for v in tensors.values()):
            return tuple(tensors.values()), list(tensors)
    return results, _default_names("output", len(results))


def _default_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}{i}" for i in range(count)]


def _batch_axes(names: list[str], extra: dict | None, scalars=()) -> dict:
    """Axis 0 of every named tensor is the batch, but for scalars (a temperature given as a 0-d
    tensor), which have no axis to name."""
    axes = {name: {0: "batch"} for name in names if name not in scalars}
    for name, more in (extra or {}).items():
        axes.setdefault(name, {}).update(more)
    return axes


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's warnings and diagnostic prints; errors still raise. Also at the
    file-descriptor level: on a failed op, torch's C++ side prints the whole TorchScript graph
    (hundreds of KB) to the process's stdout."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _descriptors_muted():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _descriptors_muted():
    """Point file descriptors 1 and 2 at the null device, restoring them after."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


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
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"from_torch needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, Mapping):  # keyword arguments, named so in the graph
        input_names = list(input_names or example_inputs)
        module, example_inputs = _keyword_call(torch, module, list(example_inputs)), tuple(example_inputs.values())
    inputs = _as_tuple(example_inputs)
    input_names = list(input_names or _default_names("input", len(inputs)))
    modes = [(m, m.training) for m in module.modules()]  # submodules may differ (frozen BatchNorm)
    try:
        module.eval()  # restored below: the caller's module is not changed
        try:
            with torch.no_grad():
                results = _as_tuple(module(*inputs))
        except Exception as exc:
            raise UserError(f"the torch module failed on its example inputs ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from None
        results, names = _outputs(results)
        output_names = list(output_names or names)
        scalars = {name for name, x in zip(input_names + output_names, inputs + results) if getattr(x, "ndim", 1) == 0}
        axes = _batch_axes(input_names + output_names, dynamic_axes, scalars) if dynamic_batch else dynamic_axes

        # to a file, not a buffer: over protobuf's 2 GiB torch writes the weights beside it.
        # Not under no_grad: that would trace nn.MultiheadAttention's fused fast path,
        # which has no ONNX symbolic.
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            names = dict(input_names=input_names, output_names=output_names, dynamic_axes=axes)
            try:
                with _quiet():
                    torch.onnx.export(module, inputs, path, dynamo=False, opset_version=opset,
                                      do_constant_folding=True, **names)
            except Exception as exc:
                # The TorchScript exporter lacks some ops that current models use (transformers'
                # decoder masks call aten::diff); torch's dynamo exporter has them.
                names["dynamic_axes"] = _without_unit_axes(axes, input_names, inputs)
                _export_with_dynamo(torch, module, inputs, path, max(opset, DYNAMO_MIN_OPSET), names, exc)
            else:
                _redo_if_invalid(torch, module, inputs, path, max(opset, DYNAMO_MIN_OPSET),
                                 dict(names, dynamic_axes=_without_unit_axes(axes, input_names, inputs)))
            model = onnx.load(path)  # with the external data torch wrote beside it, if any
    finally:
        for m, training in modes:
            m.training = training
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


DYNAMO_MIN_OPSET = 18  # the oldest opset torch's dynamo exporter writes


def _without_unit_axes(axes, input_names, inputs):
    """Dynamic axes less those torch.export fixes: it specializes a dim of size 1, so a graph traced
    on a batch of 1 runs at that batch only, and must not declare it dynamic (its inputs' axes of
    size 1, and the outputs' batch when every input's batch is 1)."""
    if not axes:
        return axes
    shapes = {name: tuple(getattr(x, "shape", ())) for name, x in zip(input_names, inputs)}
    unit_batch = all(s[:1] == (1,) for s in shapes.values())
    out = {}
    for name, dims in axes.items():
        kept = {k: v for k, v in dims.items()
                if not (name in shapes and len(shapes[name]) > k and shapes[name][k] == 1)
                and not (name not in shapes and k == 0 and unit_batch)}
        if kept:
            out[name] = kept
    return out


def _export_with_dynamo(torch, module, inputs, path, opset, names, first_error):
    """torch.onnx.export through dynamo, after the TorchScript exporter failed with `first_error`;
    a UserError naming both failures if this one fails too."""
    names = dict(names)
    varargs = _varargs_shapes(torch, module, names["input_names"], names["dynamic_axes"])
    if varargs is not None:  # torch.export binds dynamic_axes by parameter name, and *args has none
        names["dynamic_axes"] = None
    try:
        with _quiet():
            torch.onnx.export(module, inputs, path, dynamo=True, opset_version=opset, dynamic_shapes=varargs, **names)
    except Exception as exc:
        raise UserError(f"torch could not export the module to ONNX ({type(first_error).__name__}: "
                        f"{_first_line(first_error)}; with dynamo: {type(exc).__name__}: {_first_line(exc)})") from None


def _redo_if_invalid(torch, module, inputs, path, opset, names):
    """The TorchScript exporter can write a graph that breaks ONNX's schemas (torch.onnx.ops'
    rotary_embedding becomes a RotaryEmbedding with its attributes as 4 extra inputs), or one that
    ONNX Runtime cannot run (torch.tensor_split at an index read from a shape becomes a Tile whose
    repeats are 2-d, as in transformers' Mamba): export again through dynamo; if that fails too,
    keep the first graph when only the checker refused it (its error surfaces on loading), and say
    so in one line when ONNX Runtime did."""
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as invalid:
        failure, unusable = invalid, False
    else:
        failure, unusable = _ort_failure(path, names["input_names"], inputs), True
        if failure is None:
            return
    shutil.copyfile(path, path + ".torchscript")
    try:
        _export_with_dynamo(torch, module, inputs, path, opset, names, failure)
    except UserError:
        if unusable:
            raise
        os.replace(path + ".torchscript", path)


def _ort_failure(path, input_names, inputs):
    """ONNX Runtime's error running the exported graph on the example inputs, or None."""
    from onnx_prune.backends.ort import is_ort_error, make_session

    feeds = {}
    for name, x in zip(input_names, inputs):
        try:
            feeds[name] = x.detach().cpu().numpy()
        except (AttributeError, TypeError):  # not a tensor, or bfloat16: numpy has no such type
            return None
    try:
        session = make_session(path, optimize=False, quiet=True)
        declared = {i.name for i in session.get_inputs()}
        session.run(None, {k: v for k, v in feeds.items() if k in declared})
    except Exception as exc:
        if not is_ort_error(exc):
            raise
        return exc
    return None


def _varargs_shapes(torch, module, input_names, axes):
    """For a forward(*inputs): the inputs' dynamic axes as torch.export's dynamic_shapes, in the
    structure of forward's signature (plain parameters first, then a tuple for *args); else None."""
    params = list(inspect.signature(module.forward).parameters.values())
    if not axes or not any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    dims = {}
    specs = [{k: dims.setdefault(label, torch.export.Dim(label)) for k, label in axes.get(name, {}).items()} or None
             for name in input_names]
    shapes = []
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            shapes.append(tuple(specs))
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and specs:
            shapes.append(specs.pop(0))
    return tuple(shapes)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: Exception) -> str:
    """The line of an exporter's error that says what failed (dynamo's own first line is a generic
    preamble; its cause follows "## Exception summary"), without terminal colours."""
    lines = [line.strip() for line in ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if "## Exception summary" in lines[:-1]:
        lines = lines[lines.index("## Exception summary") + 1:]
    return (lines or [""])[0][:300]


def is_torch_module(obj) -> bool:
    """Without importing torch: a module can only exist if torch was imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def as_onnx(model, example_inputs=None):
    """A torch.nn.Module is exported on `example_inputs`; a path or ModelProto passes through."""
    if is_torch_module(model):
        if example_inputs is None:
            raise UserError("a torch module is exported to ONNX on example inputs: pass example_inputs= "
                            "(a tensor, a tuple of tensors, or a dict of keyword arguments)")
        return from_torch(model, example_inputs)
    if example_inputs is not None:
        raise UserError("example_inputs is for a torch module; this model is already ONNX")
    return model
