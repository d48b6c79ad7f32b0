"""Channel importance per group: weight magnitude over every weight slice the group owns."""

from __future__ import annotations

import numpy as np

from onnx_prune.passes.analysis import Analysis

KINDS = ("l1", "l2")


def group_scores(analysis: Analysis, kind: str = "l2") -> dict[str, np.ndarray]:
    """Score of each channel of each group, summed over producer and consumer weights.

    Each weight's contribution is divided by its mean so that a large layer does not drown
    the others in the group."""
    if kind not in KINDS:
        raise ValueError(f"unknown importance '{kind}' (choose: {', '.join(KINDS)})")
    table, ctx = analysis.table, analysis.ctx
    by_sid = {g.sid: g for g in analysis.groups}
    scores = {g.sid: np.zeros(g.size) for g in analysis.groups}
    for init, uses in ctx.roles.items():
        arr = ctx.index.const(init)
        if arr is None or not np.issubdtype(arr.dtype, np.floating):
            continue
        for axis, role, _node in uses:
            if role not in ("producer", "consumer"):
                continue
            moved = np.moveaxis(np.abs(arr.astype(np.float64)), axis, 0).reshape(arr.shape[axis], -1)
            per_pos = moved.sum(1) if kind == "l1" else np.sqrt((moved ** 2).sum(1))
            for sid, c in table.coords(ctx.ax(init)[axis]):
                if sid not in by_sid:
                    continue
                sel = c >= 0
                contrib = np.zeros(by_sid[sid].size)
                np.add.at(contrib, c[sel], per_pos[sel])
                mean = contrib.mean()
                scores[sid] += contrib / mean if mean > 0 else contrib
    return {by_sid[sid].name: s for sid, s in scores.items()}


def keep_top(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices of the `n_keep` highest scores, in channel order (ties broken by index)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:n_keep])
