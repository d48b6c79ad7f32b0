"""A cross-fitted calibration loss for SPDY's sensitivity search.

The search scores each candidate plan after the error database's refits are stitched in. Scored
on the samples those refits were fitted on, the loss rewards plans whose refits memorise the
calibration data: with 64 sentences, MiniLM's 2x plan kept 0.99 pooled cosine on them and 0.79 on
held-out text. Here the samples are cut into folds; each fold's loss is measured with refits
fitted on the other folds only (the error database keeps each fold's share of its Gram
matrices, so this costs no extra pass over the data), and the search compares plans by what
generalises.
"""

from __future__ import annotations

import numpy as np

from onnx_prune.compiler.fidelity import Reference

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
    """loss(pruned, plan) averaged over folds: the plan's refits fitted on the other folds' samples
    (`db` built with these folds), compared to the dense model on up to `per_fold` of this fold's."""

    def __init__(self, dense, analysis, db, samples, provider, masks, labels=None, per_fold=None):
        self.analysis, self.db = analysis, db
        self.refs = []
        for mask in masks:
            idx = np.flatnonzero(mask)[:per_fold]
            self.refs.append(Reference(dense, {k: v[idx] for k, v in samples.items()}, provider,
                                       labels=None if labels is None else labels[idx]))
        self.samples = sum(ref.samples for ref in self.refs)

    def __call__(self, pruned, plan, share: float = 1.0) -> float:
        """The loss on about `share` of each fold's samples."""
        losses = [ref.loss(self.db.stitch(pruned, self.analysis, plan, without=k), share)
                  for k, ref in enumerate(self.refs)]
        return float(np.average(losses, weights=[ref.samples for ref in self.refs]))
