"""The Markdown summary of a compile report, with plots: kept width per group, predicted vs
measured speedup per round, and error vs speed of the candidates the search tried."""

from __future__ import annotations

import os
from contextlib import contextmanager

from onnx_prune.files import atomic_path

PLOTS = ("widths", "rounds", "candidates")


def summary_paths(json_path: str) -> dict:
    """What write_summary may write beside REPORT.json: the Markdown file and each plot."""
    stem = os.path.splitext(json_path)[0]
    return {"Markdown summary": stem + ".md", **{f"{key} plot": _plot_path(stem, key) for key in PLOTS}}


def _plot_path(stem, key):
    return f"{stem}_{key}.png"


def _save(fig, path):
    """Atomic write: a half-drawn plot never replaces a good one."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


@contextmanager
def _figure(paths, stem, key, size, xlabel, ylabel):
    """Axes to draw on; on exit they are labelled, saved as STEM_KEY.png and recorded in `paths`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        paths[key] = _plot_path(stem, key)
        _save(fig, paths[key])
    finally:
        plt.close(fig)


def _plots(report, stem):
    paths = {}
    groups = report["groups"]
    with _figure(paths, stem, "widths", (max(6, 0.18 * len(groups)), 3), "group (graph order)",
                 "kept share of channels") as ax:
        ax.bar(range(len(groups)), [g["kept"] / g["channels"] for g in groups], color="tab:blue")
        ax.set_ylim(0, 1.05)

    rounds = report.get("rounds", [])
    if rounds:
        with _figure(paths, stem, "rounds", (4, 3.5), "predicted speedup", "measured speedup") as ax:
            p = [r["predicted_speedup"] for r in rounds]
            m = [r["measured_speedup"] for r in rounds]
            ax.scatter(p, m, color="tab:orange")
            for k, (x, y) in enumerate(zip(p, m)):
                ax.annotate(str(k + 1), (x, y), textcoords="offset points", xytext=(4, 4))
            lo, hi = min(p + m) * 0.95, max(p + m) * 1.05
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.axhline(report["target_speedup"], color="tab:red", lw=0.8)

    cands = report.get("candidates", [])
    if cands:
        with _figure(paths, stem, "candidates", (4.5, 3.5), "predicted speedup", cands[0]["error_kind"]) as ax:
            ax.scatter([c["predicted_speedup"] for c in cands], [c["error"] for c in cands], s=12)
            ax.set_yscale("log")
    return paths


def refit_on_all(report) -> dict:
    """The report's record of the recovery's stages run again on all calibration samples ({} if
    they were not)."""
    return (report.get("recovery") or {}).get("refit_on_all_samples") or {}


def markdown(report, plots) -> str:
    r = report
    again = refit_on_all(r)
    lines = [f"# onnx-prune compile: {r['measured_speedup']:.2f}x measured (target {r['target_speedup']:g}x)", "",
             "| | |", "|---|---|",
             f"| provider / threads / batch | {r['provider']} / {r['threads'] or 'default'} / {r['batch_size']} |",
             f"| latency | {r['dense_latency_ms']:.2f} ms -> {r['pruned_latency_ms']:.2f} ms |",
             f"| predicted speedup | {r['predicted_speedup']:.2f}x |",
             f"| method / search / importance | {r['method']} / {r['search']} / {r.get('importance', '')} |",
             f"| channels kept | {r['channels_kept']} / {r['channels_total']} in {len(r['groups'])} groups |"]
    fid = r.get("output_fidelity")
    if fid:
        from onnx_prune.compiler.fidelity import similarity

        lines.append(f"| output cosine to dense (held-out calibration samples"
                     f"{', by the recovery fitted without them' if again.get('applied') else ''}) | {similarity(fid):.4f} |")
    budget = r.get("accuracy_budget")
    if budget:
        parts = ([f"cosine {budget['fidelity']:.4f} vs min {budget['min_fidelity']:g}"] if "min_fidelity" in budget
                 else []) + ([f"top-1 drop {budget['accuracy_drop']:.4f} vs max {budget['max_accuracy_drop']:g}"]
                             if "max_accuracy_drop" in budget else [])
        lines.append(f"| accuracy budget ({budget['samples']} held-out samples) | "
                     f"{'met' if budget['met'] else 'MISSED'}: {', '.join(parts)} |")
    rotation = r.get("head_rotation")
    if rotation and rotation["groups"]:
        lines.append(f"| head rotation | {len(rotation['groups'])} head-dimension groups ordered by SVD weighted by "
                     f"{rotation.get('statistics', 'calibration samples')}, "
                     f"outputs moved {rotation['max_abs_output_change_relative']:.1e} (relative) |")
    elif rotation and rotation["put_back"]:
        lines.append(f"| head rotation | put back: {next(iter(rotation['put_back'].values()))} |")
    err = r.get("max_abs_error_vs_masked_reference")
    before = r.get("max_abs_error_before_recovery", r.get("max_abs_error_before_finetune"))
    changed = "recovery" if "max_abs_error_before_recovery" in r else "fine-tuning"
    lines.append(f"| masked-reference max abs error | "
                 f"{'%.1e' % err if err is not None else '%.1e before %s changed the weights' % (before, changed)} |")
    lines.append(f"| time | {r['seconds']:.0f} s: " + ", ".join(f"{k} {v:.0f}s" for k, v in r.get("phases", {}).items()) + " |")
    if r.get("process_peak_memory_mb"):
        lines.append(f"| peak memory | {r['process_peak_memory_mb'] / 1024:.1f} GB (the process's resident peak) |")
    for stage in r.get("recovery", {}).get("stages", []):
        if "skipped" in stage:  # e.g. the sequential refit, over its time budget on a large model
            lines.append(f"| {stage['method']} | skipped: {stage['skipped']} |")
            continue
        lines.append(f"| {stage['method']} | held-out cosine {stage['held_out_cosine_before']:.4f} -> "
                     f"{stage['held_out_cosine_after']:.4f}{'' if stage['applied'] else ' (not applied)'} |")
    if again:
        lines.append(f"| {again['how']} on all {again['samples']} calibration samples | "
                     + (f"applied (held-out samples, now fitted: cosine {again['cosine_on_held_out_samples_now_fitted']:.4f})"
                        if again["applied"] else f"not used: {again['skipped']}") + " |")
    titles = {"widths": "Kept width per group", "rounds": "Predicted vs measured speedup, per round",
              "candidates": "Error vs speed of the candidates tried"}
    for key, path in plots.items():
        lines += ["", f"## {titles[key]}", "", f"![{titles[key]}]({os.path.basename(path)})"]
    lines += ["", "## Rounds", "", "| round | goal | predicted | measured |", "|---|---|---|---|"]
    lines += [f"| {k + 1} | {'every group at its smallest width' if x.get('fastest_plan') else format(x['goal'], '.2f') + 'x'} "
              f"| {x['predicted_speedup']:.2f}x | {x['measured_speedup']:.2f}x |"
              for k, x in enumerate(r.get("rounds", []))]
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def write_summary(report: dict, json_path: str) -> str:
    """Write REPORT.md and its plots next to REPORT.json; returns the Markdown path."""
    plots = _plots(report, os.path.splitext(json_path)[0])
    md = summary_paths(json_path)["Markdown summary"]
    with atomic_path(md) as tmp, open(tmp, "w") as f:
        f.write(markdown(report, plots))
    return md
