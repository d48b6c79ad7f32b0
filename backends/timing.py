"""Timing database: measured kernel times of weight layers at candidate widths.

A weight layer's time depends on its input and output widths, which usually belong to two
different groups. For each layer signature (op, kernel, strides, spatial size, batch...) the
database holds t(cin, cout_full) over a grid of input widths and t(cin_full, cout) over a grid of
output widths, and estimates t(cin, cout) = t(cin, full) * t(full, cout) / t(full, full).

Points are measured in bulk: one ONNX model holds every (signature, width) point as an
independent node, ORT's profiler times each kernel (so the layout reorders ORT inserts around a
lone conv do not count), and identical points are measured once. Results are cached on disk,
keyed by what changes timing: provider, ORT version, CPU (or GPU) model and threads; the
signature itself holds the batch size and shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.backends.profile import profile_session_runs
from onnx_prune.passes.graph import attr

CHUNK_BYTES = 192 << 20  # weights per microbenchmark model
MAX_GRID = 24
SCHEMA = 3  # bump when what a stored time means changes


@dataclass(frozen=True)
class LayerSig:
    """What determines a weight layer's time, apart from its two widths."""

    op: str  # Conv | ConvTranspose | MatMul | Gemm
    cin: int
    cout: int
    lead: tuple  # Conv: (N, H, W) of the input; MatMul/Gemm: leading dims of the input
    attrs: tuple = ()  # Conv: kernel, strides, pads, dilations

    def key(self) -> str:
        return f"{self.op}|{self.lead}|{self.attrs}"


