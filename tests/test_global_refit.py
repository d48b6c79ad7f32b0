"""Global AdaPrune through the torch bridge: after pruning, fine-tuning every weight towards the
dense model's layer outputs brings the pruned model's outputs closer on the data it saw."""

import numpy as np

from onnx_prune.compiler.fidelity import output_fidelity
from onnx_prune.models.registry import load
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.global_refit import global_refit
from onnx_prune.passes.importance import group_scores, keep_top
from onnx_prune.passes.surgery import apply_plan


def _halved(zoo_name):
    """A zoo model with every group halved: (canonical model, analysis, plan, pruned, input shapes)."""
    zm = load(zoo_name)
    shapes = dict(zm.input_shapes)
    return (*_halve(zm.model, shapes), shapes)


def _halve(model, shapes):
    """`model` with every group halved: (canonical model, analysis, plan, pruned)."""
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    scores = group_scores(analysis)
    plan = {g.name: keep_top(scores[g.name], max(1, g.size // 2)) for g in analysis.groups}
    return canon, analysis, plan, apply_plan(canon.model, analysis, plan)


def _refitted(zoo_name, count, epochs):
    """A zoo model with every group halved, refitted by global AdaPrune on `count` random samples
    (None: four batches of the analysis's): (dense, pruned, tuned, samples)."""
    canon, analysis, plan, pruned, shapes = _halved(zoo_name)
    name = next(iter(shapes))
    count = count or 4 * shapes[name][0]
    samples = {name: np.random.default_rng(0).standard_normal((count,) + tuple(shapes[name][1:])).astype(np.float32)}
    tuned = global_refit(pruned, canon.model, analysis, plan, samples, epochs=epochs, lr=1e-3)
    return canon.model, pruned, tuned, samples


def _errors(dense, pruned, tuned, samples):
    return tuple(output_fidelity(dense, m, samples, "cpu")["mean_relative_l2_error"] for m in (pruned, tuned))


def test_global_refit_moves_outputs_towards_dense():
    dense, pruned, tuned, samples = _refitted("resnet_basic", None, epochs=8)
    before, after = _errors(dense, pruned, tuned, samples)
    assert after < 0.8 * before
    # same graph, new weights: shapes and nodes unchanged
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in pruned.graph.node]
    assert {t.name: tuple(t.dims) for t in tuned.graph.initializer} == \
        {t.name: tuple(t.dims) for t in pruned.graph.initializer}


def test_global_refit_matches_sequence_first_tensors_at_any_batch():
    """nn.MultiheadAttention computes (sequence, batch, features) inside; calibration batches (16,
    then 4) differ from the analysis's batch of 2, so its batch axis is not axis 0 and not the
    analysed length: its stream tensors (transposed to sequence-first) are matched whole."""
    before, after = _errors(*_refitted("torch_mha", 20, epochs=4))
    assert after < before


def test_sequence_first_layer_outputs_are_sliced_on_their_kept_channels(monkeypatch):
    """Without a stream to match, nn.MultiheadAttention's layers' outputs, (sequence, batch,
    features) inside, are matched on the features they keep, their batch axis whole at any batch."""
    from onnx_prune.passes import global_refit as module

    monkeypatch.setattr(module, "_stream", lambda analysis, layers, produced: [])
    canon, analysis, plan, pruned, _ = _halved("torch_mha")
    kept = module._targets(pruned, analysis, plan)
    outputs = {o.name for o in pruned.graph.output}
    sliced = {name: axes for name, axes in kept.items() if name not in outputs and axes[-1] is not None}
    assert sliced, "some layer output keeps only part of its features"
    assert any(axes[0] is None and axes[1] is None for axes in sliced.values())  # sequence and batch whole
    before, after = _errors(*_refitted("torch_mha", 20, epochs=4))
    assert after < before


def test_dense_values_past_the_cache_are_computed_again_alike(monkeypatch):
    """Targets over TARGET_CACHE_BYTES are recomputed when next needed, in chunks between the
    steps: the refit is the same as with every target held."""
    from onnx import numpy_helper

    from onnx_prune.passes import global_refit as module

    held = _refitted("resnet_basic", 40, epochs=3)[2]
    monkeypatch.setattr(module, "TARGET_CACHE_BYTES", 0)
    monkeypatch.setattr(module, "CHUNK_BATCHES", 3)
    computed = _refitted("resnet_basic", 40, epochs=3)[2]
    for a, b in zip(held.graph.initializer, computed.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-5, atol=1e-6)


def test_global_refit_leaves_lookup_tables_as_they_are():
    """Embedding rows the calibration text never indexes would not move while the rest of the
    model did: tables read by a Gather are not trained; the other weights are."""
    from onnx import numpy_helper

    from onnx_prune.backends.ort import random_feeds

    canon, analysis, plan, pruned, shapes = _halved("hf_bert")
    draws = [random_feeds(canon.model, shapes, seed=s) for s in range(4)]
    samples = {k: np.concatenate([d[k] for d in draws]) for k in draws[0]}
    tuned = global_refit(pruned, canon.model, analysis, plan, samples, epochs=1, lr=1e-3)
    tables = {n.input[0] for n in pruned.graph.node if n.op_type == "Gather"}
    before = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    embeddings = [name for name in tables if name in before and before[name].dtype == np.float32]
    assert embeddings, "hf_bert reads its embeddings with Gather"
    for name in embeddings:
        np.testing.assert_array_equal(after[name], before[name])
    moved = [name for name in before if name not in tables and before[name].dtype == np.float32
             and before[name].size > 1 and not np.array_equal(after[name], before[name])]
    assert len(moved) > 10
    b, a = _errors(canon.model, pruned, tuned, samples)
    assert a < b


def test_a_transformer_matches_its_stream_and_a_cnn_its_layers():
    """A transformer's blocks read a residual stream that pruning leaves whole (under LayerNorm): that
    stream and the outputs are the targets, not the pruned tensors inside each block (a head's
    queries, the FFN's hidden units). A CNN, whose streams prune, matches its weight layers' outputs
    on the channels they keep."""
    from onnx_prune.passes.global_refit import _targets
    from onnx_prune.passes.reconstruct import refittable_layers

    canon, analysis, plan, pruned, _ = _halved("bert_encoder")
    targets = _targets(pruned, analysis, plan)
    outputs = {o.name for o in pruned.graph.output}
    layers = [node for node, _ in refittable_layers(analysis)]
    read = {node.input[0] for node in layers}
    producers = {o: n.op_type for n in pruned.graph.node for o in n.output}
    stream = set(targets) - outputs
    assert len(stream) >= 3 and stream <= read
    assert {producers[name] for name in stream} == {"LayerNormalization"}
    assert all(axis is None for name in targets for axis in targets[name])  # matched whole
    assert not stream & {node.output[0] for node in layers}

    canon, analysis, plan, pruned, _ = _halved("resnet_basic")
    targets = _targets(pruned, analysis, plan)
    layers = [node.output[0] for node, _ in refittable_layers(analysis)]
    assert set(targets) == set(layers) | {o.name for o in pruned.graph.output}
    assert sum(any(axis is not None for axis in targets[name]) for name in layers) > len(layers) // 2


def test_an_integer_output_beside_the_scores_is_not_a_target():
    """A model that also outputs its argmax: global AdaPrune matches the scores and the layers,
    not the integer labels (torch cannot take their mean squared error, nor a gradient of them);
    the fine-tuning loop's distillation loss likewise."""
    import onnx
    import torch

    from onnx_prune.passes.methods.train import distill_loss
    from tiny_models import residual_cnn

    model = residual_cnn()
    model.graph.node.append(onnx.helper.make_node("ArgMax", ["y"], ["label"], name="argmax", axis=1, keepdims=0))
    model.graph.output.append(onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["N"]))
    canon, analysis, plan, pruned = _halve(model, {"x": [2, 3, 8, 8]})
    samples = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    tuned = global_refit(pruned, canon.model, analysis, plan, samples, epochs=4, lr=1e-3)
    before, after = _errors(canon.model, pruned, tuned, samples)
    assert after < before
    scores_s, scores_t = torch.ones(2, 3, requires_grad=True), torch.zeros(2, 3) + 2
    labels = torch.tensor([1, 0])
    loss = distill_loss([scores_s, labels], [scores_t, labels + 1])
    assert float(loss.detach()) == 0.25  # (1 - 2)^2 / 2^2: the labels add nothing
    loss.backward()
    assert scores_s.grad is not None


def test_a_causal_mask_folded_into_a_constant_is_not_trained():
    """torch exports a causal scaled_dot_product_attention's mask as a constant of 0 and -inf. The
    bridge must hold it as a buffer: trained as a weight, global AdaPrune's running mean of the
    weights turned its -inf into nan (-inf - -inf), and the model's every output with it."""
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    from onnx_prune.backends.ort import make_session
    from onnx_prune.backends.torch_graph import TorchGraph
    from onnx_prune.models.torch_export import from_torch

    class Causal(torch.nn.Module):
        def __init__(self, d=32, heads=4):
            super().__init__()
            self.heads, self.q, self.k, self.v, self.o = heads, *(torch.nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            b, t, d = x.shape
            split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
            return x + self.o(y.transpose(1, 2).reshape(b, t, d))

    torch.manual_seed(0)
    canon, analysis, plan, pruned = _halve(from_torch(Causal().eval(), torch.randn(2, 8, 32)), {"input": [2, 8, 32]})
    masks = [t.name for t in canon.model.graph.initializer if np.isinf(numpy_helper.to_array(t)).any()]
    assert masks and not set(masks) & set(TorchGraph(canon.model).param_names)
    samples = {"input": np.random.default_rng(0).standard_normal((16, 8, 32)).astype(np.float32)}
    tuned = global_refit(pruned, canon.model, analysis, plan, samples, epochs=2, lr=1e-3)
    assert np.isfinite(make_session(tuned).run(None, {"input": samples["input"][:4]})[0]).all()
    before, after = _errors(canon.model, pruned, tuned, samples)
    assert after < before


def test_layers_whose_dense_values_vanish_are_not_matched_and_no_weight_turns_nan():
    """A randomly initialised EfficientNet's activations shrink block after block (mean squares of
    1e-21 down to 1e-53): each tensor's error over its dense scale overflowed float32 and every
    weight became nan. Tensors that vanish are not targets; the others still pull the model."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(16, 32)), "w2": rng.normal(size=(32, 32)) * 1e-20, "w3": rng.normal(size=(32, 8))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["tiny"]), helper.make_node("MatMul", ["r1", "w3_"], ["y"])]
    weights["w3_"] = rng.normal(size=(32, 8))
    graph = helper.make_graph(nodes, "vanishing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in ("y", "tiny")],
                              [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    canon, analysis, plan, pruned = _halve(model, {"x": [4, 16]})
    samples = {"x": rng.standard_normal((32, 16)).astype(np.float32)}
    tuned = global_refit(pruned, canon.model, analysis, plan, samples, epochs=4, lr=1e-3)
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in tuned.graph.initializer)
    cut, fitted = (output_fidelity(canon.model, m, samples, "cpu") for m in (pruned, tuned))
    assert fitted["mean_relative_l2_error"] < cut["mean_relative_l2_error"]
