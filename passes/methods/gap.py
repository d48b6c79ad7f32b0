"""GaP: grow-and-prune (Ma et al., ICLR 2022), METHODS.md 3.

The prunable layers (channel pattern: the dependency groups) are split into `kappa` partitions
of consecutive layers. Everything sits at the target sparsity except one partition, grown to
dense; every `period` steps the grown partition is pruned back by magnitude and the next one
grows (its pruned weights restart at 0). After `rounds` cycles, the masks are fixed and the rest
of training fine-tunes. Step 0 starts from a random mask (init='magnitude' for the largest).

parallel=True is P-GaP run serially: in each round, worker i starts from the round's model with
partition i grown and trains for `period` steps; the round's result takes partition i from
worker i (parameters outside the partitions are averaged over workers), prunes every partition
by magnitude and starts the next round. The loop clears optimizer state between workers.

Budgets: scope='global' distributes round(s * N) pruned weights over partitions by size and
within a partition by one magnitude sort (non-uniform); 'layer' prunes each layer to s.
"""

from __future__ import annotations

import numpy as np
import torch

from onnx_prune.passes import sparsity as sp
from onnx_prune.passes.methods.base import Method


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over parts proportionally to `sizes` (largest remainder: sums exactly)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if total == 0 or sizes.sum() == 0:
        return [0] * len(sizes)
    quota = total * sizes / sizes.sum()
    base = np.floor(quota).astype(int)
    order = np.argsort(-(quota - base), kind="stable")
    base[order[:total - base.sum()]] += 1
    return [int(b) for b in base]


class GaP(Method):
    name = "gap"
    # kappa: partitions; rounds: grow/prune cycles over all partitions; period: steps per grown
    # partition (default: fill the non-fine-tune part of training); finetune: fraction of
    # training left for fixed-mask fine-tuning when period is derived; init: random | magnitude
    defaults = {"kappa": 3, "rounds": 2, "period": None, "finetune": 0.25, "init": "random",
                "parallel": False, "seed": 0}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.opts
        if o["init"] not in ("random", "magnitude"):
            raise ValueError(f"gap: init must be random or magnitude, got {o['init']!r}")
        if o["parallel"] and self.channel:
            raise ValueError("parallel GaP merges layers' weights by partition; use it with unstructured or N:M")
        units = list(self.group_masks) if self.channel else list(self.weights)
        kappa = max(1, min(int(o["kappa"]), len(units)))
        self.parts = [list(p) for p in np.array_split(np.array(units, dtype=object), kappa)]
        self.kappa = kappa
        self.rounds = int(o["rounds"])
        phases = self.rounds * kappa
        self.T = int(o["period"] or max(1, int(self.total_steps * (1 - o["finetune"])) // phases))
        self.grow_steps = phases * self.T
        self.totals = self._partition_totals()
        self.grown = None
        self.gen = torch.Generator().manual_seed(int(o["seed"]))
        for k in range(kappa):  # everything at the target ...
            self._prune(k, random=o["init"] == "random")
        self.snapshot = self.collected = None
        if o["parallel"]:
            self._start_round()
        self._grow(0, zero=False)  # ... except the first partition (its weights were never masked)

    def _partition_totals(self):
        """Pruned units per partition for the global scope (None: per layer / per group)."""
        if self.scope != "global" or self.pattern.kind == "nm" or isinstance(self.sparsity, dict):
            return [None] * self.kappa
        sizes = [sum(self.cmap.sizes[g] if self.channel else self.weights[g].numel() for g in p) for p in self.parts]
        return apportion(int(round(self.sparsity * sum(sizes))), sizes)

    # -- grow / prune --------------------------------------------------------------------------
    def _prune(self, k: int, random=False):
        names = self.parts[k]
        scores = None
        if random:
            if self.channel:
                scores = {g: torch.rand(self.cmap.sizes[g], generator=self.gen) for g in names}
            else:
                scores = {n: torch.rand(self.weights[n].shape, generator=self.gen) for n in names}
        masks = self.magnitude_masks(1.0, names=names, alive=False, scores=scores, total=self.totals[k])
        (self.group_masks if self.channel else self.masks).update(masks)
        if self.grown == k:
            self.grown = None

    def _grow(self, k: int, zero=True):
        """Partition k becomes dense; its pruned weights restart at 0. (Zeroed here, not when
        pruned, so nothing touches the weights before training starts: the loop's teacher is
        the dense model.) Channels restart from zero output rows; consumers still read them."""
        names = self.parts[k]
        if not zero:
            masks = {}
        elif self.channel:
            masks = sp.group_weight_masks(self.analysis, {g: self.group_masks[g] for g in names},
                                          list(self.weights), roles=("producer",))
        else:
            masks = {n: self.masks[n] for n in names}
        with torch.no_grad():
            for n, m in masks.items():
                self.params[n].masked_fill_(~m.to(self.params[n].device), 0.0)
        for n in names:
            if self.channel:
                self.group_masks[n] = torch.ones_like(self.group_masks[n])
            else:
                self.masks[n] = torch.ones_like(self.masks[n])
        self.grown = k

    # -- parallel (serial workers) ---------------------------------------------------------
    def _start_round(self):
        self.snapshot = {n: p.detach().clone() for n, p in self.params.items()}
        self.round_masks = {n: m.clone() for n, m in self.masks.items()}
        self.collected = {}
        self.shared_sum = {n: torch.zeros_like(p) for n, p in self.snapshot.items() if n not in self.weights}

    def _end_worker(self, k: int):
        with torch.no_grad():
            for n in self.parts[k]:
                self.collected[n] = self.params[n].detach().clone()
            for n in self.shared_sum:
                self.shared_sum[n] += self.params[n].detach()
            for n, p in self.params.items():  # the next worker starts from the round's model
                p.copy_(self.snapshot[n])
        self.masks = {n: m.clone() for n, m in self.round_masks.items()}
        self.grown = None
        self.optimizer_reset = True

    def _end_round(self):
        with torch.no_grad():
            for n, v in self.collected.items():
                self.params[n].copy_(v)
            for n, s in self.shared_sum.items():
                self.params[n].copy_(s / self.kappa)
        for k in range(self.kappa):  # worker k's partition was dense: prune it from its weights
            self._prune(k)

    # -- schedule ------------------------------------------------------------------------------
    def step(self, i: int):
        t = i + 1
        if self.hardened or t % self.T or t > self.grow_steps:
            return
        j = t // self.T - 1  # the phase that just ended
        k = j % self.kappa
        last = t == self.grow_steps
        if self.opts["parallel"]:
            self._end_worker(k)
            if k == self.kappa - 1:
                self._end_round()
                if not last:
                    self._start_round()
            if not last:
                self._grow((k + 1) % self.kappa)
            return
        self._prune(k)
        if not last:
            self._grow((k + 1) % self.kappa)

    def harden(self):
        if self.hardened:
            return
        if self.grown is not None:  # training stopped inside a phase (P-GaP: keep this worker's model)
            self._prune(self.grown)
        self.hardened = True
