"""ONNX Runtime backends: sessions, measurement plumbing, timing database cache and the predictor's
bookkeeping. No timed assertions: timing accuracy is measured in benchmarks/predictor.py."""

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.backends.measure import measure
from onnx_prune.backends.ort import make_session, random_feeds
from onnx_prune.backends.predict import CostModel, _fused_head, _source_node
from onnx_prune.backends import profile, timing
from onnx_prune.backends.profile import Kernel, Profile
from onnx_prune.backends.timing import (LayerSig, TimingDB, activation_sig, axis_points, fast_widths, layer_sig,
                                        width_grid)
from onnx_prune.compiler.plans import full_plan, uniform_plan
from onnx_prune.errors import UserError
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.graph import save_model


def two_convs(c=32, pool=False):
    """A 3x3 conv writing c channels, its Relu, then a 1x1 conv; with `pool`, a 3x3 max pool of
    stride 2 between them (a stem, as ShuffleNetV2's)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, c, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="c1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu")]
    if pool:
        nodes.append(helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4,
                                      name="pool"))
    nodes.append(helper.make_node("Conv", [nodes[-1].output[0], "w2"], ["y"], name="c2"))
    side = 8 if pool else 16
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, side, side])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_sessions_take_the_weights_from_memory_not_serialized(monkeypatch):
    m = two_convs(c=256)  # w1 is 256 x 3 x 3 x 3: above the "large" threshold
    m.ir_version = 11  # capped for ORT on the way
    payloads = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda p, *a, **k: payloads.append(p) or real(p, *a, **k))
    sess = make_session(m)
    assert len(payloads[0]) < 256 * 27 * 4 and sess.weights_held  # w1 is not in it: ORT reads our buffer
    feeds = random_feeds(m, {"x": [1, 3, 16, 16]})
    m.ir_version = 8
    direct = real(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(sess.run(None, feeds)[0], direct[0])


def test_cuda_where_missing_is_a_clear_error():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here; the CUDA path is exercised on the device instead")
    with pytest.raises(UserError, match="not available"):
        make_session(two_convs(), provider="cuda")


def test_bench_cuda_cli_error(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    p = tmp_path / "m.onnx"
    save_model(two_convs(), str(p))
    r = subprocess.run([sys.executable, "-m", "onnx_prune", "bench", str(p), "--provider", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not available" in r.stderr and "Traceback" not in r.stderr


def test_a_cuda_session_that_fell_back_to_the_cpu_is_an_error(monkeypatch):
    # where its CUDA or cuDNN libraries fail to load, ORT creates the session on the CPU with only
    # a log line: a latency measured there must not be reported as the GPU's
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(ort, "InferenceSession", lambda p, so, providers: real(p, so, providers=["CPUExecutionProvider"]))
    with pytest.raises(UserError, match="CUDAExecutionProvider did not start"):
        make_session(two_convs(), provider="cuda")


def test_cuda_profiles_run_in_a_child_with_launches_blocking(monkeypatch):
    calls = []
    monkeypatch.setattr(profile, "_blocking_child", lambda jobs, options: calls.append(options) or ([{}], [[]]))
    monkeypatch.delenv("CUDA_LAUNCH_BLOCKING", raising=False)
    m = two_convs()
    feeds = random_feeds(m, {"x": (1, 3, 16, 16)})
    assert profile.profile_session_runs(m, feeds, "cuda", runs=3) == {} and calls[0]["runs"] == 3
    with pytest.raises(UserError, match="not available"):  # launches timed as they are: in-process
        profile.profile_session_runs(m, feeds, "cuda", runs=3, blocking=False)
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")  # in the child itself: profiled there, in-process
    with pytest.raises(UserError, match="not available"):
        profile.profile_session_runs(m, feeds, "cuda", runs=3)
    assert len(calls) == 1


def test_the_profiling_child_returns_what_profiling_in_process_does():
    m = two_convs(c=256)  # w1 large: the model goes over with its weights as external data
    feeds = random_feeds(m, {"x": (1, 3, 16, 16)})
    options = dict(provider="cpu", threads=1, runs=3, warmup=1, node_values=True, min_seconds=0.0, max_runs=None)
    (child, again), (overheads, _) = profile._blocking_child([(m, feeds), (m.SerializeToString(), feeds)], options)
    assert set(again) == set(child)
    here = profile.profile_session_runs(m, feeds, "cpu", threads=1, runs=3, warmup=1, node_values=True)
    assert set(child) == set(here) and len(overheads) == 3
    for name, k in here.items():
        c = child[name]
        assert isinstance(c, Kernel) and (c.op, c.inputs, c.outputs, c.values) == (k.op, k.inputs, k.outputs, k.values)
        assert c.time_us > 0


def test_cuda_timing_points_draw_inputs_on_the_device_and_return_one_element(monkeypatch):
    sig = LayerSig("Conv", (16, 32), (2, 8, 8), ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), ()))
    scores = activation_sig("MatMul", [[2, (4, "heads"), 6, (8, "d")], [2, (4, "heads"), (8, "d"), 6]])
    points = axis_points(sig, [[8, 16], [16, 32]]) + axis_points(scores, [[2, 4], [8]])
    model = timing._bench_model(points, on_device=True)
    assert not model.graph.input  # nothing crosses from the host on a run, and one element back
    assert all(out.size == 1 for out in make_session(model).run(None, {}))
    profiled = []

    def on_the_cpu(jobs, provider, threads, **runs):  # profile_each, without a GPU
        jobs = list(jobs)
        profiled.append((provider, len(jobs)))
        return [profile.profile_session_runs(m, f, "cpu", threads, **runs) for m, f in jobs]

    monkeypatch.setattr(timing, "profile_each", on_the_cpu)
    db = TimingDB("cuda", use_cache=False)
    db.ensure(points)
    assert profiled == [("cuda", 1)]  # one chunk, in one child process
    assert all(db.get(s, w) > 0 for s, w in points) and db.measured == len(set(points))


def test_measure_compares_side_by_side():
    m = two_convs()
    feeds = random_feeds(m, {"x": (1, 3, 16, 16)})
    result = measure([m, m], feeds, blocks=2, min_block_s=0.01)
    assert len(result.latencies) == 2 and result.ratio > 0
    assert all(lat.runs >= 6 and lat.p10_ms <= lat.median_ms <= lat.p90_ms for lat in result.latencies)


class _SleepySession:
    """Stands in for an ORT session: each run sleeps; from the `slow_after`-th run on, `slow` x longer."""

    def __init__(self, ms, slow=1.0, slow_after=None):
        self.ms, self.slow, self.slow_after, self.calls = ms, slow, slow_after, 0

    def run(self, outputs, feeds):
        self.calls += 1
        late = self.slow_after is not None and self.calls > self.slow_after
        time.sleep(self.ms * (self.slow if late else 1.0) / 1e3)


def test_measure_flags_a_change_of_speed_between_blocks():
    kw = dict(warmup=1, blocks=6, min_block_s=0.0, max_runs_per_block=3, pause_s=0.0)
    # sleeps of 10-20 ms, not 1-2: the scheduler's jitter on a busy machine is a millisecond or so
    even = measure([None, None], {}, sessions=[_SleepySession(20), _SleepySession(10)], **kw)
    assert even.steady and 1.3 < even.ratio < 3.0
    # the first model slows down 3x half way: its block medians differ by 3x
    spell = measure([None, None], {}, sessions=[_SleepySession(20, slow=3.0, slow_after=13), _SleepySession(10)], **kw)
    assert not spell.steady and spell.speed_change > 2.0


def test_bench_cli_json(tmp_path):
    p = tmp_path / "m.onnx"
    save_model(two_convs(), str(p))
    r = subprocess.run([sys.executable, "-m", "onnx_prune", "bench", str(p), str(p), "--blocks", "2", "--json",
                        "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["models"]) == 2 and data["ratio"] > 0 and data["threads"] == 1 and data["same_inputs"]
    assert isinstance(data["steady"], bool) and data["speed_change_between_blocks"] >= 1.0
    # two models that take different inputs: timed, but the ratio is said to compare different work
    other = tmp_path / "other.onnx"
    save_model(two_convs(c=16, pool=True), str(other))
    m = onnx.load(str(other))
    m.graph.input[0].name = "image"
    m.graph.node[0].input[0] = "image"
    save_model(m, str(other))
    r = subprocess.run([sys.executable, "-m", "onnx_prune", "bench", str(p), str(other), "--blocks", "2",
                        "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "different inputs" in r.stdout and "x 1x3x16x16 float32" in r.stdout and "image 1x3x16x16" in r.stdout


def test_width_grid_and_fast_widths():
    assert width_grid(6) == [1, 2, 3, 4, 5, 6]
    g = width_grid(2048)
    assert g[-1] == 2048 and len(g) <= 25 and all(w % 8 == 0 for w in g)
    # 24 is slower than 32: it is never worth choosing
    assert fast_widths([8, 16, 24, 32], [1.0, 2.0, 4.0, 3.0]) == [8, 16, 32]
    assert fast_widths([8, 16], [1.0, 0.99]) == [16]  # costs what the wider one costs: dropped
    assert fast_widths([8, 16, 24, 32], [1.0, 2.0, 3.0, 3.0]) == [8, 16, 32]  # padded plateau
    assert fast_widths([8, 16], [0.99, 1.0]) == [16]  # within noise of the wider one: not clearly faster


def test_timing_cache_is_keyed_by_environment_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_PRUNE_CACHE", str(tmp_path))
    sig = LayerSig("Conv", (16, 16), (1, 8, 8), ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), ()))
    db = TimingDB("cpu", threads=1)
    db.ensure([(sig, (8, 16)), (sig, (16, 16)), (sig, (8, 16))])
    assert db.measured == 2 and db.get(sig, (8, 16)) > 0
    again = TimingDB("cpu", threads=1)
    again.ensure([(sig, (8, 16)), (sig, (16, 16))])
    assert again.measured == 0 and again.get(sig, (16, 16)) == db.get(sig, (16, 16))
    other_threads = TimingDB("cpu", threads=2)
    assert other_threads.path != db.path and other_threads.get(sig, (16, 16)) is None


def test_grouped_and_depthwise_points_are_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_PRUNE_CACHE", str(tmp_path))
    attrs = ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), ())
    grouped = LayerSig("ConvG", (4, 8, 8), (1, 8, 8), attrs)
    depthwise = LayerSig("ConvDW", (16,), (1, 8, 8), attrs)
    db = TimingDB("cpu", threads=1)
    db.ensure(axis_points(grouped, [[2, 4], [8], [8]]) + axis_points(depthwise, [[8, 16]]))
    assert db.measured == 2 + 2  # (4, 8, 8) is shared by the three grouped axes
    assert db.estimate(grouped, (2, 8, 8), [[2, 4], [8], [8]]) == pytest.approx(db.get(grouped, (2, 8, 8)))


def test_layer_signature_ignores_widths_but_not_shapes():
    canon = canonicalize(two_convs())
    analysis = analyze_canonical(canon)
    nodes = {n.name: n for n in canon.static.graph.node}
    s1 = layer_sig(nodes["c1"], analysis.ctx.index)
    assert (s1.op, s1.full, s1.lead) == ("Conv", (3, 32), (1, 16, 16))
    assert len(analysis.ctx.layer_axes["c1"]) == 2
    assert layer_sig(nodes["relu"], analysis.ctx.index) is None


class FakeDB:
    """Times proportional to cin x cout: lets the bookkeeping be checked exactly."""

    def ensure(self, points):
        pass

    def curve(self, sig, axis, widths):
        return np.array([w * sig.full[1 - axis] for w in widths], dtype=float)

    def estimate(self, sig, widths, grids):
        return float(np.prod(widths))

    def reorder_estimate(self, sig, widths, grids, side):
        return None  # no reorders timed: they scale with the kept share of their value

    def get(self, sig, widths):
        return None  # no point measured (a conv output cut off the block adds nothing)


def multi_head_attention(t=6, heads=4, d=8):
    """Unfused self-attention: Q, K, V projections split into heads by Reshape and Transpose."""
    rng = np.random.default_rng(0)
    width = heads * d
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) / 8).astype(np.float32), f"w{c}")
             for c in "qkvo"] + [numpy_helper.from_array(np.array([1, t, heads, d], np.int64), "split_heads"),
                                 numpy_helper.from_array(np.array([1, t, width], np.int64), "merge_heads")]
    nodes = []
    for c, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", f"w{c}"], [f"{c}_flat"], name=f"{c}_proj"),
                  helper.make_node("Reshape", [f"{c}_flat", "split_heads"], [f"{c}_heads"], name=f"{c}_reshape"),
                  helper.make_node("Transpose", [f"{c}_heads"], [c], perm=perm, name=f"{c}_transpose")]
    nodes += [helper.make_node("MatMul", ["q", "k"], ["s"], name="scores"),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "v"], ["a"], name="mix"),
              helper.make_node("Transpose", ["a"], ["a_t"], perm=[0, 2, 1, 3], name="a_transpose"),
              helper.make_node("Reshape", ["a_t", "merge_heads"], ["a_flat"], name="merge"),
              helper.make_node("MatMul", ["a_flat", "wo"], ["y"], name="out")]
    g = helper.make_graph(nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


class OffsetDB(FakeDB):
    """Times of ops without weights: 16 µs plus their widths' product (not proportional to it)."""

    def estimate(self, sig, widths, grids):
        return float(np.prod(widths)) + (16.0 if sig.op in timing.ACTIVATION_OPS else 0.0)


