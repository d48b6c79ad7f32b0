"""Head-wise rotation: order each attention head's dimensions by what they carry, before pruning.

Inside one head, the query and key dimensions only meet in the dot product q.k, and the value
dimensions only meet the output projection's rows. Any invertible T per head with

    Q' = Q T,  K' = K T^-T   (the logits q'.k' = q T T^-1 k = q.k)
    V' = V T,  O' = T^-1 O   (the output sum_d v'_d O'_d = v O)

leaves the model's function unchanged. T is chosen from a singular value decomposition weighted by
the calibration data, so that the head's first r dimensions span the best rank-r approximation of
its logits (or of its output): pruning a head-dimension group then drops the directions that carry
least, not whole coordinates. On MiniLM-L6, every head's query/key size halved keeps a held-out
embedding cosine of 0.984 rotated, 0.940 with the coordinates of most energy kept (no refit).

A group is rotated when it is a head dimension: two weight layers produce it and their outputs meet
in one MatMul (query/key), or one produces it, a MatMul mixes its tokens and one weight layer reads
it (value/output); every layer a MatMul/Gemm with a 2-D weight and a per-channel bias Add at most,
and only reshapes, transposes and scalar scales on the way (no rotary embedding, no norm over the
head). The rotated model is run against the original on calibration data; if its outputs moved,
every weight is put back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.backends.ort import make_session, session_with_outputs
from onnx_prune.passes.graph import attr
from onnx_prune.passes.spaces import Cat, Fx, Prod
from onnx_prune.passes.reconstruct import (feed_batches, from_weight_matrix, layer_rows, refittable_layers,
                                           weight_matrix)

MAX_ROWS = 8192  # token rows per statistic: a head's D x D Gram matrix needs few
TOLERANCE = 1e-3  # largest output change allowed, relative to the output's largest magnitude


@dataclass
class _Side:
    """One weight layer of a head-dimension group: its weight, the group's axis on it, its bias."""

    node: onnx.NodeProto
    role: str  # "producer" (the group is its output axis) or "consumer" (its input axis)
    blocks: list  # per head: positions on the axis, in the group's channel order
    bias: str | None = None  # a per-channel bias added to a producer's output (or a Gemm's own C)
    piece: int | None = None  # the Split output its part of a fused projection leaves by (GPT-2)
    stat: str = ""  # the tensor whose per-head Gram matrix the transform is weighted by


@dataclass
class _Candidate:
    name: str
    kind: str  # "query/key", "value/output", or "packed" (both, from one Q | K | V projection)
    sides: list
    grams: list = field(default_factory=list)  # per side that has a statistic: per head (D, D)
    # query/key: per rotated dimension, the logits' variance it carries, summed over heads (s^2)
    logit_energy: np.ndarray | None = None


@dataclass
class Rotation:
    """What `rotate_heads` did, for the report."""

    rotated: list  # group names
    put_back: dict  # group name -> why
    max_output_change: float
    # query/key group -> per dimension, the logits' variance it carries: the error database's
    # curve for a group no weight layer reads (passes/errordb.py)
    logit_energy: dict = field(default_factory=dict)

    def as_report(self) -> dict:
        return {"groups": self.rotated, "put_back": self.put_back,
                "max_abs_output_change_relative": self.max_output_change}


def rotate_heads(model: onnx.ModelProto, analysis, samples: dict, log=lambda msg: None) -> Rotation:
    """Rotate, in place, the head-dimension groups of `model` (the canonical model `analysis` ran
    on) by the weighted SVD of their heads on calibration `samples`; returns what was rotated."""
    candidates = _candidates(analysis)
    if not candidates:
        return Rotation([], {}, 0.0)
    batches = feed_batches(model, samples)
    reference = _collect_grams(model, candidates, batches)
    inits = {t.name: t for t in model.graph.initializer}
    original = {name: numpy_helper.to_array(inits[name])
                for cand in candidates for side in cand.sides for name in (side.node.input[1], side.bias) if name}
    updates = {}
    for cand in candidates:
        _transform(cand, original, updates)
    _write(model, analysis, updates)
    change = _change(reference, _outputs(model, batches[0]))
    if change > TOLERANCE:  # the graph did something the path check did not see: undo it all
        _write(model, analysis, {name: original[name] for name in updates})
        log(f"head rotation put back: it changed the outputs by {change:.1e} (relative)")
        why = f"rotating changed the outputs by {change:.1e} (relative to their largest magnitude)"
        return Rotation([], {c.name: why for c in candidates}, 0.0)
    log(f"head rotation: {len(candidates)} groups, outputs changed by {change:.1e} (relative)")
    energy = {c.name: c.logit_energy for c in candidates if c.logit_energy is not None}
    return Rotation([c.name for c in candidates], {}, change, energy)


