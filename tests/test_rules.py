"""One small graph per op rule: what becomes prunable or frozen, and equivalence under random plans."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.backends.ort import random_feeds
from onnx_prune.compiler.plans import random_plan
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.rules import supported_ops
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import verify

RNG = np.random.default_rng(0)


def W(*shape):
    return (RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32)


def model(nodes, inits, x_shape, out_shape, opset=17, domains=()):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains])
    m.ir_version = 8
    return m


def conv(name, x, w, out, **kw):
    return helper.make_node("Conv", [x, w], [out], name=name, **kw)


def head(x, c):
    """GAP + Flatten + Gemm so the graph output is frozen but the body is not."""
    return ([helper.make_node("GlobalAveragePool", [x], ["gp"], name="gap"),
             helper.make_node("Flatten", ["gp"], ["fl"], name="flat"),
             helper.make_node("Gemm", ["fl", "wh"], ["y"], transB=1, name="fc")], {"wh": W(3, c)})


def body(nodes, inits, c, **kw):
    h_nodes, h_inits = head(nodes[-1].output[0], c)
    return model(nodes + h_nodes, {**inits, **h_inits}, [1, 3, 8, 8], [1, 3], **kw)


CASES = {
    "conv_transpose": lambda: body([conv("c1", "x", "w1", "a", pads=[1] * 4),
                                    helper.make_node("ConvTranspose", ["a", "wt", "bt"], ["b"], name="ct", strides=[1, 1])],
                                   {"w1": W(8, 3, 3, 3), "wt": W(8, 6, 1, 1), "bt": W(6)}, 6),
    "instance_norm": lambda: body([conv("c1", "x", "w1", "a", pads=[1] * 4),
                                   helper.make_node("InstanceNormalization", ["a", "s", "b"], ["n"], name="in"),
                                   conv("c2", "n", "w2", "o")],
                                  {"w1": W(8, 3, 3, 3), "s": W(8) + 1, "b": W(8), "w2": W(4, 8, 1, 1)}, 4),
    # whole groups of a GroupNormalization prune; scale and bias per group (opset 18) or per
    # channel (opset 21); one channel per group (num_groups == C) prunes channel by channel
    **{f"group_norm_{g}_groups_opset{opset}": (lambda g=g, opset=opset: body(
        [conv("c1", "x", "w1", "a", pads=[1] * 4),
         helper.make_node("GroupNormalization", ["a", "s", "b"], ["n"], num_groups=g, name="gn"),
         helper.make_node("Relu", ["n"], ["r"], name="act"),
         conv("c2", "r", "w2", "o")],
        {"w1": W(16, 3, 3, 3), "s": W(16 if opset >= 21 else g) + 1, "b": W(16 if opset >= 21 else g),
         "w2": W(4, 16, 1, 1)}, 4, opset=opset)) for g in (4, 16) for opset in (18, 21)},
    # ORT's transformers optimizer output: fused bias + GELU, and LayerNorm fused with the residual
    "ort_contrib_ffn": lambda: model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
         helper.make_node("BiasGelu", ["a", "b1"], ["g"], name="gelu", domain="com.microsoft"),
         helper.make_node("MatMul", ["g", "w2"], ["f"], name="fc2"),
         helper.make_node("FastGelu", ["f", "b2"], ["h"], name="fastgelu", domain="com.microsoft"),
         helper.make_node("MatMul", ["h", "w3"], ["o"], name="fc3"),
         helper.make_node("SkipLayerNormalization", ["o", "x", "gamma", "beta"], ["y"], name="skipln",
                          domain="com.microsoft")],
        {"w1": W(16, 32), "b1": W(32), "w2": W(32, 24), "b2": W(24), "w3": W(24, 16), "gamma": W(16) + 1,
         "beta": W(16)}, [2, 8, 16], [2, 8, 16], domains=("com.microsoft",)),
    # ORT's fused attention (4 heads of 8 packed as Q | K | V): whole heads prune
    "ort_fused_attention": lambda: model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
         helper.make_node("Attention", ["a", "wqkv", "bqkv"], ["att"], num_heads=4, name="att", domain="com.microsoft"),
         helper.make_node("MatMul", ["att", "w2"], ["y"], name="fc2")],
        {"w1": W(16, 32), "wqkv": W(32, 96), "bqkv": W(96), "w2": W(32, 16)}, [2, 8, 16], [2, 8, 16],
        domains=("com.microsoft",)),
    "depthwise_multiplier": lambda: body([conv("c1", "x", "w1", "a", pads=[1] * 4),
                                          conv("dw", "a", "wd", "d", pads=[1] * 4, group=8),
                                          conv("c2", "d", "w2", "o")],
                                         {"w1": W(8, 3, 3, 3), "wd": W(16, 1, 3, 3), "w2": W(4, 16, 1, 1)}, 4),
    "pad_spatial": lambda: body([conv("c1", "x", "w1", "a"),
                                 helper.make_node("Pad", ["a", "pads"], ["p"], name="pad"),
                                 conv("c2", "p", "w2", "o")],
                                {"w1": W(8, 3, 1, 1), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
                                 "w2": W(4, 8, 3, 3)}, 4),
    "squeeze_unsqueeze": lambda: body([conv("c1", "x", "w1", "a"),
                                       helper.make_node("Unsqueeze", ["a", "ax"], ["u"], name="unsq"),
                                       helper.make_node("Squeeze", ["u", "ax2"], ["s"], name="sq"),
                                       conv("c2", "s", "w2", "o")],
                                      {"w1": W(8, 3, 1, 1), "ax": np.array([2], np.int64), "ax2": np.array([2], np.int64),
                                       "w2": W(4, 8, 1, 1)}, 4),
    "where_expand": lambda: body([conv("c1", "x", "w1", "a"),
                                  helper.make_node("Greater", ["a", "zero"], ["m"], name="gt"),
                                  helper.make_node("Expand", ["bias", "shape"], ["e"], name="exp"),
                                  helper.make_node("Where", ["m", "a", "e"], ["w"], name="where"),
                                  conv("c2", "w", "w2", "o")],
                                 {"w1": W(8, 3, 1, 1), "zero": np.float32(0), "bias": W(1, 8, 1, 1),
                                  "shape": np.array([1, 8, 8, 8], np.int64), "w2": W(4, 8, 1, 1)}, 4),
    # statistics, sums, masks and triangles along the positions: every channel on its own
    # (test_ops_along_positions_leave_the_channels_prunable)
    **{name: (lambda op=op, inputs=inputs, attrs=attrs, extra=extra: body(
        [conv("c1", "x", "w1", "a", pads=[1] * 4),
         helper.make_node(op, ["a", *inputs], ["n"], name="op", **attrs),
         conv("c2", "n", "w2", "o")],
        {"w1": W(8, 3, 3, 3), "w2": W(4, 8, 1, 1), **extra}, 4))
       for name, op, inputs, attrs, extra in [
           ("mean_variance_norm", "MeanVarianceNormalization", [], {}, {}),
           ("lp_normalization_over_width", "LpNormalization", [], {"axis": 3, "p": 1}, {}),
           ("cumsum_over_height", "CumSum", ["ax"], {}, {"ax": np.array(2, np.int64)}),
           ("trilu_positions", "Trilu", [], {"upper": 1}, {}),
           ("compress_rows", "Compress", ["keep"], {"axis": 2}, {"keep": np.arange(8) % 3 != 1}),
           ("grid_sample", "GridSample", ["grid"], {}, {"grid": RNG.uniform(-1, 1, (1, 5, 6, 2)).astype(np.float32)}),
           ("roi_align", "RoiAlign", ["rois", "batch"], {"output_height": 3, "output_width": 2},
            {"rois": np.array([[0, 0, 5, 5], [1, 2, 7, 6]], np.float32), "batch": np.zeros(2, np.int64)}),
           ("max_roi_pool", "MaxRoiPool", ["rois5"], {"pooled_shape": [2, 2]},
            {"rois5": np.array([[0, 0, 0, 5, 5], [0, 1, 2, 7, 6]], np.float32)}),
           ("atan", "Atan", [], {}, {})]},
    # Keras-style dense and multi-head projections written as einsums (tf2onnx keeps them)
    "einsum_heads": lambda: model(
        [helper.make_node("Einsum", ["x", "w1"], ["a"], equation="bsd,de->bse", name="dense"),
         helper.make_node("Relu", ["a"], ["r"], name="act"),
         helper.make_node("Einsum", ["r", "w2"], ["h"], equation="bse,ehk->bshk", name="heads"),
         helper.make_node("Tanh", ["h"], ["t"], name="mix"),
         helper.make_node("Einsum", ["t", "w3"], ["y"], equation="bshk,hkf->bsf", name="merge")],
        {"w1": W(16, 32), "w2": W(32, 4, 8), "w3": W(4, 8, 16)}, [1, 8, 16], [1, 8, 16]),
}

FROZEN = {
    "layernorm_channels": (lambda: model(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1], name="tr"),
         helper.make_node("MatMul", ["t", "w1"], ["a"], name="fc1"),
         helper.make_node("LayerNormalization", ["a", "g", "b"], ["n"], axis=-1, name="ln"),
         helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2")],
        {"w1": W(3, 8), "g": W(8) + 1, "b": W(8), "w2": W(8, 5)}, [1, 3, 4, 4], [1, 4, 4, 5]),
        "normalized over by LayerNormalization"),
    # ONNX Runtime's RMSNorm (its optimizer's fusion for LLaMA-like models), in the ONNX domain,
    # with its inverse std read: that changes with the kept count
    "simplified_layernorm_channels": (lambda: model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
         helper.make_node("SimplifiedLayerNormalization", ["a", "g"], ["n1", "inv"], axis=-1, name="rms"),
         helper.make_node("Mul", ["n1", "inv"], ["n"], name="use_stats"),
         helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2")],
        {"w1": W(16, 8), "g": W(8) + 1, "w2": W(8, 5)}, [2, 4, 16], [2, 4, 5]),
        "normalized over by SimplifiedLayerNormalization"),
    "softmax_channels": (lambda: body([conv("c1", "x", "w1", "a"),
                                       helper.make_node("Softmax", ["a"], ["s"], axis=1, name="sm"),
                                       conv("c2", "s", "w2", "o")],
                                      {"w1": W(8, 3, 1, 1), "w2": W(4, 8, 1, 1)}, 4), "normalizes over"),
    **{name: (lambda op=op, inputs=inputs, attrs=attrs, extra=extra, c=c: body(
        [conv("c1", "x", "w1", "a"),
         helper.make_node(op, ["a", *inputs], ["n"], name="op", **attrs),
         conv("c2", "n", "w2", "o")],
        {"w1": W(8, 3, 1, 1), "w2": W(4, c, 1, 1), **extra}, 4), reason)
       for name, op, inputs, attrs, extra, c, reason in [
           ("mean_variance_norm_channels", "MeanVarianceNormalization", [], {"axes": [0, 1, 2, 3]}, {}, 8,
            "normalized over by MeanVarianceNormalization"),
           ("lp_normalization_channels", "LpNormalization", [], {"axis": 1}, {}, 8, "normalizes over"),
           ("cumsum_channels", "CumSum", ["ax"], {}, {"ax": np.array(1, np.int64)}, 8, "accumulates along"),
           ("compress_channels", "Compress", ["keep"], {"axis": 1}, {"keep": np.arange(8) < 5}, 5, "picks along")]},
    "top_k_channels": (lambda: body([conv("c1", "x", "w1", "a"),
                                     helper.make_node("TopK", ["a", "k"], ["t", "ti"], axis=1, name="topk"),
                                     conv("c2", "t", "w2", "o")],
                                    {"w1": W(8, 3, 1, 1), "k": np.array([5], np.int64), "w2": W(4, 5, 1, 1)}, 4),
                       "ranks along"),
    "pad_channels": (lambda: body([conv("c1", "x", "w1", "a"),
                                   helper.make_node("Pad", ["a", "pads"], ["p"], name="pad"),
                                   conv("c2", "p", "w2", "o")],
                                  {"w1": W(8, 3, 1, 1), "pads": np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64),
                                   "w2": W(4, 10, 1, 1)}, 4), "Pad 'pad'"),
    # GroupNorm with one group, as torch exports it: channels reshaped into the normalized axis
    "group_norm_as_instance_norm": (lambda: body([
        conv("c1", "x", "w1", "a"),
        helper.make_node("Reshape", ["a", "grouped"], ["r"], name="to_groups"),
        helper.make_node("InstanceNormalization", ["r", "one", "zero"], ["n"], name="in"),
        helper.make_node("Reshape", ["n", "nchw"], ["b"], name="back"),
        conv("c2", "b", "w2", "o")],
        {"w1": W(8, 3, 1, 1), "grouped": np.array([1, 1, -1], np.int64), "one": np.ones(1, np.float32),
         "zero": np.zeros(1, np.float32), "nchw": np.array([1, 8, 8, 8], np.int64), "w2": W(4, 8, 1, 1)}, 4),
        "normalized over by InstanceNormalization"),
    "group_norm_one_group": (lambda: body([
        conv("c1", "x", "w1", "a"),
        helper.make_node("GroupNormalization", ["a", "s", "b"], ["n"], num_groups=1, name="gn"),
        conv("c2", "n", "w2", "o")],
        {"w1": W(8, 3, 1, 1), "s": W(8) + 1, "b": W(8), "w2": W(4, 8, 1, 1)}, 4, opset=21),
        "(one group)"),
    "ort_fused_attention_unequal_qkv": (lambda: model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
         helper.make_node("Attention", ["a", "wqkv", "bqkv"], ["att"], num_heads=2, qkv_hidden_sizes=[16, 16, 32],
                          name="att", domain="com.microsoft"),
         helper.make_node("MatMul", ["att", "w2"], ["y"], name="fc2")],
        {"w1": W(16, 16), "wqkv": W(16, 64), "bqkv": W(64), "w2": W(32, 16)}, [2, 8, 16], [2, 8, 16],
        domains=("com.microsoft",)), "unequal Q/K/V sizes"),
    "ort_op_without_rule": (lambda: model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
         helper.make_node("Inverse", ["a"], ["y"], name="inv", domain="com.microsoft")],
        {"w1": W(16, 8) + np.eye(16, 8, dtype=np.float32) * 4}, [2, 8, 16], [2, 8, 8], domains=("com.microsoft",)),
        "prune the model before ORT fuses it"),
    "reduce_channels": (lambda: body([conv("c1", "x", "w1", "a"),
                                      helper.make_node("ReduceMax", ["a"], ["m"], axes=[1], keepdims=1, name="rm"),
                                      helper.make_node("Sub", ["a", "m"], ["s"], name="sub"),
                                      conv("c2", "s", "w2", "o")],
                                     {"w1": W(8, 3, 1, 1), "w2": W(4, 8, 1, 1)}, 4), "reduces over"),
}


def channel_mean_model(op="ReduceMean", opset=17):
    """ConvNeXt V2's global response norm: x * gamma * (Gx / (mean over channels of Gx)) + beta + x,
    Gx the L2 norm over space; with `op` ReduceL2, an L2 normalization over channels instead."""
    axes = {"axes": [1]} if opset < 18 else {}
    extra = [] if opset < 18 else ["ax1"]
    if op == "ReduceMean":
        nodes = [helper.make_node("ReduceL2", ["a"] + ([] if opset < 18 else ["ax23"]), ["g"], keepdims=1, name="gx",
                                  **({"axes": [2, 3]} if opset < 18 else {})),
                 helper.make_node("ReduceMean", ["g"] + extra, ["m"], keepdims=1, name="mean", **axes),
                 helper.make_node("Add", ["m", "eps"], ["me"], name="eps_add"),
                 helper.make_node("Div", ["g", "me"], ["nx"], name="div"),
                 helper.make_node("Mul", ["a", "nx"], ["xn"], name="mul"),
                 helper.make_node("Mul", ["xn", "gamma"], ["xg"], name="scale"),
                 helper.make_node("Add", ["xg", "beta"], ["xb"], name="shift"),
                 helper.make_node("Add", ["xb", "a"], ["n"], name="res")]
    else:
        nodes = [helper.make_node(op, ["a"] + extra, ["m"], keepdims=1, name="norm", **axes),
                 helper.make_node("Add", ["m", "eps"], ["me"], name="eps_add"),
                 helper.make_node("Div", ["a", "me"], ["n"], name="div")]
    return body([conv("c1", "x", "w1", "a", pads=[1] * 4)] + nodes + [conv("c2", "n", "w2", "o")],
                {"w1": W(8, 3, 3, 3), "eps": np.float32(1e-6), "gamma": W(1, 8, 1, 1) + 1, "beta": W(1, 8, 1, 1),
                 "w2": W(4, 8, 1, 1), "ax1": np.array([1]), "ax23": np.array([2, 3])}, 4, opset=opset)


@pytest.mark.parametrize("op,opset", [("ReduceMean", 17), ("ReduceMean", 18), ("ReduceL2", 17), ("ReduceSum", 18),
                                      ("ReduceSumSquare", 17)])
def test_sums_and_means_over_channels_prune_and_a_mean_keeps_its_dense_divisor(op, opset):
    m = channel_mean_model(op, opset)
    analysis = _prune_and_verify(m)  # the masked reference's zeros count in the dense mean
    assert sorted(g.size for g in analysis.groups) == [4, 8]  # c1's output is no longer frozen
    canon = canonicalize(m)
    everything = apply_plan(canon.model, analysis, {g.name: np.arange(g.size) for g in analysis.groups})
    halved = apply_plan(canon.model, analysis, {g.name: np.arange(g.size // 2) for g in analysis.groups})
    rescales = [n for n in halved.graph.node if n.name.endswith("__rescale")]
    assert len(rescales) == (op == "ReduceMean")
    assert not any(n.name.endswith("__rescale") for n in everything.graph.node)
    if rescales:
        scale = next(t for t in halved.graph.initializer if t.name == rescales[0].input[1])
        assert numpy_helper.to_array(scale) == np.float32(0.5)


def rms_norm_model(kind, stats_used=False):
    """Two projections summed into a residual stream of 24, RMS-normalized, projected back: by
    ORT's SimplifiedLayerNormalization, its SkipSimplifiedLayerNormalization (reading its sum
    output too) or opset 23's RMSNormalization. `stats_used` (skip): the inverse std feeds the output."""
    eps = {} if kind == "skip" else {"epsilon": 0.3}  # large, so that a wrong epsilon shows
    mm = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
          helper.make_node("MatMul", ["x", "w2"], ["b"], name="fc2")]
    if kind == "skip":
        norm = [helper.make_node("SkipSimplifiedLayerNormalization", ["a", "b", "gamma"],
                                 ["n0", "", "inv" if stats_used else "", "s"], name="norm", domain="com.microsoft"),
                helper.make_node("Add", ["n0", "s"], ["n"], name="plus_sum")]
    else:
        op = "RMSNormalization" if kind == "rms23" else "SimplifiedLayerNormalization"
        norm = [helper.make_node("Add", ["a", "b"], ["s"], name="res"),
                helper.make_node(op, ["s", "gamma"], ["n"], name="norm", axis=-1, **eps)]
    tail = [helper.make_node("MatMul", ["n", "w3"], ["p"], name="fc3")]
    tail += [helper.make_node("Add", ["p", "inv"], ["y"], name="use_stats")] if stats_used else \
        [helper.make_node("Identity", ["p"], ["y"], name="out")]
    return model(mm + norm + tail, {"w1": W(16, 24), "w2": W(16, 24), "gamma": W(24) + 1, "w3": W(24, 16)},
                 [2, 8, 16], [2, 8, 16], opset=23 if kind == "rms23" else 17,
                 domains=("com.microsoft",) if kind == "skip" else ())


