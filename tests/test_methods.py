"""Training methods (magnitude, PDP, GaP, StructADMM) through the TorchGraph bridge: every
method x pattern reaches exactly the requested pattern, in its masks and in the exported weights;
the channel pattern yields a plan that passes verify after surgery."""

import itertools

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from test_sparsity import canonical_cnn, feeds

from onnx_prune.backends.ort import make_session
from onnx_prune.backends.torch_graph import TorchGraph
from onnx_prune.passes import sparsity as sp
from onnx_prune.passes.methods import ADMM, PDP, GaP, Magnitude, make
from onnx_prune.passes.methods.admm import (project_channels, project_filters, project_nm, project_shapes,
                                            project_unstructured)
from onnx_prune.passes.methods.magnitude import cubic_schedule
from onnx_prune.passes.methods.pdp import midpoint, soft_mask
from onnx_prune.passes.methods.train import run
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import verify

torch.set_num_threads(1)
STEPS = 12  # 6 batches x 2 epochs
OPTS = {"magnitude": {"end": 0.6}, "pdp": {"start": 0.1, "ramp": 0.5}, "gap": {"kappa": 2, "rounds": 2},
        "gap-parallel": {"kappa": 2, "rounds": 1, "parallel": True}, "admm": {"iterations": 3}}


def batches(n=6):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, 8, 8, generator=g)} for _ in range(n)]


def setup(pattern):
    canon, a = canonical_cnn()
    tg = TorchGraph(canon.model)
    # N:M needs input channels divisible by M: the first conv (3 channels) stays dense
    infos = sp.prunable_weights(canon.model, skip_first=sp.parse_pattern(pattern).kind == "nm")
    return canon, a, tg, infos


def train(name, pattern, sparsity=0.6, **kw):
    canon, a, tg, infos = setup(pattern)
    cls = name.split("-")[0]
    torch.manual_seed(0)
    method = make(cls, tg.parameters_by_initializer(), infos, pattern, sparsity, STEPS, analysis=a,
                  **{**OPTS[name], **kw})
    losses = run(tg, method, batches(), epochs=2, lr=1e-2)
    assert len(losses) == STEPS and all(np.isfinite(losses))
    return canon, a, tg, infos, method


CASES = [(m, p) for m in ("magnitude", "pdp", "gap", "admm") for p in ("unstructured", "2:4", "channel")]
CASES += [("gap-parallel", "unstructured"), ("gap-parallel", "1:4"), ("admm", "filter"), ("admm", "shape")]


@pytest.mark.parametrize("name,pattern", CASES)
def test_method_reaches_exact_pattern(name, pattern):
    canon, a, tg, infos, method = train(name, pattern)
    masks = method.final_masks()
    exported = tg.export()
    arrays = sp.weight_arrays(exported)
    kind = sp.parse_pattern(pattern)
    for k, m in masks.items():  # the exported weights carry the pattern
        assert (arrays[k][~m.numpy()] == 0).all(), k
    if kind.kind == "unstructured":  # one global magnitude sort: the total is exact
        total = sum(arrays[k].size for k in infos)
        assert set(masks) == set(infos)
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
        assert sp.sparsity_report(exported, masks)["total"]["sparsity"] == pytest.approx(round(0.6 * total) / total)
    elif kind.kind == "nm":
        assert set(masks) == set(infos)
        for k, m in masks.items():
            assert sp.check_nm(m, kind.n, kind.m, infos[k].in_axis, exact=True)
        assert sp.sparsity_report(sp.write_sparse(exported, masks), masks, nm=kind)["total"]["nm_ok"]
    elif kind.kind == "channel":
        plan = method.final_plan()
        for g in a.groups:  # the same share in every group
            assert len(plan[g.name]) == g.size - round(0.6 * g.size)
        pruned = apply_plan(exported, a, plan)
        verify(exported, pruned, a, plan, feeds())
        # the trained graph with its activation masks is the pruned model
        tg.eval()
        with torch.no_grad():
            want = tg(torch.from_numpy(feeds()["x"])).numpy()
        got = make_session(pruned).run(None, feeds())[0]
        assert np.allclose(got, want, atol=1e-4 * np.abs(want).max())
    else:
        for k, m in masks.items():
            out = infos[k].out_axis
            if kind.kind == "filter":
                rows = m.movedim(out, 0).reshape(m.shape[out], -1)
                assert (rows.all(1) | (~rows).all(1)).all() and int(rows.all(1).sum()) == method.keep[k]
            else:
                cols = m.movedim(out, 0).reshape(m.shape[out], -1)
                assert (cols.all(0) | (~cols).all(0)).all() and int(cols.all(0).sum()) == method.keep[k]