def test_attention_matmuls_and_transposes_are_timed_not_counted():
    """An attention MatMul and a Transpose scale as the database times them at the plan's widths
    (heads and head size, one axis each, shared by Q and K'); so does a Transpose ORT inserted,
    its input's axes derived from the model value it writes and its perm."""
    canon = canonicalize(multi_head_attention())
    analysis = analyze_canonical(canon)
    assert sorted(g.size for g in analysis.groups) == [4, 8, 8]  # heads; query/key size and value size
    inserted = Kernel("Transpose_token_3", "Transpose", 20.0, [], [(1, 4, 6, 8)], ("q", "q_heads_moved"), (0, 2, 1, 3))
    kernels = {"scores": Kernel("scores", "MatMul", 100.0, [], []),
               "a_transpose": Kernel("a_transpose", "Transpose", 20.0, [], []), "Transpose_token_3": inserted}
    cm = CostModel(canon.model, analysis, None, db=OffsetDB(), profile=Profile(kernels, e2e_ms=1.0))
    scores = cm.layers["scores"]
    assert scores.sig.op == "MatMulAct" and scores.sig.full == (4, 8)
    assert scores.sig.lead == ((1, -1, 6, -2), (1, -1, -2, 6))  # Q (1, heads, 6, d) and K' (1, heads, d, 6)
    assert cm.layers["a_transpose"].sig.attrs == ((0, 2, 1, 3),)
    moved = cm.kernel_layers["Transpose_token_3"]
    assert moved.sig.lead == ((1, 6, -1, -2),) and moved.sig.attrs == ((0, 2, 1, 3),)  # it wrote q (1, 4, 6, 8)
    heads = {g.name for g in analysis.groups if g.size == 4}
    half_heads = analysis.keep_arrays({g.name: np.arange(2) for g in analysis.groups if g.name in heads})
    assert cm.node_ratio("scores", half_heads) == pytest.approx((16 + 16) / (16 + 32))
    assert cm._timed_ratio(moved, half_heads) == pytest.approx((16 + 16) / (16 + 32))
    # the others: by their kept elements, but a Reshape hands its buffer on whatever it holds
    assert cm.node_ratio("softmax", half_heads) == pytest.approx(0.5)
    assert cm.node_ratio("q_reshape", half_heads) == pytest.approx(1.0)
    assert cm.predict_ms({g: np.arange(2) for g in heads}) == pytest.approx(1.0 - (100 + 20 + 20) * (1 - 32 / 48) / 1e3)


