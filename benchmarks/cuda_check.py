"""What ONNX Runtime's profiler reports on the CUDA execution provider (issue 3), on a machine with
an NVIDIA GPU and onnxruntime-gpu.

    python benchmarks/cuda_check.py [--batch N ...] [NAME ...]   (zoo names, or one of BUILDERS)

For each model and batch size: the dense model's end-to-end latency (and its ratio to itself,
measured side by side), the sum of the kernel times of its profile and the largest kernels, and
the timing database's curve of its largest layer over the output width. On CUDA both profiles
run with launches blocking (backends/profile.py): timed asynchronously, every ResNet-50 conv
took 40-46 µs whatever its width, the launch and not the GPU's work.
"""

import argparse
import time

import numpy as np

from onnx_prune.backends.measure import measure
from onnx_prune.backends.ort import feeds_for
from onnx_prune.backends.profile import profile_model, profile_session_runs
from onnx_prune.backends.timing import TimingDB, axis_points, layer_sig, width_grid
from onnx_prune.errors import UserError
from onnx_prune.models.registry import load
from onnx_prune.passes.analysis import analyze_canonical
from onnx_prune.passes.canonicalize import canonicalize


def bert_minilm_shaped(seq=128):
    """A BERT of MiniLM-L6's shape (384 wide, 6 layers, 12 heads), random weights: the zoo's MiniLM
    reads its weights from a package the GPU machine does not have."""
    import torch
    import transformers

    from onnx_prune import from_torch
    from onnx_prune.models.hf import SingleOutput

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, attn_implementation="eager")
    names = ("input_ids", "attention_mask")
    module = SingleOutput(transformers.BertModel(config, add_pooling_layer=False), names, "last_hidden_state")
    ids = torch.randint(0, config.vocab_size, (1, seq))
    model = from_torch(module, (ids, torch.ones(1, seq, dtype=torch.int64)), input_names=list(names))
    return model, {"input_ids": (1, seq), "attention_mask": (1, seq)}


def resnet50_dynamic_batch():
    """ResNet-50 from the zoo's blocks (torch, batch dim dynamic): the zoo's light_resnet50 has a
    fixed batch of 1."""
    import torch

    from onnx_prune import from_torch
    from onnx_prune.models.zoo import Bottleneck, ResNet, init_weights

    torch.manual_seed(0)
    module = init_weights(ResNet(Bottleneck, (64, 128, 256, 512), (3, 4, 6, 3), stem=64, classes=1000)).eval()
    return from_torch(module, torch.randn(1, 3, 224, 224), input_names=["x"]), {"x": (1, 3, 224, 224)}


BUILDERS = {"bert_minilm_shaped": bert_minilm_shaped, "resnet50_dynamic_batch": resnet50_dynamic_batch}


def model_and_shapes(name):
    """A zoo model, or one of BUILDERS: (model, input shapes)."""
    if name in BUILDERS:
        return BUILDERS[name]()
    entry = load(name)
    return entry.model, dict(entry.input_shapes)


def largest_layer(canon):
    index = analyze_canonical(canon).ctx.index
    sigs = [s for s in (layer_sig(n, index) for n in canon.model.graph.node) if s is not None]
    return max(sigs, key=lambda s: np.prod(s.full) * np.prod(s.attrs[0] if s.attrs else 1))


def check(name, batch, provider):
    model, shapes = model_and_shapes(name)
    try:
        model, feeds = feeds_for(model, shapes, batch)
    except UserError as e:
        print(f"  {name} batch {batch}: {e}")
        return
    shapes = {k: v.shape for k, v in feeds.items()}
    canon = canonicalize(model, input_shapes=shapes)
    same = measure([canon.model, canon.model], feeds, provider=provider, blocks=8)
    t = time.time()
    prof = profile_model(canon.model, feeds, provider=provider)
    top = sorted(prof.kernels.values(), key=lambda k: -k.time_us)[:4]
    print(f"  {name} batch {batch}: e2e {prof.e2e_ms:.3f} ms (self-ratio {same.ratio:.3f}), kernels sum "
          f"{prof.kernel_ms:.3f} ms over {len(prof.kernels)}, outside kernels {prof.run_overhead_ms or 0:.3f} ms; "
          f"profile {time.time() - t:.1f} s", flush=True)
    print("    largest: " + "; ".join(f"{k.op} {k.time_us:.1f} us {k.outputs[:1]}" for k in top))
    # what ORT's profiler gives with launches asynchronous: the host's side of each kernel (a
    # launch-bound model runs at their pace whatever pruning does to the GPU's side)
    launches = profile_session_runs(canon.model, feeds, provider, runs=10, blocking=False)
    print(f"    launches timed asynchronously: {sum(k.time_us for k in launches.values()) / 1e3:.3f} ms over "
          f"{len(launches)} kernels", flush=True)
    sig = largest_layer(canon)
    axis = len(sig.full) - 1
    grid = width_grid(sig.full[axis], max_points=8)
    db = TimingDB(provider, use_cache=False)
    t = time.time()
    db.ensure(axis_points(sig, [[sig.full[a]] for a in range(axis)] + [grid]))
    curve = [db.get(sig, tuple(sig.full[:axis]) + (w,)) for w in grid]
    print(f"    {sig.op} {sig.full} lead {sig.lead}: output width -> us: "
          + ", ".join(f"{w}:{c:.1f}" for w, c in zip(grid, curve)) + f" ({time.time() - t:.1f} s)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=["light_resnet50", "bert_minilm_shaped"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--provider", default="cuda", help=argparse.SUPPRESS)  # cpu: to try this script without a GPU
    args = ap.parse_args()
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, "
          f"providers {ort.get_available_providers()}", flush=True)
    for name in args.names:
        for batch in args.batch:
            check(name, batch, args.provider)


if __name__ == "__main__":
    main()
