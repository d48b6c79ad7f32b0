"""The op rule table: how each ONNX op moves, couples, creates or blocks channels.

One rule per op type. A rule reads its inputs' axis expressions, sets its outputs', ties weight
axes to channels (`ctx.bind`) and records the non-weight edits pruning will need. Anything it
cannot express raises `Unsupported` (or freezes locally); ops without a rule freeze what they
touch. Nothing here edits the graph.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx

from onnx_prune.passes.graph import CONTRIB, all_nodes, attr, op_label, subgraphs
from onnx_prune.passes.spaces import Cat, Fx, Prod, Unsupported

RULES = {}  # op type of the ONNX domain -> rule
CONTRIB_RULES = {}  # op type of ONNX Runtime's domain -> rule

RULE_FAILED = "analysis rule failed"


def rule(*op_types, domain=""):
    table = RULES if domain == "" else CONTRIB_RULES

    def register(fn):
        for op in op_types:
            table[op] = fn
        return fn

    return register


def apply_rule(ctx, node):
    """Run the rule for `node`; on anything unexpected, freeze its channels instead."""
    fn = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else \
        CONTRIB_RULES.get(node.op_type) if node.domain == CONTRIB else None
    ctx.where = _desc(node)
    if fn is None:
        if node.domain == CONTRIB:  # e.g. Attention: its weights pack Q, K and V, its heads an attribute
            why = "ONNX Runtime's fused op has no rule: prune the model before ORT fuses it"
        elif node.domain == CONTRIB + ".nchwc":
            why = ("ONNX Runtime's blocked layout (a model saved at optimization level all, for one CPU): "
                   "save it at level extended, or prune the model first")
        else:
            why = "unsupported op"
        ctx.unruled.setdefault(op_label(node), why)
        return unknown(ctx, node, f"{why} ({_desc(node)})")
    ins = [i for i in node.input if i]
    if any(ctx.ax(i) is None for i in ins) or any(ctx.shape(o) is None for o in node.output if o):
        return unknown(ctx, node, f"shape unknown around {_desc(node)}")
    try:
        fn(ctx, node)
    except Unsupported as exc:
        unknown(ctx, node, f"{_desc(node)}: {exc}")
    except Exception as exc:  # a rule bug must not stop the analysis: freeze, and say so
        unknown(ctx, node, f"{RULE_FAILED} on {_desc(node)} ({type(exc).__name__}: {exc})")


def _desc(node):
    return f"{node.op_type} '{node.name}'"


def unknown(ctx, node, reason):
    """Freeze every channel the node reads (subgraph captures too); outputs carry none."""
    for name in list(node.input) + _subgraph_captures(node):
        if name:
            ctx.freeze_tensor(name, reason)
    for o in node.output:
        shape = ctx.shape(o) if o else None
        ctx.set(o, [Fx(d) for d in shape] if shape is not None else None)


def _subgraph_captures(node):
    return [name for g in subgraphs(node) for n in all_nodes(g) for name in n.input]


def _out_fx(ctx, name, axis):
    return Fx(ctx.shape(name)[axis])


# -- pass-through ops ----------------------------------------------------------------------------

UNARY = (
    "Relu Sigmoid Tanh HardSigmoid HardSwish LeakyRelu Elu Selu Celu Softplus Softsign Gelu Erf "
    "Exp Log Abs Neg Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Mish ThresholdedRelu Not "
    "IsNaN IsInf Identity Dropout Cast CastLike Clip Shrink Relu6 Swish "
    "Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh BitwiseNot"
).split()


@rule(*UNARY)
def unary(ctx, node):
    """Elementwise on the first input; extra inputs (Clip bounds, CastLike target) are scalars."""
    x = ctx.ax(node.input[0])
    for extra in node.input[1:]:
        if extra and any(ctx.size(e) > 1 for e in ctx.ax(extra)):
            raise Unsupported("non-scalar extra input")
    ctx.set(node.output[0], x)
    for o in node.output[1:]:  # Dropout's mask
        if o:
            ctx.set(o, x)


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less",
      "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift",
      "BitwiseAnd", "BitwiseOr", "BitwiseXor")
def elementwise(ctx, node):
    """Numpy broadcasting: axes of size > 1 that line up carry the same channels."""
    ins = [i for i in node.input if i]
    out_shape = ctx.shape(node.output[0])
    rank = len(out_shape)
    out = []
    for k in range(rank):
        cands = []
        for name in ins:
            axes = ctx.ax(name)
            j = k - (rank - len(axes))
            if j >= 0 and ctx.size(axes[j]) == out_shape[k] and out_shape[k] > 1:
                cands.append(axes[j])
        for c in cands[1:]:
            ctx.unify(cands[0], c, f"{_desc(node)} mixes channel layouts")
        out.append(cands[0] if cands else Fx(out_shape[k]))
    ctx.set(node.output[0], out)


# ONNX Runtime's fused activations: elementwise, with an optional bias added first (BiasGelu,
# FastGelu). Its BiasAdd has no CPU kernel to verify a rule against.
rule("Gelu", "QuickGelu", "FastGelu", "BiasGelu", domain=CONTRIB)(elementwise)


@rule("Attention", domain=CONTRIB)
def fused_attention(ctx, node):
    """ORT's fused self-attention: one weight (hidden, Q | K | V) packing num_heads heads in
    each third. Whole heads prune (their columns in all three, num_heads follows); head sizes
    stay, as the default scale 1/sqrt(head size) and equal thirds depend on them."""
    if attr(node, "qkv_hidden_sizes") or attr(node, "do_rotary", 0) or any(node.input[4:]) or any(node.output[1:]):
        raise Unsupported("past state, rotary embedding or unequal Q/K/V sizes")
    x, w = node.input[0], node.input[1]
    if not ctx.is_const(w):
        raise Unsupported("weight computed at run time")
    X, (_, cols) = ctx.ax(x), ctx.shape(w)
    h = attr(node, "num_heads")
    heads, head_size = ctx.new(h, node), Fx(cols // 3 // h)
    qkv = Cat(tuple(Prod((heads, head_size)) for _ in range(3)))
    ctx.bind(w, 0, X[-1], "consumer", node)
    ctx.bind(w, 1, qkv, "producer", node)
    if len(node.input) > 2 and node.input[2]:
        ctx.bind(node.input[2], 0, qkv, "param", node)
    ctx.attr_edits.append(_attr_edit(node, "num_heads", heads))
    ctx.set(node.output[0], list(X[:-1]) + [Prod((heads, head_size))])


@rule("Attention")
def attention(ctx, node):
    """ONNX's attention (opset 23): Q (B, Hq, S, D) with K (B, Hkv, T, D) and V (B, Hkv, T, Dv),
    or the same with heads and head size merged in the last axis (3-D, the head counts then in
    attributes). Heads prune together in Q, K, V and Y. With grouped queries (Hq = g x Hkv, query
    head i reads key/value head i // g) a key/value head goes with its g query heads, and the g
    within every group prune alike. D prunes in Q and K, Dv in V and Y; the scale is written out,
    as its default 1/sqrt(D) would follow the pruned D."""
    Q, K, V = (ctx.ax(n) for n in node.input[:3])
    if len(Q) == 3:
        hq, hkv = attr(node, "q_num_heads", 0), attr(node, "kv_num_heads", 0)
        if not hq or not hkv:
            raise Unsupported("3-D inputs without q_num_heads and kv_num_heads")
        q_heads, d = ctx.table.split(Q[2], [hq, ctx.size(Q[2]) // hq])
        k_heads, dk = ctx.table.split(K[2], [hkv, ctx.size(K[2]) // hkv])
        v_heads, dv = ctx.table.split(V[2], [hkv, ctx.size(V[2]) // hkv])
    else:
        (q_heads, d), (k_heads, dk), (v_heads, dv) = (Q[1], Q[3]), (K[1], K[3]), (V[1], V[3])
        hq, hkv = ctx.size(q_heads), ctx.size(k_heads)
    if hq % hkv:
        raise Unsupported(f"{hq} query heads over {hkv} key/value heads")
    why = f"{_desc(node)} attends across differently laid out heads"
    ctx.unify(d, dk, why)
    ctx.unify(k_heads, v_heads, why)
    ctx.unify(ctx.table.split(q_heads, [hkv, hq // hkv])[0] if hq != hkv else q_heads, k_heads, why)
    for name in ("q_num_heads", "kv_num_heads"):
        ctx.attr_edits.append(_attr_edit(node, name, q_heads if name[0] == "q" else k_heads))
    inputs = list(node.input) + [""] * 6
    _attention_tail(ctx, node, why, inputs[3], inputs[4:6], (q_heads, hq), k_heads, d, dv)
    ctx.set(node.output[0], [Q[0], Q[1], Prod((q_heads, dv))] if len(Q) == 3 else [Q[0], q_heads, Q[2], dv])


def _attention_tail(ctx, node, why, bias, pasts, q_heads, kv_heads, d, dv):
    """What ONNX's Attention and ORT's MultiHeadAttention share past Q, K and V: a mask or bias
    per query head (broadcast to (B, heads, S, T)) loses the pruned heads'; the key/value cache
    (B, kv heads, P, size) in and out; the logits (B, heads, S, T); and the scale is written out,
    as its default 1/sqrt(D) would follow the pruned D. `q_heads`: (expression, count)."""
    from onnx_prune.passes.analysis import AttrEdit

    (heads, n), batch = q_heads, ctx.ax(node.input[0])[0]
    if bias and len(ctx.ax(bias)) >= 3 and ctx.size(ctx.ax(bias)[-3]) == n > 1:
        ctx.unify(ctx.ax(bias)[-3], heads, why)
    for past, last in zip(pasts, (d, dv)):
        if past:
            ctx.unify(ctx.ax(past)[1], kv_heads, why)
            ctx.unify(ctx.ax(past)[3], last, why)
    if attr(node, "scale") is None:
        ctx.attr_edits.append(AttrEdit(node.name, "scale", None, value=1.0 / np.sqrt(ctx.size(d))))
    outputs = list(node.output) + [""] * 4
    for o, last in ((outputs[1], d), (outputs[2], dv)):
        if o:
            ctx.set(o, [batch, kv_heads, _out_fx(ctx, o, 2), last])
    if outputs[3]:
        ctx.set(outputs[3], [batch, heads, _out_fx(ctx, outputs[3], 2), _out_fx(ctx, outputs[3], 3)])


@rule("MultiHeadAttention", domain=CONTRIB)
def multi_head_attention(ctx, node):
    """ONNX Runtime's fused attention over separate Q, K and V (its transformers optimizer's output
    for cross-attention and some encoders): query (B, S, N x H), key and value (B, T, N x H) or
    (B, N, T, H). Heads prune in all three (num_heads follows), H in Q and K (the scale written
    out, as for ONNX's Attention), the value head size in V and the output; the packed Q | K | V
    bias, a per-head attention bias and the key/value cache follow."""
    inputs = list(node.input) + [""] * 10
    Q = ctx.ax(inputs[0])
    if not inputs[1] or not inputs[2] or len(Q) != 3 or any(inputs[8:]):
        raise Unsupported("packed Q, K, V, or a past sequence length or cache indirection")
    n = attr(node, "num_heads")
    heads, d = ctx.table.split(Q[2], [n, ctx.size(Q[2]) // n])
    kv = []
    for name in inputs[1:3]:
        X = ctx.ax(name)
        kv.append(ctx.table.split(X[2], [n, ctx.size(X[2]) // n]) if len(X) == 3 else (X[1], X[3]))
    (k_heads, dk), (v_heads, dv) = kv
    why = f"{_desc(node)} attends across differently laid out heads"
    ctx.unify(heads, k_heads, why)
    ctx.unify(heads, v_heads, why)
    ctx.unify(d, dk, why)
    if len(ctx.ax(inputs[1])) == 4:  # ORT wants key and value of one shape in that layout
        ctx.unify(dk, dv, f"{_desc(node)} takes key and value of one shape")
    if inputs[3]:
        _bind_or_couple(ctx, node, inputs[3], 0, Cat((Prod((heads, d)), Prod((heads, d)), Prod((heads, dv)))))
    ctx.attr_edits.append(_attr_edit(node, "num_heads", heads))
    _attention_tail(ctx, node, why, inputs[5], inputs[6:8], (heads, n), heads, d, dv)
    ctx.set(node.output[0], [Q[0], Q[1], Prod((heads, dv))])


GQA_BLOCK = 16  # ORT's GroupQueryAttention kernel takes head sizes in multiples of this


@rule("GroupQueryAttention", domain=CONTRIB)
def group_query_attention(ctx, node):
    """ONNX Runtime's grouped-query attention (its generative-AI builder's LLMs): query (B, S, N x H)
    with key and value (B, S, Nkv x H), or Q | K | V packed in the query. Query head i reads
    key/value head i // (N / Nkv): a key/value head prunes with its query heads, and the query heads
    within every group prune alike (num_heads and kv_num_heads follow), with the cache (B, Nkv, P,
    H), a per-head attention bias and the head sinks. The one head size H of Q, K, V and the output
    prunes in blocks of 16 dimensions (ORT's kernel takes only multiples of 16; the scale is written
    out), under a rotary embedding in whole pairs (`_rotary_head_size`); a per-head norm keeps it."""
    inputs = list(node.input) + [""] * 17
    if any(inputs[12:14]) or attr(node, "kv_cache_bit_width", 0):
        raise Unsupported("quantized key/value cache")
    n, nkv = attr(node, "num_heads"), attr(node, "kv_num_heads")
    Q = ctx.ax(inputs[0])
    if inputs[1]:
        h = ctx.size(Q[2]) // n
        parts = [Q[2], ctx.ax(inputs[1])[2], ctx.ax(inputs[2])[2]]
    else:  # packed: Q | K | V along the last axis
        h = ctx.size(Q[2]) // (n + 2 * nkv)
        parts = ctx.table.cut(Q[2], np.cumsum([0, n * h, nkv * h, nkv * h]))
    (q_heads, d), (k_heads, dk), (v_heads, dv) = (ctx.table.split(p, [c, h]) for p, c in zip(parts, (n, nkv, nkv)))
    why = f"{_desc(node)} attends across differently laid out heads"
    ctx.unify(d, dk, why)
    ctx.unify(d, dv, f"{_desc(node)} has one head size for query, key and value")
    ctx.unify(k_heads, v_heads, why)
    ctx.unify(ctx.table.split(q_heads, [nkv, n // nkv])[0] if n != nkv else q_heads, k_heads, why)
    if attr(node, "do_rotary", 0):
        _rotary_head_size(ctx, node, d, h, inputs[7:9])
    elif h % GQA_BLOCK:
        ctx.freeze(d, f"{_desc(node)} takes head sizes in multiples of {GQA_BLOCK} only")
    else:  # whole blocks of 16 dimensions, the same in every head
        ctx.freeze(ctx.table.split(d, [h // GQA_BLOCK, GQA_BLOCK])[1],
                   f"{_desc(node)} takes head sizes in multiples of {GQA_BLOCK} only")
    if inputs[14]:
        ctx.freeze(d, f"{_desc(node)} normalizes the heads' dimensions together")
    if inputs[11]:
        _bind_or_couple(ctx, node, inputs[11], 0, q_heads)
    for name, heads in (("num_heads", q_heads), ("kv_num_heads", k_heads)):
        ctx.attr_edits.append(_attr_edit(node, name, heads))
    _attention_tail(ctx, node, why, inputs[10], inputs[3:5], (q_heads, n), k_heads, d, d)
    ctx.set(node.output[0], [Q[0], Q[1], Prod((q_heads, d))])


def _rotary_head_size(ctx, node, d, h, caches):
    """A rotary embedding turns dimension pairs by one angle per frequency: (i, i + h/2), or (2i,
    2i + 1) when interleaved, with the caches' column i (cos and sin, (positions, h/2)). A pair
    prunes whole, with its columns; frequencies go in blocks of 8 (16 dimensions, ORT's multiple).
    A partial rotary embedding (fewer columns than h/2) keeps the head size."""
    cos, sin = caches
    pairs = h // 2
    if h % GQA_BLOCK or not (cos and sin) or any(ctx.size(ctx.ax(c)[1]) != pairs for c in caches):
        ctx.freeze(d, f"{_desc(node)} rotates the heads' dimensions in pairs over part of the head or in "
                      f"sizes off its multiples of {GQA_BLOCK}")
        return
    freq = _rotary_pairs(ctx, node, d, pairs, attr(node, "rotary_interleaved", 0), caches)
    ctx.freeze(ctx.table.split(freq, [pairs // (GQA_BLOCK // 2), GQA_BLOCK // 2])[1],
               f"{_desc(node)} takes head sizes in multiples of {GQA_BLOCK} only")


def _rotary_pairs(ctx, node, d, pairs, interleaved, caches):
    """Head dimensions `d` turned in pairs, (i, i + H/2) or interleaved (2i, 2i + 1), by the caches'
    column i: the pair's two members stay together, and the pair space (returned) owns the columns."""
    freq, turn = ctx.table.split(d, [pairs, 2]) if interleaved else ctx.table.split(d, [2, pairs])[::-1]
    ctx.freeze(turn, f"{_desc(node)} rotates these dimensions together")
    for c in caches:
        _bind_or_couple(ctx, node, c, len(ctx.ax(c)) - 1, freq)
    return freq


@rule("RotaryEmbedding")
def rotary_embedding(ctx, node):
    """ONNX's (opset 23): X, cos, sin, position ids (see `_rotary_heads`)."""
    _rotary_heads(ctx, node, node.input[1:3])


@rule("RotaryEmbedding", domain=CONTRIB)
def rotary_embedding_ort(ctx, node):
    """ONNX Runtime's: input, position ids, cos, sin (see `_rotary_heads`)."""
    _rotary_heads(ctx, node, node.input[2:4])


def _rotary_heads(ctx, node, caches):
    """A rotary embedding of X (B, S, N x H) or (B, N, S, H): heads pass through (num_heads
    follows), each head's dimensions turn in pairs, one angle per cache column (cos and sin,
    (positions, H/2) or per token (B, S, H/2)): a pair prunes whole, with its columns. A partial
    rotation (fewer columns than H/2) keeps the head size."""
    X = ctx.ax(node.input[0])
    pairs = ctx.shape(caches[0])[-1]
    if len(X) == 3:
        n = attr(node, "num_heads", 0) or ctx.size(X[2]) // (2 * pairs)
        heads, d = ctx.table.split(X[2], [n, ctx.size(X[2]) // n])
        if attr(node, "num_heads", 0):
            ctx.attr_edits.append(_attr_edit(node, "num_heads", heads))
    else:
        d = X[3]
    h = ctx.size(d)
    if (attr(node, "rotary_embedding_dim", 0) or h) != h or 2 * pairs != h:
        ctx.freeze(d, f"{_desc(node)} rotates part of each head")
    else:
        _rotary_pairs(ctx, node, d, pairs, attr(node, "interleaved", 0), caches)
    ctx.set(node.output[0], X)


@rule("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=CONTRIB)
def skip_layernorm(ctx, node):
    """LayerNorm (or RMSNorm) over the last axis of input + skip (+ bias): that axis is frozen, as
    by LayerNormalization (an RMSNorm's prunes, see `_rms_norm`). Outputs: the normalized sum,
    mean, inverse std, and the sum itself."""
    ins = [i for i in node.input[:2] if i]
    X = ctx.ax(ins[0])
    for other in ins[1:]:
        for a, b in zip(X, ctx.ax(other)[-len(X):]):
            if ctx.size(a) == ctx.size(b):
                ctx.unify(a, b, f"{_desc(node)} adds differently laid out channels")
    if node.op_type != "SkipSimplifiedLayerNormalization" or not _rms_norm(ctx, node, X[-1:], node.input[2], (1, 2)):
        ctx.freeze(X[-1], f"normalized over by {_desc(node)}")
    for p in node.input[2:]:
        if p:
            _bind_or_couple(ctx, node, p, 0, X[-1])
    for k, o in enumerate(node.output):
        if o:
            ctx.set(o, X if k in (0, 3) else [Fx(d) for d in ctx.shape(o)])


# -- weight layers: producers and consumers ---------------------------------------------------


@rule("Conv", "ConvTranspose")
def conv(ctx, node):
    """Conv W is (M, C/g, k...), ConvTranspose W is (C, M/g, k...): output channels are new,
    grouped like the input's channel groups (depthwise: the output follows the input)."""
    x, w = node.input[0], node.input[1]
    if not ctx.is_const(w):
        raise Unsupported("weight computed at run time")
    X = ctx.ax(x)
    _slides_over(ctx, node, X[2:])
    g = attr(node, "group", 1)
    W = ctx.shape(w)
    transposed = node.op_type == "ConvTranspose"
    in_per_group, out_per_group = (W[0] // g, W[1]) if transposed else (W[1], W[0] // g)
    gs, within = ctx.table.split(X[1], [g, in_per_group]) if g > 1 else (Fx(1), X[1])
    out_within = ctx.new(out_per_group, node)
    out_c = Prod((gs, out_within))
    if transposed:
        ctx.bind(w, 0, Prod((gs, within)), "consumer", node)
        ctx.bind(w, 1, out_within, "producer", node)
    else:
        ctx.bind(w, 0, out_c, "producer", node)
        ctx.bind(w, 1, within, "consumer", node)
    if len(node.input) > 2 and node.input[2]:
        ctx.bind(node.input[2], 0, out_c, "param", node)
    if g > 1:
        ctx.attr_edits.append(_attr_edit(node, "group", gs))
    if g == 1:
        ctx.layer_axes[node.name] = (within, out_within)
    elif not transposed:
        depthwise = in_per_group == 1 and W[0] == g
        ctx.layer_axes[node.name] = (gs,) if depthwise else (gs, within, out_within)
    out = node.output[0]
    ctx.set(out, [X[0], out_c] + [_out_fx(ctx, out, k) for k in range(2, len(ctx.shape(out)))])


def _slides_over(ctx, node, spatial):
    """Spatial axes are positions, not channels: a window slides over them, so one cannot go
    (a generator's Linear reshaped to (C, 4, 4) gave its 4 x 4 positions channel spaces)."""
    for e in spatial:
        ctx.freeze(e, f"{_desc(node)} slides over these positions")


GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_weight(node) -> str | None:
    """The recurrence weight R of an LSTM, GRU or RNN node (it reads the node's own hidden units),
    else None."""
    return node.input[2] if node.op_type in GATES and node.domain in ("", "ai.onnx") else None


@rule("LSTM", "GRU", "RNN")
def recurrent(ctx, node):
    """Recurrent layers: W (directions, gates x hidden, input) and R (directions, gates x hidden,
    hidden), B (directions, 2 x gates x hidden), LSTM's peepholes P (directions, 3 x hidden). A
    hidden unit goes in every gate of W, R and B, as R's column, from the initial states and the
    outputs, in both directions alike (`hidden_size` is one attribute, and follows). W's input
    axis reads the input's channels."""
    x, w, r = node.input[:3]
    if not (ctx.is_const(w) and ctx.is_const(r)):
        raise Unsupported("weights computed at run time")
    X, gates = ctx.ax(x), GATES[node.op_type]
    hidden = ctx.new(attr(node, "hidden_size"), node)
    ctx.bind(w, 1, Cat((hidden,) * gates), "producer", node)
    ctx.bind(w, 2, X[-1], "consumer", node)
    ctx.bind(r, 1, Cat((hidden,) * gates), "producer", node)
    ctx.bind(r, 2, hidden, "consumer", node)
    inputs = list(node.input) + [""] * 8
    if inputs[3]:
        _bind_or_couple(ctx, node, inputs[3], 1, Cat((hidden,) * 2 * gates))
    for state in inputs[5:7] if node.op_type == "LSTM" else inputs[5:6]:  # (.., .., hidden) either layout
        if state:
            _bind_or_couple(ctx, node, state, 2, hidden)
    if node.op_type == "LSTM" and inputs[7]:
        _bind_or_couple(ctx, node, inputs[7], 1, Cat((hidden,) * 3))
    ctx.attr_edits.append(_attr_edit(node, "hidden_size", hidden))
    for o in node.output:  # Y (.., directions, .., hidden); Y_h and Y_c (.., .., hidden)
        if o:
            shape = ctx.shape(o)
            ctx.set(o, [Fx(d) for d in shape[:-1]] + [hidden])


def _attr_edit(node, name, e):
    from onnx_prune.passes.analysis import AttrEdit

    return AttrEdit(node.name, name, e)


def _contract(ctx, node, a_name, b_name, A, B):
    """Shared MatMul/Gemm logic on 2-D-or-more axis lists (already transposed)."""
    ctx.unify(A[-1], B[-2], f"{_desc(node)} contracts differently laid out channels")
    if ctx.is_const(b_name):
        ctx.produce(B[-1], node)
        _roles(ctx, node, b_name, B, {len(B) - 2: "consumer", len(B) - 1: "producer"})
        ctx.layer_axes[node.name] = (A[-1], B[-1])
    if ctx.is_const(a_name):
        ctx.produce(A[-2], node)
        _roles(ctx, node, a_name, A, {len(A) - 1: "consumer", len(A) - 2: "producer"})


def _roles(ctx, node, init, axes_view, roles):
    """Record roles of a weight's axes; `axes_view` may be a transposed view of ctx.ax(init)."""
    stored = ctx.ax(init)
    for k, role in roles.items():
        idx = next(i for i, e in enumerate(stored) if e is axes_view[k])
        ctx.roles.setdefault(init, []).append((idx, role, node.name))


@rule("MatMul")
def matmul(ctx, node):
    a, b = node.input[0], node.input[1]
    A, B = ctx.ax(a), ctx.ax(b)
    out = node.output[0]
    if len(A) == 1 or len(B) == 1:
        if len(A) == 1:
            ctx.unify(A[0], B[-2], f"{_desc(node)} contracts differently laid out channels")
            ctx.set(out, list(B[:-2]) + [B[-1]])
        else:
            ctx.unify(A[-1], B[0], f"{_desc(node)} contracts differently laid out channels")
            ctx.set(out, list(A[:-1]))
        return
    _contract(ctx, node, a, b, A, B)
    batch = _broadcast_batch(ctx, node, A[:-2], B[:-2], ctx.shape(out)[:-2])
    ctx.set(out, batch + [A[-2], B[-1]])


def _broadcast_batch(ctx, node, A, B, out_shape):
    out = []
    for k, n in enumerate(out_shape):
        cands = []
        for axes in (A, B):
            j = k - (len(out_shape) - len(axes))
            if j >= 0 and ctx.size(axes[j]) == n and n > 1:
                cands.append(axes[j])
        for c in cands[1:]:
            ctx.unify(cands[0], c, f"{_desc(node)} batches differently laid out channels")
        out.append(cands[0] if cands else Fx(n))
    return out


@rule("Einsum")
def einsum(ctx, node):
    """One subscript letter is one axis. A letter shared by operands carries the same channels; a
    constant operand is a weight: its letters found in the activations consume their channels,
    those only it and the output have produce new ones (Keras' attention: 'bsd,dhk->bshk')."""
    eq = attr(node, "equation")
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    if "." in eq or "->" not in eq:
        raise Unsupported("einsum with an ellipsis or an implicit output")
    lhs, rhs = eq.split("->")
    terms, names = lhs.split(","), list(node.input)
    axes = [ctx.ax(i) for i in names]
    if len(terms) != len(names) or any(len(t) != len(a) or len(set(t)) != len(t) for t, a in zip(terms, axes)):
        raise Unsupported("einsum subscripts do not match the operands")
    letters = {}
    weights = {k for k, n in enumerate(names) if ctx.is_const(n)}
    for k in sorted(range(len(names)), key=lambda k: k in weights):  # activations first
        for ch, e in zip(terms[k], axes[k]):
            if ch not in letters:
                if k in weights:
                    if ch not in rhs:
                        ctx.freeze(e, f"{_desc(node)} sums a weight axis")
                    else:
                        ctx.produce(e, node)
                        ctx.roles.setdefault(names[k], []).append((terms[k].index(ch), "producer", node.name))
                letters[ch] = e
                continue
            if ctx.size(e) != ctx.size(letters[ch]):
                ctx.freeze(e, f"{_desc(node)} broadcasts this axis")
                ctx.freeze(letters[ch], f"{_desc(node)} broadcasts this axis")
                continue
            ctx.unify(letters[ch], e, f"{_desc(node)} contracts differently laid out channels")
            if k in weights:
                role = "param" if ch in rhs else "consumer"
                ctx.roles.setdefault(names[k], []).append((terms[k].index(ch), role, node.name))
    ctx.set(node.output[0], [letters[ch] if ch in letters else Fx(d) for ch, d in zip(rhs, ctx.shape(node.output[0]))])


@rule("Gemm")
def gemm(ctx, node):
    a, b = node.input[0], node.input[1]
    A, B = list(ctx.ax(a)), list(ctx.ax(b))
    if attr(node, "transA", 0):
        A = A[::-1]
    if attr(node, "transB", 0):
        B = B[::-1]
    _contract(ctx, node, a, b, A, B)
    out = [A[0], B[1]]
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        C = ctx.ax(c)
        for k in range(len(C)):
            j = k + 2 - len(C)
            if ctx.size(C[k]) > 1:
                ctx.unify(out[j], C[k], f"{_desc(node)} bias layout")
        ctx.roles.setdefault(c, []).extend((k, "param", node.name) for k in range(len(C)) if ctx.size(C[k]) > 1)
    ctx.set(node.output[0], out)


@rule("Gather")
def gather(ctx, node):
    """Embedding lookup from a table creates channels; constant indices into a channel axis pin
    the channels they pick, indices computed at run time the whole axis."""
    data, idx = node.input[0], node.input[1]
    D = ctx.ax(data)
    axis = attr(node, "axis", 0) % len(D)
    I = ctx.ax(idx)
    if ctx.is_const(data) and not ctx.is_const(idx):
        for k, e in enumerate(D):
            if k != axis:
                ctx.produce(e, node)
                ctx.roles.setdefault(data, []).append((k, "producer", node.name))
    elif not _pin_picked(ctx, node, D[axis], idx):
        ctx.freeze(D[axis], f"{_desc(node)} picks channels by index")
    ctx.set(node.output[0], list(D[:axis]) + [Fx(ctx.size(e)) for e in I] + list(D[axis + 1:]))


@rule("GatherND")
def gather_nd(ctx, node):
    """The indices' last axis (of length k) indexes data's k axes after its batch_dims leading
    ones; the axes after those pass through. One indexed axis under constant indices pins only
    the channels they pick (as Gather: torch's dynamo export of x[:, [-2]]); otherwise every
    indexed axis is pinned."""
    data, idx = node.input[:2]
    D, lead = ctx.ax(data), ctx.shape(idx)[:-1]
    b, k = attr(node, "batch_dims", 0), ctx.shape(idx)[-1]
    if not (k == 1 and b == 0 and _pin_picked(ctx, node, D[0], idx)):
        for e in D[b:b + k]:
            ctx.freeze(e, f"{_desc(node)} picks channels by index")
    ctx.set(node.output[0], [D[j] if j < b else Fx(n) for j, n in enumerate(lead)] + list(D[b + k:]))


@rule("ScatterND")
def scatter_nd(ctx, node):
    """data with updates written at index tuples: the indices' last axis (of length k) addresses
    data's first k axes, positions picked by value (pinned, and so are the updates' leading axes,
    one per tuple); the axes after them are written whole, so data, updates and output carry the
    same channels there (torch's dynamo exporter moves a slice assignment's axis first and writes
    it so: Funnel's relative attention, its heads after it). A pruned channel is zero in data and
    updates alike, so it stays zero under every reduction."""
    data, idx, updates = node.input[:3]
    D, U = ctx.ax(data), ctx.ax(updates)
    lead = len(ctx.shape(idx)) - 1
    k = ctx.shape(idx)[-1]
    for e in list(D[:k]) + list(U[:lead]):
        ctx.freeze(e, f"{_desc(node)} writes channels by index")
    for d, u in zip(D[k:], U[lead:]):
        ctx.unify(d, u, f"{_desc(node)} writes these axes whole")
    ctx.set(node.output[0], list(D))


@rule("ScatterElements")
def scatter_elements(ctx, node):
    """data with updates written along `axis` at the indices' values: that axis is picked by value
    (pinned); every other axis pairs data, indices, updates and output position by position (a
    channel prunes in all four, indices and updates sliced with it) where their lengths agree
    (torch's dynamo export of h[:, 0] = v, a select_scatter)."""
    data, idx, updates = node.input[:3]
    D, I, U = ctx.ax(data), ctx.ax(idx), ctx.ax(updates)
    axis = attr(node, "axis", 0) % len(D)
    for e in (D[axis], I[axis], U[axis]):
        ctx.freeze(e, f"{_desc(node)} writes channels by index")
    _pair_positions(ctx, node, axis, D, {"indices": I, "updates": U}, "writes")
    ctx.set(node.output[0], list(D))


@rule("GatherElements")
def gather_elements(ctx, node):
    """out[.., i, ..] = data[.., indices[.., i, ..], ..] along `axis`: every other axis pairs data,
    indices and output position by position (a channel prunes in all three, the indices sliced
    with it), where their lengths agree; the gathered axis is picked by value, and the output
    takes the indices' positions there (sentence-transformers' position ids)."""
    data, idx = node.input[:2]
    D, I = ctx.ax(data), ctx.ax(idx)
    axis = attr(node, "axis", 0) % len(D)
    ctx.freeze(D[axis], f"{_desc(node)} picks channels by index")
    _pair_positions(ctx, node, axis, D, {"indices": I}, "reads")
    ctx.set(node.output[0], list(I))


def _pair_positions(ctx, node, axis, D, others, verb):
    """GatherElements' and ScatterElements' axes other than `axis`: data's pairs with the same axis
    of `others` ({"indices": axes, "updates": axes}, shaped alike) position by position where their
    lengths agree; where the others are shorter, the op `verb`s only the data's first positions,
    and the axis is frozen in all of them."""
    for k, d in enumerate(D):
        if k == axis:
            continue
        if ctx.size(d) == ctx.size(others["indices"][k]):
            for name, axes in others.items():
                ctx.unify(d, axes[k], f"{_desc(node)} pairs data and {name} position by position")
        else:
            for e in [d] + [axes[k] for axes in others.values()]:
                ctx.freeze(e, f"{_desc(node)} {verb} only the first positions of this axis")


PIN_MAX = 64  # constant indices pinned one by one at most; more pin the whole axis


def _pin_picked(ctx, node, e, idx) -> bool:
    """Constant indices into channel axis `e` pin only the channels they pick: the axis is cut
    around them, those pieces freeze and the rest stays prunable. A non-negative index then
    counts the channels kept before it (rewritten by surgery); a negative one counts from the
    end, so every channel from it on is pinned. False, with nothing done, for indices computed
    at run time, out of range, or too many."""
    from onnx_prune.passes.analysis import ValueEdit

    if not ctx.has_channels(e) or not ctx.is_const(idx):
        return False
    flat, n = np.ravel(ctx.const(idx)).astype(np.int64), ctx.size(e)
    if not 0 < len(flat) <= PIN_MAX or np.any(flat >= n) or np.any(flat < -n):
        return False
    picked = {int(v) % n for v in flat}
    tail = min((int(v) % n for v in flat if v < 0), default=n)
    points = sorted({0, n, tail} | picked | {p + 1 for p in picked})
    pieces = dict(zip(points, ctx.table.cut(e, points)))
    for start, piece in pieces.items():
        if start in picked or start >= tail:
            ctx.freeze(piece, f"{_desc(node)} picks channels by index")
    for pos, v in enumerate(flat):
        if v > 0:
            ctx.value_edits.append(ValueEdit(idx, pos, [p for start, p in pieces.items() if start < v]))
    return True


# -- normalization ----------------------------------------------------------------------------


@rule("BatchNormalization")
def batchnorm(ctx, node):
    X = ctx.ax(node.input[0])
    for p in node.input[1:5]:
        if p:
            _bind_or_couple(ctx, node, p, 0, X[1])
    ctx.set(node.output[0], X)


@rule("InstanceNormalization")
def instancenorm(ctx, node):
    """Per channel (axis 1), statistics over the rest: channels reshaped into those axes (GroupNorm
    with few groups, as torch exports it) are mixed by them and cannot be pruned."""
    X = ctx.ax(node.input[0])
    for e in X[2:]:
        ctx.freeze(e, f"normalized over by {_desc(node)}")
    for p in node.input[1:3]:
        _bind_or_couple(ctx, node, p, 0, X[1])
    ctx.set(node.output[0], X)


def _bind_or_couple(ctx, node, name, axis, e):
    """Per-channel parameters: slice them if constant, couple them if computed."""
    if ctx.is_const(name):
        ctx.bind(name, axis, e, "param", node)
    else:
        ctx.unify(ctx.ax(name)[axis], e, f"{_desc(node)} parameter layout")


@rule("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def layernorm(ctx, node):
    """A LayerNorm's mean and variance over the normalized axes mix their channels: those cannot be
    pruned. An RMS norm's can (`_rms_norm`): RMSNormalization (opset 23) and ONNX Runtime's
    SimplifiedLayerNormalization (in the ONNX domain) have a scale and no bias."""
    X = ctx.ax(node.input[0])
    axis = attr(node, "axis", -1) % len(X)
    if node.op_type == "LayerNormalization" or not _rms_norm(ctx, node, X[axis:], node.input[1], (1,)):
        for e in X[axis:]:
            ctx.freeze(e, f"normalized over by {_desc(node)}")
    for p in node.input[1:3]:
        if p:
            P = ctx.ax(p)
            for k in range(len(P)):
                j = len(X) - len(P) + k
                if ctx.size(P[k]) > 1:
                    _bind_or_couple(ctx, node, p, k, X[j])
    ctx.set(node.output[0], X)
    for o in node.output[1:]:
        if o:
            ctx.set(o, [Fx(d) for d in ctx.shape(o)])


def _rms_norm(ctx, node, normalized, scale, stat_outputs) -> bool:
    """Record a NormEdit for an RMS norm over `normalized` (the masked reference's zeros add
    nothing to its sum of squares; epsilon and scale absorb the smaller count), when the edit is
    safe: a constant scale read by this node alone, and no statistics output in use (the inverse
    std would change)."""
    from onnx_prune.passes.analysis import NormEdit

    def used(k):
        o = node.output[k] if k < len(node.output) else ""
        return bool(o) and (bool(ctx.index.consumers.get(o)) or o in ctx.index.graph_outputs)

    if not ctx.is_const(scale) or len(ctx.index.consumers.get(scale, ())) != 1 or any(map(used, stat_outputs)):
        return False
    epsilon = attr(node, "epsilon")
    ctx.norm_edits.append(NormEdit(node.name, list(normalized), scale,
                                   _schema_default(node, "epsilon") if epsilon is None else epsilon))
    return True


def _schema_default(node, name):
    """An attribute's default as ONNX Runtime (which runs the model) declares it: contrib ops'
    schemas are not in the onnx package."""
    value = _ort_default(node.op_type, "" if node.domain in ("", "ai.onnx") else node.domain, name)
    if value is None:
        raise Unsupported(f"no default for attribute '{name}' in ONNX Runtime's schema")
    return value


@functools.lru_cache(maxsize=None)
def _ort_default(op_type, domain, name):
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    for schema in ort_c.get_all_operator_schema():
        if schema.name == op_type and schema.domain == domain and name in schema.attributes:
            proto = onnx.AttributeProto.FromString(schema.attributes[name]._default_value)
            return onnx.helper.get_attribute_value(proto)
    return None


@rule("GroupNormalization")
def groupnorm(ctx, node):
    """Statistics per group of C / num_groups channels: the channels of a group are mixed by them
    and stay, whole groups can go (num_groups follows). Scale and bias hold one value per group
    up to opset 20, per channel from opset 21."""
    X = ctx.ax(node.input[0])
    for e in X[2:]:
        ctx.freeze(e, f"normalized over by {_desc(node)}")
    g, c = attr(node, "num_groups"), ctx.size(X[1])
    if g == 1:
        ctx.freeze(X[1], f"normalized over by {_desc(node)} (one group)")
    groups, within = ctx.table.split(X[1], [g, c // g]) if 1 < g < c else (X[1], None)
    if within is not None:
        ctx.freeze(within, f"channels of one group, normalized together by {_desc(node)}")
    for p in node.input[1:3]:
        _bind_or_couple(ctx, node, p, 0, X[1] if ctx.shape(p)[0] == c else groups)
    if g > 1:
        ctx.attr_edits.append(_attr_edit(node, "num_groups", groups))
    ctx.set(node.output[0], X)


@rule("LRN")
def channel_mixing_norm(ctx, node):
    X = ctx.ax(node.input[0])
    ctx.freeze(X[1], f"{_desc(node)} mixes neighbouring channels")
    for p in node.input[1:]:
        if p:
            ctx.freeze_tensor(p, f"{_desc(node)} parameters")
    ctx.set(node.output[0], X)


@rule("MeanVarianceNormalization")
def mean_variance_norm(ctx, node):
    """Statistics over `axes` (batch and positions by default): each channel on its own, so the
    channels prune; the axes it normalizes over stay."""
    X = ctx.ax(node.input[0])
    for a in attr(node, "axes", [0, 2, 3]):
        ctx.freeze(X[a % len(X)], f"normalized over by {_desc(node)}")
    ctx.set(node.output[0], X)


@rule("Softmax", "LogSoftmax", "Hardmax", "LpNormalization")
def softmax(ctx, node):
    """Values along one axis read together; the other axes pass through."""
    X = ctx.ax(node.input[0])
    axis = attr(node, "axis", -1) % len(X)
    ctx.freeze(X[axis], f"{_desc(node)} normalizes over these channels")
    ctx.set(node.output[0], X)


@rule("CumSum")
def cumulative(ctx, node):
    """A running sum along one axis (a constant input); the other axes pass through."""
    X = ctx.ax(node.input[0])
    axis = ctx.const(node.input[1])
    if axis is None:
        raise Unsupported("cumulative axis computed at run time")
    ctx.freeze(X[int(np.ravel(axis)[0]) % len(X)], f"{_desc(node)} accumulates along these channels")
    ctx.set(node.output[0], X)


@rule("TopK")
def top_k(ctx, node):
    """The k largest (or smallest) along one axis, values and their indices: that axis stays,
    the others pass through to both outputs."""
    X = ctx.ax(node.input[0])
    axis = attr(node, "axis", -1) % len(X)
    ctx.freeze(X[axis], f"{_desc(node)} ranks along these channels")
    for o in node.output:
        if o:
            ctx.set(o, [_out_fx(ctx, o, axis) if d == axis else e for d, e in enumerate(X)])


@rule("ReverseSequence")
def reverse_sequence(ctx, node):
    """Each sequence reversed up to its length (tf2onnx's bidirectional recurrent layers): the
    batch and time axes stay, the features pass through."""
    X = ctx.ax(node.input[0])
    for name, default in (("batch_axis", 1), ("time_axis", 0)):
        ctx.freeze(X[attr(node, name, default) % len(X)], f"{_desc(node)} reverses sequences along these axes")
    ctx.freeze_tensor(node.input[1], f"{_desc(node)} sequence lengths")
    ctx.set(node.output[0], X)


@rule("Trilu")
def trilu(ctx, node):
    """Keeps a triangle of every matrix over the last two axes, by position: those stay, the
    axes before them (heads of a score matrix) pass through."""
    X = ctx.ax(node.input[0])
    for e in X[-2:]:
        ctx.freeze(e, f"{_desc(node)} keeps positions of these axes")
    ctx.set(node.output[0], X)


@rule("Compress")
def compress(ctx, node):
    """Picks slices along `axis` by a mask: that axis stays (the mask is sized by it), the others
    pass through; without an axis the input is flattened first, and everything stays."""
    X, axis = ctx.ax(node.input[0]), attr(node, "axis")
    if axis is None:
        unknown(ctx, node, f"{_desc(node)} picks by a mask over a flattened input")
        return
    axis %= len(X)
    ctx.freeze(X[axis], f"{_desc(node)} picks along these channels")
    ctx.freeze_tensor(node.input[1], f"{_desc(node)} mask")
    ctx.set(node.output[0], [_out_fx(ctx, node.output[0], k) if k == axis else e for k, e in enumerate(X)])


REDUCE = "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare".split()


# Reductions that the masked reference's zeros do not change: a removed channel adds nothing to a
# sum, and a mean keeps its dense divisor through MeanEdit. Max, min, product and log-sum-exp see
# the zeros, so their channels stay.
ZERO_BLIND = {"ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceMean"}


def _mean_edit(ctx, node, exprs):
    from onnx_prune.passes.analysis import MeanEdit

    dtype = ctx.index.dtypes.get(node.output[0]) or ctx.index.dtypes.get(node.input[0]) or onnx.TensorProto.FLOAT
    return MeanEdit(node.name, exprs, dtype)


@rule(*REDUCE)
def reduce(ctx, node):
    X = ctx.ax(node.input[0])
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.const(node.input[1])
        if axes is None:
            raise Unsupported("reduction axes computed at run time")
    axes = list(range(len(X))) if axes is None or len(axes) == 0 else [int(a) % len(X) for a in np.ravel(axes)]
    if attr(node, "noop_with_empty_axes", 0) and axes == list(range(len(X))) and attr(node, "axes") is None and len(node.input) < 2:
        ctx.set(node.output[0], X)
        return
    if node.op_type in ZERO_BLIND:
        if node.op_type == "ReduceMean":
            ctx.mean_edits.append(_mean_edit(ctx, node, [X[a] for a in axes]))
    else:
        for a in axes:
            ctx.freeze(X[a], f"{_desc(node)} reduces over these channels")
    keep = attr(node, "keepdims", 1)
    out = [Fx(1) if k in axes else e for k, e in enumerate(X) if keep or k not in axes]
    ctx.set(node.output[0], out)


@rule("ArgMax", "ArgMin")
def argreduce(ctx, node):
    X = ctx.ax(node.input[0])
    axis = attr(node, "axis", 0) % len(X)
    ctx.freeze(X[axis], f"{_desc(node)} reduces over these channels")
    keep = attr(node, "keepdims", 1)
    ctx.set(node.output[0], [Fx(1) if k == axis else e for k, e in enumerate(X) if keep or k != axis])


# -- spatial ops: channels pass, spatial axes are fixed --------------------------------------


@rule("MaxRoiPool", "RoiAlign", "GridSample")
def sampled_regions(ctx, node):
    """Each channel sampled at positions (regions of interest, a sampling grid) on its own: the
    channels pass, the positions stay, and what says where to sample carries no channel."""
    X = ctx.ax(node.input[0])
    for e in X[2:]:
        ctx.freeze(e, f"{_desc(node)} samples at these positions")
    for where in node.input[1:]:
        if where:
            ctx.freeze_tensor(where, f"{_desc(node)} sampling positions")
    out = node.output[0]
    ctx.set(out, [_out_fx(ctx, out, 0), X[1]] + [_out_fx(ctx, out, k) for k in range(2, len(ctx.shape(out)))])


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pooling(ctx, node):
    X = ctx.ax(node.input[0])
    _slides_over(ctx, node, X[2:])
    out = node.output[0]
    ctx.set(out, [X[0], X[1]] + [_out_fx(ctx, out, k) for k in range(2, len(ctx.shape(out)))])
    if len(node.output) > 1 and node.output[1]:
        ctx.freeze(X[1], f"{_desc(node)} returns indices")
        ctx.set(node.output[1], [Fx(d) for d in ctx.shape(node.output[1])])


@rule("DepthToSpace", "SpaceToDepth")
def depth_space(ctx, node):
    """DepthToSpace (a super-resolution net's pixel shuffle) spreads each output channel over r x r
    input channels: channel-major in mode CRD (c, r x r), block-major in DCR (r x r, c). An output
    channel prunes with its r x r inputs. SpaceToDepth gathers the blocks back, block-major."""
    X = ctx.ax(node.input[0])
    _slides_over(ctx, node, X[2:])
    blocks = attr(node, "blocksize") ** 2
    out = node.output[0]
    spatial = [_out_fx(ctx, out, k) for k in range(2, len(ctx.shape(out)))]
    if node.op_type == "SpaceToDepth":
        ctx.set(out, [X[0], Prod((Fx(blocks), X[1]))] + spatial)
        return
    channels = ctx.size(X[1]) // blocks
    if attr(node, "mode", b"DCR") == b"CRD":
        c, block = ctx.table.split(X[1], [channels, blocks])
    else:
        block, c = ctx.table.split(X[1], [blocks, channels])
    ctx.freeze(block, f"{_desc(node)} spreads these channels over one block of positions")
    ctx.set(out, [X[0], c] + spatial)


@rule("Resize", "Upsample", "Pad", "Expand", "Tile")
def resize_like(ctx, node):
    """Axes keep their channels where the size is unchanged; changed axes must not carry any. An
    axis Expand broadcasts from 1 gets a space of its own (its copies are alike, so any of them
    can go, its target size follows): where it meets channels (repeat_kv's copies of a key/value
    head, one per query head of its group) it prunes with them, else it stays as it is."""
    X = ctx.ax(node.input[0])
    out = node.output[0]
    shape = ctx.shape(out)
    if len(shape) != len(X):
        if node.op_type != "Expand":
            raise Unsupported("rank change")
        X = [Fx(1)] * (len(shape) - len(X)) + list(X)
    res = []
    for k, e in enumerate(X):
        if ctx.size(e) == shape[k]:
            res.append(e)
        elif ctx.size(e) == 1:
            res.append(ctx.new(shape[k], node, weak=True) if node.op_type == "Expand" else Fx(shape[k]))
        else:
            ctx.freeze(e, f"{_desc(node)} changes the size of this axis")
            res.append(Fx(shape[k]))
    if node.op_type == "Pad":
        _pad_check(ctx, node, X)
    if node.op_type == "Expand":
        _shape_target(ctx, node, node.input[1], res, list(X))
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
        _shape_target(ctx, node, node.input[3], res, list(X))
    ctx.set(out, res)


def _pad_check(ctx, node, X):
    pads = attr(node, "pads")
    if pads is None:
        pads = ctx.const(node.input[1]) if len(node.input) > 1 else None
    if pads is None:
        raise Unsupported("pads computed at run time")
    pads = np.ravel(pads)
    axes = list(range(len(X)))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(a) % len(X) for a in np.ravel(ctx.const(node.input[3]))]
    n = len(axes)
    for i, a in enumerate(axes):
        if pads[i] or pads[i + n]:
            ctx.freeze(X[a], f"{_desc(node)} pads this axis")


# -- layout ops -------------------------------------------------------------------------------


@rule("Transpose")
def transpose(ctx, node):
    X = ctx.ax(node.input[0])
    perm = attr(node, "perm") or list(range(len(X)))[::-1]
    ctx.set(node.output[0], [X[p] for p in perm])


@rule("Squeeze", "Unsqueeze", "Flatten", "Reshape")
def reshape(ctx, node):
    """Match input and output dims in blocks of equal product; merge, then factor each block."""
    X = ctx.ax(node.input[0])
    in_shape = [ctx.size(e) for e in X]
    out = node.output[0]
    out_shape = list(ctx.shape(out))
    exprs = [e for e, d in zip(X, in_shape) if d != 1]
    big_out = [d for d in out_shape if d != 1]
    res_big = []
    i = 0
    for blk in _blocks([ctx.size(e) for e in exprs], big_out):
        ins, outs = blk
        merged = Prod(tuple(exprs[i:i + ins]))
        i += ins
        try:
            res_big.extend(ctx.table.split(merged, outs))
        except Unsupported:
            ctx.freeze(merged, f"{_desc(node)} reshapes channels in a way that cannot be pruned")
            res_big.extend(Fx(d) for d in outs)
    it = iter(res_big)
    res = [Fx(1) if d == 1 else next(it) for d in out_shape]
    if node.op_type == "Reshape":
        _shape_target(ctx, node, node.input[1], res, X)
    ctx.set(out, res)


def _blocks(a, b):
    """Pair runs of `a` and `b` with equal products: [(len_a_run, b_run_sizes), ...]."""
    blocks, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i >= len(a) or j >= len(b):
            raise Unsupported("reshape sizes do not match")
        pa, pb, si, sj = a[i], b[j], i, j
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    raise Unsupported("reshape sizes do not match")
                pa *= a[i]
                i += 1
            else:
                if j >= len(b):
                    raise Unsupported("reshape sizes do not match")
                pb *= b[j]
                j += 1
        blocks.append((i - si, b[sj:j]))
    return blocks


def _shape_target(ctx, node, shape_name, out_exprs, in_exprs):
    """A shape vector (Reshape/Expand) must give pruned axes their kept size."""
    from onnx_prune.passes.analysis import ValueEdit

    sources = shape_sources(ctx, shape_name)
    for k, e in enumerate(out_exprs):
        src = sources[k] if sources is not None and k < len(sources) else ("unknown",)
        if not ctx.has_channels(e):
            # a channel count read at run time must not size an axis that keeps its size
            for dim in _dims_read(src):
                ctx.freeze(ctx.ax(dim[1])[dim[2]], f"its size is read at run time into {_desc(node)}")
            continue
        if src[0] == "const":
            _, init, pos, value = src
            if value == -1 or (value == 1 and node.op_type == "Expand"):
                continue
            if value == 0 and node.op_type == "Reshape" and k < len(in_exprs):
                ctx.unify(in_exprs[k], e, f"{_desc(node)} copies this dim from its input")
            ctx.value_edits.append(ValueEdit(init, pos, [e]))
        elif src[0] == "dim":
            ctx.unify(ctx.ax(src[1])[src[2]], e, f"{_desc(node)} target shape read at run time")
        elif src[0] == "max":  # broadcast batch dims of a batched matmul: both carry these channels
            for dim in src[1:]:
                ctx.unify(ctx.ax(dim[1])[dim[2]], e, f"{_desc(node)} target shape read at run time")
        elif src[0] == "prod" and ctx.table.norm(Prod(tuple(_source_expr(ctx, x) for x in src[1]))) \
                == ctx.table.norm(e):
            continue  # the product is computed at run time from the pruned dims
        elif src[0] == "mul" and _dim_times_const(ctx, node, e, src):
            continue
        else:
            ctx.freeze(e, f"{_desc(node)} target shape computed at run time")


def _dims_read(src) -> list:
    """The ('dim', tensor, axis) reads a traced shape entry is computed from."""
    kind = src[0]
    if kind == "dim":
        return [src]
    if kind == "mul":
        return [src[1]]
    if kind == "max":
        return list(src[1:])
    if kind == "prod":
        return [x for x in src[1] if x[0] == "dim"]
    return []


def _dim_times_const(ctx, node, e, src):
    """A target dim computed as (dim read at run time) x (constant), e.g. batch x heads:
    the constant must give the channel part's kept size."""
    from onnx_prune.passes.analysis import ValueEdit

    _, dim, const = src
    lead = ctx.ax(dim[1])[dim[2]]
    n = ctx.table.norm(e)
    if ctx.has_channels(lead):
        return False
    if ctx.size(lead) == 1:
        rest = n
    elif isinstance(n, Prod) and n.items[0] == Fx(ctx.size(lead)):
        rest = Prod(tuple(n.items[1:]))
    else:
        return False
    if ctx.size(rest) != const[3]:
        return False
    ctx.value_edits.append(ValueEdit(const[1], const[2], [rest]))
    return True


def shape_sources(ctx, name):
    """Trace a 1-D shape tensor element by element: ('const', init, pos, value), ('dim', t, axis)
    or ('unknown',). Covers the Shape/Gather/Concat/Unsqueeze chains exporters emit."""
    if ctx.is_const(name):
        v = np.ravel(ctx.const(name))
        return [("const", name, i, int(x)) for i, x in enumerate(v)]
    node = ctx.index.producer.get(name)
    shape = ctx.shape(name)
    n = int(np.prod(shape)) if shape is not None else 0
    unknown_ = [("unknown",)] * n
    if node is None:
        return unknown_
    op = node.op_type
    if op == "Shape":
        rank = len(ctx.ax(node.input[0]) or [])
        start = attr(node, "start", 0)
        end = attr(node, "end", rank)
        start, end = [min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end)]
        return [("dim", node.input[0], a) for a in range(start, end)]
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape", "Flatten"):
        return shape_sources(ctx, node.input[0])
    if op == "Mul" and len(node.input) == 2:
        a, b = (shape_sources(ctx, i) for i in node.input)
        if a and b and len(a) == len(b):
            out = []
            for x, y in zip(a, b):
                x, y = (x, y) if x[0] == "dim" else (y, x)
                out.append(("mul", x, y) if x[0] == "dim" and y[0] == "const" else ("unknown",))
            return out
        return unknown_
    if op == "ReduceProd":
        return _prod_sources(ctx, node) or unknown_
    if op == "Max" and len(node.input) == 2:
        a, b = (shape_sources(ctx, i) for i in node.input)
        if a and b and len(a) == len(b) and all(x[0] == y[0] == "dim" for x, y in zip(a, b)):
            return [("max", x, y) for x, y in zip(a, b)]
        return unknown_
    if op == "Where":
        return _where_sources(ctx, node) or unknown_
    if op == "Concat":
        srcs = [shape_sources(ctx, i) for i in node.input]
        return None if any(s is None for s in srcs) else [x for s in srcs for x in s]
    if op in ("Gather", "Slice"):
        base = shape_sources(ctx, node.input[0])
        if base is None:
            return unknown_
        if op == "Gather":
            idx = ctx.const(node.input[1])
            if idx is None:
                return unknown_
            return [base[int(i)] for i in np.ravel(idx)]
        params = [ctx.const(i) if i else None for i in node.input[1:]]
        if any(p is None for p in params[:2]) or (len(params) > 2 and params[2] is not None and int(np.ravel(params[2])[0]) != 0):
            return unknown_
        step = int(np.ravel(params[3])[0]) if len(params) > 3 and params[3] is not None else 1
        return base[slice(int(np.ravel(params[0])[0]), int(np.ravel(params[1])[0]), step)]
    return unknown_


def _prod_sources(ctx, node):
    """tf2onnx merges batched-matmul axes (batch x heads) as ReduceProd over dims read at run
    time: one entry, ('prod', sources), when it reduces the whole traced vector."""
    axes = attr(node, "axes") or (ctx.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None)
    if (axes is not None and len(np.ravel(axes))) or attr(node, "noop_with_empty_axes", 0):
        return None
    base = shape_sources(ctx, node.input[0])
    if not base or not all(x[0] in ("dim", "const") for x in base):
        return None
    return [("prod", tuple(base))]


def _source_expr(ctx, src):
    """The channel expression of a traced dim or constant entry."""
    return ctx.ax(src[1])[src[2]] if src[0] == "dim" else Fx(src[3])


def _where_sources(ctx, node):
    """torch exports expand(..., -1, ...) as Where(Equal(shape, -1), 1, shape), whose condition
    canonicalization folds to a constant: entries it picks from the ones stay 1 (Expand keeps the
    input's size there); the rest trace the shape."""
    cond, ones = ctx.const(node.input[0]), ctx.const(node.input[1])
    shape = shape_sources(ctx, node.input[2])
    if cond is None or ones is None or not np.all(ones == 1) or not shape:
        return None
    cond = np.broadcast_to(np.ravel(cond), (len(shape),))
    return [("const", node.input[1], 0 if np.size(ones) == 1 else i, 1) if c else src
            for i, (c, src) in enumerate(zip(cond, shape))]


@rule("Concat")
def concat(ctx, node):
    ins = [i for i in node.input if i]
    axes = [ctx.ax(i) for i in ins]
    axis = attr(node, "axis") % len(axes[0])
    out = list(axes[0])
    for other in axes[1:]:
        for k in range(len(out)):
            if k != axis:
                ctx.unify(out[k], other[k], f"{_desc(node)} joins differently laid out channels")
    out[axis] = Cat(tuple(a[axis] for a in axes))
    ctx.set(node.output[0], out)


@rule("Split")
def split(ctx, node):
    from onnx_prune.passes.analysis import SplitEdit

    X = ctx.ax(node.input[0])
    axis = attr(node, "axis", 0) % len(X)
    sizes = [ctx.shape(o)[axis] for o in node.output]
    pieces = ctx.table.cut(X[axis], np.cumsum([0] + sizes))
    for o, p in zip(node.output, pieces):
        ctx.set(o, X[:axis] + [p] + X[axis + 1:])
    if ctx.has_channels(X[axis]):
        ctx.split_edits.append(SplitEdit(node.name, pieces))


@rule("Slice")
def slice_(ctx, node):
    from onnx_prune.passes.analysis import ValueEdit

    X = ctx.ax(node.input[0])
    params = [ctx.const(i) if i else None for i in list(node.input[1:5]) + [""] * 4][:4]
    if params[0] is None or params[1] is None or (len(node.input) > 3 and node.input[3] and params[2] is None) \
            or (len(node.input) > 4 and node.input[4] and params[3] is None):
        for e in X:
            ctx.freeze(e, f"{_desc(node)} bounds computed at run time")
        ctx.set(node.output[0], [Fx(d) for d in ctx.shape(node.output[0])])
        return
    starts, ends = np.ravel(params[0]), np.ravel(params[1])
    axes = np.ravel(params[2]) if params[2] is not None else np.arange(len(starts))
    steps = np.ravel(params[3]) if params[3] is not None else np.ones(len(starts), dtype=np.int64)
    out = list(X)
    for i, a in enumerate(axes):
        a = int(a) % len(X)
        e, n = X[a], ctx.size(X[a])
        s, t, step = int(starts[i]), int(ends[i]), int(steps[i])
        s0 = min(max(s + n if s < 0 else s, 0), n)
        t0 = min(max(t + n if t < 0 else t, 0), n)
        if not ctx.has_channels(e):
            out[a] = Fx(ctx.shape(node.output[0])[a])
            continue
        if step != 1:
            ctx.freeze(e, f"{_desc(node)} takes strided channels")
            out[a] = Fx(ctx.shape(node.output[0])[a])
            continue
        before, mid, _after = _cut3(ctx, e, s0, max(t0, s0), n)
        out[a] = mid
        if s0 > 0:
            ctx.value_edits.append(ValueEdit(node.input[1], i, [before]))
        if t0 < n:
            ctx.value_edits.append(ValueEdit(node.input[2], i, [before, mid]))
    ctx.set(node.output[0], out)


def _cut3(ctx, e, s, t, n):
    """Cut into (before, middle, after), any of which may be empty."""
    pts = sorted({0, s, t, n})
    pieces = ctx.table.cut(e, pts)
    named = dict(zip(pts, pieces))
    before = named.get(0) if s > 0 else Fx(0)
    mid = named.get(s) if t > s else Fx(0)
    after = named.get(t) if t < n else Fx(0)
    return before, mid, after


@rule("Shape", "Size")
def shape_op(ctx, node):
    """Reading a channel axis's size at run time would change after pruning: pin it."""
    X = ctx.ax(node.input[0])
    if node.op_type == "Size":
        read = range(len(X))
    else:
        rank = len(X)
        start, end = [min(max(v + rank if v < 0 else v, 0), rank) for v in (attr(node, "start", 0), attr(node, "end", rank))]
        read = range(start, end)
        if _only_feeds_shape_targets(ctx, node.output[0]):
            read = []  # Reshape/Expand/Resize check their targets against the channels
        else:
            picked = _picked_dims(ctx, node, start, end)
            read = read if picked is None else picked
    for a in read:
        ctx.freeze(X[a], f"its size is read at run time by {_desc(node)}")
    ctx.set(node.output[0], [Fx(d) for d in ctx.shape(node.output[0])])


SHAPE_PLUMBING = ("Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "ReduceProd", "Max")
SHAPE_JOINS = ("Concat", "Max")  # plumbing whose every input is shape data
SHAPE_TARGETS = {("Reshape", 1), ("Expand", 1), ("Resize", 3), ("ConstantOfShape", 0)}


def _only_feeds_shape_targets(ctx, name, depth=0):
    """True if a shape value only reaches target-shape inputs, through plain shape plumbing."""
    users = ctx.index.consumers.get(name, [])
    if not users or depth > 16 or name in ctx.index.graph_outputs:
        return not users and name not in ctx.index.graph_outputs
    for user, slot in users:
        if (user.op_type, slot) in SHAPE_TARGETS:
            continue
        if user.op_type in SHAPE_PLUMBING and (slot == 0 or user.op_type in SHAPE_JOINS):
            if all(_only_feeds_shape_targets(ctx, o, depth + 1) for o in user.output if o):
                continue
        return False
    return True


def _picked_dims(ctx, node, start, end):
    """If every consumer of a Shape only picks constant dims (Gather/Slice), the dims it reads."""
    picked = set()
    dims = np.arange(start, end)
    for user, slot in ctx.index.consumers.get(node.output[0], []):
        params = [ctx.const(i) for i in user.input[1:]]
        if slot != 0 or any(p is None for p in params):
            return None
        if user.op_type == "Gather":
            picked.update(int(dims[int(i)]) for i in np.ravel(params[0]))
        elif user.op_type == "Slice":
            s, e = int(np.ravel(params[0])[0]), int(np.ravel(params[1])[0])
            step = int(np.ravel(params[3])[0]) if len(params) > 3 else 1
            picked.update(int(d) for d in dims[s:e:step])
        else:
            return None
    return sorted(picked)


@rule("ConstantOfShape")
def constant_of_shape(ctx, node):
    """One value repeated: any axis can shrink, its target size with it (the zero initial state of
    a recurrent layer, sized by its hidden width)."""
    res = [ctx.new(d, node, weak=True) for d in ctx.shape(node.output[0])]
    _shape_target(ctx, node, node.input[0], res, [])
    ctx.set(node.output[0], res)


@rule("Range", "NonZero", "EyeLike", "RandomNormalLike", "RandomUniformLike")
def value_source(ctx, node):
    """Outputs built from values, not from channels; inputs that carry channels are pinned."""
    unknown(ctx, node, f"{_desc(node)} reads values")


def supported_ops():
    return sorted(RULES)