def test_the_database_times_ops_without_weights():
    """Attention MatMuls, Transposes and ORT's BiasGelu in the bulk graph: two inputs, or a perm,
    at each width (BiasGelu is ONNX Runtime's own op: its domain is declared)."""
    scores = activation_sig("MatMul", [[2, (4, "heads"), 6, (8, "d")], [2, (4, "heads"), (8, "d"), 6]])
    moved = activation_sig("Transpose", [[2, 6, (4, "heads"), (8, "d")]], perm=[0, 2, 1, 3])
    gelu = activation_sig("BiasGelu", [[2, 6, (32, "ffn")], [(32, "ffn")]])
    tanh_gelu = activation_sig("FastGelu", [[2, 6, (32, "ffn")], [(32, "ffn")]])
    assert scores.full == (4, 8) and timing._input_shapes(scores, (2, 8)) == [(2, 2, 6, 8), (2, 2, 8, 6)]
    assert gelu.full == (32,) and timing._input_shapes(gelu, (8,)) == [(2, 6, 8), (8,)]
    assert activation_sig("Relu", [[2, (4, "heads")]]) is None and activation_sig("MatMul", [[2, 3], [3, 2]]) is None
    db = TimingDB("cpu", threads=1, use_cache=False)
    points = axis_points(scores, [[2, 4], [4, 8]]) + axis_points(moved, [[4], [4, 8]]) + \
        axis_points(gelu, [[8, 32]]) + axis_points(tanh_gelu, [[8, 32]])
    db.ensure(points)
    assert db.measured == len(set(points)) == 9 and all(db.get(s, w) > 0 for s, w in points)


def mlp_with_bias_gelu(width=16, hidden=32, form="erf"):
    """x (rows, 16) -> Gemm (fused with its Relu by ORT) -> (rows, 1, 16) -> MatMul -> + bias ->
    Gelu (ORT: one BiasGelu, or FastGelu for the tanh form, where the rows are dynamic; static, it
    folds the Add into a Gemm) -> MatMul."""
    rng = np.random.default_rng(0)
    w = lambda *shape: numpy_helper.from_array((rng.standard_normal(shape) / 4).astype(np.float32))  # noqa: E731
    inits = [w(width, width), w(width, hidden), w(hidden), w(hidden, width), numpy_helper.from_array(np.array([1]))]
    for t, name in zip(inits, ("w0", "w1", "b1", "w2", "axis1")):
        t.name = name
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5), ("three", 3.0), ("cubic", 0.044715),
               ("slope", np.sqrt(2 / np.pi)))]
    if form == "erf":  # as exporters before opset 20 write it: x * 0.5 * (1 + erf(x / sqrt 2))
        gelu = [helper.make_node("Div", ["hb", "sqrt2"], ["hs"], name="gelu_div"),
                helper.make_node("Erf", ["hs"], ["he"], name="gelu_erf"),
                helper.make_node("Add", ["he", "one"], ["h1p"], name="gelu_add"),
                helper.make_node("Mul", ["hb", "h1p"], ["hm"], name="gelu_mul"),
                helper.make_node("Mul", ["hm", "half"], ["g"], name="gelu")]
    else:  # as GPT-2's exporters write it: 0.5 x * (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        gelu = [helper.make_node("Pow", ["hb", "three"], ["h3"], name="gelu_pow"),
                helper.make_node("Mul", ["cubic", "h3"], ["hc"], name="gelu_cubic"),
                helper.make_node("Add", ["hb", "hc"], ["hi"], name="gelu_inner"),
                helper.make_node("Mul", ["slope", "hi"], ["hs"], name="gelu_slope"),
                helper.make_node("Tanh", ["hs"], ["he"], name="gelu_tanh"),
                helper.make_node("Add", ["one", "he"], ["h1p"], name="gelu_add"),
                helper.make_node("Mul", ["half", "hb"], ["hm"], name="gelu_half"),
                helper.make_node("Mul", ["hm", "h1p"], ["g"], name="gelu")]
    nodes = [helper.make_node("Gemm", ["x", "w0"], ["h0"], name="fc0"),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("Unsqueeze", ["r0", "axis1"], ["r3"], name="to3d"),
             helper.make_node("MatMul", ["r3", "w1"], ["h1"], name="fc1"),
             helper.make_node("Add", ["b1", "h1"], ["hb"], name="bias"),
             *gelu,
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 1, width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("form, op", [("erf", "BiasGelu"), ("tanh", "FastGelu")])
def test_kernels_ort_fused_are_charged_to_their_nodes_or_timed(form, op):
    """A kernel ORT fused from a weight layer ("fused fc0": Gemm + Relu) is that layer's; a BiasGelu
    or FastGelu (fused from Add and Gelu, named after neither) is timed at the plan's width, read
    from the Gelu's output value, where its kept elements would say 8/32 (HF ConvNeXt: 0.58 measured)."""
    canon = canonicalize(mlp_with_bias_gelu(form=form), input_shapes={"x": (6, 16)})
    analysis = analyze_canonical(canon)
    fused = profile.profile_session_runs(canon.model, {"x": np.ones((6, 16), np.float32)}, threads=1, runs=2,
                                         warmup=1, node_values=True)  # how ORT names and links them
    assert (fused["fused fc0"].op, fused[op].op, fused[op].values) == ("FusedGemm", op, ("g", "h1", "b1"))
    # fc1 and fc2 slower in the model than in the database: no floor of the database's to take off
    kernels = {"fused fc0": Kernel("fused fc0", "FusedGemm", 40.0, [], [], ("r0", "x", "w0")),
               "to3d": Kernel("to3d", "Unsqueeze", 0.0, [], []),
               "fc1": Kernel("fc1", "MatMul", 2000.0, [], []),
               op: Kernel(op, op, 30.0, [], [], ("g", "h1", "b1")),
               "fc2": Kernel("fc2", "MatMul", 2000.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=OffsetDB(), profile=Profile(kernels, e2e_ms=4.07))
    assert cm.db_floor_us == 0
    assert cm.kernel_nodes["fused fc0"] == "fc0" and cm.kernel_nodes[op] is None
    gelu = cm.kernel_layers[op]
    assert gelu.sig.op == op and gelu.sig.full == (32,) and gelu.sig.lead == ((6, 1, -1), (-1,))
    hidden = next(g.name for g in analysis.groups if g.size == 32)
    quarter = analysis.keep_arrays({hidden: np.arange(8)})
    assert cm._timed_ratio(gelu, quarter) == pytest.approx((16 + 8) / (16 + 32))
    # fc1 and fc2 lose 3/4 of their hidden width; fc0 and its Relu keep theirs
    assert cm.predict_ms({hidden: np.arange(8)}) == pytest.approx(
        (40 + 2000 / 4 + 30 * 24 / 48 + 2000 / 4) / 1e3)


def test_predictor_scales_kernels_by_plan():
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    kernels = {"a_nchwc": Kernel("a_nchwc", "Conv", 100.0, [], []),  # named after c1's output
               "c2": Kernel("c2", "Conv", 50.0, [], []),
               "ReorderOutput": Kernel("ReorderOutput", "ReorderOutput", 10.0, [], []),
               # ORT's optimized graph says this reorder converts c1's output "a"
               "ReorderOutput_token_1": Kernel("ReorderOutput_token_1", "ReorderOutput", 20.0, [], [],
                                               ("a", "reorder_token_0"))}
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.22))
    assert cm.kernel_nodes == {"a_nchwc": "c1", "c2": "c2", "ReorderOutput": None, "ReorderOutput_token_1": None}
    assert cm.kernel_values == {"ReorderOutput": None, "ReorderOutput_token_1": "a"}
    assert cm.predict_ms(full_plan(analysis)) == pytest.approx(0.22)
    half = uniform_plan(analysis, 0.5)  # c1 and c2 both lose half of the 32 channels
    # overhead 0.04 ms + c1 0.1/2 + c2 0.05/2 + unknown reorder 0.01 unchanged + reorder of "a" 0.02/2
    assert cm.predict_ms(half) == pytest.approx(0.04 + 0.05 + 0.025 + 0.01 + 0.01)
    assert cm.predicted_speedup(half) == pytest.approx(0.22 / 0.135)


class ReorderDB(FakeDB):
    """Reorders timed around every layer: 2.5x slower off the full width (ORT's off-block path)."""

    def reorder_estimate(self, sig, widths, grids, side):
        return 10.0 if tuple(widths) == tuple(sig.full) else 25.0


