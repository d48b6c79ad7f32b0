"""`compile` over the zoo at 1.5x, 2x and 3x (issue 4): measured speedup against the target and the
1.10x overshoot bound, rounds and seconds per run. Data-free (no calibration), SPDY fast search.

    python benchmarks/compile_zoo.py [--targets 1.5 2 3] [--batch 8] [--threads 2] [NAME ...]

A target beyond what pruning every group to its smallest useful width can predict (or, near that
limit, measures) is reported as "out of reach" (compile exits 2 for it), as is one whose fastest plan
the loop measured short more than once; a target missed after the rounds as "missed".
"""

import argparse
import re
import time

from onnx_prune.compiler.compile import compile_model
from onnx_prune.errors import TargetNotMet, UserError
from onnx_prune.models.registry import load, names

SKIP = {"light_vgg19", "light_bvlc_alexnet", "light_zfnet512"}  # 0.2-0.5 GB of weights: minutes per round


def _dynamic_batch(model) -> bool:
    from onnx_prune.passes.graph import dims_of

    inits = {t.name for t in model.graph.initializer}
    return all((dims_of(i.type) or (1,))[0] is None for i in model.graph.input if i.name not in inits)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--targets", nargs="*", type=float, default=[1.5, 2.0, 3.0])
    ap.add_argument("--batch", type=int, default=8, help="batch for models with a dynamic batch dim")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| model | target | measured | within [t, 1.1t] | predicted | rounds | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in args.names or [n for n in names() if n not in SKIP]:
        zm = load(name)
        batch = args.batch if _dynamic_batch(zm.model) else None
        for target in args.targets:
            t0 = time.time()
            try:
                r = compile_model(zm.model, target, input_shapes=dict(zm.input_shapes), batch_size=batch,
                                  threads=args.threads).report
                m = r["measured_speedup"]
                ok = "yes" if target <= m <= 1.1 * target else "over"
                if any(x.get("fastest_plan") for x in r["rounds"]):
                    ok += " (after measuring every group at its smallest width)"
                print(f"| {name} | {target:g}x | {m:.2f}x | {ok} | {r['predicted_speedup']:.2f}x | "
                      f"{len(r['rounds'])} | {time.time() - t0:.0f} |", flush=True)
            except TargetNotMet as exc:
                r = exc.report
                verdict = ("out of reach (every group at its smallest width, measured)"
                           if r["rounds"][-1].get("fastest_plan") else "out of reach (its fastest plan, measured)") \
                    if r["target_beyond_reach"] else "missed"
                print(f"| {name} | {target:g}x | {r['measured_speedup']:.2f}x | {verdict} | "
                      f"{r['predicted_speedup']:.2f}x | {len(r['rounds'])} | {time.time() - t0:.0f} |", flush=True)
            except UserError as exc:
                # "... smallest useful width predicts 1.62x", or "... measured 1.71x on cpu (predicted 1.55x)"
                reach = re.search(r"(predicts|measured) ([\d.]+x)", str(exc))
                cell = f"{reach.group(2)} at the smallest widths" + (", measured" if reach.group(1) == "measured" else "") \
                    if reach else str(exc)
                print(f"| {name} | {target:g}x | out of reach | | {cell} | | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
