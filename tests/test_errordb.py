"""Error database (SPDY on channels): the one-Cholesky curves equal brute-force least squares,
channel choice follows what a layer's output needs, and the search's pieces behave."""

import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.compiler.fidelity import compare
from onnx_prune.compiler.sensitivity import sensitivity_search
from onnx_prune.passes.analysis import analyze_model
from onnx_prune.passes.errordb import _Layer, _layer_curves, build_error_db


def _mlp(seed=0, hidden=24):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(10, hidden)).astype(np.float32)
    w2 = rng.normal(size=(hidden, 6)).astype(np.float32)
    w2[:4] *= 10  # four hidden channels matter far more to the output
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_curves_equal_brute_force_least_squares():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))  # correlated features
    W = rng.normal(size=(12, 5))
    lay = _Layer(node=None, per_pos=2, coords=[], gram=X.T @ X, rows=400)
    coord = np.array([-1, 0, 1, 2, 3, -1])  # 6 positions x 2 features; positions 0 and 5 are another group's
    order = np.array([2, 0, 3, 1])
    refit, dropped = _layer_curves(lay, W, coord, order, 4)
    from onnx_prune.passes import errordb

    Y = X @ W
    for k in range(5):
        kept_pos = [0, 5] + [int(np.where(coord == c)[0][0]) for c in order[:k]]
        K = np.sort(np.concatenate([[2 * p, 2 * p + 1] for p in kept_pos]))
        G = X.T @ X
        lam = errordb.RIDGE * np.trace(G) / len(G)
        Wk = np.linalg.solve(G[np.ix_(K, K)] + lam * np.eye(len(K)), G[K] @ W)
        # ridge explains X_K Wk's projection; the curve reports base minus the explained energy
        explained = np.sum((G[K] @ W) * Wk)
        assert refit[k] == pytest.approx(max(np.sum(Y ** 2) - explained, 0) / np.sum(Y ** 2), rel=1e-6, abs=1e-9)
        D = np.setdiff1d(np.arange(12), K)
        assert dropped[k] == pytest.approx(np.sum((X[:, D] @ W[D]) ** 2) / np.sum(Y ** 2), rel=1e-6, abs=1e-9)
    assert dropped[4] == 0 and np.all(np.diff(refit) <= 1e-12)


def test_database_ranks_the_channels_the_output_needs_first():
    model = _mlp()
    analysis = analyze_model(model, {"x": (64, 10)})
    (group,) = analysis.groups
    samples = {"x": np.random.default_rng(0).normal(size=(256, 10)).astype(np.float32)}
    db = build_error_db(model, analysis, samples)
    assert db.source[group.name] == "refit"
    assert set(db.order[group.name][:4]) == {0, 1, 2, 3}
    curve = db.curve[group.name]
    assert curve[-1] == 0 and curve[0] > 0.5 and np.all(np.diff(curve) <= 1e-9)
    assert curve[4] < 0.2 * curve[0]  # the four loud channels carry most of the output
    scores = db.scores()[group.name]
    assert set(np.argsort(-scores)[:4]) == {0, 1, 2, 3}


def test_sensitivity_search_improves_on_raw_errors_and_respects_its_budget():
    # two groups, options = widths; the true loss weighs group 1 ten times more than its raw error says
    priors = [np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0])]

    def solve(errors):  # must drop two option steps in total; pick the cheapest by the given errors
        best = min(((a, b) for a in range(3) for b in range(3) if a + b == 2),
                   key=lambda ab: errors[0][ab[0]] + errors[1][ab[1]])
        return {"g0": np.arange(3 - best[0]), "g1": np.arange(3 - best[1])}

    def loss(plan):
        return (3 - len(plan["g0"])) + 10 * (3 - len(plan["g1"]))

    c, plan, best, evaluated = sensitivity_search(solve, loss, priors, budget_s=5)
    assert best == 2 and len(plan["g1"]) == 3  # all pruning moved to the insensitive group
    assert evaluated >= 2


