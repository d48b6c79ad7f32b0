"""`finetune`: train a model under a sparsity method, then emit the result and measure it.

    data -> canonicalize -> TorchGraph -> method (masks on the prunable weights, or on the
    analysis' channel groups) -> train.run -> export
    -> channel: plan -> surgery -> verify (masked-reference equivalence of the trained weights)
    -> unstructured, N:M: write_sparse (+ sparse initializers) -> sparsity report
    -> dense vs result latency, side by side -> report

Data contract (`--data pkg.module:fn`, or in Python a callable or its return value):

    fn() -> batches                       # training only
    fn() -> (train_batches, val_batches)  # a tuple is always read as (train, validation)

`batches` is a list or any iterable (a generator works) of batches; a batch is a dict
{graph input name: array} (numpy or torch; samples on axis 0), or a tuple (feeds dict, labels)
with one label per sample (integers: class indices, scored by cross-entropy on the first
output, classes on axis 1; floats: regression targets, scored by MSE). Every batch names every
graph input, with the model's rank, fixed dims and kind of dtype (floats are cast to the model's
float type; floats are not accepted for integer inputs). Nothing wrong gets as far as training:
a callable that raises, a batch with other names, shapes or dtypes, or no batch at all is a
UserError naming the batch and what differs.

With --teacher dense (the default) the loss distils to the dense model's outputs and labels are
only used to score validation accuracy; --teacher labels trains on the labels (every training
batch must carry them).

Distributed (torchrun, WORLD_SIZE > 1): the process group is initialised here (gloo on CPU,
nccl on CUDA), every rank takes an equal share of the training batches (batches[rank::world],
the remainder dropped), gradients are averaged over ranks before every optimizer step (what
DistributedDataParallel's reducer does; done here because the methods install hooks on the
TorchGraph itself), so weights stay identical and the masks, computed from them by the same
deterministic rules on every rank, do too; this is checked at the end (digests gathered from
every rank). Only rank 0 emits, verifies, measures and reports.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from onnx_prune.errors import UserError
from onnx_prune.passes.graph import check_model, serialized_size

TEACHERS = ("dense", "labels")
DEVICES = ("cpu", "cuda")
PATTERNS = ("unstructured", "nm", "channel")
DEFAULT_LR = 1e-3
AGREEMENT_TOLERANCE = 1e-3  # trained torch graph vs emitted ONNX model, relative to the output scale

# What ONNX Runtime does with each pattern: the report states it next to the measured ratio.
ACCELERATION = {
    "unstructured": "ONNX Runtime (CPU and CUDA execution providers) runs unstructured sparse weights as dense "
                    "matrices: no speedup is expected, and the measured ratio shows it. The gain is size "
                    "(--sparse-initializers, or compression of the zeros).",
    "nm": "ONNX Runtime's CPU and CUDA execution providers run N:M weights densely: no speedup is expected here. "
          "2:4 is what NVIDIA sparse tensor cores (Ampere and later) accelerate, e.g. through TensorRT's "
          "sparsity mode, which this tool does not measure.",
    "channel": "Channel pruning removes channels from the graph: every backend runs a smaller dense model, so "
               "the measured speedup is real.",
}


@dataclass
class Batch:
    feeds: dict  # {input name: np.ndarray}
    labels: np.ndarray | None = None


@dataclass
class FinetuneData:
    train: list
    val: list = field(default_factory=list)
    name: str = "data"


@dataclass
class FinetuneResult:
    model: onnx.ModelProto
    report: dict
    rank: int = 0  # in a distributed run only rank 0's result is complete and written


# -- options ------------------------------------------------------------------------------------

def check_options(method, pattern, sparsity, epochs, teacher, device, lr):
    """Validate the settings before any data is read; returns (Pattern, sparsity to train for)."""
    from onnx_prune.passes.methods import METHODS
    from onnx_prune.passes.sparsity import parse_pattern

    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (choose: {', '.join(METHODS)})")
    try:
        pat = parse_pattern(pattern)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if pat.kind not in PATTERNS:
        raise UserError(f"finetune emits unstructured, N:M or channel sparsity, not '{pattern}'")
    if pat.kind == "nm":
        implied = 1.0 - pat.n / pat.m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise UserError(f"--pattern {pat} fixes the sparsity at {implied:g}; drop --sparsity or set it to that")
        sparsity = implied
    elif sparsity is None or not 0.0 < float(sparsity) < 1.0:
        raise UserError(f"--sparsity must be between 0 and 1 (exclusive) for --pattern {pat}, got {sparsity}")
    if not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"--epochs must be a positive integer, got {epochs}")
    if teacher not in TEACHERS:
        raise UserError(f"unknown teacher '{teacher}' (choose: {', '.join(TEACHERS)})")
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a positive number, got {lr}")
    check_device(device)
    return pat, float(sparsity)


def check_device(device):
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}' (choose: {', '.join(DEVICES)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; use --device cpu")


# -- data ---------------------------------------------------------------------------------------

def load_data(data, model: onnx.ModelProto) -> FinetuneData:
    """Call the data source and validate every batch against the model's graph inputs."""
    if isinstance(data, FinetuneData):
        return data
    name = data if isinstance(data, str) else getattr(data, "__name__", type(data).__name__)
    if isinstance(data, str):
        out = _call(_import_data(data), name)
    elif callable(data):
        out = _call(data, name)
    else:
        out = data  # the batches themselves (Python API)
    if isinstance(out, dict):
        raise UserError(f"--data '{name}' returned one dict; return a list of batches, e.g. [{{...}}, ...]")
    if isinstance(out, tuple):
        if len(out) != 2:
            raise UserError(f"--data '{name}' returned a tuple of {len(out)}; a tuple means (train_batches, "
                            f"val_batches), return a list for training batches only")
        train, val = out
    else:
        train, val = out, None
    inputs = _graph_inputs(model)
    train = _read_batches(train, name, "training", inputs)
    if not train:
        raise UserError(f"--data '{name}' returned no training batches")
    if val is None:
        return FinetuneData(train, [], name)
    val = _read_batches(val, name, "validation", inputs)
    if not val:
        raise UserError(f"--data '{name}' returned an empty validation set; return only the training batches instead")
    return FinetuneData(train, val, name)


