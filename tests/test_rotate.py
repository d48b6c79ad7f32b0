"""Head-wise rotation (passes/rotate.py): an exact reparametrisation that orders each head's
dimensions, so that pruning a head-dimension group keeps what matters."""

import numpy as np
import pytest

import onnx_prune
from onnx_prune.backends.ort import make_session
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.heads import find_heads
from onnx_prune.passes.rotate import rotate_heads
from onnx_prune.passes.surgery import apply_plan

torch = pytest.importorskip("torch")

HEADS, HEAD, WIDTH, TOKENS = 4, 8, 32, 6


class Attention(torch.nn.Module):
    """One self-attention block with an FFN; `rope_like` puts a rotate-half on the queries and keys;
    `packed` computes Q | K | V in one projection and unbinds them ("unbind": timm's ViT) or splits
    the projection's output ("split": GPT-2)."""

    def __init__(self, rope_like=False, packed=False):
        super().__init__()
        torch.manual_seed(0)  # the output and FFN layers' initialisation
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.up, self.down = torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.Linear(4 * WIDTH, WIDTH)
        with torch.no_grad():
            # each head's weights are a few strong directions, scrambled by a random rotation
            # inside the head: no coordinate carries them alone
            for lin in (self.q, self.k, self.v):
                for h in range(HEADS):
                    rot = torch.linalg.qr(torch.randn(HEAD, HEAD, generator=g))[0]
                    scale = torch.logspace(0, -2, HEAD)
                    lin.weight[h * HEAD:(h + 1) * HEAD] = rot @ (scale[:, None] * torch.randn(HEAD, WIDTH, generator=g))
                lin.bias.normal_(0, 0.1, generator=g)
        self.rope_like, self.packed = rope_like, packed

    def heads(self, x):
        return x.view(x.shape[0], TOKENS, HEADS, HEAD).transpose(1, 2)

    def forward(self, x):
        if self.packed:
            w = torch.cat([self.q.weight, self.k.weight, self.v.weight])
            b = torch.cat([self.q.bias, self.k.bias, self.v.bias])
            qkv = torch.nn.functional.linear(x, w, b)
            if self.packed == "split":
                q, k, v = (self.heads(part) for part in qkv.split(WIDTH, dim=-1))
            else:
                q, k, v = qkv.reshape(x.shape[0], TOKENS, 3, HEADS, HEAD).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        if self.rope_like:
            q = torch.cat([-q[..., HEAD // 2:], q[..., :HEAD // 2]], -1) + q
            k = torch.cat([-k[..., HEAD // 2:], k[..., :HEAD // 2]], -1) + k
        att = torch.softmax(q @ k.transpose(-1, -2) / HEAD ** 0.5, -1)
        h = x + self.o((att @ v).transpose(1, 2).reshape(x.shape[0], TOKENS, WIDTH))
        return h + self.down(torch.relu(self.up(h)))


def _setup(rope_like=False, packed=False):
    x = torch.randn(1, TOKENS, WIDTH)
    model = onnx_prune.from_torch(Attention(rope_like, packed).eval(), x)
    canon = canonicalize(model, input_shapes={model.graph.input[0].name: (16, TOKENS, WIDTH)})
    analysis = analyze_canonical(canon)
    name = model.graph.input[0].name
    samples = {name: np.random.default_rng(1).standard_normal((64, TOKENS, WIDTH)).astype(np.float32)}
    return canon, analysis, samples


def _run(model, feeds):
    return make_session(model).run(None, feeds)[0]


def _halve_head_dims(analysis, names):
    """Keep the first half of every head's dimensions in the groups `names`, all else."""
    return {g.name: np.arange(g.size // 2 if g.name in names else g.size) for g in analysis.groups}


@pytest.mark.parametrize("packed", [False, "unbind", "split"])
def test_rotation_keeps_the_function_and_makes_half_the_head_dims_carry_more(packed):
    canon, analysis, samples = _setup(packed=packed)
    feeds = {k: v[:16] for k, v in samples.items()}
    dense = _run(canon.model, feeds)
    kinds = {c.name: c.kind for c in find_heads(analysis)}
    # not the FFN (one block, a Relu between), nor the heads' own group
    assert sorted(kinds.values()) == (["packed"] if packed == "unbind" else ["query/key", "value/output"])
    plans = {name: _halve_head_dims(analysis, [name]) for name in kinds}

    def errors():
        return {name: np.abs(_run(apply_plan(canon.model, analysis, plan), feeds) - dense).mean()
                for name, plan in plans.items()}

    before = errors()
    rotation = rotate_heads(canon.model, analysis, samples)

    assert sorted(rotation.rotated) == sorted(kinds) and not rotation.put_back
    assert np.abs(_run(canon.model, feeds) - dense).max() <= 1e-4 * np.abs(dense).max()
    after = errors()
    assert all(after[name] < 0.5 * before[name] for name in kinds), (before, after)  # measured: 0.03-0.09 of it


def test_a_rotary_like_head_is_left_as_it_is():
    canon, analysis, samples = _setup(rope_like=True)
    kinds = {c.name: c.kind for c in find_heads(analysis)}
    assert sorted(kinds.values()) == ["value/output"]  # the concat of halves does not commute with a rotation
    weights = {t.name: t.SerializeToString() for t in canon.model.graph.initializer}
    rotation = rotate_heads(canon.model, analysis, samples)
    changed = {t.name for t in canon.model.graph.initializer if t.SerializeToString() != weights[t.name]}
    assert rotation.rotated == list(kinds)
    assert len(changed) == 3  # the value weight and bias, the output weight; the queries and keys stay


def test_compile_with_calibration_rotates_heads_and_still_verifies(tmp_path):
    from onnx_prune.compiler.compile import compile_model
    from onnx_prune.compiler.summary import markdown

    x = torch.randn(1, TOKENS, WIDTH)
    model = onnx_prune.from_torch(Attention().eval(), x)
    name = model.graph.input[0].name
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{name: np.random.default_rng(1).standard_normal((40, TOKENS, WIDTH)).astype(np.float32)})
    result = compile_model(model, 1.3, calib=str(calib), input_shapes={name: (8, TOKENS, WIDTH)},
                           timer=lambda dense, pruned, feeds: (1.35, 10.0, 10.0 / 1.35))
    report = result.report
    assert len(report["head_rotation"]["groups"]) == 2
    # the plan on the rotated model against its mask (before recovery changed the weights, if it did)
    assert report.get("max_abs_error_before_recovery", report["max_abs_error_vs_masked_reference"]) < 1e-3
    assert "head rotation | 2 head-dimension groups" in markdown(report, {})


def test_data_free_compile_rotates_on_random_inputs():
    from onnx_prune.compiler.compile import compile_model
    from onnx_prune.compiler.summary import markdown

    x = torch.randn(1, TOKENS, WIDTH)
    model = onnx_prune.from_torch(Attention().eval(), x)
    result = compile_model(model, 1.3, input_shapes={model.graph.input[0].name: (8, TOKENS, WIDTH)},
                           timer=lambda dense, pruned, feeds: (1.35, 10.0, 10.0 / 1.35))
    rotation = result.report["head_rotation"]
    assert len(rotation["groups"]) == 2 and rotation["statistics"] == "random inputs"
    assert result.report["max_abs_error_vs_masked_reference"] < 1e-3  # against the rotated model
    assert "weighted by random inputs" in markdown(result.report, {})


def test_rotated_groups_rank_best_first_whatever_their_weights_magnitude():
    from onnx_prune.passes.importance import group_scores, keep_top

    canon, analysis, samples = _setup()
    rotation = rotate_heads(canon.model, analysis, samples)
    raw = group_scores(analysis)
    ranked = rotation.ranked(raw)
    for g in analysis.groups:
        if g.name in rotation.rotated:
            assert list(keep_top(ranked[g.name], g.size // 2)) == list(range(g.size // 2))
            assert sorted(ranked[g.name]) == sorted(raw[g.name])  # the same values: global ranking keeps its units
        else:
            assert ranked[g.name] is raw[g.name]


def test_the_error_database_reads_a_rotated_query_key_group_by_the_logits_it_carries():
    from onnx_prune.passes.errordb import build_error_db

    canon, analysis, samples = _setup()
    rotation = rotate_heads(canon.model, analysis, samples)
    (name, energy), = rotation.logit_energy.items()
    assert {c.name: c.kind for c in find_heads(analysis)}[name] == "query/key"
    assert np.all(np.diff(energy) <= 0) and energy[-1] < 0.1 * energy[0]  # the weights' decaying scales
    db = build_error_db(canon.model, analysis, samples, channel_energy=rotation.logit_energy)
    assert list(db.order[name]) == list(range(HEAD))  # the rotated order: first dimensions first
    tail = energy[::-1].cumsum()[::-1] / energy.sum()  # what dropping from each width on loses
    assert np.allclose(db.curve[name], np.append(tail, 0.0))


def test_grouped_query_values_rotate_and_rotary_queries_keys_stay_in_a_llama():
    from onnx_prune.models.registry import load

    entry = load("hf_llama_gqa")  # 4 query heads share 2 key/value heads; rotary queries and keys
    canon = canonicalize(entry.model, input_shapes=entry.input_shapes)
    analysis = analyze_canonical(canon)
    feeds = entry.make_feeds()
    dense = _run(canon.model, feeds)
    rotation = rotate_heads(canon.model, analysis, feeds)
    assert len(rotation.rotated) == 2 and all("v_proj" in name for name in rotation.rotated)  # one per layer
    assert np.abs(_run(canon.model, feeds) - dense).max() <= 1e-4 * np.abs(dense).max()


def test_a_rotation_that_moves_the_outputs_is_put_back_whole(monkeypatch):
    import onnx_prune.passes.rotate as rotate

    canon, analysis, samples = _setup()
    weights = {t.name: t.SerializeToString() for t in canon.model.graph.initializer}
    # the check sees the outputs moved (as a graph the path check misread would): nan, then 1%
    for moved in (lambda y: y * np.nan, lambda y: y * 1.01):
        monkeypatch.setattr(rotate, "_outputs", lambda model, feeds, moved=moved: [
            moved(y) for y in make_session(model).run(None, feeds)])
        rotation = rotate_heads(canon.model, analysis, samples)
        assert rotation.rotated == [] and len(rotation.put_back) == 2 and not rotation.logit_energy
        assert {t.name: t.SerializeToString() for t in canon.model.graph.initializer} == weights