def test_predictor_scales_reorders_as_the_database_timed_them():
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    kernels = {"c1": Kernel("c1", "Conv", 100.0, [], []), "c2": Kernel("c2", "Conv", 50.0, [], []),
               # c1's output "a" back to plain layout; the Relu's output "r" into c2's blocked one
               "ReorderOutput_token_1": Kernel("ReorderOutput_token_1", "ReorderOutput", 20.0, [], [],
                                               ("a", "reorder_token_0")),
               "ReorderInput_token_2": Kernel("ReorderInput_token_2", "ReorderInput", 8.0, [], [],
                                              ("reorder_token_3", "r"))}
    cm = CostModel(canon.model, analysis, None, db=ReorderDB(), profile=Profile(kernels, e2e_ms=0.218))
    assert cm.kernel_reorders == {"ReorderOutput_token_1": ("c1", 1), "ReorderInput_token_2": ("c2", 0)}
    assert cm.predict_ms(full_plan(analysis)) == pytest.approx(0.218)
    # overhead 0.04 ms + c1 0.1/2 + c2 0.05/2 + both reorders 2.5x (not halved with the channels)
    assert cm.predict_ms(uniform_plan(analysis, 0.5)) == pytest.approx(0.04 + 0.05 + 0.025 + 0.05 + 0.02)


def test_timing_database_records_the_reorders_around_a_blocked_conv(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_PRUNE_CACHE", str(tmp_path))
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    c2 = next(n for n in canon.static.graph.node if n.name == "c2")
    sig = layer_sig(c2, analysis.ctx.index)  # 32 -> 8 channels, 1x1
    db = TimingDB("cpu", threads=1)
    db.ensure(axis_points(sig, [[16, 32], [8]]))
    into, out_of = db.reorders[db.point_key(sig, sig.full)]
    assert into > 0, "ORT on this CPU runs a 32-channel conv in its blocked layout: its input is reordered"
    assert db.reorder_estimate(sig, sig.full, [[16, 32], [8]], 0) == pytest.approx(into)
    assert TimingDB("cpu", threads=1).reorders == db.reorders  # cached with the times


class ChainDB(FakeDB):
    """The pool's chain 10x faster at 16 of its 24 channels (blocked) than at 24 (reordered around)."""

    def estimate(self, sig, widths, grids):
        if sig.op == "MaxPool":
            return {24: 100.0, 16: 10.0}.get(widths[0], 5.0 * widths[0])
        return super().estimate(sig, widths, grids)

    def curve(self, sig, axis, widths):
        if sig.op == "MaxPool":
            return np.array([self.estimate(sig, (w,), None) for w in widths])
        return super().curve(sig, axis, widths)


def test_a_pool_between_convs_scales_with_the_reorders_around_it():
    """ORT runs a pool in its blocked layout only on whole channel blocks: off the block, reorders
    out of the conv's layout and back surround it. The pool and those reorders scale together,
    as the database timed their chain; a CUDA database has no such chain."""
    canon = canonicalize(two_convs(24, pool=True))
    analysis = analyze_canonical(canon)
    (group,) = analysis.groups
    kernels = {"c1": Kernel("c1", "Conv", 100.0, [], []),
               "ReorderOutput_token_1": Kernel("ReorderOutput_token_1", "ReorderOutput", 40.0, [], [],
                                               ("r", "reorder_token_0")),  # the Relu's output, to NCHW
               "pool": Kernel("pool", "MaxPool", 50.0, [], []),
               "ReorderInput_token_2": Kernel("ReorderInput_token_2", "ReorderInput", 10.0, [], [],
                                              ("reorder_token_3", "p")),  # the pool's output, blocked again
               "c2": Kernel("c2", "Conv", 50.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=ChainDB(), profile=Profile(kernels, e2e_ms=0.25))
    assert cm.layers["pool"].sig.op == "MaxPool" and cm.layers["pool"].sig.full == (24,)
    assert cm.kernel_chains == {"ReorderOutput_token_1": "pool", "ReorderInput_token_2": "pool"}
    assert cm.predict_ms(full_plan(analysis)) == pytest.approx(0.25)
    sixteen = {group.name: np.arange(16)}
    # c1 and c2 at 16/24 of their time; the chain's three kernels at a tenth
    assert cm.predict_ms(sixteen) == pytest.approx((100 + 50) * 16 / 24 / 1e3 + (40 + 50 + 10) * 0.1 / 1e3)
    assert 16 in cm.candidate_widths()[group.name]
    cm = CostModel(canon.model, analysis, None, provider="cuda", db=ChainDB(), profile=Profile(kernels, e2e_ms=0.25))
    assert "pool" not in cm.layers and cm.kernel_chains == {}


def test_the_database_times_a_pool_with_the_reorders_around_it():
    """The chain conv -> pool -> conv: on a whole block of channels the pool runs blocked with no
    reorder; off it, in NCHW with reorders on both sides, which the point's time holds."""
    analysis = analyze_canonical(canonicalize(two_convs(24, pool=True)))
    pool = next(n for n in analysis.ctx.index.model.graph.node if n.op_type == "MaxPool")
    stem = timing.pool_chain_sig(pool, analysis.ctx.index)
    assert (stem.full, stem.lead) == ((24,), (1, 16, 16)) and ("kernel_shape", (3, 3)) in stem.attrs
    sig = timing.LayerSig("MaxPool", (20,), (2, 16, 16), stem.attrs)
    points = [(sig, (16,)), (sig, (20,))]
    kernels = profile.profile_session_runs(timing._bench_model(points), dict(zip(
        ["in0", "in1"], timing._random_slices([timing._input_shapes(s, w)[0] for s, w in points], seed=1))),
        "cpu", 1, runs=2, node_values=True)
    reorders = {v for k in kernels.values() if k.op.startswith("Reorder") for v in k.values}
    assert "pt0_nchwc" in kernels and not {"a0", "pt0"} & reorders, "16 channels: one blocked pool"
    assert "pt1" in kernels and {"a1", "pt1"} <= reorders, "20 channels: an NCHW pool between reorders"
    db = TimingDB("cpu", threads=1, use_cache=False)
    db.ensure(points)
    assert db.measured == 2 and all(db.get(s, w) > 0 for s, w in points)


def test_each_pool_chain_is_timed_in_a_graph_of_its_own(monkeypatch):
    """Weight layers share bulk graphs; a pool chain is timed alone (after another point's heavy
    kernels a blocked pool of 80 µs took up to 196)."""
    chain = timing.LayerSig("MaxPool", (20,), (2, 16, 16), (("kernel_shape", (3, 3)), ("strides", (2, 2))))
    conv = timing.LayerSig("Conv", (16, 16), (2, 16, 16), ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), ()))
    points = [(chain, (16,)), (conv, (8, 16)), (chain, (20,)), (conv, (16, 16))]
    graphs = []
    real = TimingDB._profile_on_cpu
    monkeypatch.setattr(TimingDB, "_profile_on_cpu",
                        lambda self, chunk, runs: graphs.append(chunk) or real(self, chunk, runs))
    db = TimingDB("cpu", threads=1, use_cache=False)
    db.ensure(points)
    assert sorted(map(len, graphs)) == [1, 1, 2]
    assert all(p[0].op == "Conv" for g in graphs if len(g) > 1 for p in g)
    assert db.measured == 4 and all(db.get(s, w) > 0 for s, w in points)