def _import_data(spec):
    """`pkg.module:fn`, imported like calibration callables."""
    from onnx_prune.compiler.calib import import_callable

    if ":" not in spec:
        raise UserError(f"--data '{spec}' is not pkg.module:fn")
    return import_callable(spec, "--data")


def _call(fn, name):
    try:
        return fn()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--data '{name}' raised {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc) -> str:
    return " ".join(str(exc).split())[:300]


def _graph_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _read_batches(source, name, which, inputs) -> list[Batch]:
    if isinstance(source, (dict, str, bytes)) or not hasattr(source, "__iter__"):
        raise UserError(f"--data '{name}': the {which} batches are a {type(source).__name__}, not a list of batches")
    out = []
    try:
        for i, b in enumerate(source):
            out.append(_read_batch(b, f"--data '{name}': {which} batch {i}", inputs))
    except UserError:
        raise
    except Exception as exc:  # the user's generator failed while yielding
        raise UserError(f"--data '{name}' raised {type(exc).__name__} while yielding {which} batches: "
                        f"{_one_line(exc)}") from None
    return out


def _read_batch(b, where, inputs) -> Batch:
    if isinstance(b, tuple):
        if len(b) != 2 or not isinstance(b[0], dict):
            raise UserError(f"{where} is a tuple but not (feeds dict, labels)")
        feeds, labels = b
    elif isinstance(b, dict):
        feeds, labels = b, None
    else:
        raise UserError(f"{where} is a {type(b).__name__}; a batch is a dict {{input name: array}} or (dict, labels)")
    feeds = {k: _array(v, f"{where}, input '{k}'") for k, v in feeds.items()}
    feeds = _check_feeds(feeds, inputs, where)
    if labels is not None:
        labels = _array(labels, f"{where}, labels")
        n = len(next(iter(feeds.values())))
        if labels.ndim == 0 or len(labels) != n:
            raise UserError(f"{where} has {n} samples but labels of shape {labels.shape} (one label per sample)")
        if np.issubdtype(labels.dtype, np.integer):
            labels = labels.astype(np.int64)
        elif np.issubdtype(labels.dtype, np.floating):
            labels = labels.astype(np.float32)
        else:
            raise UserError(f"{where}: labels are {labels.dtype}; use integer classes or float targets")
    return Batch(feeds, labels)


