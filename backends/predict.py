"""Predict a plan's whole-model latency from a profile of the dense model and the timing database.

The dense model is profiled once on the target provider (ORT's own profiler): each kernel's time
is anchored to what it really costs inside this graph (fusions, layouts, caches). A plan scales
each kernel by how its node changes:

- weight layers (Conv, depthwise and grouped Conv, Gemm, MatMul with weights), and the ops
  without weights whose time is not their kept elements (attention MatMuls, Transposes, ORT's
  BiasGelu and FastGelu: timing.ACTIVATION_OPS; on the CPU, a pool between convs with the layout
  reorders around it: timing.POOL_CHAIN_OPS): by the timing database's t(widths') / t(widths),
  measured on the same provider;
- fused attention kernels: by their multiply-adds;
- ops that only relabel a shape (Reshape, Squeeze...): not at all;
- everything else: by the share of its output elements that the plan keeps.

Kernels that ORT created without a source node: a Transpose it moved, or a BiasGelu it fused
from an Add and a Gelu, is timed from the model value it writes; layout reorders scale as the
timing database's reorders around the weight layer whose output (or input) they convert (ORT's
optimized graph names the value), else with the share of that value the plan keeps; any other
keeps its time, and so does the part of the end-to-end time no kernel accounts for (session
overhead). On the CPU a plan that cuts a conv's output off ORT's channel block, where a conv
reads it, adds the reorder ORT then puts between them, as the timing database timed it
(timing.BLOCK_EXIT): the dense profile has no kernel to scale for it.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from onnx_prune.backends.profile import profile_model
from onnx_prune.backends.timing import (ACTIVATION_OPS, BIAS_GELUS, BLOCK_EXIT, CONVS, POOL_CHAIN_OPS, LayerSig, TimingDB,
                                        activation_sig, axis_points, fast_widths, layer_sig, nchwc_block, pool_chain_sig,
                                        width_grid)
from onnx_prune.passes.analysis import Analysis
from onnx_prune.passes.graph import CONTRIB, attr
from onnx_prune.passes.rules import recurrent_weight
from onnx_prune.passes.spaces import kept_positions


MAX_AXIS_POINTS = 48  # widths timed per layer axis at most
MAX_COMBINATIONS = 256  # of group widths, to find an axis's widths
# ops that only relabel a shape: ORT mostly hands the input's buffer on, so what they cost is the
# call, not the elements (MiniLM, a 2x plan: its Reshapes 57 µs dense, 51 pruned, not the 20 that
# their kept elements said)
VIEW_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")
# readers of a conv's output (past what ORT fuses into the conv: FUSED_INTO_CONV) that ORT feeds
# through a reorder once a plan cuts it off the block (timing.BLOCK_EXIT; a pool between convs is
# timed with its reorders as a chain)
BLOCK_READERS = ("Conv", "Concat", "Resize", "Upsample")
# the most ORT's CPU profiler adds to a kernel's time: 1.5-5 µs on this machine, measured as 300
# trivial ops profiled against the same runs without the profiler (0.4 µs each there)
PROFILER_US_CPU = 6.0


@dataclass
class TimedLayer:
    """A node the timing database times: a weight layer, an op of timing.ACTIVATION_OPS, or a pool
    timed with the reorders around it (timing.POOL_CHAIN_OPS)."""

    node: str
    sig: object
    axes: tuple  # channel expressions of the widths, in the timing database's order
    grids: list  # measured widths per axis
    coords: list = field(default_factory=list)  # per axis: [(space id, its channel at each position or -1)]

    def widths(self, keep: dict) -> list[int]:
        """The layer's widths under a plan (`keep`: space id -> boolean mask over its channels)."""
        return [_kept_width(c, keep, n) for c, n in zip(self.coords, self.sig.full)]


def _fused_attention(node) -> bool:
    """ONNX's Attention (opset 23) or ONNX Runtime's MultiHeadAttention: Q and V heads in one kernel."""
    return (node.op_type, node.domain or "ai.onnx") in {("Attention", "ai.onnx"), ("MultiHeadAttention", CONTRIB)}


def _kept_width(coords, keep: dict, n: int) -> int:
    """How many of an axis's n positions a plan keeps."""
    return int(kept_positions(coords, keep, n).sum())


