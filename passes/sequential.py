"""Sequential layer-wise refit: the weight layers in graph order, each fitted by ridge least squares
from the inputs the *pruned* model gives it (the layers before it already refitted) to the
outputs the dense model's layer gives on the channels the plan keeps.

The stitch (passes/errordb.py) fits every layer on dense inputs, so the error a pruned layer
passes on reaches the next layer unchanged; here each layer corrects what the layers before it
passed on. The pruned model runs once, in segments: from one layer input to the next, each
segment from the values the ones before it left, with the weights refitted so far (a model with
control flow runs whole, once per layer input). Compile still gives it a time budget
(`SequentialTooSlow`).
"""

from __future__ import annotations

import functools
import time

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.linalg import cho_factor, cho_solve

from onnx_prune.backends.ort import session_with_outputs
from onnx_prune.passes.graph import attr
from onnx_prune.passes.errordb import MAX_ROWS, ridge_load  # rows per layer input; load towards the current weights
from onnx_prune.passes.reconstruct import (feed_batches, from_weight_matrix, layer_rows, refittable_layers,
                                           weight_matrix)

# a run that hands out every layer input is slower than a plain one (it copies them all out): an
# estimate from plain latencies decides alone only when it is this far over the budget
ROUGH_OVER_BUDGET = 2.0


class SequentialTooSlow(Exception):
    """The estimated time is over the budget."""


def sequential_refit(dense: onnx.ModelProto, pruned: onnx.ModelProto, analysis, plan, samples: dict,
                     budget_s: float | None = None, sample_s: tuple | None = None) -> onnx.ModelProto:
    """A copy of `pruned` with every refittable weight layer refitted in graph order. With
    `budget_s`, it first estimates its time, from one dense run that reads every layer input and
    `sample_s` (seconds per sample of the dense and the pruned model; timed here if not given), and
    gives up over budget; far over it on `sample_s` alone, before that run."""
    keep = analysis.keep_arrays(plan)
    table, index = analysis.table, analysis.ctx.index
    # (layer input, the shape of its rows) -> the layers reading those rows: Q, K and V share one;
    # a 3x3 conv and a 1x1 shortcut reading one tensor do not (their patches differ)
    stages: dict[tuple, list] = {}
    for node, axes in refittable_layers(analysis):
        stages.setdefault((node.input[0], _patch_geometry(node)), []).append((node, axes))
    inputs = sorted({name for name, _ in stages})
    feeds_list = feed_batches(dense, samples)
    check = None
    if budget_s is not None:
        sample_s = sample_s or _time_samples(dense, pruned, feeds_list[0])
        # far over budget on the measured latencies alone: stop before the session that hands out
        # every layer input (a copy of the dense model, and its session: BERT-large's recovery
        # peaked 3.6 GB above the round for it)
        batch = len(next(iter(feeds_list[0].values())))
        rough = _estimate_seconds(stages, feeds_list, index, (sample_s[0] * batch, sample_s[1] * batch))
        if rough > ROUGH_OVER_BUDGET * budget_s:
            raise SequentialTooSlow(f"estimated {rough:.0f} s for {len(stages)} layer inputs")
        check = _budget_check(stages, feeds_list, index, budget_s, sample_s)
    dense_sess = session_with_outputs(dense, inputs, optimize=True)
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    inits = {t.name: t for t in out.graph.initializer}
    weights = {node.input[1]: numpy_helper.to_array(inits[node.input[1]]) for group in stages.values()
               for node, _ in group}
    targets, batches = _dense_targets(dense_sess, stages, feeds_list, keep, table, index, check)
    if _segmentable(out, stages):
        layer_inputs = _segment_sweep(out, stages, feeds_list[:max(batches.values(), default=0)])
    else:  # control flow: the whole model per layer input, the weights it changes fed, not baked in
        sess = session_with_outputs(_weights_as_inputs(out, weights), inputs, optimize=True)
        layer_inputs = ((key, [sess.run([key[0]], {**f, **weights})[0] for f in feeds_list[:batches[key]]])
                        for key in _in_graph_order(out, stages))
    for key, values in layer_inputs:  # both read the weights this loop refits
        layers = stages[key]
        X_pruned = _rows(layers[0][0], values[:batches[key]], feeds_list, len(targets[key][0]))
        # products in float32, as the error database's (the ridge load keeps the solve well
        # conditioned); the factorisation in float64
        gram = (X_pruned.T @ X_pruned).astype(np.float64)
        lam = ridge_load(gram)
        gram[np.diag_indices_from(gram)] += lam
        factor = cho_factor(gram, lower=True, check_finite=False)
        for (node, _), Y_dense in zip(layers, targets[key]):
            tensor = inits[node.input[1]]
            W_now = weight_matrix(node, weights[tensor.name].astype(np.float64))
            W = cho_solve(factor, (X_pruned.T @ Y_dense) + lam * W_now, check_finite=False)
            weights[tensor.name] = from_weight_matrix(node, W, tuple(tensor.dims)).astype(weights[tensor.name].dtype)
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    return out


