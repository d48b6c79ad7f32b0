"""Plan search under a latency goal: uniform, global magnitude, and SPDY's DP.

Every search returns the least-pruned plan it can find whose *predicted* latency meets the goal
(the cost model in backends/predict.py); the compile loop then measures it and tightens the
goal if the measurement falls short. Widths are always taken from the measured candidate widths.
"""

from __future__ import annotations

import numpy as np

from onnx_prune.compiler.plans import uniform_plan
from onnx_prune.compiler.spdy import dp_solve
from onnx_prune.passes.importance import keep_top

BISECT_STEPS = 16


def _snap_up(widths, n):
    """The smallest allowed width >= n (the largest if none)."""
    ok = [w for w in widths if w >= n]
    return min(ok) if ok else max(widths)


def search_uniform(cm, analysis, widths, goal_ms, scores):
    """Smallest uniform ratio whose predicted latency meets the goal."""
    lo, hi, best = 0.0, 0.99, None
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        plan = uniform_plan(analysis, mid, widths=widths, scores=scores)
        if cm.predict_ms(plan) <= goal_ms:
            best, hi = plan, mid
        else:
            lo = mid
    return best or uniform_plan(analysis, 0.99, widths=widths, scores=scores)


def global_plan(analysis, widths, scores, threshold):
    """Keep channels whose score, relative to their group's mean, is above `threshold`
    (a global magnitude ranking, as Torch-Pruning does), snapped up to an allowed width."""
    plan = {}
    for g in analysis.groups:
        s = scores[g.name]
        rel = s / s.mean() if s.mean() > 0 else np.ones_like(s)
        n = _snap_up(widths[g.name], max(1, int((rel >= threshold).sum())))
        plan[g.name] = keep_top(s, n)
    return plan


def search_global(cm, analysis, widths, goal_ms, scores):
    lo, hi, best = 0.0, 50.0, None
    for _ in range(BISECT_STEPS * 2):
        mid = (lo + hi) / 2
        plan = global_plan(analysis, widths, scores, mid)
        if cm.predict_ms(plan) <= goal_ms:
            best, hi = plan, mid
        else:
            lo = mid
    return best or global_plan(analysis, widths, scores, hi)


class SpdyTables:
    """Per group and candidate width: the time it saves on its own, and the error it costs:
    from the error database (`curves`: group -> error at each kept count, passes/errordb.py) when
    calibration data was given, else the share of the group's importance removed, in units of
    the group's mean channel."""

    def __init__(self, cm, analysis, widths, scores, curves=None):
        self.groups = analysis.groups
        self.options = {g.name: sorted(widths[g.name], reverse=True) for g in self.groups}
        self.error = {}
        for g in self.groups:
            s = np.sort(scores[g.name])
            rel = s / s.mean() if s.mean() > 0 else np.ones_like(s)
            # without data: the lowest scores go first
            self.error[g.name] = np.array([float(curves[g.name][w]) if curves else float(rel[: g.size - w].sum())
                                           for w in self.options[g.name]])
        self.refresh(cm)

    def refresh(self, cm):
        """(Re)compute each option's saving from the cost model, e.g. once it is calibrated."""
        self.full_ms = cm.predict_ms({})
        self.saving = {g.name: np.array([self.full_ms - cm.predict_ms({g.name: np.arange(w)})
                                         for w in self.options[g.name]]) for g in self.groups}

    def error_of(self, group, width) -> float:
        return float(self.error[group][self.options[group].index(width)])

    def solve(self, goal_ms, errors=None):
        """DP: least error with additive savings >= full - goal. Returns widths per group."""
        names = [g.name for g in self.groups]
        max_save = {n: self.saving[n].max() for n in names}
        # cost of an option = saving forgone compared with the group's largest saving
        costs = [max_save[n] - self.saving[n] for n in names]
        budget = sum(max_save.values()) - (self.full_ms - goal_ms)
        if budget <= 0:
            picks = [int(np.argmax(self.saving[n])) for n in names]
        else:
            errs = errors or [self.error[n] for n in names]
            picks = dp_solve([np.maximum(c, 0) for c in costs], errs, budget)
            if picks is None:
                picks = [int(np.argmax(self.saving[n])) for n in names]
        return {n: self.options[n][k] for n, k in zip(names, picks)}


def search_spdy(cm, analysis, widths, goal_ms, scores, tables=None, rounds=12, curves=None, errors=None):
    """SPDY's DP on raw errors (`--search fast`), or on `errors` (per group, per option) when the
    sensitivity search supplies them. Savings are treated as additive, which a conv between two
    pruned groups contradicts; the plan is checked with the full (non-additive) predictor and the
    DP's goal tightened until the prediction meets the real goal."""
    tables = tables or SpdyTables(cm, analysis, widths, scores, curves)
    dp_goal, counts = goal_ms, None
    for _ in range(rounds):
        counts = tables.solve(dp_goal, errors)
        plan = {g.name: keep_top(scores[g.name], counts[g.name]) for g in analysis.groups}
        predicted = cm.predict_ms(plan)
        if predicted <= goal_ms:
            return plan
        dp_goal -= (predicted - goal_ms) * 1.05
    return _tighten(cm, tables, scores, counts, goal_ms, errors)


def _tighten(cm, tables, scores, counts, goal_ms, errors=None):
    """Where the DP's additive savings keep missing the goal (deep cuts on both sides of many
    layers save less than their sum), narrow one group at a time from the DP's last plan, each
    time the group that adds the least error per millisecond the full predictor says it saves,
    until the prediction meets the goal (or nothing narrower is left)."""
    names = [g.name for g in tables.groups]
    errs = dict(zip(names, errors)) if errors else tables.error
    pick = {n: tables.options[n].index(counts[n]) for n in names}  # options run widest first
    plan = {n: keep_top(scores[n], counts[n]) for n in names}
    now = cm.predict_ms(plan)
    while now > goal_ms:
        best = None
        for n in names:
            j = pick[n] + 1
            if j >= len(tables.options[n]):
                continue
            trial = {**plan, n: keep_top(scores[n], tables.options[n][j])}
            saved = now - cm.predict_ms(trial)
            if saved <= 0:
                continue
            price = max(errs[n][j] - errs[n][pick[n]], 0.0) / saved
            if best is None or price < best[0]:
                best = (price, n, j, now - saved, trial)
        if best is None:
            break
        _, n, pick[n], now, plan = best
    return plan