def test_the_database_times_the_reorder_between_convs_off_the_block():
    """A conv writing fewer channels than a block still runs blocked (its filters padded) and ORT
    reorders its output for the conv that reads it; on the block, no reorder: the point is 0. (Past
    one block, ORT 1.32 has the reader take the padded blocks as they are: measured, not assumed.)"""
    block = timing.nchwc_block("cpu")
    assert block in (8, 16), "ORT's CPU convs run in 8- or 16-channel blocks on x86"
    sig = timing.LayerSig(timing.BLOCK_EXIT, (2 * block,), (2, 16, 16))
    points = [(sig, (block // 2,)), (sig, (block,)), (sig, (block + block // 2,))]
    db = TimingDB("cpu", threads=1, use_cache=False)
    db.ensure(points)
    assert db.measured == 3
    assert db.get(sig, (block // 2,)) > 0 and db.get(sig, (block + block // 2,)) is not None
    assert db.get(sig, (block,)) == 0


class ExitDB(FakeDB):
    """FakeDB, and 7 µs for every conv output cut off the block."""

    def get(self, sig, widths):
        return 7.0 if sig.op == timing.BLOCK_EXIT else None


def test_a_conv_output_cut_off_the_block_adds_the_reorder_the_database_timed():
    """The dense graph has no reorder between two convs on the block; a plan that cuts the first
    conv's output off the block gains one (U-Net's first stage cut from 16 to 8 channels), timed
    by the database. A pool reader is not counted here (its chain holds its reorders), nor is an
    output ORT already reorders in the dense model."""
    block = timing.nchwc_block("cpu")
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    (group,) = analysis.groups
    kernels = {"c1": Kernel("c1", "Conv", 100.0, [], []), "relu": Kernel("relu", "Relu", 1.0, [], []),
               "c2": Kernel("c2", "Conv", 50.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=ExitDB(), profile=Profile(kernels, e2e_ms=0.151))
    assert list(cm.block_exits) == ["c1"]
    assert (cm.block_exits["c1"].full, cm.block_exits["c1"].lead) == ((32,), (1, 16, 16))

    def without_exits(plan):
        exits, cm.block_exits = cm.block_exits, {}
        try:
            return cm.predict_ms(plan)
        finally:
            cm.block_exits = exits

    for width, added in ((block // 2, 0.007), (block, 0.0), (32, 0.0)):
        plan = {group.name: np.arange(width)}
        assert cm.predict_ms(plan) - without_exits(plan) == pytest.approx(added)
    reordered = {**kernels, "ReorderOutput_token_1": Kernel("ReorderOutput_token_1", "ReorderOutput", 4.0, [], [],
                                                            ("r", "reorder_token_0"))}
    cm = CostModel(canon.model, analysis, None, db=ExitDB(), profile=Profile(reordered, e2e_ms=0.155))
    assert cm.block_exits == {}
    pooled = canonicalize(two_convs(32, pool=True))
    cm = CostModel(pooled.model, analyze_canonical(pooled), None, db=ExitDB(),
                   profile=Profile({**kernels, "pool": Kernel("pool", "MaxPool", 5.0, [], [])}, e2e_ms=0.156))
    assert cm.block_exits == {}
    cm = CostModel(canon.model, analysis, None, provider="cuda", db=ExitDB(), profile=Profile(kernels, e2e_ms=0.151))
    assert cm.block_exits == {}


def test_nodes_that_read_no_value_pass_the_scan_for_pool_chains():
    """A node without inputs (SequenceEmpty: a dynamo export's EmbeddingBag collects its bags in a
    sequence; RandomNormal) made the CPU cost model's scan for pool chains read an input it lacks
    (an internal error before any plan)."""
    m = two_convs(32)
    g = m.graph
    g.node.extend([helper.make_node("SequenceEmpty", [], ["bags"], name="empty"),
                   helper.make_node("SequenceInsert", ["bags", "x"], ["bags1"], name="insert"),
                   helper.make_node("ConcatFromSequence", ["bags1"], ["z"], axis=1, name="cat")])
    g.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 16, 16]))
    canon = canonicalize(m)
    analysis = analyze_canonical(canon)
    (group,) = analysis.groups
    kernels = {"c1": Kernel("c1", "Conv", 100.0, [], []), "relu": Kernel("relu", "Relu", 1.0, [], []),
               "c2": Kernel("c2", "Conv", 50.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.151))
    assert cm.predict_ms({group.name: np.arange(16)}) < cm.predict_ms({})


class PaddedDB(FakeDB):
    """Every width costs what the full width costs (ORT pads channels to its block)."""

    def curve(self, sig, axis, widths):
        return np.full(len(widths), float(np.prod(sig.full)))


def test_candidate_widths_drop_padded_plateaus():
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    (group,) = analysis.groups
    light = {"c1": Kernel("c1", "Conv", 100.0, [], []), "c2": Kernel("c2", "Conv", 50.0, [], []),
             "relu": Kernel("relu", "Relu", 1.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=PaddedDB(), profile=Profile(light, e2e_ms=0.151))
    assert cm.candidate_widths()[group.name] == [32]  # narrower widths only lose channels
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(light, e2e_ms=0.151))
    assert cm.candidate_widths()[group.name] == width_grid(32)  # layers faster at every width


def test_heads_take_every_count_while_channels_keep_the_block_grid():
    """A head is head-size contiguous columns of its projections, so any count of heads keeps
    them on the hardware's block; channels of a conv chain keep the multiples of 8. (A grid over
    the count of 12 heads itself would offer only 8 and 12.)"""
    from test_rules import onnx_attention

    canon = canonicalize(onnx_attention("4d", hq=12, hkv=12, d=8, dv=16))
    analysis = analyze_canonical(canon)
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile({}, e2e_ms=0.1))
    by_size = {g.size: g.sid for g in analysis.groups}  # 12 heads, query/key size 8, value size 16
    assert sorted(by_size) == [8, 12, 16]
    assert cm.group_grids[by_size[12]] == list(range(1, 13))
    assert cm.group_grids[by_size[8]] == list(range(1, 9))
    assert cm.group_grids[by_size[16]] == [8, 16]  # a value dim spans one column of each head
    assert 11 * 16 in cm.layers["out"].grids[0]  # 11 heads of 16 values: timed for the output projection
    canon = canonicalize(two_convs(48))
    analysis = analyze_canonical(canon)
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile({}, e2e_ms=0.1))
    assert list(cm.group_grids.values()) == [[8, 16, 24, 32, 40, 48]]


def test_predictor_overhead_is_bounded_by_what_the_profiled_runs_spent_outside_kernels():
    """The plain end-to-end time is measured after the profile, maybe in a slower spell of the
    machine: the constant overhead is at most what the profiled runs themselves spent outside
    their kernels, which a slower spell cannot inflate."""
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    kernels = {"c1": Kernel("c1", "Conv", 100.0, [], []), "c2": Kernel("c2", "Conv", 50.0, [], [])}
    slow_spell = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, 0.5, 0.04))
    assert slow_spell.overhead_ms == pytest.approx(0.04)
    assert CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, 0.5)).overhead_ms == \
        pytest.approx(0.35)
    assert CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, 0.17, 0.04)).overhead_ms \
        == pytest.approx(0.02)


def test_profiled_runs_report_their_time_outside_kernels():
    from onnx_prune.backends.profile import profile_session_runs

    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    overheads = []
    kernels = profile_session_runs(two_convs(32), feeds, threads=1, runs=5, warmup=2, run_overheads_ms=overheads)
    assert len(overheads) == 5 and all(np.isfinite(overheads))
    assert 0 < np.median(overheads) < 1.0  # python's run call and ORT's executor: well under a millisecond
    assert sum(k.time_us for k in kernels.values()) > 0


def test_predictor_calibration_fits_the_measured_speedup():
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    kernels = {"c1": Kernel("c1", "Conv", 100.0, [], []), "c2": Kernel("c2", "Conv", 50.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.2))
    half, quarter = uniform_plan(analysis, 0.5), uniform_plan(analysis, 0.75)
    raw = cm.predicted_speedup(half)
    assert cm.calibrate(half, raw * 1.2) > 1.0  # faster than its kernels say: gamma above 1
    assert cm.predicted_speedup(half) == pytest.approx(raw * 1.2, rel=1e-6)
    assert cm.predict_ms(full_plan(analysis)) == pytest.approx(0.2)  # the dense model does not move
    # the overhead (0.05 ms) stays; the kernels scale by (kept share) ** gamma
    assert cm.predict_ms(quarter) == pytest.approx(0.05 + 0.15 * 0.25 ** cm.gamma)
    assert cm.calibrate(half, raw / 1.2) < 1.0


def test_predictor_removes_profiler_inflation():
    """Kernels that sum to more than a plain run: the excess is a per-kernel profiler cost, taken
    off the dense kernels and off the database's times (profiled alike) before their ratio."""
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    kernels = {"c1": Kernel("c1", "Conv", 105.0, [], []), "c2": Kernel("c2", "Conv", 55.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.15))
    assert cm.profiler_us == pytest.approx(5.0) and cm.overhead_ms == 0
    assert cm.predict_ms({}) == pytest.approx(0.15)
    # FakeDB: c1 (3 -> 32 channels) 96 µs whole, 48 with its output halved; c2 (32 -> 8) 256 and 128
    c1, c2 = (48 - 5) / (96 - 5), (128 - 5) / (256 - 5)
    assert cm.predict_ms(uniform_plan(analysis, 0.5)) == pytest.approx((100 * c1 + 50 * c2) / 1e3)


