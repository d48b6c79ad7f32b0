"""Property: on random multi-branch graphs of supported ops, any plan is masked-equivalent."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from graphgen import build_random_graph
from onnx_prune.backends.ort import random_feeds
from onnx_prune.compiler.plans import full_plan, random_plan
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.rules import RULE_FAILED
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import VerificationError, compare_outputs, verify

EXAMPLES = int(os.environ.get("ONNX_PRUNE_HYPOTHESIS_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data(), st.integers(0, 2**31 - 1), st.integers(1, 12), st.sampled_from(["mixed", "keep1", "random"]))
def test_random_graph_masked_equivalence(data, seed, n_ops, mode):
    def draw(kind, n):
        return data.draw(st.integers(0, n - 1), label=kind) if n > 1 else 0

    verify(*prune_random_graph(draw, seed, n_ops, mode))  # raises on any mismatch


def prune_random_graph(draw, seed, n_ops, mode):
    """verify's arguments for the graph that `draw` builds: it canonicalized, the model pruned by
    a `mode` plan, the analysis, the plan and random feeds."""
    model, shapes = build_random_graph(draw, seed, n_ops)
    canon = canonicalize(model, input_shapes=shapes)
    feeds = random_feeds(canon.model, shapes, seed)
    err, scale = compare_outputs(model, canon.model, feeds)
    # plus float32 rounding of the unit-scale values behind an output that averages them to ~1e-3
    # (Conv, BatchNorm, GlobalAveragePool: 1.4e-8 apart once the dead branches are gone)
    assert err <= 1e-5 * scale + 1e-6, "canonicalization changed outputs"
    analysis = analyze_canonical(canon)
    assert not [f.reason for f in analysis.frozen if RULE_FAILED in f.reason]
    plan = random_plan(analysis, np.random.default_rng(seed), mode)
    pruned = apply_plan(canon.model, analysis, plan)
    return canon.model, pruned, analysis, plan, feeds


def test_plan_that_cancels_the_output_verifies():
    """A drawn graph (Conv into four BatchNorms, Add, GlobalAveragePool, Gemm) whose keep-one plan
    leaves 6.9e-7 of a dense 0.46 output, 1.2e-8 off the masked reference by float32 rounding of
    its unit-scale intermediates: verify allows that rounding at the dense output's scale, and
    no more."""
    draws = iter([1, 1, 1] + [0] * 21 + [1, 0, 1, 0, 3, 1, 2])
    model, pruned, analysis, plan, feeds = prune_random_graph(
        lambda kind, n: min(next(draws), n - 1) if n > 1 else 0, 1040, 10, "keep1")
    result = verify(model, pruned, analysis, plan, feeds)
    assert result.output_scale < 1e-5  # the cancellation this case is about
    assert result.max_abs_error > 1e-4 * result.output_scale
    assert result.max_abs_error <= result.allowed < 1e-6
    (bias,) = [t for t in pruned.graph.initializer if t.name == "bf_56"]  # the Gemm's
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1e-5), bias.name))
    with pytest.raises(VerificationError, match="differs from the masked reference"):
        verify(model, pruned, analysis, plan, feeds)


@settings(max_examples=max(20, EXAMPLES // 10), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data(), st.integers(0, 2**31 - 1))
def test_random_graph_identity_plan_is_exact(data, seed):
    def draw(kind, n):
        return data.draw(st.integers(0, n - 1), label=kind) if n > 1 else 0

    model, shapes = build_random_graph(draw, seed, 8)
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    pruned = apply_plan(canon.model, analysis, full_plan(analysis))
    assert pruned.graph.SerializeToString() == canon.model.graph.SerializeToString()
