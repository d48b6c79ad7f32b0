"""`compile`: the least-pruned plan whose *measured* speedup meets the target.

    canonicalize -> analyze -> profile + timing database -> candidate widths -> importance
    -> search (uniform | global | spdy) on the predicted latency -> surgery -> verify
    -> measure dense vs pruned side by side -> tighten and search again if short -> report

A speedup is only reported if it was measured; if the target cannot be met the run fails with
the largest speedup it measured.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_prune import heap
from onnx_prune.backends.measure import STEADY, measure
from onnx_prune.backends.ort import USER_SHAPES_HINT, check_runs, feed_kind, index_bound, make_session, random_feeds
from onnx_prune.backends.predict import CostModel
from onnx_prune.compiler.budget import check_budget_args, check_labels, judge_budget
from onnx_prune.compiler.calib import batches, load_calibration_with_labels
from onnx_prune.compiler.crossfit import CrossFitLoss, distinct_ids, fold_masks
from onnx_prune.compiler.prune import build_report
from onnx_prune.compiler.fidelity import Reference, similarity
from onnx_prune.compiler.guarantee import OVERSHOOT_MARGIN, Guarantee, fastest_plan
from onnx_prune.compiler.progress import Steps
from onnx_prune.compiler.search import SpdyTables, search_global, search_spdy, search_uniform
from onnx_prune.compiler.sensitivity import measured_gains, sensitivity_search
from onnx_prune.errors import TargetNotMet, UserError, positive_count
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.augment import VOCABULARY  # a table at least this large indexed by an input: token ids
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.errordb import MAX_ROWS as ERRORDB_ROWS, build_error_db
from onnx_prune.passes.importance import group_scores, keep_top
from onnx_prune.passes.reconstruct import feed_batches
from onnx_prune.passes.rotate import rotate_heads
from onnx_prune.passes.sequential import SequentialTooSlow, sequential_refit
from onnx_prune.passes.surgery import apply_plan

METHODS = {"uniform": search_uniform, "global": search_global, "spdy": search_spdy}
SEARCHES = ("fast", "full")
RECOVERIES = ("layer", "global", "none")  # none | layer-wise least squares | + global AdaPrune
SEARCH_SECONDS = 90  # --search full: time for SPDY's sensitivity search
SEQUENTIAL_BUDGET_S = 30.0  # the sequential refit runs the pruned model once per layer input
SEARCH_SAMPLES = 64  # calibration samples that score each candidate of the sensitivity search
PROBE_SHARE = 0.5  # of --search-seconds, at most, for measuring each group's gain (fewer samples if needed)
MEASURE_ATTEMPTS = 3  # a measurement the machine's speed changed during is repeated, the steadiest kept
# the dense model measured this much slower beside the pruned one than when it was profiled: the
# machine slowed down, and a slowed machine slows a pruned model more (EfficientNet at batch 64, 2
# threads: dense 9 -> 14 ms, a pruned plan 6 -> 12.6 ms, its 1.5x measured 1.23x)
SLOWED = 1.3
REACH_MARGIN = 1.15  # a target up to this far above the predicted reach is searched for at once,
REACH_REFUSE = 1.6  # up to this far the fastest plan is measured first; beyond, refused at once
HELD_OUT = "held-out calibration samples (not used to fit)"


@dataclass
class CompileResult:
    model: onnx.ModelProto
    report: dict
    plan: dict
    reference: Reference | None = field(default=None, repr=False)  # the dense model on held-out samples


def parse_speedup(text) -> float:
    """'2x', '2', '1.5X' -> float > 1."""
    try:
        value = float(str(text).lower().rstrip("x"))
    except ValueError:
        raise UserError(f"--target-speedup '{text}' is not a number like 2x") from None
    if not 1.0 < value < float("inf"):
        raise UserError(f"--target-speedup must be a finite number above 1x, got {text}")
    return value


def measured_speedup(dense, pruned, feeds, provider, threads):
    """Dense latency / pruned latency, interleaved side by side; also both medians and how much
    the speed changed between blocks. A measurement during which the machine's speed changed is
    repeated (up to MEASURE_ATTEMPTS times in all) and the steadiest kept."""
    # sessions made once, not per attempt
    sessions = [make_session(m, provider=provider, threads=threads) for m in (dense, pruned)]
    best = None
    for _ in range(MEASURE_ATTEMPTS):
        result = measure([dense, pruned], feeds, provider=provider, threads=threads, blocks=8, sessions=sessions)
        if best is None or result.speed_change < best.speed_change:
            best = result
        if best.steady:
            break
    return best.ratio, best.latencies[0].median_ms, best.latencies[1].median_ms, best.speed_change


def compile_model(model, target_speedup, provider="cpu", threads=None, calib=None, preprocess=None,
                  input_shapes=None, method="spdy", search="fast", batch_size=None, timer=None,
                  search_seconds=SEARCH_SECONDS, recover="layer", log=lambda msg: None,
                  progress=False, finetune=None, epochs=5, min_fidelity=None,
                  max_accuracy_drop=None) -> CompileResult:
    """Compile `model` (path or ModelProto). `timer(dense, pruned, feeds)` -> (speedup, dense ms,
    pruned ms) replaces the real measurement in tests. `finetune` (data for compiler/finetune.py):
    afterwards, distil the pruned model to the dense one for `epochs` (shapes, so speed, unchanged).
    `min_fidelity` / `max_accuracy_drop`: the accuracy budget (compiler/budget.py), judged on the
    held-out calibration samples after recovery and fine-tuning; missed, TargetNotMet."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (choose: {', '.join(METHODS)})")
    if search not in SEARCHES:
        raise UserError(f"unknown search '{search}' (choose: {', '.join(SEARCHES)})")
    if recover not in RECOVERIES:
        raise UserError(f"unknown recovery '{recover}' (choose: {', '.join(RECOVERIES)})")
    if search == "full" and method != "spdy":
        raise UserError("--search full is SPDY's sensitivity search: use it with --method spdy")
    target = parse_speedup(target_speedup)
    threads, batch_size = positive_count(threads, "threads"), positive_count(batch_size, "batch_size")
    if isinstance(search_seconds, bool) or not isinstance(search_seconds, numbers.Real) or not search_seconds >= 1:
        raise UserError(f"search_seconds must be a number of seconds >= 1, got {search_seconds!r}")
    check_budget_args(min_fidelity, max_accuracy_drop, calib)
    steps = Steps(log, progress)
    try:
        # fine-tuning is judged on the held-out samples: the recovery must not have fitted them
        result = _compile(model, target, provider, threads, calib, preprocess, input_shapes, method, search,
                          batch_size, timer, search_seconds, recover, steps, max_accuracy_drop,
                          refit_all=finetune is None)
        if finetune is not None:
            from onnx_prune.compiler.finetune import finetune_compiled

            with steps("fine-tune"):
                result.model = finetune_compiled(model, result.model, result.report, finetune, epochs,
                                                 input_shapes, log=steps.note)
                if result.report["finetune"]["applied"] and result.reference is not None:
                    # the budget judges the weights that are written, on the same held-out samples
                    result.report["output_fidelity"] = dict(result.reference.fidelity(result.model),
                                                            on=HELD_OUT + ", after fine-tuning")
        judge_budget(result.report, min_fidelity, max_accuracy_drop, result.model)
        return result
    finally:
        steps.close()