# -- which groups ----------------------------------------------------------------------------------

# ops a head's channels may pass through unchanged in meaning: T commutes with them
_LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def _candidates(analysis) -> list[_Candidate]:
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
        consumers = [_Side(layers[n][0], "consumer", _blocks(table, layers[n][1][0], g)) for n in g.consumers]
        if kind == "packed":  # one producer, its axis Q | K | V: a side per part, roles from the graph
            node, axes = layers[g.producers[0]]
            sides = [_Side(node, "producer", _blocks(table, axes[1], g, packed == p)) for p in range(3)] + consumers
        elif len(g.producers) == 1:
            node, axes = layers[g.producers[0]]
            sides = [_Side(node, "producer", _blocks(table, axes[1], g, piece=k), piece=k) for k in pieces] + consumers
        else:
            sides = [_Side(layers[n][0], "producer", _blocks(table, layers[n][1][1], g)) for n in g.producers] \
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
        out.append(_Candidate(g.name, kind, sides))
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
    for _ in range(16):
        uses = _uses(index, value)
        if len(uses) != 1:
            return None
        node = uses[0][0]
        if node.op_type == "Split":
            return node.output[side.piece] if side.piece < len(node.output) else None
        if node.op_type not in _LAYOUT:
            return None
        value = node.output[0]
    return None


def _uses(index, value) -> list:
    """The nodes reading `value`'s data: a Shape reads only its shape, which T does not change."""
    return [(n, k) for n, k in index.consumers.get(value, []) if n.op_type not in ("Shape", "Size")]


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
    if mix.input[1] != read:
        return False
    value = mix.output[0]
    for _ in range(16):
        if value == consumer.input[0]:
            return True
        uses = _uses(index, value)
        if len(uses) != 1 or uses[0][0].op_type not in _LAYOUT:
            return False
        value = uses[0][0].output[0]
    return False


def _packed_roles(index, sides) -> list | None:
    """The parts of a packed projection in the order queries, keys, values: its output, through
    layout ops, is picked apart along the axis of the parts (three Gathers of constant index 0, 1,
    2, or a Split in three); two picks meet in one MatMul (queries and keys), the third is mixed
    into the output layer."""
    value = _biased_output(index, sides[0])
    for _ in range(16):
        uses = _uses(index, value)
        if len(uses) != 1 or uses[0][0].op_type not in _LAYOUT:
            break
        value = uses[0][0].output[0]
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


# -- statistics ------------------------------------------------------------------------------------

