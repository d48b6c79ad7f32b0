"""Which channel groups are attention head dimensions that a per-head transform may rotate.

A group qualifies when (passes/rotate.py says why these and no others):
- query/key: two weight layers produce it (or two pieces of one projection split apart, GPT-2)
  and their outputs meet as the two inputs of one MatMul;
- value/output: one weight layer produces it, a MatMul mixes its tokens, and one weight layer reads
  it; grouped-query values are read once per query head of their group (repeat_kv's Expand);
- packed: one projection's axis is Q | K | V (a fixed factor of 3), picked apart by Gathers or a
  Split into a query/key pair and the values.
Every layer is a MatMul/Gemm with a 2-D weight and a per-channel bias at most; between them only
layout ops and scalar scales (no rotary embedding, no norm over the head), and a head's dimensions
lie side by side on every axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_prune.passes.graph import attr
from onnx_prune.passes.reconstruct import refittable_layers
from onnx_prune.passes.spaces import Cat, Fx, Prod


@dataclass
class Side:
    """One weight layer of a head-dimension group: its weight, the group's axis on it, its bias."""

    node: onnx.NodeProto
    role: str  # "producer" (the group is its output axis) or "consumer" (its input axis)
    blocks: list  # per head: positions on the axis, in the group's channel order
    bias: str | None = None  # a per-channel bias added to a producer's output (or a Gemm's own C)
    piece: int | None = None  # the Split output its part of a fused projection leaves by (GPT-2)
    stat: str = ""  # the tensor whose per-head Gram matrix the transform is weighted by


@dataclass
class Head:
    """A head-dimension group and its layers; rotate.py fills in its statistics."""

    name: str
    kind: str  # "query/key", "value/output", or "packed" (both, from one Q | K | V projection)
    sides: list
    grams: list = field(default_factory=list)  # per side that has a statistic: per head (D, D)
    # query/key: per rotated dimension, the logits' variance it carries, summed over heads (s^2)
    logit_energy: np.ndarray | None = None


# ops a head's channels may pass through unchanged in meaning: T commutes with them
_LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def find_heads(analysis) -> list[Head]:
    """The head-dimension groups of `analysis` a per-head transform may rotate, with their layers."""
    ctx, table = analysis.ctx, analysis.table
    layers = {node.name: (node, axes) for node, axes in refittable_layers(analysis)
              if node.op_type in ("MatMul", "Gemm")}
    out = []
    for g in analysis.groups:
        if g.size < 2 or any(n not in layers for n in g.producers + g.consumers):
            continue
        pieces = _pieces(table, layers[g.producers[0]][1][1], g) if len(g.producers) == 1 else [None]
        split_pair = len(pieces) == 2 and None not in pieces  # queries and keys of one projection (GPT-2)
        if not g.consumers and (len(g.producers) == 2 or split_pair):
            kind = "query/key"
        elif len(g.producers) == 1 and len(g.consumers) == 1:
            packed = _parts(table, layers[g.producers[0]][1][1])
            kind = "packed" if packed is not None else "value/output"
        else:
            continue
        if kind == "value/output" and len(pieces) != 1:
            continue  # values in several pieces of one projection: not a layout this knows
        consumers = [Side(layers[n][0], "consumer", _blocks(table, layers[n][1][0], g)) for n in g.consumers]
        if kind == "packed":  # one producer, its axis Q | K | V: a side per part, roles from the graph
            node, axes = layers[g.producers[0]]
            sides = [Side(node, "producer", _blocks(table, axes[1], g, packed == p)) for p in range(3)] + consumers
        elif len(g.producers) == 1:
            node, axes = layers[g.producers[0]]
            sides = [Side(node, "producer", _blocks(table, axes[1], g, piece=k), piece=k) for k in pieces] + consumers
        else:
            sides = [Side(layers[n][0], "producer", _blocks(table, layers[n][1][1], g)) for n in g.producers] \
                + consumers
        if any(s.blocks is None for s in sides) or not _heads_match(kind, sides) \
                or len(sides[0].blocks) < 2 or not _attach_biases(ctx, table, g, sides):
            continue  # one block is a plain layer's channels (an FFN's), not heads
        if kind == "packed":
            roles = _packed_roles(ctx.index, sides)
            if roles is None:
                continue
            sides = [sides[p] for p in roles] + consumers  # queries, keys, values, the output layer
        elif not _linear_path(ctx.index, kind, sides):
            continue
        for side in sides[:2] if kind != "value/output" else ():  # weighted by what query/key heads output
            side.stat = _biased_output(ctx.index, side)
        for side in consumers:  # and by what the output layer reads
            side.stat = side.node.input[0] if kind != "query/key" else ""
        out.append(Head(g.name, kind, sides))
    return out