def _compile(model, target, provider, threads, calib, preprocess, input_shapes, method, search, batch_size,
             timer, search_seconds, recover, steps, max_accuracy_drop=None, refit_all=True) -> CompileResult:
    notes = []
    with steps("analyse"):
        canon = canonicalize(model, input_shapes=input_shapes)
        if batch_size:
            _rebatch(canon, batch_size)
        analysis = analyze_canonical(canon)
        if not analysis.groups:
            raise UserError(analysis.nothing_prunable())
        warning = heap.shortfall_warning(sum(t.ByteSize() for t in canon.model.graph.initializer),
                                         calibrated=calib is not None)
        if warning:
            notes.append(warning)
            steps.note(f"warning: {warning}")
        samples, labels = load_calibration_with_labels(calib, canon.model, preprocess, notes) if calib is not None \
            else (None, None)
        check_labels(max_accuracy_drop, labels)
        feeds = _timing_feeds(canon, samples, batch_size, notes)
        # calibration samples can fail where shapes do not: a token id beyond the embedding table
        check_runs(model, feeds, hint=USER_SHAPES_HINT if samples is None else
                   f"{USER_SHAPES_HINT}, and the calibration data's values")
        if samples is not None:
            first_batch = feed_batches(canon.model, samples)[0]
            _check_calibration_batch(canon.model, first_batch, feeds)
            if recover == "global":  # fail now, not after the search
                from onnx_prune.backends.torch_graph import check_bridge

                check_bridge(canon.model, first_batch)
    with steps("profile + timing database"):
        cm = CostModel(canon.model, analysis, feeds, provider=provider, threads=threads)
        widths = cm.candidate_widths()
    timer = timer or (lambda d, p, f: measured_speedup(d, p, f, provider, threads))
    # before the error database: an unreachable target fails fast
    reachable = _check_reach(cm, canon.model, analysis, widths, target, feeds, timer, provider, notes, steps)
    curves, db = None, None
    fit = fit_labels = folds = None
    if samples is not None:
        # a held-out fifth judges recovery; everything that fits (the database, its refits and
        # the search's loss) sees only the rest
        fit, held, fit_labels, held_labels = _split_held_out(samples, labels=labels)
    # data-free, a model that reads token ids gets random sequences in place of calibration data, to
    # rank its channels and weight its head rotation (not to refit: that hurt)
    pseudo = _pseudo_tokens(canon, notes) if samples is None and method == "spdy" else None
    with steps("head rotation"):  # before anything ranks channels: it reorders head dimensions
        # data-free, random inputs still weight each head's SVD (MiniLM, query/key size 8 of 32,
        # no refit: 0.665 kept as they are, 0.919 rotated on 8 random sequences)
        rotation = rotate_heads(canon.model, analysis, fit if samples is not None else pseudo or feeds,
                                log=steps.note,
                                statistics="calibration samples" if samples is not None else "random inputs")
    scores = rotation.ranked(group_scores(analysis))
    if pseudo is not None:
        with steps("error database"):
            db = build_error_db(canon.model, analysis, pseudo, channel_energy=rotation.logit_energy)
        scores, curves = db.scores(), db.curve
    if samples is not None:
        # the sensitivity search scores refits on samples they were not fitted on (compiler/crossfit.py)
        folds = fold_masks(fit) if method == "spdy" and search == "full" else None
        if method == "spdy" or recover != "none":  # its errors, or its refits, are used
            with steps("error database"):
                db = build_error_db(canon.model, analysis, fit, folds=folds, channel_energy=rotation.logit_energy)
        if method == "spdy":  # the baselines keep their magnitude ranking; all share the refits
            scores, curves = db.scores(), db.curve
    goal = target * OVERSHOOT_MARGIN
    with steps("search tables"):
        find = _planner(method, cm, analysis, widths, scores, curves)
    tables = getattr(find, "tables", None)  # SPDY's, refreshed when the cost model is calibrated
    candidates = []
    if search == "full":
        with steps("sensitivity search"):
            # data-free, the database's refits are not applied, so candidates are scored as they are
            find, notes_full = _sensitivity(find, canon, analysis, cm, goal, fit if samples else feeds, provider,
                                            search_seconds, steps, candidates, db if samples else None, scores,
                                            fit_labels, folds)
            notes.append(notes_full)
    elif method == "spdy":
        with steps("trade-off curve"):
            kind = "summed layer error (error database)" if curves is not None else \
                "summed importance removed (weight magnitude)"
            candidates = _frontier(find, cm, analysis, scores, reachable, kind)
    outcome = Guarantee(canon.model, analysis, feeds, cm, find, tables, timer, target, search, steps, notes,
                        fastest_plan(analysis, widths, scores)).run()
    plan, predicted, pruned, check = outcome.plan, outcome.predicted, outcome.pruned, outcome.check
    speedup, dense_ms, pruned_ms, change = outcome.judged
    rounds, beyond_reach = outcome.rounds, outcome.beyond_reach
    if change > STEADY:
        notes.append(f"the machine's speed changed while the speedup was measured (a model's latency varied "
                     f"{change:.2f}x between blocks, in {MEASURE_ATTEMPTS} attempts): another process or a slow "
                     f"spell; measure again with `onnx-prune bench` on a quiet machine")
    slowed = _slowdown(dense_ms, cm.profile.e2e_ms)
    if slowed:
        notes.append(f"the dense model ran {slowed:.2f}x slower while the speedup was measured ({dense_ms:.2f} ms) "
                     f"than when it was profiled ({cm.profile.e2e_ms:.2f} ms): a slowed machine (another process, "
                     f"fewer free cores) slows a pruned model more than the dense one, so the measured speedup may "
                     f"be low; measure again with `onnx-prune bench` on a quiet machine")
        steps.note(f"warning: {notes[-1]}")
    report = build_report(analysis, plan, canon.notes + notes)
    report.update({
        "target_speedup": target, "measured_speedup": speedup, "predicted_speedup": predicted,
        "dense_latency_ms": dense_ms, "pruned_latency_ms": pruned_ms, "provider": provider,
        "batch_size": int(next(iter(feeds.values())).shape[0]), "threads": threads, "method": method,
        "search": search, "importance": _importance(curves, samples),
        "rounds": rounds, "plan_measurements": len(outcome.measurements), "target_beyond_reach": bool(beyond_reach),
        "candidates": candidates, "max_abs_error_vs_masked_reference": check.max_abs_error,
        "verification": check.checks,
    })
    report["head_rotation"] = rotation.as_report()
    if samples is not None:
        with steps("recovery" if recover != "none" else "output fidelity"):
            reference = Reference(canon.model, held, provider, labels=held_labels)
            apart = len(fit[next(iter(fit))]) + len(held[next(iter(held))]) == len(samples[next(iter(samples))])
            pruned, report["output_fidelity"] = _recover(pruned, analysis, plan, fit, held if apart else None,
                                                         reference, db, recover, report, steps.note,
                                                         refit_all=refit_all)
    report["seconds"] = steps.total()
    report["phases"] = steps.seconds
    report["process_peak_memory_mb"] = heap.peak_mb()  # of the whole process, so far
    report["peak_memory_mb_after_phase"] = steps.peak_mb  # the phase that raised it holds the most
    if speedup < target:
        which = "every group at its smallest width" if rounds[-1].get("fastest_plan") else "the fastest plan the search finds"
        reach = (f"; {which}, measured {beyond_reach} time{'s' * (beyond_reach > 1)}, stays short: the target "
                 f"is out of reach on {provider} at this batch size") if beyond_reach else ""
        raise TargetNotMet(f"measured {speedup:.2f}x after {len(rounds)} rounds, below the {target:g}x target "
                           f"(the largest speedup reached{reach}); try a lower target or another --method"
                           + (f"; the machine slowed down while measuring (the dense model {slowed:.2f}x slower "
                              f"than when profiled)" if slowed else ""),
                           report=report, model=pruned)
    return CompileResult(pruned, report, plan, reference if samples is not None else None)