def _array(v, where) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    a = np.asarray(v)
    if a.dtype == object:
        raise UserError(f"{where} is not a numeric array")
    return a


def _check_feeds(feeds, inputs, where) -> dict:
    from onnx_prune.passes.graph import dims_of

    names = [i.name for i in inputs]
    missing, extra = [n for n in names if n not in feeds], [k for k in feeds if k not in names]
    if missing or extra:
        raise UserError(f"{where} has inputs {sorted(feeds)}, the model's are {names}"
                        + (f" (missing: {', '.join(missing)})" if missing else "")
                        + (f" (unknown: {', '.join(extra)})" if extra else ""))
    out = {}
    for inp in inputs:
        arr, dims = feeds[inp.name], dims_of(inp.type)
        if dims is not None:
            if arr.ndim != len(dims):
                raise UserError(f"{where}: input '{inp.name}' has shape {arr.shape}, the model expects rank {len(dims)} "
                                f"{_dims_text(dims)}")
            for k, (d, a) in enumerate(zip(dims, arr.shape)):
                if d is not None and d != a:
                    raise UserError(f"{where}: input '{inp.name}' has shape {arr.shape}, the model expects "
                                    f"{_dims_text(dims)}")
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise UserError(f"{where}: input '{inp.name}' has no samples (shape {arr.shape})")
        want = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if arr.dtype != want:
            # bools and integers widen to what the model takes; floats do not become integers
            if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and np.dtype(want).kind != "f"):
                raise UserError(f"{where}: input '{inp.name}' is {arr.dtype}, the model expects {np.dtype(want)}")
            arr = arr.astype(want)
        out[inp.name] = np.ascontiguousarray(arr)
    return out


def _dims_text(dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _torch_batch(b: Batch, device, with_labels: bool):
    feeds = {k: torch.from_numpy(v).to(device) for k, v in b.feeds.items()}
    if with_labels and b.labels is not None:
        return feeds, torch.from_numpy(b.labels).to(device)
    return feeds


# -- distributed --------------------------------------------------------------------------------

class Distributed:
    """WORLD_SIZE > 1 (torchrun): one process group for the run; otherwise a no-op."""

    def __init__(self, device):
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.owned = False
        self.rank = 0
        if self.world <= 1:
            self.world = 1
            return
        if not dist.is_initialized():
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
            self.owned = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batches: list) -> list:
        """An equal share per rank (collectives run in lockstep, so step counts must match)."""
        if not self.active:
            return batches
        per = len(batches) // self.world
        if per == 0:
            raise UserError(f"{len(batches)} training batch(es) cannot be shared by {self.world} processes; "
                            f"give at least {self.world}")
        return batches[self.rank::self.world][:per]

    def mean(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        self.dist.all_reduce(t)
        return (t / self.world).tolist()

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


class AveragedGradients:
    """An optimizer whose step first averages gradients over ranks (one flat all-reduce), then
    steps the wrapped optimizer: every rank applies the same update to the same weights. It also
    logs at epoch boundaries, the only per-step hook train.run offers besides the method."""

    def __init__(self, inner, params, dist: Distributed, steps_per_epoch, epochs, log):
        self.inner, self.params, self.d = inner, list(params), dist
        self.steps_per_epoch, self.epochs, self.log = steps_per_epoch, epochs, log
        self.steps, self.t0 = 0, time.perf_counter()

    @property
    def state(self):  # train.run clears it for GaP's workers
        return self.inner.state

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self):
        if self.d.active:
            # parameters without a gradient have none on every rank (same graph): skip them, so
            # Adam treats them as a single process would
            with_grad = [p for p in self.params if p.grad is not None]
            if with_grad:
                flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
                self.d.dist.all_reduce(flat)
                flat /= self.d.world
                offset = 0
                for p in with_grad:
                    p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
                    offset += p.grad.numel()
        self.inner.step()
        self.steps += 1
        if self.steps % self.steps_per_epoch == 0:
            self.log(f"epoch {self.steps // self.steps_per_epoch}/{self.epochs} "
                     f"({time.perf_counter() - self.t0:.1f} s)")


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# -- the driver ---------------------------------------------------------------------------------

