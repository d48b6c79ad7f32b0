"""Torch implementations of ONNX ops for the training bridge (`torch_graph.TorchGraph`).

One function per op type, all listed in one table, `OPS`. Each takes `(a, x)`: `a` the node's
attributes (parsed once at construction, plus `_opset`, `_nout` and `_ctx`, the graph's shared
{"training", "device"} state) and `x` the list of inputs (None for an omitted optional input),
and returns the list of outputs.

`@_op(...)` tags a function with what the graph needs to know before running it:
- host: input positions read as Python numbers (shapes, axes, pads, scales, bounds). They are
  never trainable; when the input is a constant it is converted once, at construction, so
  forward does no device-to-host copies for it. At run time the op accepts a tensor there too.
- frozen: other input positions that never get a gradient (indices, running statistics, exponents).
- nout: how many outputs the function returns (None: as many as the node has).
- check: attrs -> reason string when the function cannot honour the attributes (raised at
  construction, never in the middle of forward).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto

from onnx_prune.errors import UserError
from onnx_prune.passes.graph import CONTRIB, same_pads

DTYPES = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}

# Ops whose scalar constant operands (epsilons, attention scales, exponents) are graph constants, not weights.
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Clip", "Mod",
})


def _op(host=(), frozen=(), nout=1, check=None):
    def tag(fn):
        fn.host, fn.frozen, fn.nout, fn.check = tuple(host), tuple(frozen), nout, check
        return fn
    return tag


# ---------------------------------------------------------------- helpers


def host(v):
    """A host-side value: tensors become Python numbers or lists."""
    return v.tolist() if isinstance(v, torch.Tensor) else v


def _list(v):
    v = host(v)
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _opt(x, i):
    return x[i] if len(x) > i else None


def _axis(axis, rank):
    return axis + rank if axis < 0 else axis


def _torch_pads(begin, end):
    """ONNX (begins, ends) per axis, first axis first -> F.pad's order, last axis first."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


# Table entries built from a torch function are partials, not closures, so a TorchGraph pickles.
def _run_unary(f, a, x):
    return [f(x[0])]


def _run_binary(f, a, x):
    return [f(x[0], x[1])]


def _run_variadic(f, a, x):
    return [functools.reduce(f, x)]


def _unary(f):
    return _op()(functools.partial(_run_unary, f))


def _binary(f):
    return _op()(functools.partial(_run_binary, f))


def _variadic(f):
    return _op()(functools.partial(_run_variadic, f))


# ---------------------------------------------------------------- elementwise


def _div(a, x):
    p, q = x
    if p.is_floating_point() or q.is_floating_point():
        return [p / q]
    return [torch.div(p, q, rounding_mode="trunc")]  # ONNX integer division truncates


@_op(frozen=(1,))
def _pow(a, x):
    y = torch.pow(x[0], x[1])
    return [y if y.dtype == x[0].dtype else y.to(x[0].dtype)]  # ONNX: result has the base's type


def _mod(a, x):
    return [torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])]


def _mean(a, x):
    return [functools.reduce(torch.add, x) / len(x)]


@_op(frozen=(0,))
def _where(a, x):
    return [torch.where(x[0], x[1], x[2])]


@_op(host=(1, 2))
def _clip(a, x):
    if a["_opset"] < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = _opt(x, 1), _opt(x, 2)
    if lo is None and hi is None:
        return [x[0]]
    return [torch.clamp(x[0], lo, hi)]


