"""Pretrained MiniLM-L6, one-shot: sentence-embedding fidelity at equal measured speedup (issue 4).

    python benchmarks/minilm_fidelity.py [--targets 1.5 2] [--methods spdy uniform global]

Calibration: 64 sentences of text shipped on this machine (the MiniLM package's README), seq 64.
Fidelity: mean cosine similarity of the model's output to the dense model's, per sample, as
`compile` reports it (`output_fidelity`); the same sentences are used for calibration and scoring
until the error database with held-out evaluation lands.
"""

import argparse
import os
import tempfile

import numpy as np

from onnx_prune.compiler.compile import compile_model
from onnx_prune.errors import TargetNotMet
from onnx_prune.models.minilm import load_minilm, sample_sentences, tokenize

SEQ = 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="*", type=float, default=[1.5, 2.0])
    ap.add_argument("--methods", nargs="*", default=["spdy", "uniform", "global"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, _ = load_minilm()
    sentences = (sample_sentences() * 3)[:64]
    feeds = tokenize(sentences, SEQ)
    path = os.path.join(tempfile.mkdtemp(), "calib.npz")
    np.savez(path, **feeds)
    shapes = {k: (8, SEQ) for k in feeds}
    print("| target | method | measured | predicted | mean cosine | rel. L2 error |")
    print("|---|---|---|---|---|---|")
    for target in args.targets:
        for method in args.methods:
            try:
                r = compile_model(model, target, calib=path, input_shapes=shapes, method=method,
                                  threads=args.threads, batch_size=8).report
            except TargetNotMet as exc:
                r = exc.report
            fid = r["output_fidelity"]
            print(f"| {target:g}x | {method} | {r['measured_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | "
                  f"{fid['mean_cosine_similarity']:.3f} | {fid['mean_relative_l2_error']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
