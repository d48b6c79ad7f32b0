"""The command line: real runs in a subprocess; bad input gives exit 2, one line, nothing written."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.passes.graph import load_model, save_model


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnx_prune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def small_cnn(dynamic_batch=True, opset=17, hw=8):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 16, 1, 1)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2"),
    ]
    batch = "N" if dynamic_batch else 1
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, hw, hw])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m.metadata_props.add(key="labels", value="a,b,c")
    return m


@pytest.fixture()
def model_path(tmp_path):
    p = tmp_path / "model.onnx"
    save_model(small_cnn(), str(p))
    return p


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_clean_failure(result, out_path, *, code=2, words=()):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not os.path.exists(out_path)
    leftovers = [f for f in os.listdir(os.path.dirname(out_path)) if f.endswith(".tmp")]
    assert not leftovers


def test_prune_writes_verified_model_and_report(model_path, tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    before = digest(model_path)
    r = run_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--report", report)
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout
    assert digest(model_path) == before, "input modified"
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "w1")).shape[0] == 8
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert [(p.key, p.value) for p in pruned.metadata_props] == [("labels", "a,b,c")]
    data = json.loads(report.read_text())
    assert data["groups"][0]["channels"] == 16 and data["groups"][0]["kept"] == 8
    assert data["max_abs_error_vs_masked_reference"] < 1e-4


def test_outputs_get_a_new_files_mode(model_path, tmp_path):
    """Written through a private temporary file, the outputs still get the mode of any new file."""
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        r = run_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--report", report)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert [oct(os.stat(p).st_mode & 0o777) for p in (out, report)] == [oct(0o644)] * 2


def test_large_model_is_saved_with_fresh_external_data(tmp_path, monkeypatch):
    """Over protobuf's limit the weights go to PATH.data; saving again replaces that file (onnx
    alone would append to it) and leaves no staging folder behind."""
    import onnx_prune.passes.graph as graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 100)
    model, path = small_cnn(), tmp_path / "big.onnx"
    for _ in range(2):
        save_model(model, str(path))
    data = tmp_path / "big.onnx.data"
    weights = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert data.exists() and data.stat().st_size < 2 * weights
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    back = onnx.load(str(path))
    assert [numpy_helper.to_array(t).tolist() for t in back.graph.initializer] == \
        [numpy_helper.to_array(t).tolist() for t in model.graph.initializer]


def test_model_over_protobufs_limit_loads(model_path, monkeypatch):
    # over 2 GiB protobuf's ByteSize fails ("internal error" here before); such models now load
    import onnx_prune.passes.graph as graph

    monkeypatch.setattr(graph, "PROTOBUF_LIMIT", 100)
    weights = lambda m: [numpy_helper.to_array(t).tolist() for t in m.graph.initializer]  # noqa: E731
    for source in (str(model_path), small_cnn()):
        model = load_model(source)
        assert graph.too_large_to_serialize(model)
        assert weights(model) == weights(onnx.load(str(model_path)) if isinstance(source, str) else source)


def test_input_shapes_repeated_or_comma_separated():
    from onnx_prune.compiler.cli import parse_input_shapes
    from onnx_prune.errors import UserError

    both = {"ids": (1, 128), "mask": (1, 128)}
    assert parse_input_shapes(["ids=1x128", "mask=1x128"]) == both
    assert parse_input_shapes(["ids=1x128,mask=1x128"]) == both
    with pytest.raises(UserError, match="'mask' is not NAME"):
        parse_input_shapes(["ids=1x128,mask"])
    assert parse_input_shapes(["past=1x4x0x32"]) == {"past": (1, 4, 0, 32)}  # an empty cache
    with pytest.raises(UserError, match="positive batch"):
        parse_input_shapes(["ids=0x128"])


def classifier_with_zipmap():
    """A scikit-learn MLP classifier as skl2onnx writes it: a label, and the class probabilities as
    a sequence of maps (ZipMap, in the ai.onnx.ml domain)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (12, 32)), ("b1", (32,)), ("w2", (32, 3)))]
    nodes = [helper.make_node("MatMul", ["X", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
             helper.make_node("Softmax", ["logits"], ["p"], axis=1, name="softmax"),
             helper.make_node("ArgMax", ["p"], ["label"], axis=1, keepdims=0, name="argmax"),
             helper.make_node("ZipMap", ["p"], ["probabilities"], classlabels_int64s=[0, 1, 2], name="zipmap",
                              domain="ai.onnx.ml")]
    per_class = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, None))
    probabilities = helper.make_value_info("probabilities", helper.make_sequence_type_proto(per_class))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 12])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]), probabilities], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    return m


