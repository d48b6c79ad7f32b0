"""Global AdaPrune (gAP, METHODS.md section 1) through the torch bridge.

After pruning and the layer-wise refit, every weight of the pruned model is fine-tuned at once so
that the outputs of its weight layers, on the channels they keep, and the model's outputs match
the dense model's on calibration data: sum over tensors of ||Y_p - Y_d||^2 / ||Y_d||^2. Errors
that the layer-wise refit can only pass downstream are corrected where they arise. Token
sequences are joined into new ones first (passes/augment.py), so that fewer epochs over more
contexts replace many epochs over the same few sentences.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_prune.passes.augment import spliced_sequences
from onnx_prune.passes.reconstruct import feed_batches, refittable_layers, token_mask

EPOCHS = 10
SPLICED_EPOCHS = 5  # over the calibration sequences and their splices (9x as many)
LR = 1e-4


def _targets(pruned, analysis, plan):
    """Tensors to match and, per axis, the dense indices the pruned tensor keeps (None: the whole
    axis, whose length at run time may differ from the analysis's, e.g. the batch inside
    nn.MultiheadAttention's sequence-first layout)."""
    keep = analysis.keep_arrays(plan)
    table, axes = analysis.table, analysis.ctx.axes
    produced = {o for n in pruned.graph.node for o in n.output}
    names = [node.output[0] for node, _ in refittable_layers(analysis)] + [o.name for o in pruned.graph.output]
    out = {}
    for name in dict.fromkeys(names):
        if name not in produced or axes.get(name) is None:
            continue
        masks = [table.keep_mask(e, keep) for e in axes[name]]
        out[name] = [None if mask.all() else np.flatnonzero(mask) for mask in masks]
    return out


def _dense_values(dense, names, feeds_list, kept):
    from onnx_prune.backends.ort import session_with_outputs

    sess = session_with_outputs(dense, names)
    values = []
    for feeds in feeds_list:
        got = dict(zip(names, sess.run(names, feeds)))
        sliced = {}
        for name, v in got.items():
            for axis, idx in enumerate(kept[name]):
                if idx is not None:
                    v = np.take(v, idx, axis=axis)
            sliced[name] = v
        values.append(sliced)
    return values


def global_refit(pruned: onnx.ModelProto, dense: onnx.ModelProto, analysis, plan, samples: dict,
                 epochs: int = EPOCHS, lr: float = LR, seed: int = 0) -> onnx.ModelProto:
    """A copy of `pruned` with all its weights fine-tuned towards the dense model's layer outputs."""
    import torch

    from onnx_prune.backends.torch_graph import TorchGraph

    torch.manual_seed(seed)
    spliced = spliced_sequences(samples, seed=seed)
    if spliced is not None:
        samples, epochs = spliced, min(epochs, SPLICED_EPOCHS)
    kept = _targets(pruned, analysis, plan)
    names = list(kept)
    feeds_list = feed_batches(dense, samples)
    targets = _dense_values(dense, names, feeds_list, kept)
    seen = {}
    graph = TorchGraph(pruned, value_hooks={n: _capture(seen, n) for n in names})
    graph.train(False)  # BatchNorm keeps the dense statistics (folded or not)
    params = [p for p in graph.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    scale = {n: float(np.mean([np.mean(t[n].astype(np.float64) ** 2) for t in targets])) or 1.0 for n in names}
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for i in rng.permutation(len(feeds_list)):
            feeds = feeds_list[i]
            seen.clear()
            graph(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
            loss = sum(_matched(seen[n], targets[i][n], feeds) / scale[n] for n in names)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return graph.export()


def _capture(seen, name):
    def hook(t):
        seen[name] = t
        return t

    return hook


def _matched(pred, target, feeds):
    """Mean squared error, over real tokens only for sequence tensors next to an attention mask."""
    import torch

    target = torch.from_numpy(target).to(pred.dtype)
    err = (pred - target) ** 2
    real = token_mask(feeds, tuple(pred.shape[:2])) if pred.dim() >= 3 else None
    if real is None:
        return err.mean()
    w = torch.from_numpy(real.reshape(pred.shape[:2]).astype(np.float32))
    per_token = err.reshape(*pred.shape[:2], -1).mean(-1)
    return (per_token * w).sum() / w.sum().clamp(min=1)