def finetune_model(model, data, method="pdp", pattern="unstructured", sparsity=None, epochs=10, teacher="dense",
                   device="cpu", lr=DEFAULT_LR, input_shapes=None, sparse_initializers=False, options=None,
                   measure_latency=True, log=lambda msg: None) -> FinetuneResult:
    """Train `model` (path or ModelProto) under `method` to `pattern` at `sparsity`, emit and
    check the result; see the module docstring for `data`. `options` go to the method (e.g.
    {"kappa": 2} for GaP). Raises UserError for bad settings or data, before training."""
    from onnx_prune.passes.canonicalize import canonicalize
    from onnx_prune.passes.graph import load_model

    pat, sparsity = check_options(method, pattern, sparsity, epochs, teacher, device, lr)
    raw = load_model(model)
    data = load_data(data, raw)
    if teacher == "labels" and any(b.labels is None for b in data.train):
        raise UserError("--teacher labels needs (feeds, labels) training batches; "
                        f"--data '{data.name}' gives batches without labels")
    shapes = {**{k: v.shape for k, v in data.train[0].feeds.items()}, **dict(input_shapes or {})}
    canon = canonicalize(raw, input_shapes=shapes)
    analysis = _channel_analysis(canon) if pat.kind == "channel" else None
    t0 = time.perf_counter()
    d = Distributed(device)
    log = log if d.rank == 0 else (lambda msg: None)  # one voice per run
    try:
        trained = _train(canon, analysis, data, method, pat, sparsity, epochs, teacher, device, lr, options, d, log)
        agreement = _agreement(d, trained)
    finally:
        d.close()
    report = {"method": method, "pattern": str(pat), "teacher": teacher, "device": device, "lr": lr,
              "epochs": epochs, "steps": trained["steps"], "losses_per_epoch": trained["epoch_losses"],
              "train_batches": len(data.train), "val_batches": len(data.val), "data": data.name,
              "train_seconds": time.perf_counter() - t0, "notes": list(canon.notes) + trained["notes"]}
    if d.active:
        report["distributed"] = {"world_size": d.world, "rank": d.rank, "backend": "nccl" if device == "cuda" else "gloo",
                                 "batches_per_rank": trained["batches_per_rank"], **agreement}
    if d.rank != 0:
        return FinetuneResult(trained["exported"], report, d.rank)
    feeds = data.train[0].feeds
    if pat.kind == "channel":
        out = _emit_channel(canon, analysis, trained, sparsity, feeds, report)
    else:
        out = _emit_sparse(canon, trained, pat, sparsity, sparse_initializers, feeds, report)
    report["verification"].append(_torch_agreement(trained["net"], out, feeds))
    if data.val:
        report["validation"] = evaluate(canon.model, out, data.val)
    provider = _provider(device)
    if measure_latency:
        log("measuring dense vs result latency side by side")
        report["latency"] = _latency(canon.model, out, feeds, provider)
    report["latency_note"] = ACCELERATION[pat.kind]
    report["seconds"] = time.perf_counter() - t0
    return FinetuneResult(out, report, 0)