def test_a_sequence_of_maps_output_keeps_its_type_and_the_rest_prunes(tmp_path):
    src, out = tmp_path / "clf.onnx", tmp_path / "clf.pruned.onnx"
    onnx.save(classifier_with_zipmap(), src)
    r = run_cli("prune", src, "-o", out, "--ratio", "0.5", "--input-shape", "X=8x12")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "[W]" not in r.stdout + r.stderr  # no graphsurgeon chatter
    pruned = onnx.load(out)
    assert pruned.graph.output[1].type == onnx.load(src).graph.output[1].type  # a sequence of maps still
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "w1")).shape == (12, 16)
    import onnxruntime as ort

    probabilities = ort.InferenceSession(str(out)).run(None, {"X": np.ones((2, 12), np.float32)})[1]
    assert len(probabilities) == 2 and sorted(probabilities[0]) == [0, 1, 2]
    from onnx_prune.passes.verify import numeric  # how verification and fidelity read it

    np.testing.assert_allclose(numeric(probabilities).sum(1), 1.0, rtol=1e-5)


def test_analyze_text_and_json(model_path):
    r = run_cli("analyze", model_path)
    assert r.returncode == 0, r.stderr
    assert "1 prunable groups" in r.stdout and "reaches graph output 'y'" in r.stdout
    r = run_cli("analyze", model_path, "--json")
    data = json.loads(r.stdout)
    assert data["groups"][0]["producers"] == ["conv1"] and data["groups"][0]["consumers"] == ["conv2"]


def test_analyze_names_weight_layers_past_an_unknown_op(tmp_path):
    """An op without a rule (and without shape inference) hides the shapes after it: the layers
    there are counted and named as not analysed, not left out of the coverage."""
    m = small_cnn()
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "Foo", "custom.x"
    m.opset_import.append(helper.make_opsetid("custom.x", 1))
    p = tmp_path / "custom.onnx"
    onnx.save_model(m, str(p))
    data = json.loads(run_cli("analyze", p, "--json").stdout)
    assert data["coverage"]["layers"] == 2 and data["coverage"]["unread_layers"] == ["conv2"]
    r = run_cli("analyze", p)
    assert r.returncode == 0 and "weight layers not analysed" in r.stdout and "  conv2" in r.stdout


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", bad, "-o", out, "--ratio", "0.5"), out, words=("not",))