def _hard_sigmoid(a, x):
    return [torch.clamp(x[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0.0, 1.0)]


def _leaky_relu(a, x):
    return [F.leaky_relu(x[0], a.get("alpha", 0.01))]


def _elu(a, x):
    return [F.elu(x[0], a.get("alpha", 1.0))]


def _celu(a, x):
    return [F.celu(x[0], a.get("alpha", 1.0))]


def _selu(a, x):
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    v = x[0]
    return [gamma * torch.where(v > 0, v, alpha * torch.expm1(v))]


def _thresholded_relu(a, x):
    v = x[0]
    return [torch.where(v > a.get("alpha", 1.0), v, torch.zeros_like(v))]


def _prelu(a, x):
    v, slope = x
    return [torch.where(v < 0, v * slope, v)]


def _gelu(a, x):
    return [F.gelu(x[0], approximate=a.get("approximate", "none"))]


# ---------------------------------------------------------------- linear algebra


def _matmul(a, x):
    return [torch.matmul(x[0], x[1])]


def _gemm(a, x):
    A, B, C = x[0], x[1], _opt(x, 2)
    if a.get("transA", 0):
        A = A.t()
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if a.get("transB", 0):
        if C is not None and alpha == 1.0 and beta == 1.0 and C.dim() == 1:
            return [F.linear(A, B, C)]
        B = B.t()
    if C is None or beta == 0.0:
        y = torch.mm(A, B)
        return [y * alpha if alpha != 1.0 else y]
    return [torch.addmm(C, A, B, beta=beta, alpha=alpha)]


def _einsum(a, x):
    return [torch.einsum(a["equation"], *x)]


# ---------------------------------------------------------------- convolution and pooling

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _window_pads(a, size, kernel, strides, dilations):
    """(begin, end) pads per spatial axis, from `pads` or `auto_pad`."""
    r = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(auto, size, kernel, strides, dilations)
    if auto == "VALID":
        return [0] * r, [0] * r
    pads = a.get("pads") or [0] * (2 * r)
    return list(pads[:r]), list(pads[r:])


def _geometry(a, size, kernel):
    r = len(kernel)
    strides = list(a.get("strides") or [1] * r)
    dilations = list(a.get("dilations") or [1] * r)
    begin, end = _window_pads(a, size, kernel, strides, dilations)
    return strides, dilations, begin, end


def _check_rank(a):
    k = a.get("kernel_shape")
    if k is not None and len(k) not in _CONV:
        return f"{len(k)}-d windows"
    return None


@_op(check=_check_rank)
def _conv(a, x):
    X, W, B = x[0], x[1], _opt(x, 2)
    kernel = list(W.shape[2:])
    strides, dilations, begin, end = _geometry(a, list(X.shape[2:]), kernel)
    if begin != end:  # torch pads symmetrically only
        X, begin = F.pad(X, _torch_pads(begin, end)), [0] * len(kernel)
    return [_CONV[len(kernel)](X, W, B, strides, begin, dilations, a.get("group", 1))]


def _conv_transpose_pads(a, size, kernel, strides, dilations, out_pad):
    """(begin, end) crops of the full transposed output; from a target shape, the odd pixel is
    cropped at the end for SAME_UPPER, at the start otherwise (as onnxruntime does)."""
    r = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    shape = a.get("output_shape")
    if shape is None and auto not in ("SAME_UPPER", "SAME_LOWER"):
        if auto == "VALID":
            return [0] * r, [0] * r
        pads = a.get("pads") or [0] * (2 * r)
        return list(pads[:r]), list(pads[r:])
    targets = list(shape[-r:]) if shape is not None else [n * s for n, s in zip(size, strides)]
    begin, end = [], []
    for n, k, s, d, o, t in zip(size, kernel, strides, dilations, out_pad, targets):
        total = max(0, (n - 1) * s + o + (k - 1) * d + 1 - t)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin, end


@_op(check=_check_rank)
def _conv_transpose(a, x):
    X, W, B = x[0], x[1], _opt(x, 2)
    kernel = list(W.shape[2:])
    r = len(kernel)
    strides = list(a.get("strides") or [1] * r)
    dilations = list(a.get("dilations") or [1] * r)
    out_pad = list(a.get("output_padding") or [0] * r)
    begin, end = _conv_transpose_pads(a, list(X.shape[2:]), kernel, strides, dilations, out_pad)
    group = a.get("group", 1)
    fn = _CONV_T[r]
    if begin == end and all(o < max(s, d) for o, s, d in zip(out_pad, strides, dilations)):
        return [fn(X, W, B, strides, begin, out_pad, group, dilations)]
    # General case: full output, then crop (negative pad) the begin/end and extend by output_padding.
    y = fn(X, W, None, strides, 0, 0, group, dilations)
    y = F.pad(y, _torch_pads([-b for b in begin], [o - e for o, e in zip(out_pad, end)]))
    return [y if B is None else y + B.reshape([1, -1] + [1] * r)]


def _check_max_pool(a):
    return "storage_order=1" if a.get("storage_order", 0) else _check_rank(a)


def _check_avg_pool(a):
    return "dilations" if any(d != 1 for d in a.get("dilations") or ()) else _check_rank(a)


def _torch_pool_ok(begin, end, kernel, dilations):
    return begin == end and all(p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(begin, kernel, dilations))


def _unravel_to(indices, padded, size, begin):
    """Flat indices into the padded spatial plane -> flat indices into the unpadded one."""
    out, rest = torch.zeros_like(indices), indices
    coords = []
    for n in reversed(padded):
        coords.append(rest % n)
        rest = rest // n
    for c, n, b in zip(reversed(coords), size, begin):
        out = out * n + (c - b)
    return out


def _pool_padded(fn, X, a, kernel, strides, dilations, begin, end, value, *args):
    """Pooling with pads torch cannot express: pad first, pool, then drop a ceil_mode window that
    would start in the end padding (onnxruntime's rule, measured against the unpadded input)."""
    size = list(X.shape[2:])
    y = fn(F.pad(X, _torch_pads(begin, end), value=value), kernel, strides, 0, *args)
    ys = y if isinstance(y, torch.Tensor) else y[0]
    index = [slice(None), slice(None)]
    for n, k, s, d, b, e in zip(size, kernel, strides, dilations, begin, end):
        span = n + b + e - ((k - 1) * d + 1)
        out = (math.ceil(span / s) if a.get("ceil_mode", 0) else span // s) + 1
        if a.get("ceil_mode", 0) and (out - 1) * s >= n + b:
            out -= 1
        index.append(slice(0, out))
    if all(sl.stop == m for sl, m in zip(index[2:], ys.shape[2:])):
        return y
    index = tuple(index)
    return ys[index] if isinstance(y, torch.Tensor) else (y[0][index], y[1][index])


@_op(nout=2, check=_check_max_pool)
def _max_pool(a, x):
    X = x[0]
    kernel = list(a["kernel_shape"])
    size = list(X.shape[2:])
    strides, dilations, begin, end = _geometry(a, size, kernel)
    ceil = bool(a.get("ceil_mode", 0))
    fn, want_idx = _MAXPOOL[len(kernel)], a["_nout"] > 1
    if _torch_pool_ok(begin, end, kernel, dilations):
        y = fn(X, kernel, strides, begin, dilations, ceil_mode=ceil, return_indices=want_idx)
    else:
        y = _pool_padded(fn, X, a, kernel, strides, dilations, begin, end, -math.inf, dilations, ceil, want_idx)
        if want_idx:
            padded = [n + b + e for n, b, e in zip(size, begin, end)]
            y = (y[0], _unravel_to(y[1], padded, size, begin))
    if not want_idx:
        return [y]
    y, idx = y
    # ONNX indices count over the whole tensor (N, C, spatial), torch's within one plane.
    plane = math.prod(size)
    base = torch.arange(y.shape[0] * y.shape[1], device=y.device).reshape(y.shape[:2] + (1,) * len(kernel))
    return [y, idx + base * plane]


@_op(check=_check_avg_pool)
def _avg_pool(a, x):
    X = x[0]
    kernel = list(a["kernel_shape"])
    strides, dilations, begin, end = _geometry(a, list(X.shape[2:]), kernel)
    ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
    fn = _AVGPOOL[len(kernel)]
    if _torch_pool_ok(begin, end, kernel, dilations):
        return [fn(X, kernel, strides, begin, ceil, include)]
    y = _pool_padded(fn, X, a, kernel, strides, dilations, begin, end, 0.0, ceil, True)
    if include:
        return [y]
    ones = torch.ones((1, 1) + tuple(X.shape[2:]), dtype=X.dtype, device=X.device)
    return [y / _pool_padded(fn, ones, a, kernel, strides, dilations, begin, end, 0.0, ceil, True)]


def _global_avg_pool(a, x):
    X = x[0]
    return [X.mean(dim=tuple(range(2, X.dim())), keepdim=True)]


def _global_max_pool(a, x):
    X = x[0]
    return [X.amax(dim=tuple(range(2, X.dim())), keepdim=True)]


# ---------------------------------------------------------------- normalization


def _check_batch_norm(a):
    return "spatial=0" if a.get("spatial", 1) == 0 else None


@_op(frozen=(3, 4), nout=3, check=_check_batch_norm)
def _batch_norm(a, x):
    X, scale, bias, mean, var = x[:5]
    if not a["_ctx"]["training"] and (mean.requires_grad or var.requires_grad):
        # statistics computed in the graph (tf2onnx writes LayerNorm as a BatchNormalization of
        # the reshaped input, fed its own mean and variance): F.batch_norm cannot differentiate them
        shape = (1, -1) + (1,) * (X.dim() - 2)
        inv = torch.rsqrt(var.reshape(shape) + a.get("epsilon", 1e-5))
        return [(X - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape), mean, var]
    # Train mode: batch statistics, running stats updated in place (ONNX momentum m <-> torch 1 - m).
    y = F.batch_norm(X, mean, var, scale, bias, a["_ctx"]["training"], 1.0 - a.get("momentum", 0.9),
                     a.get("epsilon", 1e-5))
    return [y, mean, var]


def _instance_norm(a, x):
    return [F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5))]


@_op(nout=3)
def _layer_norm(a, x):
    X, scale, bias = x[0], x[1], _opt(x, 2)
    axis = _axis(a.get("axis", -1), X.dim())
    shape, eps = tuple(X.shape[axis:]), a.get("epsilon", 1e-5)
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        y = F.layer_norm(X, shape, scale, bias, eps)
    else:  # scale/bias only broadcastable to the normalized shape
        y = F.layer_norm(X, shape, None, None, eps) * scale
        y = y if bias is None else y + bias
    if a["_nout"] == 1:
        return [y]
    dims = tuple(range(axis, X.dim()))
    mean = X.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(X.var(dim=dims, unbiased=False, keepdim=True) + eps)
    return [y, mean, inv_std]


def _mean_variance_norm(a, x):
    """(X - mean) / (std + 1e-9) over `axes` (batch and positions by default), as ONNX Runtime
    computes it."""
    X = x[0]
    axes = [_axis(ax, X.dim()) for ax in a.get("axes", [0, 2, 3])]
    centred = X - X.mean(axes, keepdim=True)
    return [centred / (centred.pow(2).mean(axes, keepdim=True).sqrt() + 1e-9)]


def _lp_normalization(a, x):
    X = x[0]
    return [X / X.norm(p=a.get("p", 2), dim=_axis(a.get("axis", -1), X.dim()), keepdim=True)]


def _group_norm(a, x):
    X, scale, bias = x
    groups, channels = a["num_groups"], X.shape[1]
    if scale.numel() != channels:  # opset 18: one scale per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return [F.group_norm(X, groups, scale, bias, a.get("epsilon", 1e-5))]


def _lrn(a, x):
    X = x[0]
    size = a["size"]
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2  # ONNX window; torch's differs for even sizes
    sq = (X * X).reshape(X.shape[0], 1, X.shape[1], -1)
    mean = F.avg_pool2d(F.pad(sq, (0, 0, before, after)), (size, 1), stride=1).reshape(X.shape)
    return [X / (a.get("bias", 1.0) + a.get("alpha", 1e-4) * mean) ** a.get("beta", 0.75)]


def _run_softmax(f, a, x):
    X = x[0]
    if a["_opset"] >= 13:
        return [f(X, a.get("axis", -1))]
    axis = _axis(a.get("axis", 1), X.dim())  # before opset 13: coerced to 2-d at axis
    return [f(X.reshape(math.prod(X.shape[:axis]), -1), 1).reshape(X.shape)]


