"""ONNX Runtime's session-level fusions, spelled back out as ONNX ops.

A model saved from an ORT session (`SessionOptions.optimized_model_filepath`, level extended)
holds FusedConv (Conv + an added input + an activation) and FusedMatMul (MatMul of transposed
operands, scaled). Written as plain ops, every rule, refit, timing and the torch bridge apply to
them; ORT fuses them again when it loads the pruned model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_prune.passes.graph import CONTRIB, attr

CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _activation(node, x, y, params, consts):
    """Nodes computing activation `node.activation` of x into y, or None for one not known here."""
    kind = _text(attr(node, "activation", b""))
    name = f"{node.name}__{kind.lower()}"
    if kind in ("Relu", "Tanh", "Sigmoid"):
        return [helper.make_node(kind, [x], [y], name=name)]
    if kind == "LeakyRelu":
        return [helper.make_node(kind, [x], [y], name=name, alpha=params[0] if params else 0.01)]
    if kind == "HardSigmoid":
        return [helper.make_node(kind, [x], [y], name=name, alpha=params[0], beta=params[1])]
    if kind == "Clip":
        bounds = []
        for label, value in zip(("min", "max"), params):
            bounds.append(f"{name}__{label}")
            consts.append(numpy_helper.from_array(np.array(value, np.float32), bounds[-1]))
        return [helper.make_node("Clip", [x] + bounds, [y], name=name)]
    return None


def _fused_conv(node, consts):
    inputs = list(node.input) + [""] * 4
    conv_out = f"{node.name}__conv"
    conv = helper.make_node("Conv", inputs[:3] if inputs[2] else inputs[:2], [conv_out], name=node.name)
    conv.attribute.extend(a for a in node.attribute if a.name in CONV_ATTRS)
    nodes, last = [conv], conv_out
    if inputs[3]:  # the residual input ORT fused in: added before the activation
        nodes.append(helper.make_node("Add", [last, inputs[3]], [f"{node.name}__sum"], name=f"{node.name}__add"))
        last = nodes[-1].output[0]
    if not attr(node, "activation"):
        nodes[-1].output[0] = node.output[0]
        return nodes
    act = _activation(node, last, node.output[0], list(attr(node, "activation_params", [])), consts)
    return None if act is None else nodes + act


def _fused_matmul(node, ranks, consts):
    if attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
        return None
    nodes, operands = [], []
    for k, flag in enumerate(("transA", "transB")):
        name = node.input[k]
        if not attr(node, flag, 0):
            operands.append(name)
            continue
        rank = ranks.get(name)
        if rank is None or rank < 2:
            return None
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        nodes.append(helper.make_node("Transpose", [name], [f"{node.name}__t{k}"], name=f"{node.name}__t{k}", perm=perm))
        operands.append(nodes[-1].output[0])
    alpha = attr(node, "alpha", 1.0)
    out = node.output[0] if alpha == 1.0 else f"{node.name}__product"
    nodes.append(helper.make_node("MatMul", operands, [out], name=node.name))
    if alpha != 1.0:
        consts.append(numpy_helper.from_array(np.array(alpha, np.float32), f"{node.name}__alpha"))
        nodes.append(helper.make_node("Mul", [out, consts[-1].name], [node.output[0]], name=f"{node.name}__scale"))
    return nodes


def _ranks(model) -> dict:
    """Tensor ranks, from onnx's shape inference (an ORT-saved model declares none); a transposed
    operand needs its rank for the Transpose's permutation."""
    from onnx_prune.passes.graph import infer_shapes, shapes_only_copy

    try:
        inferred = infer_shapes(shapes_only_copy(model))
    except Exception:  # ranks stay unknown: those FusedMatMuls stay fused
        inferred = model
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def unfuse_ort_ops(model: onnx.ModelProto) -> list[str]:
    """Rewrite FusedConv and FusedMatMul as ONNX ops, in place; returns a note per op type done."""
    if not any(n.domain == CONTRIB and n.op_type in ("FusedConv", "FusedMatMul") for n in model.graph.node):
        return []
    ranks = _ranks(model)
    nodes, consts, done = [], [], {}
    for node in model.graph.node:
        plain = None
        if node.domain == CONTRIB and node.op_type == "FusedConv":
            plain = _fused_conv(node, consts)
        elif node.domain == CONTRIB and node.op_type == "FusedMatMul":
            plain = _fused_matmul(node, ranks, consts)
        if plain is None:
            nodes.append(node)
            continue
        nodes.extend(plain)
        done[node.op_type] = done.get(node.op_type, 0) + 1
    if done:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(consts)
    return [f"spelled out ONNX Runtime's {op} as ONNX ops ({n} node{'s' if n > 1 else ''})" for op, n in done.items()]
