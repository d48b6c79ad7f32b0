"""Layer-wise least squares, the pieces shared by the error database and its refits
(passes/errordb.py): which weight layers can be refitted, their weights as matrices, and the rows
of their inputs (conv patches, or real tokens of a sequence).
"""

from __future__ import annotations

import numpy as np

from onnx_prune.passes.graph import attr, conv_pads


def refittable_layers(analysis):
    """(node, (input channel expr, output channel expr)) of the weight layers least squares can
    refit: Conv (1-D or 2-D) with group 1, Gemm without transA, MatMul with a 2-D weight as its
    second input; each weight read by that layer only."""
    ctx = analysis.ctx
    out = []
    for node in ctx.index.model.graph.node:
        axes = ctx.layer_axes.get(node.name)
        if axes is None or len(axes) != 2 or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if node.op_type == "Conv" and (attr(node, "group", 1) != 1 or len(ctx.shape(node.input[1])) not in (3, 4)):
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        if node.input[1] not in ctx.index.inits or len(ctx.ax(node.input[1])) != 2 and node.op_type != "Conv":
            continue
        if len(ctx.index.consumers[node.input[1]]) != 1:
            continue  # a shared weight serves other inputs too: a refit for this one would break them
        out.append((node, axes))
    return out


def im2col(x, node, rows, rng):
    """(rows, C*kh*kw) patches of an NCHW input (or C*kw of an NCW one: a 1-D conv is a 2-D one of
    height 1), sampled over batch and positions. Only the sampled patches are gathered (no padded
    copy of the whole input): out-of-range taps are 0."""
    kernel = tuple(attr(node, "kernel_shape"))
    strides, dilations = attr(node, "strides", [1] * len(kernel)), attr(node, "dilations", [1] * len(kernel))
    pads = conv_pads(node, x.shape[2:], kernel)
    if len(kernel) == 1:
        x, kernel, strides, dilations = x[:, :, None, :], (1,) + kernel, [1] + strides, [1] + dilations
        pads = (0, pads[0], 0, pads[1])
    return _patches(x, kernel, strides, dilations, pads, rows, rng)


def _patches(x, kernel, strides, dilations, p, rows, rng):
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    n, c, h, w = x.shape
    oh = (h + p[0] + p[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (w + p[1] + p[3] - dw * (kw - 1) - 1) // sw + 1
    total = n * oh * ow
    idx = rng.choice(total, size=min(rows, total), replace=False)
    b, rem = np.divmod(idx, oh * ow)
    i, j = np.divmod(rem, ow)
    if (kh, kw) == (1, 1) and not any(p):  # pointwise (most of a ResNet): the sampled pixels are the patches
        return x[b, :, i * sh, j * sw]
    hi = (i * sh - p[0])[:, None, None] + (np.arange(kh) * dh)[None, :, None]  # (rows, kh, 1)
    wj = (j * sw - p[1])[:, None, None] + (np.arange(kw) * dw)[None, None, :]  # (rows, 1, kw)
    inside = (hi >= 0) & (hi < h) & (wj >= 0) & (wj < w)
    # advanced indices around the channel slice: the result is (rows, kh, kw, C)
    taps = x[b[:, None, None], :, np.clip(hi, 0, h - 1), np.clip(wj, 0, w - 1)] * inside[..., None]
    return taps.transpose(0, 3, 1, 2).reshape(len(idx), -1)


def _static_batch(model) -> int | None:
    from onnx_prune.passes.graph import dims_of

    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        dims = dims_of(inp.type)
        if inp.name not in inits and dims and dims[0] is not None:
            return dims[0]
    return None


DYNAMIC_BATCH = 16  # samples per batch where the model's batch dim is free


def feed_batches(model, samples: dict) -> list[dict]:
    """Calibration samples in batches the model accepts. A static batch dim takes only full
    batches: the last one is filled up with samples from the start (a few are seen twice)."""
    from onnx_prune.compiler.calib import batches

    static = _static_batch(model)
    size = static or DYNAMIC_BATCH
    out = list(batches(samples, size))
    if out and static:
        n = len(next(iter(samples.values())))
        have = len(next(iter(out[-1].values())))
        if have < size:
            idx = np.concatenate([np.arange(n - have, n), np.resize(np.arange(n), size - have)])
            out[-1] = {k: np.asarray(v)[idx] for k, v in samples.items()}
    return out


def mask_input(feeds, lead_shape) -> str | None:
    """The attention mask among the inputs: named so, with the (batch, positions) shape given."""
    for name, v in feeds.items():
        if "mask" in name.lower() and tuple(np.shape(v)) == tuple(lead_shape):
            return name
    return None


def token_mask(feeds, lead_shape):
    """For sequence models: which (batch, position) rows are real tokens, from an attention mask
    among the inputs (padding rows would otherwise dominate the fit)."""
    name = mask_input(feeds, lead_shape)
    return None if name is None else np.asarray(feeds[name]).reshape(-1) != 0


def weight_matrix(node, w):
    """Weight as (features, outputs) so that outputs = X @ W."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    return w.T if node.op_type == "Gemm" and attr(node, "transB", 0) else w


def from_weight_matrix(node, W, shape):
    if node.op_type == "Conv":
        return W.T.reshape(shape)
    return W.T if node.op_type == "Gemm" and attr(node, "transB", 0) else W


def layer_rows(node, x, rows, rng, feeds):
    """Up to `rows` rows of a weight layer's input `x`: conv patches, or real tokens."""
    x = np.asarray(x, dtype=np.float32)  # no copy for ORT's float32 outputs
    if node.op_type == "Conv":
        return im2col(x, node, rows, rng)
    return token_rows(x, rows, rng, feeds)


def token_rows(x, rows, rng, feeds):
    """Up to `rows` rows of a tensor's last axis, over its real tokens (padding left out)."""
    x = np.asarray(x, dtype=np.float32)
    X = x.reshape(-1, x.shape[-1])
    real = token_mask(feeds, x.shape[:-1])
    if real is not None:
        X = X[real]
    if len(X) > rows:
        X = X[rng.choice(len(X), rows, replace=False)]
    return X.astype(np.float32)