@_op()
def _rms_norm(a, x):
    """RMSNormalization (opset 23): x / sqrt(mean(x^2 over axis..) + epsilon) * scale."""
    X, scale = x[0], x[1]
    dims = tuple(range(_axis(a.get("axis", -1), X.dim()), X.dim()))
    return [X * torch.rsqrt(X.pow(2).mean(dim=dims, keepdim=True) + a.get("epsilon", 1e-5)) * scale]


_RNN_ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}
_RNN_DEFAULTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _check_recurrent(a):
    if any(f not in _RNN_ACTIVATIONS for f in a.get("activations") or []):
        return f"activations {a['activations']}"
    for name in ("clip", "input_forget", "layout"):
        if a.get(name):
            return f"{name}={a[name]}"
    return None


def _lstm_step(fs, g, h, c, R, rb, P):
    i, o, f, z = (g + h @ R.T + rb).split(h.shape[-1], -1)  # ONNX's gate order: i, o, f, c
    pi, po, pf = P.split(h.shape[-1]) if P is not None else (0, 0, 0)
    c = fs[0](f + pf * c) * c + fs[0](i + pi * c) * fs[1](z)
    return fs[0](o + po * c) * fs[2](c), c


def _gru_step(fs, g, h, R, rb, linear_before_reset):
    n = h.shape[-1]
    xz, xr, xh = g.split(n, -1)
    (Rz, Rr, Rh), (bz, br, bh) = R.split(n), rb.split(n)
    z, r = fs[0](xz + h @ Rz.T + bz), fs[0](xr + h @ Rr.T + br)
    hh = fs[1](xh + r * (h @ Rh.T + bh)) if linear_before_reset else fs[1](xh + (r * h) @ Rh.T + bh)
    return (1 - z) * hh + z * h


def _recurrent(op, a, x):
    """ONNX's LSTM, GRU and RNN (sequence first), step by step in both directions; outputs Y
    (seq, directions, batch, hidden), the last hidden state and, for LSTM, the last cell state."""
    X, W, R = x[0], x[1], x[2]
    B, lengths, h0 = _opt(x, 3), _opt(x, 4), _opt(x, 5)
    c0, P = (_opt(x, 6), _opt(x, 7)) if op == "LSTM" else (None, None)
    if lengths is not None and not bool((lengths == X.shape[0]).all()):
        raise UserError(f"the torch bridge runs {op} only over whole sequences (sequence_lens shorter than "
                        f"the sequence): use --recover layer")
    n, defaults = a["hidden_size"], _RNN_DEFAULTS[op]
    names = a.get("activations") or defaults * W.shape[0]
    direction = a.get("direction", "forward")
    ys, hs, cs = [], [], []
    for d in range(W.shape[0]):
        fs = [_RNN_ACTIVATIONS[f] for f in names[d * len(defaults):(d + 1) * len(defaults)]]
        wb, rb = B[d].split(W.shape[1]) if B is not None else (0, X.new_zeros(W.shape[1]))
        h = h0[d] if h0 is not None else X.new_zeros(X.shape[1], n)
        c = c0[d] if c0 is not None else X.new_zeros(X.shape[1], n)
        g = X @ W[d].T + wb  # every step's input part at once
        steps = range(X.shape[0])
        if direction == "reverse" or d == 1:
            steps = reversed(steps)
        out = [None] * X.shape[0]
        for t in steps:
            if op == "LSTM":
                h, c = _lstm_step(fs, g[t], h, c, R[d], rb, P[d] if P is not None else None)
            elif op == "GRU":
                h = _gru_step(fs, g[t], h, R[d], rb, a.get("linear_before_reset", 0))
            else:
                h = fs[0](g[t] + h @ R[d].T + rb)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return [torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)][:a["_nout"]]


def _check_attention(a):
    if a.get("left_window_size", -1) != -1 or a.get("right_window_size", -1) != -1:
        return "a sliding window"
    if a.get("qk_matmul_output_mode", 0) and a["_nout"] > 3:
        return f"qk_matmul_output_mode {a['qk_matmul_output_mode']}"
    if a.get("softmax_precision"):
        return "softmax_precision"
    return None


def _heads_first(t, heads):
    """(B, S, H * D) -> (B, H, S, D); 4-D inputs are already laid out so."""
    if t.dim() == 4:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


@_op(nout=4, check=_check_attention)
def _attention(a, x):
    """ONNX's Attention (opset 23): scaled dot-product attention over Q, K and V, 3-D or 4-D, with
    grouped key/value heads, an additive or boolean mask, causal masking, a soft cap and a key/value
    cache (past in, present out)."""
    Q, K, V, mask, past_k, past_v = (_opt(x, i) for i in range(6))
    if _opt(x, 6) is not None:
        raise UserError("the torch bridge does not run Attention with nonpad_kv_seqlen: use --recover layer")
    three_d = Q.dim() == 3
    Q, K, V = _heads_first(Q, a.get("q_num_heads")), _heads_first(K, a.get("kv_num_heads")), \
        _heads_first(V, a.get("kv_num_heads"))
    if past_k is not None:
        K, V = torch.cat([past_k, K], 2), torch.cat([past_v, V], 2)
    boolean = mask is not None and mask.dtype == torch.bool
    Y, qk = _attend(a, Q, K, V, bias=None if boolean else mask, allowed=mask if boolean else None,
                    causal=a.get("is_causal", 0))
    if three_d:
        Y = Y.transpose(1, 2).reshape(Y.shape[0], Y.shape[2], -1)
    return [Y, K, V, qk]


def _attend(a, Q, K, V, bias=None, allowed=None, causal=False):
    """Scaled dot-product attention over (B, heads, seq, size), as ONNX's Attention and ORT's
    GroupQueryAttention share it: key/value heads repeated for their groups of query heads (query
    head i reads key/value head i // groups), the scale (default 1/sqrt(size)), a soft cap, an
    additive bias, then the keys not `allowed` left out, with `causal` the later ones too (bottom-
    right aligned: query i sees key j <= i + (T - S)); a query with no key left gives zeros, not
    NaN. Returns the output (B, heads, S, value size) and the scaled logits before the soft cap."""
    groups = Q.shape[1] // K.shape[1]
    if groups > 1:
        K, V = K.repeat_interleave(groups, 1), V.repeat_interleave(groups, 1)
    qk = logits = (Q @ K.transpose(-1, -2)) * a.get("scale", 1.0 / math.sqrt(Q.shape[-1]))
    cap = a.get("softcap", 0.0)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    if bias is not None:
        logits = logits + bias
    if causal:
        S, T = logits.shape[-2:]
        later = torch.ones(S, T, dtype=torch.bool, device=logits.device).tril(T - S)
        allowed = later if allowed is None else allowed & later
    if allowed is None:
        return torch.softmax(logits, -1) @ V, qk
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    return torch.nan_to_num(probs, nan=0.0) @ V, qk


