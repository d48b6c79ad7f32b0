"""Apply a plan (kept channel indices per group) to the canonical graph.

Slices weights, per-channel parameters and constants along the axes the analysis tied to
channels, and rewrites the few non-weight numbers that depend on widths (Reshape/Expand targets,
Split sizes, Slice bounds, Conv groups). The one node it adds is a scalar Mul after a mean over
pruned channels (it keeps the dense divisor); never an activation copy.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.passes.analysis import Analysis
from onnx_prune.passes.graph import opset_of


def check_plan(analysis: Analysis, plan: dict):
    """Every planned group must exist and keep at least one valid, distinct channel."""
    names = {g.name: g for g in analysis.groups}
    for name, kept in plan.items():
        if name not in names:
            raise KeyError(f"plan names unknown group '{name}'")
        kept = np.asarray(kept)
        n = names[name].size
        if kept.size == 0:
            raise ValueError(f"plan removes every channel of group '{name}'")
        if kept.min() < 0 or kept.max() >= n or len(np.unique(kept)) != kept.size:
            raise ValueError(f"plan for group '{name}' has invalid indices")


def apply_plan(model: onnx.ModelProto, analysis: Analysis, plan: dict) -> onnx.ModelProto:
    check_plan(analysis, plan)
    keep = analysis.keep_arrays(plan)
    table, ctx = analysis.table, analysis.ctx
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    arrays = {}

    def array(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    for name, axes in ctx.axes.items():
        if name not in inits or axes is None:
            continue
        for k, e in enumerate(axes):
            mask = table.keep_mask(e, keep)
            if not mask.all():
                arrays[name] = np.compress(mask, array(name), axis=k)
    for edit in ctx.value_edits:
        value = sum(int(table.keep_mask(e, keep).sum()) for e in edit.exprs) + edit.offset
        full = sum(table.size(e) for e in edit.exprs) + edit.offset
        if value != full:
            arr = array(edit.init).copy()
            arr.flat[edit.pos] = value
            arrays[edit.init] = arr
    nodes = {n.name: n for n in out.graph.node}
    for edit in ctx.attr_edits:
        if edit.value is not None:
            _set_float_attr(nodes[edit.node], edit.attr, edit.value)
            continue
        value = int(table.keep_mask(edit.expr, keep).sum())
        for a in nodes[edit.node].attribute:
            if a.name == edit.attr:
                a.i = value
    for edit in ctx.split_edits:
        _rewrite_split(out, nodes[edit.node], [int(table.keep_mask(p, keep).sum()) for p in edit.pieces],
                       [table.size(p) for p in edit.pieces], arrays, inits)
    def counts(exprs):  # kept and dense number of the positions a reduction runs over
        return (np.prod([int(table.keep_mask(e, keep).sum()) for e in exprs]),
                np.prod([table.size(e) for e in exprs]))

    for edit in ctx.mean_edits:
        kept, full = counts(edit.exprs)
        if kept != full:
            _rescale_output(out, nodes[edit.node], kept / full, edit.dtype)
    for edit in ctx.norm_edits:
        kept, full = counts(edit.exprs)
        if kept != full:
            _set_float_attr(nodes[edit.node], "epsilon", edit.epsilon * full / kept)
            scale = array(edit.scale)
            arrays[edit.scale] = (scale * np.sqrt(full / kept)).astype(scale.dtype)
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.array(arr, order="C"), name))
    del out.graph.value_info[:]
    return out


def _rescale_output(model, node, factor, dtype):
    """Multiply `node`'s output by `factor` (a scalar Mul after it, under the output's name)."""
    result = node.output[0]
    node.output[0] = f"{result}__unscaled"
    np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    scale = numpy_helper.from_array(np.array(factor, dtype=np_type), f"{result}__scale")
    model.graph.initializer.append(scale)
    mul = onnx.helper.make_node("Mul", [node.output[0], scale.name], [result], name=f"{node.name}__rescale")
    nodes = model.graph.node
    position = next(i for i, n in enumerate(nodes) if n is node)
    nodes.insert(position + 1, mul)


def _set_float_attr(node, name, value):
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(name, float(value))])


def _rewrite_split(model, node, sizes, full_sizes, arrays, inits):
    if sizes == full_sizes:
        return
    value = np.asarray(sizes, dtype=np.int64)
    if opset_of(model) < 13:
        for a in node.attribute:
            if a.name == "split":
                del a.ints[:]
                a.ints.extend(sizes)
                return
        node.attribute.append(onnx.helper.make_attribute("split", sizes))
        return
    if len(node.input) > 1 and node.input[1]:
        arrays[node.input[1]] = value
        return
    # equal split or num_outputs: give it explicit sizes
    name = f"{node.name}__split"
    t = numpy_helper.from_array(value, name)
    model.graph.initializer.append(t)
    inits[name] = t
    while len(node.input) < 2:
        node.input.append("")
    node.input[1] = name
    kept = [a for a in node.attribute if a.name != "num_outputs"]
    del node.attribute[:]
    node.attribute.extend(kept)
