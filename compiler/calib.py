"""Calibration data: what the compiler feeds the model to score channels and refit weights.

Three sources, all checked against the model's inputs before anything runs:

- an `.npz` file keyed by input name, first axis = samples;
- a folder of images with a declared preprocessing (`--preprocess`), for single-image-input models;
- a Python callable `pkg.module:fn` returning a dict of arrays, or an iterable of such dicts (batches).

With `load_calibration_with_labels`, an array named `labels` next to the inputs (one integer class
per sample) makes SPDY's search score candidates by the task loss instead of the distance to the
dense model's outputs.

Anything wrong is a UserError naming what does not match and how to fix it.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import onnx

from onnx_prune.errors import UserError
from onnx_prune.passes.graph import dims_of

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
# ImageNet's normalization; the size and layout come from the model's input where it fixes them
DEFAULT_PREPROCESS = "scale=255,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"


# an image folder is a data set as often as a few samples: more images than this are read evenly
# spaced (over its class folders too), not all (50,000 ImageNet images are 30 GB as float32)
MAX_FOLDER_IMAGES = 1024


def load_calibration(spec, model: onnx.ModelProto, preprocess: str | None = None, max_samples: int | None = None,
                     notes: list | None = None):
    """Samples as {input name: array with the samples on axis 0}, validated against `model`; what
    the reading chose (a folder's subset) is appended to `notes`."""
    inputs = _real_inputs(model)
    return _validate(_read(spec, inputs, preprocess, notes), inputs, max_samples)


LABELS = "labels"


def load_calibration_with_labels(spec, model: onnx.ModelProto, preprocess: str | None = None,
                                 notes: list | None = None):
    """(samples, labels or None): `labels` is taken out of the data unless the model has an input
    of that name; it must hold one integer class per sample."""
    inputs = _real_inputs(model)
    data = _read(spec, inputs, preprocess, notes)
    labels = None if any(i.name == LABELS for i in inputs) else data.pop(LABELS, None)
    samples = _validate(data, inputs, None)
    if labels is None:
        return samples, None
    labels = np.asarray(labels)
    n = len(next(iter(samples.values())))
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != n:
        raise UserError(f"calibration labels must be one integer class per sample: got {labels.dtype} "
                        f"of shape {labels.shape} for {n} samples")
    if labels.min() < 0:
        raise UserError("calibration labels must be class indices >= 0")
    return samples, labels.astype(np.int64)


def _read(spec, inputs, preprocess, notes=None) -> dict:
    """The arrays `spec` holds, not yet checked against the inputs. From Python, also the data
    itself: {input name: samples}, or a list of such batches; and paths as Path objects."""
    if isinstance(spec, (dict, list, tuple)):
        return _from_callable(lambda: spec, "calibration data")
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if callable(spec):
        return _from_callable(spec, f"calibration callable '{getattr(spec, '__name__', 'callable')}'")
    if isinstance(spec, str) and spec.endswith(".npz"):
        return _from_npz(spec)
    if isinstance(spec, str) and os.path.isdir(spec):
        if len(inputs) != 1:
            raise UserError(f"an image folder feeds one input, the model has {len(inputs)}; use an .npz or a callable")
        geometry = _image_geometry(inputs[0])
        settings = ",".join(filter(None, (geometry, preprocess or DEFAULT_PREPROCESS)))
        return {inputs[0].name: _from_images(spec, settings, notes if notes is not None else [])}
    if isinstance(spec, str) and ":" in spec:
        return _from_callable(import_callable(spec), f"calibration callable '{spec}'")
    what = f"'{spec}'" if isinstance(spec, str) else f"of type {type(spec).__name__}"
    raise UserError(f"calibration data {what} is not an .npz file, an image folder, a pkg.module:fn callable "
                    "or (from Python) a dict of arrays")


def batches(samples: dict, batch_size: int):
    """Consecutive feed dicts of at most `batch_size` samples."""
    n = len(next(iter(samples.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in samples.items()}


def _real_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _from_npz(path):
    if not os.path.isfile(path):
        raise UserError(f"calibration file {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as exc:
        raise UserError(f"calibration file {path} is not a readable .npz ({type(exc).__name__})") from None


def import_callable(spec: str, what: str = "calibration"):
    """`pkg.module:fn` -> fn. The current folder is importable, as it is for `python -m` (the
    console script's sys.path does not hold it). `what` names the option in messages."""
    module_name, _, fn_name = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UserError(f"cannot import {what} module '{module_name}' ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{what} callable '{spec}': '{fn_name}' is not a function of {module_name}")
    return fn


def _from_callable(fn, who):
    try:
        out = fn()
        # a generator's batches come from the callable's own code: drawn here, where its errors are its own
        parts = None if isinstance(out, (dict, str, bytes)) or not hasattr(out, "__iter__") else list(out)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{who} raised {type(exc).__name__}: {exc}") from None
    if isinstance(out, dict):
        parts = [out]
    if parts is None or any(not isinstance(p, dict) for p in parts):
        got = type(out).__name__ if parts is None else f"a batch of type {next(type(p).__name__ for p in parts if not isinstance(p, dict))}"
        raise UserError(f"{who} must return a dict of arrays or an iterable of such dicts, got {got}")
    if not parts:
        raise UserError(f"{who} returned no batches")
    try:
        parts = [{k: np.asarray(v) for k, v in batch.items()} for batch in parts]
    except (TypeError, ValueError) as exc:
        raise UserError(f"{who} returned values that are not arrays ({exc})") from None
    if len(parts) == 1:
        return parts[0]
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise UserError(f"{who} returned batches with different input names")
    try:
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}
    except ValueError as exc:
        raise UserError(f"{who} returned batches whose shapes differ ({exc})") from None


def parse_preprocess(text: str) -> dict:
    """`resize=224 (or HxW),scale=255,mean=a/b/c,std=a/b/c,layout=NCHW,channels=3` -> settings."""
    out = {"resize": (224, 224), "scale": 255.0, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "layout": "NCHW",
           "channels": 3}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in out:
            raise UserError(f"--preprocess '{part}' is not one of resize=, scale=, mean=, std=, layout=, channels=")
        try:
            if key == "resize":  # H, or H x W
                sides = tuple(int(v) for v in value.lower().split("x"))
                if len(sides) not in (1, 2) or min(sides) < 1:
                    raise ValueError(value)
                out[key] = sides * (3 - len(sides))
            elif key == "scale":
                out[key] = float(value)
            elif key in ("mean", "std"):
                out[key] = tuple(float(v) for v in value.split("/"))
            elif key == "channels":
                if value not in ("1", "3"):
                    raise ValueError(value)
                out[key] = int(value)
            else:
                if value not in ("NCHW", "NHWC"):
                    raise ValueError(value)
                out[key] = value
        except ValueError:
            raise UserError(f"--preprocess '{part}': bad value") from None
    return out


def _image_geometry(inp) -> str:
    """`resize=HxW,layout=NCHW|NHWC,channels=C` read off an image input, RGB or grayscale:
    (N, C, H, W) or (N, H, W, C) (Keras models take NHWC); settings given with --preprocess come
    after it and win."""
    dims = dims_of(inp.type) or ()
    if len(dims) != 4:
        return ""
    if dims[1] in (1, 3) and dims[2] and dims[3]:
        return f"resize={dims[2]}x{dims[3]},layout=NCHW,channels={dims[1]}"
    if dims[3] in (1, 3) and dims[1] and dims[2]:
        return f"resize={dims[1]}x{dims[2]},layout=NHWC,channels={dims[3]}"
    return ""


def _image_files(folder) -> list[str]:
    """The folder's images, its subfolders' too (a data set's class folders), in sorted order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.relpath(os.path.join(root, f), folder) for f in sorted(files) if f.lower().endswith(IMAGE_EXT)]
    return found


def _from_images(folder, preprocess, notes):
    try:
        from PIL import Image
    except ImportError:
        raise UserError("reading an image folder needs Pillow (pip install pillow)") from None
    cfg = parse_preprocess(preprocess)
    files = _image_files(folder)
    if not files:
        raise UserError(f"calibration folder {folder} has no images ({', '.join(IMAGE_EXT)})")
    if len(files) > MAX_FOLDER_IMAGES:
        picked = np.unique(np.linspace(0, len(files) - 1, MAX_FOLDER_IMAGES).round().astype(int))
        notes.append(f"calibration folder {folder}: {len(picked)} of its {len(files)} images, evenly spaced "
                     "in sorted order (a few hundred samples are what the recovery needs)")
        files = [files[i] for i in picked]
    arrays = []
    for name in files:
        try:
            with Image.open(os.path.join(folder, name)) as im:
                height, width = cfg["resize"]
                im = im.convert("L" if cfg["channels"] == 1 else "RGB").resize((width, height))
                arrays.append(np.asarray(im, dtype=np.float32).reshape(height, width, -1))
        except Exception as exc:
            raise UserError(f"cannot read image {name} in {folder} ({type(exc).__name__})") from None
    x = np.stack(arrays) / cfg["scale"]
    mean, std = (np.array(cfg[k], dtype=np.float32) for k in ("mean", "std"))
    if cfg["channels"] == 1:  # a grayscale model: one value, the average of RGB ones (ImageNet's by default)
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    x = (x - mean) / std
    return x.transpose(0, 3, 1, 2).astype(np.float32) if cfg["layout"] == "NCHW" else x.astype(np.float32)


def _validate(data: dict, inputs, max_samples):
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in data]
    extra = [k for k in data if k not in names]
    if missing or extra:
        raise UserError(f"calibration arrays {sorted(data)} do not match the model's inputs {names}"
                        + (f" (missing: {', '.join(missing)})" if missing else "")
                        + (f" (unknown: {', '.join(extra)})" if extra else ""))
    for inp in inputs:
        if dims_of(inp.type) == ():
            raise UserError(f"input '{inp.name}' is a scalar (rank 0), which calibration samples cannot vary: "
                            "samples go on axis 0; make it a constant of the model, or give it a batch axis")
        if np.ndim(data[inp.name]) == 0:
            raise UserError(f"calibration input '{inp.name}' is a scalar; samples go on axis 0")
    counts = {len(data[n]) for n in names}
    if len(counts) != 1 or 0 in counts:
        raise UserError(f"calibration arrays must hold the same, non-zero number of samples (got {sorted(counts)})")
    out = {}
    for inp in inputs:
        arr = data[inp.name]
        dims = dims_of(inp.type) or ()
        if arr.ndim != len(dims):
            raise UserError(f"calibration input '{inp.name}' has rank {arr.ndim}, the model expects {len(dims)} "
                            f"(samples on axis 0)")
        for k, (d, a) in enumerate(zip(dims, arr.shape)):
            if k > 0 and d is not None and d != a:
                raise UserError(f"calibration input '{inp.name}' has shape {arr.shape}, the model expects dim {k} = {d}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if arr.dtype != dtype:
            if np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(dtype, np.floating):
                raise UserError(f"calibration input '{inp.name}' is {arr.dtype}, the model expects {dtype}")
            with np.errstate(over="ignore"):  # an overflow is refused just below, by name
                arr = arr.astype(dtype)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            # one NaN spreads through every Gram matrix the error database sums: a garbage plan
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise UserError(f"calibration input '{inp.name}' holds {bad} NaN or infinite value(s)"
                            + (f" once cast to {dtype}" if np.isfinite(data[inp.name]).all() else ""))
        out[inp.name] = arr[:max_samples] if max_samples else arr
    return out