def test_a_contrib_domain_the_model_forgot_to_import_is_imported(tmp_path):
    """ORT's transformers optimizer hands back its model without importing com.microsoft (saving
    it adds the import): onnx's shape inference skipped the fused RMS norms, and the zoo's LLaMA,
    fused so in memory, lost a group (9 instead of the 10 of its unfused self)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from onnx_prune.models import registry

    zoo = registry.load("hf_llama_gqa")
    onnx.save(zoo.model, tmp_path / "llama.onnx")
    fused = optimize_model(str(tmp_path / "llama.onnx"), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    assert "com.microsoft" not in {o.domain for o in fused.model.opset_import}
    assert any(n.op_type == "SkipSimplifiedLayerNormalization" for n in fused.model.graph.node)
    canon = canonicalize(fused.model, input_shapes=zoo.input_shapes)
    analysis = analyze_canonical(canon)
    assert len(analysis.groups) == len(analyze_canonical(canonicalize(zoo.model, input_shapes=zoo.input_shapes)).groups)
    assert "com.microsoft" not in {o.domain for o in fused.model.opset_import}  # the caller's model is left alone
    plan = random_plan(analysis, np.random.default_rng(0))
    verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, zoo.make_feeds())


@pytest.mark.parametrize("kind", ["simplified", "skip", "rms23"])
def test_an_rms_norm_prunes_its_channels_with_epsilon_and_scale_rescaled(kind):
    m = rms_norm_model(kind)
    analysis = _prune_and_verify(m)  # the masked reference divides by the dense count
    assert [g.size for g in analysis.groups] == [24]
    canon = canonicalize(m)
    halved = apply_plan(canon.model, analysis, {g.name: np.arange(g.size // 2) for g in analysis.groups})
    norm = next(n for n in halved.graph.node if n.name == "norm")
    epsilon = next(a.f for a in norm.attribute if a.name == "epsilon")
    assert epsilon == pytest.approx(2e-12 if kind == "skip" else 0.6, rel=1e-6)  # ORT's default 1e-12 doubled
    gamma = numpy_helper.to_array(next(t for t in halved.graph.initializer if t.name == "gamma"))
    dense_gamma = numpy_helper.to_array(next(t for t in canon.model.graph.initializer if t.name == "gamma"))
    np.testing.assert_allclose(gamma, dense_gamma[:12] * np.sqrt(2), rtol=1e-6)


def test_a_graph_output_declared_with_symbolic_dims_takes_its_measured_shape():
    # ORT's transformers optimizer writes outputs as (batch, sequence, ...); onnx's inference
    # cannot see past its contrib ops, so the output's shape comes from running the graph
    m = rms_norm_model("skip")
    fc3 = next(n for n in m.graph.node if n.name == "fc3")
    fc3.output[0] = "y"  # the projection reading the normalized channels writes the output
    m.graph.node.remove(next(n for n in m.graph.node if n.name == "out"))
    dims = m.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[1].dim_param = "batch", "sequence"
    analysis = _prune_and_verify(m)
    assert [g.size for g in analysis.groups] == [24]


def test_a_skip_rms_norm_whose_inverse_std_is_read_keeps_its_channels():
    analysis = analyze_canonical(canonicalize(rms_norm_model("skip", stats_used=True)))
    assert not analysis.groups
    assert any("normalized over by" in f.reason for f in analysis.frozen)


def _prune_and_verify(m, seeds=3):
    canon = canonicalize(m)
    analysis = analyze_canonical(canon)
    feeds = random_feeds(canon.model, canon.input_shapes)
    for seed in range(seeds):
        plan = random_plan(analysis, np.random.default_rng(seed))
        verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, feeds)
    return analysis


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_prunes_and_stays_equivalent(case):
    analysis = _prune_and_verify(CASES[case]())
    assert analysis.groups, "expected prunable channels"


CASES["top_k_over_width"] = lambda: body([conv("c1", "x", "w1", "a", pads=[1] * 4),
                                           helper.make_node("TopK", ["a", "k"], ["t", "ti"], axis=3, name="topk"),
                                           helper.make_node("Cast", ["ti"], ["tf"], to=TensorProto.FLOAT, name="cast"),
                                           helper.make_node("Add", ["t", "tf"], ["n"], name="add"),
                                           conv("c2", "n", "w2", "o")],
                                          {"w1": W(8, 3, 3, 3), "k": np.array([3], np.int64), "w2": W(4, 8, 1, 1)}, 4)
CASES["reverse_sequence"] = lambda: model(  # tf2onnx's backward half of a bidirectional layer
    [helper.make_node("MatMul", ["x", "w1"], ["a"], name="c1"),
     helper.make_node("ReverseSequence", ["a", "lens"], ["r"], batch_axis=0, time_axis=1, name="rev"),
     helper.make_node("Relu", ["r"], ["n"], name="act"),
     helper.make_node("MatMul", ["n", "w2"], ["y"], name="c2")],
    {"w1": W(16, 24), "lens": np.array([6, 4], np.int64), "w2": W(24, 5)}, [2, 6, 16], [2, 6, 5])
ALONG_POSITIONS = ["top_k_over_width", "mean_variance_norm", "lp_normalization_over_width", "cumsum_over_height", "trilu_positions",
                   "compress_rows", "grid_sample", "roi_align", "max_roi_pool", "reverse_sequence", "atan"]


@pytest.mark.parametrize("case", ALONG_POSITIONS)
def test_ops_along_positions_leave_the_channels_prunable(case):
    """MeanVarianceNormalization (over batch and positions), LpNormalization and CumSum along a
    position axis, Trilu, Compress along rows, sampling at a grid or at regions of interest
    (GridSample, RoiAlign, MaxRoiPool), TopK along a row, ReverseSequence, elementwise math: each
    channel is computed on its own, so the conv before them prunes (before, MVN was said to mix
    channels and the others froze it)."""
    analysis = _prune_and_verify(CASES[case]())
    assert any("c1" in g.producers for g in analysis.groups), [g.producers for g in analysis.groups]


def test_ort_fused_activations_keep_the_ffn_prunable():
    analysis = _prune_and_verify(CASES["ort_contrib_ffn"]())
    assert sorted(g.size for g in analysis.groups) == [24, 32]
    assert any("normalized over by SkipLayerNormalization" in f.reason or "SkipLayerNormalization" in f.reason
               for f in analysis.frozen)


def test_ort_fused_attention_prunes_whole_heads():
    import onnx

    m = CASES["ort_fused_attention"]()
    analysis = _prune_and_verify(m, seeds=4)
    assert sorted(g.size for g in analysis.groups) == [4, 32]  # the heads; fc1's output
    canon = canonicalize(m)
    plan = random_plan(analysis, np.random.default_rng(0), "keep1")
    pruned = apply_plan(canon.model, analysis, plan)
    att = next(n for n in pruned.graph.node if n.op_type == "Attention")
    assert [onnx.helper.get_attribute_value(a) for a in att.attribute if a.name == "num_heads"] == [1]
    assert [list(t.dims) for t in pruned.graph.initializer if t.name == "wqkv"][0][1] == 3 * 8


def onnx_attention(layout, hq=4, hkv=4, d=8, dv=6, mask=False, **attrs):
    """x (2, 8, 16) -> Q, K, V projections -> ONNX's Attention (opset 23) -> output projection.
    `layout` "3d": heads merged in the last axis (q_num_heads, kv_num_heads); "4d": Reshape +
    Transpose to (B, H, S, D) and back. `mask`: a float bias per query head, (1, hq, 8, 8)."""
    nodes, inits = [], {"wq": W(16, hq * d), "wk": W(16, hkv * d), "wv": W(16, hkv * dv), "wo": W(hq * dv, 16)}
    qkv = []
    for name, heads, size in (("q", hq, d), ("k", hkv, d), ("v", hkv, dv)):
        nodes.append(helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}2"], name=f"proj_{name}"))
        if layout == "4d":
            inits[f"shape_{name}"] = np.array([2, 8, heads, size], np.int64)
            nodes += [helper.make_node("Reshape", [f"{name}2", f"shape_{name}"], [f"{name}3"], name=f"split_{name}"),
                      helper.make_node("Transpose", [f"{name}3"], [f"{name}4"], perm=[0, 2, 1, 3], name=f"heads_{name}")]
        qkv.append(f"{name}4" if layout == "4d" else f"{name}2")
    if mask:
        inits["bias"] = W(1, hq, 8, 8)
    if layout == "3d":
        attrs = {"q_num_heads": hq, "kv_num_heads": hkv, **attrs}
    nodes.append(helper.make_node("Attention", qkv + (["bias"] if mask else []), ["att"], name="att", **attrs))
    if layout == "4d":
        inits["merged"] = np.array([2, 8, hq * dv], np.int64)
        nodes += [helper.make_node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1, 3], name="back"),
                  helper.make_node("Reshape", ["att_t", "merged"], ["att2"], name="merge")]
    nodes.append(helper.make_node("MatMul", ["att2" if layout == "4d" else "att", "wo"], ["y"], name="out"))
    m = model(nodes, inits, [2, 8, 16], [2, 8, 16], opset=23)
    m.ir_version = 10
    return m


def ort_multi_head_attention(dv=8, bias=True, attention_bias=True, bnsh=False, **attrs):
    """x (2, 8, 16) -> Q, K, V projections -> ONNX Runtime's MultiHeadAttention (4 heads of 8; a
    packed Q | K | V bias; an additive bias per head) -> output projection. `bnsh`: key and value
    reshaped to (batch, heads, seq, head size) first, as cross-attention caches hold them."""
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [n], name=f"proj_{n}") for n in "qkv"]
    inits = {"wq": W(16, 32), "wk": W(16, 32), "wv": W(16, 4 * dv), "wo": W(4 * dv, 16)}
    ins = ["q", "k", "v", "", "", ""]
    if bnsh:
        for n, size in (("k", 8), ("v", dv)):
            inits[f"{n}_heads"] = np.array([2, 8, 4, size], np.int64)
            nodes += [helper.make_node("Reshape", [n, f"{n}_heads"], [f"{n}3"], name=f"split_{n}"),
                      helper.make_node("Transpose", [f"{n}3"], [f"{n}4"], perm=[0, 2, 1, 3], name=f"bnsh_{n}")]
        ins[1:3] = ["k4", "v4"]
    if bias:
        inits["qkv_bias"], ins[3] = W(64 + 4 * dv), "qkv_bias"
    if attention_bias:
        inits["head_bias"], ins[5] = W(1, 4, 8, 8), "head_bias"
    nodes += [helper.make_node("MultiHeadAttention", ins, ["att"], num_heads=4, name="mha", domain="com.microsoft",
                               **attrs),
              helper.make_node("MatMul", ["att", "wo"], ["y"], name="out")]
    return model(nodes, inits, [2, 8, 16], [2, 8, 16], domains=("com.microsoft",))


@pytest.mark.parametrize("kw", [{}, {"bias": False, "attention_bias": False, "unidirectional": 1}, {"scale": 0.3},
                                {"dv": 6}, {"bnsh": True, "bias": False, "attention_bias": False}])
def test_ort_multi_head_attention_prunes_heads_and_head_sizes(kw):
    import onnx

    m = ort_multi_head_attention(**kw)
    analysis = _prune_and_verify(m, seeds=4)
    # heads, query/key size, value size (one with the key's in the (batch, heads, seq, size) layout)
    assert sorted(g.size for g in analysis.groups) == ([4, 8] if kw.get("bnsh") else sorted([4, 8, kw.get("dv", 8)]))
    canon = canonicalize(m)
    plan = random_plan(analysis, np.random.default_rng(0), "keep1")
    att = next(n for n in apply_plan(canon.model, analysis, plan).graph.node if n.op_type == "MultiHeadAttention")
    values = {a.name: onnx.helper.get_attribute_value(a) for a in att.attribute}
    assert values["num_heads"] == 1 and values["scale"] == pytest.approx(kw.get("scale", 1 / np.sqrt(8)))


ONNX_ATTENTION = {
    "3d": dict(layout="3d"),
    "3d_grouped_queries": dict(layout="3d", hq=4, hkv=2),
    "3d_one_kv_head_causal_softcap": dict(layout="3d", hq=4, hkv=1, is_causal=1, softcap=5.0),
    "4d_mask_per_head": dict(layout="4d", mask=True),
    "4d_grouped_queries_scaled": dict(layout="4d", hq=4, hkv=2, scale=0.3),
}


@pytest.mark.parametrize("case", sorted(ONNX_ATTENTION))
def test_onnx_attention_prunes_heads_and_head_sizes(case):
    """Heads (key/value heads with their query heads), the query/key head size and the value head
    size each prune, and the pruned model stays equivalent (ONNX Runtime runs it)."""
    import onnx

    kw = ONNX_ATTENTION[case]
    m = onnx_attention(**kw)
    analysis = _prune_and_verify(m, seeds=4)
    hq, hkv = kw.get("hq", 4), kw.get("hkv", 4)
    sizes = sorted(g.size for g in analysis.groups)
    heads = [hkv] + ([hq // hkv] if hq != hkv else [])  # key/value heads; query heads within a group
    assert sizes == sorted([8, 6] + [h for h in heads if h > 1]), sizes
    canon = canonicalize(m)
    plan = random_plan(analysis, np.random.default_rng(0), "keep1")
    att = next(n for n in apply_plan(canon.model, analysis, plan).graph.node if n.op_type == "Attention")
    values = {a.name: onnx.helper.get_attribute_value(a) for a in att.attribute}
    assert values["scale"] == pytest.approx(kw.get("scale", 1 / np.sqrt(8)))  # not 1/sqrt(1)
    if kw["layout"] == "3d":
        assert (values["q_num_heads"], values["kv_num_heads"]) == (1, 1)


def recurrent(op, hidden=6, direction="forward", bias=True, states=True, peepholes=False, **attrs):
    """x (batch 2, seq 5, 4 features) -> MatMul (8 channels) -> an LSTM, GRU or RNN layer ->
    MatMul of its output (directions x hidden, merged) to 3. Initial states are constants. (ONNX
    Runtime runs only layout 0: sequence first.)"""
    gates, dirs = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 2 if direction == "bidirectional" else 1
    inits = {"w0": W(4, 8), "W": W(dirs, gates * hidden, 8), "R": W(dirs, gates * hidden, hidden)}
    ins = ["a", "W", "R", "B" if bias else "", ""]
    if bias:
        inits["B"] = W(dirs, 2 * gates * hidden)
    state_shape = (dirs, 2, hidden)
    if states:
        inits["h0"] = W(*state_shape)
        ins.append("h0")
        if op == "LSTM":
            inits["c0"] = W(*state_shape)
            ins.append("c0")
    if peepholes:
        ins += [""] * (7 - len(ins)) + ["P"]
        inits["P"] = W(dirs, 3 * hidden)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a0"], name="fc0")]
    nodes.append(helper.make_node("Transpose", ["a0"], ["a"], perm=[1, 0, 2], name="to_seq"))
    nodes.append(helper.make_node(op, ins, ["y"], name="rnn", hidden_size=hidden, direction=direction, **attrs))
    # Y: (seq, dirs, batch, hidden) -> (batch, seq, dirs x hidden)
    nodes.append(helper.make_node("Transpose", ["y"], ["yt"], perm=[2, 0, 1, 3], name="to_batch"))
    inits["merged"] = np.array([2, 5, dirs * hidden], np.int64)
    nodes += [helper.make_node("Reshape", ["yt", "merged"], ["ym"], name="merge"),
              helper.make_node("MatMul", ["ym", "w1"], ["out"], name="fc1")]
    inits["w1"] = W(dirs * hidden, 3)
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, 3])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


RECURRENT = {
    "lstm": dict(op="LSTM"),
    "lstm_bidirectional_peepholes": dict(op="LSTM", direction="bidirectional", peepholes=True),
    "lstm_no_bias_no_states": dict(op="LSTM", bias=False, states=False),
    "gru_linear_before_reset": dict(op="GRU", linear_before_reset=1),
    "gru_bidirectional": dict(op="GRU", direction="bidirectional"),
    "rnn_reverse": dict(op="RNN", direction="reverse"),
}


@pytest.mark.parametrize("case", sorted(RECURRENT))
def test_recurrent_layers_prune_hidden_units(case):
    """A hidden unit goes from every gate of W, R and B, from R's columns, the initial states and
    the peepholes, in both directions alike; the input MatMul's channels prune too. Equivalence
    is checked by ONNX Runtime against the masked reference (R's removed columns zeroed there)."""
    import onnx

    m = recurrent(**RECURRENT[case])
    analysis = _prune_and_verify(m, seeds=4)
    assert sorted(g.size for g in analysis.groups) == [6, 8]  # hidden units; fc0's output
    canon = canonicalize(m)
    plan = random_plan(analysis, np.random.default_rng(0), "keep1")
    pruned = apply_plan(canon.model, analysis, plan)
    layer = next(n for n in pruned.graph.node if n.op_type == RECURRENT[case]["op"])
    assert [onnx.helper.get_attribute_value(a) for a in layer.attribute if a.name == "hidden_size"] == [1]


@pytest.mark.parametrize("case", sorted(FROZEN))
def test_rule_freezes_with_reason(case):
    build, reason = FROZEN[case]
    analysis = _prune_and_verify(build())  # partial freezing must not break what stays prunable
    assert any(reason in f.reason for f in analysis.frozen), [f.reason for f in analysis.frozen]


def test_unknown_op_freezes_what_it_touches_without_crashing():
    m = body([conv("c1", "x", "w1", "a"),
              helper.make_node("Relu", ["a"], ["r"], name="relu"),
              helper.make_node("MyOp", ["r"], ["q"], domain="my.domain", name="mine"),
              helper.make_node("Add", ["r", "q"], ["s"], name="add"),
              conv("c2", "s", "w2", "o")],
             {"w1": W(8, 3, 1, 1), "w2": W(4, 8, 1, 1)}, 4, domains=("my.domain",))
    analysis = analyze_canonical(canonicalize(m))
    reasons = {f.name: f.reason for f in analysis.frozen}
    assert "unsupported op (MyOp 'mine')" in reasons["c1"]
    assert analysis.ctx.unruled == {"my.domain::MyOp": "unsupported op"}  # analyze lists it


def test_subgraph_captures_are_frozen():
    then_g = helper.make_graph([helper.make_node("Relu", ["a"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    m = body([conv("c1", "x", "w1", "a"),
              helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0, name="sum"),
              helper.make_node("Greater", ["sum", "zero"], ["cond"], name="gt"),
              helper.make_node("If", ["cond"], ["i"], then_branch=then_g, else_branch=else_g, name="if"),
              conv("c2", "i", "w2", "o")],
             {"w1": W(8, 3, 1, 1), "zero": np.float32(0), "w2": W(4, 8, 1, 1)}, 4)
    analysis = analyze_canonical(canonicalize(m))
    frozen_names = {f.name for f in analysis.frozen}
    assert "c1" in frozen_names


def test_rule_table_covers_the_issue_ops():
    ops = set(supported_ops())
    for op in ["Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
               "LayerNormalization", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Tanh",
               "LeakyRelu", "PRelu", "Add", "Sub", "Mul", "Div", "MaxPool", "AveragePool", "GlobalAveragePool",
               "Resize", "Upsample", "Pad", "Concat", "Split", "Slice", "Reshape", "Flatten", "Transpose",
               "Squeeze", "Unsqueeze", "Cast", "ReduceMean", "Softmax", "Gather", "Shape"]:
        assert op in ops, op


def _shared_shape_model():
    """Two branches reshape their channels into 4 heads x 4 with one computed [batch, 8, 4, 4]
    (and one [batch, 8, 16] back), as torch's dynamo exporter shares them."""
    nodes = [helper.make_node("Shape", ["x"], ["s0"], start=0, end=1, name="batch"),
             helper.make_node("Concat", ["s0", "c8", "c4", "c4b"], ["heads"], axis=0, name="heads_shape"),
             helper.make_node("Concat", ["s0", "c8b", "c16"], ["flat"], axis=0, name="flat_shape")]
    inits = {"c8": np.array([8], np.int64), "c4": np.array([4], np.int64), "c4b": np.array([4], np.int64),
             "c8b": np.array([8], np.int64), "c16": np.array([16], np.int64)}
    for b in "pq":
        nodes += [helper.make_node("MatMul", ["x", f"w{b}1"], [f"{b}a"], name=f"{b}_in"),
                  helper.make_node("Reshape", [f"{b}a", "heads"], [f"{b}r"], name=f"{b}_split"),
                  helper.make_node("Relu", [f"{b}r"], [f"{b}h"], name=f"{b}_act"),
                  helper.make_node("Reshape", [f"{b}h", "flat"], [f"{b}f"], name=f"{b}_merge"),
                  helper.make_node("MatMul", [f"{b}f", f"w{b}2"], [f"{b}o"], name=f"{b}_out")]
        inits.update({f"w{b}1": W(16, 16), f"w{b}2": W(16, 16)})
    nodes.append(helper.make_node("Add", ["po", "qo"], ["y"], name="sum"))
    return model(nodes, inits, ["N", 8, 16], ["N", 8, 16])


def test_shape_tensor_shared_by_branches_gets_a_copy_each():
    analysis = _prune_and_verify(_shared_shape_model(), seeds=6)
    assert len(analysis.groups) == 4, [g.name for g in analysis.groups]  # heads and dims, per branch


def test_shape_constant_that_cannot_be_copied_freezes_what_it_sizes(monkeypatch):
    """Without the copies (here: too large to copy), one shape entry would have to hold two
    branches' kept sizes: those channels are frozen, and what is pruned stays equivalent."""
    from onnx_prune.passes import canonicalize as canonical

    monkeypatch.setattr(canonical, "MAX_SHAPE_NODES", 0)
    analysis = _prune_and_verify(_shared_shape_model())
    assert any("sizes differently pruned axes" in f.reason for f in analysis.frozen), analysis.frozen


def ort_group_query_attention(n=4, nkv=2, h=16, packed=False, rotary=False, past=False, **attrs):
    """x (2, 8, 16) -> Q, K, V projections (or one packed Q | K | V projection) -> ONNX Runtime's
    GroupQueryAttention (n query heads over nkv key/value heads of size h; a prompt of 8 tokens, or
    one of them after a cache of 3) -> output projection."""
    b, s, p = (1, 8, 3) if past else (2, 8, 0)  # ORT: a prompt after a cache is one sequence
    inits = {"seqlens_k": np.full(b, p + s - 1, np.int32), "total": np.array(p + s, np.int32),
             "wo": W(n * h, 16)}
    if packed:
        nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="proj_qkv")]
        inits["wqkv"], ins = W(16, (n + 2 * nkv) * h), ["qkv", "", ""]
    else:
        nodes = [helper.make_node("MatMul", ["x", f"w{c}"], [c], name=f"proj_{c}") for c in "qkv"]
        inits.update(wq=W(16, n * h), wk=W(16, nkv * h), wv=W(16, nkv * h))
        ins = ["q", "k", "v"]
    ins += ["past_k", "past_v"] if past else ["", ""]
    ins += ["seqlens_k", "total"]
    if past:
        inits.update(past_k=W(b, nkv, p, h), past_v=W(b, nkv, p, h))
    if rotary:
        angles = np.outer(np.arange(16), 1.0 / 10000 ** (np.arange(h // 2) / (h // 2)))
        inits.update(cos=np.cos(angles).astype(np.float32), sin=np.sin(angles).astype(np.float32))
        ins += ["cos", "sin"]
    nodes += [helper.make_node("GroupQueryAttention", ins, ["att", "present_k", "present_v"], num_heads=n,
                               kv_num_heads=nkv, do_rotary=int(rotary), name="gqa", domain="com.microsoft", **attrs),
              helper.make_node("MatMul", ["att", "wo"], ["y"], name="out")]
    return model(nodes, inits, [b, s, 16], [b, s, 16], domains=("com.microsoft",))


GQA = {
    "grouped": {}, "one_kv_head": dict(nkv=1), "as_many_kv_heads": dict(nkv=4), "packed": dict(packed=True),
    "rotary": dict(rotary=True), "cache_scaled_softcap": dict(past=True, scale=0.3, softcap=5.0),
    "head_size_48": dict(h=48), "packed_head_size_32_rotary": dict(packed=True, h=32, rotary=True),
    "packed_head_size_32": dict(packed=True, h=32), "rotary_head_size_64": dict(h=64, rotary=True),
    "interleaved_rotary_head_size_48": dict(h=48, rotary=True, rotary_interleaved=1),
    "rotary_cache_head_size_32": dict(h=32, rotary=True, past=True),
}


@pytest.mark.parametrize("case", sorted(GQA))
def test_ort_group_query_attention_prunes_heads_and_head_size(case):
    """Key/value heads (with their query heads), the query heads within every group and the head
    size, in blocks of 16 (ORT's kernel takes multiples of 16 only; under a rotary embedding, in pairs),
    prune, and the pruned model stays equivalent (ONNX Runtime runs it)."""
    import onnx

    kw = GQA[case]
    m = ort_group_query_attention(**kw)
    analysis = _prune_and_verify(m, seeds=4)
    n, nkv = 4, kw.get("nkv", 2)
    heads = [h for h in (nkv, n // nkv) if h > 1]
    blocks = kw.get("h", 16) // 16
    assert sorted(g.size for g in analysis.groups) == sorted(heads + ([blocks] if blocks > 1 else []))
    assert any("multiples of 16" in f.reason or "rotates" in f.reason for f in analysis.frozen)
    canon = canonicalize(m)
    plan = random_plan(analysis, np.random.default_rng(0), "keep1")
    att = next(n for n in apply_plan(canon.model, analysis, plan).graph.node if n.op_type == "GroupQueryAttention")
    values = {a.name: onnx.helper.get_attribute_value(a) for a in att.attribute}
    assert values["num_heads"] == 1 and values["kv_num_heads"] == 1
    assert values["scale"] == pytest.approx(kw.get("scale", 1 / np.sqrt(kw.get("h", 16))))  # not 1/sqrt(16)


def rotary_model(kind, h=8):
    """x (2, 8, 16) -> a projection to 4 heads of h -> a rotary embedding (ONNX's at opset 23, or
    ORT's; 3-D, or 4-D after a reshape and transpose) -> back -> an output projection."""
    n, pairs = 4, h // 2
    ort = kind.startswith("ort")
    rot = h // 2 if kind == "onnx_partial" else h
    angles = np.outer(np.arange(16), 1.0 / 10000 ** (np.arange(rot // 2) / max(rot // 2, 1)))
    inits = {"wq": W(16, n * h), "wo": W(n * h, 16), "cos": np.cos(angles).astype(np.float32),
             "sin": np.sin(angles).astype(np.float32), "ids": np.tile(np.arange(8), (2, 1)) + np.array([[0], [3]]),
             "heads": np.array([2, 8, n, h]), "back": np.array([2, 8, n * h])}
    attrs = {"interleaved": int(kind.endswith("interleaved"))}
    four_d = "4d" in kind
    if not four_d:
        attrs["num_heads"] = n
    if kind == "onnx_partial":
        attrs["rotary_embedding_dim"] = rot
    if kind == "onnx_4d_interleaved":  # per-token caches, no position ids
        inits["cos"], inits["sin"] = (f(np.outer(np.arange(8), np.ones(pairs)))[None].repeat(2, 0).astype(np.float32)
                                      for f in (np.cos, np.sin))
    ins = ["q", "ids", "cos", "sin"] if ort else ["q", "cos", "sin"] + ([] if kind == "onnx_4d_interleaved" else ["ids"])
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="proj_q")]
    if four_d:
        nodes += [helper.make_node("Reshape", ["q", "heads"], ["q4"], name="split_heads"),
                  helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3], name="heads_first")]
        ins[0] = "qt"
    nodes.append(helper.make_node("RotaryEmbedding", ins, ["r"], name="rope", domain="com.microsoft" if ort else "",
                                  **attrs))
    if four_d:
        nodes += [helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 1, 3], name="seq_first"),
                  helper.make_node("Reshape", ["rt", "back"], ["r3"], name="merge_heads")]
    nodes.append(helper.make_node("MatMul", ["r3" if four_d else "r", "wo"], ["y"], name="out"))
    return model(nodes, inits, [2, 8, 16], [2, 8, 16], opset=23, domains=("com.microsoft",) if ort else ())


@pytest.mark.parametrize("kind", ["onnx_3d", "onnx_4d_interleaved", "onnx_partial", "ort_3d", "ort_4d_interleaved"])
def test_a_rotary_embedding_prunes_heads_and_whole_pairs_of_dimensions(kind):
    m = rotary_model(kind)
    analysis = _prune_and_verify(m, seeds=4)
    sizes = sorted(g.size for g in analysis.groups)
    assert sizes == ([4] if kind == "onnx_partial" else [4, 4])  # 4 heads; 4 pairs of each head's 8 dims
    assert any("rotates" in f.reason for f in analysis.frozen)


@pytest.mark.parametrize("op", ["ConvTranspose", "Conv", "MaxPool", "GlobalAveragePool"])
def test_positions_a_linear_layer_reshapes_into_a_map_stay(op):
    """A generator's Linear reshaped to (B, 8, 4, 4), then a window over the 4 x 4 positions: the
    positions are not channels (pruning them shrank the map, and a 32 x 32 image came out 16 x 16)."""
    layer = {"ConvTranspose": dict(kernel_shape=[4, 4], pads=[1, 1, 1, 1], strides=[2, 2]),
             "Conv": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), "MaxPool": dict(kernel_shape=[2, 2], strides=[2, 2]),
             "GlobalAveragePool": {}}[op]
    weights = {"ConvTranspose": [W(8, 6, 4, 4)], "Conv": [W(6, 8, 3, 3)]}.get(op, [])
    inits = {"w1": W(16, 128), "shape": np.array([-1, 8, 4, 4]), "flat": np.array([2, -1])}
    inits.update({"wl": w for w in weights})
    out = {"ConvTranspose": [2, 6, 8, 8], "Conv": [2, 6, 4, 4], "MaxPool": [2, 8, 2, 2], "GlobalAveragePool": [2, 8, 1, 1]}[op]
    inits["w2"] = W(int(np.prod(out[1:])), 5)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Reshape", ["h", "shape"], ["m"], name="to_map"),
             helper.make_node(op, ["m"] + (["wl"] if weights else []), ["s"], name="window", **layer),
             helper.make_node("Reshape", ["s", "flat"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w2"], ["y"], name="fc2")]
    analysis = _prune_and_verify(model(nodes, inits, [2, 16], [2, 5]))
    assert 8 in [g.size for g in analysis.groups] and 4 not in [g.size for g in analysis.groups]
    assert any("slides over these positions" in f.reason for f in analysis.frozen)


@pytest.mark.parametrize("op,mode", [("DepthToSpace", "CRD"), ("DepthToSpace", "DCR"), ("SpaceToDepth", None)])
def test_pixel_shuffles_prune_whole_blocks_of_channels(op, mode):
    """A super-resolution net's pixel shuffle: an output channel of DepthToSpace comes from r x r
    input channels (interleaved per the mode), which prune together; SpaceToDepth's inputs prune
    with their r x r outputs."""
    c1_out, c2_in = (16, 4) if op == "DepthToSpace" else (8, 32)
    shuffle = helper.make_node(op, ["a"], ["s"], blocksize=2, name="shuffle", **({"mode": mode} if mode else {}))
    m = body([conv("c1", "x", "w1", "a", pads=[1] * 4), shuffle, conv("c2", "s", "w2", "o")],
             {"w1": W(c1_out, 3, 3, 3), "w2": W(6, c2_in, 1, 1)}, 6)
    analysis = _prune_and_verify(m, seeds=4)
    assert sorted(g.size for g in analysis.groups) == ([4, 6] if op == "DepthToSpace" else [6, 8])


@pytest.mark.parametrize("axis", [0, 1])
def test_gather_elements_prunes_the_axes_it_pairs_and_pins_the_one_it_picks(axis):
    """x (2, 16) -> fc1 (24 channels) -> GatherElements with constant indices -> fc2. Along axis 0
    each channel reads its own column of the indices: the channels prune with them (the indices
    are sliced); along axis 1 the indices pick channels, which stay."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 2, (2, 24)) if axis == 0 else rng.integers(0, 24, (2, 24))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
             helper.make_node("GatherElements", ["a", "idx"], ["g"], axis=axis, name="pick"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")]
    m = model(nodes, {"w1": W(16, 24), "idx": idx.astype(np.int64), "w2": W(24, 5)}, [2, 16], [2, 5])
    if axis == 0:
        analysis = _prune_and_verify(m)
        assert [g.size for g in analysis.groups] == [24]
    else:
        analysis = analyze_canonical(canonicalize(m))
        assert not analysis.groups
        assert any("picks channels by index" in f.reason for f in analysis.frozen)


def test_an_empty_key_value_cache_given_as_input_prunes_and_verifies():
    """An LLM's prefill (ORT's generative-AI builder): the cache inputs at past length 0, as
    `--input-shape past_k=2x2x0x16` gives them."""
    from onnx_prune.compiler.cli import parse_input_shapes

    m = ort_group_query_attention()
    att = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    att.input[3], att.input[4] = "past_k", "past_v"
    m.graph.input.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 2, "past", 16])
                         for name in ("past_k", "past_v"))
    shapes = parse_input_shapes(["past_k=2x2x0x16,past_v=2x2x0x16"])
    canon = canonicalize(m, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    assert sorted(g.size for g in analysis.groups) == [2]  # query heads per group; the cache's kv heads stay
    assert any("graph input 'past_k'" in f.reason for f in analysis.frozen)  # the reason names the cache
    feeds = random_feeds(canon.model, canon.input_shapes)
    assert feeds["past_k"].shape == (2, 2, 0, 16)
    plan = random_plan(analysis, np.random.default_rng(0), "keep1")
    verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, feeds)


def picked_channels(indices):
    """x (2, 16) -> fc1 (24 channels) -> Gather of constant channel `indices`, and ReLU -> fc2;
    both concatenated into the output: the picked channels stay, the others prune."""
    idx = np.array(indices, np.int64)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
             helper.make_node("Gather", ["a", "idx"], ["g"], axis=1, name="pick"),
             helper.make_node("Relu", ["a"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["f"], name="fc2"),
             helper.make_node("Concat", ["g" if idx.ndim else "g1", "f"], ["y"], axis=1, name="cat")]
    inits = {"w1": W(16, 24), "idx": idx, "w2": W(24, 8)}
    if not idx.ndim:  # a scalar index drops the axis
        nodes.insert(2, helper.make_node("Unsqueeze", ["g", "one"], ["g1"], name="unsq"))
        inits["one"] = np.array([1], np.int64)
    return model(nodes, inits, [2, 16], [2, idx.size + 8])


@pytest.mark.parametrize("indices", [[3, 10], [20], [-3], 7])
def test_constant_gather_pins_only_the_channels_it_picks(indices):
    """Pruning channels before a picked one moves its index (surgery rewrites it); a negative
    index counts from the end, so the channels from it on stay too. Equivalent on random plans."""
    analysis = _prune_and_verify(picked_channels(indices), seeds=4)
    picked = np.ravel(indices)
    pinned = len(picked) if all(picked >= 0) else -int(picked.min())
    assert sum(g.size for g in analysis.groups) == 24 - pinned  # before: 0, the whole axis pinned


def fused_multi_query():
    """Falcon's attention as torch's dynamo exporter writes it: one projection packs 4 query heads,
    then the one key and the one value head (6 slots of 4); the query heads are sliced, key and
    value picked by GatherND; q * k + v stands in for the attention; an output projection."""
    nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="proj"),
             helper.make_node("Reshape", ["qkv", "slots"], ["r"], name="split_slots"),
             helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 1, 3], name="slots_first"),
             helper.make_node("Slice", ["t", "zero", "four", "zero"], ["q"], name="queries"),
             helper.make_node("GatherND", ["t", "key_at"], ["k"], name="key"),
             helper.make_node("GatherND", ["t", "value_at"], ["v"], name="value"),
             helper.make_node("Mul", ["q", "k"], ["qk"], name="mix"),
             helper.make_node("Add", ["qk", "v"], ["o"], name="attend"),
             helper.make_node("Transpose", ["o"], ["o2"], perm=[1, 2, 0, 3], name="heads_last"),
             helper.make_node("Reshape", ["o2", "merged"], ["m"], name="merge"),
             helper.make_node("MatMul", ["m", "wo"], ["y"], name="out")]
    inits = {"wqkv": W(16, 24), "slots": np.array([2, 5, 6, 4], np.int64), "zero": np.array([0], np.int64),
             "four": np.array([4], np.int64), "key_at": np.array([[4]], np.int64),
             "value_at": np.array([[-1]], np.int64), "merged": np.array([2, 5, 16], np.int64), "wo": W(16, 16)}
    return model(nodes, inits, [2, 5, 16], [2, 5, 16])


def test_gather_nd_of_fused_key_and_value_leaves_the_query_heads_prunable():
    analysis = _prune_and_verify(fused_multi_query(), seeds=4)
    assert sorted(g.size for g in analysis.groups) == [4, 4]  # query heads; head size


def slice_assignment():
    """A slice assignment, y[:3] = y[2:5] on the sequence axis, as torch's dynamo exporter writes it
    (Funnel's relative attention): that axis moved first, ScatterND on it, moved back; the heads
    and head size after it are written whole."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
             helper.make_node("Reshape", ["h", "split"], ["r"], name="split_heads"),
             helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0, 2, 3], name="sequence_first"),
             helper.make_node("Slice", ["t", "two", "five"], ["rows"], name="rows"),
             helper.make_node("ScatterND", ["t", "first_three", "rows"], ["s"], name="assign"),
             helper.make_node("Transpose", ["s"], ["b"], perm=[1, 0, 2, 3], name="batch_first"),
             helper.make_node("Reshape", ["b", "merge"], ["m"], name="merge_heads"),
             helper.make_node("MatMul", ["m", "w2"], ["y"], name="out")]
    inits = {"w1": W(16, 32), "split": np.array([2, 6, 4, 8], np.int64), "two": np.array([2], np.int64),
             "five": np.array([5], np.int64), "first_three": np.array([[0], [1], [2]], np.int64),
             "merge": np.array([2, 6, 32], np.int64), "w2": W(32, 16)}
    return model(nodes, inits, [2, 6, 16], [2, 6, 16])


def select_scatter():
    """h[:, 0] = 0 on the sequence axis, as torch's dynamo exporter writes it: ScatterElements along
    that axis with constant indices and updates shaped like one position of h."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("ScatterElements", ["r", "first", "zeros"], ["s"], name="assign", axis=1),
             helper.make_node("MatMul", ["s", "w2"], ["y"], name="out")]
    inits = {"w1": W(16, 32), "first": np.zeros((2, 1, 32), np.int64), "zeros": np.zeros((2, 1, 32), np.float32),
             "w2": W(32, 16)}
    return model(nodes, inits, [2, 6, 16], [2, 6, 16])


def test_a_position_assigned_along_the_sequence_leaves_the_features_prunable():
    analysis = _prune_and_verify(select_scatter(), seeds=4)
    assert sorted(g.size for g in analysis.groups) == [32]


def test_a_slice_assignment_leaves_the_axes_it_writes_whole_prunable():
    analysis = _prune_and_verify(slice_assignment(), seeds=4)
    assert sorted(g.size for g in analysis.groups) == [4, 8]  # heads; head size



def test_a_float16_model_verifies_within_its_own_roundoff():
    """The zoo's BERT converted to float16 by ONNX Runtime's converter (float32 inputs and outputs,
    as users ship it for GPUs): pruned, its sums run in another order and differ by about 5e-4 of
    the output scale (on this machine's kernels), beyond float32's tolerance and within float16's."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from onnx_prune.models import registry
    from onnx_prune.passes.verify import TOLERANCE, tolerance

    zoo = registry.load("hf_bert")
    m = convert_float_to_float16(zoo.model, keep_io_types=True)
    assert tolerance(m) == 16 * 2.0 ** -10 and tolerance(zoo.model) == TOLERANCE
    canon = canonicalize(m, input_shapes=zoo.input_shapes)
    analysis = analyze_canonical(canon)
    plan = {g.name: np.arange(g.size // 2) for g in analysis.groups}
    result = verify(canon.model, apply_plan(canon.model, analysis, plan), analysis, plan, zoo.make_feeds())
    assert result.max_abs_error / result.output_scale < tolerance(m)  # 4.9e-4 here: float32's 1e-4 failed it
