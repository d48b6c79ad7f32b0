"""Layer-wise reconstruction: refitting the layer after a pruned group (the error database's
stitching, compile's recovery) recovers the outputs on data it did not see."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.compiler.plans import uniform_plan
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.errordb import build_error_db
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.backends.ort import make_session


def redundant_mlp():
    """x -> MatMul(16->32) -> Relu -> MatMul(32->8): hidden units come in near-duplicate pairs,
    so half of them can go if the second layer is refitted to carry their twins' weight."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 16))
    w1 = np.concatenate([w1, w1 + 0.01 * rng.standard_normal((16, 16))], axis=1).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_stitched_refit_recovers_held_out_outputs():
    canon = canonicalize(redundant_mlp(), input_shapes={"x": (16, 16)})
    analysis = analyze_canonical(canon)
    plan = uniform_plan(analysis, 0.5)
    pruned = apply_plan(canon.model, analysis, plan)
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((256, 16)).astype(np.float32)}
    held = {"x": rng.standard_normal((64, 16)).astype(np.float32)}
    refitted = build_error_db(canon.model, analysis, calib).stitch(pruned, analysis, plan)
    weights = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    before, after = weights(pruned), weights(refitted)
    assert [n for n in before if not np.array_equal(before[n], after[n])] == ["w2"]  # fc2 only

    def err(m):
        y = make_session(canon.model).run(None, held)[0]
        return np.linalg.norm(make_session(m).run(None, held)[0] - y) / np.linalg.norm(y)

    assert err(refitted) < 0.75 * err(pruned)
    # shapes are unchanged: only weights moved
    assert [t.dims for t in refitted.graph.initializer] == [t.dims for t in pruned.graph.initializer]
