"""Sparsity patterns as data: which weights may be pruned, masks for each pattern, and output.

A mask is a boolean tensor shaped like its weight (True = kept). Patterns:

- unstructured: any weight, budget per layer or from one global magnitude sort;
- N:M: at most N nonzero weights in every run of M consecutive weights along the weight's
  *input-channel* axis (what sparse kernels need);
- channel: per dependency group of the analysis, a channel mask (float, so soft masks work);
  it acts on every tensor of the group exactly like `verify.masked_reference`, and becomes a plan
  (kept indices per group) for surgery;
- filter / shape (StructADMM): whole output rows / whole input columns of one layer's GEMM view.

Training (passes/methods) only changes which masks are chosen; writing and reporting live here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import prod

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnx_prune.passes.analysis import WEIGHT_OPS
from onnx_prune.passes.graph import FLOAT_TYPES, all_nodes
from onnx_prune.passes.rules import recurrent_weight


# -- which weights ----------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightInfo:
    op: str
    in_axis: int
    out_axis: int
    shape: tuple
    node: str = ""
    groups: int = 1  # Conv group count (N:M runs stay inside one group's input channels)


@dataclass(frozen=True)
class Pattern:
    kind: str  # unstructured | nm | channel | filter | shape
    n: int = 0
    m: int = 0

    def __str__(self):
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


KINDS = ("unstructured", "nm", "channel", "filter", "shape")


def parse_pattern(p) -> Pattern:
    """'unstructured', 'channel', 'filter', 'shape' (alias 'column'), 'N:M' or ('nm', N, M)."""
    if isinstance(p, Pattern):
        return p
    if isinstance(p, (tuple, list)):
        return parse_pattern(":".join(str(x) for x in p if x != "nm"))
    s = str(p).strip().lower()
    s = {"column": "shape", "columns": "shape", "filters": "filter", "channels": "channel"}.get(s, s)
    if s in KINDS and s != "nm":
        return Pattern(s)
    parts = s.removeprefix("nm:").split(":")
    if len(parts) == 2 and all(x.isdigit() for x in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return Pattern("nm", n, m)
    raise ValueError(f"unknown sparsity pattern {p!r} (choose: unstructured, N:M such as 2:4, channel, filter, shape)")


def prunable_weights(model: onnx.ModelProto, skip_first=False, skip_last=False) -> dict[str, WeightInfo]:
    """Float weight initializers of Conv/ConvTranspose/Gemm/MatMul and of recurrent layers, in
    graph order, with the axes a mask reasons about. Conv (O, I/g, k..); ConvTranspose (I, O/g,
    k..); Gemm B (K, N), or (N, K) with transB; MatMul B (.., K, N); LSTM/GRU/RNN W and R
    (directions, gates x hidden, input or hidden). A weight used by several layers counts once;
    layers inside If, Loop and Scan bodies count, reading the main graph's weights."""
    inits = {t.name: t for t in model.graph.initializer}
    for s in model.graph.sparse_initializer:  # headers only: name, type, dims
        t = onnx.TensorProto(name=s.values.name, data_type=s.values.data_type, dims=s.dims)
        inits[t.name] = t
    out: dict[str, WeightInfo] = {}
    for node in all_nodes(model.graph):
        if recurrent_weight(node):  # W (directions, gates x hidden, input) and R (.., hidden)
            for w in node.input[1:3]:
                t = inits.get(w)
                if t is not None and t.data_type in FLOAT_TYPES and w not in out:
                    out[w] = WeightInfo(node.op_type, 2, 1, tuple(int(d) for d in t.dims), node.name)
            continue
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        w = node.input[1]
        t = inits.get(w)
        if t is None or t.data_type not in FLOAT_TYPES or w in out or len(t.dims) < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        shape = tuple(int(d) for d in t.dims)
        if node.op_type == "Conv":
            in_axis, out_axis = 1, 0
        elif node.op_type == "ConvTranspose":
            in_axis, out_axis = 0, 1
        elif node.op_type == "Gemm":
            in_axis, out_axis = (1, 0) if attrs.get("transB", 0) else (0, 1)
        else:
            in_axis, out_axis = len(shape) - 2, len(shape) - 1
        out[w] = WeightInfo(node.op_type, in_axis, out_axis, shape, node.name, int(attrs.get("group", 1)))
    names = list(out)
    drop = ([names[0]] if skip_first and names else []) + ([names[-1]] if skip_last and names else [])
    return {k: v for k, v in out.items() if k not in drop}


