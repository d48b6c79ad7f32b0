"""Sparsity patterns as data: prunable weights, masks, channel mapping, sparse output, report."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from onnx_prune.backends.ort import make_session
from onnx_prune.passes import sparsity as sp
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import masked_reference, verify
from tiny_models import residual_cnn

torch.set_num_threads(1)




def canonical_cnn():
    canon = canonicalize(residual_cnn(), input_shapes={"x": (2, 3, 8, 8)})
    return canon, analyze_canonical(canon)


def feeds(n=2, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def tensors(model):
    return {k: torch.from_numpy(v.copy()) for k, v in sp.weight_arrays(model).items()}


# -- prunable weights ----------------------------------------------------------------------------

def test_prunable_weights_axes():
    n = helper.make_node
    inits = [numpy_helper.from_array(np.ones(s, np.float32), k) for k, s in
             [("wc", (4, 2, 3, 3)), ("wt", (4, 6, 3, 3)), ("wg", (5, 6)), ("wm", (5, 7)), ("wg2", (7, 3))]]
    nodes = [n("Conv", ["x", "wc"], ["a"], name="c", group=1), n("ConvTranspose", ["a", "wt"], ["b"], name="t"),
             n("Gemm", ["u", "wg"], ["v"], name="g", transB=1), n("MatMul", ["v", "wm"], ["z"], name="m"),
             n("Gemm", ["z", "wg2"], ["q"], name="g2")]
    g = helper.make_graph(nodes, "g", [], [], inits)
    infos = sp.prunable_weights(helper.make_model(g))
    got = {k: (v.op, v.in_axis, v.out_axis) for k, v in infos.items()}
    assert got == {"wc": ("Conv", 1, 0), "wt": ("ConvTranspose", 0, 1), "wg": ("Gemm", 1, 0),
                   "wm": ("MatMul", 0, 1), "wg2": ("Gemm", 0, 1)}
    assert list(sp.prunable_weights(helper.make_model(g), skip_first=True, skip_last=True)) == ["wt", "wg", "wm"]


def test_parse_pattern():
    assert sp.parse_pattern("2:4") == sp.Pattern("nm", 2, 4)
    assert sp.parse_pattern(("nm", 1, 4)) == sp.Pattern("nm", 1, 4)
    assert sp.parse_pattern("column").kind == "shape"
    with pytest.raises(ValueError):
        sp.parse_pattern("4:2")


# -- unstructured and N:M --------------------------------------------------------------------------

def test_unstructured_exact_and_largest():
    g = torch.Generator().manual_seed(0)
    ws = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, 11, generator=g) * 3}
    total = 35 + 33
    for s in (0.0, 0.3, 0.77, 0.95):
        masks = sp.unstructured_masks(ws, s, "global")
        assert sum(int((~m).sum()) for m in masks.values()) == round(s * total)
        kept = torch.cat([w[m].abs() for w, m in zip(ws.values(), masks.values())])
        pruned = torch.cat([w[~m].abs() for w, m in zip(ws.values(), masks.values())])
        if len(kept) and len(pruned):
            assert kept.min() >= pruned.max()
        masks = sp.unstructured_masks(ws, s, "layer")
        for k, w in ws.items():
            assert int((~masks[k]).sum()) == round(s * w.numel())
    masks = sp.unstructured_masks(ws, {"a": 0.5, "b": 0.1}, "layer")
    assert int((~masks["a"]).sum()) == round(0.5 * 35) and int((~masks["b"]).sum()) == round(0.1 * 33)


def test_nm_masks_exact_along_input_axis():
    g = torch.Generator().manual_seed(0)
    ws = {"conv": torch.randn(6, 8, 3, 3, generator=g), "gemmT": torch.randn(5, 12, generator=g),
          "matmul": torch.randn(8, 6, generator=g)}
    infos = {"conv": sp.WeightInfo("Conv", 1, 0, (6, 8, 3, 3)), "gemmT": sp.WeightInfo("Gemm", 1, 0, (5, 12)),
             "matmul": sp.WeightInfo("MatMul", 0, 1, (8, 6))}
    masks = sp.nm_masks(ws, infos, 2, 4)
    for k, m in masks.items():
        ax = infos[k].in_axis
        assert sp.check_nm(m, 2, 4, ax, exact=True)
        assert not sp.check_nm(torch.ones_like(m), 2, 4, ax)
        # top-2 |w| of each run: every kept weight beats every pruned one in its run
        w = sp.nm_view(ws[k].abs(), ax, 4)
        mv = sp.nm_view(m, ax, 4)
        kept_min = torch.where(mv, w, torch.full_like(w, np.inf)).min(-1).values
        pruned_max = torch.where(~mv, w, torch.full_like(w, -np.inf)).max(-1).values
        assert (kept_min >= pruned_max).all()
    assert sp.check_nm(masks["conv"].movedim(1, 0), 2, 4, 0, exact=True)


def test_nm_indivisible_raises_or_stays_dense():
    ws = {"a": torch.randn(4, 3, 3, 3), "b": torch.randn(4, 8, 1, 1)}
    infos = {"a": sp.WeightInfo("Conv", 1, 0, (4, 3, 3, 3)), "b": sp.WeightInfo("Conv", 1, 0, (4, 8, 1, 1))}
    with pytest.raises(ValueError, match="divisible"):
        sp.nm_masks(ws, infos, 2, 4)
    with pytest.warns(UserWarning, match="left dense"):
        masks = sp.nm_masks(ws, infos, 2, 4, on_indivisible="dense")
    assert list(masks) == ["b"]


def test_filter_and_shape_masks():
    w = torch.randn(6, 4, 3, 3)
    f = sp.filter_mask(w, 2, 0)
    assert f.all(dim=(1, 2, 3)).sum() == 2 and (~f).all(dim=(1, 2, 3)).sum() == 4
    s = sp.shape_mask(w, 5, 0)
    assert s.all(dim=0).sum() == 5 and (s.any(dim=0) == s.all(dim=0)).all()


# -- channel groups -----------------------------------------------------------------------------

def test_channel_scores_are_producer_l2():
    canon, a = canonical_cnn()
    ws = tensors(canon.model)
    scores = sp.channel_scores(a, ws)
    by_prod = {tuple(sorted(g.producers)): g.name for g in a.groups}
    shared = by_prod[("conv1", "conv2")]
    want = (ws["w1"].pow(2).sum((1, 2, 3)) + ws["w2"].pow(2).sum((1, 2, 3))).sqrt()
    assert torch.allclose(scores[shared], want)
    assert torch.allclose(scores[by_prod[("conv3",)]], ws["w3"].pow(2).sum((1, 2, 3)).sqrt())
    w1 = ws["w1"].clone().requires_grad_(True)
    sp.channel_scores(a, {**ws, "w1": w1})[shared].sum().backward()
    assert w1.grad is not None and w1.grad.abs().sum() > 0


def test_value_masks_follow_masked_reference():
    canon, a = canonical_cnn()
    rng = np.random.default_rng(0)
    plan = {g.name: np.sort(rng.choice(g.size, g.size // 2, replace=False)) for g in a.groups}
    ref = masked_reference(canon.model, a, plan)
    want = {t.name[:-len("__keep")]: numpy_helper.to_array(t) for t in ref.graph.initializer if t.name.endswith("__keep")}
    gm = {g.name: torch.zeros(g.size).index_fill_(0, torch.as_tensor(plan[g.name]), 1.0) for g in a.groups}
    hooks = sp.group_value_masks(a, gm)
    shapes = {vi.name: sp_shape(vi) for vi in list(canon.static.graph.value_info) + list(canon.static.graph.output)}
    for name, hook in hooks.items():
        got = hook(torch.ones(shapes[name])).numpy() != 0
        expect = np.broadcast_to(want.get(name, np.ones((), bool)), shapes[name])
        assert (got == expect).all(), name
    assert set(want) <= set(hooks)
    # soft masks are floats on the same positions
    soft = sp.group_value_masks(a, {g: m * 0.5 + 0.25 for g, m in gm.items()})
    name = next(iter(soft))
    assert set(np.unique(soft[name](torch.ones(shapes[name])).numpy())) == {0.25, 0.75}


def sp_shape(vi):
    return tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)


def test_channel_plan_passes_verify():
    canon, a = canonical_cnn()
    scores = sp.channel_scores(a, tensors(canon.model))
    masks = sp.channel_masks(scores, 0.5, "layer")
    for g in a.groups:
        assert int((~masks[g.name]).sum()) == round(0.5 * g.size)
    plan = sp.channel_plan(a, masks)
    pruned = apply_plan(canon.model, a, plan)
    verify(canon.model, pruned, a, plan, feeds())
    gmasks = sp.channel_masks(scores, 0.4, "global")
    total = sum(g.size for g in a.groups)
    assert sum(int((~m).sum()) for m in gmasks.values()) == round(0.4 * total)
    with pytest.raises(ValueError):
        sp.channel_plan(a, {a.groups[0].name: torch.zeros(a.groups[0].size)})


def test_group_weight_masks_cover_producers_and_consumers():
    canon, a = canonical_cnn()
    by_prod = {tuple(sorted(g.producers)): g for g in a.groups}
    g = by_prod[("conv1", "conv2")]
    keep = torch.ones(g.size, dtype=torch.bool)
    keep[[1, 5]] = False
    wm = sp.group_weight_masks(a, {g.name: keep}, ["w1", "w2", "w3", "b1"])
    assert (~wm["w1"][[1, 5]]).all() and wm["w1"][keep].all()
    assert (~wm["w2"][:, [1, 5]]).all() and (~wm["w2"][[1, 5]]).all()
    assert (~wm["w3"][:, [1, 5]]).all() and wm["w3"][:, keep].all()
    prod_only = sp.group_weight_masks(a, {g.name: keep}, ["w2"], roles=("producer",))
    assert prod_only["w2"][:, [1, 5]][keep].all()


# -- output --------------------------------------------------------------------------------------

def test_write_sparse_exact_zeros_and_ort_loads_sparse_initializers():
    model = residual_cnn()
    infos = sp.prunable_weights(model)
    ws = {k: v for k, v in tensors(model).items() if k in infos}
    masks = sp.unstructured_masks(ws, 0.8, "layer")
    dense = sp.write_sparse(model, masks)
    arrays = sp.weight_arrays(dense)
    for k, m in masks.items():
        w = arrays[k]
        assert (w[~m.numpy()] == 0).all() and not np.signbit(w[~m.numpy()]).any()
        assert np.array_equal(w[m.numpy()], numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == k))[m.numpy()])
    small = sp.write_sparse(model, masks, sparse_initializers=True)
    assert {s.values.name for s in small.graph.sparse_initializer} == {k for k in masks}
    assert small.ByteSize() < dense.ByteSize()
    onnx.checker.check_model(small)  # the full check's shape inference types them as sparse tensors
    x = feeds(3)
    a, b = make_session(dense).run(None, x)[0], make_session(small).run(None, x)[0]
    assert np.array_equal(a, b)
    for k in masks:
        assert np.array_equal(sp.weight_arrays(small)[k], arrays[k])


def test_sparse_initializers_only_where_smaller():
    model = residual_cnn()
    ws = tensors(model)
    masks = {"w2": sp.keep_top(ws["w2"].abs(), ws["w2"].numel() // 2)}  # 50%: sparse storage is larger
    out = sp.write_sparse(model, masks, sparse_initializers=True)
    assert len(out.graph.sparse_initializer) == 0
    with pytest.raises(KeyError):
        sp.write_sparse(model, {"nope": masks["w2"]})


def test_sparsity_report_counts_and_nm():
    model = residual_cnn()
    infos = sp.prunable_weights(model, skip_first=True)
    ws = {k: v for k, v in tensors(model).items() if k in infos}
    masks = sp.nm_masks(ws, infos, 2, 4)
    out = sp.write_sparse(model, masks)
    rep = sp.sparsity_report(out, masks, nm=(2, 4))
    assert rep["nm"] == "2:4" and rep["total"]["nm_ok"] and rep["total"]["mask_respected"]
    assert rep["total"]["sparsity"] == pytest.approx(0.5)
    for k in masks:
        assert rep["layers"][k]["kept"] == ws[k].numel() // 2
    # 1:4 is sparse enough for sparse initializers; the report reads them too
    masks = sp.nm_masks(ws, infos, 1, 4)
    small = sp.write_sparse(model, masks, sparse_initializers=True)
    assert len(small.graph.sparse_initializer) == len(masks)
    rep = sp.sparsity_report(small, masks, nm=(1, 4))
    assert rep["total"]["nm_ok"] and rep["total"]["sparsity"] == pytest.approx(0.75)
    # the unmasked model does not respect the masks nor N:M
    rep = sp.sparsity_report(model, masks, nm=(2, 4))
    assert not rep["total"]["mask_respected"] and not rep["total"]["nm_ok"]


def test_keep_top_ties_and_split_counts():
    m = sp.keep_top(torch.zeros(5), 2)
    assert m.tolist() == [True, True, False, False, False]
    counts = sp.split_counts(3, {"a": 2, "b": 3}, {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([0.5, 2.0, 9.0])})
    assert counts == {"a": 1, "b": 2}
