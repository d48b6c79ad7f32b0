"""Random multi-branch CNN graphs built from the supported ops, for property-based tests.

A `draw(kind, options)` callable makes every choice, so hypothesis can drive (and shrink) it.
Every graph has NCHW feature maps; ops only combine tensors whose shapes allow it.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

OPS = ("conv", "bn", "act", "add", "se", "concat", "split", "slice", "pool", "resize",
       "shuffle", "prelu", "gconv", "dwconv", "matmul_tokens", "sub_div")
ACTS = ("Relu", "Sigmoid", "HardSwish", "LeakyRelu", "Tanh", "Clip", "Gelu")


class Builder:
    def __init__(self, draw, rng):
        self.draw, self.rng = draw, rng
        self.nodes, self.inits = [], []
        self.tensors = []  # (name, C, H, W)
        self.k = 0

    def name(self, base):
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, base, arr):
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def node(self, op, ins, n_out=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, ins, outs, name=self.name(op), **attrs))
        return outs if n_out > 1 else outs[0]

    def weight(self, *shape):
        fan_in = int(np.prod(shape[1:])) or 1
        return (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def conv(self, t, cout, k=1, groups=1):
        name, c, h, w = t
        W = self.const("w", self.weight(cout, c // groups, k, k))
        B = self.const("b", (self.rng.standard_normal(cout) * 0.1).astype(np.float32))
        out = self.node("Conv", [name, W, B], kernel_shape=[k, k], pads=[k // 2] * 4, group=groups)
        return (out, cout, h, w)

    def pick(self, pred=lambda t: True):
        cands = [t for t in self.tensors if pred(t)]
        return cands[self.draw("tensor", len(cands))] if cands else None


def build_random_graph(draw, seed=0, n_ops=8):
    """A random model and its input shape. `draw(kind, n)` returns an int in [0, n)."""
    rng = np.random.default_rng(seed)
    b = Builder(draw, rng)
    x = ("x", 3, 8, 8)
    b.tensors.append(b.conv(x, [8, 16, 24][draw("c0", 3)], k=3))
    for _ in range(n_ops):
        op = OPS[draw("op", len(OPS))]
        t = b.pick()
        new = _apply(b, op, t)
        b.tensors.extend(new)
    return _finish(b)


def _apply(b, op, t):
    name, c, h, w = t
    draw, rng = b.draw, b.rng
    if op == "conv":
        return [b.conv(t, 8 * (1 + draw("cout", 4)), k=[1, 3][draw("k", 2)])]
    if op == "gconv":
        g = [d for d in (2, 4) if c % d == 0]
        if not g:
            return []
        g = g[draw("groups", len(g))]
        return [b.conv(t, g * (1 + draw("per_group", 3)), k=3, groups=g)]
    if op == "dwconv":
        return [b.conv(t, c * (1 + draw("mult", 2)), k=3, groups=c)]
    if op == "bn":
        ps = [b.const("g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
              b.const("be", rng.standard_normal(c).astype(np.float32) * 0.1),
              b.const("m", rng.standard_normal(c).astype(np.float32) * 0.1),
              b.const("v", rng.uniform(0.5, 1.5, c).astype(np.float32))]
        return [(b.node("BatchNormalization", [name] + ps), c, h, w)]
    if op == "act":
        act = ACTS[draw("act", len(ACTS))]
        ins = [name]
        if act == "Clip":
            ins += [b.const("lo", np.float32(0)), b.const("hi", np.float32(6))]
        return [(b.node(act, ins), c, h, w)]
    if op == "prelu":
        slope = b.const("slope", rng.uniform(0, 0.3, (c, 1, 1)).astype(np.float32))
        return [(b.node("PRelu", [name, slope]), c, h, w)]
    if op == "add":
        u = b.pick(lambda s: s[1:] == t[1:])
        return [(b.node("Add", [name, u[0]]), c, h, w)]
    if op == "sub_div":  # x - mean / (1 + |x|): elementwise both ways, with constants broadcast
        shift = b.const("shift", rng.standard_normal((1, c, 1, 1)).astype(np.float32))
        d = b.node("Sub", [name, shift])
        one = b.const("one", np.float32(1))
        den = b.node("Add", [b.node("Abs", [name]), one])
        return [(b.node("Div", [d, den]), c, h, w)]
    if op == "se":
        mid = max(2, c // 4)
        s = b.node("GlobalAveragePool", [name])
        s = b.conv((s, c, 1, 1), mid)
        s = (b.node("Relu", [s[0]]), mid, 1, 1)
        s = b.conv(s, c)
        gate = b.node(["Sigmoid", "HardSigmoid"][draw("gate", 2)], [s[0]])
        return [(b.node("Mul", [name, gate]), c, h, w)]
    if op == "concat":
        u = b.pick(lambda s: s[2:] == t[2:])
        return [(b.node("Concat", [name, u[0]], axis=1), c + u[1], h, w)]
    if op == "split":
        if c < 2:
            return []
        first = 1 + draw("split_at", c - 1)
        sizes = b.const("split", np.array([first, c - first], dtype=np.int64))
        o1, o2 = b.node("Split", [name, sizes], n_out=2, axis=1)
        return [(o1, first, h, w), (o2, c - first, h, w)]
    if op == "slice":
        if c < 2:
            return []
        s = draw("slice_start", c - 1)
        e = s + 1 + draw("slice_len", c - s - 1) if c - s > 1 else s + 1
        end = e if e < c or draw("to_end", 2) else 2**31 - 1
        ins = [name, b.const("st", np.array([s], np.int64)), b.const("en", np.array([end], np.int64)),
               b.const("ax", np.array([1], np.int64))]
        return [(b.node("Slice", ins), e - s, h, w)]
    if op == "pool":
        if h < 2:
            return []
        pool = ["MaxPool", "AveragePool"][draw("pool", 2)]
        return [(b.node(pool, [name], kernel_shape=[2, 2], strides=[2, 2]), c, h // 2, w // 2)]
    if op == "resize":
        scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
        return [(b.node("Resize", [name, "", scales], mode="nearest"), c, h * 2, w * 2)]
    if op == "shuffle":
        if c % 2:
            return []
        s1 = b.const("shape", np.array([1, 2, c // 2, h, w], np.int64))
        r = b.node("Reshape", [name, s1])
        tr = b.node("Transpose", [r], perm=[0, 2, 1, 3, 4])
        s2 = b.const("shape", np.array([1, c, h, w], np.int64))
        return [(b.node("Reshape", [tr, s2]), c, h, w)]
    if op == "matmul_tokens":  # NCHW -> tokens (HW, C) -> linear -> back: channels-last MatMul
        s1 = b.const("shape", np.array([1, c, h * w], np.int64))
        tok = b.node("Transpose", [b.node("Reshape", [name, s1])], perm=[0, 2, 1])
        cout = 8 * (1 + draw("cout", 3))
        y = b.node("MatMul", [tok, b.const("wl", b.weight(c, cout))])
        y = b.node("Add", [y, b.const("bl", (rng.standard_normal(cout) * 0.1).astype(np.float32))])
        back = b.node("Transpose", [y], perm=[0, 2, 1])
        s2 = b.const("shape", np.array([1, cout, h, w], np.int64))
        return [(b.node("Reshape", [back, s2]), cout, h, w)]
    raise ValueError(op)


def _finish(b):
    last = b.tensors[-1]
    pooled = b.node("GlobalAveragePool", [last[0]])
    flat = b.node("Flatten", [pooled], axis=1)
    wf = b.const("wf", b.weight(5, last[1]))
    logits = b.node("Gemm", [flat, wf, b.const("bf", np.zeros(5, np.float32))], transB=1)
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, 5])]
    graph = helper.make_graph(b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model, {"x": (1, 3, 8, 8)}