def test_sensitivity_search_spends_most_of_its_budget_on_local_search():
    # 20 groups: random draws change every coefficient, local search only a few of the best's
    n, calls = 20, []
    priors = [np.ones(3) for _ in range(n)]

    def solve(errors):
        calls.append(np.array([e[0] for e in errors]))
        return {"g0": np.arange(len(calls))}  # a new plan each time: each one is scored

    def loss(plan):
        time.sleep(0.02)
        return 1.0  # nothing beats c = 1: every draw after the first starts from it

    sensitivity_search(solve, loss, priors, budget_s=2.0)
    changed = [int(np.sum(c != 1.0)) for c in calls[1:]]
    random_draws = sum(k == n for k in changed)
    # random draws stop after RANDOM_SHARE (10%) of the budget: 0.2 s of 0.02 s draws
    assert 1 <= random_draws <= 12
    assert sum(1 <= k <= 2 for k in changed) >= 20  # the rest is local search (k = 10% of 20)


def test_pooled_similarity_ignores_padding_tokens():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(3, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    pruned = dense.copy()
    pruned[mask == 0] = 100.0  # garbage on padding positions only
    c = compare([dense], [pruned], {"attention_mask": mask})
    assert np.allclose(c["pooled"], 1.0)
    assert min(c["cos"]) < 0.9  # the flattened comparison does see the padding


def test_two_zero_outputs_are_alike_and_a_zero_against_a_nonzero_output_is_not():
    """A randomly initialised EfficientNet outputs zeros: a pruned model giving zeros too matches
    it (cosine 1, not 0), and one giving anything else does not."""
    zeros, ones = np.zeros((2, 3, 4)), np.ones((2, 3, 4))
    assert np.allclose(compare([zeros], [zeros], {})["cos"], 1.0)
    assert np.allclose(compare([zeros], [ones], {})["cos"], 0.0)
    assert np.allclose(compare([ones], [-ones], {})["cos"], -1.0)


def test_an_output_of_one_value_per_sample_is_compared_over_the_batch():
    """A regression output or a click logit: per sample, the cosine of one number is its sign
    alone (1.0 here, however far the values moved); over the batch's values it sees the change."""
    dense = np.array([[1.0], [2.0], [3.0], [-1.0]])
    moved = np.array([[3.0], [0.5], [1.0], [-0.2]])  # every sign kept
    c = compare([dense], [moved], {})
    assert len(c["cos"]) == len(c["rel"]) == 4
    assert max(c["cos"]) < 0.8 and min(c["rel"]) > 0.5
    assert np.allclose(compare([dense], [1.0 * dense], {})["cos"], 1.0)
    assert np.allclose(compare([dense[:1]], [moved[:1]], {})["cos"], 1.0)  # one sample: only its sign


def test_stitch_refits_layers_after_pruned_groups_and_beats_plain_pruning():
    from onnx_prune.compiler.fidelity import output_fidelity
    from onnx_prune.passes.surgery import apply_plan

    model = _mlp(hidden=32)
    analysis = analyze_model(model, {"x": (64, 10)})
    (group,) = analysis.groups
    samples = {"x": np.random.default_rng(0).normal(size=(512, 10)).astype(np.float32)}
    db = build_error_db(model, analysis, samples)
    plan = {group.name: np.sort(db.order[group.name][:12])}
    pruned = apply_plan(model, analysis, plan)
    stitched = db.stitch(pruned, analysis, plan)
    plain = output_fidelity(model, pruned, samples, "cpu")["mean_relative_l2_error"]
    refit = output_fidelity(model, stitched, samples, "cpu")["mean_relative_l2_error"]
    assert refit < 0.8 * plain
    w2 = lambda m: numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w2"))
    assert w2(stitched).shape == w2(pruned).shape == (12, 6) and not np.allclose(w2(stitched), w2(pruned))


def test_fold_grams_let_stitch_refit_on_the_other_folds_alone():
    from onnx_prune.passes.surgery import apply_plan

    model = _mlp(hidden=32)
    analysis = analyze_model(model, {"x": (64, 10)})
    (group,) = analysis.groups
    samples = {"x": np.random.default_rng(0).normal(size=(512, 10)).astype(np.float32)}
    first = np.arange(512) < 256
    db = build_error_db(model, analysis, samples, folds=[first, ~first])
    (lay,) = db.layers
    assert list(lay.fold_grams) == [0]  # the last fold's share is derived, not held
    plan = {group.name: np.sort(db.order[group.name][:12])}
    pruned = apply_plan(model, analysis, plan)
    w2 = lambda m: numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w2"))
    everything = np.arange(len(lay.gram))
    for without, part in ((1, first), (0, ~first)):
        alone = build_error_db(model, analysis, {"x": samples["x"][part]})  # the other fold's samples only
        np.testing.assert_allclose(lay.gram_without(without, everything), alone.layers[0].gram, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(w2(db.stitch(pruned, analysis, plan, without=without)),
                                   w2(alone.stitch(pruned, analysis, plan)), rtol=1e-3, atol=1e-4)
    assert not np.allclose(w2(db.stitch(pruned, analysis, plan, without=1)), w2(db.stitch(pruned, analysis, plan)))


def _mlp3(seed=0, hidden=32):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (10, hidden), "w2": (hidden, hidden), "w3": (hidden, 6)}
    inits = [numpy_helper.from_array((rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32), n)
             for n, s in shapes.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    g = helper.make_graph(nodes, "mlp3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_sequential_refit_corrects_what_earlier_layers_pass_on():
    from onnx_prune.compiler.fidelity import output_fidelity
    from onnx_prune.passes.sequential import SequentialTooSlow, sequential_refit
    from onnx_prune.passes.surgery import apply_plan

    model = _mlp3()
    analysis = analyze_model(model, {"x": (64, 10)})
    assert len(analysis.groups) == 2
    rng = np.random.default_rng(0)
    fit = {"x": rng.normal(size=(512, 10)).astype(np.float32)}
    held = {"x": rng.normal(size=(256, 10)).astype(np.float32)}
    db = build_error_db(model, analysis, fit)
    plan = {g.name: np.sort(db.order[g.name][:12]) for g in analysis.groups}
    stitched = db.stitch(apply_plan(model, analysis, plan), analysis, plan)
    sequential = sequential_refit(model, stitched, analysis, plan, fit)
    error = lambda m: output_fidelity(model, m, held, "cpu")["mean_relative_l2_error"]
    assert error(sequential) < 0.97 * error(stitched)  # on samples it was not fitted on (0.49 vs 0.52)
    shapes = lambda m: [tuple(t.dims) for t in m.graph.initializer]
    assert shapes(sequential) == shapes(stitched)
    with pytest.raises(SequentialTooSlow):
        sequential_refit(model, stitched, analysis, plan, fit, budget_s=0.0)


def test_sequential_refit_far_over_budget_stops_before_its_dense_session(monkeypatch):
    # on BERT-large the session handing out every layer input was 3.5 GB of the recovery's peak
    from onnx_prune.passes import sequential
    from onnx_prune.passes.surgery import apply_plan

    model = _mlp3()
    analysis = analyze_model(model, {"x": (64, 10)})
    fit = {"x": np.random.default_rng(0).normal(size=(512, 10)).astype(np.float32)}
    plan = {g.name: np.arange(12) for g in analysis.groups}
    pruned = apply_plan(model, analysis, plan)
    made = []
    real = sequential.session_with_outputs
    monkeypatch.setattr(sequential, "session_with_outputs", lambda *a, **k: made.append(1) or real(*a, **k))
    with pytest.raises(sequential.SequentialTooSlow):  # a second per sample: far over a 1 s budget
        sequential.sequential_refit(model, pruned, analysis, plan, fit, budget_s=1.0, sample_s=(1.0, 0.5))
    assert not made
    sequential.sequential_refit(model, pruned, analysis, plan, fit, budget_s=60.0, sample_s=(1e-5, 1e-5))
    assert made  # within budget it runs


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sequential_refit_of_a_resnet_with_projection_shortcuts(dtype):
    """A downsampling block's 3x3 conv and 1x1 shortcut read one tensor through different patches;
    each is fitted on its own (one matrix for both crashed compile on ResNet-18-like models with
    --calib). A float16 model gets float16 weights back from both refits."""
    from onnx import numpy_helper as nh

    from onnx_prune.compiler.plans import uniform_plan
    from onnx_prune.models.registry import load
    from onnx_prune.passes.analysis import analyze_canonical
    from onnx_prune.passes.canonicalize import canonicalize
    from onnx_prune.passes.sequential import sequential_refit
    from onnx_prune.passes.surgery import apply_plan

    model = load("resnet_basic").model
    if dtype == np.float16:
        for t in model.graph.initializer:
            if t.data_type == TensorProto.FLOAT:
                t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
        for v in list(model.graph.input) + list(model.graph.output):
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
        del model.graph.value_info[:]
    canon = canonicalize(model, input_shapes={"input": (4, 3, 64, 64)})
    analysis = analyze_canonical(canon)
    plan = uniform_plan(analysis, 0.5)
    fit = {"input": np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(dtype)}
    pruned = build_error_db(canon.model, analysis, fit).stitch(apply_plan(canon.model, analysis, plan), analysis, plan)
    assert {nh.to_array(t).dtype for t in pruned.graph.initializer if t.data_type != TensorProto.INT64} == {np.dtype(dtype)}
    refitted = sequential_refit(canon.model, pruned, analysis, plan, fit)
    before = {t.name: nh.to_array(t) for t in pruned.graph.initializer}
    changed = [t.name for t in refitted.graph.initializer if not np.array_equal(nh.to_array(t), before[t.name])]
    shortcuts = {n.input[1] for n in canon.model.graph.node if "shortcut" in n.name and n.op_type == "Conv"}
    assert shortcuts and shortcuts <= set(changed) and len(changed) >= 10
    assert {nh.to_array(t).dtype for t in refitted.graph.initializer if t.name in changed} == {np.dtype(dtype)}
    from onnx_prune.compiler.fidelity import output_fidelity

    assert output_fidelity(canon.model, refitted, fit, "cpu")["mean_cosine_similarity"] > 0.5  # ORT runs it


@pytest.mark.parametrize("name", ["resnet_basic", "hf_bert"])
def test_sequential_sweep_equals_running_the_whole_model_per_layer_input(name, monkeypatch):
    """The segmented sweep (the pruned model once, a segment per layer input, each built with the
    weights refitted so far) refits as running the whole pruned model per layer input does (the
    path kept for graphs with control flow): a downsampling shortcut and attention included."""
    import onnx_prune.passes.sequential as seq
    from onnx_prune.backends.ort import random_feeds
    from onnx_prune.compiler.plans import uniform_plan
    from onnx_prune.models.registry import load
    from onnx_prune.passes.analysis import analyze_canonical
    from onnx_prune.passes.canonicalize import canonicalize
    from onnx_prune.passes.surgery import apply_plan

    zm = load(name)
    canon = canonicalize(zm.model, input_shapes=dict(zm.input_shapes))
    analysis = analyze_canonical(canon)
    plan = uniform_plan(analysis, 0.5)
    pruned = apply_plan(canon.model, analysis, plan)
    samples = random_feeds(canon.model, {k: (20,) + tuple(v[1:]) for k, v in canon.input_shapes.items()}, seed=1)
    assert seq._segmentable(pruned, {(n.input[0], ()): [] for n in pruned.graph.node if n.op_type == "MatMul"})
    swept = seq.sequential_refit(canon.model, pruned, analysis, plan, samples)
    monkeypatch.setattr(seq, "_segmentable", lambda model, stages: False)
    whole = seq.sequential_refit(canon.model, pruned, analysis, plan, samples)
    before = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    refitted = 0
    for a, b in zip(swept.graph.initializer, whole.graph.initializer):
        x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
        refitted += not np.array_equal(x, before[a.name])
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4 * max(np.abs(y).max(), 1e-6))
    assert refitted >= 8


def test_sequential_estimate_counts_runs_from_the_shapes():
    from onnx_prune.compiler.calib import batches
    from onnx_prune.passes.sequential import MAX_ROWS, _estimate_seconds

    analysis = analyze_model(_mlp3(), {"x": (64, 10)})
    stages = {n.input[0]: [(n, None)] for n in analysis.ctx.index.model.graph.node if n.op_type == "MatMul"}
    fit = {"x": np.zeros((512, 10), np.float32)}
    feeds_list = list(batches(fit, 16))  # 32 batches of 16 rows: every batch is needed
    per_stage = min(32, -(-MAX_ROWS // 16))
    # 2 s and 1 s per batch; the three layers' inputs are read in one sweep of each model, so the
    # runs count the batches once, however many layer inputs there are
    runs = _estimate_seconds(stages, feeds_list, analysis.ctx.index, (2.0, 1.0), flops_per_s=float("inf"))
    assert runs == per_stage * (2.0 + 1.0)
    # the least squares add their multiply-adds at the speed given
    slow, fast = (_estimate_seconds(stages, feeds_list, analysis.ctx.index, (2.0, 1.0), flops_per_s=r)
                  for r in (1e6, 2e6))
    assert slow - runs > 0 and slow - runs == pytest.approx(2 * (fast - runs))


def test_measured_gains_put_errors_on_the_loss_scale():
    from types import SimpleNamespace

    from onnx_prune.compiler.sensitivity import MIN_GAIN, measured_gains

    groups = [SimpleNamespace(name=n, size=8) for n in ("a", "b", "c", "d")]
    options = {g.name: [8, 6, 4, 2] for g in groups}
    errors = {"a": np.array([0, 1, 2, 3.0]), "b": np.array([0, 1, 4, 9.0]), "c": np.array([0, 1, 2, 3.0]),
              "d": np.zeros(4)}
    losses = {("a", 4): 1.0, ("b", 4): 1.0, ("c", 4): 0.0}
    probed = []

    def probe(group, width, share):
        probed.append((group.name, width))
        return losses[(group.name, width)]

    gains = measured_gains(groups, options, errors, probe)
    assert probed == [("a", 4), ("b", 4), ("c", 4)]  # half width; "d" has no error to scale
    median = np.median([0.5, 0.25])
    assert gains.tolist() == pytest.approx([0.5, 0.25, MIN_GAIN * median, median])


def test_probes_score_fewer_samples_when_all_would_overrun_their_budget():
    import time
    from types import SimpleNamespace

    from onnx_prune.compiler.sensitivity import MIN_SAMPLE_SHARE, measured_gains

    groups = [SimpleNamespace(name=str(i), size=8) for i in range(6)]
    options = {g.name: [8, 4] for g in groups}
    errors = {g.name: np.array([0.0, 1.0]) for g in groups}
    shares = []

    def probe(group, width, share):  # a probe costs 20 ms per full share of the samples
        shares.append(share)
        time.sleep(0.02 * share)
        return 1.0

    measured_gains(groups, options, errors, probe)
    assert shares == [1.0] * 6  # no budget: every probe on all samples
    shares.clear()
    measured_gains(groups, options, errors, probe, budget_s=0.0)
    assert shares == [1.0] + [MIN_SAMPLE_SHARE] * 5  # after the first, as few as allowed
    shares.clear()
    measured_gains(groups, options, errors, probe, budget_s=60.0)
    assert shares == [1.0] * 6  # room enough