class CostModel:
    def __init__(self, model, analysis: Analysis, feeds, provider="cpu", threads=None, db: TimingDB | None = None,
                 profile=None):
        self.analysis = analysis
        self.db = db or TimingDB(provider, threads)
        self.profile = profile or profile_model(model, feeds, provider, threads)
        ctx = analysis.ctx
        self.nodes = {n.name: n for n in ctx.index.model.graph.node}
        self._spaces = {}
        self.layers = {}  # graph node -> TimedLayer
        self.kernel_layers = {}  # kernel ORT made without a model node (a Transpose, a BiasGelu) -> TimedLayer
        timed = {}  # node of the model -> (signature, axes) the database times
        for node in ctx.index.model.graph.node:
            sig = layer_sig(node, ctx.index)
            axes = ctx.layer_axes.get(node.name)
            if sig is None or axes is None or len(axes) != len(sig.full):
                sig, axes = _activation_sig(node, analysis)
            if sig is not None:
                timed[node.name] = sig, axes
        by_output = {o: n.name for o, n in ctx.index.producer.items()}
        # pools between convs on the CPU, and the values whose reorders their chain's time holds
        chain_values = {}
        if provider == "cpu":
            for node in ctx.index.model.graph.node:
                found = _pool_chain(node, timed, analysis, self.nodes, by_output)
                if found is not None:
                    timed[node.name] = found
                    chain_values.update({node.input[0]: node.name, node.output[0]: node.name})
        self.kernel_nodes = {k: _fused_head(_source_node(k, self.nodes, by_output), kern.op, self.nodes, by_output)
                             for k, kern in self.profile.kernels.items()}
        inserted = {k: self._kernel_sig(kern) for k, kern in self.profile.kernels.items()
                    if self.kernel_nodes[k] is None}
        inserted = {k: found for k, found in inserted.items() if found[0] is not None}
        coords = {name: [analysis.table.coords(e) for e in axes] for name, (_, axes) in {**timed, **inserted}.items()}
        # from the weight layers' axes: on an attention MatMul's own axes a head is one position
        self.group_grids = _group_grids(analysis, [c for name, (sig, _) in timed.items() if _weighted(sig)
                                                   for c in coords[name]])
        points = []
        for name, (sig, axes) in {**timed, **inserted}.items():
            grids = [self._axis_grid(c, n) for c, n in zip(coords[name], sig.full)]
            layer = TimedLayer(name, sig, axes, grids, coords[name])
            (self.kernel_layers if name in inserted else self.layers)[name] = layer
            points += axis_points(sig, layer.grids)
        # convs whose output a plan can cut off the block, where ORT then adds a reorder: name -> its
        # timing.BLOCK_EXIT signature (measured at the off-block widths of the conv's output grid)
        self.block = nchwc_block(provider)
        self.block_exits = self._block_exits() if self.block else {}
        for name, sig in self.block_exits.items():
            points += [(sig, (w,)) for w in self.layers[name].grids[1] if w % self.block]
        self.db.ensure(points)
        # ORT's own nodes (layout reorders): the model's value they convert, if any
        self.kernel_values = {k: next((v for v in kern.values if v in ctx.index.shapes and ctx.ax(v)), None)
                              for k, kern in self.profile.kernels.items() if self.kernel_nodes[k] is None}
        # a reorder of a weight layer's output or input was timed with that layer in the timing
        # database, off the block too: (layer, 0 input | 1 output) per reorder kernel where found
        self.kernel_reorders = {k: self._reorder_layer(self.profile.kernels[k].op, v, by_output)
                                for k, v in self.kernel_values.items()
                                if v and self.profile.kernels[k].op.startswith("Reorder")}
        # ...except the reorders around a pool timed with them, which scale as its chain
        self.kernel_chains = {k: chain_values[v] for k, v in self.kernel_values.items()
                              if v in chain_values and self.profile.kernels[k].op.startswith("Reorder")}
        # The profiler adds a little to every kernel; when kernels sum to more than a plain run,
        # that excess is spread over the kernels and removed. What a plain run has on top of the
        # kernels (session overhead) is kept as a constant.
        n_kernels = max(len(self.profile.kernels), 1)
        excess_ms = self.profile.kernel_ms - self.profile.e2e_ms
        self.profiler_us = max(excess_ms, 0.0) * 1e3 / n_kernels
        if provider == "cpu":
            # past what the profiler can add, the excess is the machine changing speed between the
            # profiled and plain runs, which scales every kernel alike: taken off each kernel, it
            # zeroed MobileNetV2's small late convs (94 µs each; a 3x plan predicted 3.62x, 2.86x
            # measured)
            self.profiler_us = min(self.profiler_us, PROFILER_US_CPU)
        # ...except where it comes from a Loop or Scan: profiled, its body's nodes cost the
        # profiler's time at every iteration, which the node's one kernel holds (a bag of 8 ids per
        # sample through TorchScript's EmbeddingBag Loop: 4.5 ms profiled, the whole run 1.45 ms).
        # An If runs its branch once: its excess is the machine's, like any kernel's.
        self.trim_us = _loop_trim(self.profile.kernels, excess_ms * 1e3 - self.profiler_us * n_kernels,
                                          self.profiler_us)
        self.overhead_ms = max(-excess_ms, 0.0)
        if self.profile.run_overhead_ms is not None:
            # the plain runs came after the profiled ones, maybe in a slower spell of the machine
            # (MobileNetV2 at batch 64: 1.05 ms apart, 0.25 ms within the same runs)
            self.overhead_ms = min(self.overhead_ms, max(self.profile.run_overhead_ms, 0.0))
        # every kernel launch has a fixed cost that pruning does not remove: the cheapest kernel's
        times = sorted(k.time_us - self.profiler_us for k in self.profile.kernels.values())
        self.fixed_us = max(times[0], 0.0) if times else 0.0
        self.db_floor_us = self._database_floor()
        self.gamma = 1.0  # kernels scale by ratio ** gamma; see calibrate()
        self._memo = {}  # (layer, its widths) or ("reorder", kernel, widths) -> time ratio
        self._coords = {}  # ("node" | "value", name) -> [(coords, size)] of the axes its cost scales with

    def _database_floor(self) -> float:
        """µs the timing database spends on every point beyond what the same layer costs in the
        model: at most the smallest gap between a layer's time in the database and its kernel's in
        the dense profile. Small kernels in a small model (HF RegNet at batch 8: SE convs of 3-4 µs
        timed 8-10 µs alone) otherwise keep a floor in both ends of their ratio, and a plan's
        speedup came out short (raw worst 9-36% over its plans, 3.7-3.8% without it). Zero where
        the model's kernels run slower than the database's (larger batches)."""
        counts = Counter(self.kernel_nodes.values())
        alone = {k: self.layers[node] for k, node in self.kernel_nodes.items() if node in self.layers and counts[node] == 1}
        gaps = [self.db.estimate(layer.sig, layer.sig.full, layer.grids) - (self.profile.kernels[k].time_us - self.profiler_us)
                for k, layer in alone.items()]
        return max(min(gaps, default=0.0), 0.0)

    def _kernel_sig(self, kernel):
        """(signature, axes) of a kernel ORT made without a node of the model that the database
        times (an inserted Transpose, a BiasGelu or FastGelu fused from an Add and a Gelu);
        (None, None) if none."""
        if kernel.op == "Transpose":
            return self._inserted_transpose(kernel)
        if kernel.op in BIAS_GELUS and len(kernel.values) == 3:  # output, input, bias
            return self._bias_gelu(kernel)
        return None, None

    def _bias_gelu(self, kernel):
        """(signature, axes) of ORT's BiasGelu (or FastGelu with a bias) from the model value it
        writes (the Gelu's output): that value's shape, and the bias along its last axis."""
        ctx = self.analysis.ctx
        value = kernel.values[0]
        if value not in ctx.index.shapes or not ctx.ax(value) or ctx.shape(value) is None:
            return None, None
        axes, shape = list(ctx.ax(value)), list(ctx.shape(value))
        return _sig_of_inputs(kernel.op, [(axes, shape), (axes[-1:], shape[-1:])], self.analysis)

    def _inserted_transpose(self, kernel):
        """(signature, axes) of a Transpose ORT inserted (its transpose optimizer moves the model's
        own past a Gather or Split, into each branch), from the model value it writes or reads;
        (None, None) if neither is one."""
        ctx = self.analysis.ctx
        n_out = max(len(kernel.outputs), 1)
        for value, written in ((v, i < n_out) for i, v in enumerate(kernel.values[:n_out + 1])):
            axes, shape = (ctx.ax(value), ctx.shape(value)) if value in ctx.index.shapes else (None, None)
            if not axes or shape is None:
                continue
            perm = list(kernel.perm) or list(range(len(axes)))[::-1]
            if sorted(perm) != list(range(len(axes))):
                return None, None
            if written:  # output axis k is input axis perm[k]
                source = [perm.index(i) for i in range(len(perm))]
                axes, shape = [axes[k] for k in source], [shape[k] for k in source]
            return _sig_of_inputs("Transpose", [(axes, shape)], self.analysis, perm)
        return None, None

    def _reorder_layer(self, op: str, value: str, by_output: dict):
        """The weight layer whose output a ReorderOutput converts (upstream through its fused
        activation), or whose input a ReorderInput feeds."""
        weighted = lambda n: n in self.layers and _weighted(self.layers[n].sig)  # noqa: E731
        if op == "ReorderInput":
            for node, i in self.analysis.ctx.index.consumers.get(value, []):
                if i == 0 and weighted(node.name):
                    return node.name, 0
            return None
        name = _upstream(by_output.get(value), weighted, self.nodes, by_output)
        return (name, 1) if name is not None else None

    def _block_exits(self) -> dict:
        """Convs of one group whose output fills whole blocks in the dense model and is read by a
        BLOCK_READERS op, with no reorder there in the dense profile: name -> BLOCK_EXIT signature."""
        index = self.analysis.ctx.index
        reordered = {v for kern in self.profile.kernels.values() if kern.op.startswith("Reorder") for v in kern.values}
        exits = {}
        for name, layer in self.layers.items():
            if layer.sig.op != "Conv" or layer.sig.full[1] % self.block:
                continue
            values = _fused_outputs(self.nodes[name], index)
            shape = index.shape(values[-1])
            readers = {n.op_type for v in values for n, _ in index.consumers.get(v, [])}
            if (shape is None or len(shape) != 4 or None in shape or reordered.intersection(values)
                    or not readers.intersection(BLOCK_READERS)):
                continue
            exits[name] = LayerSig(BLOCK_EXIT, (int(shape[1]),), (int(shape[0]), int(shape[2]), int(shape[3])))
        return exits

    def _exit_reorder_ms(self, name: str, keep: dict) -> float:
        """The reorder a plan adds after conv `name` (of block_exits) by cutting its output off
        the block, as the timing database measured it at that width (0 where ORT put none)."""
        width = self.layers[name].widths(keep)[1]
        if width % self.block == 0:
            return 0.0
        return (self.db.get(self.block_exits[name], (width,)) or 0.0) / 1e3

    def _reorder_ratio(self, kname: str, keep: dict) -> float:
        """A reorder kernel's time under the plan, relative to the dense model's."""
        if kname in self.kernel_chains:
            return self._timed_ratio(self.layers[self.kernel_chains[kname]], keep)
        value = self.kernel_values.get(kname)
        ref = self.kernel_reorders.get(kname)
        if ref is not None:
            layer, side = self.layers[ref[0]], ref[1]
            widths = tuple(layer.widths(keep))
            memo = ("reorder", kname, widths)
            if memo not in self._memo:
                full = self.db.reorder_estimate(layer.sig, layer.sig.full, layer.grids, side)
                self._memo[memo] = self.db.reorder_estimate(layer.sig, widths, layer.grids, side) / full \
                    if full else None
            if self._memo[memo] is not None:
                return self._memo[memo]
        return self._kept_fraction(("value", value), lambda: self.analysis.ctx.ax(value), keep) if value else 1.0

    def _kept_fraction(self, key, axes, keep) -> float:
        """The kept share of the positions of `axes()` (all of them: elements, or multiply-adds),
        from their coordinates, resolved once per key."""
        if key not in self._coords:
            table = self.analysis.table
            self._coords[key] = [(c, n) for c, n in ((table.coords(e), table.size(e)) for e in axes() or [])
                                 if n and c]
        frac = 1.0
        for coords, n in self._coords[key]:
            frac *= _kept_width(coords, keep, n) / n
        return float(frac)

    def _axis_grid(self, coords, n: int) -> list[int]:
        """Widths to time along one layer axis: the widths plans give it. A plain group gets its
        grid; a product or concatenation of groups the axis widths of every combination of the
        groups' grids (2 groups x 7 channels = 14, where the grid of 16 holds only 8 and 16: ORT
        ran RegNetY's 1x1 conv 3.4x slower at 14), or, where those are too many (a concatenation
        of many groups), of each group's grid with the others full -- always with the axis's own
        grid, which spans the widths where every group is pruned."""
        spaces = list(dict.fromkeys(sid for sid, _ in coords))
        size = {sid: self.analysis.table.spaces[sid].size for sid in spaces}
        grids = [self.group_grids.get(sid) or width_grid(size[sid]) for sid in spaces]
        if np.prod([len(g) for g in grids]) <= MAX_COMBINATIONS:
            combos = (dict(zip(spaces, combo)) for combo in itertools.product(*grids))
        else:
            combos = ({sid: w} for sid, grid in zip(spaces, grids) for w in grid)
        widths = set(width_grid(n)) if spaces else {n}
        for counts in combos:  # each group keeping its first channels
            widths.add(_kept_width(coords, {sid: np.arange(size[sid]) < w for sid, w in counts.items()}, n))
        widths.discard(0)
        grid = sorted(widths)
        if len(grid) > MAX_AXIS_POINTS:  # a concatenation of many groups: thin, keep the full width
            step = int(np.ceil(len(grid) / MAX_AXIS_POINTS))
            grid = sorted(set(grid[::step]) | {n})
        return grid

    @functools.cached_property
    def dense_ms(self) -> float:
        """The dense model as the predictor sees it (constant: every speedup divides by it)."""
        return self.predict_ms({})

    def _cost_axes(self, name: str) -> list:
        """The channel axes a node's cost scales with: a weight layer's widths; an attention
        MatMul's two operands (rows, contraction and output columns); else its output."""
        ctx = self.analysis.ctx
        node = self.nodes[name]
        if name in self.layers:
            return list(self.layers[name].axes)
        if node.op_type == "MatMul" and node.input[1] not in ctx.index.inits:
            a, b = ctx.ax(node.input[0]), ctx.ax(node.input[1])
            return [] if a is None or b is None else list(a) + list(b[-1:])
        if _fused_attention(node):  # see node_ratio
            return list(ctx.ax(node.input[0]) or []) + list(ctx.ax(node.output[0]) or [])
        if recurrent_weight(node):  # see node_ratio
            return list(ctx.ax(node.input[1]) or []) + list(ctx.ax(node.input[2]) or [])
        return list((ctx.ax(node.output[0]) if node.output else None) or [])

    def _node_spaces(self, name: str) -> frozenset:
        """Spaces whose pruning can change this node's cost."""
        if name not in self._spaces:
            table = self.analysis.table
            self._spaces[name] = frozenset(sid for e in self._cost_axes(name) for sid, _ in table.coords(e))
        return self._spaces[name]

    def node_ratio(self, name: str, keep: dict) -> float:
        if not self._node_spaces(name) & keep.keys():
            return 1.0  # none of its channels are pruned by this plan
        layer = self.layers.get(name)
        if layer is not None:
            return self._timed_ratio(layer, keep)
        node = self.nodes[name]
        if node.op_type in VIEW_OPS:
            return 1.0
        if _fused_attention(node):
            # Q K' scales with the query heads x their size, the weighted sum of V with the
            # output's heads x value size; each about half of the kernel's time
            ax = self.analysis.ctx.ax
            return 0.5 * (self._kept_fraction(("attention Q", name), lambda: ax(node.input[0]), keep)
                          + self._kept_fraction(("node", name), lambda: ax(node.output[0]), keep))
        if recurrent_weight(node):
            # a recurrent layer: its time goes to the products with W and R at every step
            ax, shape = self.analysis.ctx.ax, self.analysis.ctx.shape
            w, r = node.input[1], node.input[2]
            sizes = [float(np.prod(shape(t))) for t in (w, r)]
            kept = [self._kept_fraction((f"recurrent {t}", name), lambda t=t: ax(t), keep) for t in (w, r)]
            return (sizes[0] * kept[0] + sizes[1] * kept[1]) / (sizes[0] + sizes[1])
        # kept share of the elements (output) or of the multiply-adds (an attention MatMul not timed)
        return self._kept_fraction(("node", name), lambda: self._cost_axes(name), keep)

    def _timed_ratio(self, layer: TimedLayer, keep: dict) -> float:
        """A timed node's time under the plan, relative to the dense model's, from the database."""
        widths = tuple(layer.widths(keep))
        memo = (layer.node, widths)
        if memo not in self._memo:  # the database is fixed: one estimate per widths
            full = self.db.estimate(layer.sig, layer.sig.full, layer.grids)
            pruned = self.db.estimate(layer.sig, widths, layer.grids)
            # the database's times hold the profiler's cost per kernel too, which the dense
            # kernels' times here have had taken off (the zoo's ViT at batch 2: kernels of 5-10
            # µs, 3.5 µs of it the profiler's, so the times' ratio hid a third of the saving), and
            # whatever else the database spends on every point (_database_floor)
            off = min(max(self.profiler_us, self.db_floor_us), 0.5 * min(full, pruned))
            self._memo[memo] = (pruned - off) / (full - off) if full else 1.0
        return self._memo[memo]

    def _terms(self, plan: dict):
        """The plan's latency as fixed_ms + sum(scaled_ms * ratios ** gamma)."""
        keep = self.analysis.keep_arrays(plan)
        ratios = {}
        fixed_ms = self.overhead_ms
        scaled, kept = [], []
        for kname, kernel in self.profile.kernels.items():
            t = max(kernel.time_us - self.profiler_us - self.trim_us.get(kname, 0.0), 0.0) / 1e3
            src = self.kernel_nodes[kname]
            if kname in self.kernel_layers:
                ratio = self._timed_ratio(self.kernel_layers[kname], keep)
            elif src is None:
                ratio = self._reorder_ratio(kname, keep)
            else:
                if src not in ratios:
                    ratios[src] = self.node_ratio(src, keep)
                ratio = ratios[src]
                if src not in self.layers:  # measured layers already include their launch cost
                    fixed = min(self.fixed_us / 1e3, t)
                    fixed_ms += fixed
                    t -= fixed
            scaled.append(t)
            kept.append(ratio)
        fixed_ms += sum(self._exit_reorder_ms(name, keep) for name in self.block_exits)
        return fixed_ms, np.array(scaled), np.maximum(np.array(kept), 1e-9)

    def predict_ms(self, plan: dict) -> float:
        fixed_ms, scaled, ratios = self._terms(plan)
        return float(fixed_ms + (scaled * ratios ** self.gamma).sum())

    def predicted_speedup(self, plan: dict) -> float:
        return self.dense_ms / self.predict_ms(plan)

    def calibrate(self, plan: dict, measured_speedup: float, bounds=(0.5, 2.0)) -> float:
        """Fit gamma so that `plan` predicts the speedup measured end to end, and return it.

        Kernels measured alone, cold, miss what a pruned graph changes around them: activations
        that now stay in cache make it faster than its kernels say (gamma > 1); fixed costs per
        kernel that pruning does not touch make it slower (gamma < 1, small models). One measured
        plan fits that exponent for the whole model; the dense latency does not depend on it."""
        fixed_ms, scaled, ratios = self._terms(plan)
        goal_ms = self.dense_ms / measured_speedup
        lo, hi = bounds
        for _ in range(40):  # the predicted time falls as gamma grows (ratios <= 1)
            mid = (lo + hi) / 2
            if fixed_ms + (scaled * ratios ** mid).sum() > goal_ms:
                lo = mid
            else:
                hi = mid
        self.gamma = (lo + hi) / 2
        return self.gamma

    def candidate_widths(self) -> dict:
        """Per group, the widths worth choosing: clearly faster than every wider width on the
        measured curves of the group's own weight layers (the hardware's fast grid, not an assumed
        one). Only the layers: counting the other kernels a group touches (activations, concats)
        in proportion to its width re-admitted the off-block widths of conv chains, whose layout
        changes a lone-layer measurement cannot see -- on the zoo's small CNNs, plans that measured
        up to 30% slower than predicted (where the layers alone keep them within 10-15%)."""
        grid = {g.sid: self.group_grids[g.sid] for g in self.analysis.groups}
        cost = {sid: np.zeros(len(widths)) for sid, widths in grid.items()}
        used = set()  # groups some layer reads
        size = {g.sid: g.size for g in self.analysis.groups}
        for layer in [*self.layers.values(), *self.kernel_layers.values()]:
            for axis, coords in enumerate(layer.coords):
                curve = self.db.curve(layer.sig, axis, layer.grids[axis])
                n = layer.sig.full[axis]
                for sid in dict.fromkeys(s for s, _ in coords):
                    if sid in cost:
                        # the axis's width with this group at each width, the others full (a
                        # product or concatenation of groups is wider than the group)
                        at = [_kept_width(coords, {sid: np.arange(size[sid]) < w}, n) for w in grid[sid]]
                        cost[sid] = cost[sid] + np.interp(at, layer.grids[axis], curve)
                        used.add(sid)
        return {g.name: fast_widths(grid[g.sid], cost[g.sid]) if g.sid in used else grid[g.sid]
                for g in self.analysis.groups}


