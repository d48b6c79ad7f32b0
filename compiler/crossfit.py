"""A cross-fitted calibration loss for SPDY's sensitivity search.

The search scores each candidate plan after the error database's refits are stitched in. Scored
on the samples those refits were fitted on, the loss rewards plans whose refits memorise the
calibration data: with 64 sentences, MiniLM's 2x plan kept 0.99 pooled cosine on them and 0.79 on
held-out text. Here the samples are cut into folds; each fold's loss is measured with refits
fitted on the other folds only, so the search compares plans by what generalises.
"""

from __future__ import annotations

import numpy as np

from onnx_prune.compiler.fidelity import Reference
from onnx_prune.passes.errordb import build_error_db

FOLDS = 2
MIN_PER_FOLD = 4  # distinct samples; with fewer, a fold's loss says too little


def distinct_ids(samples: dict) -> np.ndarray:
    """Per sample, the index of its first occurrence: a repeated sample must stay on one side."""
    names = sorted(samples)
    n = len(samples[names[0]])
    keys = [b"".join(np.ascontiguousarray(samples[k][i]).tobytes() for k in names) for i in range(n)]
    first = {}
    return np.array([first.setdefault(key, i) for i, key in enumerate(keys)])


def fold_masks(samples: dict, folds: int = FOLDS) -> list | None:
    """Boolean masks cutting the distinct samples into `folds` contiguous parts; None if too few."""
    ids = distinct_ids(samples)
    distinct = list(dict.fromkeys(ids.tolist()))
    if len(distinct) < folds * MIN_PER_FOLD:
        return None
    parts = np.array_split(np.array(distinct), folds)
    return [np.isin(ids, part) for part in parts]


class CrossFitLoss:
    """loss(plan) averaged over folds: the plan applied, refitted on the other folds' samples,
    compared to the dense model on this fold's."""

    def __init__(self, dense, analysis, samples, provider, masks, labels=None):
        self.analysis = analysis
        self.folds = []
        for mask in masks:
            train = {k: v[~mask] for k, v in samples.items()}
            test = {k: v[mask] for k, v in samples.items()}
            ref = Reference(dense, test, provider, labels=None if labels is None else labels[mask])
            self.folds.append((build_error_db(dense, analysis, train), ref))
        self.samples = sum(ref.samples for _, ref in self.folds)

    def __call__(self, pruned, plan) -> float:
        losses = [ref.loss(db.stitch(pruned, self.analysis, plan)) for db, ref in self.folds]
        weights = [ref.samples for _, ref in self.folds]
        return float(np.average(losses, weights=weights))
