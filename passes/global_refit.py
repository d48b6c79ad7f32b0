"""Global AdaPrune (gAP, METHODS.md section 1) through the torch bridge.

After pruning and the layer-wise refit, every weight of the pruned model is fine-tuned at once so
that its outputs and its inner values match the dense model's on calibration data: sum over
tensors of ||Y_p - Y_d||^2 / ||Y_d||^2. The inner values are a transformer's residual stream
between blocks, or, in a model whose streams prune (CNNs), its weight layers' outputs on the
channels they keep (_targets). Errors
that the layer-wise refit can only pass downstream are corrected where they arise. Token
sequences are joined into new ones first (passes/augment.py), so that fewer epochs over more
contexts replace many epochs over the same few sentences. The weights returned are the average of
the last epoch's steps rather than the last step's (MiniLM, fixed plans: +0.0013-0.0015 held-out
cosine at 1.5x and 2x). Lookup tables (a Gather's rows: token and position embeddings) stay as
they are: training would move the rows the calibration text indexes and leave the rest, which new
text reads, where they were. MiniLM's word embeddings are half its weights: the time freezing
them saves goes to more splices (figures at SPLICED_EPOCHS). The dense model's values are
computed per batch and held only up to TARGET_CACHE_BYTES: the rest are computed again when next
needed.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from onnx_prune.passes.augment import spliced_sequences, token_table
from onnx_prune.passes.graph import FLOAT_TYPES, all_nodes
from onnx_prune.passes.reconstruct import feed_batches, refittable_layers, token_mask

EPOCHS = 10
# over the calibration sequences and augment.SPLICES_PER_SAMPLE splices of each. MiniLM, fixed
# plans, held-out pooled cosine: 1.5x 0.9478 with 32 splices for 3 epochs and every weight
# trained (274 s), 0.9474 with the lookup tables frozen (198 s), 0.9487 with them frozen and 64
# splices for 2 epochs (254 s); 2x 0.9030 (236 s) -> 0.9044 (211 s) for the last change. Once a
# transformer matched its stream (_stream), more epochs paid: 1.5x 0.9507 / 0.9530 / 0.9547 after
# 2 / 3 / 4 epochs (243 / 345 / 460 s a pass, and compile may run two passes)
SPLICED_EPOCHS = 3
LR = 1e-4
TARGET_CACHE_BYTES = 1 << 30  # MiniLM's targets, 64 splices of 51 sentences at 2x: 10 GB in all
SCALE_BATCHES = 8  # batches whose dense values set each tensor's loss scale
VANISHED_MEAN_SQUARE = 1e-30  # below it a tensor is not matched: 1 / scale would overflow float32
# batches whose dense values are computed together: an ORT run between two torch steps competes
# with torch's worker threads, which spin on after a step (MiniLM: seconds a run instead of 0.2)
CHUNK_BATCHES = 16


def _targets(pruned, analysis, plan):
    """Tensors to match and, per axis, the dense indices the pruned tensor keeps (None: the whole
    axis, whose length at run time may differ from the analysis's, e.g. the batch inside
    nn.MultiheadAttention's sequence-first layout). The model's outputs, and either its stream
    (_stream) or, where it has none, its weight layers' outputs on the channels they keep."""
    keep = analysis.keep_arrays(plan)
    table, axes = analysis.table, analysis.ctx.axes
    produced = {o for n in pruned.graph.node for o in n.output}
    # an integer output (an argmax beside the scores) has no gradient to follow
    outputs = [o.name for o in pruned.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    layers = [node for node, _ in refittable_layers(analysis)]
    names = _stream(analysis, layers, produced) or [node.output[0] for node in layers]
    out = {}
    for name in dict.fromkeys(names + outputs):
        if name not in produced or axes.get(name) is None:
            continue
        masks = [table.keep_mask(e, keep) for e in axes[name]]
        out[name] = [None if mask.all() else np.flatnonzero(mask) for mask in masks]
    return out


def _stream(analysis, layers, produced) -> list:
    """The tensors between a transformer's blocks: frozen ones (no prunable channel: the residual
    stream under LayerNorm) that weight layers read, when most weight layers read one (MiniLM: the
    query, key, value and first FFN layers). Matching these and the outputs, and not the pruned
    layers inside each block (a head's queries, the FFN's hidden units), leaves a block free to
    reach its output another way. MiniLM, fixed plans, held-out pooled cosine: 1.5x 0.9487 ->
    0.9507, 2x 0.9044 -> 0.9093 (at 1.5x, the outputs alone 0.9463; the stream added to the
    layers' outputs 0.9493; each weight layer's input instead 0.9490). Empty for a model whose
    streams prune (CNNs): its layers' outputs stay the targets."""
    table, axes = analysis.table, analysis.ctx.axes

    def frozen(name):
        return name in produced and axes.get(name) is not None and not any(table.coords(e) for e in axes[name])

    reading = [node.input[0] for node in layers if frozen(node.input[0])]
    return list(dict.fromkeys(reading)) if 2 * len(reading) >= len(layers) > 0 else []


class _DenseTargets:
    """The dense model's values of `names` on batch i, cut to what the pruned tensors keep
    (`kept`): computed when first asked for, held while they fit TARGET_CACHE_BYTES, computed
    again after that (a larger encoder's targets for every splice would not fit in memory)."""

    def __init__(self, dense, names, feeds_list, kept):
        from onnx_prune.backends.ort import session_with_outputs

        self.sess = session_with_outputs(dense, names, optimize=True, spin=False)  # runs between training steps
        self.names, self.feeds_list, self.kept = names, feeds_list, kept
        self.held, self.bytes = {}, 0

    def __len__(self):
        return len(self.feeds_list)

    def __getitem__(self, i):
        if i in self.held:
            return self.held[i]
        got = dict(zip(self.names, self.sess.run(self.names, self.feeds_list[i])))
        values = {}
        for name, v in got.items():
            for axis, idx in enumerate(self.kept[name]):
                if idx is not None:
                    v = np.take(v, idx, axis=axis)
            values[name] = v
        size = sum(v.nbytes for v in values.values())
        if self.bytes + size <= TARGET_CACHE_BYTES:
            self.held[i], self.bytes = values, self.bytes + size
        return values


def global_refit(pruned: onnx.ModelProto, dense: onnx.ModelProto, analysis, plan, samples: dict,
                 epochs: int = EPOCHS, lr: float = LR, seed: int = 0) -> onnx.ModelProto:
    """A copy of `pruned` with all its weights fine-tuned towards the dense model's layer outputs."""
    import torch

    from onnx_prune.backends.torch_graph import TorchGraph

    torch.manual_seed(seed)
    spliced = spliced_sequences(samples, seed=seed, embedding=token_table(dense, samples))
    if spliced is not None:
        samples, epochs = spliced, min(epochs, SPLICED_EPOCHS)
    kept = _targets(pruned, analysis, plan)
    feeds_list = feed_batches(dense, samples)
    targets = _DenseTargets(dense, list(kept), feeds_list, kept)
    scale = _scales(targets, list(kept))
    # a tensor whose dense values vanish (a randomly initialised EfficientNet's, block after block)
    # has nothing to match, and its error over its scale overflows float32
    names = [n for n in kept if scale[n] > VANISHED_MEAN_SQUARE]
    if not names:
        return copy.deepcopy(pruned)
    seen = {}
    graph = TorchGraph(pruned, value_hooks={n: _capture(seen, n) for n in names})
    graph.train(False)  # BatchNorm keeps the dense statistics (folded or not)
    tables = _lookup_tables(pruned)
    for name, p in graph.parameters_by_initializer().items():
        if name in tables:
            p.requires_grad_(False)
    params = [p for p in graph.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    averaged, steps = [p.detach().clone() for p in params], 0  # the last epoch's running mean
    for epoch in range(epochs):
        order = rng.permutation(len(feeds_list))
        for start in range(0, len(order), CHUNK_BATCHES):
            chunk = order[start:start + CHUNK_BATCHES]
            wanted = {i: targets[i] for i in chunk}  # the dense runs back to back, then the steps
            for i in chunk:
                feeds = feeds_list[i]
                seen.clear()
                graph(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
                loss = sum(_matched(seen[n], wanted[i][n], feeds) / scale[n] for n in names)
                if not torch.isfinite(loss):  # one batch must not turn every weight into nan
                    continue
                opt.zero_grad()
                loss.backward()
                opt.step()
                if epoch == epochs - 1:
                    steps += 1
                    with torch.no_grad():
                        for mean, p in zip(averaged, params):
                            mean.add_(p.detach() - mean, alpha=1.0 / steps)
    with torch.no_grad():
        for mean, p in zip(averaged, params):
            p.copy_(mean)
    return graph.export()


def _lookup_tables(model) -> set:
    """Initializers a Gather reads rows of (its data input), in the graph or inside a body: embedding tables."""
    inits = {t.name for t in model.graph.initializer}
    return {n.input[0] for n in all_nodes(model.graph) if n.op_type == "Gather" and n.input[0] in inits}


def _scales(targets, names) -> dict:
    """Per tensor, the mean square of its dense values over the first SCALE_BATCHES batches: each
    tensor's error counts relative to its own size."""
    sums = dict.fromkeys(names, 0.0)
    count = min(len(targets), SCALE_BATCHES)
    for i in range(count):
        values = targets[i]
        for n in names:
            sums[n] += float(np.mean(values[n].astype(np.float64) ** 2))
    return {n: sums[n] / max(count, 1) for n in names}


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
