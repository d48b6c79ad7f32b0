"""What every training method shares: the interface, hard masks, magnitude selection.

A method owns masks, never the graph. The training loop (train.py) installs its hooks on the
executor (TorchGraph: `weight_hooks` give the effective weight, `value_hooks` mask activations
for the channel pattern), adds `penalty()` to the loss and calls `step(i)` after every
optimizer step. At the end, `finalize()` hardens the masks and zeroes the pruned parameters, so
exported weights carry the exact pattern; `final_masks()` and, for channels, `final_plan()` are
the results (data, for sparsity.write_sparse / surgery.apply_plan).

Methods do not modify the weights when they are built (the loop copies the dense model as the
distillation teacher after that); they change them only from step() on.
"""

from __future__ import annotations

import torch

from onnx_prune.passes import sparsity as sp


class Method:
    name = "base"
    patterns = ("unstructured", "nm", "channel")
    defaults: dict = {}

    def __init__(self, weights: dict, infos: dict, pattern="unstructured", sparsity=0.5, total_steps=1,
                 analysis=None, scope=None, on_indivisible="error", **opts):
        unknown = set(opts) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.name}: unknown options {sorted(unknown)} (known: {sorted(self.defaults)})")
        self.opts = {**self.defaults, **opts}
        self.params = weights
        self.pattern = sp.parse_pattern(pattern)
        if self.pattern.kind not in self.patterns:
            raise ValueError(f"{self.name} does not support the {self.pattern} pattern (supports: {', '.join(self.patterns)})")
        self.sparsity = sparsity
        # budgets: one global magnitude sort for weights; the same share in every group for channels
        self.scope = scope or ("layer" if self.pattern.kind == "channel" else "global")
        self.total_steps = max(1, int(total_steps))
        self.analysis = analysis
        self.infos = {k: v for k, v in infos.items() if k in weights}
        names = list(self.infos)
        if self.pattern.kind == "nm":
            names = sp.nm_layers(self.infos, names, self.pattern.m, on_indivisible)
        self.weights = {k: weights[k] for k in names}
        self.masks = {k: torch.ones(w.shape, dtype=torch.bool, device=w.device) for k, w in self.weights.items()}
        self.group_masks = {}
        if self.pattern.kind == "channel":
            if analysis is None:
                raise ValueError("the channel pattern needs the channel analysis (analysis=...)")
            self.cmap = sp.channel_map(analysis)
            self.group_masks = {g: torch.ones(n, dtype=torch.bool) for g, n in self.cmap.sizes.items()}
        self.hardened = False
        self.optimizer_reset = False  # set when the loop should clear optimizer state (GaP workers)

    # -- the interface -----------------------------------------------------------------------
    def weight_hooks(self) -> dict:
        if self.channel:  # channels are masked on the activations; recurrent layers also inside
            return sp.recurrent_weight_hooks(self.analysis, lambda: self.group_masks)
        return {k: _HardMask(self, k) for k in self.weights}

    def value_hooks(self) -> dict:
        if not self.channel:
            return {}
        return sp.dynamic_value_hooks(self.analysis, lambda: self.group_masks)

    def step(self, i: int):
        """Called after optimizer.step() of step i (0-based)."""

    def penalty(self):
        return 0.0

    def harden(self):
        """Fix the final masks (exact pattern). Idempotent."""
        self.hardened = True

    def finalize(self):
        """Harden, then zero pruned parameters so the exported weights carry the pattern."""
        self.harden()
        self.apply_masks_()

    def final_masks(self) -> dict[str, torch.Tensor]:
        """Weight masks (True = kept). For channels: every prunable weight slice a removed
        channel sits on (producer rows and consumer columns)."""
        self.harden()
        if self.channel:
            return sp.group_weight_masks(self.analysis, self.group_masks, list(self.weights))
        return {k: m.clone() for k, m in self.masks.items()}

    def final_plan(self) -> dict:
        """Channel pattern: {group: kept indices} for surgery."""
        if not self.channel:
            raise ValueError(f"a plan needs the channel pattern, not {self.pattern}")
        self.harden()
        return sp.channel_plan(self.analysis, self.group_masks)

    # -- helpers -----------------------------------------------------------------------------
    @property
    def channel(self) -> bool:
        return self.pattern.kind == "channel"

    def apply_masks_(self, names=None):
        """Zero pruned weights in place (pruned weights restart at 0 if they are ever regrown)."""
        masks = self.final_masks() if self.hardened else self._current_weight_masks()
        with torch.no_grad():
            for k, m in masks.items():
                if names is None or k in names:
                    self.params[k].masked_fill_(~m.to(self.params[k].device), 0.0)

    def _current_weight_masks(self):
        if self.channel:
            return sp.group_weight_masks(self.analysis, self.group_masks, list(self.weights))
        return self.masks

    def channel_scores(self, weights=None):
        """Per group, the L2 norm of each channel over all its producers' output slices."""
        return self.cmap.scores(weights if weights is not None else self.params)

    def magnitude_masks(self, fraction: float, names=None, nm_keep=None, scope=None, alive=True,
                        scores=None, total=None) -> dict:
        """Masks keeping the largest scores (default: magnitudes) at `fraction` of the target.
        unstructured: share `fraction*sparsity` pruned (global: one sort over `names`, `total`
        pruned if given); N:M: keep `nm_keep` (default N) per run; channel: the groups in
        `names`, share `fraction*sparsity` of each (layer) or overall (global).
        With alive, what is already pruned stays pruned (its score drops below every other)."""
        scope = scope or self.scope
        if self.channel:
            names = list(self.group_masks) if names is None else list(names)
            if scores is None:
                scores = self.channel_scores()
            scores = {g: scores[g].detach() for g in names}
            if alive:
                scores = {g: s.masked_fill(~self.group_masks[g], -1.0) for g, s in scores.items()}
            return sp.channel_masks(scores, _scaled(self.sparsity, fraction), scope, total=total)
        names = list(self.weights) if names is None else list(names)
        ws = {k: self.weights[k].detach() for k in names}
        scores = {k: (scores[k] if scores is not None else ws[k]).detach().abs() for k in names}
        if alive:
            scores = {k: s.masked_fill(~self.masks[k], -1.0) for k, s in scores.items()}
        if self.pattern.kind == "nm":
            n = self.pattern.n if nm_keep is None else nm_keep
            return {k: sp.nm_mask(ws[k], n, self.pattern.m, self.infos[k].in_axis, score=scores[k]) for k in names}
        if scope == "layer" or isinstance(self.sparsity, dict):
            budgets = sp.layer_budgets(ws, _scaled(self.sparsity, fraction), "layer")
        else:
            if total is None:
                total = int(round(fraction * self.sparsity * sum(w.numel() for w in ws.values())))
            budgets = sp.split_counts(total, {k: w.numel() for k, w in ws.items()}, scores)
        return {k: sp.keep_top(scores[k], ws[k].numel() - budgets[k]) for k in names}

def _scaled(sparsity, fraction):
    if isinstance(sparsity, dict):
        return {k: fraction * float(v) for k, v in sparsity.items()}
    return fraction * float(sparsity)


class _HardMask:
    """W -> W * mask, reading the method's current mask at every call."""

    def __init__(self, method, name):
        self.method, self.name = method, name

    def __call__(self, w):
        return w.masked_fill(~self.method.masks[self.name].to(w.device), 0.0)
