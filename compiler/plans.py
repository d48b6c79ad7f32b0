"""Plans: kept channel indices per group. Methods produce them; surgery applies them."""

from __future__ import annotations

import numpy as np

from onnx_prune.passes.analysis import Analysis
from onnx_prune.passes.importance import group_scores, keep_top


def full_plan(analysis: Analysis) -> dict:
    """Keep everything (the identity)."""
    return {g.name: np.arange(g.size) for g in analysis.groups}


def uniform_plan(analysis: Analysis, ratio: float, importance="l2") -> dict:
    """Every group loses the same share of channels, lowest importance first."""
    scores = group_scores(analysis, importance)
    return {g.name: keep_top(scores[g.name], max(1, int(round(g.size * (1.0 - ratio)))))
            for g in analysis.groups}


def random_plan(analysis: Analysis, rng: np.random.Generator, mode="mixed") -> dict:
    """Random kept subsets, for equivalence testing. mode: mixed | keep1 | random."""
    plan = {}
    for g in analysis.groups:
        m = mode if mode != "mixed" else rng.choice(["keep1", "random", "random", "all"])
        if m == "keep1":
            n = 1
        elif m == "all":
            n = g.size
        else:
            n = int(rng.integers(1, g.size + 1))
        plan[g.name] = np.sort(rng.choice(g.size, size=n, replace=False))
    return plan
