"""Graphs from torch's newer (dynamo) exporter: opset 20, IR 10, different op patterns."""

import contextlib
import io
import os
import warnings

import numpy as np
import onnx
import pytest

from onnx_prune.backends.ort import random_feeds
from onnx_prune.compiler.plans import random_plan, uniform_plan
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import verify


def _verify_half_and_random(canon, analysis, keep1=False):
    """The pruned model equals the masked reference under half of every group, a random plan and,
    with `keep1`, a random plan keeping one channel somewhere."""
    feeds = random_feeds(canon.model, canon.input_shapes)
    plans = [uniform_plan(analysis, 0.5), random_plan(analysis, np.random.default_rng(1))]
    if keep1:
        plans.append(random_plan(analysis, np.random.default_rng(2), "keep1"))
    for plan in plans:
        verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, feeds)


def dynamo_export(entry, dynamic_shapes=None, opset=None):
    """The zoo entry's module through torch's dynamo exporter (quietly), and its example shapes."""
    import torch

    module, example = entry.build().eval(), tuple(entry.example_inputs())
    buf = io.BytesIO()
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, dynamo=True, input_names=list(entry.input_names),
                          output_names=list(entry.output_names), dynamic_shapes=dynamic_shapes, opset_version=opset)
    model = onnx.load_from_string(buf.getvalue())
    return model, {n: tuple(t.shape) for n, t in zip(entry.input_names, example)}


@pytest.mark.parametrize("name", ["resnet_basic", "shufflenetv2", "bert_encoder"])
def test_dynamo_exported_models_prune_and_verify(name):
    from onnx_prune.models.zoo import ENTRIES

    model, shapes = dynamo_export(ENTRIES[name])
    assert model.opset_import[0].version >= 18
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    assert len(analysis.groups) >= 8
    feeds = random_feeds(canon.model, shapes)
    for plan in (uniform_plan(analysis, 0.5), random_plan(analysis, np.random.default_rng(1), "keep1")):
        result = verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, feeds)
        assert result.max_abs_error <= 1e-4 * result.output_scale


def test_group_norm_op_prunes_whole_groups():
    """At opset 21 the exporter writes torch's GroupNorm as the GroupNormalization op: groups of
    4 channels prune whole (num_groups follows), one channel per group prunes channel by channel."""
    import torch
    from types import SimpleNamespace

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.gn1 = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.GroupNorm(8, 32)
            self.c2, self.gn2 = torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.GroupNorm(32, 32)
            self.c3 = torch.nn.Conv2d(32, 8, 1)

        def forward(self, x):
            return self.c3(torch.relu(self.gn2(self.c2(torch.relu(self.gn1(self.c1(x)))))))

    torch.manual_seed(0)
    entry = SimpleNamespace(build=Net, example_inputs=lambda: [torch.randn(1, 3, 16, 16)], input_names=["x"],
                            output_names=["y"])
    model, shapes = dynamo_export(entry, opset=21)
    assert sum(n.op_type == "GroupNormalization" for n in model.graph.node) == 2
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    assert sorted(g.size for g in analysis.groups) == [8, 32]
    feeds = random_feeds(canon.model, shapes)
    for plan in (uniform_plan(analysis, 0.5), random_plan(analysis, np.random.default_rng(1)),
                 random_plan(analysis, np.random.default_rng(2), "keep1")):
        pruned = apply_plan(canon.model, analysis, plan)
        verify(canon.model, pruned, analysis, plan, feeds)
    groups = [onnx.helper.get_attribute_value(a) for n in pruned.graph.node if n.op_type == "GroupNormalization"
              for a in n.attribute if a.name == "num_groups"]
    assert groups == [1, 1]


def test_dynamo_export_with_dynamic_batch_and_sequence_prunes_layers_apart():
    """With dynamic dims the dynamo exporter computes one [batch, seq, heads, head_dim] shape and
    shares it between layers (here LLaMA with grouped-query attention); plans that prune one
    layer's heads and not another's must still run and verify."""
    import torch

    from onnx_prune.models.hf import ENTRIES

    entry = ENTRIES["hf_llama_gqa"]
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)
    model, shapes = dynamo_export(entry, {"inputs": ({0: batch, 1: seq}, {0: batch, 1: seq})})
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    # per layer: its key/value heads (with Q, K and V as producers) and the query heads within
    # each key/value head's group (repeat_kv's Expand, Q alone)
    heads = [g for g in analysis.groups if g.size == 2 and len(g.producers) == 3]
    within = [g for g in analysis.groups if g.size == 2 and len(g.producers) == 1]
    assert len(heads) == len(within) == 2, [(g.name, g.size) for g in analysis.groups]
    feeds = random_feeds(canon.model, shapes)
    rng = np.random.default_rng(0)
    plans = [{heads[0].name: [1]}, {within[1].name: [0]}] + [random_plan(analysis, rng, "random") for _ in range(4)]
    for plan in plans:
        result = verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, feeds)
        assert result.max_abs_error <= 1e-4 * result.output_scale