def _rotary(t, cos, sin, interleaved):
    """Rotary embedding of (B, heads, S, H) by cos/sin (B, S, R/2) over the first R dimensions:
    pairs (i, i + R/2), or (2i, 2i + 1) interleaved."""
    r = 2 * cos.shape[-1]
    cos, sin, rot, rest = cos[:, None], sin[:, None], t[..., :r], t[..., r:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    else:
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        rot = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    return torch.cat([rot, rest], -1)


def _check_rotary_embedding(a):
    for name, plain in (("scale", 1.0), ("is_packed_batching", 0)):
        if a.get(name, plain) != plain:
            return f"{name}={a[name]}"
    return None


def _run_rotary_embedding(order, a, x):
    """ONNX's RotaryEmbedding (opset 23: X, cos, sin, position ids) or ONNX Runtime's (input,
    position ids, cos, sin; `order` maps them): X (B, S, N x H) or (B, N, S, H); the caches
    indexed by position ids (ORT's may be one offset), or ONNX's given per token without them."""
    X, cos, sin, ids = (_opt(x, i) for i in order)
    three_d = X.dim() == 3
    if three_d:
        n = a.get("num_heads", 0) or X.shape[-1] // (2 * cos.shape[-1])
        X = X.reshape(X.shape[0], X.shape[1], n, -1).transpose(1, 2)
    if ids is not None:
        if ids.numel() == 1:  # ORT: one offset for every sequence
            ids = ids.reshape(1, 1) + torch.arange(X.shape[2], device=X.device)[None]
        cos, sin = cos[ids.long()], sin[ids.long()]
    r = a.get("rotary_embedding_dim", 0) or X.shape[-1]
    if cos.shape[-1] * 2 != r:
        raise UserError(f"RotaryEmbedding: caches of {cos.shape[-1]} angles for {r} rotated dimensions")
    batch = (X.shape[0],) + tuple(cos.shape[1:])
    Y = _rotary(X, cos.expand(batch), sin.expand(batch), a.get("interleaved", 0))
    return [Y.transpose(1, 2).reshape(X.shape[0], X.shape[2], -1) if three_d else Y]


def _rotary_embedding(order):
    return _op(check=_check_rotary_embedding)(functools.partial(_run_rotary_embedding, order))


def _check_group_query_attention(a):
    for name in ("smooth_softmax", "qk_output", "kv_cache_bit_width"):
        if a.get(name, 0):
            return f"{name}={a[name]}"
    if a.get("local_window_size", -1) != -1:
        return "a local window"
    return None


@_op(nout=3, check=_check_group_query_attention)
def _group_query_attention(a, x):
    """ONNX Runtime's GroupQueryAttention: query (B, S, N x H) with key and value (B, S, Nkv x H),
    or the three packed in the query; rotary embedding of Q and K from the cos/sin caches; a
    key/value cache (B, Nkv, P, H) in and out; keys past each sequence's length (seqlens_k + 1)
    masked, causal masking (the last query sees every key), a soft cap and an additive bias."""
    Q, K, V, past_k, past_v, seqlens_k, total = (_opt(x, i) for i in range(7))
    if any(_opt(x, i) is not None for i in (9, 11, 12, 13, 14, 15, 16)):
        raise UserError("the torch bridge runs GroupQueryAttention without position ids, head sinks, a quantized "
                        "cache or per-head norms: use --recover layer")
    n, nkv = a["num_heads"], a["kv_num_heads"]
    if K is None:  # packed Q | K | V
        size = Q.shape[-1] // (n + 2 * nkv)
        Q, K, V = Q.split([n * size, nkv * size, nkv * size], -1)
    Q, K, V = _heads_first(Q, n), _heads_first(K, nkv), _heads_first(V, nkv)
    if a.get("do_rotary", 0):
        S = Q.shape[2]
        # a first prompt starts at position 0; later tokens follow each sequence's cache
        start = torch.zeros_like(seqlens_k.long()) if int(host(total)) == S else seqlens_k.long() + 1 - S
        positions = start[:, None] + torch.arange(S, device=Q.device)
        Q, K = (_rotary(t, x[7][positions], x[8][positions], a.get("rotary_interleaved", 0)) for t in (Q, K))
    if past_k is not None:
        K, V = torch.cat([past_k, K], 2), torch.cat([past_v, V], 2)
    keys = torch.arange(K.shape[2], device=K.device)
    within = (keys < (seqlens_k.long() + 1)[:, None])[:, None, None, :]  # each sequence's length
    Y, _ = _attend(a, Q, K, V, bias=_opt(x, 10), allowed=within, causal=a.get("causal", 1))
    return [Y.transpose(1, 2).reshape(Y.shape[0], Y.shape[2], -1), K, V]


def _softmax_like(f):
    return _op()(functools.partial(_run_softmax, f))


@_op(host=(1, 2), nout=2)
def _dropout(a, x):
    X = x[0]
    ratio = a.get("ratio", 0.5) if a["_opset"] < 12 else (_opt(x, 1) if _opt(x, 1) is not None else 0.5)
    ratio = float(host(ratio))
    if not a["_ctx"]["training"] or ratio == 0.0:
        return [X, torch.ones_like(X, dtype=torch.bool)] if a["_nout"] > 1 else [X]
    if a["_nout"] == 1:
        return [F.dropout(X, ratio, True)]
    mask = torch.rand_like(X) >= ratio
    return [X * mask / (1.0 - ratio), mask]


# ---------------------------------------------------------------- shapes and data movement


@_op(host=(1,))
def _reshape(a, x):
    X, shape = x[0], _list(x[1])
    if not a.get("allowzero", 0):
        shape = [X.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [X.reshape(shape)]


def _flatten(a, x):
    X = x[0]
    axis = _axis(a.get("axis", 1), X.dim())
    return [X.reshape(math.prod(X.shape[:axis]), math.prod(X.shape[axis:]))]


def _transpose(a, x):
    X = x[0]
    perm = a.get("perm") or list(range(X.dim() - 1, -1, -1))
    return [X.permute(perm)]


def _axes_arg(a, x, i):
    if "axes" in a:
        return list(a["axes"])
    v = _opt(x, i)
    return None if v is None else _list(v)


@_op(host=(1,))
def _squeeze(a, x):
    X, axes = x[0], _axes_arg(a, x, 1)
    if axes is None:
        return [X.squeeze()]
    return [X.squeeze(tuple(_axis(ax, X.dim()) for ax in axes))] if axes else [X]


@_op(host=(1,))
def _unsqueeze(a, x):
    X, axes = x[0], _axes_arg(a, x, 1)
    rank = X.dim() + len(axes)
    for ax in sorted(_axis(ax, rank) for ax in axes):
        X = X.unsqueeze(ax)
    return [X]


def _concat(a, x):
    return [torch.cat(x, a["axis"])]


@_op(host=(1,), nout=None)
def _split(a, x):
    X = x[0]
    axis = _axis(a.get("axis", 0), X.dim())
    split = a.get("split")
    if split is None and _opt(x, 1) is not None:
        split = _list(x[1])
    if split:
        return list(torch.split(X, list(split), axis))
    parts = a.get("num_outputs", a["_nout"])
    return list(torch.split(X, math.ceil(X.shape[axis] / parts), axis))  # last part may be smaller


@_op(host=(1, 2, 3, 4))
def _slice(a, x):
    X = x[0]
    if "starts" in a:  # before opset 10
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = _list(x[1]), _list(x[2])
        axes = _list(x[3]) if _opt(x, 3) is not None else None
        steps = _list(x[4]) if _opt(x, 4) is not None else None
    axes = axes if axes is not None else range(len(starts))
    steps = steps if steps is not None else [1] * len(starts)
    index, flips = [slice(None)] * X.dim(), []
    for ax, start, end, step in zip(axes, starts, ends, steps):
        ax = _axis(ax, X.dim())
        n = X.shape[ax]
        start, end = start + n if start < 0 else start, end + n if end < 0 else end
        if step > 0:
            index[ax] = slice(min(max(start, 0), n), min(max(end, 0), n), step)
        else:  # torch has no negative steps: flip, then slice forward
            start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
            flips.append(ax)
            index[ax] = slice(n - 1 - start, n - 1 - end, -step)
    if flips:
        X = X.flip(flips)
    return [X[tuple(index)]]


@_op(frozen=(1,))
def _gather(a, x):
    X, idx = x
    axis = _axis(a.get("axis", 0), X.dim())
    idx = torch.where(idx < 0, idx + X.shape[axis], idx)
    y = X.index_select(axis, idx.reshape(-1))
    return [y.reshape(X.shape[:axis] + idx.shape + X.shape[axis + 1:])]


@_op(frozen=(1,))
def _gather_elements(a, x):
    X, idx = x
    axis = _axis(a.get("axis", 0), X.dim())
    return [torch.gather(X, axis, torch.where(idx < 0, idx + X.shape[axis], idx))]


@_op(frozen=(1,))
def _gather_nd(a, x):
    """GatherND: the last axis of the indices addresses the data's first k axes after
    `batch_dims` shared leading axes (torch's exporter builds attention masks with it)."""
    X, idx = x[0], x[1].long()
    b, k = a.get("batch_dims", 0), x[1].shape[-1]
    idx = torch.where(idx < 0, idx + torch.tensor(X.shape[b:b + k], device=idx.device), idx)
    flat = X.reshape((-1,) + tuple(X.shape[b:]))  # the batch axes as one
    rows = idx.reshape(flat.shape[0], -1, k)
    batch = torch.arange(flat.shape[0], device=X.device)[:, None].expand(-1, rows.shape[1])
    out = flat[(batch,) + tuple(rows[..., j] for j in range(k))]
    return [out.reshape(tuple(idx.shape[:-1]) + tuple(X.shape[b + k:]))]


_SCATTER_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@_op(frozen=(1,))
def _scatter_elements(a, x):
    """ScatterElements: updates written along `axis` where the indices say (or added, multiplied,
    taking the max or min with what is there)."""
    X, idx, U = x[0], x[1].long(), x[2]
    axis = _axis(a.get("axis", 0), X.dim())
    idx = torch.where(idx < 0, idx + X.shape[axis], idx)
    reduction = a.get("reduction", "none")
    if reduction == "none":
        return [X.scatter(axis, idx, U)]
    if reduction == "add":
        return [X.scatter_add(axis, idx, U)]
    return [X.scatter_reduce(axis, idx, U, _SCATTER_REDUCE[reduction], include_self=True)]


def _check_scatter_nd(a):
    return f"reduction '{a['reduction']}'" if a.get("reduction", "none") not in ("none", "add") else None


@_op(frozen=(1,), check=_check_scatter_nd)
def _scatter_nd(a, x):
    """ScatterND: the last axis of the indices (k) addresses the data's first k axes; the updates
    replace what is there (or add to it), the axes after the first k whole (torch's dynamo
    exporter writes a slice assignment so)."""
    X, idx, U = x[0], x[1].long(), x[2]
    k = idx.shape[-1]
    idx = torch.where(idx < 0, idx + torch.tensor(X.shape[:k], device=idx.device), idx).reshape(-1, k)
    rows = U.reshape((-1,) + tuple(X.shape[k:]))
    return [X.index_put(tuple(idx[:, j] for j in range(k)), rows, accumulate=a.get("reduction", "none") == "add")]


@_op(host=(1,))
def _expand(a, x):
    X = x[0]
    return [X.expand(torch.broadcast_shapes(X.shape, tuple(_list(x[1]))))]


@_op(host=(1,))
def _tile(a, x):
    return [x[0].repeat(_list(x[1]))]


def _check_pad(a):
    return f"mode '{a['mode']}'" if a.get("mode", "constant") not in ("constant", "reflect", "edge", "wrap") else None


@_op(host=(1, 2, 3), check=_check_pad)
def _pad(a, x):
    X = x[0]
    rank = X.dim()
    if "pads" in a:  # before opset 11
        pads, value, axes = list(a["pads"]), a.get("value", 0.0), list(range(rank))
    else:
        pads = _list(x[1])
        value = host(x[2]) if _opt(x, 2) is not None else 0.0
        axes = [_axis(ax, rank) for ax in _list(x[3])] if _opt(x, 3) is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[i + len(axes)]
    mode = a.get("mode", "constant")
    if mode == "constant":
        return [F.pad(X, _torch_pads(begin, end), value=float(value))]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    for ax in range(rank):  # one axis after another, as ONNX's reference (numpy.pad) does
        if begin[ax] or end[ax]:
            X = _pad_axis(X, ax, begin[ax], end[ax], torch_mode)
    return [X]


def _pad_axis(X, axis, begin, end, mode):
    """One axis padded in a non-constant mode. Torch pads only trailing axes there, as many as the
    input's rank allows (a 4-D input's last 2 or 3, never its last alone), so the axis goes last and
    the others are flattened into the (N, C) ahead of it."""
    moved = X.movedim(axis, -1)
    out = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (begin, end), mode=mode)
    return out.reshape(moved.shape[:-1] + out.shape[-1:]).movedim(-1, axis)


def _shape(a, x):
    dims = x[0].shape[a.get("start", 0):a.get("end")]
    return [torch.tensor(dims, dtype=torch.int64, device=x[0].device)]


def _size(a, x):
    return [torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)]


