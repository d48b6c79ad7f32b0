"""Models saved from an ONNX Runtime session (level extended) hold its fused ops: canonicalization
spells them out, so they analyse, prune and verify as the models they came from."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.backends.ort import make_session, random_feeds
from onnx_prune.compiler.plans import random_plan
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import verify

RNG = np.random.default_rng(0)


def _init(name, *shape):
    return numpy_helper.from_array((RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)


def convs_with_activations():
    """Conv -> LeakyRelu, Conv -> Clip (ReLU6), Conv + residual -> Relu, Conv -> HardSigmoid (ORT
    fuses all but the residual one on CPU)."""
    conv = lambda n, x, w, y, **kw: helper.make_node("Conv", [x, w, f"b{n}"], [y], name=f"conv{n}", **kw)  # noqa: E731
    nodes = [conv(1, "x", "w1", "c1", pads=[1] * 4), helper.make_node("LeakyRelu", ["c1"], ["a1"], alpha=0.2),
             conv(2, "a1", "w2", "c2", pads=[1] * 4), helper.make_node("Clip", ["c2", "lo", "hi"], ["a2"]),
             conv(3, "a2", "w3", "c3", pads=[1] * 4), helper.make_node("Add", ["c3", "a2"], ["s3"]),
             helper.make_node("Relu", ["s3"], ["a3"]),
             conv(4, "a3", "w4", "c4"), helper.make_node("HardSigmoid", ["c4"], ["a4"], alpha=0.3, beta=0.4),
             conv(5, "a4", "w5", "y")]
    inits = [_init("w1", 16, 3, 3, 3), _init("w2", 16, 16, 3, 3), _init("w3", 16, 16, 3, 3), _init("w4", 24, 16, 1, 1),
             _init("w5", 4, 24, 1, 1), numpy_helper.from_array(np.float32(0), "lo"),
             numpy_helper.from_array(np.float32(6), "hi")] + [_init(f"b{k}", c) for k, c in enumerate((16, 16, 16, 24, 4), 1)]
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], \
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], nodes, inits


def scaled_attention():
    """Q K^T scaled: ORT writes FusedMatMul(Q, K, transB=1, alpha=0.2)."""
    nodes = [helper.make_node("MatMul", ["x", f"w{c}"], [c]) for c in "qkv"] + [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]), helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]), helper.make_node("MatMul", ["a", "wo"], ["y"])]
    inits = [_init("wq", 16, 24), _init("wk", 16, 24), _init("wv", 16, 24), _init("wo", 24, 16),
             numpy_helper.from_array(np.array(0.2, np.float32), "scale")]
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 16])], \
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 16])], nodes, inits


def ort_saved(build, tmp_path):
    inputs, outputs, nodes, inits = build()
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src, saved = tmp_path / "float.onnx", tmp_path / "saved.onnx"
    onnx.save(m, src)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(saved)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return m, onnx.load(saved)


@pytest.mark.parametrize("build,fused", [(convs_with_activations, "FusedConv"), (scaled_attention, "FusedMatMul")])
def test_ort_fused_ops_are_spelled_out_and_prune_as_the_original(build, fused, tmp_path):
    original, saved = ort_saved(build, tmp_path)
    ops = [n.op_type for n in saved.graph.node if n.domain == "com.microsoft"]
    assert ops.count(fused) >= (3 if fused == "FusedConv" else 1), ops
    canon = canonicalize(saved)
    assert not [n for n in canon.model.graph.node if n.domain == "com.microsoft"]
    assert any(fused in note for note in canon.notes)
    feeds = random_feeds(canon.model, canon.input_shapes)
    np.testing.assert_allclose(make_session(canon.model).run(None, feeds)[0], make_session(saved).run(None, feeds)[0],
                               rtol=1e-5, atol=1e-5)
    analysis = analyze_canonical(canon)
    assert sorted(g.size for g in analysis.groups) == sorted(g.size for g in analyze_canonical(canonicalize(original)).groups)
    for seed in range(3):
        plan = random_plan(analysis, np.random.default_rng(seed))
        verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, feeds)


def test_a_fused_conv_with_a_residual_input_adds_it_before_the_activation():
    """FusedConv(X, W, B, Z) is activation(conv + Z), as ORT's NCHWc path writes it."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 4, name="stem"),
             helper.make_node("FusedConv", ["a", "w1", "b1", "a"], ["r"], domain="com.microsoft", activation="Relu",
                              pads=[1] * 4, kernel_shape=[3, 3], name="block"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="head")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [_init("w0", 8, 3, 3, 3), _init("w1", 8, 8, 3, 3), _init("b1", 8), _init("w2", 4, 8, 1, 1)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    canon = canonicalize(m)
    feeds = random_feeds(canon.model, canon.input_shapes)
    np.testing.assert_allclose(make_session(canon.model).run(None, feeds)[0], make_session(m).run(None, feeds)[0],
                               rtol=1e-5, atol=1e-5)
    analysis = analyze_canonical(canon)
    assert [g.size for g in analysis.groups] == [8]  # the stem and the block, tied by the residual
    plan = random_plan(analysis, np.random.default_rng(0))
    verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, feeds)
