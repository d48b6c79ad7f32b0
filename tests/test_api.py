"""The Python API's contract beyond the command line's: what it accepts, what it refuses (a
UserError naming the argument), and the drop-in interface of what it writes."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_prune
from onnx_prune.errors import UserError
from onnx_prune.passes.verify import compare_outputs


def mlp(out_dims=("N", "classes")):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)
    out.doc_string = "class scores"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])], [out],
                          [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("out_dims", [("N", "classes"), None, ("N", None)], ids=["symbolic", "no shape", "unnamed"])
def test_outputs_keep_their_declared_shape_doc_and_metadata(out_dims):
    """Shape inference knows the output is (N, 4); the model declares it otherwise, and a drop-in
    replacement must too (an application may bind to the symbol)."""
    m = mlp(out_dims)
    m.graph.metadata_props.add(key="graph-key", value="kept")
    m.graph.node[0].metadata_props.add(key="node-key", value="kept too")
    pruned = onnx_prune.prune(m, 0.5).model
    assert pruned.graph.output[0].type == m.graph.output[0].type
    assert pruned.graph.output[0].doc_string == "class scores"
    assert [(p.key, p.value) for p in pruned.graph.metadata_props] == [("graph-key", "kept")]
    fc1 = next(n for n in pruned.graph.node if n.name == "fc1")
    assert [(p.key, p.value) for p in fc1.metadata_props] == [("node-key", "kept too")]


def test_a_model_whose_external_data_was_not_loaded_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    unloaded = onnx.load(str(path), load_external_data=False)
    with pytest.raises(UserError, match="external data files that were not loaded: pass the model's path"):
        onnx_prune.prune(unloaded, 0.5)
    assert onnx_prune.prune(path, 0.5).model.graph.node  # by its path, the data is found beside it


def test_serialized_bytes_are_a_model_and_garbage_is_named_by_its_length():
    assert onnx_prune.prune(mlp().SerializeToString(), 0.5).report["groups"][0]["kept"] == 16
    with pytest.raises(UserError, match=r"^the model is 5000 bytes that are neither") as err:
        onnx_prune.prune(b"\x00" * 5000, 0.5)
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("kwargs, words", [
    ({"ratio": "0.5"}, "got '0.5'"),
    ({"ratio": True}, "got True"),
    ({"importance": "l3"}, "unknown importance 'l3'"),
    ({"input_shapes": {"x": (-1, 8)}}, "input shape for 'x' must be integers"),
    ({"input_shapes": {"x": (0, 8)}}, "positive batch"),
    ({"input_shapes": {"x": (2.0, 8)}}, "must be integers"),
])
def test_prune_refuses_bad_arguments_by_name(kwargs, words):
    args = {"ratio": 0.5, **kwargs}
    with pytest.raises(UserError, match=words):
        onnx_prune.prune(mlp(), **args)


def test_prune_takes_numpy_numbers():
    assert onnx_prune.prune(mlp(), np.float32(0.25), input_shapes={"x": (np.int64(2), 8)}).report["groups"][0]["kept"] == 24


def test_outputs_that_differ_are_found_different_through_a_nan():
    """np.max over a NaN is NaN, and max(0.0, nan) is 0.0: any two models whose outputs held a NaN
    compared equal, and the masked-reference check passed whatever the pruned model computed."""
    m = mlp()
    m.graph.node.append(helper.make_node("Sqrt", ["y"], ["z"], name="sqrt"))  # NaN where y < 0
    m.graph.output[0].name = "z"
    other = onnx.ModelProto()
    other.CopyFrom(m)
    other.graph.initializer[1].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(m.graph.initializer[1]) * 3, "w2"))
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)}
    err, scale = compare_outputs(m, other, feeds)
    assert err > 0.1 and np.isfinite(scale)
    assert compare_outputs(m, m, feeds)[0] == 0.0  # NaN where both have NaN: the same
    flipped = onnx.ModelProto()
    flipped.CopyFrom(m)
    flipped.graph.initializer[1].CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(m.graph.initializer[1]), "w2"))
    assert compare_outputs(m, flipped, feeds)[0] == float("inf")  # NaN against a number