def test_predictor_takes_the_databases_floor_off_its_ratios():
    """Layers that take longer in the database than in the model (small kernels timed alone): the
    smallest such gap is a cost of every database point, taken off both ends of each ratio (at
    most half the smaller end); none where some layer runs slower in the model."""
    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    # FakeDB: c1 (3 -> 32 channels) 96 µs whole, 48 with its output halved; c2 (32 -> 8) 256 and 128
    kernels = {"c1": Kernel("c1", "Conv", 60.0, [], []), "c2": Kernel("c2", "Conv", 200.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.26))
    assert cm.profiler_us == 0 and cm.db_floor_us == pytest.approx(36.0)  # c1: 96 - 60
    c1, c2 = (48 - 24) / (96 - 24), (128 - 36) / (256 - 36)  # c1's floor capped at half its 48 µs
    assert cm.predict_ms(uniform_plan(analysis, 0.5)) == pytest.approx((60 * c1 + 200 * c2) / 1e3)
    kernels["c1"] = Kernel("c1", "Conv", 100.0, [], [])  # slower in the model than alone
    assert CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.3)).db_floor_us == 0


def test_predictor_takes_no_more_than_the_profilers_cost_off_a_cpu_kernel():
    """Kernels that sum to far more than a plain run (the machine slowed between the profiled and
    the plain runs): no more than the CPU profiler's own cost comes off each kernel, so a small
    kernel keeps its share; on CUDA (launches made blocking to profile) the whole excess does."""
    from onnx_prune.backends.predict import PROFILER_US_CPU

    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    kernels = {"c1": Kernel("c1", "Conv", 300.0, [], []), "c2": Kernel("c2", "Conv", 100.0, [], [])}
    cpu = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.2))
    assert cpu.profiler_us == PROFILER_US_CPU
    assert cpu.predict_ms({}) == pytest.approx((400 - 2 * PROFILER_US_CPU) / 1e3)
    cuda = CostModel(canon.model, analysis, None, provider="cuda", db=FakeDB(), profile=Profile(kernels, e2e_ms=0.2))
    assert cuda.profiler_us == pytest.approx(100.0)
    assert cuda.predict_ms({}) == pytest.approx(0.2)