def _heads_match(kind, sides) -> bool:
    """Every side has the same heads; or, grouped-query values, the output layer reads each value
    head once per query head of its group (repeat_kv: query head h reads value head h // group)."""
    counts = [len(s.blocks) for s in sides]
    if len(set(counts)) == 1:
        return True
    return kind == "value/output" and counts[1] % counts[0] == 0


def _parts(table, e, n=3):
    """Each position's part on an axis laid out as n parts x ... (a packed Q | K | V projection),
    or None when the axis has no fixed factor of n."""
    e = table.norm(e)
    if not isinstance(e, Prod):
        return None
    sizes = [table.size(it) for it in e.items]
    fixed = [k for k, it in enumerate(e.items) if isinstance(it, Fx) and sizes[k] == n]
    if len(fixed) != 1:
        return None
    inner = int(np.prod(sizes[fixed[0] + 1:]))
    return (np.arange(int(np.prod(sizes))) // inner) % n


def _coord(table, e, sid):
    """Channel of space `sid` at each position of axis `e` (-1 where another space is), or None;
    a space that appears in several pieces of a concatenation is in each."""
    found = [c for s, c in table.coords(e) if s == sid]
    return np.max(found, axis=0) if found else None


def _pieces(table, e, g) -> list:
    """The pieces of a concatenated axis (a projection split apart) that carry `g`; [None] if the
    axis is not a concatenation."""
    e = table.norm(e)
    if not isinstance(e, Cat):
        return [None]
    return [k for k, it in enumerate(e.items) if _coord(table, it, g.sid) is not None]


def _blocks(table, e, g, part=None, piece=None) -> list | None:
    """Positions of the heads on axis `e` (among the positions `part` marks, or in concatenated
    piece `piece`): the k-th position of each channel of `g` is head k's. None when they hold
    anything but whole heads of `g`."""
    coord = _coord(table, e, g.sid)
    if coord is None:
        return None
    if part is not None:
        coord = np.where(part, coord, -1)
    if piece is not None:
        items = table.norm(e).items
        start = sum(table.size(it) for it in items[:piece])
        inside = (np.arange(len(coord)) >= start) & (np.arange(len(coord)) < start + table.size(items[piece]))
        coord = np.where(inside, coord, -1)
    where = [np.flatnonzero(coord == c) for c in range(g.size)]
    if len({len(w) for w in where}) != 1:
        return None
    blocks = [np.array([w[k] for w in where]) for k in range(len(where[0]))]
    # a head's dimensions lie side by side (heads x head size); the heads' own group does not
    return blocks if all((np.diff(b) == 1).all() for b in blocks) else None


def _attach_biases(ctx, table, g, sides) -> bool:
    """Every other initializer carrying `g` must be a producer's bias (an Add of a 1-D constant to
    its output); anything else (a norm's scale, a per-channel Mul) does not commute with T."""
    weights = {s.node.input[1] for s in sides}
    by_output = {}  # a packed producer's output is every part's
    for s in sides:
        if s.role == "producer":
            by_output.setdefault(s.node.output[0], []).append(s)
    for name in ctx.index.inits:
        axes = ctx.axes.get(name)
        if name in weights or not axes or all(_coord(table, e, g.sid) is None for e in axes):
            continue
        uses = ctx.index.consumers.get(name, [])
        if len(axes) != 1 or len(uses) != 1:
            return False
        node, slot = uses[0]
        other = [i for i in node.input if i != name]
        if node.op_type == "Gemm" and slot == 2:  # a Gemm's own bias
            owners = [s for s in sides if s.node is node and s.role == "producer"]
        else:
            owners = by_output.get(other[0], []) if node.op_type == "Add" and len(other) == 1 else []
        if not owners or any(s.bias is not None for s in owners):
            return False
        for s in owners:
            s.bias = name
    return True


def _biased_output(index, side) -> str:
    if side.bias is None or side.bias in side.node.input:
        return side.node.output[0]
    return index.consumers[side.bias][0][0].output[0]


def _start(index, side) -> str | None:
    """Where a producer's head dimensions begin their way: its biased output, or, for a piece of a
    projection split apart, the Split's output of that piece."""
    value = _biased_output(index, side)
    if side.piece is None:
        return value
    _, uses = _through_layout(index, value)
    split = uses[0][0] if len(uses) == 1 and uses[0][0].op_type == "Split" else None
    return split.output[side.piece] if split is not None and side.piece < len(split.output) else None


def _uses(index, value) -> list:
    """The nodes reading `value`'s data: a Shape reads only its shape, which T does not change."""
    return [(n, k) for n, k in index.consumers.get(value, []) if n.op_type not in ("Shape", "Size")]


def _through_layout(index, value) -> tuple:
    """From `value` along single readers that are layout ops: (the last value, its readers)."""
    for _ in range(16):
        uses = _uses(index, value)
        if len(uses) != 1 or uses[0][0].op_type not in _LAYOUT:
            break
        value = uses[0][0].output[0]
    return value, uses


def _follow(index, value):
    """From `value` through layout ops and scalar scales to the first MatMul that reads it:
    (that MatMul, the input it reads) or None when anything else is on the way (or it branches)."""
    for _ in range(16):
        uses = _uses(index, value)
        if len(uses) != 1:
            return None
        node, _slot = uses[0]
        if node.op_type == "MatMul":
            return node, value
        if node.op_type == "Expand":  # grouped-query attention repeats key/value heads
            value = node.output[0]
            continue
        other = [i for i in node.input if i != value]
        scalar = (node.op_type == "Mul" or node.op_type == "Div" and node.input[0] == value) and len(other) == 1 \
            and index.const(other[0]) is not None and index.const(other[0]).size == 1
        if node.op_type not in _LAYOUT and not scalar:
            return None
        value = node.output[0]
    return None


def _linear_path(index, kind, sides) -> bool:
    """Query/key: both producers' outputs meet as the two inputs of one MatMul. Value/output: the
    producer's output is the second input of a MatMul (the attention weights mix its tokens) whose
    output reaches the consumer's input the same way."""
    starts = [_start(index, s) for s in sides if s.role == "producer"]
    ends = [_follow(index, v) if v else None for v in starts]
    if any(e is None for e in ends):
        return False
    if kind == "query/key":
        (m1, v1), (m2, v2) = ends
        return m1 is m2 and {v1, v2} == set(m1.input[:2])
    return _mixes_into(index, ends[0], sides[1].node)


def _mixes_into(index, end, consumer) -> bool:
    """`end` (a MatMul, the value it reads) mixes tokens of its second input, and its output reaches
    `consumer`'s input through layout ops."""
    mix, read = end
    return mix.input[1] == read and _through_layout(index, mix.output[0])[0] == consumer.input[0]


def _packed_roles(index, sides) -> list | None:
    """The parts of a packed projection in the order queries, keys, values: its output, through
    layout ops, is picked apart along the axis of the parts (three Gathers of constant index 0, 1,
    2, or a Split in three); two picks meet in one MatMul (queries and keys), the third is mixed
    into the output layer."""
    value, uses = _through_layout(index, _biased_output(index, sides[0]))
    shape = index.shape(value)
    ends = {}
    if len(uses) == 1 and uses[0][0].op_type == "Split" and len(uses[0][0].output) == 3:  # torch's unbind
        split = uses[0][0]
        if shape is None or shape[attr(split, "axis", 0)] != 3:
            return None
        ends = {p: _follow(index, out) for p, out in enumerate(split.output)}
    for node, slot in uses if not ends else ():
        pick = index.const(node.input[1]) if node.op_type == "Gather" and slot == 0 else None
        if pick is None or pick.size != 1 or shape is None or shape[attr(node, "axis", 0)] != 3:
            return None
        ends[int(pick)] = _follow(index, node.output[0])
    if sorted(ends) != [0, 1, 2] or any(e is None for e in ends.values()):
        return None
    for v in range(3):
        q, k = [p for p in range(3) if p != v]
        (m1, r1), (m2, r2) = ends[q], ends[k]
        if m1 is m2 and {r1, r2} == set(m1.input[:2]) and _mixes_into(index, ends[v], sides[3].node):
            return [q, k, v]
    return None
