"""Models over protobuf's 2 GiB: protobuf can neither serialize them nor say their size (ByteSize
fails), so sessions, checks and sizes go around it. The limit is lowered here so that a small
model takes those paths; a real 2.2 GB model went through `compile` for the README's figures."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_prune.passes.graph as graph
from onnx_prune.backends.ort import make_session, random_feeds
from onnx_prune.models.registry import load


@pytest.fixture(scope="module")
def model():
    entry = load("resnet_bottleneck")
    return entry.model, dict(entry.input_shapes)


@pytest.fixture
def over_the_limit(monkeypatch, model):
    # between the model's size and that of its copy without large weights (what ORT gets)
    light, _ = graph.external_placeholders(model[0])
    monkeypatch.setattr(graph, "PROTOBUF_LIMIT", (light.ByteSize() + model[0].ByteSize()) // 2)
    assert graph.too_large_to_serialize(model[0])


def test_serialized_size_adds_up_to_protobufs_own(model):
    m = model[0]
    inits = len(m.graph.initializer)
    # each initializer's field tag and length prefix are the only bytes not counted
    assert m.ByteSize() - 8 * inits <= graph.serialized_size(m) <= m.ByteSize()


def test_sessions_take_the_weights_from_memory(model, over_the_limit):
    m, shapes = model
    light, large = graph.external_placeholders(m)
    assert large and light.ByteSize() < graph.PROTOBUF_LIMIT  # what ORT gets serialized
    feeds = random_feeds(m, shapes)
    direct = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(make_session(m).run(None, feeds), direct):
        np.testing.assert_array_equal(a, b)
    graph.check_model(m)  # the checker sees the weights as typed inputs


def test_compile_with_calibration_past_the_limit(model, over_the_limit, tmp_path, monkeypatch):
    from onnx_prune.compiler.compile import compile_model

    from test_compile import AnalyticDB, LyingTimer

    monkeypatch.setattr("onnx_prune.backends.predict.TimingDB", lambda *a, **k: AnalyticDB())
    m, shapes = model
    p = tmp_path / "c.npz"
    np.savez(p, input=np.random.default_rng(0).standard_normal((10,) + shapes["input"][1:]).astype(np.float32))
    placed = []
    real = graph.external_placeholders
    monkeypatch.setattr("onnx_prune.backends.ort.external_placeholders", lambda m: placed.append(1) or real(m))
    result = compile_model(m, "1.3x", input_shapes=shapes, calib=str(p), timer=LyingTimer(1.35), batch_size=4)
    assert placed  # the sessions took the weights from memory
    r = result.report
    assert r["verification"][0] == "onnx.checker (full)"
    assert r["measured_speedup"] >= 1.3 and r["output_fidelity"]["samples"] > 0
    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 1000)  # written as a large model is
    out = tmp_path / "out.onnx"
    graph.save_model(result.model, str(out))
    assert (tmp_path / "out.onnx.data").exists()
    back = onnx.load(str(out))
    feeds = random_feeds(back, shapes)
    ref = make_session(result.model).run(None, feeds)
    for a, b in zip(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds), ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_old_opset_past_the_limit_is_upgraded_with_its_weights(monkeypatch):
    from onnx import numpy_helper

    from onnx_prune.passes.canonicalize import UPGRADE_TO, canonicalize
    from onnx_prune.passes.graph import opset_of

    from test_errordb import _mlp

    m = _mlp(hidden=512)  # w1: 5,120 elements, a large weight; w2: 3,072
    m.opset_import[0].version, m.ir_version = 11, 6
    w1, w2 = (numpy_helper.to_array(t) for t in m.graph.initializer)
    monkeypatch.setattr(graph, "PROTOBUF_LIMIT", m.ByteSize() // 2)  # w1 alone is 20 KB of 33
    canon = canonicalize(m, {"x": (4, 10)})
    assert opset_of(canon.model) == UPGRADE_TO
    assert [i.name for i in canon.model.graph.input] == ["x"]
    x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    np.testing.assert_allclose(make_session(canon.model).run(None, {"x": x})[0], np.maximum(x @ w1, 0) @ w2,
                               rtol=1e-5, atol=1e-4)