def _check_cast(a):
    return None if a["to"] in DTYPES else f"cast to {TensorProto.DataType.Name(a['to'])}"


@_op(check=_check_cast)
def _cast(a, x):
    return [x[0].to(DTYPES[a["to"]])]


def _cast_like(a, x):
    return [x[0].to(x[1].dtype)]


def _check_constant_of_shape(a):
    v = a.get("value")
    return None if v is None or v.dtype.kind in "biuf" else "non-numeric value"


@_op(host=(0,), check=_check_constant_of_shape)
def _constant_of_shape(a, x):
    v = a.get("value")
    if v is None:
        value, dtype = 0.0, torch.float32
    else:
        value, dtype = v.reshape(-1)[0].item(), torch.from_numpy(np.empty(0, v.dtype)).dtype
    return [torch.full(_list(x[0]), value, dtype=dtype, device=a["_ctx"]["device"])]


def _constant_value(a):
    """The value of a Constant node as a numpy array, or None if it is not a tensor."""
    for key, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            v = np.asarray(a[key], dtype=dtype)
            return v if v.dtype.kind in "biuf" else None  # not strings or sparse tensors
    return None


def _check_constant(a):
    return None if _constant_value(a) is not None else "non-tensor value"


@_op(check=_check_constant)
def _constant(a, x):
    # Evaluated once at construction; the graph keeps the result as a buffer.
    return [torch.from_numpy(np.array(_constant_value(a)))]


def _range(a, x):
    start, limit, delta = x  # tensors, not host values: the output takes start's dtype
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


def _identity(a, x):
    return [x[0]]


_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
               "cubic": "bicubic"}


def _check_grid_sample(a):
    return None if a.get("mode", "bilinear") in _GRID_MODES else f"mode '{a['mode']}'"


@_op(check=_check_grid_sample)
def _grid_sample(a, x):
    """GridSample: each channel sampled at the grid's normalized positions (a spatial transformer)."""
    return [F.grid_sample(x[0], x[1], mode=_GRID_MODES[a.get("mode", "bilinear")],
                          padding_mode=a.get("padding_mode", "zeros"), align_corners=bool(a.get("align_corners", 0)))]


@_op(frozen=(1,))
def _compress(a, x):
    """The slices along `axis` (the flattened input without one) where the mask is true."""
    X, keep = x[0], x[1].to(torch.bool)
    if a.get("axis") is None:
        X, axis = X.reshape(-1), 0
    else:
        axis = _axis(a["axis"], X.dim())
    picked = torch.nonzero(keep[:X.shape[axis]]).reshape(-1)
    return [X.index_select(axis, picked)]


@_op(host=(1,))
def _cumsum(a, x):
    X = x[0]
    axis = _axis(int(host(x[1])), X.dim())
    if a.get("reverse", 0):
        X = X.flip(axis)
    y = torch.cumsum(X, axis)
    if a.get("exclusive", 0):
        y = y - X
    return [y.flip(axis) if a.get("reverse", 0) else y]


@_op(host=(1,))
def _reverse_sequence(a, x):
    """Each batch entry's first sequence_lens[b] steps along `time_axis` reversed, the rest kept."""
    X, lengths = x[0], host(x[1])
    batch, time = _axis(a.get("batch_axis", 1), X.dim()), _axis(a.get("time_axis", 0), X.dim())
    entries = []
    for b, n in enumerate(lengths):
        entry = X.select(batch, b)
        t = time - (time > batch)
        entries.append(torch.cat([entry.narrow(t, 0, n).flip(t), entry.narrow(t, n, entry.shape[t] - n)], t))
    return [torch.stack(entries, batch)]


