"""SPDY's sensitivity search (`--search full`, METHODS.md section 1).

Raw per-layer errors are not comparable across layers (an FFN's output error and an attention
block's are measured against different signals), so SPDY searches coefficients c in [0, 1] per
group: the DP runs on c_g * error_g, and a candidate c is scored by the calibration loss of the
model the DP's plan gives. Before the search, each group's errors are put on the scale of that
loss (`measured_gains`): the group alone is pruned to about half its width and scored end to
end, so that the search starts from comparable errors instead of correcting them from scratch.
Search: c = 1 (the errors as given) first, then random draws for a tenth of the budget, then local
search that resamples k coordinates at a time, k falling from 10% of the groups to 1 after 100
straight failures -- all within a time budget. Random draws rarely win once there are more than a
few groups (MiniLM's 24: none of 100 beat c = 1, while local search kept improving): the time
goes to local search.
"""

from __future__ import annotations

import time

import numpy as np

RANDOM_DRAWS = 100
RANDOM_SHARE = 0.1  # of the search's budget, at most, for random draws
PATIENCE = 100


MIN_GAIN = 0.05  # of the median gain: a group whose probe moved nothing is still not free
MIN_SAMPLE_SHARE = 0.25  # of the search's samples: a probe on fewer says too little


def measured_gains(groups, options, errors, probe_loss, share=0.5, progress=None, budget_s=None) -> np.ndarray:
    """Per group, what one unit of its database error costs in the calibration loss.

    `options[name]`: widths, `errors[name]`: database error per width, `probe_loss(group, width,
    sample_share)`: the loss of the model with only that group pruned to `width`, on about
    `sample_share` of the samples. Groups without a probe (nothing to prune, or no database error
    at the probed width) get the median gain. With `budget_s`, later probes score fewer samples
    (down to MIN_SAMPLE_SHARE) when all of them would overrun it: ResNet-50's 37 probes on 64
    images take about two minutes."""
    started = time.time()
    probes = {}  # group -> the width it is probed at
    for g in groups:
        opts, errs = list(options[g.name]), errors[g.name]
        j = min(range(len(opts)), key=lambda k: abs(opts[k] - share * g.size))
        if opts[j] < g.size and errs[j] > 0:
            probes[g.name] = (opts[j], errs[j])
    gains, sample_share, left = [], 1.0, len(probes)
    for i, g in enumerate(groups):
        gain = None
        if g.name in probes:
            width, err = probes[g.name]
            t = time.time()
            gain = probe_loss(g, width, sample_share) / err
            left -= 1
            if budget_s is not None and left > 0:
                per_share_s = (time.time() - t) / sample_share
                spare = budget_s - (time.time() - started)
                sample_share = float(np.clip(spare / (left * per_share_s), MIN_SAMPLE_SHARE, 1.0))
        gains.append(gain)
        if progress:
            progress(i + 1, len(groups))
    known = [x for x in gains if x is not None and x > 0]
    median = float(np.median(known)) if known else 1.0
    return np.array([max(x, MIN_GAIN * median) if x is not None else median for x in gains])


def sensitivity_search(solve, loss, priors, budget_s, seed=0, progress=None):
    """`solve(errors) -> plan`, `loss(plan) -> float`, `priors`: per group, errors per option.
    Returns (best coefficients, best plan, best loss, evaluations)."""
    rng = np.random.default_rng(seed)
    started = time.time()
    deadline, random_until = started + budget_s, started + RANDOM_SHARE * budget_s
    cache = {}

    def score(c):
        plan = solve([ci * p for ci, p in zip(c, priors)])
        key = tuple(len(v) for v in plan.values())
        if key not in cache:
            cache[key] = loss(plan)
            if progress:
                progress(len(cache), min(cache.values()))
        return cache[key], plan

    n = len(priors)
    best_c = np.ones(n)
    best, best_plan = score(best_c)
    for _ in range(RANDOM_DRAWS):
        if time.time() > random_until:
            break
        c = rng.uniform(0, 1, n)
        value, plan = score(c)
        if value < best:
            best_c, best, best_plan = c, value, plan
    k = max(1, round(0.1 * n))
    fails = 0
    while k >= 1 and time.time() < deadline:
        c = best_c.copy()
        idx = rng.choice(n, size=min(k, n), replace=False)
        c[idx] = rng.uniform(0, 1, len(idx))
        value, plan = score(c)
        if value < best:
            best_c, best, best_plan, fails = c, value, plan, 0
        else:
            fails += 1
            if fails >= PATIENCE:
                k, fails = k - 1, 0
    return best_c, best_plan, best, len(cache)