# -- budgets and top-k -------------------------------------------------------------------------

def keep_top(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask with exactly `n_keep` True at the highest scores (ties: lower flat index)."""
    flat = score.detach().reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:int(n_keep)]] = True
    return mask.reshape(score.shape)


def split_counts(total: int, sizes: dict, scores: dict) -> dict:
    """Distribute `total` pruned units over layers by one global sort of their scores."""
    names = list(sizes)
    if not names:
        return {}
    flat = torch.cat([scores[k].detach().reshape(-1).float() for k in names])
    owner = torch.cat([torch.full((sizes[k],), i, dtype=torch.long) for i, k in enumerate(names)])
    order = torch.argsort(flat, stable=True)[:int(total)]
    counts = torch.bincount(owner[order], minlength=len(names))
    return {k: int(c) for k, c in zip(names, counts)}


def layer_budgets(weights: dict, sparsity, scope="global") -> dict[str, int]:
    """Number of weights to prune per layer. `sparsity` a float (global: one magnitude sort over
    all layers, so the total is exact; layer: the same share everywhere) or a dict per layer."""
    sizes = {k: w.numel() for k, w in weights.items()}
    if isinstance(sparsity, dict):
        return {k: int(round(float(sparsity.get(k, 0.0)) * sizes[k])) for k in weights}
    _check_fraction(sparsity)
    if scope == "layer":
        return {k: int(round(sparsity * n)) for k, n in sizes.items()}
    if scope != "global":
        raise ValueError(f"unknown scope {scope!r} (choose: global, layer)")
    total = int(round(sparsity * sum(sizes.values())))
    return split_counts(total, sizes, {k: w.detach().abs() for k, w in weights.items()})


def _check_fraction(s):
    if not 0.0 <= float(s) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {s}")


# -- unstructured and N:M ----------------------------------------------------------------------

def unstructured_masks(weights: dict, sparsity, scope="global") -> dict[str, torch.Tensor]:
    """Keep the largest |w|; exactly round(sparsity * size) pruned (per layer, or in total)."""
    budgets = layer_budgets(weights, sparsity, scope)
    return {k: keep_top(w.detach().abs(), w.numel() - budgets[k]) for k, w in weights.items()}


def nm_view(t: torch.Tensor, axis: int, m: int) -> torch.Tensor:
    """(..., runs, m): the runs of m consecutive entries along `axis`."""
    x = t.movedim(axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def nm_unview(x: torch.Tensor, shape, axis: int) -> torch.Tensor:
    moved = list(shape)
    moved.append(moved.pop(axis))
    return x.reshape(moved).movedim(-1, axis)


def nm_mask(w: torch.Tensor, n: int, m: int, axis: int, score=None) -> torch.Tensor:
    """Top-n of `score` (default |w|) in every run of m along `axis`."""
    v = nm_view((score if score is not None else w).detach().abs(), axis, m)
    idx = torch.topk(v, n, dim=-1).indices
    keep = torch.zeros_like(v, dtype=torch.bool).scatter_(-1, idx, True)
    return nm_unview(keep, w.shape, axis)


def nm_layers(infos: dict, names, m: int, on_indivisible="error") -> list[str]:
    """Layers whose input-channel axis splits into runs of m; the others raise or stay dense."""
    ok, bad = [], []
    for k in names:
        (ok if infos[k].shape[infos[k].in_axis] % m == 0 else bad).append(k)
    if bad:
        desc = ", ".join(f"{k} ({infos[k].shape[infos[k].in_axis]} input channels)" for k in bad)
        if on_indivisible == "error":
            raise ValueError(f"N:M with M={m} needs input channels divisible by {m}: {desc}")
        if on_indivisible != "dense":
            raise ValueError(f"on_indivisible must be 'error' or 'dense', got {on_indivisible!r}")
        warnings.warn(f"left dense (input channels not divisible by {m}): {desc}", stacklevel=3)
    return ok


def nm_masks(weights: dict, infos: dict, n: int, m: int, on_indivisible="error") -> dict[str, torch.Tensor]:
    """Top-n |w| in every run of m consecutive weights along the input-channel axis. Layers
    whose axis is not divisible by m raise, or with on_indivisible='dense' are left out (dense)."""
    names = nm_layers(infos, list(weights), m, on_indivisible)
    return {k: nm_mask(weights[k], n, m, infos[k].in_axis) for k in names}


def check_nm(mask, n: int, m: int, axis: int, exact=False) -> bool:
    """At most (exact: exactly) n nonzeros in every run of m along `axis`."""
    t = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask))
    if t.shape[axis] % m:
        return False
    counts = (nm_view(t != 0, axis, m)).sum(-1)
    return bool((counts == n).all() if exact else (counts <= n).all())


# -- filter / shape (rows and columns of the GEMM view) ----------------------------------------

def slice_norms(w: torch.Tensor, axis: int) -> torch.Tensor:
    """L2 norm of every slice along `axis` (filters when axis is the output axis)."""
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).norm(dim=1)


def column_norms(w: torch.Tensor, out_axis: int) -> torch.Tensor:
    """L2 norm over the output axis: one value per GEMM column (input channel x kernel position)."""
    return w.norm(dim=out_axis)


def filter_mask(w: torch.Tensor, n_keep: int, out_axis: int, score=None) -> torch.Tensor:
    keep = keep_top(score if score is not None else slice_norms(w, out_axis), n_keep)
    return keep.reshape([-1 if j == out_axis else 1 for j in range(w.dim())]).expand(w.shape)


def shape_mask(w: torch.Tensor, n_keep: int, out_axis: int, score=None) -> torch.Tensor:
    keep = keep_top(score if score is not None else column_norms(w, out_axis), n_keep)
    return keep.unsqueeze(out_axis).expand(w.shape)


# -- channel groups ----------------------------------------------------------------------------

class ChannelMap:
    """Where each group's channels sit: on every axis of every tensor and initializer, the
    group channel index at each position (-1 elsewhere), from the analysis' space table.
    Built once per analysis; cheap to evaluate against changing (soft) group masks."""

    def __init__(self, analysis):
        self.analysis = analysis
        self.sizes = {g.name: g.size for g in analysis.groups}
        self.names = {g.sid: g.name for g in analysis.groups}
        self._coords: dict[str, list] = {}
        ctx, index = analysis.ctx, analysis.ctx.index
        self.values = []  # the activations masked_reference masks (its recurrent R: recurrent_weight_hooks)
        for name, axes in ctx.axes.items():
            if axes is None or name in index.inits or name in index.graph_inputs:
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(index.dtypes.get(name) or onnx.TensorProto.FLOAT)
            if np.issubdtype(dtype, np.number) and self.coords(name):
                self.values.append(name)

    def coords(self, name) -> list[tuple[int, str, torch.Tensor]]:
        """(axis, group, channel index per position) for every group coordinate of a tensor."""
        if name not in self._coords:
            ctx = self.analysis.ctx
            axes = ctx.axes.get(name)
            if axes is None and name in ctx.index.inits:
                axes = ctx.ax(name)
            out = []
            for k, e in enumerate(axes or ()):
                for sid, c in self.analysis.table.coords(e):
                    if sid in self.names:
                        out.append((k, self.names[sid], torch.as_tensor(c, dtype=torch.long)))
            self._coords[name] = out
        return self._coords[name]

    def multipliers(self, name, group_masks: dict) -> list[tuple[int, torch.Tensor]]:
        """Per axis, the product of the masks of the groups on it (1 where no group sits)."""
        per_axis: dict[int, torch.Tensor] = {}
        for axis, grp, c in self.coords(name):
            gm = group_masks.get(grp)
            if gm is None:
                continue
            gm = torch.as_tensor(gm)
            gm = gm.to(torch.get_default_dtype()) if not gm.is_floating_point() else gm
            v = torch.where(c >= 0, gm[c.clamp(min=0)], torch.ones((), dtype=gm.dtype))
            per_axis[axis] = per_axis[axis] * v if axis in per_axis else v
        return sorted(per_axis.items())

    def apply(self, x: torch.Tensor, parts) -> torch.Tensor:
        for axis, mult in parts:
            shape = [-1 if j == axis else 1 for j in range(x.dim())]
            mult = mult.to(x.device)
            if x.is_floating_point():
                m = mult.to(x.dtype).reshape(shape)
                y = x * m
                # removed channels are exact zeros even where x is inf/nan (x / masked zero), as
                # the reference's Where gives
                x = torch.where(m == 0, torch.zeros((), dtype=x.dtype, device=x.device), y) if (m == 0).any() else y
            else:  # integer tensors: only hard masks make sense
                x = torch.where(mult.reshape(shape) > 0.5, x, torch.zeros((), dtype=x.dtype))
        return x

    def producer_groups(self, names) -> set[str]:
        """Groups whose channels are created by (a producer slice of) one of `names`."""
        out = set()
        for init in names:
            axes = {a for a, role, _n in self.analysis.ctx.roles.get(init, ()) if role == "producer"}
            out.update(g for a, g, _c in self.coords(init) if a in axes)
        return out

    def scores(self, weights: dict, roles=("producer",), names=None) -> dict[str, torch.Tensor]:
        """Per group, the L2 norm over the weight slices of each channel (by default the
        producers' output channels). Differentiable in `weights`; initializers missing from
        `weights` are read from the analysed model."""
        ctx = self.analysis.ctx
        sq = {g: None for g in self.sizes}
        for init, uses in ctx.roles.items():
            if names is not None and init not in names:
                continue
            w = weights.get(init)
            if w is None:
                arr = ctx.index.const(init)
                if arr is None or not np.issubdtype(arr.dtype, np.floating):
                    continue
                w = torch.from_numpy(np.array(arr, dtype=np.float32))
            for axis, role, _node in uses:
                if role not in roles:
                    continue
                per_pos = (w.movedim(axis, 0).reshape(w.shape[axis], -1) ** 2).sum(1)
                for ax, grp, c in self.coords(init):
                    if ax != axis:
                        continue
                    sel = c >= 0
                    add = torch.zeros(self.sizes[grp], dtype=per_pos.dtype, device=per_pos.device)
                    add = add.index_add(0, c[sel].to(per_pos.device), per_pos[sel])
                    sq[grp] = add if sq[grp] is None else sq[grp] + add
        return {g: (s if s is not None else torch.zeros(self.sizes[g])).clamp(min=0).sqrt() for g, s in sq.items()}


def channel_map(analysis) -> ChannelMap:
    cm = analysis.__dict__.get("_channel_map")
    if cm is None:
        cm = analysis.__dict__["_channel_map"] = ChannelMap(analysis)
    return cm


def channel_scores(analysis, weights: dict, roles=("producer",)) -> dict[str, torch.Tensor]:
    """Per group: L2 norm of every channel over its producers' output slices (differentiable)."""
    return channel_map(analysis).scores(weights, roles)


def channel_masks(scores: dict, sparsity, scope="layer", total=None) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring channels: round(sparsity * size) pruned in every group (layer),
    or the lowest scores overall after dividing each group by its mean (global; `total` pruned
    if given). Every group keeps at least one channel (surgery cannot remove a whole group)."""
    sizes = {g: s.numel() for g, s in scores.items()}
    if isinstance(sparsity, dict):
        counts = {g: int(round(float(sparsity.get(g, 0.0)) * n)) for g, n in sizes.items()}
    elif scope == "layer":
        _check_fraction(sparsity)
        counts = {g: int(round(sparsity * n)) for g, n in sizes.items()}
    elif scope == "global":
        _check_fraction(sparsity)
        # pruned channels may carry a negative score; they stay lowest after normalising
        normed = {g: s.detach() / s.detach().clamp(min=0).mean().clamp(min=1e-12) for g, s in scores.items()}
        if total is None:
            total = int(round(sparsity * sum(sizes.values())))
        counts = split_counts(total, sizes, normed)
    else:
        raise ValueError(f"unknown scope {scope!r} (choose: global, layer)")
    return {g: keep_top(s.detach(), max(1, sizes[g] - counts[g])) for g, s in scores.items()}


class ValueMask:
    """A value hook: multiplies a tensor by its groups' channel masks along their axes."""

    def __init__(self, cmap: ChannelMap, name: str, parts):
        self.cmap, self.name, self.parts = cmap, name, parts

    def __call__(self, x):
        return self.cmap.apply(x, self.parts)


class DynamicValueMask:
    """A value hook reading the current group masks from `get_masks()` at every call."""

    def __init__(self, cmap: ChannelMap, name: str, get_masks):
        self.cmap, self.name, self.get_masks = cmap, name, get_masks

    def __call__(self, x):
        return self.cmap.apply(x, self.cmap.multipliers(self.name, self.get_masks()))


def group_value_masks(analysis, group_masks: dict) -> dict[str, ValueMask]:
    """Per activation tensor, its (axis, multiplier) parts and a callable applying them: the
    masked reference's mapping (every non-initializer tensor carrying a group's channels), with
    float multipliers. Hard 0/1 masks give exactly `verify.masked_reference`; soft masks compound
    along a chain (a channel passing k masked tensors is scaled by m^k) and agree at 0 and 1."""
    cm = channel_map(analysis)
    out = {}
    for name in cm.values:
        parts = cm.multipliers(name, group_masks)
        if parts:
            out[name] = ValueMask(cm, name, parts)
    return out


def dynamic_value_hooks(analysis, get_masks) -> dict[str, DynamicValueMask]:
    """Like group_value_masks, for masks that change during training."""
    cm = channel_map(analysis)
    return {name: DynamicValueMask(cm, name, get_masks) for name in cm.values}


def recurrent_weight_hooks(analysis, get_masks) -> dict[str, DynamicValueMask]:
    """Weight hooks masking the recurrence weights R of LSTM, GRU and RNN layers: inside the node a
    hidden unit feeds the next step through R's column, where no value hook reaches (with hard
    masks, what `verify.masked_reference` does to R)."""
    cm = channel_map(analysis)
    names = {r for r in map(recurrent_weight, analysis.model.graph.node) if r}
    return {name: DynamicValueMask(cm, name, get_masks) for name in sorted(names) if analysis.ctx.axes.get(name)}


def group_weight_masks(analysis, group_masks: dict, names, roles=None) -> dict[str, torch.Tensor]:
    """Boolean masks of initializers `names`: False where a removed channel sits on any axis
    (with `roles`, e.g. ("producer",), only on the axes the initializer plays that role on)."""
    cm = channel_map(analysis)
    out = {}
    for name in names:
        shape = tuple(analysis.ctx.index.shapes.get(name) or ())
        parts = cm.multipliers(name, {g: torch.as_tensor(m).bool().float() for g, m in group_masks.items()})
        if roles is not None:
            axes = {a for a, role, _n in analysis.ctx.roles.get(name, ()) if role in roles}
            parts = [(a, v) for a, v in parts if a in axes]
        if not parts:
            continue
        keep = torch.ones(shape, dtype=torch.bool)
        for axis, mult in parts:
            keep = keep & (mult > 0.5).reshape([-1 if j == axis else 1 for j in range(len(shape))])
        out[name] = keep
    return out


def channel_plan(analysis, group_masks: dict) -> dict[str, np.ndarray]:
    """{group: kept indices} for every group that loses channels (mask > 0.5 is kept)."""
    plan = {}
    sizes = {g.name: g.size for g in analysis.groups}
    for g, m in group_masks.items():
        keep = np.flatnonzero(torch.as_tensor(m).detach().float().cpu().numpy() > 0.5)
        if keep.size == 0:
            raise ValueError(f"channel mask removes every channel of group '{g}'")
        if keep.size < sizes[g]:
            plan[g] = keep
    return plan


# -- output ------------------------------------------------------------------------------------

def _np(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy().astype(bool)
    return np.asarray(mask).astype(bool)


def weight_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer as a dense array, sparse initializers included."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for s in model.graph.sparse_initializer:
        out[s.values.name] = _densify(s)
    return out


def _densify(s: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(s.values)
    idx = numpy_helper.to_array(s.indices).astype(np.int64)
    dense = np.zeros(prod(s.dims), dtype=values.dtype)
    if idx.ndim == 2:  # [nnz, rank] coordinates
        idx = np.ravel_multi_index(tuple(idx.T), tuple(s.dims))
    dense[idx] = values
    return dense.reshape(tuple(s.dims))


def write_sparse(model: onnx.ModelProto, masks: dict, sparse_initializers=False) -> onnx.ModelProto:
    """A copy of `model` with exact (+0.0) zeros where masks are False. With sparse_initializers,
    masked weights that get smaller that way (values + int64 linear indices, so below 1/3
    density for float32) move to graph.sparse_initializer; ONNX Runtime densifies them at load."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    missing = [k for k in masks if k not in inits]
    if missing:
        raise KeyError(f"no dense initializer named {missing}")
    keep_dense = []
    sparse = []
    for t in g.initializer:
        if t.name not in masks:
            keep_dense.append(t)
            continue
        arr = numpy_helper.to_array(t)
        mask = _np(masks[t.name])
        if mask.shape != arr.shape:
            raise ValueError(f"mask for '{t.name}' has shape {mask.shape}, weight has {arr.shape}")
        arr = np.where(mask, arr, np.zeros((), arr.dtype)).astype(arr.dtype)
        nz = np.flatnonzero(arr)
        if sparse_initializers and nz.size * (arr.itemsize + 8) < arr.nbytes and nz.size > 0:
            values = numpy_helper.from_array(arr.reshape(-1)[nz], t.name)
            indices = numpy_helper.from_array(nz.astype(np.int64), f"{t.name}__indices")
            sparse.append(onnx.helper.make_sparse_tensor(values, indices, list(arr.shape)))
        else:
            keep_dense.append(numpy_helper.from_array(arr, t.name))
    del g.initializer[:]
    g.initializer.extend(keep_dense)
    g.sparse_initializer.extend(sparse)
    return out


def sparsity_report(model: onnx.ModelProto, masks: dict, nm=None) -> dict:
    """Per layer and in total: kept/pruned counts from the masks, zeros actually in the model's
    weights, whether the weights respect their mask, and with nm=(N, M) whether every masked
    layer is N:M along its input-channel axis (checked on the weights as written)."""
    arrays = weight_arrays(model)
    infos = prunable_weights(model) if nm else {}
    if nm:
        n, m = (nm.n, nm.m) if isinstance(nm, Pattern) else nm
    layers, size, kept, zeros = {}, 0, 0, 0
    for name, mask in masks.items():
        mask = _np(mask)
        w = arrays[name]
        row = {"shape": list(w.shape), "size": int(w.size), "kept": int(mask.sum()),
               "sparsity": float(1.0 - mask.sum() / max(w.size, 1)), "zeros": int((w == 0).sum()),
               "mask_respected": bool(np.all(w[~mask] == 0))}
        if nm:
            info = infos.get(name)
            row["nm_ok"] = bool(info is not None and check_nm(w, n, m, info.in_axis))
        layers[name] = row
        size, kept, zeros = size + row["size"], kept + row["kept"], zeros + row["zeros"]
    total = {"size": size, "kept": kept, "sparsity": float(1.0 - kept / max(size, 1)),
             "weight_sparsity": float(zeros / max(size, 1)),
             "mask_respected": all(r["mask_respected"] for r in layers.values())}
    report = {"layers": layers, "total": total}
    if nm:
        report["nm"] = f"{n}:{m}"
        total["nm_ok"] = all(r["nm_ok"] for r in layers.values())
    return report