@_op(host=(1,))
def _trilu(a, x):
    k = int(host(x[1])) if _opt(x, 1) is not None else 0
    return [torch.triu(x[0], k) if a.get("upper", 1) else torch.tril(x[0], k)]


def _nonzero(a, x):
    return [torch.nonzero(x[0]).t()]


@_op(host=(1,), frozen=(0, 2))
def _one_hot(a, x):
    """OneHot: `depth` classes along `axis`, values[1] where the index (negative: from the end)
    says and values[0] elsewhere, an index out of range included (a mixture of experts' routing)."""
    idx, depth, values = x[0].long(), int(_list(x[1])[0]), x[2]
    idx = torch.where(idx < 0, idx + depth, idx)
    axis = _axis(a.get("axis", -1), idx.dim() + 1)
    classes = torch.arange(depth, device=idx.device).reshape([depth] + [1] * (idx.dim() - axis))
    return [torch.where(idx.unsqueeze(axis) == classes, values[1], values[0])]


@_op(host=(1,), nout=2)
def _topk(a, x):
    X = x[0]
    k = int(_list(x[1])[0])
    values, indices = torch.topk(X, k, dim=a.get("axis", -1), largest=bool(a.get("largest", 1)),
                                 sorted=bool(a.get("sorted", 1)))
    return [values, indices]


def _depth_to_space(a, x):
    X = x[0]
    b = a["blocksize"]
    n, c, h, w = X.shape
    if a.get("mode", "DCR") == "DCR":
        y = X.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = X.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


def _check_col2im(a):
    pads = list(a.get("pads") or [])
    return "asymmetric pads" if pads[:len(pads) // 2] != pads[len(pads) // 2:] else None


@_op(host=(1, 2), check=_check_col2im)
def _col2im(a, x):
    """Col2Im: sums sliding blocks back into an image (torch's fold; 2-D images only)."""
    image, block = _list(x[1]), _list(x[2])
    if len(image) != 2:
        raise UserError(f"the torch bridge runs Col2Im on 2-D images only (got {len(image)}-D): use --recover layer")
    pads = list(a.get("pads") or [0, 0, 0, 0])
    return [F.fold(x[0], image, block, dilation=list(a.get("dilations") or [1, 1]), padding=pads[:2],
                   stride=list(a.get("strides") or [1, 1]))]


def _space_to_depth(a, x):
    X = x[0]
    b = a["blocksize"]
    n, c, h, w = X.shape
    y = X.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


# ---------------------------------------------------------------- reductions


def _run_reduce(f, a, x):
    X = x[0]
    axes = _axes_arg(a, x, 1)
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0) or X.dim() == 0:
            return [X]
        axes = range(X.dim())
    return [f(X, tuple(sorted(_axis(ax, X.dim()) for ax in axes)), keep)]


def _reduce(f):
    return _op(host=(1,))(functools.partial(_run_reduce, f))


def _prod(X, axes, keep):
    for ax in reversed(axes):
        X = torch.prod(X, ax, keepdim=keep)
    return X


def _l1(X, axes, keep):
    return torch.sum(X.abs(), axes, keep)


def _l2(X, axes, keep):
    return torch.linalg.vector_norm(X, 2, axes, keep)


def _sum_square(X, axes, keep):
    return torch.sum(X * X, axes, keep)


def _log_sum(X, axes, keep):
    return torch.log(torch.sum(X, axes, keep))


_REDUCERS = {
    "ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin,
    "ReduceProd": _prod, "ReduceL1": _l1, "ReduceL2": _l2, "ReduceSumSquare": _sum_square,
    "ReduceLogSum": _log_sum, "ReduceLogSumExp": torch.logsumexp,
}


def _run_arg(f, a, x):
    X = x[0]
    axis = _axis(a.get("axis", 0), X.dim())
    keep = bool(a.get("keepdims", 1))
    if not a.get("select_last_index", 0):
        return [f(X, axis, keep)]
    return [X.shape[axis] - 1 - f(X.flip(axis), axis, keep)]


def _arg(f):
    return _op()(functools.partial(_run_arg, f))


# ---------------------------------------------------------------- resize