def _slowdown(measured_ms: float, profiled_ms: float) -> float | None:
    """How much slower the dense model measured beside the pruned one than when it was profiled,
    if more than SLOWED: a machine slow for the whole measurement, which changes between blocks
    (STEADY) do not show."""
    return measured_ms / profiled_ms if profiled_ms and measured_ms > SLOWED * profiled_ms else None


def _check_reach(cm, model, analysis, widths, target, feeds, timer, provider, notes, steps) -> float:
    """The predicted speedup of the fastest plan (every group at its smallest useful width), or a
    UserError when the target is beyond it. Near that limit the prediction is not trusted: pruned,
    some models run faster than their kernels' shares say (MobileNets), so the fastest plan is
    built and measured first, and the predictor calibrated on it when it does reach the target."""
    smallest = fastest_plan(analysis, widths)
    reachable = cm.dense_ms / cm.predict_ms(smallest)
    if target <= reachable * REACH_MARGIN:
        return reachable
    out_of_reach = f"target {target:g}x is out of reach: pruning every group to its smallest useful width"
    if target > reachable * REACH_REFUSE:
        raise UserError(f"{out_of_reach} predicts {reachable:.2f}x on {provider}")
    with steps("measure the fastest plan"):
        speedup = timer(model, apply_plan(model, analysis, smallest), feeds)[0]
    if speedup < target:
        raise UserError(f"{out_of_reach} measured {speedup:.2f}x on {provider} (predicted {reachable:.2f}x)")
    gamma = cm.calibrate(smallest, speedup)
    notes.append(f"the fastest plan, predicted at {reachable:.2f}x, measured {speedup:.2f}x: the predictor was "
                 f"calibrated on it (gamma {gamma:.2f}) before the search")
    steps.note(notes[-1])
    return cm.dense_ms / cm.predict_ms(smallest)


