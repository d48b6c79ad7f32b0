"""Channel dependency analysis: run the op rule table over a canonical graph and collect groups.

The result (`Analysis`) knows, for every tensor axis, which channels it carries; for every
initializer axis, which channels slice it; and the few non-weight edits pruning needs (Reshape
targets, Split sizes, Slice bounds, Conv group counts). Surgery and the masked reference both
evaluate these against a plan, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_prune.passes.graph import GraphIndex
from onnx_prune.passes.spaces import Free, Fx, SpaceTable, Unsupported

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # layers whose weight is input 1


@dataclass
class Group:
    """A prunable set of channels: pruning index i removes it from every tensor of the group."""

    sid: int
    name: str
    size: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)


@dataclass
class FrozenGroup:
    name: str
    size: int
    reason: str


@dataclass
class ValueEdit:
    """Set element `pos` of constant `init` to the kept count of `exprs` (summed) plus `offset`."""

    init: str
    pos: int
    exprs: list
    offset: int = 0


@dataclass
class AttrEdit:
    """Set integer attribute `attr` of `node` to the kept count of `expr`; or, with `value`, set
    the float attribute to that fixed value (added if the node leaves it to its default)."""

    node: str
    attr: str
    expr: object
    value: float | None = None


@dataclass
class SplitEdit:
    """Rewrite a Split's sizes as the kept counts of its pieces (adds a `split` input if needed)."""

    node: str
    pieces: list


@dataclass
class MeanEdit:
    """A ReduceMean over channels a plan prunes: its output is rescaled by kept/full of `exprs` so
    that it still divides by the dense count, as the masked reference (zeros included) does."""

    node: str
    exprs: list
    dtype: int  # the output's ONNX element type, for the scale


@dataclass
class NormEdit:
    """An RMS norm over channels a plan prunes: the masked reference divides the sum of squares by
    the dense count C, the pruned node by the kept count C'. Scaling `epsilon` by C/C' and the
    `scale` initializer by sqrt(C/C') gives the same output exactly."""

    node: str
    exprs: list
    scale: str
    epsilon: float  # the node's epsilon, its schema's default if unset


class Context:
    """What a rule sees: axis expressions of tensors, the space table, and edit recorders."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self.table = SpaceTable()
        self.axes: dict[str, list | None] = {}
        self.roles: dict[str, list[tuple[int, str, str]]] = {}  # init -> (axis, role, node)
        self.value_edits: list[ValueEdit] = []
        self.attr_edits: list[AttrEdit] = []
        self.split_edits: list[SplitEdit] = []
        self.mean_edits: list[MeanEdit] = []
        self.norm_edits: list[NormEdit] = []
        self.unruled: dict[str, str] = {}  # op type without a rule -> why, for the user
        self.where = ""  # the node being analysed, for freeze reasons
        # weight layer -> the channel expressions of the widths its time depends on, in the
        # timing database's order: (cin, cout); depthwise (channels,); grouped (groups, cin/g, cout/g)
        self.layer_axes: dict[str, tuple] = {}

    # -- tensors ---------------------------------------------------------------------------
    def ax(self, name: str):
        """Axis expressions of a tensor; None when its shape is unknown."""
        if name not in self.axes:
            shape = self.index.shapes.get(name)
            if name in self.index.inits:
                self.axes[name] = [Free(d) for d in shape]
            elif shape is not None and all(d is not None for d in shape):  # graph inputs: nothing to prune
                origin = f"graph input '{name}'" if name in self.index.graph_inputs else ""
                self.axes[name] = [Fx(d, origin) for d in shape]
            else:
                self.axes[name] = None
        return self.axes[name]

    def set(self, name: str, exprs):
        if name:
            self.axes[name] = list(exprs) if exprs is not None else None

    def shape(self, name):
        return self.index.shape(name)

    def const(self, name):
        return self.index.const(name) if name else None

    def is_const(self, name) -> bool:
        return bool(name) and name in self.index.inits

    # -- channels --------------------------------------------------------------------------
    def new(self, size: int, node, weak: bool = False):
        return self.table.new(size, node.name, weak)

    def produce(self, e, node):
        """A weight axis that becomes an activation's channels: give it a fresh space."""
        n = self.table.norm(e)
        if isinstance(n, Free):
            n.bound = self.table.new(n.n, node.name)
        return e

    def unify(self, a, b, reason: str):
        try:
            self.table.unify(a, b, f"{self.where} ties them to channels that cannot be pruned (a graph input, a fixed layout or a frozen group)")
        except Unsupported:
            self.freeze(a, reason)
            self.freeze(b, reason)

    def freeze(self, e, reason: str):
        self.table.freeze(e, reason)

    def freeze_tensor(self, name: str, reason: str):
        axes = self.ax(name) if name else None
        for e in axes or ():
            self.freeze(e, reason)

    def bind(self, init: str, axis: int, e, role: str, node):
        """Tie initializer axis to channels `e`; `role` is producer, consumer or param."""
        self.unify(self.ax(init)[axis], e, f"weight '{init}' is shared with different channels")
        self.roles.setdefault(init, []).append((axis, role, node.name))

    def size(self, e) -> int:
        return self.table.size(e)

    def has_channels(self, e) -> bool:
        return bool(self.table.spaces_in(e))


