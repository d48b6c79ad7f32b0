"""verify catches a pruned model that is not the masked reference's, even where a plan cancels."""

import numpy as np
import pytest

from onnx_prune.backends.ort import random_feeds
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import VerificationError, verify
from test_rules import CASES


def _instance_norm_case():
    canon = canonicalize(CASES["instance_norm"]())
    analysis = analyze_canonical(canon)
    (group,) = [g.name for g in analysis.groups if g.size == 8]
    return canon.model, analysis, group, random_feeds(canon.model, canon.input_shapes)


def test_channels_other_than_the_plans_are_a_mismatch():
    """The same widths with other channels kept: the emitted model is not the plan's."""
    model, analysis, group, feeds = _instance_norm_case()
    pruned = apply_plan(model, analysis, {group: np.array([0, 1, 2, 3])})
    verify(model, pruned, analysis, {group: np.array([0, 1, 2, 3])}, feeds)
    with pytest.raises(VerificationError, match="differs from the masked reference"):
        verify(model, pruned, analysis, {group: np.array([4, 5, 6, 7])}, feeds)