def test_truncated_file(model_path, tmp_path):
    data = open(model_path, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", cut, "-o", out, "--ratio", "0.5"), out)


def test_missing_file(tmp_path):
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", tmp_path / "nope.onnx", "-o", out, "--ratio", "0.5"), out, words=("no such file",))


def test_a_folder_given_as_the_model(tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", folder, "-o", out, "--ratio", "0.5"), out, words=("a folder, not an ONNX file",))


def _external(tmp_path, location):
    m = small_cnn()
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, str(path))
    return path


def test_external_data_is_loaded(tmp_path):
    path = _external(tmp_path, "weights.bin")
    out = tmp_path / "o.onnx"
    r = run_cli("prune", path, "-o", out, "--ratio", "0.5")
    assert r.returncode == 0, r.stderr


def test_missing_external_data(tmp_path):
    path = _external(tmp_path, "weights.bin")
    os.remove(path.parent / "weights.bin")
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", path, "-o", out, "--ratio", "0.5"), out, words=("missing",))


def test_external_data_escaping_folder(tmp_path):
    path = _external(tmp_path, "weights.bin")
    os.replace(path.parent / "weights.bin", tmp_path / "weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"
    onnx.save_model(model, str(path))
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", path, "-o", out, "--ratio", "0.5"), out, words=("outside",))


def test_unsupported_opset(tmp_path):
    p = tmp_path / "future.onnx"
    m = small_cnn()
    m.opset_import[0].version = 40
    onnx.save_model(m, str(p))
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", p, "-o", out, "--ratio", "0.5"), out, words=("opset 40",))


def test_an_opset_onnxruntime_no_longer_runs_is_upgraded_first(tmp_path):
    """Opset 6 (the onnx package's oldest PyTorch exports: BatchNormalization still with is_test):
    ORT runs opset 7 and up, so onnx's version converter upgrades the model before the analysis."""
    rng = np.random.default_rng(0)
    w = {"w1": rng.standard_normal((16, 3, 3, 3)), "s": rng.random(16) + 0.5, "b": rng.standard_normal(16),
         "mean": rng.standard_normal(16) * 0.1, "var": rng.random(16) + 0.5, "w2": rng.standard_normal((8, 16, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["a", "s", "b", "mean", "var"], ["n"], is_test=1, name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    src, out = tmp_path / "old.onnx", tmp_path / "old.pruned.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3), src)
    r = run_cli("prune", src, "-o", out, "--ratio", "0.5")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout
    pruned = onnx.load(out)
    assert pruned.opset_import[0].version >= 7
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "w1")).shape[0] == 8


def test_ops_the_exporter_left_unconverted(tmp_path):
    """tf2onnx on a Keras version it does not know leaves TF's calls and ops it cannot map in the
    ONNX domain: analyze (which runs no session) names them instead of failing inside a parser."""
    m = small_cnn()
    m.graph.node[1].op_type = "StatefulPartitionedCall"
    m.graph.node[1].attribute.append(helper.make_attribute("config_proto", b"\n\x07\x82\x01"))
    p = tmp_path / "tf.onnx"
    onnx.save_model(m, str(p))
    r = run_cli("analyze", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "StatefulPartitionedCall (1 node) not in ONNX opset 17" in r.stderr


def test_ops_onnxruntime_registers_in_the_onnx_domain_load():
    """ORT runs a few ops of its own under the ONNX domain (SimplifiedLayerNormalization, RMSNorm
    as its optimizer writes it): not an unconverted op."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=1e-5)
    g = helper.make_graph([node], "rms", [x], [y], [numpy_helper.from_array(np.ones(8, np.float32), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    assert load_model(m).graph.node[0].op_type == "SimplifiedLayerNormalization"


def test_dynamic_dims_need_input_shape(tmp_path):
    m = small_cnn()
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_param = "H"
    p = tmp_path / "dyn.onnx"
    onnx.save_model(m, str(p))
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", p, "-o", out, "--ratio", "0.5"), out, words=("--input-shape x=1x3x128x128",))
    r = run_cli("prune", p, "-o", out, "--ratio", "0.5", "--input-shape", "x=1x3x8x8")
    assert r.returncode == 0, r.stderr
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[2].dim_param == "H"


def test_calibration_tokens_beyond_the_embedding_table_are_named_as_the_datas_fault(tmp_path):
    """Token ids past the table's rows fail in ONNX Runtime at a shape the model does run at: the
    one line points at the calibration data's values too, not at the shapes alone."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in [("table", (10, 8)), ("w1", (8, 32)), ("w2", (32, 4))]]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 4])], inits)
    p, calib, out = tmp_path / "embed.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(p))
    np.savez(calib, ids=rng.integers(0, 50, (16, 6)))
    assert_clean_failure(run_cli("compile", p, "-o", out, "--target-speedup", "1.2x", "--calib", calib), out,
                         words=("calibration data's values", "out of data bounds"))


@pytest.mark.parametrize("command", [("prune", "--ratio", "0.5"), ("compile", "--target-speedup", "1.2x")])
def test_model_that_does_not_run_at_the_given_shape(tmp_path, command):
    """A shape the model cannot run at (here a Reshape that fixes H x W at 8 x 8) is the input's
    fault: exit 2 and one line naming the shapes, not an internal error."""
    m = small_cnn()
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_param = "H"
    m.graph.node[-1].output[0] = "c"
    m.graph.node.append(helper.make_node("Reshape", ["c", "hw64"], ["y"], name="flat"))
    m.graph.initializer.append(numpy_helper.from_array(np.array([0, 8, 64], np.int64), "hw64"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 64]))
    p = tmp_path / "fixed_hw.onnx"
    onnx.save_model(m, str(p))
    out = tmp_path / "o.onnx"
    verb, *args = command
    assert_clean_failure(run_cli(verb, p, "-o", out, *args, "--input-shape", "x=1x3x16x16"), out,
                         words=("does not run at input shapes x=1x3x16x16",))
    if verb == "prune":  # bench too, though it writes nothing
        assert_clean_failure(run_cli("bench", p, "--input-shape", "x=1x3x16x16"), out,
                             words=("does not run at input shapes x=1x3x16x16",))
    r = run_cli("prune", p, "-o", out, "--ratio", "0.5", "--input-shape", "x=1x3x8x8")
    assert r.returncode == 0, r.stderr


def test_nothing_prunable(tmp_path):
    """Every channel frozen (a Softmax over the only hidden layer's channels): prune, like compile,
    says so and writes nothing."""
    m = small_cnn()
    m.graph.node.insert(2, helper.make_node("Softmax", ["b"], ["s"], axis=1, name="sm"))
    m.graph.node[-1].input[0] = "s"
    p = tmp_path / "frozen.onnx"
    onnx.save_model(m, str(p))
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", p, "-o", out, "--ratio", "0.5"), out, words=("nothing in this model",))


def test_quantized_model_says_so(tmp_path):
    """Integer weights behind DequantizeLinear are not weight layers the analysis can prune: the
    line says the model is quantized and what to do instead."""
    m = small_cnn()
    w1 = next(t for t in m.graph.initializer if t.name == "w1")
    q = np.clip(np.round(numpy_helper.to_array(w1) / 0.02), -127, 127).astype(np.int8)
    w1.CopyFrom(numpy_helper.from_array(q, "w1_q"))
    m.graph.initializer.extend([numpy_helper.from_array(np.float32(0.02), "w1_scale"),
                                numpy_helper.from_array(np.int8(0), "w1_zero")])
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zero"], ["w1"], name="dq"))
    p = tmp_path / "quantized.onnx"
    onnx.save_model(m, str(p))
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", p, "-o", out, "--ratio", "0.5"), out,
                         words=("quantized (DequantizeLinear)", "prune the float model"))


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_out_of_range(model_path, tmp_path, ratio):
    out = tmp_path / "o.onnx"
    before = digest(model_path)
    assert_clean_failure(run_cli("prune", model_path, "-o", out, "--ratio", ratio), out, words=("--ratio",))
    assert digest(model_path) == before


def test_bad_input_shape_syntax(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert_clean_failure(run_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--input-shape", "x=1xAx8"), out)
    assert_clean_failure(run_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--input-shape", "nope=1x3x8x8"), out,
                         words=("nope",))


def test_output_is_input(model_path):
    before = digest(model_path)
    r = run_cli("prune", model_path, "-o", model_path, "--ratio", "0.5")
    assert r.returncode == 2 and "input" in r.stderr
    assert digest(model_path) == before


@pytest.mark.parametrize("command", [("prune", "--ratio", "0.5"), ("compile", "--target-speedup", "1.2x")])
def test_every_output_path_is_checked_before_any_work(model_path, tmp_path, command):
    """A report over the input model, over the pruned model or over its own Markdown summary, and a
    path under a file: exit 2 at once with one line, the input untouched, nothing written."""
    verb, *args = command
    before = digest(model_path)
    out = tmp_path / "o.onnx"
    cases = [(("--report", model_path), "is the input model"), (("--report", out), "are the same file"),
             (("--report", tmp_path / "model.onnx" / "r.json"), "is a file, not a folder")]
    if verb == "compile":  # the summary goes to REPORT's stem + .md
        cases.append((("--report", tmp_path / "r.md"), "Markdown summary and --report are the same file"))
    for extra, words in cases:
        assert_clean_failure(run_cli(verb, model_path, "-o", out, *args, *extra), out, words=(words,))
        assert digest(model_path) == before
        assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
    assert_clean_failure(run_cli(verb, model_path, "-o", tmp_path / "model.onnx" / "o.onnx", *args), out,
                         words=("is a file, not a folder",))


def test_old_opset_light_model_is_upgraded(tmp_path):
    out = tmp_path / "sq.onnx"
    r = run_cli("prune", "zoo:light_squeezenet", "-o", out, "--ratio", "0.5")
    assert r.returncode == 0, r.stderr
    m = load_model(str(out))
    assert m.opset_import[0].version == 17


def test_json_is_strict_numpy_values_plain_and_non_finite_numbers_null():
    """Python's json writes NaN and Infinity, which strict parsers (and other languages') refuse."""
    from onnx_prune.compiler.cli import _json_text

    text = _json_text({"a": float("nan"), "b": [np.float32(np.inf), np.float64(1.5)], "c": np.arange(2), "d": None})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [0, 1], "d": None}