def test_timing_curves_are_made_non_decreasing(tmp_path, monkeypatch):
    from onnx_prune.backends.timing import _nondecreasing

    assert _nondecreasing(np.array([1.0, 3.0, 2.0, 4.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert _nondecreasing(np.array([5.0, 1.0, 1.0])).tolist() == pytest.approx([7 / 3] * 3)
    monkeypatch.setenv("ONNX_PRUNE_CACHE", str(tmp_path))
    db = TimingDB("cpu", threads=1)
    sig = LayerSig("MatMul", (16, 32), (4,))
    for w, t in [(8, 10.0), (16, 20.0), (24, 14.0), (32, 30.0)]:  # 24 measured in a lucky moment
        db.times[db.point_key(sig, (16, w))] = t
    assert db.curve(sig, 1, [8, 16, 24, 32]).tolist() == [10.0, 17.0, 17.0, 30.0]
    assert db.estimate(sig, (16, 24), [[16], [8, 16, 24, 32]]) == pytest.approx(17.0)
    # off ORT's 16-channel block a conv reads its input another way: slow paths keep their times
    for w, t in [(4, 150.0), (8, 170.0), (12, 250.0), (16, 91.0)]:
        db.times[db.point_key(sig, (w, 32))] = t
    assert db.curve(sig, 0, [4, 8, 12, 16]).tolist() == [150.0, 170.0, 250.0, 91.0]
    assert db.estimate(sig, (12, 32), [[4, 8, 12, 16], [32]]) == pytest.approx(250.0)


def test_a_full_width_far_slower_than_its_extra_blocks_explain_is_an_outlier(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_PRUNE_CACHE", str(tmp_path))
    db = TimingDB("cpu", threads=1)
    # BERT-large's FFN output MatMul: 14.8 ms at its 4096-wide input in the bulk graph, 5.4 ms at 4056
    sig = LayerSig("MatMul", (4096, 1024), (1, 128))
    grid = [3880, 4056, 4096]
    for w, t in zip(grid, [5209.0, 5434.0, 14838.0]):
        db.times[db.point_key(sig, (w, 1024))] = t
    ratio = db.estimate(sig, (4056, 1024), [grid, [1024]]) / db.estimate(sig, sig.full, [grid, [1024]])
    assert ratio == pytest.approx(4056 / 4096, rel=1e-6)  # the work it drops, not 2.7x
    # one 16-channel block to two: the jump is the hardware's, and stays
    small = LayerSig("Conv", (8, 24), (1, 32, 32), ((1, 1),))
    for w, t in [(8, 40.0), (16, 50.0), (24, 125.0)]:
        db.times[db.point_key(small, (8, w))] = t
    assert db.curve(small, 1, [8, 16, 24]).tolist() == [40.0, 50.0, 125.0]


def test_bulk_measurement_times_every_point():
    sig = LayerSig("Conv", (16, 16), (1, 8, 8), ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), ()))
    db = TimingDB("cpu", threads=1, use_cache=False)
    db.ensure([(sig, (8, 16)), (sig, (16, 16))])
    keys = {db.point_key(sig, (8, 16)), db.point_key(sig, (16, 16))}
    assert set(db.times) == set(db.reorders) == keys
    assert all(db.times[k] > 0 and len(db.reorders[k]) == 2 for k in keys)


@pytest.mark.parametrize("fused", ["onnx", "ort"])
def test_fused_attention_kernel_scales_with_heads_and_both_head_sizes(fused):
    """ONNX's Attention and ONNX Runtime's MultiHeadAttention: Q K' costs heads x query/key size,
    the weighted sum of V heads x value size; each counts half of the kernel's time."""
    from test_rules import onnx_attention, ort_multi_head_attention

    m = onnx_attention("4d") if fused == "onnx" else ort_multi_head_attention(dv=6)
    canon = canonicalize(m)
    analysis = analyze_canonical(canon)
    node = "att" if fused == "onnx" else "mha"
    cm = CostModel(canon.model, analysis, None, db=FakeDB(),
                   profile=Profile({node: Kernel(node, "Attention", 100.0, [], [])}, e2e_ms=0.1))
    by_size = {g.size: g.name for g in analysis.groups}  # 4 heads, query/key size 8, value size 6
    assert sorted(by_size) == [4, 6, 8]

    def keep(**halved):
        plan = {g.name: np.arange(g.size // 2 if g.size in halved.values() else g.size) for g in analysis.groups}
        return analysis.keep_arrays(plan)

    assert cm.node_ratio(node, keep()) == pytest.approx(1.0)
    assert cm.node_ratio(node, keep(qk=8)) == pytest.approx(0.75)
    assert cm.node_ratio(node, keep(v=6)) == pytest.approx(0.75)
    assert cm.node_ratio(node, keep(heads=4)) == pytest.approx(0.5)
    assert cm.node_ratio(node, keep(heads=4, qk=8, v=6)) == pytest.approx(0.25)


def test_recurrent_kernel_scales_with_its_kept_weights():
    """An LSTM's time goes to its products with W (gates x hidden, input) and R (gates x hidden,
    hidden) at every step: it scales with their kept elements, weighted by their sizes."""
    from test_rules import recurrent

    canon = canonicalize(recurrent("LSTM"))
    analysis = analyze_canonical(canon)
    cm = CostModel(canon.model, analysis, None, db=FakeDB(),
                   profile=Profile({"rnn": Kernel("rnn", "LSTM", 100.0, [], [])}, e2e_ms=0.1))
    hidden, inputs = sorted(analysis.groups, key=lambda g: g.size)  # 6 hidden units, 8 input channels

    def keep(*halved):
        return analysis.keep_arrays({g.name: np.arange(g.size // 2 if g in halved else g.size) for g in analysis.groups})

    w, r = 24 * 8, 24 * 6  # elements of W and R
    assert cm.node_ratio("rnn", keep()) == pytest.approx(1.0)
    assert cm.node_ratio("rnn", keep(inputs)) == pytest.approx((w * 0.5 + r) / (w + r))
    assert cm.node_ratio("rnn", keep(hidden)) == pytest.approx((w * 0.5 + r * 0.25) / (w + r))
    assert cm.node_ratio("rnn", keep(hidden, inputs)) == pytest.approx(0.25)


def test_product_axes_are_timed_at_the_widths_plans_give_them():
    """RegNetY's grouped conv splits 16 channels into 2 groups x 8: pruning the channels per group
    to 7 leaves 14, a width the 1x1 convs around it must be timed at (their grid alone: 8, 16)."""
    from onnx_prune.models.registry import load

    entry = load("regnety")
    canon = canonicalize(entry.model, input_shapes=dict(entry.input_shapes))
    analysis = analyze_canonical(canon)
    kernels = {"k": Kernel("k", "Relu", 1.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.001))
    (layer,) = [lay for lay in cm.layers.values() if lay.node.endswith("features.1/c/c.0/Conv")]
    assert layer.sig.full[0] == 16
    assert layer.grids[0] == sorted({g * c for g in (1, 2) for c in range(1, 9)})  # 1..2 groups x 1..8
    assert layer.grids[1] == width_grid(layer.sig.full[1])  # a plain group: its own grid


def test_profile_names_the_values_of_kernels_ort_inserted():
    """Layout reorders are named after nothing in the model; ORT's optimized graph says which of
    the model's values each one converts."""
    from onnx_prune.backends.profile import profile_session_runs

    model = two_convs(32)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    kernels = profile_session_runs(model, feeds, threads=1, runs=2, warmup=1, node_values=True)
    values = {o for n in model.graph.node for o in n.output} | {"x"}
    assert kernels and all(k.values for k in kernels.values())
    reorders = [k for k in kernels.values() if k.op.startswith("Reorder")]
    assert reorders, "ORT on this CPU runs these convs in its blocked layout, with reorders at the ends"
    for k in reorders:
        assert values & set(k.values), (k.name, k.values)


def test_profile_names_a_float16_models_kernels_as_its_float32_twins():
    """ORT CPU runs float16 convs in float32 between Casts it inserts, renaming the nodes
    `InsertedPrecisionFreeCast_<name>`: the profile gives them back the names the predictor
    maps to the model's layers, those of the same model in float32."""
    from onnx_prune.backends.profile import profile_session_runs

    names = {}
    for dtype, proto in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
        model = two_convs(32)
        for t in model.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
        for v in list(model.graph.input) + list(model.graph.output):
            v.type.tensor_type.elem_type = proto
        feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(dtype)}
        kernels = profile_session_runs(model, feeds, threads=1, runs=2, warmup=1, node_values=True)
        names[dtype] = {name for name, k in kernels.items() if k.op != "Cast" and k.values}
    assert names[np.float16] == names[np.float32]


def test_source_node_strips_ort_suffixes():
    nodes = {"/blk/Conv": None, "/blk/Mul": None}
    by_output = {"/blk/Conv_output_0": "/blk/Conv"}
    assert _source_node("/blk/Conv_output_0_nchwc", nodes, by_output) == "/blk/Conv"
    assert _source_node("/blk/Mul/QuickGeluFusion/", nodes, by_output) == "/blk/Mul"
    assert _source_node("ReorderInput_token_3", nodes, by_output) is None
    assert _source_node("fused /blk/Conv", nodes, by_output) == "/blk/Conv"  # FusedGemm, FusedConv


def test_fused_kernel_is_charged_to_its_weight_layer_upstream():
    """ORT names a fused Conv+Add+Relu kernel after the Relu; the Conv it starts from is found
    breadth first through every input (here the Add's second), up to three steps above."""
    nodes = {n: helper.make_node(op, ins, [n + ":0"], name=n) for n, op, ins in [
        ("conv_a", "Conv", ["x", "w"]), ("conv_b", "Conv", ["x", "w"]), ("relu_a", "Relu", ["conv_a:0"]),
        ("add", "Add", ["relu_a:0", "conv_b:0"]), ("relu", "Relu", ["add:0"]),
        ("r1", "Relu", ["relu:0"]), ("r2", "Relu", ["r1:0"]), ("r3", "Relu", ["r2:0"])]}
    by_output = {n.output[0]: name for name, n in nodes.items()}
    assert _fused_head("relu", "Conv", nodes, by_output) == "conv_b"  # 2 steps up, before conv_a (3)
    assert _fused_head("conv_a", "Conv", nodes, by_output) == "conv_a"
    assert _fused_head("r3", "Conv", nodes, by_output) == "r3"  # 4 steps up: not this kernel's
    assert _fused_head("relu", "Relu", nodes, by_output) == "relu"  # only weight layers are looked for


@pytest.mark.parametrize("stride", [1, 2])
def test_same_auto_pad_convs_are_timed_and_sampled_with_their_real_pads(tmp_path, monkeypatch, stride):
    """TF-style exports pad with auto_pad=SAME_*: the timing point and the calibration patches
    must use those pads (a 5x5 depthwise conv on a 4x4 input is invalid without them)."""
    from onnx_prune.passes.graph import conv_pads
    from onnx_prune.passes.reconstruct import im2col

    monkeypatch.setenv("ONNX_PRUNE_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 1, 5, 5)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=8, strides=[stride, stride],
                            auto_pad="SAME_UPPER")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    canon = canonicalize(m)
    analysis = analyze_canonical(canon)
    (conv,) = [n for n in canon.static.graph.node if n.op_type == "Conv"]
    sig = layer_sig(conv, analysis.ctx.index)
    assert sig.attrs[2] == conv_pads(conv, (4, 4), (5, 5)) == ((2, 2, 2, 2) if stride == 1 else (1, 1, 2, 2))
    db = TimingDB("cpu", threads=1)
    db.ensure(axis_points(sig, [[8]]))  # ORT rejects the point if the pads are wrong
    assert db.get(sig, (8,)) > 0
    x = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    patches = im2col(x, conv, 1000, rng)
    assert len(patches) == y.shape[0] * y.shape[2] * y.shape[3]


@pytest.mark.parametrize("pads,strides,dilations,kernel", [
    ([1, 1, 1, 1], [1, 1], [1, 1], [3, 3]), ([0, 2, 1, 0], [2, 1], [1, 2], [3, 2]), ([1, 0, 1, 0], [2, 2], [1, 1], [1, 1]),
    ([2, 1], [2], [1], [4]), ([0, 0], [1], [2], [3])])  # the last two: 1-D convs (ConvBERT's)
def test_im2col_patches_times_the_weights_give_the_conv_output(pads, strides, dilations, kernel):
    """Every sampled patch, padded taps included, reproduces ORT's conv output at its position."""
    from onnx_prune.passes.reconstruct import im2col, weight_matrix

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 6)[:2 + len(kernel)]).astype(np.float32)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=pads, strides=strides, dilations=dilations,
                            kernel_shape=kernel)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    total = y.size // y.shape[1]
    patches = im2col(x, node, total, np.random.default_rng(5))
    order = np.random.default_rng(5).choice(total, size=total, replace=False)  # the positions im2col drew
    expected = np.moveaxis(y, 1, -1).reshape(total, -1)[order]
    np.testing.assert_allclose(patches @ weight_matrix(node, w), expected, rtol=1e-4, atol=1e-4)


def test_shape_inference_and_intermediate_values_take_large_weights_by_shape_only():
    """Shape inference sees a large weight as a typed input and ORT gets it as a feed, so neither
    serializes the weights; the small shape tensor stays an initializer, so the Reshape still
    infers, and the values are the model's own."""
    import onnx

    from onnx_prune.backends.ort import run_all_outputs
    from onnx_prune.passes.graph import LARGE_ELEMENTS, infer_shapes, without_large_weights

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    assert w.size > LARGE_ELEMENTS
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([2, 8, 16], np.int64), "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    light, large = without_large_weights(m)
    assert [t.name for t in large] == ["w"] and [t.name for t in light.graph.initializer] == ["shape"]
    expected = onnx.shape_inference.infer_shapes(m)
    got = infer_shapes(onnx.ModelProto.FromString(m.SerializeToString()))
    assert got.graph.value_info == expected.graph.value_info and got.graph.output == expected.graph.output
    assert [d.dim_value for d in got.graph.output[0].type.tensor_type.shape.dim] == [2, 8, 16]
    assert len(got.graph.initializer) == 2  # the model keeps its weights
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run_all_outputs(m, ["h"], {"x": x})["h"], x @ w, rtol=1e-5, atol=1e-5)


def test_static_copy_holds_large_weights_by_shape_and_the_analysis_reads_them_from_the_model():
    """canonicalize's static copy keeps each large weight's name, type and dims but not its data
    (a second copy of BERT-base's weights is 435 MB); the analysis reads the values from the
    canonical model, and the importance it computes is the same as on a static copy with data."""
    from onnx_prune.passes.graph import LARGE_ELEMENTS
    from onnx_prune.passes.importance import group_scores

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 96)).astype(np.float32)
    w2 = rng.standard_normal((96, 48)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert w1.size > LARGE_ELEMENTS and w2.size > LARGE_ELEMENTS
    canon = canonicalize(m, input_shapes={"x": (4, 64)})
    stored = {t.name: t for t in canon.static.graph.initializer}
    assert {n: tuple(t.dims) for n, t in stored.items()} == {"w1": (64, 96), "w2": (96, 48)}
    assert not any(t.raw_data or t.float_data for t in stored.values())
    analysis = analyze_canonical(canon)
    np.testing.assert_array_equal(analysis.ctx.index.const("w1"), w1)
    with pytest.raises(ValueError, match="by shape only"):  # the static copy alone has no values to give
        analyze_canonical(canon.static).ctx.index.const("w1")
    full = onnx.ModelProto()
    full.CopyFrom(canon.static)
    full.graph.ClearField("initializer")
    full.graph.initializer.extend(canon.model.graph.initializer)
    with_data = analyze_canonical(full)  # a static model that holds its own data
    [a], [b] = group_scores(analysis).values(), group_scores(with_data).values()
    np.testing.assert_allclose(a, b)
    assert a.shape == (96,) and np.ptp(a) > 0


def test_predictor_takes_a_loops_profiled_body_overhead_off_its_kernel():
    """A Loop's kernel holds the profiler's cost of its body's nodes at every iteration: what the
    kernels have over a plain run, past the profiler's cost per kernel, comes off the Loop, so the
    dense model is predicted at its plain run time and the convs keep their shares."""
    from onnx_prune.backends.predict import PROFILER_US_CPU

    canon = canonicalize(two_convs(32))
    analysis = analyze_canonical(canon)
    kernels = {"c1": Kernel("c1", "Conv", 105.0, [], []), "c2": Kernel("c2", "Conv", 55.0, [], []),
               "loop": Kernel("loop", "Loop", 900.0, [], [])}
    cm = CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(kernels, e2e_ms=0.2))
    assert cm.profiler_us == PROFILER_US_CPU
    assert cm.predict_ms({}) == pytest.approx(0.2)
    assert 900 - PROFILER_US_CPU - cm.trim_us["loop"] == pytest.approx(200 - (105 + 55 - 2 * PROFILER_US_CPU))
    assert set(cm.trim_us) == {"loop"}
    # an If runs its branch once: the excess there is the machine's, taken off no kernel
    branch = {**kernels, "loop": Kernel("loop", "If", 900.0, [], [])}
    assert CostModel(canon.model, analysis, None, db=FakeDB(), profile=Profile(branch, e2e_ms=0.2)).trim_us == {}


