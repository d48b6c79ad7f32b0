"""PDP: parameter-free differentiable pruning (Cho, Adya, Naik, NeurIPS 2023), METHODS.md 2.

Effective weight w * m(w) with m(w) = sigmoid((w^2 - t^2) / tau): no mask parameters, every
weight gets a gradient (dm/dw pushes weights near t away from it, so pruned weights can come
back). t is the midpoint between the smallest kept and the largest pruned magnitude at the
current target, recomputed every forward and detached.

Schedule: dense warm-up until `start`; there the per-layer budgets r_l come from one global
magnitude sort (scope='layer': the same share everywhere); then r_l(t) = min(1, (t-s+1)/R) r_l
over a ramp of R steps (the paper's 1.5% per epoch). Then the mask is hardened: exactly the
budget's largest magnitudes are kept (the same as m >= 1/2, |w| >= t, when there are no ties).
The paper hardens at the very end; by default here the last 10% of training runs with the hard
mask (harden_at=0.9), which closes the soft/hard gap (on a small CNN at 80% sparsity it halved
the distillation error after hardening; harden_at=None is the paper's behaviour).

Variants: N:M takes t per run of M (top N vs bottom M-N, the number pruned per run ramps too);
channel replaces |w| by the group channel L2 norm over its producers (one soft mask per channel,
applied to every tensor of the group as activation masks).

tau is absolute in the paper (1e-4, tuned for its weight scale). Here it is relative by default:
tau_eff = tau * mean(w^2) of the layer (channels: mean of squared channel norms), detached,
so one value works whatever the scale; pass tau_absolute=... for the paper's behaviour.
"""

from __future__ import annotations

import torch

from onnx_prune.passes import sparsity as sp
from onnx_prune.passes.methods.base import Method


def soft_mask(w: torch.Tensor, t: torch.Tensor, tau) -> torch.Tensor:
    """m(w) = sigmoid((w^2 - t^2) / tau); softmax([t^2/tau, w^2/tau])[1]."""
    return torch.sigmoid((w * w - t * t) / tau)


def midpoint(values: torch.Tensor, k: int, dim=-1) -> torch.Tensor:
    """Half-way between the k-th and (k+1)-th smallest of `values` along `dim` (detached).
    When all are pruned (a tiny layer under a global budget) it is the largest value."""
    v = values.detach()
    lo = torch.kthvalue(v, k, dim=dim, keepdim=True).values
    hi = torch.kthvalue(v, min(k + 1, v.shape[dim]), dim=dim, keepdim=True).values
    return 0.5 * (lo + hi)


class PDP(Method):
    name = "pdp"
    # start: dense warm-up (fraction of training); ramp: fraction of training over which the
    # target grows linearly to the budget; tau: temperature relative to mean(w^2);
    # harden_at: fraction of training where the mask becomes hard (None: at the end)
    defaults = {"start": 0.1, "ramp": 0.6, "tau": 0.02, "tau_absolute": None, "harden_at": 0.9}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.opts
        self.s = int(round(o["start"] * self.total_steps))
        self.R = max(1, int(round(o["ramp"] * self.total_steps)))
        self.harden_step = None if o["harden_at"] is None else int(round(o["harden_at"] * self.total_steps))
        self.t = 0  # steps done
        self.budgets = None  # pruned count per layer (unstructured) / per group (channel)
        self._cache = (None, None)
        if self.s == 0:
            self._set_budgets()

    # -- schedule ------------------------------------------------------------------------------
    def progress(self, t=None) -> float:
        t = self.t if t is None else t
        return 0.0 if t < self.s else min(1.0, (t - self.s + 1) / self.R)

    def _set_budgets(self):
        if self.pattern.kind == "nm":
            self.budgets = {}
        elif self.channel:
            masks = sp.channel_masks({g: s.detach() for g, s in self.channel_scores().items()},
                                     self.sparsity, self.scope)
            self.budgets = {g: int((~m).sum()) for g, m in masks.items()}
        else:
            self.budgets = sp.layer_budgets(self.weights, self.sparsity, self.scope)

    def step(self, i: int):
        self.t = i + 1
        if self.budgets is None and self.t >= self.s:
            self._set_budgets()
        if self.harden_step is not None and self.t >= self.harden_step:
            self.harden()

    # -- soft masks ----------------------------------------------------------------------------
    def _tau(self, sq: torch.Tensor):
        if self.opts["tau_absolute"] is not None:
            return float(self.opts["tau_absolute"])
        return self.opts["tau"] * sq.detach().mean().clamp(min=1e-30)

    def effective(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if self.hardened:
            return w.masked_fill(~self.masks[name].to(w.device), 0.0)
        p = self.progress()
        if p == 0.0 or self.budgets is None:
            return w
        if self.pattern.kind == "nm":
            m, n = self.pattern.m, self.pattern.n
            k = int(round(p * (m - n)))
            if k == 0:
                return w
            axis = self.infos[name].in_axis
            runs = sp.nm_view(w, axis, m)
            t = midpoint(runs.abs(), k)
            mask = soft_mask(runs, t, self._tau(w * w))
            return sp.nm_unview(mask * runs, w.shape, axis)
        k = int(round(p * self.budgets[name]))
        if k == 0:
            return w
        t = midpoint(w.abs().reshape(-1), k)
        return soft_mask(w, t, self._tau(w * w)) * w

    def weight_hooks(self) -> dict:
        if self.channel:  # channels are masked on the activations; recurrent layers also inside
            return sp.recurrent_weight_hooks(self.analysis, self.current_group_masks)
        return {k: _Soft(self, k) for k in self.weights}

    def current_group_masks(self) -> dict:
        """Soft channel masks at the current step, computed once per forward (cached on the
        parameters' versions) so every tensor of a group sees the same autograd node."""
        if self.hardened:
            return self.group_masks
        key = (self.t, torch.is_grad_enabled(), tuple(p._version for p in self.params.values()))
        if self._cache[0] == key:
            return self._cache[1]
        p = self.progress()
        masks = {}
        if p > 0.0 and self.budgets is not None:
            for g, norms in self.channel_scores().items():
                k = int(round(p * self.budgets[g]))
                if k == 0:
                    continue
                sq = norms * norms
                t = midpoint(norms, k)
                masks[g] = soft_mask(norms, t, self._tau(sq))
        self._cache = (key, masks)
        return masks

    def value_hooks(self) -> dict:
        if not self.channel:
            return {}
        return sp.dynamic_value_hooks(self.analysis, self.current_group_masks)

    # -- hardening -----------------------------------------------------------------------------
    def harden(self):
        if self.hardened:
            return
        if self.budgets is None:
            self._set_budgets()
        if self.pattern.kind == "nm":
            self.masks = {k: sp.nm_mask(w, self.pattern.n, self.pattern.m, self.infos[k].in_axis)
                          for k, w in self.weights.items()}
        elif self.channel:
            scores = self.channel_scores()
            self.group_masks = {g: sp.keep_top(s.detach(), s.numel() - self.budgets[g]) for g, s in scores.items()}
        else:
            self.masks = {k: sp.keep_top(w.detach().abs(), w.numel() - self.budgets[k]) for k, w in self.weights.items()}
        self._cache = (None, None)
        self.hardened = True


class _Soft:
    def __init__(self, method, name):
        self.method, self.name = method, name

    def __call__(self, w):
        return self.method.effective(self.name, w)