@pytest.mark.parametrize("seed,name", [(5, "magnitude"), (21, "pdp"), (22, "gap"), (35, "admm")])
def test_channel_training_on_random_graphs(seed, name):
    """Multi-branch graphs (SE, concat, split, shuffle, grouped convs, x / (1 + |x|)): the trained
    graph with its activation masks equals the pruned model, which passes verify."""
    from graphgen import build_random_graph

    from onnx_prune.backends.ort import random_feeds
    from onnx_prune.passes.analysis import analyze_canonical
    from onnx_prune.passes.canonicalize import canonicalize

    rng = np.random.default_rng(seed)
    model, shapes = build_random_graph(lambda kind, k: int(rng.integers(0, k)) if k > 1 else 0, seed, 10)
    canon = canonicalize(model, input_shapes=shapes)
    a = analyze_canonical(canon)
    tg = TorchGraph(canon.model)
    method = make(name, tg.parameters_by_initializer(), sp.prunable_weights(canon.model), "channel", 0.5, 6, analysis=a)
    data = [{k: torch.from_numpy(v) for k, v in random_feeds(canon.model, shapes, seed + i).items()} for i in (1, 2, 3)]
    losses = run(tg, method, data, epochs=2)
    assert np.isfinite(losses).all()
    plan, exported = method.final_plan(), tg.export()
    assert all(np.isfinite(v).all() for v in sp.weight_arrays(exported).values())
    pruned = apply_plan(exported, a, plan)
    x = random_feeds(canon.model, shapes, seed)
    verify(exported, pruned, a, plan, x)
    tg.eval()
    with torch.no_grad():
        want = tg(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    assert np.allclose(make_session(pruned).run(None, x)[0], want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", ["magnitude", "pdp", "gap", "admm"])
def test_channel_training_on_recurrent_layers(name):
    """An LSTM's hidden units feed its next step through R's columns, inside the node: the trained
    graph masks them there too (weight hooks on R), so it still equals the pruned model; every
    method reaches the requested share in the LSTM's hidden units as in the MatMul before it."""
    from test_rules import recurrent

    from onnx_prune.backends.ort import random_feeds
    from onnx_prune.passes.analysis import analyze_canonical
    from onnx_prune.passes.canonicalize import canonicalize

    canon = canonicalize(recurrent("LSTM", hidden=8, peepholes=True))
    a = analyze_canonical(canon)
    tg = TorchGraph(canon.model)
    infos = sp.prunable_weights(canon.model)
    assert {"W", "R"} <= set(infos)
    torch.manual_seed(0)
    method = make(name, tg.parameters_by_initializer(), infos, "channel", 0.5, 6, analysis=a)
    data = [{k: torch.from_numpy(v) for k, v in random_feeds(canon.model, canon.input_shapes, i).items()}
            for i in (1, 2, 3)]
    assert np.isfinite(run(tg, method, data, epochs=2)).all()
    plan, exported = method.final_plan(), tg.export()
    assert sorted(len(kept) for kept in plan.values()) == [4, 4]  # half of 8 hidden units, half of 8 channels
    pruned = apply_plan(exported, a, plan)
    x = random_feeds(canon.model, canon.input_shapes, 0)
    verify(exported, pruned, a, plan, x)
    tg.eval()
    with torch.no_grad():
        want = tg(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    assert np.allclose(make_session(pruned).run(None, x)[0], want, atol=1e-4 * np.abs(want).max())


def test_recurrent_weight_hooks_mask_what_the_reference_masks():
    """During training a removed hidden unit must stop feeding the next step: the hook on R zeroes
    the rows and columns the masked reference zeroes (and scales them by soft masks)."""
    from test_rules import recurrent

    from onnx_prune.compiler.plans import random_plan
    from onnx_prune.passes.analysis import analyze_canonical
    from onnx_prune.passes.canonicalize import canonicalize
    from onnx_prune.passes.verify import masked_reference

    canon = canonicalize(recurrent("GRU", hidden=8, direction="bidirectional"))
    a = analyze_canonical(canon)
    plan = random_plan(a, np.random.default_rng(3))
    masks = {g.name: torch.zeros(g.size).index_fill_(0, torch.as_tensor(plan.get(g.name, np.arange(g.size))), 1.0)
             for g in a.groups}
    hooks = sp.recurrent_weight_hooks(a, lambda: masks)
    assert set(hooks) == {"R"}
    got = hooks["R"](torch.ones(2, 24, 8)).numpy() != 0
    ref = {t.name: numpy_helper.to_array(t) for t in masked_reference(canon.model, a, plan).graph.initializer}
    assert (got == np.broadcast_to(ref["R__keep"], got.shape)).all()
    soft = sp.recurrent_weight_hooks(a, lambda: {g: m * 0.5 + 0.5 for g, m in masks.items()})["R"]
    assert set(np.unique(soft(torch.ones(2, 24, 8)).numpy())) <= {0.25, 0.5, 1.0}


def test_layer_scope_and_per_layer_dict():
    _c, _a, tg, infos, method = train("magnitude", "unstructured", scope="layer")
    for k, m in method.final_masks().items():
        assert int((~m).sum()) == round(0.6 * m.numel())
    shares = {k: 0.3 + 0.1 * i for i, k in enumerate(infos)}
    _c, _a, tg, infos, method = train("pdp", "unstructured", sparsity=shares)
    for k, m in method.final_masks().items():
        assert int((~m).sum()) == round(shares[k] * m.numel())


def test_task_loss_with_labels_and_whole_layer_budget():
    canon, a, tg, infos = setup("unstructured")
    g = torch.Generator().manual_seed(0)
    data = [({"x": torch.randn(8, 3, 8, 8, generator=g)}, torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    method = make("pdp", tg.parameters_by_initializer(), infos, "unstructured", {"wf": 1.0, "w2": 0.5}, 8, scope="layer")
    losses = run(tg, method, data, epochs=2, lr=1e-2)  # cross-entropy on the logits
    assert np.isfinite(losses).all() and losses[0] > 1.0
    masks = method.final_masks()
    assert not masks["wf"].any() and int((~masks["w2"]).sum()) == masks["w2"].numel() // 2 and masks["w1"].all()


# -- magnitude ------------------------------------------------------------------------------------

def test_cubic_schedule_endpoints():
    assert cubic_schedule(0, 10, 50, 0.0, 0.9) == 0.0
    assert cubic_schedule(10, 10, 50, 0.1, 0.9) == 0.1
    assert cubic_schedule(50, 10, 50, 0.1, 0.9) == 0.9
    assert cubic_schedule(99, 10, 50, 0.1, 0.9) == 0.9
    assert cubic_schedule(30, 10, 50, 0.0, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    vals = [cubic_schedule(t, 10, 50, 0.0, 0.9) for t in range(60)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    w = {"w": torch.nn.Parameter(torch.randn(8, 8))}
    m = Magnitude(w, {"w": sp.WeightInfo("MatMul", 0, 1, (8, 8))}, "unstructured", 0.5, 20, begin=0.2, end=0.6, every=2)
    seen = []
    for i in range(20):
        m.step(i)
        seen.append(int((~m.masks["w"]).sum()))
    assert seen[:3] == [0, 0, 0] and seen[11] == 32 and seen[-1] == 32  # dense before t0, target from t_end
    assert all(b >= a for a, b in zip(seen, seen[1:]))


# -- PDP ---------------------------------------------------------------------------------------------

def test_pdp_soft_mask_gradient_formula():
    w = torch.randn(50, dtype=torch.float64, requires_grad=True)
    t, tau = torch.tensor(0.4, dtype=torch.float64), 0.05
    (soft_mask(w, t, tau) * w).sum().backward()
    m = soft_mask(w.detach(), t, tau)
    assert torch.allclose(w.grad, m + 2 * w.detach() ** 2 / tau * m * (1 - m))
    assert soft_mask(t, t, tau) == 0.5


def test_pdp_hook_detaches_threshold_and_hardens_at_t():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 6, generator=g, dtype=torch.float64))
    pdp = PDP({"w": w}, {"w": sp.WeightInfo("MatMul", 0, 1, (10, 6))}, "unstructured", 0.5, 10, start=0.0, ramp=0.1, tau=0.05)
    pdp.step(0)
    assert pdp.progress() == 1.0
    hook = pdp.weight_hooks()["w"]
    hook(w).sum().backward()
    t = midpoint(w.detach().abs().reshape(-1), 30)
    tau = 0.05 * (w.detach() ** 2).mean()
    m = soft_mask(w.detach(), t, tau)
    assert torch.allclose(w.grad, m + 2 * w.detach() ** 2 / tau * m * (1 - m))  # t and tau are constants
    pdp.harden()
    assert torch.equal(pdp.masks["w"], w.detach().abs() >= t)  # keep m >= 1/2
    assert int((~pdp.masks["w"]).sum()) == 30


def test_pdp_nm_threshold_per_run():
    w = torch.nn.Parameter(torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.1, 0.4, 0.3, 0.2]]))
    pdp = PDP({"w": w}, {"w": sp.WeightInfo("Gemm", 1, 0, (2, 4))}, "2:4", None, 4, start=0.0, ramp=0.25, tau=0.05)
    pdp.step(0)
    eff = pdp.weight_hooks()["w"](w).detach()
    m = eff / w.detach()
    tau = 0.05 * float((w.detach() ** 2).mean())  # relative to the layer's weight scale
    assert torch.allclose(m[0], soft_mask(w.detach()[0], torch.tensor(2.5), tau))  # midpoint of 2 and 3
    assert torch.allclose(m[1], soft_mask(w.detach()[1], torch.tensor(0.25), tau))  # of 0.2 and 0.3
    pdp.harden()
    assert pdp.masks["w"].tolist() == [[False, True, False, True], [False, True, True, False]]


# -- GaP ---------------------------------------------------------------------------------------------

def test_gap_rotates_partitions():
    g = torch.Generator().manual_seed(0)
    ws = {f"w{i}": torch.nn.Parameter(torch.randn(6, 4, generator=g)) for i in range(4)}
    infos = {k: sp.WeightInfo("MatMul", 0, 1, (6, 4)) for k in ws}
    gap = GaP(ws, infos, "unstructured", 0.5, 20, kappa=2, rounds=2, period=4, scope="layer")
    assert gap.parts == [["w0", "w1"], ["w2", "w3"]]
    dense = lambda: [k for k, m in gap.masks.items() if m.all()]  # noqa: E731
    assert dense() == ["w0", "w1"] and all(int((~gap.masks[k]).sum()) == 12 for k in ("w2", "w3"))
    before = {k: w.detach().clone() for k, w in ws.items()}
    assert all(torch.equal(before[k], ws[k]) for k in ws)  # building the method leaves the weights alone
    masks = {k: gap.masks[k].clone() for k in ("w2", "w3")}
    for i in range(4):
        gap.step(i)
    assert dense() == ["w2", "w3"] and all(int((~gap.masks[k]).sum()) == 12 for k in ("w0", "w1"))
    assert all((ws[k][~masks[k]] == 0).all() and torch.equal(ws[k][masks[k]], before[k][masks[k]])
               for k in ("w2", "w3"))  # grown: pruned weights restart at 0
    for i in range(4, 16):
        gap.step(i)
    assert dense() == [] and not gap.hardened  # the rest fine-tunes with fixed masks
    assert all(int((~m).sum()) == 12 for m in gap.masks.values())


def test_parallel_gap_merges_workers_partitions():
    g = torch.Generator().manual_seed(0)
    ws = {f"w{i}": torch.nn.Parameter(torch.randn(6, 4, generator=g)) for i in range(4)}
    ws["b"] = torch.nn.Parameter(torch.zeros(4))  # not pruned: averaged over workers
    infos = {k: sp.WeightInfo("MatMul", 0, 1, (6, 4)) for k in ws if k != "b"}
    gap = GaP(ws, infos, "unstructured", 0.5, 4, kappa=2, rounds=1, period=2, scope="layer", parallel=True)
    start = {k: w.detach().clone() for k, w in ws.items()}
    with torch.no_grad():  # worker 0 "trains": +1 everywhere
        for w in ws.values():
            w.add_(1.0)
    gap.step(0)
    gap.step(1)
    assert gap.optimizer_reset and gap.grown == 1
    assert all(torch.equal(ws[k], start[k] * gap.round_masks[k]) for k in ("w2", "w3"))  # fresh, regrown at 0
    assert all(torch.equal(ws[k], start[k]) for k in ("w0", "w1", "b"))  # worker 1 starts from the round's model
    grown = {k: ws[k].detach().clone() for k in ("w2", "w3")}
    with torch.no_grad():  # worker 1: +2
        for w in ws.values():
            w.add_(2.0)
    gap.step(2)
    gap.step(3)
    assert all(torch.equal(ws[k], start[k] + 1) for k in ("w0", "w1"))
    assert all(torch.equal(ws[k], grown[k] + 2) for k in ("w2", "w3"))
    assert torch.equal(ws["b"], start["b"] + 1.5)
    assert gap.grown is None and all(int((~m).sum()) == 12 for m in gap.masks.values())
    for k, m in gap.masks.items():  # each partition pruned by magnitude of its worker's weights
        assert torch.equal(m, sp.keep_top(ws[k].detach().abs(), 12))


# -- ADMM projections against brute force ------------------------------------------------------------

def _brute(v, supports):
    """Min over candidate supports of ||v - v*S||^2, and the minimiser."""
    best = min(supports, key=lambda s: float(((v * ~s) ** 2).sum()))
    return float(((v * ~best) ** 2).sum()), best


def _subsets(n, k):
    for keep in itertools.combinations(range(n), k):
        s = torch.zeros(n, dtype=torch.bool)
        s[list(keep)] = True
        yield s


def test_admm_projections_are_exact():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 4, generator=g)
    z, mask = project_unstructured(v, 3)
    d, best = _brute(v, [s.reshape(2, 4) for s in _subsets(8, 3)])
    assert float(((v - z) ** 2).sum()) == pytest.approx(d) and torch.equal(mask, best) and torch.equal(z, v * best)
    runs = list(_subsets(4, 2))
    z, mask = project_nm(v, 2, 4, 1)
    d, best = _brute(v, [torch.stack([a, b]) for a in runs for b in runs])
    assert float(((v - z) ** 2).sum()) == pytest.approx(d) and torch.equal(mask, best)
    w = torch.randn(5, 2, 2, 1, generator=g)
    z, mask = project_filters(w, 2, 0)
    d, best = _brute(w, [s.reshape(5, 1, 1, 1).expand(w.shape) for s in _subsets(5, 2)])
    assert float(((w - z) ** 2).sum()) == pytest.approx(d) and torch.equal(mask, best)
    z, mask = project_shapes(w, 3, 0)
    d, best = _brute(w, [s.reshape(1, 2, 2, 1).expand(w.shape) for s in _subsets(4, 3)])
    assert float(((w - z) ** 2).sum()) == pytest.approx(d) and torch.equal(mask, best)


def test_admm_group_channel_projection_is_exact():
    canon, a = canonical_cnn()
    vs = {k: v for k, v in sp.weight_arrays(canon.model).items() if k in ("w1", "w2", "w3", "wf")}
    vs = {k: torch.from_numpy(v.copy()) for k, v in vs.items()}
    by_prod = {tuple(sorted(g.producers)): g.name for g in a.groups}
    ga, gb = by_prod[("conv1", "conv2")], by_prod[("conv3",)]
    zs, gm = project_channels(a, vs, {ga: 3, gb: 14})

    def dist(ka, kb):  # brute force: zero the producer rows of removed channels, by hand
        z = {k: v.clone() for k, v in vs.items()}
        z["w1"][~ka] = 0
        z["w2"][~ka] = 0
        z["w3"][~kb] = 0
        return sum(float(((vs[k] - z[k]) ** 2).sum()) for k in vs), z

    best = min(((ka, kb) for ka in _subsets(8, 3) for kb in _subsets(16, 14)), key=lambda p: dist(*p)[0])
    d, zb = dist(*best)
    assert sum(float(((vs[k] - zs[k]) ** 2).sum()) for k in vs) == pytest.approx(d)
    assert torch.equal(gm[ga], best[0]) and torch.equal(gm[gb], best[1])
    assert all(torch.equal(zs[k], zb[k]) for k in vs)


def test_admm_penalty_and_dual_updates():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g))
    admm = ADMM({"w": w}, {"w": sp.WeightInfo("MatMul", 0, 1, (6, 4))}, "unstructured", 0.5, 10,
                iterations=2, retrain=0.2, rho=0.1)
    z0, _ = project_unstructured(w.detach(), 12)
    assert torch.equal(admm.Z["w"], z0)
    assert float(admm.penalty().detach()) == pytest.approx(0.05 * float(((w.detach() - z0) ** 2).sum()))
    with torch.no_grad():
        w.mul_(1.1)
    admm.step(3)  # end of the first ADMM iteration (L = 4 steps)
    z1, _ = project_unstructured(w.detach(), 12)
    assert torch.equal(admm.Z["w"], z1) and torch.allclose(admm.U["w"], w.detach() - z1)
    assert admm.rho == pytest.approx(0.2)
    admm.step(7)
    assert admm.pruned and float(admm.penalty()) == 0.0 and int((~admm.masks["w"]).sum()) == 12
    assert (w.detach()[~admm.masks["w"]] == 0).all()


def test_unsupported_pattern_and_options_are_refused():
    w = {"w": torch.nn.Parameter(torch.randn(4, 4))}
    info = {"w": sp.WeightInfo("MatMul", 0, 1, (4, 4))}
    with pytest.raises(ValueError, match="filter"):
        PDP(w, info, "filter", 0.5, 10)
    with pytest.raises(TypeError, match="unknown options"):
        Magnitude(w, info, "unstructured", 0.5, 10, tau=1)
    with pytest.raises(ValueError, match="analysis"):
        Magnitude(w, info, "channel", 0.5, 10)