def test_profile_keeps_the_round_fastest_by_its_kernels_and_its_plain_runs(monkeypatch):
    """A round whose plain runs were fast while its kernels ran in a slow spell is not the one
    kept: its kernels' shares would come from another speed than the plain run's."""
    from types import SimpleNamespace

    from onnx_prune.backends import measure as measure_module

    kernel_us = iter([4000.0, 5000.0, 9000.0])  # per round: one kernel
    e2e = iter([4.2, 4.9, 3.9])  # the last round's plain runs fastest, its kernel slowest
    monkeypatch.setattr(profile, "profile_session_runs", lambda *a, **k: {"k": Kernel("k", "Conv", next(kernel_us), [], [])})
    monkeypatch.setattr(measure_module, "measure",
                        lambda *a, **k: SimpleNamespace(latencies=[SimpleNamespace(median_ms=next(e2e))]))
    prof = profile.profile_model(two_convs(8), {}, threads=1)
    assert (prof.kernel_ms, prof.e2e_ms) == (4.0, 4.2)


def test_profiled_reorders_carry_the_values_of_their_own_session(monkeypatch):
    # ORT names the reorders it inserts (ReorderOutput_token_57, ...) in an order that changes from
    # one session to the next: the kept round's kernels must carry the values of that round's graph.
    # The last of the three rounds is made the fastest, so it is the one kept.
    from types import SimpleNamespace

    from onnx_prune.backends import measure as measure_module
    from onnx_prune.backends.ort import feeds_for
    from onnx_prune.models.registry import load

    entry = load("resnet_bottleneck")
    model, feeds = feeds_for(entry.model, dict(entry.input_shapes), 16)
    canon = canonicalize(model, input_shapes={k: v.shape for k, v in feeds.items()})
    shapes = analyze_canonical(canon).ctx.index.shapes
    e2e = iter([3000.0, 2000.0, 1000.0])
    monkeypatch.setattr(measure_module, "measure",
                        lambda *a, **k: SimpleNamespace(latencies=[SimpleNamespace(median_ms=next(e2e))]))
    prof = profile.profile_model(canon.model, feeds, threads=2, runs=2)
    assert prof.e2e_ms == 1000.0
    reorders = [k for k in prof.kernels.values() if k.op == "ReorderOutput"]
    assert len(reorders) >= 3
    for k in reorders:
        value = next(v for v in k.values if v in shapes)
        assert tuple(shapes[value]) == tuple(k.outputs[0]), (k.name, value)


def test_matmul_dims_that_must_be_equal_are_one_axis_of_its_signature():
    """A MatMul's contracted dims, and the batch dims both operands have, are one axis even where
    the analysis wrote the same channels as two expressions (or one operand's dim as a plain size):
    the database shrinks each axis alone, and must not build operands that cannot be multiplied."""
    from onnx_prune.backends.predict import _tie_matmul_dims

    a, b = _tie_matmul_dims([[(8, "batch x heads"), 32, 32], [(8, "2 x heads"), 32, (16, "d")]])
    assert a == [(8, "batch x heads"), 32, 32] and b == [(8, "batch x heads"), 32, (16, "d")]
    a, b = _tie_matmul_dims([[2, (4, "heads"), 6, (8, "d")], [2, (4, "heads"), 8, 6]])
    assert a == [2, (4, "heads"), 6, (8, "d")] and b == [2, (4, "heads"), (8, "d"), 6]
    a, b = _tie_matmul_dims([[1, 6, (8, "d")], [(4, "heads"), 8, 6]])  # broadcast from 1: left alone
    assert a[0] == 1 and b[0] == (4, "heads")


def test_a_deberta_attention_is_timed_at_every_width(tmp_path, monkeypatch):
    """DeBERTa-v2's context MatMul reads scores whose batch x heads axis the analysis derives from
    the batch's size and values whose axis it derives from a constant 2: the timing database built
    operands of 8 and 7 heads and ONNX Runtime refused its bulk model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from onnx_prune.models.torch_export import from_torch

    torch.manual_seed(0)
    config = transformers.DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64)
    encoder = transformers.DebertaV2Model(config).eval()

    class Hidden(torch.nn.Module):
        def forward(self, ids):
            return encoder(ids).last_hidden_state

    model = from_torch(Hidden(), torch.randint(0, 100, (2, 16)))
    canon = canonicalize(model, {"input": [2, 16]})
    analysis = analyze_canonical(canon)
    monkeypatch.setenv("ONNX_PRUNE_CACHE", str(tmp_path))
    cm = CostModel(canon.model, analysis, random_feeds(canon.model, {"input": [2, 16]}), threads=1)
    mixes = [layer for layer in cm.layers.values() if layer.sig.op == "MatMulAct" and layer.sig.lead[0][-1] == 16]
    assert mixes and all(layer.sig.lead[0][0] == layer.sig.lead[1][0] for layer in mixes)
    heads = [g for g in analysis.groups if g.size == 4]
    assert heads and cm.predicted_speedup(uniform_plan(analysis, 0.5)) > 1.0
