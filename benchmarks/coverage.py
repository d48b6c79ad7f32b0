"""Prunable share and uniform-0.5 verification for every zoo model (the README's coverage table).

    python benchmarks/coverage.py [NAME ...] [--markdown]
"""

import sys
import time

from onnx_prune.compiler.prune import prune_uniform
from onnx_prune.models.registry import load, names


def row(name):
    entry = load(name)
    t = time.time()
    r = prune_uniform(entry.model, 0.5, input_shapes=entry.input_shapes).report
    cov = r["coverage"]
    return {
        "name": name, "family": entry.family, "groups": len(r["groups"]),
        "layers": f"{cov['prunable_layers']}/{cov['layers']} ({cov['output_layers']} output)",
        "layer_share": cov["prunable_layers"] / max(cov["layers"] - cov["output_layers"], 1),
        "channel_share": cov["prunable_channels"] / max(cov["channels"], 1),
        "err": r["max_abs_error_vs_masked_reference"], "seconds": time.time() - t,
    }


def main(argv):
    md = "--markdown" in argv
    chosen = [a for a in argv if not a.startswith("--")] or names()
    if md:
        print("| model | family | groups | prunable weight layers | share (output layers excluded) | share of output channels | max abs error, ratio 0.5 |")
        print("|---|---|---|---|---|---|---|")
    for name in chosen:
        try:
            r = row(name)
        except Exception as exc:  # report and go on: this is a survey
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            continue
        if md:
            print(f"| {r['name']} | {r['family']} | {r['groups']} | {r['layers']} | {r['layer_share']:.0%} | "
                  f"{r['channel_share']:.0%} | {r['err']:.1e} |")
        else:
            print(f"{r['name']:20s} {r['family']:12s} groups={r['groups']:4d} layers={r['layers']:8s} "
                  f"({r['layer_share']:.0%}) channels={r['channel_share']:.0%} err={r['err']:.1e} {r['seconds']:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