def _dense_targets(dense_sess, stages, feeds_list, keep, table, index, check=None) -> dict:
    """Per layer input, the dense outputs (on the kept channels) of the layers reading it, on the
    rows the pruned side will draw: one dense run per calibration batch serves every layer. Also
    how many batches each layer input's rows came from. `check(seconds)` gets the first batch's
    time (the run that hands out every layer input, and its rows), and may stop the refit."""
    rows = {key: [[] for _ in layers] for key, layers in stages.items()}
    count, batches = dict.fromkeys(stages, 0), dict.fromkeys(stages, 0)
    kept_w = {node.name: weight_matrix(node, index.const(node.input[1]).astype(np.float32))[:, table.keep_mask(axes[1], keep)]
              for layers in stages.values() for node, axes in layers}
    for i, feeds in enumerate(feeds_list):
        started = time.perf_counter()
        wanted = [key for key in stages if count[key] < MAX_ROWS]
        if not wanted:
            break
        names = sorted({name for name, _ in wanted})
        values = dict(zip(names, dense_sess.run(names, feeds)))
        for key in wanted:
            X = layer_rows(stages[key][0][0], values[key[0]], MAX_ROWS, np.random.default_rng(i), feeds)
            for k, (node, _) in enumerate(stages[key]):
                rows[key][k].append(X @ kept_w[node.name])
            count[key] += len(X)
            batches[key] = i + 1
        if i == 0 and check is not None:
            check(time.perf_counter() - started)
    return {key: [np.concatenate(r)[:MAX_ROWS] for r in per_layer] for key, per_layer in rows.items()}, batches


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


def _budget_check(stages, feeds_list, index, budget_s, sample_s):
    """check(seconds of the first dense batch) -> raises SequentialTooSlow over budget. The pruned
    sweep hands out values at every segment's end as that dense run does: its time is scaled by
    the pruned model's speed (`sample_s`: seconds per sample, dense and pruned)."""
    def check(first_batch_s):
        batch_s = (first_batch_s, first_batch_s * sample_s[1] / sample_s[0])
        estimate = _estimate_seconds(stages, feeds_list, index, batch_s)
        if estimate > budget_s:
            raise SequentialTooSlow(f"estimated {estimate:.0f} s for {len(stages)} layer inputs")
    return check


