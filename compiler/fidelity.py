"""How close a pruned model's outputs stay to the dense model's, on calibration or held-out data.

For every output: per-sample cosine similarity and relative L2 error of the flattened output (of
the batch's values taken together, for an output of one value per sample); for a sequence output
(batch, tokens, features) next to an attention-mask input, also the cosine of the mean-pooled
embeddings over the real tokens (what a sentence encoder's users compare).
"""

from __future__ import annotations

import numpy as np

from onnx_prune.backends.ort import make_session
from onnx_prune.errors import UserError
from onnx_prune.passes.reconstruct import token_mask
from onnx_prune.passes.verify import numeric


def _arrays(outs):
    """Outputs as arrays (a sequence of maps, as scikit-learn's ZipMap gives, in numbers)."""
    return [o if isinstance(o, np.ndarray) else numeric(o) for o in outs]


def _mask_for(out, feeds):
    """(batch, tokens) weights of the real tokens of a sequence output, or None."""
    real = token_mask(feeds, out.shape[:2]) if out.ndim == 3 else None
    return None if real is None else real.reshape(out.shape[:2]).astype(np.float64)


def _cosine(a, b):
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-12)
    # two zero outputs agree (a randomly initialised EfficientNet's last BatchNorm zeroes everything)
    return np.where((na == 0) & (nb == 0), 1.0, cos)


def compare(dense_outs, pruned_outs, feeds) -> dict:
    """Per-sample similarities of two runs of the same feeds."""
    cos, rel, pooled = [], [], []
    for a, b in zip(dense_outs, pruned_outs):
        mask = _mask_for(a, feeds)
        if mask is not None:
            w = mask[..., None] / np.maximum(mask.sum(1), 1)[:, None, None]
            pooled.extend(_cosine((a * w).sum(1), (b * w).sum(1)))
        n = len(a)
        a = a.reshape(n, -1).astype(np.float64)
        b = b.reshape(n, -1).astype(np.float64)
        if a.shape[1] == 1 and n > 1:
            # one value per sample (a regression output, a click logit): its cosine is only the sign
            # agreement, so the batch's values are compared as one vector, counted for each sample
            a, b = a.T, b.T
        cos.extend(np.resize(_cosine(a, b), n))
        rel.extend(np.resize(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12), n))
    return {"cos": cos, "rel": rel, "pooled": pooled}


def _batches(model, samples):
    from onnx_prune.passes.reconstruct import feed_batches

    return feed_batches(model, samples)


class Reference:
    """The dense model's outputs on fixed samples, computed once; candidates are compared to them.
    With `labels` (one class per sample), also the task: top-1 accuracy and cross-entropy of the
    first output, read as (samples, classes) logits or probabilities."""

    def __init__(self, dense, samples, provider, labels=None):
        self.dense_model = dense
        self.provider = provider
        self.samples = int(len(next(iter(samples.values()))))
        self.feeds = _batches(dense, samples)
        sess = make_session(dense, provider=provider, quiet=True)
        self.dense_outs = [_arrays(sess.run(None, f)) for f in self.feeds]
        self.labels = labels
        if labels is not None:
            first = np.concatenate([outs[0] for outs in self.dense_outs])
            if first.ndim != 2 or first.shape[1] <= int(labels.max()):
                raise UserError(f"calibration labels need a first output of (samples, classes) scores with more "
                                f"than {int(labels.max())} classes; it has shape {first.shape}")
            self.dense_task = _task(first, labels)

    def fidelity(self, model, share: float = 1.0) -> dict:
        """Similarities on the samples, or on about `share` of them (whole batches, at least one)."""
        sess = make_session(model, provider=self.provider, quiet=True)
        parts = {"cos": [], "rel": [], "pooled": []}
        firsts = []
        used = max(1, round(share * len(self.feeds)))
        for feeds, dense in zip(self.feeds[:used], self.dense_outs):
            outs = _arrays(sess.run(None, feeds))
            firsts.append(outs[0])
            for k, v in compare(dense, outs, feeds).items():
                parts[k].extend(v)
        samples = min(sum(len(next(iter(f.values()))) for f in self.feeds[:used]), self.samples)  # no filler
        out = {"mean_cosine_similarity": float(np.mean(parts["cos"])),
               "mean_relative_l2_error": float(np.mean(parts["rel"])), "samples": samples}
        if parts["pooled"]:
            out["mean_pooled_cosine_similarity"] = float(np.mean(parts["pooled"]))
        if self.labels is not None:
            first = np.concatenate(firsts)
            accuracy, task_loss = _task(first, self.labels[:len(first)])
            out.update({"accuracy": accuracy, "task_loss": task_loss, "dense_accuracy": self.dense_task[0],
                        "dense_task_loss": self.dense_task[1]})
        return out

    def loss(self, model, share: float = 1.0) -> float:
        """The calibration loss SPDY's sensitivity search minimises: the task's cross-entropy with
        labels, else 1 - mean similarity (pooled-embedding cosine for sequence encoders, else
        output cosine) to the dense model."""
        f = self.fidelity(model, share)
        return f["task_loss"] if self.labels is not None else 1.0 - similarity(f)


def _task(scores, labels):
    """(top-1 accuracy, mean cross-entropy) of (samples, classes) logits, or of probabilities."""
    scores = scores.astype(np.float64)
    if (scores >= 0).all() and np.allclose(scores.sum(1), 1.0, atol=1e-3):
        log_p = np.log(np.maximum(scores, 1e-12))
    else:
        shifted = scores - scores.max(1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    rows = np.arange(len(labels))
    return float((scores.argmax(1) == labels).mean()), float(-log_p[rows, labels].mean())


def similarity(fidelity: dict) -> float:
    """The similarity users compare: pooled embeddings for sequence encoders, else outputs."""
    return fidelity.get("mean_pooled_cosine_similarity", fidelity["mean_cosine_similarity"])


def output_fidelity(dense, pruned, samples, provider) -> dict:
    return Reference(dense, samples, provider).fidelity(pruned)