def _channel_analysis(canon):
    from onnx_prune.passes.analysis import analyze_canonical

    analysis = analyze_canonical(canon)
    if not analysis.groups:
        raise UserError("nothing in this model can be pruned by channel (run `onnx-prune analyze` to see why); "
                        "try --pattern unstructured or 2:4")
    return analysis


def _train(canon, analysis, data, method, pat, sparsity, epochs, teacher, device, lr, options, d, log) -> dict:
    from onnx_prune.backends.torch_graph import TorchGraph
    from onnx_prune.passes import sparsity as sp
    from onnx_prune.passes.methods import make
    from onnx_prune.passes.methods.train import run

    net = TorchGraph(canon.model).to(device)
    teacher_net = TorchGraph(canon.model).to(device).eval() if teacher == "dense" else None
    shard = d.shard(data.train)
    batches = [_torch_batch(b, device, teacher == "labels") for b in shard]
    _dry_run(net, batches[0], data.name)
    notes = []
    infos = sp.prunable_weights(canon.model)
    steps = epochs * len(batches)
    with warnings.catch_warnings(record=True) as caught:  # N:M layers left dense: say so in the report
        warnings.simplefilter("always")
        try:
            m = make(method, net.parameters_by_initializer(), infos, pat, sparsity, steps, analysis=analysis,
                     on_indivisible="dense", **dict(options or {}))
        except (ValueError, TypeError) as exc:
            raise UserError(f"--method {method} --pattern {pat}: {exc}") from None
    notes += [str(w.message) for w in caught]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = AveragedGradients(torch.optim.Adam(params, lr=lr), params, d, len(batches), epochs, log)
    log(f"training: {method}, {pat} at {sparsity:g}, {epochs} epoch(s) of {len(batches)} batch(es)"
        + (f" per rank x {d.world} ranks" if d.active else ""))
    try:
        losses = run(net, m, batches, epochs=epochs, optimizer=opt, teacher=teacher_net)
    except FloatingPointError as exc:
        raise UserError(f"training diverged: {exc} (--lr {lr:g})") from None
    per_epoch = [float(np.mean(losses[e * len(batches):(e + 1) * len(batches)])) for e in range(epochs)]
    net.cpu()
    masks = {k: v.cpu() for k, v in m.final_masks().items()}
    return {"net": net.eval(), "method": m, "masks": masks, "exported": net.export(), "steps": steps,
            "epoch_losses": d.mean(per_epoch), "batches_per_rank": len(batches), "notes": notes,
            "plan": m.final_plan() if pat.kind == "channel" else None, "infos": infos}


def _dry_run(net, batch, name):
    """One forward of the first batch: data the graph cannot run is the user's to fix, and is
    better said before training than as a traceback from inside an op."""
    feeds = batch[0] if isinstance(batch, tuple) else batch
    try:
        with torch.no_grad():
            net.eval()(**feeds)
    except Exception as exc:
        raise UserError(f"--data '{name}': the first batch does not run through the model "
                        f"({type(exc).__name__}: {_one_line(exc)})") from None


def _agreement(d: Distributed, trained) -> dict:
    """Whether every rank ended with the same masks and weights (digests gathered from all)."""
    if not d.active:
        return {}
    masks = dict(trained["masks"])
    if trained["plan"] is not None:
        masks.update({f"plan:{g}": torch.as_tensor(np.asarray(v)) for g, v in trained["plan"].items()})
    weights = {k: p for k, p in trained["net"].parameters_by_initializer().items()}
    digests = d.gather((_digest(masks), _digest(weights)))
    return {"masks_identical_across_ranks": len({m for m, _w in digests}) == 1,
            "weights_identical_across_ranks": len({w for _m, w in digests}) == 1,
            "mask_digests": [m for m, _w in digests]}