def _loop_trim(kernels: dict, excess_us: float, profiler_us: float) -> dict:
    """µs to take off each Loop and Scan kernel (in proportion to its time): the kernels' excess
    over a plain run left after the profiler's cost per kernel, at most all of their time."""
    loops = {k: max(kern.time_us - profiler_us, 0.0) for k, kern in kernels.items() if kern.op in ("Loop", "Scan")}
    total = sum(loops.values())
    if excess_us <= 0 or not total:
        return {}
    return {k: min(excess_us, total) * t / total for k, t in loops.items()}


def _weighted(sig) -> bool:
    """Whether a timed node is a weight layer (not an op without weights, nor a pool's chain)."""
    return sig.op not in ACTIVATION_OPS and sig.op not in POOL_CHAIN_OPS


# what ORT fuses into the conv before it (its blocked kernel writes their output)
FUSED_INTO_CONV = ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh")


def _pool_chain(node, timed: dict, analysis: Analysis, nodes: dict, by_output: dict):
    """(signature, axes) of a pool timed as conv -> pool -> conv (timing.POOL_CHAIN_OPS): its input
    written by a conv (through a BatchNormalization or activation ORT fuses into it) and read by
    nothing else, its output read only by convs. None otherwise, or where its channels cannot be
    pruned."""
    ctx = analysis.ctx
    sig = pool_chain_sig(node, ctx.index)
    if sig is None:
        return None
    axes = ctx.ax(node.input[0])
    if not axes or not analysis.table.coords(axes[1]):
        return None
    is_conv = lambda n: n in timed and timed[n][0].op in CONVS  # noqa: E731
    consumers = ctx.index.consumers
    value, src = node.input[0], by_output.get(node.input[0])
    while src is not None and not is_conv(src):  # up through what is fused, each read once
        if nodes[src].op_type not in FUSED_INTO_CONV or len(consumers.get(value, [])) != 1:
            return None
        value = nodes[src].input[0]
        src = by_output.get(value)
    readers = consumers.get(node.output[0], [])
    # `value` is now the conv's output: read by the pool or the first fused op only
    if src is None or len(consumers.get(value, [])) != 1 or not readers \
            or any(i != 0 or not is_conv(n.name) for n, i in readers):
        return None
    return sig, (analysis.table.norm(axes[1]),)


