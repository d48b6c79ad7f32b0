"""`compile`: the least-pruned plan whose *measured* speedup meets the target.

    canonicalize -> analyze -> profile + timing database -> candidate widths -> importance
    -> search (uniform | global | spdy) on the predicted latency -> surgery -> verify
    -> measure dense vs pruned side by side -> tighten and search again if short -> report

A speedup is only reported if it was measured; if the target cannot be met the run fails with
the largest speedup it measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_prune.backends.measure import measure
from onnx_prune.backends.ort import make_session, random_feeds
from onnx_prune.backends.predict import CostModel
from onnx_prune.compiler.calib import batches, load_calibration
from onnx_prune.compiler.prune import build_report
from onnx_prune.compiler.search import search_global, search_spdy, search_uniform
from onnx_prune.errors import TargetNotMet, UserError
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.importance import group_scores
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import verify

METHODS = {"uniform": search_uniform, "global": search_global, "spdy": search_spdy}
MAX_ROUNDS = 6
OVERSHOOT_MARGIN = 1.02  # aim a little above the target: measurements scatter by about 2%
MAX_OVERSHOOT = 1.10  # a 2x request that delivers much more wasted accuracy: search again


@dataclass
class CompileResult:
    model: onnx.ModelProto
    report: dict
    plan: dict


def parse_speedup(text) -> float:
    """'2x', '2', '1.5X' -> float > 1."""
    try:
        value = float(str(text).lower().rstrip("x"))
    except ValueError:
        raise UserError(f"--target-speedup '{text}' is not a number like 2x") from None
    if not value > 1.0:
        raise UserError(f"--target-speedup must be above 1x, got {text}")
    return value


def measured_speedup(dense, pruned, feeds, provider, threads):
    """Dense latency / pruned latency, interleaved side by side; also both medians."""
    result = measure([dense, pruned], feeds, provider=provider, threads=threads, blocks=8)
    return result.ratio, result.latencies[0].median_ms, result.latencies[1].median_ms


def compile_model(model, target_speedup, provider="cpu", threads=None, calib=None, preprocess=None,
                  input_shapes=None, method="spdy", search="fast", batch_size=None, timer=None,
                  log=lambda msg: None) -> CompileResult:
    """Compile `model` (path or ModelProto). `timer(dense, pruned, feeds)` -> (speedup, dense ms,
    pruned ms) replaces the real measurement in tests."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (choose: {', '.join(METHODS)})")
    if search != "fast":
        raise UserError(f"--search {search} is not available yet (only 'fast': SPDY's DP on raw errors)")
    target = parse_speedup(target_speedup)
    t0 = time.time()
    notes = []
    canon = canonicalize(model, input_shapes=input_shapes)
    if batch_size:
        _rebatch(canon, batch_size)
    analysis = analyze_canonical(canon.static)
    if not analysis.groups:
        raise UserError("nothing in this model can be pruned (run `onnx-prune analyze` to see why)")
    samples = load_calibration(calib, canon.model, preprocess) if calib is not None else None
    feeds = _timing_feeds(canon, samples, batch_size, notes)
    log(f"canonicalized and analysed: {len(analysis.groups)} groups ({time.time() - t0:.1f}s)")
    cm = CostModel(canon.model, analysis, feeds, provider=provider, threads=threads)
    widths = cm.candidate_widths()
    log(f"profiled and timing database ready: {cm.db.measured} new points ({time.time() - t0:.1f}s)")
    scores = group_scores(analysis)
    smallest = {g.name: np.arange(min(widths[g.name])) for g in analysis.groups}
    reachable = cm.dense_ms / cm.predict_ms(smallest)
    if target > reachable * 1.15:
        raise UserError(f"target {target:g}x is out of reach: pruning every group to its smallest useful width "
                        f"predicts {reachable:.2f}x on {provider}")
    timer = timer or (lambda d, p, f: measured_speedup(d, p, f, provider, threads))
    goal = target * OVERSHOOT_MARGIN
    rounds, tried = [], []
    short_goal = long_goal = None  # largest goal measured short, smallest goal measured enough
    for r in range(MAX_ROUNDS):
        plan = METHODS[method](cm, analysis, widths, cm.dense_ms / goal, scores)
        predicted = cm.predicted_speedup(plan)
        pruned = apply_plan(canon.model, analysis, plan)
        check = verify(canon.model, pruned, analysis, plan, feeds)
        speedup, dense_ms, pruned_ms = timer(canon.model, pruned, feeds)
        rounds.append({"goal": goal, "predicted_speedup": predicted, "measured_speedup": speedup})
        tried.append((speedup, plan, pruned, check, dense_ms, pruned_ms, predicted))
        log(f"round {r + 1}: goal {goal:.2f}x, predicted {predicted:.2f}x, measured {speedup:.2f}x")
        if speedup >= target:
            long_goal = goal if long_goal is None else min(long_goal, goal)
            if speedup <= MAX_OVERSHOOT * target:
                break
        else:
            short_goal = goal if short_goal is None else max(short_goal, goal)
        goal = _next_goal(goal, speedup, target, short_goal, long_goal)
    met = [t for t in tried if t[0] >= target]
    # least pruning that meets the target (every extra channel removed costs accuracy)
    speedup, plan, pruned, check, dense_ms, pruned_ms, predicted = min(met, key=lambda t: t[0]) if met else \
        max(tried, key=lambda t: t[0])
    report = build_report(analysis, plan, canon.notes + notes)
    report.update({
        "target_speedup": target, "measured_speedup": speedup, "predicted_speedup": predicted,
        "dense_latency_ms": dense_ms, "pruned_latency_ms": pruned_ms, "provider": provider,
        "batch_size": int(next(iter(feeds.values())).shape[0]), "threads": threads, "method": method,
        "search": search, "rounds": rounds, "max_abs_error_vs_masked_reference": check.max_abs_error,
        "verification": check.checks, "seconds": time.time() - t0,
    })
    if samples is not None:
        pruned = _recover(canon.model, pruned, analysis, plan, samples, provider, report, log)
        report["output_fidelity"] = output_fidelity(canon.model, pruned, samples, provider)
    if speedup < target:
        raise TargetNotMet(f"measured {speedup:.2f}x after {len(rounds)} rounds, below the {target:g}x target "
                           f"(the largest speedup reached); try a lower target or another --method",
                           report=report)
    return CompileResult(pruned, report, plan)