def _emit_channel(canon, analysis, trained, sparsity, feeds, report) -> onnx.ModelProto:
    from onnx_prune.compiler.prune import build_report
    from onnx_prune.passes.surgery import apply_plan
    from onnx_prune.passes.verify import verify

    plan, exported = trained["plan"], trained["exported"]
    pruned = apply_plan(exported, analysis, plan)
    check = verify(exported, pruned, analysis, plan, feeds)
    groups = build_report(analysis, plan)
    removed = groups["channels_total"] - groups["channels_kept"]
    report.update({
        "sparsity_requested": sparsity,
        "sparsity_achieved": removed / max(groups["channels_total"], 1),
        "sparsity_unit": "channels of the prunable groups (each group loses round(sparsity x size), keeps >= 1)",
        "groups": [{"name": g["name"], "channels": g["channels"], "kept": g["kept"],
                    "sparsity": 1 - g["kept"] / g["channels"]} for g in groups["groups"]],
        "channels_total": groups["channels_total"], "channels_kept": groups["channels_kept"],
        "layers": _layer_rows(pruned, exported, trained["infos"]),
        "parameters": {"dense": _param_count(canon.model), "result": _param_count(pruned)},
        "max_abs_error_vs_masked_reference": check.max_abs_error,
        "verification": list(check.checks),
    })
    return pruned


def _layer_rows(pruned, exported, infos) -> dict:
    """Per weight layer: its shape before and after surgery and the share of weights removed."""
    from onnx_prune.passes.sparsity import weight_arrays

    after, before = weight_arrays(pruned), weight_arrays(exported)
    return {k: {"shape": list(before[k].shape), "pruned_shape": list(after[k].shape),
                "sparsity": 1.0 - after[k].size / max(before[k].size, 1)} for k in infos if k in after}


def _param_count(model) -> int:
    from onnx_prune.passes.sparsity import weight_arrays

    return int(sum(a.size for a in weight_arrays(model).values()))


def _emit_sparse(canon, trained, pat, sparsity, sparse_initializers, feeds, report) -> onnx.ModelProto:
    from onnx_prune.passes import sparsity as sp
    from onnx_prune.passes.verify import check_valid

    masks = trained["masks"]
    dense_form = sp.write_sparse(trained["exported"], masks)
    out = sp.write_sparse(trained["exported"], masks, sparse_initializers=True) if sparse_initializers else dense_form
    sr = sp.sparsity_report(out, masks, nm=pat if pat.kind == "nm" else None)
    dense_layers = [k for k in trained["infos"] if k not in masks]
    report.update({
        "sparsity_requested": sparsity,
        "sparsity_achieved": sr["total"]["sparsity"],
        "sparsity_unit": "weights of the masked layers" + (" (one global magnitude budget)" if pat.kind == "unstructured" else ""),
        "weight_sparsity": sr["total"]["weight_sparsity"],
        "layers": {k: {"shape": r["shape"], "sparsity": r["sparsity"], "mask_respected": r["mask_respected"],
                       **({"nm_ok": r["nm_ok"]} if "nm_ok" in r else {})} for k, r in sr["layers"].items()},
        "layers_left_dense": dense_layers,
        "mask_respected": sr["total"]["mask_respected"],
        "sparse_initializers": len(out.graph.sparse_initializer),
        "bytes": {"dense": serialized_size(canon.model), "result": serialized_size(out)},
    })
    if pat.kind == "nm":
        report["nm_check"] = {"pattern": sr["nm"], "ok": sr["total"]["nm_ok"],
                              "axis": "input channels (runs of M consecutive weights)"}
    if out.graph.sparse_initializer:
        # the full check's shape inference types sparse initializers as sparse tensors and fails:
        # check the same weights stored densely in full, the sparse file structurally and in ORT
        from onnx_prune.backends.ort import make_session

        checks = [f"{c} (weights stored densely)" for c in check_valid(canon.model, dense_form)]
        check_model(out, full_check=False)
        make_session(out)
        checks += ["onnx.checker (sparse initializers)", "onnxruntime loads the sparse initializers"]
    else:
        checks = check_valid(canon.model, out)
    if not sr["total"]["mask_respected"]:
        raise RuntimeError("the written weights do not respect their masks")
    checks.append("every pruned weight is an exact zero" + (f"; every masked layer is {pat}" if pat.kind == "nm" else ""))
    if pat.kind == "nm" and not sr["total"]["nm_ok"]:
        raise RuntimeError(f"the written weights break the {pat} pattern")
    report["verification"] = checks
    return out


