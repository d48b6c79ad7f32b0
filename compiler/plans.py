"""Plans: kept channel indices per group. Methods produce them; surgery applies them."""

from __future__ import annotations

import numpy as np

from onnx_prune.passes.analysis import Analysis
from onnx_prune.passes.importance import group_scores, keep_top


def full_plan(analysis: Analysis) -> dict:
    """Keep everything (the identity)."""
    return {g.name: np.arange(g.size) for g in analysis.groups}


def uniform_plan(analysis: Analysis, ratio: float, importance="l2", widths=None, scores=None) -> dict:
    """Every group loses the same share of channels, lowest importance first. With `widths`
    (group -> allowed widths, e.g. the timing database's fast ones) the count snaps to the nearest.
    `scores` (from group_scores) saves recomputing them when called in a loop."""
    scores = scores if scores is not None else group_scores(analysis, importance)
    plan = {}
    for g in analysis.groups:
        n = max(1, int(round(g.size * (1.0 - ratio))))
        if widths and widths.get(g.name):
            n = min(widths[g.name], key=lambda w: (abs(w - n), -w))
        plan[g.name] = keep_top(scores[g.name], n)
    return plan


def random_plan(analysis: Analysis, rng: np.random.Generator, mode="mixed", widths=None, low=0.0) -> dict:
    """Random kept subsets. mode: mixed | keep1 | random. With `widths` (group -> allowed widths)
    counts are drawn from those at or above `low` x the group size."""
    plan = {}
    for g in analysis.groups:
        m = mode if mode != "mixed" else rng.choice(["keep1", "random", "random", "all"])
        if widths and widths.get(g.name):
            allowed = [w for w in widths[g.name] if w >= low * g.size] or [g.size]
            n = int(rng.choice(allowed))
        elif m == "keep1":
            n = 1
        elif m == "all":
            n = g.size
        else:
            n = int(rng.integers(1, g.size + 1))
        plan[g.name] = np.sort(rng.choice(g.size, size=n, replace=False))
    return plan