def test_opset23_attention_and_rms_norm_prune_heads_and_head_sizes():
    """At opset 23 the exporter writes scaled_dot_product_attention as ONNX's Attention op (here
    with grouped key/value heads) and RMSNorm as RMSNormalization: key/value heads (with their
    query heads), query heads within a group, head sizes and the FFN prune, stay equivalent, and
    the torch bridge (recovery, fine-tuning) runs the pruned graph as ONNX Runtime does."""
    import torch
    import torch.nn.functional as F
    from types import SimpleNamespace

    from onnx_prune.backends.torch_graph import TorchGraph

    class Block(torch.nn.Module):
        def __init__(self, d=64, hq=4, hkv=2, size=16):
            super().__init__()
            self.hq, self.hkv, self.size = hq, hkv, size
            self.q, self.k, self.v = (torch.nn.Linear(d, h * size) for h in (hq, hkv, hkv))
            self.o, self.norm1, self.norm2 = torch.nn.Linear(hq * size, d), torch.nn.RMSNorm(d), torch.nn.RMSNorm(d)
            self.up, self.down = torch.nn.Linear(d, 128), torch.nn.Linear(128, d)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.norm1(x)
            q, k, v = (p(h).view(b, t, n, self.size).transpose(1, 2)
                       for p, n in ((self.q, self.hq), (self.k, self.hkv), (self.v, self.hkv)))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
            return x + self.down(F.silu(self.up(self.norm2(x))))

    torch.manual_seed(0)
    entry = SimpleNamespace(build=Block, example_inputs=lambda: [torch.randn(2, 8, 64)], input_names=["x"],
                            output_names=["y"])
    model, shapes = dynamo_export(entry, opset=23)
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "RMSNormalization"} <= ops, ops
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    # key/value heads, query heads per key/value head, query/key size, value size, FFN
    assert sorted(g.size for g in analysis.groups) == [2, 2, 16, 16, 128]
    feeds = random_feeds(canon.model, shapes)
    for plan in (uniform_plan(analysis, 0.5), random_plan(analysis, np.random.default_rng(1)),
                 random_plan(analysis, np.random.default_rng(2), "keep1")):
        pruned = apply_plan(canon.model, analysis, plan)
        verify(canon.model, pruned, analysis, plan, feeds)
    import onnxruntime as ort

    expected = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        got = TorchGraph(pruned).eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    got = got[0] if isinstance(got, (tuple, list)) else got
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4, rtol=1e-4)


def test_torch_lstm_and_gru_prune_each_layer_apart():
    """torch's exporter (from_torch, dynamic batch) writes a stacked LSTM as ONNX LSTM nodes whose
    zero initial states are slices of one ConstantOfShape sized at run time: each layer's hidden
    units are a group of their own (canonicalize gives every reader its own fill), and so are a
    bidirectional GRU's, both directions alike."""
    import torch

    from onnx_prune.models.torch_export import from_torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(12, 32)
            self.lstm = torch.nn.LSTM(32, 48, num_layers=2, batch_first=True)
            self.gru = torch.nn.GRU(48, 24, batch_first=True, bidirectional=True)
            self.out = torch.nn.Linear(48, 5)

        def forward(self, x):
            h, _ = self.lstm(torch.relu(self.inp(x)))
            g, _ = self.gru(h)
            return self.out(g)

    torch.manual_seed(0)
    model = from_torch(Net(), torch.randn(3, 7, 12))
    assert {"LSTM", "GRU", "ConstantOfShape"} <= {n.op_type for n in model.graph.node}
    shapes = {"input": (3, 7, 12)}
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    by_producer = {tuple(g.producers): g.size for g in analysis.groups}
    assert sorted(by_producer.values()) == [24, 32, 48, 48], by_producer  # GRU, Linear, LSTM layers 1 and 2
    _verify_half_and_random(canon, analysis, keep1=True)


