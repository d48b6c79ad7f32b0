"""Per-kernel times from ONNX Runtime's own profiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnx_prune.backends.ort import make_session, session_input
from onnx_prune.passes.graph import attr


@dataclass
class Kernel:
    name: str  # node name in ORT's optimized graph
    op: str
    time_us: float  # median over profiled runs
    inputs: list  # shapes
    outputs: list
    values: tuple = ()  # names of the values its node writes, then reads, in ORT's optimized graph
    perm: tuple = ()  # a Transpose's perm in ORT's optimized graph, () if unset (axes reversed)


@dataclass
class Profile:
    kernels: dict  # name -> Kernel
    e2e_ms: float  # median wall time of a run without profiling
    # median wall time of a profiled run outside its kernels, measured within the same runs: unlike
    # e2e_ms - kernel_ms, not moved by this machine's speed changing between two measurements
    run_overhead_ms: float | None = None

    @property
    def kernel_ms(self) -> float:
        return sum(k.time_us for k in self.kernels.values()) / 1e3


def profile_session_runs(model, feeds, provider="cpu", threads=None, runs=10, warmup=3, node_values=False,
                         min_seconds=0.0, max_runs=None, run_overheads_ms: list | None = None, blocking=True) -> dict:
    """Median kernel time per node over `runs` profiled runs (warm-up runs are dropped; the
    median, as a run hit by a slow spell of this shared machine must not move it). With
    `min_seconds`, runs go on until they have taken that long, up to `max_runs`: cheap graphs get
    more runs, where a kernel of a few µs needs them.

    With `node_values`, each kernel also gets the value names its node reads and writes, from
    the optimized graph ORT saves: nodes ORT inserts itself (layout reorders) are named after
    nothing in the model, but the values they convert are the model's.

    `run_overheads_ms`, if given, receives each measured run's wall time outside its kernels.

    On CUDA the runs are profiled in a child process with launches blocking (`_blocking_child`);
    `blocking=False` profiles here, where ORT times each node's launches."""
    if blocking and _profiled_in_child(provider):
        options = dict(provider=provider, threads=threads, runs=runs, warmup=warmup, node_values=node_values,
                       min_seconds=min_seconds, max_runs=max_runs)
        (kernels,), (overheads,) = _blocking_child([(model, feeds)], options)
        if run_overheads_ms is not None:
            run_overheads_ms.extend(overheads)
        return kernels
    folder = tempfile.mkdtemp(prefix="onnx-prune-prof-")
    walls = []
    values, perms = {}, {}
    try:
        optimized = os.path.join(folder, "optimized.onnx") if node_values else None
        sess = make_session(model, provider=provider, threads=threads, quiet=True,
                            profile_prefix=os.path.join(folder, "p"), optimized_path=optimized)
        for _ in range(warmup):
            sess.run(None, feeds)
        done, start = 0, time.perf_counter()
        while done < runs or (done < (max_runs or runs) and time.perf_counter() - start < min_seconds):
            t = time.perf_counter()
            sess.run(None, feeds)
            walls.append((time.perf_counter() - t) * 1e3)
            done += 1
        path = sess.end_profiling()
        with open(path) as f:
            events = json.load(f)
        if optimized:
            graph = onnx.load(optimized, load_external_data=False).graph
            values = {_model_name(n.name): tuple(n.output) + tuple(n.input) for n in graph.node}
            perms = {_model_name(n.name): tuple(attr(n, "perm", ())) for n in graph.node if n.op_type == "Transpose"}
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    if run_overheads_ms is not None:
        run_overheads_ms.extend(_outside_kernels_ms(events, walls))
    per_run = defaultdict(list)
    info = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time"):
            continue
        name = _model_name(ev["name"][: -len("_kernel_time")])
        per_run[name].append(float(ev["dur"]))
        args = ev.get("args", {})
        info[name] = (args.get("op_name", ""), _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape")))
    kernels = {}
    for name, durs in per_run.items():
        durs = durs[warmup * len(durs) // (warmup + done):]  # drop the warm-up calls
        op, ins, outs = info[name]
        kernels[name] = Kernel(name, op, float(np.median(durs)), ins, outs, values.get(name, ()), perms.get(name, ()))
    return kernels


# A CUDA kernel launch returns before the GPU has run the kernel, and ORT's profiler times the
# launch: on an H200, ResNet-50's convs took 40-46 µs each whatever their width (batch 1). With
# CUDA_LAUNCH_BLOCKING=1 every launch waits for its kernel, so a node's time holds its GPU work
# (and the launch, which the dense profile's kernels hold alike). CUDA reads the variable when it
# starts: those profiles run in a child process.
def profile_each(jobs, provider="cpu", threads=None, **options) -> list:
    """profile_session_runs over (model, feeds) pairs; on CUDA all in one child process (CUDA and
    cuDNN start once, about 2 s a process on an H200)."""
    if _profiled_in_child(provider):
        return _blocking_child(jobs, dict(provider=provider, threads=threads, **options))[0]
    return [profile_session_runs(m, f, provider, threads, **options) for m, f in jobs]


def _profiled_in_child(provider) -> bool:
    """Whether profiles go to a child process: on CUDA, unless this is that child."""
    return provider == "cuda" and os.environ.get("CUDA_LAUNCH_BLOCKING") != "1"


def _blocking_child(jobs, options: dict) -> tuple[list, list]:
    """Profile each (model, feeds) of `jobs` (an iterable, written to disk one at a time) in a child
    process with CUDA_LAUNCH_BLOCKING=1: (kernels per job, run overheads per job)."""
    from onnx_prune.passes.graph import save_model

    with tempfile.TemporaryDirectory(prefix="onnx-prune-cuda-") as folder:
        models = []
        for k, (model, feeds) in enumerate(jobs):
            path = model if isinstance(model, str) else os.path.join(folder, f"model{k}.onnx")
            if isinstance(model, bytes):
                with open(path, "wb") as f:
                    f.write(model)
            elif not isinstance(model, str):
                save_model(model, path)
            np.savez(os.path.join(folder, f"feeds{k}.npz"), **feeds)
            models.append(path)
        with open(os.path.join(folder, "options.json"), "w") as f:
            json.dump({**options, "models": models}, f)
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        done = subprocess.run([sys.executable, "-m", "onnx_prune.backends.profile", folder], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"profiling on CUDA failed: {done.stderr.strip()[-2000:]}")
        with open(os.path.join(folder, "kernels.json")) as f:
            results = json.load(f)
    kernels = [{name: Kernel(**{**k, "inputs": [tuple(s) for s in k["inputs"]],
                                "outputs": [tuple(s) for s in k["outputs"]], "values": tuple(k["values"]),
                                "perm": tuple(k["perm"])})
                for name, k in r["kernels"].items()} for r in results]
    return kernels, [r["run_overheads_ms"] for r in results]


def _child_main(folder: str) -> None:
    with open(os.path.join(folder, "options.json")) as f:
        options = json.load(f)
    results = []
    for k, model in enumerate(options.pop("models")):
        with np.load(os.path.join(folder, f"feeds{k}.npz")) as data:
            feeds = {name: data[name] for name in data.files}
        overheads = []
        kernels = profile_session_runs(model, feeds, run_overheads_ms=overheads, **options)
        results.append({"kernels": {n: asdict(k) for n, k in kernels.items()}, "run_overheads_ms": overheads})
    with open(os.path.join(folder, "kernels.json"), "w") as f:
        json.dump(results, f)


def _outside_kernels_ms(events, walls) -> list:
    """Per measured run (the last len(walls) of the profile's runs): its wall time minus the
    kernel times recorded within it (ORT's model_run event bounds a run)."""
    runs = sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in events if ev.get("name") == "model_run")
    runs = runs[len(runs) - len(walls):] if len(runs) >= len(walls) else []
    inside = [0.0] * len(runs)
    starts = [a for a, _ in runs]
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            i = int(np.searchsorted(starts, ev["ts"], side="right")) - 1
            if i >= 0 and ev["ts"] <= runs[i][1]:
                inside[i] += ev["dur"] / 1e3
    return [wall - k for wall, k in zip(walls[-len(runs):], inside)] if runs else []


# ORT CPU runs a float16 model's float16-less kernels in float32, between Casts it inserts, and
# renames those nodes with this prefix
FP16_CAST_PREFIX = "InsertedPrecisionFreeCast_"


def _model_name(name: str) -> str:
    return name[len(FP16_CAST_PREFIX):] if name.startswith(FP16_CAST_PREFIX) else name


def _shapes(entries):
    out = []
    for e in entries or []:
        out.extend(tuple(v) for v in e.values())
    return out


def profile_model(model, feeds, provider="cpu", threads=None, runs=10, rounds=3) -> Profile:
    """Kernel times, and the end-to-end median measured without the profiler's overhead.

    A shared machine has slow spells (a core taken away for seconds): profile in a few rounds
    and keep the fastest, whose kernel times and end-to-end time come from the same spell: the
    fastest by both, as a round can have its plain runs fast and its kernels in a slow spell
    (MobileNetV2 at batch 64: 14.6 ms of kernels, 10.9 ms a plain run). Plain runs alternating
    with the profiled ones in short blocks ran ViT 25% slower than alone: the plain runs follow."""
    from onnx_prune.backends.measure import measure

    model = session_input(model)  # once for the sessions below
    plain = make_session(model, provider=provider, threads=threads)
    best = None
    for _ in range(rounds):
        # the optimized graph is read in every round: ORT names the reorders it inserts
        # (ReorderOutput_token_57...) in an order that changes from one session to the next, so
        # a name read from one session's graph is another value's reorder in the next session
        overheads = []
        kernels = profile_session_runs(model, feeds, provider, threads, runs, node_values=True,
                                       run_overheads_ms=overheads)
        e2e = measure([model], feeds, blocks=4, sessions=[plain]).latencies[0].median_ms
        found = Profile(kernels, e2e, float(np.median(overheads)) if overheads else None)
        if best is None or found.kernel_ms + found.e2e_ms < best.kernel_ms + best.e2e_ms:
            best = found
    return best


if __name__ == "__main__":
    _child_main(sys.argv[1])
