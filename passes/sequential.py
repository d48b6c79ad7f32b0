"""Sequential layer-wise refit: the weight layers in graph order, each fitted by ridge least squares
from the inputs the *pruned* model gives it (the layers before it already refitted) to the
outputs the dense model's layer gives on the channels the plan keeps.

The stitch (passes/errordb.py) fits every layer on dense inputs, so the error a pruned layer
passes on reaches the next layer unchanged; here each layer corrects what the layers before it
passed on. It costs one run of the pruned model per distinct layer input, which is why compile
gives it a time budget (`SequentialTooSlow`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.linalg import cho_factor, cho_solve

from onnx_prune.backends.ort import session_with_outputs
from onnx_prune.passes.graph import attr
from onnx_prune.passes.errordb import MAX_ROWS, RIDGE  # rows per layer input; load towards the current weights
from onnx_prune.passes.reconstruct import (feed_batches, from_weight_matrix, layer_rows, refittable_layers,
                                           weight_matrix)

class SequentialTooSlow(Exception):
    """The estimated time is over the budget."""


def sequential_refit(dense: onnx.ModelProto, pruned: onnx.ModelProto, analysis, plan, samples: dict,
                     budget_s: float | None = None, sample_s: tuple | None = None) -> onnx.ModelProto:
    """A copy of `pruned` with every refittable weight layer refitted in graph order. With
    `budget_s`, it first estimates its time from `sample_s` (seconds per sample of the dense and
    the pruned model; timed here if not given) and gives up over budget."""
    keep = analysis.keep_arrays(plan)
    table, index = analysis.table, analysis.ctx.index
    # (layer input, the shape of its rows) -> the layers reading those rows: Q, K and V share one;
    # a 3x3 conv and a 1x1 shortcut reading one tensor do not (their patches differ)
    stages: dict[tuple, list] = {}
    for node, axes in refittable_layers(analysis):
        stages.setdefault((node.input[0], _patch_geometry(node)), []).append((node, axes))
    inputs = sorted({name for name, _ in stages})
    feeds_list = feed_batches(dense, samples)
    if budget_s is not None:
        estimate = _estimate_seconds(stages, feeds_list, index, sample_s or _time_samples(dense, pruned, feeds_list[0]))
        if estimate > budget_s:
            raise SequentialTooSlow(f"estimated {estimate:.0f} s for {len(stages)} layer inputs")
    dense_sess = session_with_outputs(dense, inputs, optimize=True)
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    inits = {t.name: t for t in out.graph.initializer}
    # one session for the whole refit: the weights it changes are fed, not baked in
    weights = {node.input[1]: numpy_helper.to_array(inits[node.input[1]]) for group in stages.values()
               for node, _ in group}
    sess = session_with_outputs(_weights_as_inputs(out, weights), inputs, optimize=True)
    targets = _dense_targets(dense_sess, stages, feeds_list, keep, table, index)
    for key, layers in stages.items():
        X_pruned = _pruned_rows(sess, key[0], layers[0][0], feeds_list, weights, len(targets[key][0]))
        gram = X_pruned.T @ X_pruned
        lam = RIDGE * np.trace(gram) / len(gram)
        gram[np.diag_indices_from(gram)] += lam
        factor = cho_factor(gram, lower=True, check_finite=False)
        for (node, _), Y_dense in zip(layers, targets[key]):
            tensor = inits[node.input[1]]
            W_now = weight_matrix(node, weights[tensor.name].astype(np.float64))
            W = cho_solve(factor, X_pruned.T @ Y_dense + lam * W_now, check_finite=False)
            weights[tensor.name] = from_weight_matrix(node, W, tuple(tensor.dims)).astype(weights[tensor.name].dtype)
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    return out


def _dense_targets(dense_sess, stages, feeds_list, keep, table, index) -> dict:
    """Per layer input, the dense outputs (on the kept channels) of the layers reading it, on the
    rows the pruned side will draw: one dense run per calibration batch serves every layer."""
    rows = {key: [[] for _ in layers] for key, layers in stages.items()}
    count = dict.fromkeys(stages, 0)
    kept_w = {node.name: weight_matrix(node, index.const(node.input[1]).astype(np.float64))[:, table.keep_mask(axes[1], keep)]
              for layers in stages.values() for node, axes in layers}
    for i, feeds in enumerate(feeds_list):
        wanted = [key for key in stages if count[key] < MAX_ROWS]
        if not wanted:
            break
        names = sorted({name for name, _ in wanted})
        values = dict(zip(names, dense_sess.run(names, feeds)))
        for key in wanted:
            X = layer_rows(stages[key][0][0], values[key[0]], MAX_ROWS, np.random.default_rng(i), feeds)
            X = X.astype(np.float64)
            for k, (node, _) in enumerate(stages[key]):
                rows[key][k].append(X @ kept_w[node.name])
            count[key] += len(X)
    return {key: [np.concatenate(r)[:MAX_ROWS] for r in per_layer] for key, per_layer in rows.items()}


def _patch_geometry(node) -> tuple:
    """What shapes a layer's input rows: a conv's kernel, strides, pads and dilations."""
    if node.op_type != "Conv":
        return ()
    return tuple(tuple(attr(node, k) or ()) for k in ("kernel_shape", "strides", "pads", "dilations")) + \
        (attr(node, "auto_pad", b"NOTSET"),)


def _weights_as_inputs(model, weights) -> onnx.ModelProto:
    """A copy of `model` whose listed initializers are graph inputs too, so that a run's feeds
    override them (ONNX lets an input shadow an initializer of the same name)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name, w in weights.items():
        m.graph.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(w.dtype), list(w.shape)))
    return m


def _time_samples(dense, pruned, feeds) -> tuple:
    from onnx_prune.backends.measure import measure

    lat = measure([dense, pruned], feeds, warmup=1, blocks=1, min_block_s=0.0).latencies
    n = len(next(iter(feeds.values())))
    return lat[0].median_ms / 1e3 / n, lat[1].median_ms / 1e3 / n


def _estimate_seconds(stages, feeds_list, index, sample_s) -> float:
    """Runs of the pruned model per layer input until it has MAX_ROWS rows, and of the dense
    model once per batch (it serves every input), counted from the inputs' shapes: conv
    patches, or the real tokens of the first batch."""
    n = len(next(iter(feeds_list[0].values())))  # the batch fed here
    dense_s, pruned_s = (t * n for t in sample_s)
    counts = []
    for layers in stages.values():
        node = layers[0][0]
        shape = index.shape(node.input[0])
        if shape is None:
            return float("inf")
        shape = (n,) + tuple(shape[1:])
        per_batch = len(layer_rows(node, np.zeros(shape, np.float32), MAX_ROWS, np.random.default_rng(0),
                                   feeds_list[0]))
        counts.append(min(len(feeds_list), -(-MAX_ROWS // max(per_batch, 1))))
    return max(counts, default=0) * dense_s + sum(counts) * pruned_s


def _pruned_rows(sess, name, node, feeds_list, weights, n_rows):
    """The rows of `name` in the current pruned model that `_dense_targets` drew on the dense
    side: same batches, same seed per batch (the shapes differ only in channels)."""
    out, count = [], 0
    for i, feeds in enumerate(feeds_list):
        if count >= n_rows:
            break
        x = sess.run([name], {**feeds, **weights})[0]
        out.append(layer_rows(node, x, MAX_ROWS, np.random.default_rng(i), feeds))
        count += len(out[-1])
    return np.concatenate(out).astype(np.float64)[:n_rows]
