"""Recovery by layer-wise reconstruction: refit the layers that lost input channels.

For every weight layer (Conv with group 1, Gemm, MatMul with a weight) whose input lost channels,
solve a ridge least-squares problem on calibration data: the layer's inputs as the *pruned* model
computes them, its outputs as the *dense* model computes them (on the channels it keeps). This is
the structured form of AdaPrune. Layers are refitted one after another in graph order, each on
the inputs the already refitted layers produce, so upstream changes are compensated too (refitting
them all at once on stale inputs diverges on deep models).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.backends.ort import run_all_outputs
from onnx_prune.passes.graph import attr

MAX_ROWS = 8192
RIDGE = 0.3  # relative to the mean input energy; see _Normal.solve


def refittable_layers(analysis):
    """(node, (input channel expr, output channel expr)) of the weight layers least squares can
    refit: Conv with group 1, Gemm without transA, MatMul with a 2-D weight as its second input."""
    ctx = analysis.ctx
    out = []
    for node in ctx.index.model.graph.node:
        axes = ctx.layer_axes.get(node.name)
        if axes is None or len(axes) != 2 or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if node.op_type == "Conv" and attr(node, "group", 1) != 1:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        if node.input[1] not in ctx.index.inits or len(ctx.ax(node.input[1])) != 2 and node.op_type != "Conv":
            continue
        out.append((node, axes))
    return out


def _layers(analysis, keep):
    """(node, input kept mask, output kept mask) for refittable layers whose input was pruned."""
    table = analysis.table
    out = []
    for node, axes in refittable_layers(analysis):
        in_mask, out_mask = table.keep_mask(axes[0], keep), table.keep_mask(axes[1], keep)
        if not in_mask.all():
            out.append((node, in_mask, out_mask))
    return out


def im2col(x, node, rows, rng):
    """(rows, C*kh*kw) patches of an NCHW input, sampled over batch and positions."""
    kh, kw = attr(node, "kernel_shape")
    sh, sw = attr(node, "strides", [1, 1])
    dh, dw = attr(node, "dilations", [1, 1])
    p = attr(node, "pads", [0, 0, 0, 0])
    if any(p):
        x = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    n, c, h, w = x.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    total = n * oh * ow
    idx = rng.choice(total, size=min(rows, total), replace=False)
    b, rem = np.divmod(idx, oh * ow)
    i, j = np.divmod(rem, ow)
    ki, kj = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    hi = (i * sh)[:, None, None] + ki[None]
    wj = (j * sw)[:, None, None] + kj[None]
    patches = x[b[:, None, None, None], np.arange(c)[None, :, None, None], hi[:, None], wj[:, None]]
    return patches.reshape(len(idx), -1), (b, i, j)


def _rows_of_output(y, where):
    b, i, j = where
    return y[b, :, i, j]


def feed_batch_size(model) -> int:
    """Feed calibration data in batches the model accepts (a static batch dim fixes it)."""
    from onnx_prune.passes.graph import dims_of

    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        dims = dims_of(inp.type)
        if inp.name not in inits and dims and dims[0] is not None:
            return dims[0]
    return 16


class _Normal:
    """Accumulated normal equations of one layer: X'X, X'Y and Y'Y over calibration batches."""

    def __init__(self):
        self.gram = self.xty = None
        self.yy = 0.0

    def add(self, X, Y):
        g, t = X.T @ X, X.T @ Y
        self.gram = g if self.gram is None else self.gram + g
        self.xty = t if self.xty is None else self.xty + t
        self.yy += float(np.sum(Y * Y))

    def error(self, W) -> float:
        """||X W - Y||^2 / ||Y||^2 from the accumulated sums."""
        sq = np.sum(W * (self.gram @ W)) - 2 * np.sum(W * self.xty) + self.yy
        return float(max(sq, 0.0) / max(self.yy, 1e-12))

    def solve(self, prior):
        """Least squares pulled towards `prior` (the pruned layer's own weights): with little
        calibration data the refit stays near what the network learnt instead of fitting noise."""
        lam = max(RIDGE * np.trace(self.gram) / len(self.gram), 1e-8)
        return np.linalg.solve(self.gram + lam * np.eye(len(self.gram)), self.xty + lam * prior)


def token_mask(feeds, lead_shape):
    """For sequence models: which (batch, position) rows are real tokens, from an attention mask
    among the inputs (padding rows would otherwise dominate the fit)."""
    for name, v in feeds.items():
        if "mask" in name.lower() and tuple(v.shape) == tuple(lead_shape):
            return np.asarray(v).reshape(-1) != 0
    return None


def _layer_rows(node, x, y, out_mask, bias, rows, rng, feeds):
    """Rows of inputs (X) and target outputs (Y) of one layer, sampled."""
    if node.op_type == "Conv":
        X, where = im2col(x, node, rows, rng)
        Y = _rows_of_output(y, where)[:, out_mask]
    else:
        X = x.reshape(-1, x.shape[-1])
        Y = y.reshape(-1, y.shape[-1])[:, out_mask]
        real = token_mask(feeds, x.shape[:-1])
        if real is not None:
            X, Y = X[real], Y[real]
        if len(X) > rows:
            pick = rng.choice(len(X), rows, replace=False)
            X, Y = X[pick], Y[pick]
    return X, (Y - bias.reshape(1, -1)) if bias is not None else Y


def weight_matrix(node, w):
    """Weight as (features, outputs) so that outputs = X @ W."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    return w.T if node.op_type == "Gemm" and attr(node, "transB", 0) else w


def from_weight_matrix(node, W, shape):
    if node.op_type == "Conv":
        return W.T.reshape(shape)
    return W.T if node.op_type == "Gemm" and attr(node, "transB", 0) else W


def refit(pruned: onnx.ModelProto, dense: onnx.ModelProto, analysis, plan, samples: dict,
          seed=0) -> tuple[onnx.ModelProto, dict]:
    """A copy of `pruned` with its pruned-input layers refitted one after another in graph order
    (each sees the inputs the layers before it now produce); and per-layer relative errors
    (before, after) on the calibration data."""
    from onnx_prune.backends.ort import make_session
    from onnx_prune.compiler.calib import batches

    keep = analysis.keep_arrays(plan)
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    inits = {t.name: t for t in model.graph.initializer}
    uses = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    layers = [lay for lay in _layers(analysis, keep) if uses.get(lay[0].input[1], 0) == 1]  # shared: leave
    errors = {}
    if not layers:
        return model, errors
    size = feed_batch_size(dense)
    feeds_list = [f for f in batches(samples, size) if len(next(iter(f.values()))) == size] or \
        list(batches(samples, size))
    rows = max(MAX_ROWS // len(feeds_list), 64)
    dense_y = [run_all_outputs(dense, [n.output[0] for n, _, _ in layers], f) for f in feeds_list]
    rng = np.random.default_rng(seed)
    for node, _in_mask, out_mask in layers:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
        sess = make_session(probe, optimize=False, quiet=True)
        bias = None
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        eq = _Normal()
        for feeds, ys in zip(feeds_list, dense_y):
            x = sess.run([node.input[0]], feeds)[0].astype(np.float64)
            eq.add(*_layer_rows(node, x, ys[node.output[0]].astype(np.float64), out_mask, bias, rows, rng, feeds))
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        W_new = eq.solve(weight_matrix(node, w))
        before, after = eq.error(weight_matrix(node, w)), eq.error(W_new)
        if after < before:
            errors[node.name] = (before, after)
            inits[node.input[1]].CopyFrom(
                numpy_helper.from_array(from_weight_matrix(node, W_new, w.shape).astype(np.float32), node.input[1]))
    return model, errors
