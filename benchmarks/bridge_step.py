"""A training step through the torch bridge vs the same step on the native torch module (issue 5).

    python benchmarks/bridge_step.py [--batch 8] [--size 128] [--threads 1] [--blocks 8] [--steps 2] [--device cpu|cuda]

ResNet-18 (the zoo's ResNet at 64-512 channels, 11.7 M parameters, 1000 classes); one step is
forward, cross-entropy, backward and an SGD (momentum) update. Two pairs, each timed in interleaved
blocks (native then bridge, bridge then native, ...) after a warm-up; the ratio is the median of
the per-block ratios:
  fused: the graph from `from_torch` (BatchNorm folded into the convs, as its eval-mode export does)
         vs the native module with the same folding;
  bn:    a training-mode export (BatchNormalization kept, batch statistics) vs the native module
         with BatchNorm, both in train mode.
Target: ratio <= 1.3.
"""

import argparse
import copy
import io
import statistics
import time
import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from onnx_prune.backends.torch_graph import TorchGraph
from onnx_prune.models.torch_export import from_torch
from onnx_prune.models.zoo import BasicBlock, ResNet


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return ResNet(BasicBlock, (64, 128, 256, 512), (2, 2, 2, 2), stem=64, classes=1000)


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every (Conv2d, BatchNorm2d) pair of a Sequential into the conv, as the ONNX export does."""
    for child in module.children():
        fuse_batchnorm(child)
    if isinstance(module, nn.Sequential):
        layers = list(module)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
                module[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(layers[i].eval(), layers[i + 1].eval())
                module[i + 1] = nn.Identity()
    return module


def training_export(module: nn.Module, example) -> onnx.ModelProto:
    """Export in training mode: BatchNormalization stays in the graph (from_torch folds it)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.train(), (example,), buffer, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=["input"], output_names=["output"])
    return onnx.load_from_string(buffer.getvalue())


def make_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def timed(step, steps) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()  # a GPU step returns before its kernels have run: time them done
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def compare(native, bridge, x, y, blocks, steps):
    """(native s/step, bridge s/step, median ratio, p10, p90, max relative output difference)."""
    native.train(), bridge.train()
    with torch.no_grad():  # same weights, same batch: the first forward must agree
        a, b = native(x), bridge(x)
    diff = float((a - b).abs().max() / a.abs().max())
    step_a, step_b = make_step(native, x, y), make_step(bridge, x, y)
    step_a(), step_b()  # warm-up
    times_a, times_b, ratios = [], [], []
    for block in range(blocks):
        if block % 2 == 0:
            ta, tb = timed(step_a, steps), timed(step_b, steps)
        else:
            tb, ta = timed(step_b, steps), timed(step_a, steps)
        times_a.append(ta), times_b.append(tb), ratios.append(tb / ta)
    p10, p90 = np.percentile(ratios, [10, 90])
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios), p10, p90, diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))

    base = resnet18().eval()
    fused = fuse_batchnorm(copy.deepcopy(base))
    pairs = {
        "fused": (fused, TorchGraph(from_torch(fused, x[:1]))),
        "bn": (copy.deepcopy(base), TorchGraph(training_export(copy.deepcopy(base), x[:1]))),
    }
    x, y = x.to(args.device), y.to(args.device)
    for name, (native, bridge) in pairs.items():
        native, bridge = native.to(args.device), bridge.to(args.device)
        ta, tb, ratio, p10, p90, diff = compare(native, bridge, x, y, args.blocks, args.steps)
        print(f"bridge_step [{name}]: ResNet-18 batch {args.batch} 3x{args.size}x{args.size}, "
              f"{args.device}, {args.threads} thread(s): native {ta * 1e3:.0f} ms, bridge {tb * 1e3:.0f} ms per training step, ratio {ratio:.3f}x "
              f"(p10 {p10:.3f}, p90 {p90:.3f}; target <= 1.3x; first-forward rel. diff {diff:.1e})", flush=True)


if __name__ == "__main__":
    main()
