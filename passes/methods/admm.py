"""StructADMM (Zhang et al., arXiv 1807.11091), METHODS.md 4.

min f(W) s.t. W_i in S_i, by ADMM on the scaled augmented Lagrangian:
  W-step: train on f(W) + sum rho/2 ||W_i - Z_i + U_i||^2 (penalty(), for `period` steps)
  Z-step: Z_i = Proj_S(W_i + U_i);  U-step: U_i += W_i - Z_i;  rho *= rho_factor
then hard-prune W <- Proj_S(W), freeze the support and retrain with masked weights.

Constraint sets and their exact Euclidean projections (keep the largest-norm groups, zero the
rest; exact because the groups are disjoint and the objective is separable over them):
  unstructured  at most l_i nonzeros (budgets from one global magnitude sort, or per layer)
  nm            at most N nonzeros per run of M along the input-channel axis
  filter        at most alpha_i nonzero rows of the GEMM view (output channels of one layer)
  shape         at most theta_i nonzero columns (input channel x kernel position)
  channel       group level: at most beta_g channels of each dependency group, a channel being
                its slices in every producer of the group (residual branches included); this
                is filter pruning made consistent across coupled layers, so the result is a
                plan for surgery. (Grouped convs put two groups on one axis; those slices are
                then shared and the projection is exact per group, not jointly.)
Pruned channels are masked on every tensor of the group while retraining (this zeroes the BN
outputs of removed filters, as the paper does with gamma and beta).
"""

from __future__ import annotations

import torch

from onnx_prune.passes import sparsity as sp
from onnx_prune.passes.methods.base import Method


# -- projections (each returns the projected tensor and its support) ---------------------------

def project_unstructured(v: torch.Tensor, n_keep: int):
    mask = sp.keep_top(v.abs(), n_keep)
    return v * mask, mask


def project_nm(v: torch.Tensor, n: int, m: int, axis: int):
    mask = sp.nm_mask(v, n, m, axis)
    return v * mask, mask


def project_filters(v: torch.Tensor, n_keep: int, out_axis: int):
    mask = sp.filter_mask(v, n_keep, out_axis)
    return v * mask, mask


def project_shapes(v: torch.Tensor, n_keep: int, out_axis: int):
    mask = sp.shape_mask(v, n_keep, out_axis)
    return v * mask, mask


def project_channels(analysis, vs: dict, n_keep: dict):
    """Keep, in every group, the n_keep[g] channels with the largest L2 norm over the slices
    of the producers in `vs`; zero their other channels' slices. Returns (zs, group masks)."""
    cm = sp.channel_map(analysis)
    norms = cm.scores(vs, names=set(vs))
    gmasks = {g: sp.keep_top(norms[g], n) for g, n in n_keep.items()}
    wmasks = sp.group_weight_masks(analysis, gmasks, list(vs), roles=("producer",))
    return {k: v * wmasks[k] if k in wmasks else v for k, v in vs.items()}, gmasks


class ADMM(Method):
    name = "admm"
    patterns = ("unstructured", "nm", "filter", "shape", "channel")
    # iterations: ADMM (Z, U) updates; retrain: fraction of training for masked retraining
    # after the hard prune; rho: initial penalty (the authors' 1.5e-3 order); rho_factor:
    # growth per update (the group's scheduler doubles it); rho_max caps it
    defaults = {"iterations": 4, "retrain": 0.3, "rho": 1e-3, "rho_factor": 2.0, "rho_max": 1.0}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.opts
        admm_steps = max(1, int(round(self.total_steps * (1 - o["retrain"]))))
        self.K = max(1, min(int(o["iterations"]), admm_steps))
        self.L = admm_steps // self.K
        self.rho = float(o["rho"])
        self.keep = self._budgets()
        self.pruned = False
        with torch.no_grad():
            W = {k: w.detach().clone() for k, w in self.weights.items()}
            self.Z, _ = self.project(W)
            self.U = {k: torch.zeros_like(w) for k, w in W.items()}

    def _share(self, key):
        s = self.sparsity
        return float(s.get(key, 0.0)) if isinstance(s, dict) else float(s)

    def _budgets(self) -> dict:
        kind = self.pattern.kind
        if kind == "unstructured":
            b = sp.layer_budgets(self.weights, self.sparsity, self.scope)
            return {k: w.numel() - b[k] for k, w in self.weights.items()}
        if kind == "channel":
            # only groups created by the constrained layers (a Gather table's group stays whole)
            own = self.cmap.producer_groups(self.weights)
            norms = self.cmap.scores(self.weights, names=set(self.weights))
            norms = {g: s.detach() for g, s in norms.items() if g in own}
            masks = sp.channel_masks(norms, self.sparsity, self.scope)
            return {g: int(m.sum()) for g, m in masks.items()}
        out = {}
        for k, w in self.weights.items():
            n = w.shape[self.infos[k].out_axis] if kind == "filter" else w.numel() // max(1, w.shape[self.infos[k].out_axis])
            out[k] = max(1, n - int(round(self._share(k) * n)))
        return out

    def project(self, vs: dict):
        """Proj_S for every layer: (projected tensors, weight masks or group masks)."""
        kind = self.pattern.kind
        if kind == "channel":
            return project_channels(self.analysis, vs, self.keep)
        zs, masks = {}, {}
        for k, v in vs.items():
            info = self.infos[k]
            if kind == "unstructured":
                zs[k], masks[k] = project_unstructured(v, self.keep[k])
            elif kind == "nm":
                zs[k], masks[k] = project_nm(v, self.pattern.n, self.pattern.m, info.in_axis)
            elif kind == "filter":
                zs[k], masks[k] = project_filters(v, self.keep[k], info.out_axis)
            else:
                zs[k], masks[k] = project_shapes(v, self.keep[k], info.out_axis)
        return zs, masks

    def penalty(self):
        if self.pruned:
            return 0.0
        total = 0.0
        for k, w in self.weights.items():
            total = total + (w - self.Z[k] + self.U[k]).pow(2).sum()
        return 0.5 * self.rho * total

    def step(self, i: int):
        t = i + 1
        if self.pruned or t % self.L or t > self.K * self.L:
            return
        with torch.no_grad():
            W = {k: w.detach() for k, w in self.weights.items()}
            self.Z, _ = self.project({k: W[k] + self.U[k] for k in W})
            for k in W:
                self.U[k] += W[k] - self.Z[k]
        self.rho = min(self.rho * self.opts["rho_factor"], self.opts["rho_max"])
        if t == self.K * self.L:
            self.hard_prune()

    def hard_prune(self):
        """W <- Proj_S(W); the support becomes a fixed mask for retraining."""
        with torch.no_grad():
            zs, masks = self.project({k: w.detach() for k, w in self.weights.items()})
            for k, z in zs.items():
                self.weights[k].copy_(z)
        if self.channel:
            self.group_masks.update(masks)
        else:
            self.masks = masks
        self.pruned = True

    def harden(self):
        if not self.pruned:
            self.hard_prune()
        self.hardened = True