def _activation_sig(node, analysis: Analysis):
    """(signature, axis expressions) of an op without weights that the database times, or
    (None, None): an attention MatMul (no constant operand) or a Transpose whose inputs carry
    prunable channels."""
    ctx = analysis.ctx
    values = {"MatMul": node.input[:2], "Transpose": node.input[:1]}.get(node.op_type)
    if values is None or any(ctx.is_const(v) for v in values):
        return None, None
    perm = attr(node, "perm") if node.op_type == "Transpose" else None
    return _sig_of_inputs(node.op_type, [(ctx.ax(v), ctx.shape(v)) for v in values], analysis, perm)


def _sig_of_inputs(op_type, inputs, analysis: Analysis, perm=None):
    """activation_sig from each input's (axis expressions, shape); equal channel expressions on
    two inputs are one axis (the heads of Q and K')."""
    table = analysis.table
    dims, exprs = [], []  # per input its dims; the distinct prunable expressions, in order
    for axes, shape in inputs:
        if axes is None or shape is None or len(axes) != len(shape) or None in shape or 0 in shape:
            return None, None  # unknown, or empty (a key/value cache given empty): nothing to time
        per_input = []
        for e, d in zip(axes, shape):
            e = table.norm(e)
            if table.coords(e):
                if e not in exprs:
                    exprs.append(e)
                per_input.append((int(d), e))
            else:
                per_input.append(int(d))
        dims.append(per_input)
    if op_type == "MatMul" and len(dims) == 2:
        dims = _tie_matmul_dims(dims)
        exprs = list(dict.fromkeys(d[1] for per_input in dims for d in per_input if isinstance(d, tuple)))
    if op_type == "Transpose" and not perm:
        perm = list(range(len(dims[0])))[::-1]
    sig = activation_sig(op_type, dims, perm)
    return (sig, tuple(exprs)) if sig is not None else (None, None)