def _estimate_seconds(stages, feeds_list, index, batch_s, flops_per_s=None) -> float:
    """A dense run and a pruned sweep (`batch_s` seconds each) per calibration batch that some layer
    input needs (until it has MAX_ROWS rows), plus the least squares at `flops_per_s` (numpy's float32
    matmul speed here, measured, if not given); rows counted from the inputs' shapes: conv patches,
    or the real tokens of the first batch."""
    n = len(next(iter(feeds_list[0].values())))  # the batch fed here
    counts, flops = [], 0.0
    for layers in stages.values():
        node = layers[0][0]
        shape = index.shape(node.input[0])
        if shape is None:
            return float("inf")
        shape = (n,) + tuple(shape[1:])
        X = layer_rows(node, np.zeros(shape, np.float32), MAX_ROWS, np.random.default_rng(0), feeds_list[0])
        counts.append(min(len(feeds_list), -(-MAX_ROWS // max(len(X), 1))))
        rows, features = min(MAX_ROWS, counts[-1] * len(X)), X.shape[1]
        outputs = sum(weight_matrix(reader, index.const(reader.input[1])).shape[1] for reader, _ in layers)
        # Gram, its factorisation, and per layer: dense targets, X^T Y and the solve
        flops += 2 * rows * features ** 2 + features ** 3 / 3 + outputs * (4 * rows * features + 2 * features ** 2)
    return max(counts, default=0) * sum(batch_s) + flops / (flops_per_s or _matmul_flops_per_s())


@functools.lru_cache(maxsize=1)
def _matmul_flops_per_s() -> float:
    a = np.ones((512, 512), np.float32)
    a @ a  # warm up the BLAS threads
    t = time.perf_counter()
    for _ in range(4):
        a @ a
    return 4 * 2 * 512 ** 3 / max(time.perf_counter() - t, 1e-6)


def _rows(node, values, feeds_list, n_rows):
    """The rows of a layer input's pruned values (one array per batch) that `_dense_targets` drew
    on the dense side: same batches, same seed per batch (the shapes differ only in channels)."""
    out = [layer_rows(node, x, MAX_ROWS, np.random.default_rng(i), feeds) for i, (x, feeds) in
           enumerate(zip(values, feeds_list))]
    return np.concatenate(out)[:n_rows]


def _producers(model) -> dict:
    """Tensor name -> index of the node that computes it (graph inputs: -1)."""
    at = {i.name: -1 for i in model.graph.input}
    for k, node in enumerate(model.graph.node):
        at.update((o, k) for o in node.output if o)
    return at


def _segmentable(model, stages) -> bool:
    """Nodes in topological order, no control flow (a subgraph may read any outer value), and every
    layer input computed by a node or fed."""
    seen = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        if any(i and i not in seen for i in node.input):
            return False
        seen.update(node.output)
    at = _producers(model)
    return all(key[0] in at for key in stages)


def _in_graph_order(model, stages) -> list:
    """Stage keys by where their input is computed, so each is refitted before anything it feeds."""
    at = _producers(model)
    return sorted(stages, key=lambda key: at[key[0]])


def _segment_sweep(model, stages, feeds_list):
    """Yields (stage key, its input's value per batch) in graph order. Between yields the caller
    refits that stage's weights into the model's initializers; the next segment of the graph, from
    the previous stage's input to the next one's, is then built with them and run from the values
    the segments before it left, so the pruned model runs once in all."""
    nodes = list(model.graph.node)
    at = _producers(model)
    last_use = {}
    for k, node in enumerate(nodes):
        last_use.update((i, k) for i in node.input if i)
    inits = {t.name: t for t in model.graph.initializer}
    live = [dict(f) for f in feeds_list]  # per batch: values computed (or fed) and still needed
    done = -1  # nodes[: done + 1] have run
    for key in _in_graph_order(model, stages):
        end = at[key[0]]
        if end > done:
            seg = nodes[done + 1: end + 1]
            made = {o for n in seg for o in n.output if o}
            wanted = sorted(o for o in made if last_use.get(o, -1) > end)  # stage inputs included
            sess = _segment_session(model, seg, made, wanted, inits, live[0])
            for values in live:
                values.update(zip(wanted, sess.run(wanted, {i.name: values[i.name] for i in sess.get_inputs()})))
                for name in [n for n in values if last_use.get(n, -1) <= end and n not in feeds_list[0]]:
                    del values[name]
            done = end
        yield key, [values[key[0]] for values in live]


def _segment_session(model, seg, made, wanted, inits, values):
    """An ORT session for the nodes `seg` of `model`, fed the values computed before it, with its
    weights as refitted so far."""
    from onnx import helper

    from onnx_prune.backends.ort import make_session

    used = sorted({i for n in seg for i in n.input if i and i not in made})
    feeds = [i for i in used if i not in inits]
    graph = helper.make_graph(
        seg, "segment",
        [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(np.asarray(values[i]).dtype), None)
         for i in feeds],
        [onnx.ValueInfoProto(name=o) for o in wanted],
        [inits[i] for i in used if i in inits])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return make_session(m, optimize=True, quiet=True)
