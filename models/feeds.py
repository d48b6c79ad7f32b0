"""Input specifications and seeded random feeds shared by every zoo source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its static shape and what kind of data it carries.

    kind: "float" (standard normal float32), "tokens" (int64 ids in [0, vocab))
    or "mask" (int64 all-ones attention mask).
    """

    shape: tuple[int, ...]
    kind: str = "float"
    vocab: int = 0


def image(*shape: int) -> InputSpec:
    return InputSpec(tuple(shape))


def tokens(batch: int, seq: int, vocab: int) -> InputSpec:
    return InputSpec((batch, seq), "tokens", vocab)


def mask(batch: int, seq: int) -> InputSpec:
    return InputSpec((batch, seq), "mask")


def _feed(spec: InputSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.kind == "float":
        return rng.standard_normal(spec.shape, dtype=np.float32)
    if spec.kind == "tokens":
        return rng.integers(0, spec.vocab, size=spec.shape, dtype=np.int64)
    if spec.kind == "mask":
        return np.ones(spec.shape, dtype=np.int64)
    raise ValueError(f"unknown input kind {spec.kind!r}")


def make_feeds(specs: dict[str, InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for `specs`, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return {name: _feed(spec, rng) for name, spec in specs.items()}
