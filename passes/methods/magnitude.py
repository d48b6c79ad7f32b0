"""Gradual magnitude pruning (Zhu & Gupta 2017), the baseline.

Sparsity follows s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3, updated every `every`
steps between t0 and t_end: prune fast while the network is redundant, slowly near the target.
At each update the smallest surviving magnitudes (|w|, N:M runs, or group channel L2 norms) are
masked; what is pruned stays pruned. Masks are hard (W * mask; channels: activation masks).
"""

from __future__ import annotations

from onnx_prune.passes.methods.base import Method


def cubic_schedule(t: float, t0: float, t_end: float, s_i: float, s_f: float) -> float:
    """Zhu & Gupta's sparsity at step t: s_i before t0, s_f from t_end on, cubic in between."""
    if t <= t0:
        return s_i
    if t >= t_end:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t_end - t0)) ** 3


class Magnitude(Method):
    name = "magnitude"
    # begin/end: fractions of training where the ramp starts and reaches the target (the rest
    # fine-tunes with fixed masks); every: steps between mask updates (default: 20 updates);
    # initial: starting sparsity as a share of the target
    defaults = {"begin": 0.0, "end": 0.75, "every": None, "initial": 0.0}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.opts
        self.t0 = int(round(o["begin"] * self.total_steps))
        self.t_end = max(self.t0 + 1, int(round(o["end"] * self.total_steps)))
        self.every = max(1, int(o["every"] or (self.t_end - self.t0) // 20 or 1))
        self.fraction = 0.0  # share of the target reached by the current masks
        if o["initial"] > 0:
            self._update(o["initial"])

    def target_fraction(self, t: int) -> float:
        return cubic_schedule(t, self.t0, self.t_end, self.opts["initial"], 1.0)

    def step(self, i: int):
        t = i + 1  # steps done
        if self.hardened or t < self.t0:
            return
        if (t - self.t0) % self.every == 0 or t >= self.t_end:
            f = self.target_fraction(t)
            if f > self.fraction:
                self._update(f)

    def _update(self, f: float):
        if self.pattern.kind == "nm":
            n, m = self.pattern.n, self.pattern.m
            self.masks = self.magnitude_masks(1.0, nm_keep=m - int(round(f * (m - n))))
        elif self.channel:
            self.group_masks = self.magnitude_masks(f)
        else:
            self.masks = self.magnitude_masks(f)
        self.fraction = f  # weights are zeroed by finalize(); the hard masks hide them until then

    def harden(self):
        if not self.hardened and self.fraction < 1.0:
            self._update(1.0)
        self.hardened = True