def _torch_agreement(net, out, feeds) -> str:
    """The emitted model (ONNX Runtime) computes what was trained (the torch graph, masks on)."""
    from onnx_prune.backends.ort import make_session
    from onnx_prune.passes.verify import VerificationError

    with torch.no_grad():
        got = net(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    ref = make_session(out).run(None, feeds)
    err = max(float(np.abs(np.asarray(a, np.float64) - b.double().numpy()).max(initial=0)) for a, b in zip(ref, got))
    scale = max(max(float(np.abs(np.asarray(a, np.float64)).max(initial=0)) for a in ref), 1e-12)
    if err > AGREEMENT_TOLERANCE * scale:
        raise VerificationError(f"the emitted model differs from the trained graph: max abs error {err:.3g} "
                                f"(output scale {scale:.3g})")
    return f"emitted model (ONNX Runtime) = trained graph (torch, masks on): max abs error {err:.2e}, scale {scale:.2e}"


def _provider(device) -> str:
    import onnxruntime as ort

    return "cuda" if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def _latency(dense, result, feeds, provider) -> dict:
    from onnx_prune.backends.measure import measure

    c = measure([dense, result], feeds, provider=provider)  # bench's settings: fewer blocks scatter
    dense_ms, result_ms = c.latencies[0].median_ms, c.latencies[1].median_ms
    out = {"provider": provider, "batch_size": int(next(iter(feeds.values())).shape[0]),
           "dense_ms": dense_ms, "result_ms": result_ms, "speedup": c.ratio,
           "speedup_p10_p90": list(c.ratio_spread), "ratio_of_medians": dense_ms / result_ms}
    lo, hi = c.ratio_spread
    if hi > 1.5 * lo:  # other processes took the cores during some blocks
        out["warning"] = (f"the per-block ratios scattered (p10 {lo:.2f}, p90 {hi:.2f}): the machine was busy; "
                          f"rerun `onnx-prune bench` on a quiet machine before trusting the ratio")
    return out


def evaluate(dense, result, batches: list, provider="cpu") -> dict:
    """Validation: output cosine to the dense model (per sample, mean), and top-1 accuracy (first
    output, classes on axis 1) of both models where the batches carry integer labels."""
    from onnx_prune.backends.ort import make_session
    from onnx_prune.compiler.fidelity import compare

    sd, sr = make_session(dense, provider=provider), make_session(result, provider=provider)
    cos, hits, dense_hits, labeled, mse = [], 0, 0, 0, []
    for b in batches:
        a, r = sd.run(None, b.feeds), sr.run(None, b.feeds)
        cos.extend(compare(a, r, b.feeds)["cos"])
        if b.labels is None:
            continue
        if np.issubdtype(b.labels.dtype, np.integer):
            hits += int((np.asarray(r[0]).argmax(1) == b.labels).sum())
            dense_hits += int((np.asarray(a[0]).argmax(1) == b.labels).sum())
            labeled += len(b.labels)
        else:
            mse.append(float(np.mean((np.asarray(r[0], np.float64) - b.labels) ** 2)))
    out = {"samples": int(sum(len(next(iter(b.feeds.values()))) for b in batches)),
           "output_cosine_to_dense": float(np.mean(cos))}
    if labeled:
        out.update(accuracy=hits / labeled, dense_accuracy=dense_hits / labeled)
    if mse:
        out["mse_to_labels"] = float(np.mean(mse))
    return out


# -- compile --finetune -------------------------------------------------------------------------

def finetune_compiled(model, pruned: onnx.ModelProto, report: dict, data, epochs=5, input_shapes=None,
                      lr=DEFAULT_LR, device=None, log=lambda msg: None) -> onnx.ModelProto:
    """After compile: distil the pruned model (its channels already removed, so no method prunes
    further) to the dense one through TorchGraph. Weights change, shapes do not: the measured
    speedup still holds. With validation batches, the fine-tuned weights are kept only if their
    output cosine to the dense model does not drop there. Trains on CUDA when compile targeted
    CUDA and torch has it (device=None), else on the CPU. Fills report['finetune']."""
    from onnx_prune.backends.torch_graph import TorchGraph
    from onnx_prune.passes.canonicalize import canonicalize
    from onnx_prune.passes.methods.base import Method
    from onnx_prune.passes.methods.train import run
    from onnx_prune.passes.verify import check_valid

    if not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"--epochs must be a positive integer, got {epochs}")
    if device is None:
        device = "cuda" if report.get("provider") == "cuda" and torch.cuda.is_available() else "cpu"
    check_device(device)
    t0 = time.perf_counter()
    dense = canonicalize(model, input_shapes=input_shapes).model  # the graph compile pruned
    data = load_data(data, dense)
    student = TorchGraph(pruned).to(device)
    teacher = TorchGraph(dense).to(device).eval()
    batches = [_torch_batch(b, device, False) for b in data.train]
    _dry_run(student, batches[0], data.name)
    keep_all = Method({}, {}, "unstructured", 0.0, epochs * len(batches))  # no hooks, no pruning
    try:
        losses = run(student, keep_all, batches, epochs=epochs, lr=lr, teacher=teacher)
    except FloatingPointError as exc:
        raise UserError(f"fine-tuning diverged: {exc} (lr {lr:g})") from None
    tuned = student.cpu().export()
    checks = check_valid(pruned, tuned)
    same = all(tuple(a.dims) == tuple(b.dims) for a, b in zip(pruned.graph.initializer, tuned.graph.initializer))
    if not same:
        raise RuntimeError("fine-tuning changed an initializer's shape")
    checks.append("every initializer keeps its shape (the measured latency holds)")
    scored = data.val or data.train
    before = evaluate(dense, pruned, scored)["output_cosine_to_dense"]
    after = evaluate(dense, tuned, scored)["output_cosine_to_dense"]
    applied = after >= before or not data.val
    n = len(data.train)
    report["finetune"] = {
        "data": data.name, "epochs": epochs, "lr": lr, "device": device, "teacher": "dense",
        "losses_per_epoch": [float(np.mean(losses[e * n:(e + 1) * n])) for e in range(epochs)],
        "scored_on": "validation batches" if data.val else "training batches (no validation batches given)",
        "output_cosine_to_dense_before": before, "output_cosine_to_dense_after": after,
        "applied": applied, "verification": checks, "seconds": time.perf_counter() - t0,
    }
    log(f"fine-tune: {epochs} epoch(s), output cosine to dense {before:.4f} -> {after:.4f}"
        + ("" if applied else " (not applied)"))
    if not applied:
        return pruned
    if report.get("max_abs_error_vs_masked_reference") is not None:  # it held for the weights before
        report["max_abs_error_before_finetune"] = report["max_abs_error_vs_masked_reference"]
        report["max_abs_error_vs_masked_reference"] = None
    if "output_fidelity" in report:  # measured on the weights before fine-tuning
        report["output_fidelity_before_finetune"] = report.pop("output_fidelity")
    return tuned