def _collect_grams(model, candidates, batches) -> list:
    """Per side with a statistic, per head: the Gram matrix of the head's columns over real tokens.
    Returns the model's outputs on the first batch, to check the rotation against."""
    stats = list(dict.fromkeys(s.stat for c in candidates for s in c.sides if s.stat))
    outputs = [o.name for o in model.graph.output]
    sess = session_with_outputs(model, stats, optimize=True)
    first = None
    per_batch = max(MAX_ROWS // len(batches), 8)
    rng = np.random.default_rng(0)
    rows = 0
    for cand in candidates:
        cand.grams = [[0.0] * len(s.blocks) for s in cand.sides if s.stat]
    wanted = list(dict.fromkeys(stats + outputs))
    for feeds in batches:
        values = dict(zip(wanted, sess.run(wanted, feeds)))
        first = first or [values[o] for o in outputs]
        X = {name: layer_rows(_AS_MATMUL, values[name], per_batch, rng, feeds).astype(np.float64) for name in stats}
        rows += len(next(iter(X.values())))
        for cand in candidates:
            for grams, side in zip(cand.grams, [s for s in cand.sides if s.stat]):
                x = X[side.stat]
                for h, b in enumerate(side.blocks):
                    grams[h] = grams[h] + x[:, b].T @ x[:, b]
    for cand in candidates:
        cand.grams = [[g / max(rows, 1) for g in grams] for grams in cand.grams]
    return first


_AS_MATMUL = onnx.helper.make_node("MatMul", ["x", "w"], ["y"])  # rows of a token tensor, not conv patches


# -- transforms ------------------------------------------------------------------------------------

def _factor(gram: np.ndarray) -> np.ndarray:
    """Upper-triangular R with R'R = gram, loaded slightly so a dead dimension does not break it."""
    load = 1e-6 * max(np.trace(gram) / len(gram), 1e-30)
    return np.linalg.cholesky(gram + load * np.eye(len(gram))).T


def _query_key(gq, gk) -> tuple:
    """(Tq, Tk, s) of one head. Logits q'k = x' (Wq Wk') y: with Rq'Rq and Rk'Rk the head's Gram
    matrices, the SVD of Rq Rk' = U S V' gives the weighted best rank r; Tq Tk' = I keeps the logits."""
    Rq, Rk = _factor(gq), _factor(gk)
    U, s, Vt = np.linalg.svd(Rq @ Rk.T)
    root = np.sqrt(np.maximum(s, 1e-30))
    return np.linalg.solve(Rq, U * root), np.linalg.solve(Rk, Vt.T * root), s


def _value_output(gz, rows) -> tuple:
    """(T, T^-1) of one head. Output z O: with Rz'Rz the Gram matrix of the head's z, the SVD of
    Rz O = U S V' orders the directions; T = Rz^-1 U makes the rotated z orthonormal, O's rows S V'."""
    Rz = _factor(gz)
    U, _, _ = np.linalg.svd(Rz @ rows, full_matrices=False)
    return np.linalg.solve(Rz, U), U.T @ Rz


def _head_transforms(cand: _Candidate, original: dict) -> list:
    """Per head, one matrix per side: what that side's weights are multiplied by."""
    out = []
    if cand.kind == "query/key":
        cand.logit_energy = 0.0
        for gq, gk in zip(*cand.grams):
            Tq, Tk, s = _query_key(gq, gk)
            # rotated, q_j and k_j are uncorrelated with variance s_j: q_j k_j carries s_j^2
            cand.logit_energy = cand.logit_energy + s ** 2
            out.append((Tq, Tk))
        return out
    consumer = cand.sides[-1]
    W = weight_matrix(consumer.node, original[consumer.node.input[1]])
    group = len(consumer.blocks) // len(cand.sides[0].blocks)  # query heads per value head
    for h in range(len(cand.sides[0].blocks)):
        readers = range(h * group, (h + 1) * group)  # the value head's readers weigh it together
        gz = sum(cand.grams[-1][r] for r in readers)
        pair = _value_output(gz, np.hstack([W[consumer.blocks[r]] for r in readers]))
        out.append(_query_key(cand.grams[0][h], cand.grams[1][h])[:2] + pair if cand.kind == "packed" else pair)
    return out


def _transform(cand: _Candidate, original: dict, updates: dict):
    """Apply `cand`'s head transforms to its weights and biases in `updates` (name -> array)."""
    per_head = _head_transforms(cand, original)
    for k, side in enumerate(cand.sides):
        name = side.node.input[1]
        w = updates.get(name, original[name])
        W = np.array(weight_matrix(side.node, w), dtype=np.float64)
        bias = np.array(updates.get(side.bias, original[side.bias]), dtype=np.float64) if side.bias else None
        for n, b in enumerate(side.blocks):
            pair = per_head[n * len(per_head) // len(side.blocks)]  # a repeated value head's transform
            if side.role == "consumer":
                W[b] = pair[k] @ W[b]
                continue
            W[:, b] = W[:, b] @ pair[k]
            if bias is not None:
                bias[b] = bias[b] @ pair[k]
        updates[name] = np.ascontiguousarray(from_weight_matrix(side.node, W, w.shape)).astype(w.dtype)
        if bias is not None:
            updates[side.bias] = bias.astype(original[side.bias].dtype)


def _write(model, analysis, arrays: dict):
    inits = {t.name: t for t in model.graph.initializer}
    for name, array in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
        analysis.ctx.index.forget(name)


def _outputs(model, feeds) -> list:
    return make_session(model, quiet=True).run(None, feeds)


def _change(before: list, after: list) -> float:
    """Largest output change, relative to the largest magnitude of that output."""
    worst = 0.0
    for a, b in zip(before, after):
        if np.asarray(a).dtype.kind not in "fc" or np.asarray(a).size == 0:
            continue
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
    return worst
