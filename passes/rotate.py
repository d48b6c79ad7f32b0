"""Head-wise rotation: order each attention head's dimensions by what they carry, before pruning.

Inside one head, the query and key dimensions only meet in the dot product q.k, and the value
dimensions only meet the output projection's rows. Any invertible T per head with

    Q' = Q T,  K' = K T^-T   (the logits q'.k' = q T T^-1 k = q.k)
    V' = V T,  O' = T^-1 O   (the output sum_d v'_d O'_d = v O)

leaves the model's function unchanged. T is chosen from a singular value decomposition weighted by
the calibration data (without any, by random inputs: the weights' geometry still shows), so that the head's first r dimensions span the best rank-r approximation of
its logits (or of its output): pruning a head-dimension group then drops the directions that carry
least, not whole coordinates. On MiniLM-L6, every head's query/key size halved keeps a held-out
embedding cosine of 0.984 rotated, 0.940 with the coordinates of most energy kept (no refit); at
a quarter, 0.958 rotated on calibration sentences, 0.919 on 8 random token sequences, 0.665 as is.

Which groups are head dimensions, and may be rotated, is passes/heads.py's call (separate or packed
Q | K | V, grouped-query values; never through a rotary embedding or a norm over the head). The
rotated model is run against the original on calibration data; if its outputs moved, every weight
is put back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.backends.ort import make_session, session_with_outputs
from onnx_prune.passes.heads import Head, find_heads
from onnx_prune.passes.reconstruct import feed_batches, from_weight_matrix, token_rows, weight_matrix

MAX_ROWS = 8192  # token rows per statistic: a head's D x D Gram matrix needs few
TOLERANCE = 1e-4  # largest output change allowed, relative to the output's largest magnitude (as verify's)


@dataclass
class Rotation:
    """What `rotate_heads` did, for the report."""

    rotated: list  # group names
    put_back: dict  # group name -> why
    max_output_change: float
    # query/key group -> per dimension, the logits' variance it carries: the error database's
    # curve for a group no weight layer reads (passes/errordb.py)
    logit_energy: dict = field(default_factory=dict)
    statistics: str = "calibration samples"  # what the weighted SVD was weighted by

    def as_report(self) -> dict:
        return {"groups": self.rotated, "put_back": self.put_back,
                "max_abs_output_change_relative": self.max_output_change, "statistics": self.statistics}

    def ranked(self, scores: dict) -> dict:
        """Magnitude `scores` with each rotated group's values reassigned best-first: the SVD puts
        a head's strongest direction first, and whitening makes weight magnitude misleading there
        (the value projection's weakest directions get its largest columns)."""
        return {g: np.sort(s)[::-1] if g in self.rotated else s for g, s in scores.items()}


def rotate_heads(model: onnx.ModelProto, analysis, samples: dict, log=lambda msg: None,
                 statistics: str = "calibration samples") -> Rotation:
    """Rotate, in place, the head-dimension groups of `model` (the canonical model `analysis` ran
    on) by the weighted SVD of their heads on `samples` (calibration data, or random inputs where
    there is none: `statistics` says which, for the report); returns what was rotated."""
    candidates = find_heads(analysis)
    if not candidates:
        return Rotation([], {}, 0.0, statistics=statistics)
    batches = feed_batches(model, samples)
    reference = _collect_grams(model, candidates, batches)
    inits = {t.name: t for t in model.graph.initializer}
    original = {name: numpy_helper.to_array(inits[name])
                for cand in candidates for side in cand.sides for name in (side.node.input[1], side.bias) if name}
    updates = {}
    try:
        for cand in candidates:
            _transform(cand, original, updates)
    except np.linalg.LinAlgError as exc:  # statistics a factorisation cannot take (inf or nan activations)
        why = f"the heads' statistics could not be factorised ({exc})"
        log(f"head rotation skipped: {why}")
        return Rotation([], {c.name: why for c in candidates}, 0.0, statistics=statistics)
    _write(model, analysis, updates)
    change = _change(reference, _outputs(model, batches[0]))
    if not change <= TOLERANCE:  # the graph did something the path check did not see (or nan): undo it all
        _write(model, analysis, {name: original[name] for name in updates})
        log(f"head rotation put back: it changed the outputs by {change:.1e} (relative)")
        why = f"rotating changed the outputs by {change:.1e} (relative to their largest magnitude)"
        return Rotation([], {c.name: why for c in candidates}, 0.0, statistics=statistics)
    log(f"head rotation: {len(candidates)} groups, outputs changed by {change:.1e} (relative)")
    energy = {c.name: c.logit_energy for c in candidates if c.logit_energy is not None}
    return Rotation([c.name for c in candidates], {}, change, energy, statistics)


# -- statistics ------------------------------------------------------------------------------------

def _collect_grams(model, candidates, batches) -> list:
    """Per side with a statistic, per head: the Gram matrix of the head's columns over real tokens.
    Returns the model's outputs on the first batch, to check the rotation against."""
    stats = list(dict.fromkeys(s.stat for c in candidates for s in c.sides if s.stat))
    outputs = [o.name for o in model.graph.output]
    sess = session_with_outputs(model, stats, optimize=True)
    first = None
    per_batch = max(MAX_ROWS // len(batches), 8)
    rng = np.random.default_rng(0)
    rows = 0
    for cand in candidates:
        cand.grams = [[0.0] * len(s.blocks) for s in cand.sides if s.stat]
    wanted = list(dict.fromkeys(stats + outputs))
    for feeds in batches:
        values = dict(zip(wanted, sess.run(wanted, feeds)))
        first = first or [values[o] for o in outputs]
        X = {name: token_rows(values[name], per_batch, rng, feeds).astype(np.float64) for name in stats}
        rows += len(next(iter(X.values())))
        for cand in candidates:
            for grams, side in zip(cand.grams, [s for s in cand.sides if s.stat]):
                x = X[side.stat]
                for h, b in enumerate(side.blocks):
                    grams[h] = grams[h] + x[:, b].T @ x[:, b]
    for cand in candidates:
        cand.grams = [[g / max(rows, 1) for g in grams] for grams in cand.grams]
    return first


# -- transforms ------------------------------------------------------------------------------------

def _factor(gram: np.ndarray) -> np.ndarray:
    """Upper-triangular R with R'R = gram, loaded slightly so a dead dimension does not break it."""
    load = 1e-6 * max(np.trace(gram) / len(gram), 1e-30)
    return np.linalg.cholesky(gram + load * np.eye(len(gram))).T


def _query_key(gq, gk) -> tuple:
    """(Tq, Tk, s) of one head. Logits q'k = x' (Wq Wk') y: with Rq'Rq and Rk'Rk the head's Gram
    matrices, the SVD of Rq Rk' = U S V' gives the weighted best rank r; Tq Tk' = I keeps the logits."""
    Rq, Rk = _factor(gq), _factor(gk)
    U, s, Vt = np.linalg.svd(Rq @ Rk.T)
    root = np.sqrt(np.maximum(s, 1e-30))
    return np.linalg.solve(Rq, U * root), np.linalg.solve(Rk, Vt.T * root), s


def _value_output(gz, rows) -> tuple:
    """(T, T^-1) of one head. Output z O: with Rz'Rz the Gram matrix of the head's z, the SVD of
    Rz O = U S V' orders the directions; T = Rz^-1 U makes the rotated z orthonormal, O's rows S V'."""
    Rz = _factor(gz)
    U, _, _ = np.linalg.svd(Rz @ rows, full_matrices=False)
    return np.linalg.solve(Rz, U), U.T @ Rz


def _head_transforms(cand: Head, original: dict) -> list:
    """Per head, one matrix per side: what that side's weights are multiplied by."""
    out = []
    if cand.kind == "query/key":
        cand.logit_energy = 0.0
        for gq, gk in zip(*cand.grams):
            Tq, Tk, s = _query_key(gq, gk)
            # rotated, q_j and k_j are uncorrelated with variance s_j: q_j k_j carries s_j^2
            cand.logit_energy = cand.logit_energy + s ** 2
            out.append((Tq, Tk))
        return out
    consumer = cand.sides[-1]
    W = weight_matrix(consumer.node, original[consumer.node.input[1]])
    group = len(consumer.blocks) // len(cand.sides[0].blocks)  # query heads per value head
    for h in range(len(cand.sides[0].blocks)):
        readers = range(h * group, (h + 1) * group)  # the value head's readers weigh it together
        gz = sum(cand.grams[-1][r] for r in readers)
        pair = _value_output(gz, np.hstack([W[consumer.blocks[r]] for r in readers]))
        out.append(_query_key(cand.grams[0][h], cand.grams[1][h])[:2] + pair if cand.kind == "packed" else pair)
    return out


def _transform(cand: Head, original: dict, updates: dict):
    """Apply `cand`'s head transforms to its weights and biases in `updates` (name -> array)."""
    per_head = _head_transforms(cand, original)
    for k, side in enumerate(cand.sides):
        name = side.node.input[1]
        w = updates.get(name, original[name])
        W = np.array(weight_matrix(side.node, w), dtype=np.float64)
        bias = np.array(updates.get(side.bias, original[side.bias]), dtype=np.float64) if side.bias else None
        for n, b in enumerate(side.blocks):
            pair = per_head[n * len(per_head) // len(side.blocks)]  # a repeated value head's transform
            if side.role == "consumer":
                W[b] = pair[k] @ W[b]
                continue
            W[:, b] = W[:, b] @ pair[k]
            if bias is not None:
                bias[b] = bias[b] @ pair[k]
        updates[name] = np.ascontiguousarray(from_weight_matrix(side.node, W, w.shape)).astype(w.dtype)
        if bias is not None:
            updates[side.bias] = bias.astype(original[side.bias].dtype)


def _write(model, analysis, arrays: dict):
    inits = {t.name: t for t in model.graph.initializer}
    for name, array in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
        analysis.ctx.index.forget(name)


def _outputs(model, feeds) -> list:
    return make_session(model, quiet=True).run(None, feeds)


def _change(before: list, after: list) -> float:
    """Largest output change, relative to the largest magnitude of that output."""
    worst = 0.0
    for a, b in zip(before, after):
        if np.asarray(a).dtype.kind not in "fc" or np.asarray(a).size == 0:
            continue
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        finite = np.isfinite(a)  # a dense output's own inf or nan is not the rotation's
        if not finite.any():
            continue
        change = float(np.abs(a - b)[finite].max() / max(np.abs(a[finite]).max(), 1e-12))
        if not np.isfinite(change):
            return float("inf")
        worst = max(worst, change)
    return worst