# weights stored as integers: the weight layers are not Conv/MatMul on constants
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits"}


@dataclass
class Analysis:
    model: onnx.ModelProto  # the canonical model the analysis ran on (static shapes)
    ctx: Context
    groups: list[Group]
    frozen: list[FrozenGroup]

    @property
    def table(self) -> SpaceTable:
        return self.ctx.table

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def keep_arrays(self, plan) -> dict[int, np.ndarray]:
        """Plan (group name -> kept indices) as space id -> boolean keep mask."""
        keep = {}
        for g in self.groups:
            kept = plan.get(g.name)
            if kept is None:
                continue
            mask = np.zeros(g.size, dtype=bool)
            mask[np.asarray(kept, dtype=np.int64)] = True
            keep[g.sid] = mask
        return keep

    def nothing_prunable(self) -> str:
        """The one line to stop with when no group is prunable."""
        quantized = sorted({n.op_type for n in self.model.graph.node if n.op_type in QUANTIZED_OPS})
        if quantized:
            return (f"nothing in this model can be pruned: it is quantized ({', '.join(quantized)}); prune the "
                    f"float model, then quantize the result")
        if self.ctx.unruled:
            op, why = next(iter(self.ctx.unruled.items()))
            return f"nothing in this model can be pruned: {op}: {why}"
        return "nothing in this model can be pruned (run `onnx-prune analyze` to see why)"

    def coverage(self) -> dict:
        """How much of the model can be pruned: weight layers (producers) whose output channels
        belong to a prunable group, and their channels. Layers whose channels are graph outputs
        can never be pruned; they are counted apart."""
        total = prunable = layers = prunable_layers = output_layers = 0
        for init, uses in self.ctx.roles.items():
            for axis, role, _node in uses:
                if role != "producer":
                    continue
                e = self.ctx.ax(init)[axis]
                k = int(_positions_with_groups(self.table, e).sum())
                total += self.table.size(e)
                prunable += k
                layers += 1
                prunable_layers += k > 0
                reasons = [self.table.spaces[s].frozen or "" for s in self.table.spaces_in(e)]
                output_layers += bool(reasons) and all(r.startswith("reaches graph output") for r in reasons)
        skipped = self._layers_without_rule_roles()
        return {"layers": layers + len(skipped), "prunable_layers": prunable_layers, "output_layers": output_layers,
                "channels": total, "prunable_channels": prunable,
                "unread_layers": [n.name for n in skipped if self.ctx.axes.get(n.input[0]) is None]}

    def _layers_without_rule_roles(self) -> list:
        """Weight layers whose rule bound no weight axis: it stopped on them (their reason is a
        frozen group's), or none could read them, their input's shape being unknown (typically past
        an op without a rule that shape inference cannot see through): `unread_layers`."""
        read = {node for uses in self.ctx.roles.values() for _axis, _role, node in uses}
        return [n for n in self.ctx.index.model.graph.node
                if n.op_type in WEIGHT_OPS and len(n.input) > 1 and self.ctx.is_const(n.input[1])
                and n.name not in read]


