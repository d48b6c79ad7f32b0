"""Pretrained MiniLM-L6, one-shot: sentence-embedding fidelity at equal measured speedup (issue 4).

    python benchmarks/minilm_fidelity.py [--targets 1.5 2] [--methods spdy uniform global] [--search fast]

Text shipped on this machine (the Python standard library's docstrings, models/text.py): the first
64 sentences calibrate, the next 256 are held out. Fidelity: mean cosine similarity of the
sentence embeddings (mean-pooled over real tokens, as sentence-transformers computes them) to the
dense model's, on the held-out sentences; without and with the layer-wise recovery.
"""

import argparse
import os
import tempfile

import numpy as np
import onnx

from onnx_prune.compiler.compile import _split_held_out, compile_model
from onnx_prune.compiler.fidelity import output_fidelity
from onnx_prune.errors import TargetNotMet
from onnx_prune.models.minilm import load_minilm, tokenize
from onnx_prune.models.text import shipped_sentences
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize
from onnx_prune.passes.rotate import rotate_heads
from onnx_prune.passes.surgery import apply_plan

SEQ = 64
CALIB, HELD_OUT = 64, 256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="*", type=float, default=[1.5, 2.0])
    ap.add_argument("--methods", nargs="*", default=["spdy", "uniform", "global"])
    ap.add_argument("--search", default="fast")
    ap.add_argument("--search-seconds", type=float, default=90)
    ap.add_argument("--recover", default="layer")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, _ = load_minilm()
    feeds = tokenize(shipped_sentences(CALIB), SEQ)
    held = tokenize(shipped_sentences(HELD_OUT, offset=CALIB), SEQ)
    path = os.path.join(tempfile.mkdtemp(), "calib.npz")
    np.savez(path, **feeds)
    shapes = {k: (8, SEQ) for k in feeds}
    canon = canonicalize(model, input_shapes=shapes)
    analysis = analyze_canonical(canon)
    # compile rotates head dimensions on its fitting samples before it plans (passes/rotate.py):
    # the same rotation here, so that "no recovery" is the plan as compile applied it
    rotated = onnx.ModelProto()
    rotated.CopyFrom(canon.model)
    rotate_heads(rotated, analysis, _split_held_out(feeds)[0])
    print("| target | method | search | measured | predicted | held-out embedding cosine, no recovery "
          "| with recovery | seconds | recovery stages (cosine on compile's held-out fifth) | kept per layer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for target in args.targets:
        for method in args.methods:
            search = args.search if method == "spdy" else "fast"
            try:
                result = compile_model(model, target, calib=path, input_shapes=shapes, method=method,
                                       search=search, search_seconds=args.search_seconds, threads=args.threads, recover=args.recover,
                                       batch_size=8)
            except TargetNotMet as exc:
                print(f"| {target:g}x | {method} | {search} | not met: {exc} |")
                continue
            r = result.report
            plain = apply_plan(rotated if r.get("head_rotation", {}).get("groups") else canon.model, analysis,
                               result.plan)
            before = output_fidelity(model, plain, held, "cpu")["mean_pooled_cosine_similarity"]
            after = output_fidelity(model, result.model, held, "cpu")["mean_pooled_cosine_similarity"]
            stages = "; ".join(f"{st['method'].split(' (')[0]} {st.get('held_out_cosine_after', float('nan')):.3f}"
                               + ("" if st["applied"] else " (not applied)") for st in r["recovery"]["stages"])
            again = r["recovery"].get("refit_on_all_samples")
            if again:
                stages += f"; again on all {again['samples']}" + ("" if again["applied"] else " (not used)")
            rounds = ", ".join(f"{x['measured_speedup']:.2f}x" for x in r["rounds"])
            print(f"| {target:g}x | {method} | {search} | {r['measured_speedup']:.2f}x (rounds {rounds}) | {r['predicted_speedup']:.2f}x "
                  f"| {before:.4f} | {after:.4f} | {r['seconds']:.0f} | {stages} | {_kept_per_layer(result.plan)} |",
                  flush=True)


def _kept_per_layer(plan) -> str:
    """Per encoder layer, what the plan keeps: heads, query/key and value dims per head, FFN width."""
    kinds = {"prod0": "h", "query/MatMul/prod1": "qk", "value/MatMul/prod1": "v", "intermediate": "ffn"}
    layers = {}
    for name, keep in plan.items():
        layer = name.split("layer.")[1].split("/")[0] if "layer." in name else "?"
        kind = next((k for pat, k in kinds.items() if pat in name), name)
        layers.setdefault(layer, []).append(f"{kind}{len(keep)}")
    return " ".join(f"L{k}:" + ",".join(v) for k, v in sorted(layers.items()))


if __name__ == "__main__":
    main()
