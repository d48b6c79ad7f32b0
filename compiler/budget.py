"""The accuracy budget of `compile` (`--min-fidelity`, `--max-accuracy-drop`): judged on the
held-out calibration samples, after recovery and fine-tuning, so that a CI step fails on accuracy
as it does on speed."""

from __future__ import annotations

from onnx_prune.compiler.fidelity import similarity
from onnx_prune.errors import TargetNotMet, UserError


def check_budget_args(min_fidelity, max_accuracy_drop, calib) -> None:
    """Bad budgets fail before any work."""
    if min_fidelity is not None and not 0.0 < min_fidelity <= 1.0:
        raise UserError(f"--min-fidelity is a cosine similarity in (0, 1], got {min_fidelity}")
    if max_accuracy_drop is not None and not 0.0 <= max_accuracy_drop <= 1.0:
        raise UserError(f"--max-accuracy-drop is a share of top-1 accuracy in [0, 1] (0.01 = one point), "
                        f"got {max_accuracy_drop}")
    if (min_fidelity is not None or max_accuracy_drop is not None) and calib is None:
        raise UserError("an accuracy budget is judged on held-out calibration samples: give --calib")


def check_labels(max_accuracy_drop, labels) -> None:
    if max_accuracy_drop is not None and labels is None:
        raise UserError("--max-accuracy-drop needs the calibration data's 'labels' (one class per sample) "
                        "to measure top-1 accuracy; without labels use --min-fidelity")


def judge_budget(report: dict, min_fidelity, max_accuracy_drop, model=None) -> None:
    """Record the budget in the report; raise TargetNotMet (exit 1) when it is missed."""
    if min_fidelity is None and max_accuracy_drop is None:
        return
    fid = report["output_fidelity"]
    budget = {"samples": fid["samples"], "judged_on": "held-out calibration samples"}
    missed = []
    if min_fidelity is not None:
        value = similarity(fid)
        budget.update(min_fidelity=min_fidelity, fidelity=value)
        if value < min_fidelity:
            missed.append(f"held-out output cosine {value:.3f} is below --min-fidelity {min_fidelity:g}")
    if max_accuracy_drop is not None:
        drop = fid["dense_accuracy"] - fid["accuracy"]
        budget.update(max_accuracy_drop=max_accuracy_drop, accuracy=fid["accuracy"],
                      dense_accuracy=fid["dense_accuracy"], accuracy_drop=drop)
        if drop > max_accuracy_drop + 1e-12:
            missed.append(f"held-out top-1 accuracy fell {drop:.3f} ({fid['dense_accuracy']:.3f} -> "
                          f"{fid['accuracy']:.3f}), over --max-accuracy-drop {max_accuracy_drop:g}")
    budget["met"] = not missed
    report["accuracy_budget"] = budget
    if missed:
        raise TargetNotMet(f"accuracy budget missed at {report['measured_speedup']:.2f}x measured: "
                           f"{'; '.join(missed)} ({fid['samples']} held-out calibration samples); try a lower "
                           f"--target-speedup, more calibration data, --search full or --recover global",
                           report=report, model=model)
