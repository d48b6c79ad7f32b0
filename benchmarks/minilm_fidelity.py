"""Pretrained MiniLM-L6, one-shot: sentence-embedding fidelity at equal measured speedup (issue 4).

    python benchmarks/minilm_fidelity.py [--targets 1.5 2] [--methods spdy uniform global]

Text shipped on this machine (the MiniLM package's README, 31 sentences), seq 64: the first 20
calibrate (repeated to 60 samples), the other 11 are held out. Fidelity: mean cosine similarity of
the model's output to the dense model's (all token positions), on the held-out sentences.
"""

import argparse
import os
import tempfile

import numpy as np

from onnx_prune.compiler.compile import compile_model, output_fidelity
from onnx_prune.errors import TargetNotMet
from onnx_prune.models.minilm import load_minilm, sample_sentences, tokenize

SEQ = 64


def canon_model(model, shapes):
    from onnx_prune.passes.analysis import analyze_canonical
    from onnx_prune.passes.canonicalize import canonicalize

    canon = canonicalize(model, input_shapes=shapes)
    return canon.model, analyze_canonical(canon.static)


def apply_plan(canon_and_analysis, plan):
    from onnx_prune.passes.surgery import apply_plan as surgery

    model, analysis = canon_and_analysis
    return surgery(model, analysis, plan)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="*", type=float, default=[1.5, 2.0])
    ap.add_argument("--methods", nargs="*", default=["spdy", "uniform", "global"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, _ = load_minilm()
    sentences = sample_sentences()
    feeds = tokenize((sentences[:20] * 3)[:60], SEQ)
    held = tokenize(sentences[20:], SEQ)
    path = os.path.join(tempfile.mkdtemp(), "calib.npz")
    np.savez(path, **feeds)
    shapes = {k: (8, SEQ) for k in feeds}
    print("| target | method | measured | predicted | held-out cosine, no recovery | with recovery |")
    print("|---|---|---|---|---|---|")
    for target in args.targets:
        for method in args.methods:
            try:
                result = compile_model(model, target, calib=path, input_shapes=shapes, method=method,
                                       threads=args.threads, batch_size=8)
            except TargetNotMet as exc:
                print(f"| {target:g}x | {method} | not met: {exc} |")
                continue
            r = result.report
            plain = apply_plan(canon_model(model, shapes), result.plan)
            before = output_fidelity(model, plain, held, "cpu")["mean_cosine_similarity"]
            after = output_fidelity(model, result.model, held, "cpu")["mean_cosine_similarity"]
            print(f"| {target:g}x | {method} | {r['measured_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | "
                  f"{before:.3f} | {after:.3f} |", flush=True)


if __name__ == "__main__":
    main()