def _recover(dense, pruned, analysis, plan, samples, provider, report, log):
    """Layer-wise reconstruction on calibration data, kept only if it helps on held-out samples
    (a fifth of them). It changes weights, not shapes: the measured latency still holds."""
    from onnx_prune.passes.reconstruct import refit

    fit, held = _split_held_out(samples)
    refitted, errors = refit(pruned, dense, analysis, plan, fit)
    before = output_fidelity(dense, pruned, held, provider)["mean_cosine_similarity"]
    after = output_fidelity(dense, refitted, held, provider)["mean_cosine_similarity"]
    kept = after > before
    report["recovery"] = {"method": "layer-wise least squares (structured AdaPrune)", "layers": len(errors),
                          "held_out_samples": len(next(iter(held.values()))), "held_out_cosine_before": before,
                          "held_out_cosine_after": after, "applied": kept}
    log(f"reconstruction: {len(errors)} layers refitted, held-out cosine {before:.3f} -> {after:.3f}"
        + ("" if kept else " (not applied)"))
    if not kept:
        return pruned
    report["max_abs_error_before_recovery"] = report["max_abs_error_vs_masked_reference"]
    report["max_abs_error_vs_masked_reference"] = None  # recovery changed the weights
    return refitted


def _split_held_out(samples, share=5):
    """Fit on about 4/5 of the distinct samples, hold out the rest: a repeated sample must not
    sit on both sides, or the check would approve a refit that only memorised it."""
    names = sorted(samples)
    n = len(samples[names[0]])
    keys = [b"".join(np.ascontiguousarray(samples[k][i]).tobytes() for k in names) for i in range(n)]
    distinct = list(dict.fromkeys(keys))
    if len(distinct) < 5:
        return samples, samples
    held_keys = set(distinct[len(distinct) - max(len(distinct) // share, 1):])
    held = np.array([k in held_keys for k in keys])
    return ({k: v[~held] for k, v in samples.items()}, {k: v[held] for k, v in samples.items()})


def _next_goal(goal, speedup, target, short_goal, long_goal):
    """Tighten by the measured shortfall, relax by the overshoot; bisect once both are known."""
    if short_goal is not None and long_goal is not None:
        return (short_goal + long_goal) / 2
    if speedup < target:
        return goal * max(target / speedup, 1.02)
    return goal * max(target * OVERSHOOT_MARGIN / speedup, 0.9)


def _rebatch(canon, batch_size):
    """Analyse and time at `batch_size` (layer times depend on it); only a dynamic batch can change."""
    from onnx_prune.passes.canonicalize import make_static, with_batch

    canon.input_shapes = with_batch(canon.model, canon.input_shapes, batch_size)
    canon.static = make_static(canon.model, canon.input_shapes)


def _timing_feeds(canon, samples, batch_size, notes):
    """One batch to profile and measure with: calibration data if given, else random inputs."""
    shapes = dict(canon.input_shapes)
    if samples is None:
        notes.append("no calibration data: data-free (weight magnitude) importance, random inputs for timing")
        return random_feeds(canon.model, shapes)
    n = batch_size or next(iter(shapes.values()))[0]
    first = next(batches(samples, n))
    if len(next(iter(first.values()))) < n:
        raise UserError(f"calibration data has fewer samples than the batch size {n}")
    return first


def output_fidelity(dense, pruned, samples, provider, batch_size=16) -> dict:
    """How close the pruned model's outputs stay to the dense model's on the calibration data."""
    sd, sp = make_session(dense, provider=provider), make_session(pruned, provider=provider)
    cos, rel = [], []
    for feeds in batches(samples, batch_size):
        for a, b in zip(sd.run(None, feeds), sp.run(None, feeds)):
            a = a.reshape(len(a), -1).astype(np.float64)
            b = b.reshape(len(b), -1).astype(np.float64)
            na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
            cos.extend((a * b).sum(1) / np.maximum(na * nb, 1e-12))
            rel.extend(np.linalg.norm(a - b, axis=1) / np.maximum(na, 1e-12))
    return {"mean_cosine_similarity": float(np.mean(cos)), "mean_relative_l2_error": float(np.mean(rel)),
            "samples": int(len(next(iter(samples.values()))))}
