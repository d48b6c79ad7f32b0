"""SPDY's dynamic program (METHODS.md section 1): one option per layer (here: per channel group),
least total error under a time budget.

The budget is split into `buckets`; each option's time is rounded *up* to whole buckets, so a
solution the program accepts never exceeds the budget in the times it was given (SPDY rounds to
nearest; rounding up keeps the guarantee on our side, the measured loop does the rest).
"""

from __future__ import annotations

import numpy as np

BUCKETS = 10_000


def dp_solve(costs, errors, budget: float, buckets: int = BUCKETS):
    """Choose option k_l for every layer l minimising sum errors[l][k_l] subject to
    sum costs[l][k_l] <= budget. Returns the list of chosen indices, or None if infeasible."""
    if budget <= 0:
        return None
    unit = budget / buckets
    tau = [np.ceil(np.asarray(c, dtype=float) / unit - 1e-9).astype(np.int64) for c in costs]
    err = [np.asarray(e, dtype=float) for e in errors]
    inf = np.inf
    best = np.full(buckets + 1, inf)  # best[b]: least error with total buckets exactly b
    best[0] = 0.0
    choice = np.zeros((len(costs), buckets + 1), dtype=np.int32)
    for layer, (t, e) in enumerate(zip(tau, err)):
        nxt = np.full(buckets + 1, inf)
        arg = np.zeros(buckets + 1, dtype=np.int32)
        for k, (tk, ek) in enumerate(zip(t, e)):
            if tk > buckets:
                continue
            cand = np.full(buckets + 1, inf)
            cand[tk:] = best[: buckets + 1 - tk] + ek
            better = cand < nxt
            nxt[better] = cand[better]
            arg[better] = k
        best, choice[layer] = nxt, arg
    if not np.isfinite(best).any():
        return None
    # among solutions of equal error the slowest, nearest the budget: errors that tie (all zero where
    # the outputs are, or channels that are dead on the calibration data) must not prune past the goal
    b = buckets - int(np.argmin(best[::-1]))
    picks = []
    for layer in range(len(costs) - 1, -1, -1):
        k = int(choice[layer, b])
        picks.append(k)
        b -= int(tau[layer][k])
    return picks[::-1]


def sensitivity_errors(coefficients, n_options):
    """SPDY's reparametrisation: option i of a layer with n options costs c * (i / (n - 1))^2,
    options ordered from dense (i = 0) to the sparsest."""
    out = []
    for c, n in zip(coefficients, n_options):
        i = np.arange(n, dtype=float)
        out.append(c * (i / max(n - 1, 1)) ** 2)
    return out