def _positions_with_groups(table, e) -> np.ndarray:
    mask = np.zeros(table.size(e), dtype=bool)
    for _g, c in table.coords(e):
        mask |= c >= 0
    return mask


def run_rules(index: GraphIndex) -> Context:
    from onnx_prune.passes.rules import apply_rule

    ctx = Context(index)
    for node in index.model.graph.node:
        apply_rule(ctx, node)
    for out in index.graph_outputs:
        ctx.freeze_tensor(out, f"reaches graph output '{out}'")
    _freeze_conflicting_edits(ctx)
    return ctx


def _freeze_conflicting_edits(ctx: Context):
    """One constant shape entry that must hold the kept size of different channels (a shape
    tensor several Reshapes share, where canonicalization could not give each its own) can only
    stay as it is: those channels are frozen."""
    table = ctx.table
    wanted: dict = {}
    for edit in ctx.value_edits:
        wanted.setdefault((edit.init, edit.pos), []).append(edit)
    for (init, pos), edits in wanted.items():
        if len({(tuple(table.norm(e) for e in ed.exprs), ed.offset) for ed in edits}) > 1:
            for ed in edits:
                for e in ed.exprs:
                    ctx.freeze(e, f"shape constant '{init}'[{pos}] sizes differently pruned axes")


def collect_groups(ctx: Context) -> tuple[list[Group], list[FrozenGroup]]:
    table = ctx.table
    by_space: dict[int, Group] = {}
    frozen: dict[int, FrozenGroup] = {}

    def visit(e, tensor=None, init=None, role=None, node=None):
        for sid in table.spaces_in(e):
            sp = table.spaces[sid]
            if sp.frozen:
                frozen.setdefault(sid, FrozenGroup(sp.origin, sp.size, sp.frozen))
                continue
            g = by_space.setdefault(sid, Group(sid, sp.origin, sp.size))
            if tensor and tensor not in g.tensors:
                g.tensors.append(tensor)
            if role == "producer" and node not in g.producers:
                g.producers.append(node)
            if role == "consumer" and node not in g.consumers:
                g.consumers.append(node)

    for init, uses in ctx.roles.items():
        for axis, role, node in uses:
            visit(ctx.ax(init)[axis], init=init, role=role, node=node)
    for name, axes in ctx.axes.items():
        if name in ctx.index.inits or axes is None:
            continue
        for e in axes:
            visit(e, tensor=name)
    groups = [g for g in by_space.values() if g.producers]
    names = {}
    for g in sorted(groups, key=lambda g: g.sid):  # stable, readable, unique names
        base = g.name
        names[base] = names.get(base, 0) + 1
        if names[base] > 1:
            g.name = f"{base}#{names[base]}"
    return sorted(groups, key=lambda g: g.sid), sorted(frozen.values(), key=lambda f: f.name)


def analyze_model(model, input_shapes=None) -> Analysis:
    """Canonicalize a model (path or proto) and find its channel groups."""
    from onnx_prune.passes.canonicalize import canonicalize

    canon = canonicalize(model, input_shapes=input_shapes)
    return analyze_canonical(canon)


def analyze_canonical(canon) -> Analysis:
    """The channel groups of a canonicalized model (`canonicalize`'s result: its static copy
    for the shapes, its model for the weights' data), or of a static model that holds its data."""
    static, weights = (canon, None) if isinstance(canon, onnx.ModelProto) else (canon.static, canon.model)
    index = GraphIndex(static, weights)
    ctx = run_rules(index)
    groups, frozen = collect_groups(ctx)
    return Analysis(static, ctx, groups, frozen)