def _planner(method, cm, analysis, widths, scores, curves):
    """goal_ms -> plan for the chosen method (SPDY's tables are built once)."""
    if method != "spdy":
        return lambda goal_ms: METHODS[method](cm, analysis, widths, goal_ms, scores)
    tables = SpdyTables(cm, analysis, widths, scores, curves)

    def find(goal_ms, errors=None):
        return search_spdy(cm, analysis, widths, goal_ms, scores, tables=tables, errors=errors)

    find.tables = tables
    return find


def _frontier(find, cm, analysis, scores, reachable, kind, points=8):
    """SPDY's error-vs-speed trade-off: the DP's plan and its summed database error at a range of goals."""
    out = []
    for s in np.linspace(1.05, max(reachable * 0.95, 1.1), points):
        counts = find.tables.solve(cm.dense_ms / s)
        plan = {g.name: keep_top(scores[g.name], counts[g.name]) for g in analysis.groups}
        err = sum(find.tables.error_of(g.name, counts[g.name]) for g in analysis.groups)
        out.append({"predicted_speedup": cm.predicted_speedup(plan), "error": err,
                    "error_kind": kind})
    return out


def _sensitivity(find, canon, analysis, cm, goal, samples, provider, seconds, steps, candidates, db, scores,
                 labels=None, folds=None):
    """Search SPDY's per-group sensitivity coefficients at the first goal; later rounds reuse them.
    With calibration data, the errors are first scaled by each group's measured gain, and
    candidates are scored after stitching in the error database's refits, cross-fitted (refits
    fitted on other samples than those they are scored on) where the samples allow."""
    started = time.time()
    tables = find.tables
    loss_kind = "task loss (cross-entropy on the calibration labels)" if labels is not None else \
        "calibration loss (1 - cosine)"
    if db is not None and folds is not None:  # refits fitted on other samples than they are scored on
        loss_of = CrossFitLoss(canon.model, analysis, db, samples, provider, folds, labels,
                               per_fold=SEARCH_SAMPLES // len(folds))
        loss_kind += f", cross-fitted over {len(folds)} folds"
        scored_on = loss_of.samples
    else:
        reference = Reference(canon.model, _first(samples, SEARCH_SAMPLES), provider,
                              labels=None if labels is None else labels[:SEARCH_SAMPLES])
        scored_on = reference.samples

        def loss_of(pruned, plan, share=1.0):
            return reference.loss(db.stitch(pruned, analysis, plan) if db is not None else pruned, share)
    goal_ms = cm.dense_ms / goal

    def progress(evaluated, best):
        steps.tick(f"sensitivity search: {evaluated} plans scored, best calibration loss {best:.4f}")

    def loss(plan, share=1.0):
        return loss_of(apply_plan(canon.model, analysis, plan), plan, share)

    def scored(plan):
        value = loss(plan)
        candidates.append({"predicted_speedup": cm.predicted_speedup(plan), "error": value,
                           "error_kind": loss_kind})
        return value

    priors = [tables.error[g.name] for g in analysis.groups]
    if db is not None:  # database errors: put each group's on the calibration loss's scale
        full = {g.name: np.arange(g.size) for g in analysis.groups}

        def probe(group, width, share):
            return loss({**full, group.name: keep_top(scores[group.name], width)}, share)

        # the probes may take up to half the search's time, the search itself the rest
        gains = measured_gains(analysis.groups, tables.options, tables.error, probe,
                               progress=lambda i, n: steps.tick(f"sensitivity search: group {i}/{n} probed"),
                               budget_s=seconds * PROBE_SHARE - (time.time() - started))
        priors = [gain * p for gain, p in zip(gains, priors)]

    seconds = max(seconds - (time.time() - started), 0.0)  # the probes are part of the search's time
    c, _plan, best, evaluated = sensitivity_search(lambda errors: find(goal_ms, errors), scored, priors, seconds,
                                                   progress=progress)
    start = candidates[0]["error"]  # the search's first candidate: the errors as they come in
    where = "database errors scaled by measured gains" if db is not None else "raw errors"
    steps.note(f"sensitivity search: {evaluated} plans scored, {loss_kind} {start:.4f} ({where}) -> {best:.4f}")
    scaled = [ci * p for ci, p in zip(c, priors)]
    on = "calibration samples" if db is not None else "samples (random inputs without calibration data)"
    note = (f"--search full: {evaluated} plans scored on {scored_on} {on} by {loss_kind}: "
            f"{start:.4f} with the {where}, {best:.4f} with searched sensitivities")
    return (lambda goal_ms: find(goal_ms, scaled)), note


def _first(samples, n):
    return {k: v[:n] for k, v in samples.items()}


def _recover(pruned, analysis, plan, fit, held, reference, db, recover, report, log, refit_all=True):
    """Recovery on calibration data, each stage kept only if it helps on the held-out samples
    (`reference`): layer-wise least squares (every layer whose input lost channels, refitted on the
    error database's dense-activation statistics: SPDY's stitching), then sequential least squares
    (every layer from the pruned model's own inputs, where that fits its time budget), then
    (`recover="global"`) global AdaPrune through the torch bridge. Weights change, not shapes: the measured latency
    holds. With `refit_all`, where the fitting samples were too few to fill most layers' rows,
    the stages applied are then run again on all samples, held-out ones included (_refit_on_all).
    Returns the model and the output fidelity of its recovery as judged on the held-out samples."""
    from onnx_prune.passes.global_refit import global_refit

    stages = []  # (name, run(model, samples))

    def layer_wise(model, samples):  # refits on the error database's Gram matrices, not on `samples`
        return db.stitch(model, analysis, plan)

    if recover != "none":
        stages.append(("layer-wise least squares (structured AdaPrune)", layer_wise))
        stages.append(("sequential least squares (each layer from the pruned model's own inputs)",
                       lambda m, s: sequential_refit(reference.dense_model, m, analysis, plan, s,
                                                     budget_s=SEQUENTIAL_BUDGET_S,
                                                     sample_s=_sample_seconds(report))))

    def global_adaprune(model, samples):
        return global_refit(model, reference.dense_model, analysis, plan, samples)

    if recover == "global":
        stages.append(("global AdaPrune (all weights, every layer output)", global_adaprune))
    fidelity = reference.fidelity(pruned)
    report["recovery"] = {"held_out_samples": reference.samples, "held_out_cosine_start": similarity(fidelity),
                          "stages": []}
    model, applied = pruned, []
    for name, run in stages:
        try:
            candidate = run(model, fit)
        except SequentialTooSlow as exc:
            report["recovery"]["stages"].append({"method": name, "applied": False,
                                                 "skipped": f"over its {SEQUENTIAL_BUDGET_S:g} s budget ({exc})"})
            log(f"{name}: skipped, over its {SEQUENTIAL_BUDGET_S:g} s budget ({exc})")
            continue
        after = reference.fidelity(candidate)
        kept = similarity(after) > similarity(fidelity)
        report["recovery"]["stages"].append({"method": name, "held_out_cosine_before": similarity(fidelity),
                                             "held_out_cosine_after": similarity(after), "applied": kept})
        log(f"{name}: held-out cosine {similarity(fidelity):.3f} -> {similarity(after):.3f}"
            + ("" if kept else " (not applied)"))
        if kept:
            model, fidelity = candidate, after
            applied.append(run)
    fidelity["on"] = HELD_OUT
    if applied and refit_all and held is not None and db.short_of_rows():
        goes_on = applied[-1] is global_adaprune
        model, again = _refit_on_all(pruned, model, applied, goes_on, layer_wise, fit, held, reference, db, fidelity,
                                     report, log)
        if again:
            then = "trained on by global AdaPrune" if goes_on else "refitted by the same stages"
            fidelity["on"] = (f"{HELD_OUT}, by the recovery fitted without them; the model written was then "
                              f"{then} on all {again} calibration samples")
    if model is not pruned:
        report["max_abs_error_before_recovery"] = report["max_abs_error_vs_masked_reference"]
        report["max_abs_error_vs_masked_reference"] = None  # recovery changed the weights
    return model, fidelity


def _refit_on_all(pruned, judged, applied, goes_on, layer_wise, fit, held, reference, db, fidelity, report, log):
    """The stages the held-out samples chose, run again on every calibration sample: where the
    fitting samples leave most refits short of rows, the held-out fifth is a quarter more data
    (MiniLM 2x, 51 -> 64 sentences: 0.814 -> 0.828 on 256 other sentences). Global AdaPrune, when
    applied, goes on training the model judged instead of starting again from the layer-wise
    refit, so that its epochs on the fitting samples are not lost (MiniLM, fixed 1.5x plan, 256
    other sentences: 0.9534 started again, 0.9560 gone on, in the same time). The held-out figure
    reported stays the one measured on the recovery fitted without them, an estimate of the
    procedure; the refitted model must fit the held-out samples at least as well as that one did
    unseen, or it is not used. `goes_on`: the last stage applied is global AdaPrune, and it alone
    runs, from `judged`. Returns the model and how many samples refitted it (0: not used)."""
    everything = {k: np.concatenate([fit[k], held[k]]) for k in fit}
    record = {"samples": int(len(next(iter(everything.values())))), "applied": False}
    report["recovery"]["refit_on_all_samples"] = record
    record["how"] = "global AdaPrune went on from the model judged" if goes_on else "the stages applied, run again"
    try:
        if goes_on:
            model = applied[-1](judged, everything)
        else:
            if any(run is layer_wise for run in applied):  # its Gram matrices take the held-out rows
                db.absorb(reference.dense_model, held)
            model = pruned
            for run in applied:
                model = run(model, everything)
    except SequentialTooSlow as exc:
        record["skipped"] = f"the sequential refit on all samples is over its budget ({exc})"
        log(f"refit on all {record['samples']} calibration samples: skipped ({exc})")
        return judged, 0
    seen = similarity(reference.fidelity(model))  # in-sample now: a sanity check, not an estimate
    record["cosine_on_held_out_samples_now_fitted"] = seen
    if seen < similarity(fidelity):
        record["skipped"] = (f"it fits the held-out samples worse ({seen:.4f}) than the recovery without them "
                             f"did unseen ({similarity(fidelity):.4f})")
        log(f"refit on all {record['samples']} calibration samples: not used ({record['skipped']})")
        return judged, 0
    record["applied"] = True
    log(f"refit on all {record['samples']} calibration samples: {record['how']} "
        f"(held-out samples, now fitted: {seen:.3f})")
    return model, record["samples"]


def _sample_seconds(report) -> tuple:
    """Seconds per sample of the dense and the pruned model, from the latencies compile measured
    (time scales about with the batch)."""
    return tuple(report[k] / report["batch_size"] / 1e3 for k in ("dense_latency_ms", "pruned_latency_ms"))


def _split_held_out(samples, share=5, labels=None):
    """Fit on about 4/5 of the distinct samples, hold out the rest: a repeated sample must not
    sit on both sides, or the check would approve a refit that only memorised it. Returns (fit,
    held, fit labels, held labels); the labels are None without `labels`."""
    ids = distinct_ids(samples)
    distinct = list(dict.fromkeys(ids.tolist()))
    if len(distinct) < 5:
        held = np.ones(len(ids), dtype=bool)
        fit = held
    else:
        held = np.isin(ids, distinct[len(distinct) - max(len(distinct) // share, 1):])
        fit = ~held
    return ({k: v[fit] for k, v in samples.items()}, {k: v[held] for k, v in samples.items()},
            None if labels is None else labels[fit], None if labels is None else labels[held])


def _rebatch(canon, batch_size):
    """Analyse and time at `batch_size` (layer times depend on it); only a dynamic batch can change."""
    from onnx_prune.passes.canonicalize import make_static, with_batch

    canon.input_shapes = with_batch(canon.model, canon.input_shapes, batch_size)
    canon.static = make_static(canon.model, canon.input_shapes)


def _check_calibration_batch(model, first, feeds):
    """Calibration runs in batches of its own size where the graph declares a dynamic batch; a graph
    whose exporter fixed the batch it traced (torch.export does with a batch of 1) runs at no other
    size: say so now, in one line, not as an internal error in the error database."""
    if len(next(iter(first.values()))) != len(next(iter(feeds.values()))):
        check_runs(model, first, hint="a batch of calibration samples, as the graph declares its batch dynamic; "
                                      "its exporter may have fixed the batch it traced: export it with a static "
                                      "batch or a truly dynamic one; a language model's attention may batch "
                                      "several tokens only without a key/value cache: calibrate with an empty "
                                      "one (past length 0)")


PSEUDO_SEQUENCES = 64  # at most, and no more tokens than the error database reads per layer


def _pseudo_tokens(canon, notes) -> dict | None:
    """Random token sequences (masks of ones, segment ids of zeros) for a data-free model whose
    integer inputs are token ids into a vocabulary, masks or segment ids; else None. On MiniLM at
    2x (no recovery), an error database on 64 such sequences kept 0.629 held-out cosine where
    weight magnitude kept 0.435; refitting on them kept less (0.613)."""
    inits = {t.name: t for t in canon.model.graph.initializer}
    ids = False
    for inp in canon.model.graph.input:
        if inp.name in inits or feed_kind(inp) != "ids":
            continue  # floats are not text's; random_feeds gives masks ones, segment ids zeros
        if "position" in inp.name.lower() or index_bound(canon.model, inp.name, inits) < VOCABULARY:
            return None  # random positions or small-table ids are not text
        ids = True
    if not ids or any(len(v) == 0 for v in canon.input_shapes.values()):  # a scalar input has no batch
        return None
    tokens = max(int(np.prod(v[1:])) for v in canon.input_shapes.values())
    count = int(np.clip(ERRORDB_ROWS // max(tokens, 1), 8, PSEUDO_SEQUENCES))  # an LLM's long context: 8
    shapes = {k: (count, *v[1:]) for k, v in canon.input_shapes.items()}
    notes.append(f"no calibration data: channels ranked by an error database on {count} random "
                 f"token sequences (no refit on them); pass --calib with real text for better")
    return random_feeds(canon.model, shapes, seed=1)


def _importance(curves, samples) -> str:
    if curves is None:
        return "weight magnitude"
    return "calibration error database" if samples is not None else \
        "error database on random token sequences (no calibration data)"


def _timing_feeds(canon, samples, batch_size, notes):
    """One batch to profile and measure with: calibration data if given, else random inputs."""
    shapes = dict(canon.input_shapes)
    if samples is None:
        notes.append("no calibration data: data-free importance, random inputs for timing")
        return random_feeds(canon.model, shapes)
    n = batch_size or next(iter(shapes.values()))[0]
    first = next(batches(samples, n))
    if len(next(iter(first.values()))) < n:
        raise UserError(f"calibration data has fewer samples than the batch size {n}")
    return first
