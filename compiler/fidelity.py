"""How close a pruned model's outputs stay to the dense model's, on calibration or held-out data.

For every output: per-sample cosine similarity and relative L2 error of the flattened output; for a
sequence output (batch, tokens, features) next to an attention-mask input, also the cosine of the
mean-pooled embeddings over the real tokens (what a sentence encoder's users compare).
"""

from __future__ import annotations

import numpy as np

from onnx_prune.backends.ort import make_session
from onnx_prune.passes.reconstruct import token_mask


def _mask_for(out, feeds):
    """(batch, tokens) weights of the real tokens of a sequence output, or None."""
    real = token_mask(feeds, out.shape[:2]) if out.ndim == 3 else None
    return None if real is None else real.reshape(out.shape[:2]).astype(np.float64)


def _cosine(a, b):
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def compare(dense_outs, pruned_outs, feeds) -> dict:
    """Per-sample similarities of two runs of the same feeds."""
    cos, rel, pooled = [], [], []
    for a, b in zip(dense_outs, pruned_outs):
        mask = _mask_for(a, feeds)
        if mask is not None:
            w = mask[..., None] / np.maximum(mask.sum(1), 1)[:, None, None]
            pooled.extend(_cosine((a * w).sum(1), (b * w).sum(1)))
        a = a.reshape(len(a), -1).astype(np.float64)
        b = b.reshape(len(b), -1).astype(np.float64)
        cos.extend(_cosine(a, b))
        rel.extend(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12))
    return {"cos": cos, "rel": rel, "pooled": pooled}


def _batches(model, samples):
    from onnx_prune.compiler.calib import batches
    from onnx_prune.passes.reconstruct import feed_batch_size

    return list(batches(samples, feed_batch_size(model)))


class Reference:
    """The dense model's outputs on fixed samples, computed once; candidates are compared to them."""

    def __init__(self, dense, samples, provider):
        self.dense_model = dense
        self.provider = provider
        self.samples = int(len(next(iter(samples.values()))))
        self.feeds = _batches(dense, samples)
        sess = make_session(dense, provider=provider, quiet=True)
        self.dense_outs = [sess.run(None, f) for f in self.feeds]

    def fidelity(self, model) -> dict:
        sess = make_session(model, provider=self.provider, quiet=True)
        parts = {"cos": [], "rel": [], "pooled": []}
        for feeds, dense in zip(self.feeds, self.dense_outs):
            for k, v in compare(dense, sess.run(None, feeds), feeds).items():
                parts[k].extend(v)
        out = {"mean_cosine_similarity": float(np.mean(parts["cos"])),
               "mean_relative_l2_error": float(np.mean(parts["rel"])), "samples": self.samples}
        if parts["pooled"]:
            out["mean_pooled_cosine_similarity"] = float(np.mean(parts["pooled"]))
        return out

    def loss(self, model) -> float:
        """1 - mean similarity (pooled-embedding cosine for sequence encoders, else output
        cosine): the calibration loss SPDY's sensitivity search minimises without labels."""
        return 1.0 - similarity(self.fidelity(model))


def similarity(fidelity: dict) -> float:
    """The similarity users compare: pooled embeddings for sequence encoders, else outputs."""
    return fidelity.get("mean_pooled_cosine_similarity", fidelity["mean_cosine_similarity"])


def output_fidelity(dense, pruned, samples, provider) -> dict:
    return Reference(dense, samples, provider).fidelity(pruned)
