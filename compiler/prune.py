"""`prune`: the uniform baseline. Every prunable group loses the same share of its channels,
lowest importance first, and the result is verified before anyone sees it."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_prune.backends.ort import check_runs, random_feeds
from onnx_prune.errors import UserError
from onnx_prune.passes.analysis import Analysis, analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.importance import KINDS as IMPORTANCE_KINDS
from onnx_prune.compiler.plans import uniform_plan
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import verify as verify_model


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: dict
    plan: dict
    analysis: Analysis


def check_ratio(ratio: float):
    # numbers.Real: numpy's float32 too; a string is refused, not read
    if isinstance(ratio, bool) or not (isinstance(ratio, numbers.Real) and 0.0 < float(ratio) < 1.0):
        raise UserError(f"--ratio must be a number between 0 and 1 (exclusive), got {ratio!r}")


def prune_uniform(model, ratio, importance="l2", input_shapes=None, verify=True, seed=0) -> PruneResult:
    check_ratio(ratio)
    if importance not in IMPORTANCE_KINDS:
        raise UserError(f"unknown importance '{importance}' (choose: {', '.join(IMPORTANCE_KINDS)})")
    canon = canonicalize(model, input_shapes=input_shapes)
    analysis = analyze_canonical(canon)
    if not analysis.groups:  # as compile says: a copy of the input is not what was asked for
        raise UserError(analysis.nothing_prunable())
    plan = uniform_plan(analysis, ratio, importance)
    pruned = apply_plan(canon.model, analysis, plan)
    report = build_report(analysis, plan, canon.notes)
    report.update(method="uniform", ratio=ratio, importance=importance)
    if verify:
        feeds = random_feeds(canon.model, canon.input_shapes, seed)
        check_runs(canon.model, feeds)
        v = verify_model(canon.model, pruned, analysis, plan, feeds)
        report["max_abs_error_vs_masked_reference"] = v.max_abs_error
        report["verification"] = v.checks
    else:
        report["max_abs_error_vs_masked_reference"] = None
    return PruneResult(pruned, report, plan, analysis)


def build_report(analysis: Analysis, plan: dict, notes=()) -> dict:
    total = sum(g.size for g in analysis.groups)
    kept = sum(len(plan.get(g.name, range(g.size))) for g in analysis.groups)
    return {
        "groups": [
            {"name": g.name, "channels": g.size, "kept": int(len(plan.get(g.name, range(g.size)))),
             "producers": g.producers, "consumers": g.consumers}
            for g in analysis.groups
        ],
        "channels_total": total,
        "channels_kept": kept,
        "coverage": analysis.coverage(),
        "notes": list(notes),
        "kept_indices": {k: np.asarray(v).tolist() for k, v in plan.items()},
    }