def _tie_matmul_dims(dims):
    """The two operands' dims that MatMul needs equal (A's last and B's second to last, and the
    batch dims both have, aligned from the right) made one axis of the signature: the timing
    database shrinks each axis alone, and two expressions of the same channels would give it
    operands it cannot multiply (DeBERTa's scores carry batch x heads from the batch's size, its
    values from a constant 2)."""
    def size(d):
        return d[0] if isinstance(d, tuple) else d

    a, b = (list(d) for d in dims)
    pairs = [(len(a) - 1, len(b) - 2)] + [(len(a) - k, len(b) - k) for k in range(3, min(len(a), len(b)) + 1)]
    for i, j in pairs:
        if i < 0 or j < 0:
            continue
        x, y = a[i], b[j]
        if size(x) != size(y) or not (isinstance(x, tuple) or isinstance(y, tuple)):
            continue
        key = x[1] if isinstance(x, tuple) else y[1]
        gone = {d[1] for d in (x, y) if isinstance(d, tuple) and d[1] != key}
        a, b = ([(d[0], key) if isinstance(d, tuple) and d[1] in gone else d for d in ops] for ops in (a, b))
        a[i], b[j] = (size(x), key), (size(y), key)
    return [a, b]


def _group_grids(analysis: Analysis, axis_coords) -> dict:
    """Per group, the widths to measure and choose from: on the hardware's channel grid as the
    group's layers see it. A group whose every channel spans a run of positions on the axes it
    shares (an attention head: head-size contiguous columns of the Q, K, V and output
    projections) keeps that many columns per unit, so any count of heads stays on the grid; a
    width grid over the count itself (8 or 12 of 12 heads) would never drop more than a third."""
    span = {}
    for coords in axis_coords:
        for sid, c in coords:
            span[sid] = min(span.get(sid, c.size), _shortest_run(c))
    return {g.sid: width_grid(g.size, span=span.get(g.sid, 1)) for g in analysis.groups}