def layer_sig(node, index) -> LayerSig | None:
    """Signature of a dense (group 1) weight layer with a constant weight; None otherwise."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        w = index.shape(node.input[1])
        x = index.shape(node.input[0])
        if w is None or x is None or len(x) != 4:
            return None
        attrs = (tuple(w[2:]), tuple(attr(node, "strides", [1, 1])), tuple(attr(node, "pads", [0, 0, 0, 0])),
                 tuple(attr(node, "dilations", [1, 1])), tuple(attr(node, "output_padding", []) or ()))
        group = attr(node, "group", 1)
        if op == "Conv" and group == x[1] == w[0] and w[1] == 1:  # depthwise: one width
            return LayerSig("ConvDW", x[1], x[1], (x[0],) + tuple(x[2:]), attrs)
        if group != 1:
            return None
        cin, cout = (w[1], w[0]) if op == "Conv" else (w[0], w[1])
        return LayerSig(op, cin, cout, (x[0],) + tuple(x[2:]), attrs)
    if op in ("MatMul", "Gemm") and node.input[1] in index.inits:
        a, b = index.shape(node.input[0]), index.shape(node.input[1])
        if a is None or b is None or len(b) != 2:
            return None
        if op == "Gemm":
            if attr(node, "transA", 0):
                return None
            cin, cout = (b[1], b[0]) if attr(node, "transB", 0) else b
            return LayerSig("Gemm", cin, cout, (a[0],))
        return LayerSig("MatMul", b[0], b[1], tuple(a[:-1]))
    return None


def environment(provider: str, threads) -> dict:
    import onnxruntime as ort

    return {"schema": SCHEMA, "provider": provider, "ort": ort.__version__, "device": _device_name(provider),
            "threads": threads or 0, "machine": platform.machine()}


def _device_name(provider):
    if provider == "cuda":
        try:
            import subprocess

            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            return "cuda"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cache_dir() -> str:
    return os.environ.get("ONNX_PRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "onnx-prune")


class TimingDB:
    """Kernel time (µs) per (signature, cin, cout), on one provider/device/thread count."""

    def __init__(self, provider="cpu", threads=None, path=None, use_cache=True):
        self.provider, self.threads = provider, threads
        self.env = environment(provider, threads)
        digest = hashlib.sha1(json.dumps(self.env, sort_keys=True).encode()).hexdigest()[:16]
        self.path = path or os.path.join(cache_dir(), f"timing-{digest}.json")
        self.use_cache = use_cache
        self.times: dict[str, float] = {}
        self.measured = 0  # points measured by this instance (0 when all came from the cache)
        if use_cache and os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    data = json.load(f)
                if data.get("env") == self.env:
                    self.times = data.get("times", {})
            except (OSError, ValueError):
                self.times = {}

    @staticmethod
    def point_key(sig: LayerSig, cin: int, cout: int) -> str:
        return f"{sig.key()}|{cin}|{cout}"

    def get(self, sig, cin, cout):
        return self.times.get(self.point_key(sig, cin, cout))

    def ensure(self, points):
        """Measure the (sig, cin, cout) points not yet known, in bulk, and save."""
        todo = sorted({(s, ci, co) for s, ci, co in points if self.get(s, ci, co) is None},
                      key=lambda p: (p[0].key(), p[1], p[2]))
        if not todo:
            return
        for chunk in _chunks(todo):
            model, names = _bench_model(chunk)
            feeds = {f"x{i}": np.random.default_rng(i).standard_normal(_input_shape(s, ci)).astype(np.float32)
                     for i, (s, ci, _co) in enumerate(chunk)}
            kernels = profile_session_runs(model, feeds, self.provider, self.threads, runs=5, warmup=2)
            for (s, ci, co), name in zip(chunk, names):
                t = _kernel_for(kernels, name)
                if t <= 0:
                    raise RuntimeError(f"the profiler reported no kernel for {s.op} {ci}->{co}")
                self.times[self.point_key(s, ci, co)] = t
            self.measured += len(chunk)
        self.save()

    def save(self):
        if not self.use_cache:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"env": self.env, "times": self.times}, f)
        os.replace(tmp, self.path)

    # -- estimates -------------------------------------------------------------------------
    def curve(self, sig: LayerSig, side: str, widths):
        """Measured times along one side ('in' or 'out') with the other side full."""
        if sig.op == "ConvDW":
            return np.array([self.get(sig, w, w) for w in widths], dtype=float)
        if side == "in":
            return np.array([self.get(sig, w, sig.cout) for w in widths], dtype=float)
        return np.array([self.get(sig, sig.cin, w) for w in widths], dtype=float)

    def estimate(self, sig: LayerSig, cin: int, cout: int, grid_in, grid_out) -> float:
        """t(cin, cout) from the two measured curves (separable model), interpolated between points."""
        if sig.op == "ConvDW":
            return float(np.interp(cin, grid_in, self.curve(sig, "in", grid_in)))
        full = self.get(sig, sig.cin, sig.cout)
        t_in = float(np.interp(cin, grid_in, self.curve(sig, "in", grid_in)))
        t_out = float(np.interp(cout, grid_out, self.curve(sig, "out", grid_out)))
        return t_in * t_out / full if full else 0.0


def width_grid(n: int, max_points=MAX_GRID) -> list[int]:
    """Widths to measure for n channels: every width up to 8, then multiples of 8 (ORT's CPU
    kernels work in 8/16-channel blocks; a width off the block breaks the blocked layout of the
    whole chain, which a lone-layer measurement cannot see), thinned to at most `max_points`,
    always with n itself."""
    if n <= 8:
        return list(range(1, n + 1))
    grid = sorted({w for w in range(8, n, 8)} | {n})
    if len(grid) > max_points:
        step = int(np.ceil(len(grid) / max_points))
        grid = sorted(set(grid[::step]) | {n})
    return grid


def fast_widths(widths, times) -> list[int]:
    """Widths no wider width beats: more channels for less or equal time makes a width useless."""
    keep = []
    best = np.inf
    for w, t in sorted(zip(widths, times), key=lambda p: -p[0]):
        if t < best:
            keep.append(w)
            best = t
    return sorted(keep)


def _input_shape(sig: LayerSig, cin: int):
    if sig.op in ("Conv", "ConvTranspose", "ConvDW"):
        n, h, w = sig.lead
        return (n, cin, h, w)
    return tuple(sig.lead) + (cin,)


def _chunks(points):
    chunk, size = [], 0
    for p in points:
        s, ci, co = p
        b = 4 * ci * co * (int(np.prod(s.attrs[0])) if s.attrs else 1)
        if chunk and size + b > CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += b
    if chunk:
        yield chunk


def _bench_model(points):
    """One graph, one independent node per point."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs, names = [], [], [], [], []
    for i, (s, ci, co) in enumerate(points):
        x, name = f"x{i}", f"pt{i}"
        y = name  # ORT names fused kernels after the node or its output: keep them equal
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, _input_shape(s, ci)))
        if s.op in ("Conv", "ConvTranspose", "ConvDW"):
            k, strides, pads, dil, outpad = s.attrs
            wshape = {"Conv": (co, ci), "ConvTranspose": (ci, co), "ConvDW": (co, 1)}[s.op] + k
            inits.append(numpy_helper.from_array((rng.standard_normal(wshape) * 0.05).astype(np.float32), f"w{i}"))
            inits.append(numpy_helper.from_array(np.zeros(co, np.float32), f"b{i}"))
            kw = {"kernel_shape": list(k), "strides": list(strides), "pads": list(pads), "dilations": list(dil)}
            if outpad:
                kw["output_padding"] = list(outpad)
            if s.op == "ConvDW":
                kw["group"] = ci
            nodes.append(helper.make_node("Conv" if s.op == "ConvDW" else s.op, [x, f"w{i}", f"b{i}"], [y],
                                          name=name, **kw))
        elif s.op == "Gemm":
            inits.append(numpy_helper.from_array((rng.standard_normal((co, ci)) * 0.05).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("Gemm", [x, f"w{i}"], [y], name=name, transB=1))
        else:
            inits.append(numpy_helper.from_array((rng.standard_normal((ci, co)) * 0.05).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y], name=name))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
        names.append(name)
    graph = helper.make_graph(nodes, "timing", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, names


def _kernel_for(kernels, name) -> float:
    """Sum of the kernels ORT made from node `name` (e.g. `pt3_nchwc`), reorders excluded."""
    total = [k.time_us for kname, k in kernels.items() if kname == name or kname.startswith(name + "_")]
    return float(sum(total)) if total else 0.0