def test_one_expanded_zero_read_by_two_layers_ties_neither():
    """torch's dynamo exporter builds every Mamba layer's zero scan state with one Expand of a zero
    scalar, shared: read by both layers, it tied their inner widths into one group. Canonicalize
    gives each reader its own fill, as it does a ConstantOfShape's."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate([(16, 32), (32, 16), (16, 32), (32, 8)])}
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array([0], np.int64), "start"), numpy_helper.from_array(np.array([1], np.int64), "end"),
              numpy_helper.from_array(np.array([32], np.int64), "width")]
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"]), helper.make_node("Slice", ["x_shape", "start", "end"], ["batch"]),
             helper.make_node("Concat", ["batch", "width"], ["shape"], axis=0),  # sized at run time: not folded
             helper.make_node("Expand", ["zero", "shape"], ["state"], name="zeros")]
    for layer, (x, w_in, w_out, y) in enumerate([("x", "w0", "w1", "b"), ("b", "w2", "w3", "y")]):
        nodes += [helper.make_node("MatMul", [x, w_in], [f"h{layer}"]),
                  helper.make_node("Mul", ["state", f"h{layer}"], [f"s{layer}"]),  # the scan's first step
                  helper.make_node("Add", [f"s{layer}", f"h{layer}"], [f"a{layer}"]),
                  helper.make_node("Relu", [f"a{layer}"], [f"r{layer}"]),
                  helper.make_node("MatMul", [f"r{layer}", w_out], [y])]
    graph = helper.make_graph(nodes, "fills", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    shapes = {"x": (3, 16)}
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    assert sorted(g.size for g in analysis.groups) == [16, 32, 32]
    _verify_half_and_random(canon, analysis)


def test_modules_exported_as_functions_prune_each_call_apart():
    """torch's `export_modules_as_functions` writes each block as a call of one local function:
    nothing in the graph could be pruned ("Block: unsupported op"). Canonicalize inlines the calls,
    so each block prunes to widths of its own and the emitted model has no functions."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(c, 2 * c, 3, padding=1), torch.nn.Conv2d(2 * c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.b(torch.relu(self.a(x))))

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8), torch.nn.Conv2d(8, 4, 1)).eval()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"functions_{os.getpid()}.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), path, dynamo=False, opset_version=17,
                          export_modules_as_functions={Block})
    model = onnx.load(path)
    os.remove(path)
    assert [f.name for f in model.functions] == ["Block"] and sum(n.op_type == "Block" for n in model.graph.node) == 2
    canon = canonicalize(model)
    assert not canon.model.functions and any("local functions (Block)" in n for n in canon.notes)
    analysis = analyze_canonical(canon)
    assert sorted(g.size for g in analysis.groups) == [8, 16, 16]  # the residual stream; each block's inner width
    _verify_half_and_random(canon, analysis)


@pytest.mark.parametrize("coordinates", [False, True])
def test_sparse_initializers_are_read_as_dense_weights(coordinates):
    """`finetune --sparse-initializers` stores its sparse weights as ONNX sparse initializers
    (flat positions; coordinate rows are the other form): compiling such a model found 0 weight
    layers and nothing to prune. Canonicalize writes them dense, as the weights they are."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 3, 3, 3)).astype(np.float32) * (rng.random((16, 3, 3, 3)) < 0.3)
    w2 = rng.normal(size=(4, 16, 1, 1)).astype(np.float32)
    nz = np.flatnonzero(w1)
    indices = np.stack(np.unravel_index(nz, w1.shape), 1) if coordinates else nz
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(w1.reshape(-1)[nz], "w1"),
                                       numpy_helper.from_array(indices.astype(np.int64), "w1_indices"), w1.shape)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="c1"),
                               helper.make_node("Relu", ["a"], ["r"], name="relu"),
                               helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")], "sparse",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(w2, "w2")], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    canon = canonicalize(model)
    weights = {t.name: numpy_helper.to_array(t) for t in canon.model.graph.initializer}
    assert not canon.model.graph.sparse_initializer and np.array_equal(weights["w1"], w1)
    analysis = analyze_canonical(canon)
    assert [g.size for g in analysis.groups] == [16]
    _verify_half_and_random(canon, analysis)