def _shortest_run(c: np.ndarray) -> int:
    """The shortest run of equal channel indices (-1: positions of other groups, not counted)."""
    edges = np.flatnonzero(np.diff(c)) + 1
    starts, ends = np.r_[0, edges], np.r_[edges, c.size]
    runs = (ends - starts)[c[starts] >= 0]
    return int(runs.min()) if runs.size else 1


def _fused_head(name, op, nodes, by_output):
    """A fused kernel (Conv+Add+Relu) carries the name of its last node; its cost is the
    node of the kernel's own op type a few steps upstream."""
    if name is None or op not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
        return name
    return _upstream(name, lambda n: nodes[n].op_type == op, nodes, by_output) or name


def _fused_outputs(node, index) -> list:
    """A conv's output, then each output of the FUSED_INTO_CONV chain that alone reads it."""
    values = [node.output[0]]
    while len(readers := index.consumers.get(values[-1], [])) == 1 and readers[0][0].op_type in FUSED_INTO_CONV:
        values.append(readers[0][0].output[0])
    return values


def _upstream(name, wanted, nodes, by_output, depth=3):
    """The nearest node at or up to `depth` steps above `name` (breadth first, inputs in order)
    for which `wanted(node name)` holds, or None."""
    frontier = [name] if name is not None else []
    for _ in range(depth + 1):
        for n in frontier:
            if wanted(n):
                return n
        frontier = [src for n in frontier for i in nodes[n].input
                    if (src := by_output.get(i)) is not None]
    return None


def _source_node(kernel_name: str, nodes: dict, by_output: dict):
    """The graph node a kernel came from: ORT keeps its name or its output's name, sometimes
    with a suffix (`_nchwc`), and a node it fused ("fused n16": a Gemm and its Relu) a prefix."""
    name = kernel_name.removeprefix("fused ")
    while True:
        if name in nodes:
            return name
        if name in by_output:
            return by_output[name]
        cut = max(name.rfind("_"), name.rstrip("/").rfind("/"))
        if cut <= 0:
            return None
        name = name[:cut]
