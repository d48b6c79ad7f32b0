"""More training sequences from the user's own calibration sentences, for global AdaPrune.

Fine-tuning every weight on 50 sentences memorises them (MiniLM 2x: 0.99 pooled cosine on them,
0.82 held out). Joining the start of one calibration sequence to the end of another puts their
tokens in contexts the model has not been fitted to, without any text beyond what the user gave:
on MiniLM 2x, 8 such sequences per sentence lifted global AdaPrune's held-out gain from +0.005 to
+0.016 pooled cosine. More distinct splices beat more epochs over fewer: on a fixed MiniLM 2x
plan, 8 a sentence for 5 epochs kept 0.888 held out, 32 for 3 epochs 0.894, 64 for 2 0.896.
"""

from __future__ import annotations

import numpy as np

from onnx_prune.passes.reconstruct import mask_input

SPLICES_PER_SAMPLE = 32


def _mask_name(samples: dict) -> str | None:
    """The attention mask of (batch, seq) token inputs padded on the right, else None."""
    shapes = {np.shape(v) for v in samples.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return None
    if any("position" in name.lower() for name in samples):
        return None  # spliced position ids would jump mid-sequence
    name = mask_input(samples, next(iter(shapes)))
    if name is None:
        return None
    v = np.asarray(samples[name])
    lengths = v.sum(1)
    prefix = np.arange(v.shape[1])[None, :] < lengths[:, None]
    right_padded = np.isin(v, (0, 1)).all() and np.array_equal(v != 0, prefix)
    return name if right_padded and (lengths >= 2).all() else None


def spliced_sequences(samples: dict, per_sample: int = SPLICES_PER_SAMPLE, seed: int = 0) -> dict | None:
    """`samples` followed by `per_sample` new sequences per sample, each the start of one sequence
    (its first token, e.g. [CLS], kept) joined to the end of another (its last real token, e.g.
    [SEP], kept), every (batch, seq) input spliced alike. None unless the inputs are token
    sequences with an attention mask."""
    mask_name = _mask_name(samples)
    if mask_name is None:
        return None
    arrays = {k: np.asarray(v) for k, v in samples.items()}
    n, seq = arrays[mask_name].shape
    lengths = arrays[mask_name].sum(1)
    rng = np.random.default_rng(seed)
    count = n * per_sample
    out = {k: np.zeros((count, seq), v.dtype) for k, v in arrays.items()}
    for i in range(count):
        a, b = rng.choice(n, 2, replace=n < 2)
        head = rng.integers(1, lengths[a])  # tokens taken from a's start: at least its first
        tail_from = rng.integers(1, lengths[b])  # b's tokens from here to its last real one
        head = min(head, seq - (lengths[b] - tail_from))
        for k, v in arrays.items():
            joined = np.concatenate([v[a, :head], v[b, tail_from:lengths[b]]])
            out[k][i, :len(joined)] = joined  # the mask's ones join into ones of the new length
    return {k: np.concatenate([arrays[k], out[k]]) for k in arrays}
