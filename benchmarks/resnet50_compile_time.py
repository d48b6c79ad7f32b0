"""ResNet-50 at 2x with 256 calibration samples: how long `--search fast` and `--search full` take on
this machine, timing database included, and where the time goes (issue 4).

    python benchmarks/resnet50_compile_time.py [--searches fast full] [--search-seconds 90]

Calibration images: 256 random 224x224 crops (with flips) of scikit-learn's two sample photographs,
normalised with the ImageNet mean/std -- natural-image statistics without a dataset download.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from onnx_prune.compiler.compile import compile_model
from onnx_prune.models.registry import load

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def crops(n=256, size=224, seed=0):
    from sklearn.datasets import load_sample_images

    images = [img.astype(np.float32) / 255 for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for k in range(n):
        img = images[k % len(images)]
        i, j = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        patch = img[i:i + size, j:j + size].transpose(2, 0, 1)
        out[k] = ((patch[:, :, ::-1] if rng.random() < 0.5 else patch) - MEAN) / STD
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--searches", nargs="*", default=["fast", "full"])
    ap.add_argument("--search-seconds", type=float, default=90)
    ap.add_argument("--target", type=float, default=2.0)
    args = ap.parse_args()
    zm = load("light_resnet50")
    name = next(iter(zm.input_shapes))
    path = os.path.join(tempfile.mkdtemp(), "calib.npz")
    np.savez(path, **{name: crops()})
    for search in args.searches:
        t0 = time.time()
        r = compile_model(zm.model, args.target, calib=path, input_shapes=dict(zm.input_shapes), search=search,
                          search_seconds=args.search_seconds, threads=2).report
        phases = ", ".join(f"{k} {v:.0f}s" for k, v in r["phases"].items())
        rounds = " -> ".join(f"{x['measured_speedup']:.2f}x" for x in r["rounds"])
        print(f"--search {search}: {time.time() - t0:.0f} s in all, measured {r['measured_speedup']:.2f}x "
              f"(predicted {r['predicted_speedup']:.2f}x; rounds {rounds}), output cosine "
              f"{r['output_fidelity']['mean_cosine_similarity']:.3f}; {phases}; recovery: {_stages(r)}", flush=True)


def _stages(report) -> str:
    rec = report["recovery"]
    out = [s["method"].split(" (")[0] + ("" if s["applied"] else " (not applied)") for s in rec["stages"]]
    again = rec.get("refit_on_all_samples")
    if again:
        out.append(f"again on all {again['samples']}" + ("" if again["applied"] else " (not used)"))
    return ", ".join(out)


if __name__ == "__main__":
    main()