_COORDINATES = {
    "half_pixel": lambda x, s, n, m: (x + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda x, s, n, m: (x + 0.5) / s - 0.5 if m > 1 else np.zeros_like(x),
    "align_corners": lambda x, s, n, m: x * np.float32((n - 1) / (m - 1)) if m > 1 else np.zeros_like(x),
    "asymmetric": lambda x, s, n, m: x / s,
    "tf_half_pixel_for_nn": lambda x, s, n, m: (x + 0.5) / s,
    "half_pixel_symmetric": lambda x, s, n, m: (
        np.float32(n / 2) * (1 - np.float32(m / (s * n))) + (x + 0.5) / s - 0.5),
}
_NEAREST = {
    "round_prefer_floor": lambda v: np.ceil(v - 0.5),
    "round_prefer_ceil": lambda v: np.floor(v + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
    # Upsample (before opset 10) as onnxruntime runs it: truncate when enlarging, ceil when shrinking
    "simple": None,
}


def _check_resize(a):
    if a.get("mode", "nearest") not in ("nearest", "linear", "bilinear", "trilinear", "cubic"):
        return f"mode '{a['mode']}'"
    if a.get("coordinate_transformation_mode", "half_pixel") not in _COORDINATES:
        return f"coordinate_transformation_mode '{a['coordinate_transformation_mode']}'"
    if a.get("antialias", 0):
        return "antialias=1"
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy '{a['keep_aspect_ratio_policy']}'"
    return None


def _resize_axis(X, axis, out, scale, a):
    """Resample one axis exactly as ONNX specifies (coordinates in float32, like onnxruntime)."""
    n = X.shape[axis]
    dst = np.arange(out, dtype=np.float32)
    src = _COORDINATES[a.get("coordinate_transformation_mode", "half_pixel")](dst, np.float32(scale), n, out)
    src = np.asarray(src, dtype=np.float32)
    shape = [1] * X.dim()
    shape[axis] = out
    if a.get("mode", "nearest") == "nearest":
        mode = a.get("nearest_mode", "round_prefer_floor")
        if mode == "simple":
            idx = np.ceil(src) if scale < 1 else np.trunc(src)
        else:
            idx = _NEAREST[mode](src)
        idx = torch.from_numpy(np.clip(idx, 0, n - 1).astype(np.int64)).to(X.device)
        return X.index_select(axis, idx)
    if a.get("mode") == "cubic":
        return _cubic_axis(X, axis, src, n, shape, a)
    src = np.clip(src, 0, n - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = torch.from_numpy((src - lo).astype(np.float32)).to(X.device, X.dtype).reshape(shape)
    lo, hi = torch.from_numpy(lo).to(X.device), torch.from_numpy(hi).to(X.device)
    return X.index_select(axis, lo) * (1 - w) + X.index_select(axis, hi) * w


def _cubic_axis(X, axis, src, n, shape, a):
    """Cubic convolution over the 4 nearest samples of each source coordinate (ONNX's cubic mode:
    coefficient `cubic_coeff_a`; edge samples repeat, or with exclude_outside the taps outside
    the axis get no weight and the rest are renormalized)."""
    A = float(a.get("cubic_coeff_a", -0.75))
    taps = np.floor(src)[:, None] + np.arange(-1, 3)
    d = np.abs(taps - src[:, None]).astype(np.float64)
    w = np.where(d <= 1, ((A + 2) * d - (A + 3)) * d * d + 1, ((A * d - 5 * A) * d + 8 * A) * d - 4 * A)
    if a.get("exclude_outside", 0):
        w = np.where((taps < 0) | (taps > n - 1), 0.0, w)
        w = w / w.sum(axis=1, keepdims=True)
    idx = np.clip(taps, 0, n - 1).astype(np.int64)
    out = 0
    for k in range(4):
        wk = torch.from_numpy(w[:, k].astype(np.float32)).to(X.device, X.dtype).reshape(shape)
        out = out + X.index_select(axis, torch.from_numpy(idx[:, k]).to(X.device)) * wk
    return out


def _resample(X, scales, sizes, a):
    rank = X.dim()
    axes = [_axis(ax, rank) for ax in a.get("axes") or range(rank)]
    full_scales, full_sizes = [1.0] * rank, list(X.shape)
    if sizes:
        for ax, m in zip(axes, sizes):
            full_sizes[ax], full_scales[ax] = int(m), float(np.float32(m) / np.float32(X.shape[ax]))
    else:
        for ax, s in zip(axes, scales):
            full_scales[ax] = float(np.float32(s))
            full_sizes[ax] = int(math.floor(X.shape[ax] * np.float32(s)))
    for ax in range(rank):
        if full_sizes[ax] != X.shape[ax] or full_scales[ax] != 1.0:
            X = _resize_axis(X, ax, full_sizes[ax], full_scales[ax], a)
    return X


@_op(host=(1, 2, 3), check=_check_resize)
def _resize(a, x):
    X = x[0]
    if a["_opset"] < 11:  # Resize-10: (X, scales), asymmetric coordinates
        a = dict(a, coordinate_transformation_mode="asymmetric", nearest_mode="simple")
        return [_resample(X, _list(x[1]), None, a)]
    scales = _list(x[2]) if _opt(x, 2) is not None else []
    sizes = _list(x[3]) if _opt(x, 3) is not None else []
    return [_resample(X, scales, sizes, a)]


@_op(host=(1,), check=_check_resize)
def _upsample(a, x):
    scales = list(a["scales"]) if "scales" in a else _list(x[1])
    a = dict(a, coordinate_transformation_mode="asymmetric", nearest_mode="simple")
    return [_resample(x[0], scales, None, a)]


# ---------------------------------------------------------------- the table

@_op()
def _is_inf(a, x):
    """IsInf: +inf and -inf, each unless its detect_ attribute is 0 (torch's dynamo export guards
    its attention softmax with IsNaN and IsInf)."""
    X = x[0]
    out = torch.zeros_like(X, dtype=torch.bool)
    if a.get("detect_positive", 1):
        out = out | torch.isposinf(X)
    if a.get("detect_negative", 1):
        out = out | torch.isneginf(X)
    return [out]


# ---------------------------------------------------------------- sequences (Python lists of tensors)


def _sequence_empty(a, x):
    return [[]]


def _sequence_construct(a, x):
    return [list(x)]


def _position(pos, n: int, default: int) -> int:
    """An ONNX sequence position (negative: from the back), or `default` where omitted."""
    if pos is None:
        return default
    p = int(_list(pos)[0])
    return p + n if p < 0 else p


@_op(host=(2,))
def _sequence_insert(a, x):
    seq = list(x[0])  # a new sequence: the input one may be read again (a Loop's carried value)
    seq.insert(_position(_opt(x, 2), len(seq), len(seq)), x[1])
    return [seq]


@_op(host=(1,))
def _sequence_at(a, x):
    return [x[0][_position(x[1], len(x[0]), 0)]]


@_op(host=(1,))
def _sequence_erase(a, x):
    seq = list(x[0])
    del seq[_position(_opt(x, 1), len(seq), len(seq) - 1)]
    return [seq]


def _sequence_length(a, x):
    return [torch.tensor(len(x[0]), dtype=torch.int64, device=a["_ctx"]["device"])]


def _concat_from_sequence(a, x):
    join = torch.stack if a.get("new_axis", 0) else torch.cat
    return [join(list(x[0]), a["axis"])]


@_op(host=(1,))
def _split_to_sequence(a, x):
    X, split, axis = x[0], _opt(x, 1), a.get("axis", 0)
    if split is not None:
        sizes = _list(split)
        return [list(torch.split(X, sizes[0] if len(sizes) == 1 else sizes, axis))]
    parts = torch.split(X, 1, axis)
    return [[p.squeeze(axis) for p in parts] if not a.get("keepdims", 1) else list(parts)]


OPS = {
    # activations and elementwise math
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Round": _unary(torch.round),
    "Sign": _unary(torch.sign), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos), "Tan": _unary(torch.tan),
    "Asin": _unary(torch.asin), "Acos": _unary(torch.acos), "Atan": _unary(torch.atan), "Sinh": _unary(torch.sinh),
    "Cosh": _unary(torch.cosh), "Asinh": _unary(torch.asinh), "Acosh": _unary(torch.acosh),
    "Atanh": _unary(torch.atanh), "BitwiseNot": _unary(torch.bitwise_not),
    "Not": _unary(torch.logical_not), "Softplus": _unary(F.softplus), "Softsign": _unary(F.softsign),
    "IsNaN": _unary(torch.isnan), "IsInf": _is_inf,
    "Mish": _unary(F.mish), "HardSwish": _unary(F.hardswish), "HardSigmoid": _hard_sigmoid,
    "LeakyRelu": _leaky_relu, "Elu": _elu, "Celu": _celu, "Selu": _selu, "ThresholdedRelu": _thresholded_relu,
    "PRelu": _prelu, "Gelu": _gelu, "Identity": _identity,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div, "Pow": _pow,
    "Mod": _mod, "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "GreaterOrEqual": _binary(torch.ge), "LessOrEqual": _binary(torch.le), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor), "BitwiseAnd": _binary(torch.bitwise_and),
    "BitwiseOr": _binary(torch.bitwise_or), "BitwiseXor": _binary(torch.bitwise_xor), "Where": _where, "Clip": _clip,
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add), "Mean": _mean,
    # linear algebra, convolution, pooling
    "MatMul": _matmul, "Gemm": _gemm, "Einsum": _einsum, "Conv": _conv, "ConvTranspose": _conv_transpose,
    "MaxPool": _max_pool, "AveragePool": _avg_pool, "GlobalAveragePool": _global_avg_pool,
    "GlobalMaxPool": _global_max_pool,
    # normalization, softmax, dropout
    "BatchNormalization": _batch_norm, "InstanceNormalization": _instance_norm, "LayerNormalization": _layer_norm,
    "GroupNormalization": _group_norm, "MeanVarianceNormalization": _mean_variance_norm,
    "LpNormalization": _lp_normalization, "RMSNormalization": _rms_norm,
    "RotaryEmbedding": _rotary_embedding((0, 1, 2, 3)),
    "SimplifiedLayerNormalization": _rms_norm, "LRN": _lrn, "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax), "Dropout": _dropout,
    # shapes and data movement
    "Attention": _attention,
    "LSTM": _op(nout=3, check=_check_recurrent)(functools.partial(_recurrent, "LSTM")),
    "GRU": _op(nout=2, check=_check_recurrent)(functools.partial(_recurrent, "GRU")),
    "RNN": _op(nout=2, check=_check_recurrent)(functools.partial(_recurrent, "RNN")),
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather,
    "GatherElements": _gather_elements, "GatherND": _gather_nd, "ScatterND": _scatter_nd, "ScatterElements": _scatter_elements, "Expand": _expand, "Tile": _tile, "Pad": _pad, "Shape": _shape,
    "Size": _size, "Cast": _cast, "CastLike": _cast_like, "ConstantOfShape": _constant_of_shape,
    "Constant": _constant, "Range": _range, "CumSum": _cumsum,
    "ReverseSequence": _reverse_sequence, "Compress": _compress, "GridSample": _grid_sample, "Trilu": _trilu,
    "NonZero": _nonzero,
    "TopK": _topk, "OneHot": _one_hot, "DepthToSpace": _depth_to_space, "Col2Im": _col2im, "SpaceToDepth": _space_to_depth,
    "Resize": _resize, "Upsample": _upsample,
    # reductions
    **{name: _reduce(f) for name, f in _REDUCERS.items()},
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
    # sequences
    "SequenceEmpty": _sequence_empty, "SequenceConstruct": _sequence_construct, "SequenceInsert": _sequence_insert,
    "SequenceAt": _sequence_at, "SequenceErase": _sequence_erase, "SequenceLength": _sequence_length,
    "ConcatFromSequence": _concat_from_sequence, "SplitToSequence": _split_to_sequence,
}


# ---------------------------------------------------------------- ONNX Runtime's fused ops


def _bias_then(act):
    """BiasGelu / FastGelu(X, bias?): the activation of X plus its per-channel bias."""
    def fn(a, x):
        return [act(x[0] if _opt(x, 1) is None else x[0] + x[1])]
    return fn


def _quick_gelu(a, x):
    return [x[0] * torch.sigmoid(a.get("alpha", 1.702) * x[0])]


@_op(nout=4)
def _skip_layer_norm(a, x, simplified=False):
    """(input + skip + bias?) normalized over the last axis; outputs: y, mean, inverse std, the sum."""
    s = x[0] + x[1] + (x[4] if _opt(x, 4) is not None else 0)
    eps = a.get("epsilon", 1e-12)
    if simplified:  # RMSNorm: no mean subtracted, no beta
        inv_std = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
        return [s * inv_std * x[2], torch.zeros_like(inv_std), inv_std, s]
    mean = s.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(s.var(-1, unbiased=False, keepdim=True) + eps)
    y = (s - mean) * inv_std * x[2] + (x[3] if _opt(x, 3) is not None else 0)
    return [y, mean, inv_std, s]


@_op(nout=4)
def _skip_simplified_layer_norm(a, x):
    return _skip_layer_norm(a, [x[0], x[1], x[2], None, _opt(x, 3)], simplified=True)


def _check_fused_attention(a):
    for name in ("qkv_hidden_sizes", "do_rotary", "past_present_share_buffer"):
        if a.get(name):
            return name
    return None


@_op(check=_check_fused_attention)
def _fused_attention(a, x):
    """ONNX Runtime's fused self-attention: one (hidden, Q | K | V) weight and bias, num_heads
    heads, a mask index (sequence lengths, lengths and starts, or a 2-D, 3-D or 4-D 0/1 mask) and
    causal masking; masked scores get mask_filter_value added, as ORT does."""
    if any(_opt(x, i) is not None for i in range(4, 8)):
        raise UserError("the torch bridge runs ONNX Runtime's Attention without a past state or attention bias: "
                        "use --recover layer")
    X = x[0]
    qkv = X @ x[1] + (x[2] if _opt(x, 2) is not None else 0)
    Q, K, V = (_heads_first(t, a["num_heads"]) for t in qkv.chunk(3, -1))
    return [_ort_attend(a, Q, K, V, _opt(x, 3))]


def _ort_attend(a, Q, K, V, mask, bias=None):
    """What ORT's Attention and MultiHeadAttention share past Q, K, V (B, heads, seq, size): masked
    scores get mask_filter_value added (a query whose every key is masked sees them all alike),
    future keys are left out under `unidirectional`; the output is (B, S, heads x size)."""
    logits = (Q @ K.transpose(-1, -2)) * a.get("scale", 1.0 / math.sqrt(Q.shape[-1]))
    S, T = logits.shape[-2:]
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        keep = _mask_index_keep(mask, Q.shape[0], S, T)
        logits = logits + (~keep).to(logits.dtype) * a.get("mask_filter_value", -10000.0)
    if a.get("unidirectional", 0):
        causal = torch.ones(S, T, dtype=torch.bool, device=Q.device).tril(T - S)
        logits = logits.masked_fill(~causal, torch.finfo(logits.dtype).min)
    Y = torch.softmax(logits, -1) @ V
    return Y.transpose(1, 2).reshape(Y.shape[0], Y.shape[2], -1)


@_op(nout=3)
def _multi_head_attention(a, x):
    """ONNX Runtime's MultiHeadAttention over separate Q (B, S, N x H), K and V ((B, T, N x size) or
    (B, N, T, size)): a packed Q | K | V bias, a key padding mask, an attention bias per head and a
    key/value cache (past in, present out)."""
    Q, K, V, bias, mask, attention_bias, past_k, past_v = (_opt(x, i) for i in range(8))
    if K is None or any(_opt(x, i) is not None for i in (8, 9)):
        raise UserError("the torch bridge runs MultiHeadAttention over separate Q, K and V, without a past sequence "
                        "length or cache indirection: use --recover layer")
    n = a["num_heads"]
    if bias is not None:
        if K.dim() == 4:
            raise UserError("the torch bridge runs MultiHeadAttention's bias with 3-D key and value only: "
                            "use --recover layer")
        bq, bk, bv = bias.split([Q.shape[-1], K.shape[-1], V.shape[-1]])
        Q, K, V = Q + bq, K + bk, V + bv
    Q, K, V = _heads_first(Q, n), _heads_first(K, n), _heads_first(V, n)
    if past_k is not None:
        K, V = torch.cat([past_k, K], 2), torch.cat([past_v, V], 2)
    return [_ort_attend(a, Q, K, V, mask, attention_bias), K, V]


def _mask_index_keep(mask, batch, S, T):
    """ORT's mask_index as a boolean (B, 1 | S, S | 1, T) of the keys each query may see."""
    keys = torch.arange(T, device=mask.device)
    if mask.dim() == 1:  # end positions, then (2B) start positions
        end = mask[:batch].long()[:, None]
        keep = keys < end
        if mask.shape[0] == 2 * batch:
            keep = keep & (keys >= mask[batch:].long()[:, None])
        return keep[:, None, None, :]
    if mask.dim() == 2:  # (B, T) of 0/1
        return (mask != 0)[:, None, None, :]
    if mask.dim() == 3:  # (B, S, T)
        return (mask != 0)[:, None]
    return mask[:, :, :S, :T] != 0  # (B, 1, M, M), M at least the total length


@_op(nout=3)
def _embed_layer_norm(a, x):
    """ONNX Runtime's fused BERT embedding: word, position and segment embeddings summed, then
    LayerNorm; outputs the normalized sum, the mask's count of tokens per sequence, the sum."""
    ids, segments, words, positions = x[0], _opt(x, 1), x[2], x[3]
    position_ids = _opt(x, 8)
    if position_ids is None:
        position_ids = torch.arange(ids.shape[1], device=ids.device)[None]
    total = words[ids] + positions[position_ids]
    if segments is not None and _opt(x, 4) is not None:
        total = total + x[4][segments]
    y = F.layer_norm(total, (total.shape[-1],), x[5], x[6], a.get("epsilon", 1e-12))
    mask = _opt(x, 7)
    count = mask.sum(1).to(torch.int32) if mask is not None else torch.zeros(ids.shape[0], dtype=torch.int32)
    return [y, count, total]


CONTRIB_OPS = {
    "Gelu": _unary(F.gelu), "FastGelu": _bias_then(lambda v: F.gelu(v, approximate="tanh")),
    "BiasGelu": _bias_then(F.gelu), "QuickGelu": _quick_gelu,
    "SkipLayerNormalization": _skip_layer_norm, "SkipSimplifiedLayerNormalization": _skip_simplified_layer_norm,
    "GroupQueryAttention": _group_query_attention, "Attention": _fused_attention,
    "MultiHeadAttention": _multi_head_attention,
    "EmbedLayerNormalization": _embed_layer_norm, "RotaryEmbedding": _rotary_embedding((0, 2, 3, 1)),
}


def op_for(op_type: str, domain: str = ""):
    """The bridge's function for an op of the ONNX domain or ONNX Runtime's, or None."""
    domain = domain or "ai.onnx"
    return OPS.get(op_type) if domain == "ai.onnx" else CONTRIB_OPS.get(op_type) if domain == CONTRIB else None


def parse_attributes(node: onnx.NodeProto) -> dict:
    """Attribute values as Python values: strings decoded, tensors as numpy arrays."""
    out = {}
    for attr in node.attribute:
        v = onnx.helper.get_attribute_value(attr)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = onnx.numpy_helper.to_array(v)
        elif isinstance(v, (list, tuple)):
            v = [s.decode() if isinstance(s, bytes) else s for s in v]
        out[attr.name] = v
    return out
