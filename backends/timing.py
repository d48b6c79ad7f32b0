"""Timing database: measured kernel times of weight layers at candidate widths.

A weight layer's time depends on its input and output widths, which usually belong to two
different groups (a grouped conv has three: groups, and input and output channels per group).
For each layer signature (op, kernel, strides, spatial size, batch...) the database holds the
time along each axis over a grid of widths, the other axes full, and estimates the time at any
widths as the product of the per-axis ratios, e.g. t(cin, cout) = t(cin, full) t(full, cout) / t(full, full).

Points are measured in bulk: one ONNX model holds every (signature, width) point as an
independent node (its input written by a Relu just before, as a layer's input is in a model),
ORT's profiler times each kernel (so the layout reorders ORT inserts around a lone conv do not
count), and identical points are measured once. Results are cached on disk,
keyed by what changes timing: provider, ORT version, CPU (or GPU) model and threads; the
signature itself holds the batch size and shapes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.backends.profile import profile_each, profile_session_runs
from onnx_prune.passes.graph import CONTRIB, attr, conv_pads

CHUNK_BYTES = 192 << 20  # weights per microbenchmark model
CUDA_CHUNK_BYTES = 1 << 30  # weights and activations per microbenchmark model on CUDA
MAX_GRID = 24
SCHEMA = 10  # bump when what a stored time means changes (10: pool chains timed alone)
# a chunk is profiled 5 times, or for MIN_CHUNK_SECONDS up to MAX_RUNS times if that is more: a
# kernel of 10-20 µs timed over 5 runs moved its time ratios by up to 3.5x between builds
# (RegNetY's SE convs), over 25 by up to 2.2x
MIN_CHUNK_SECONDS = 0.3
MAX_RUNS = 30
CONVS = ("Conv", "ConvTranspose", "ConvDW", "ConvG")
# Ops without weights that are timed as themselves: what they cost is not the share of their
# elements a plan keeps. The zoo's ViT at batch 64 (head size 16): halving head sizes cut its
# attention MatMuls to 0.57-0.75 of their time, not the 0.38 their multiply-adds said, and its
# Transposes to 0.74, not 0.40 (8-float rows move slower per element than 16-float ones).
# Their signatures hold each input's shape, an axis k written as -(k + 1) (`activation_sig`).
# ORT's BiasGelu and FastGelu with a bias (the fused Add of a bias and Gelu, erf or tanh form; ONNX
# Runtime's domain) cost a fixed part per row of their last axis: HF ConvNeXt at batch 64, its
# MLP's 64 channels cut to 8, 695 of 1204 µs where the kept elements said 150.
BIAS_GELUS = ("BiasGelu", "FastGelu")
ACTIVATION_OPS = {"MatMulAct": "MatMul", "Transpose": "Transpose", **{op: op for op in BIAS_GELUS}}
CONTRIB_OPS = BIAS_GELUS  # of ACTIVATION_OPS, those in ONNX Runtime's domain
# Pools between two convs, timed as that chain on the CPU: the pool's kernel and the layout
# reorders ORT puts around it. ORT runs a pool in its blocked layout only when the channels fill
# whole blocks; off the block it runs NCHW between a reorder out of the producing conv's layout and
# one back into the next conv's (the zoo's ShuffleNetV2 stem at 24 channels, batch 64: 466 + 477 +
# 89 µs; pruned to 16 channels, one blocked pool of 80 µs). Neither a lone pool nor the convs' own
# times can show that. Signature: the pool's channels, lead (N, H, W), attrs its attributes.
POOL_CHAIN_OPS = ("MaxPool", "AveragePool")
CHAIN_INPUT = 8  # channels into the chain's first conv: fewer than a block, so it reads NCHW as is
# A conv's output cut off the block, read by a conv: ORT still runs the writer blocked (its filters
# padded to the block) and, below one block, puts a reorder between the two, which the dense graph
# never had (U-Net's first stage cut from 16 to 8 channels at batch 16: 157, 160 and 249 µs after
# three of its convs; past one block, 24 channels, ORT 1.32 puts none). Timed as block conv -> conv
# at that width -> block conv, the reorder alone (0 where there is none). Signature: the output's
# dense channels, lead (N, H, W) of the output.
BLOCK_EXIT = "BlockExit"


@dataclass(frozen=True)
class LayerSig:
    """What determines a weight layer's time, apart from its widths.

    `full` holds the dense widths along each axis pruning can shrink:
    Conv, ConvTranspose, Gemm, MatMul: (cin, cout); ConvDW (depthwise): (channels,);
    ConvG (grouped): (groups, cin per group, cout per group)."""

    op: str
    full: tuple
    lead: tuple  # convs: (N, H, W) of the input; MatMul/Gemm: leading dims of the input;
    # ACTIVATION_OPS: each input's shape, axis k as -(k + 1)
    attrs: tuple = ()  # convs: kernel, strides, pads, dilations, output padding; Transpose: (perm,)

    def key(self) -> str:
        return f"{self.op}|{self.lead}|{self.attrs}"


def layer_sig(node, index) -> LayerSig | None:
    """Signature of a weight layer with a constant weight; None for what is not measured."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        w, x = index.shape(node.input[1]), index.shape(node.input[0])
        if w is None or x is None or len(x) != 4:
            return None
        strides, dilations = tuple(attr(node, "strides", [1, 1])), tuple(attr(node, "dilations", [1, 1]))
        pads = conv_pads(node, x[2:], w[2:])
        attrs = (tuple(w[2:]), strides, pads, dilations, tuple(attr(node, "output_padding", []) or ()))
        lead = (x[0],) + tuple(x[2:])
        g = attr(node, "group", 1)
        if g == 1:
            return LayerSig(op, (w[1], w[0]) if op == "Conv" else (w[0], w[1]), lead, attrs)
        if op == "ConvTranspose":
            return None
        if w[1] == 1 and w[0] == g:
            return LayerSig("ConvDW", (g,), lead, attrs)
        return LayerSig("ConvG", (g, w[1], w[0] // g), lead, attrs)
    if op in ("MatMul", "Gemm") and node.input[1] in index.inits:
        a, b = index.shape(node.input[0]), index.shape(node.input[1])
        if a is None or b is None or len(b) != 2:
            return None
        if op == "Gemm":
            if attr(node, "transA", 0):
                return None
            return LayerSig("Gemm", (b[1], b[0]) if attr(node, "transB", 0) else tuple(b), (a[0],))
        return LayerSig("MatMul", tuple(b), tuple(a[:-1]))
    return None


def activation_sig(op_type: str, input_dims, perm=None) -> LayerSig | None:
    """Signature of an op of ACTIVATION_OPS (its op type: MatMul, Transpose, BiasGelu...) without weights.

    `input_dims`: per input, per dimension, its size or (size, key) where a plan can prune it;
    dimensions with equal keys are one axis of the signature (the heads of both operands of an
    attention MatMul). None if nothing in it can be pruned."""
    op = {onnx_op: op for op, onnx_op in ACTIVATION_OPS.items()}.get(op_type)
    if op is None:
        return None
    keys, full, templates = [], [], []
    for dims in input_dims:
        template = []
        for d in dims:
            if isinstance(d, tuple):
                size, key = d
                if key not in keys:
                    keys.append(key)
                    full.append(int(size))
                template.append(-(keys.index(key) + 1))
            else:
                template.append(int(d))
        templates.append(tuple(template))
    if not keys:
        return None
    return LayerSig(op, tuple(full), tuple(templates), (tuple(perm),) if op == "Transpose" else ())


def pool_chain_sig(node, index) -> LayerSig | None:
    """Signature of a 2-D pool (POOL_CHAIN_OPS) timed as conv -> pool -> conv; None otherwise."""
    if node.op_type not in POOL_CHAIN_OPS:
        return None
    x = index.shape(node.input[0])
    if x is None or len(x) != 4 or None in x or any(node.output[1:]):
        return None
    attrs = tuple(sorted((a.name, _plain(helper.get_attribute_value(a))) for a in node.attribute))
    return LayerSig(node.op_type, (int(x[1]),), (int(x[0]), int(x[2]), int(x[3])), attrs)


def _plain(value):
    """An attribute's value, hashable and JSON-free: lists as tuples, bytes as text."""
    if isinstance(value, bytes):
        return value.decode()
    return tuple(value) if isinstance(value, list) else value


def axis_points(sig: LayerSig, grids) -> list:
    """The points a layer needs: each axis over its grid, the other axes full."""
    return [(sig, _along(sig, a, w)) for a, grid in enumerate(grids) for w in grid]


def _along(sig: LayerSig, axis: int, width: int) -> tuple:
    """The layer's widths with one axis at `width`, the others full."""
    widths = list(sig.full)
    widths[axis] = width
    return tuple(widths)


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
    """Kernel time (µs) per (signature, widths), on one provider/device/thread count."""

    def __init__(self, provider="cpu", threads=None, path=None, use_cache=True):
        self.provider, self.threads = provider, threads
        self.env = environment(provider, threads)
        digest = hashlib.sha1(json.dumps(self.env, sort_keys=True).encode()).hexdigest()[:16]
        self.path = path or os.path.join(cache_dir(), f"timing-{digest}.json")
        self.use_cache = use_cache
        self.times: dict[str, float] = {}
        # per point, µs of the layout reorders ORT put around the lone layer: [input, output]
        self.reorders: dict[str, list] = {}
        self.measured = 0  # points measured by this instance (0 when all came from the cache)
        if use_cache and os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    data = json.load(f)
                if data.get("env") == self.env:
                    self.times = data.get("times", {})
                    self.reorders = data.get("reorders", {})
            except (OSError, ValueError):
                self.times = {}

    @staticmethod
    def point_key(sig: LayerSig, widths) -> str:
        return f"{sig.key()}|{','.join(str(int(w)) for w in widths)}"

    def get(self, sig, widths):
        return self.times.get(self.point_key(sig, widths))

    def ensure(self, points):
        """Measure the (sig, widths) points not yet known, in bulk, and save."""
        todo = sorted({(s, tuple(w)) for s, w in points if self.get(s, w) is None}, key=lambda p: (p[0].key(), p[1]))
        if not todo:
            return
        runs = dict(runs=5, warmup=2, min_seconds=MIN_CHUNK_SECONDS, max_runs=MAX_RUNS)
        if self.provider == "cuda":
            chunks = list(_chunks(todo, CUDA_CHUNK_BYTES, activations=True))
            profiles = profile_each(((_bench_model(c, on_device=True), {}) for c in chunks), "cuda",
                                    self.threads, **runs)
        else:
            chunks = list(_chunks(todo, CHUNK_BYTES))
            profiles = (self._profile_on_cpu(c, runs) for c in chunks)
        for chunk, kernels in zip(chunks, profiles):
            blocked = _blocked(self.provider, chunk)
            for i, (s, w) in enumerate(chunk):
                name = _point_name(i)
                t = _kernel_for(kernels, name)
                if s.op in POOL_CHAIN_OPS:  # the reorders out of the first conv and into the second
                    t += _reorders_of(kernels, _chain_input(i)) + _reorders_of(kernels, name)
                if s.op == BLOCK_EXIT:  # the reorder between the two convs, if ORT put one there
                    t = _reorders_of(kernels, _chain_input(i))
                elif t <= 0 and s.op not in ACTIVATION_OPS:
                    raise RuntimeError(f"the profiler reported no kernel for {s.op} {w}")
                # an op without weights may be gone: ORT turns a Transpose that moves only
                # dimensions of size 1 (one head left) into a free Reshape
                self.times[self.point_key(s, w)] = t
                if blocked:  # [into its input, out of its output]
                    self.reorders[self.point_key(s, w)] = [_reorders_of(kernels, f"x{i}"),
                                                           _reorders_of(kernels, name)]
            self.measured += len(chunk)
        self.save()

    def _profile_on_cpu(self, chunk, runs) -> dict:
        model = _bench_model(chunk)
        names = [n for i, (s, w) in enumerate(chunk) for n in _input_names(i, len(_input_shapes(s, w)))]
        inputs = _random_slices([x for s, w in chunk for x in _input_shapes(s, w)], seed=1)
        feeds = dict(zip(names, inputs))
        return profile_session_runs(model, feeds, self.provider, self.threads, node_values=_blocked(self.provider, chunk),
                                    **runs)

    def save(self):
        if not self.use_cache:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"env": self.env, "times": self.times, "reorders": self.reorders}, f)
        os.replace(tmp, self.path)

    # -- estimates -------------------------------------------------------------------------
    def curve(self, sig: LayerSig, axis: int, grid):
        """Times along one axis, the others full: the measured points made non-decreasing in
        the width (a lone kernel of tens of µs is noisy, and a width padded to the block costs
        the same as the block), except the slow paths ORT really takes off its block."""
        out = [self.get(sig, _along(sig, axis, w)) for w in grid]
        if sig.op in POOL_CHAIN_OPS:  # a chain off the block is slower than on it wider: as measured
            return np.array(out, dtype=float)
        return _tame_full_width(_nondecreasing_but_slow_paths(np.array(out, dtype=float)), grid)

    def reorder_estimate(self, sig: LayerSig, widths, grids, side: int) -> float | None:
        """µs of the reorders ORT puts on the layer's input (side 0) or output (side 1) at
        `widths`, separable like `estimate` but as measured (off the block a reorder can cost
        more with fewer channels); None where the full width was not timed with its reorders."""
        full = self.reorders.get(self.point_key(sig, sig.full))
        if full is None:
            return None
        t = full[side]
        if not t:
            return t
        for a, (w, grid) in enumerate(zip(widths, grids)):
            curve = [(self.reorders.get(self.point_key(sig, _along(sig, a, g))) or full)[side] for g in grid]
            t *= float(np.interp(w, grid, curve)) / full[side]
        return t

    def estimate(self, sig: LayerSig, widths, grids) -> float:
        """t(widths) from the per-axis curves (a separable model), interpolated between points."""
        t = self.get(sig, sig.full)
        if not t:
            return 0.0
        for a, (w, grid) in enumerate(zip(widths, grids)):
            c = self.curve(sig, a, grid)
            t *= float(np.interp(w, grid, c)) / c[-1]
        return t


SLOW_PATH = 1.5  # a width this much slower than a wider one is a different kernel, not noise


def _nondecreasing_but_slow_paths(y):
    """`_nondecreasing` over the widths that cost at most SLOW_PATH x some wider width; the others
    keep their measured time. ORT's CPU convs read 16-channel blocks: with fewer input channels
    than that, RegNetY's 1x1 conv ran 64-272 µs at 2-14 channels and 91 µs at 16; pooling those
    into one non-decreasing curve predicted the 14-channel conv three times too fast."""
    wider_best = np.append(np.minimum.accumulate(y[::-1])[::-1][1:], np.inf)
    slow = y > SLOW_PATH * wider_best
    out = y.copy()
    out[~slow] = _nondecreasing(y[~slow])
    return out


FULL_OUTLIER = 1.5  # the full width this much slower than the width below (per channel block): an outlier
BLOCK = 16  # channels ORT's CPU kernels work on at once


def _tame_full_width(y, grid):
    """A full width timed far slower than the grid width below it, more than its extra channel
    blocks explain, is taken from that width, scaled by the blocks. BERT-large's 4096-wide FFN
    output MatMul took 14.8 ms in the bulk graph at its full input width and 5.4 ms at 4056 (a
    power-of-two stride); in the model 5.7-7.6 ms and 5.0 ms. Kept, the database promised 2.7x for
    1% of the channels, the search took it in every layer, and the plan measured 1.64x for 2.08x
    predicted. A width whose blocks (16 -> 24 channels: 1 -> 2 blocks) or work (24 -> 32) do grow
    that much keeps its jump, as do narrow axes (a grouped conv cut to one group runs another kernel)."""
    if len(y) < 2 or not y[-2] > 0 or grid[-2] < BLOCK:  # a few channels or groups: another kernel
        return y
    more = max(-(-grid[-1] // BLOCK) / -(-grid[-2] // BLOCK), grid[-1] / grid[-2])  # blocks, or work
    if y[-1] <= FULL_OUTLIER * more * y[-2]:
        return y
    out = y.copy()
    out[-1] = y[-2] * more
    return out


def _nondecreasing(y):
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    blocks = []  # [mean, count]
    for v in y:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return np.concatenate([np.full(n, m) for m, n in blocks]) if blocks else y


def width_grid(n: int, max_points=MAX_GRID, span=1) -> list[int]:
    """Widths to measure for n channels: every width up to 8, then multiples of 8 (ORT's CPU
    kernels work in 8/16-channel blocks; a width off the block breaks the blocked layout of the
    whole chain, which a lone-layer measurement cannot see), thinned to at most `max_points`,
    always with n itself. A unit that spans `span` channels of its layers (a head of 32) needs
    fewer units to fill a block: every count whose channels do."""
    step = 8 // math.gcd(8, span)
    if n <= step:
        return list(range(1, n + 1))
    grid = sorted({w for w in range(step, n, step)} | {n})
    if len(grid) > max_points:
        step = int(np.ceil(len(grid) / max_points))
        grid = sorted(set(grid[::step]) | {n})
    return grid


def fast_widths(widths, times, tolerance=0.03) -> list[int]:
    """Widths worth choosing: clearly (by more than `tolerance`) faster than every wider width.
    A narrower width that costs what a wider one costs only loses channels: ORT pads channels to
    its block, so on the padded plateau only the block's own width is kept. The full width is
    always kept."""
    keep = []
    best = np.inf  # cheapest wider width so far
    for w, t in sorted(zip(widths, times), key=lambda p: -p[0]):
        if not keep or t < (1 - tolerance) * best:
            keep.append(w)
        best = min(best, t)
    return sorted(keep)


def _input_shapes(sig: LayerSig, widths) -> list[tuple]:
    """Shapes of the point's inputs: one for a weight layer, each operand for ACTIVATION_OPS."""
    if sig.op in ACTIVATION_OPS:
        return [tuple(int(widths[-d - 1]) if d < 0 else d for d in template) for template in sig.lead]
    if sig.op in POOL_CHAIN_OPS:
        n, h, w = sig.lead
        return [(n, CHAIN_INPUT, h, w)]
    if sig.op == BLOCK_EXIT:
        n, h, w = sig.lead
        return [(n, BLOCK, h, w)]
    return [_input_shape(sig, widths)]


def _input_shape(sig: LayerSig, widths):
    if sig.op in CONVS:
        n, h, w = sig.lead
        c = widths[0] * widths[1] if sig.op == "ConvG" else widths[0]
        return (n, c, h, w)
    return tuple(sig.lead) + (widths[0],)


def _weight_shape(sig: LayerSig, widths):
    if sig.op in ACTIVATION_OPS or sig.op in POOL_CHAIN_OPS or sig.op == BLOCK_EXIT:
        return None
    k = sig.attrs[0] if sig.attrs else ()
    if sig.op == "Conv":
        return (widths[1], widths[0]) + k
    if sig.op == "ConvTranspose":
        return (widths[0], widths[1]) + k
    if sig.op == "ConvDW":
        return (widths[0], 1) + k
    if sig.op == "ConvG":
        g, ci, co = widths
        return (g * co, ci) + k
    if sig.op == "Gemm":
        return (widths[1], widths[0])
    return (widths[0], widths[1])


def _blocked(provider, chunk) -> bool:
    """Whether ORT may run the chunk's layers in its blocked layout (convs on the CPU): then which
    values its reorders convert is read from its optimized graph."""
    return provider == "cpu" and any(s.op in CONVS or s.op in POOL_CHAIN_OPS or s.op == BLOCK_EXIT for s, _ in chunk)


def _point_name(i: int) -> str:
    return f"pt{i}"


def _chain_input(i: int) -> str:
    """The value the first conv of chain point i writes and its pool reads."""
    return f"a{i}"


def _input_names(i: int, n: int) -> list[str]:
    """The graph inputs of point i (its first is `in{i}`; the Relu after it writes `x{i}`)."""
    return [f"in{i}"] + [f"in{i}_{j}" for j in range(1, n)]


def _chunks(points, budget, activations=False):
    """Points in groups of about `budget` bytes of weights (and, with `activations`, of inputs and
    outputs too: on CUDA a chunk's activations live on the GPU together); a pool chain in a group
    of its own (after other points' heavy kernels, a blocked pool of 80 µs in the model took up to
    196: the zoo ShuffleNetV2 stem's, at batch 64)."""
    chunk, size = [], 0
    for p in points:
        if p[0].op in POOL_CHAIN_OPS:
            yield [p]
            continue
        weight = _weight_shape(*p)
        b = 4 * int(np.prod(weight)) if weight else 0
        if weight is None:  # the random inputs, their Relus, and the output (attention scores: seq x seq)
            shapes = _input_shapes(*p)
            out = np.prod(shapes[0][:-1]) * shapes[1][-1] if p[0].op == "MatMulAct" else np.prod(shapes[0])
            b += 4 * (2 * sum(int(np.prod(x)) for x in shapes) + int(out))
        elif activations:  # the random input, its Relu and an output of about its size
            b += 3 * 4 * int(np.prod(_input_shape(*p)))
        if chunk and size + b > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += b
    if chunk:
        yield chunk


def _random_slices(shapes, seed, scale=1.0) -> list:
    """Random float32 arrays of `shapes`, each a slice of one draw: their values matter only in not
    being denormal, and drawing every array apart took seconds on ResNet-50's points."""
    pool = np.random.default_rng(seed).standard_normal(max((int(np.prod(x)) for x in shapes), default=0),
                                                       dtype=np.float32)
    pool *= np.float32(scale)
    return [pool[:int(np.prod(x))].reshape(x) for x in shapes]


def _bench_model(points, on_device=False):
    """One graph, one independent node per point.

    `on_device` (CUDA): each input is drawn by a RandomNormal node and each output cut to one
    element before it leaves the graph. Fed and returned whole, a chunk's activations crossed
    between host and GPU on every run: ResNet-50's database at batch 32 took 115 s on an H200."""
    weighted = [i for i, p in enumerate(points) if _weight_shape(*p) is not None]
    weights = dict(zip(weighted, _random_slices([_weight_shape(*points[i]) for i in weighted], seed=0, scale=0.05)))
    nodes, inits, inputs, outputs = [], [], [], []
    for i, (s, widths) in enumerate(points):
        name = _point_name(i)
        y = name  # ORT names fused kernels after the node or its output: keep them equal
        xs, shapes = [], _input_shapes(s, widths)
        for j, (fed, shape) in enumerate(zip(_input_names(i, len(shapes)), shapes)):
            if on_device:
                nodes.append(helper.make_node("RandomNormal", [], [fed], name=f"{fed}_random", seed=float(2 * i + j),
                                              shape=list(shape)))
            else:
                inputs.append(helper.make_tensor_value_info(fed, TensorProto.FLOAT, shape))
            # in a model a layer reads what the op before it has just written, still in cache; fed from
            # outside, the NCHW kernels (off the block, grouped) took up to 1.7x as long at some widths
            xs.append(f"x{i}" if j == 0 else f"x{i}_{j}")
            nodes.append(helper.make_node("Relu", [fed], [xs[-1]], name=f"{fed}_relu"))
        if s.op in ACTIVATION_OPS:
            kw = {"perm": list(s.attrs[0])} if s.op == "Transpose" else {}
            if s.op in CONTRIB_OPS:
                kw["domain"] = CONTRIB
            nodes.append(helper.make_node(ACTIVATION_OPS[s.op], xs, [y], name=name, **kw))
        elif s.op == BLOCK_EXIT:  # 1x1 convs: a block into the width, the width back into a block
            first, second = _random_slices([(widths[0], BLOCK, 1, 1), (BLOCK, widths[0], 1, 1)], seed=i, scale=0.05)
            inits += [numpy_helper.from_array(first, f"w{i}"), numpy_helper.from_array(second, f"v{i}")]
            nodes += [helper.make_node("Conv", [xs[0], f"w{i}"], [_chain_input(i)], name=f"c{i}"),
                      helper.make_node("Conv", [_chain_input(i), f"v{i}"], [f"o{i}"], name=f"o{i}")]
            y = f"o{i}"
        elif s.op in POOL_CHAIN_OPS:
            # 1x1 convs into and out of the pool, in ORT's blocked layout on the CPU; only the
            # pool and the reorders around it count (their kernels are named apart from `name`)
            first, second = _random_slices([(widths[0], CHAIN_INPUT, 1, 1), (BLOCK, widths[0], 1, 1)],
                                           seed=i, scale=0.05)
            inits += [numpy_helper.from_array(first, f"w{i}"), numpy_helper.from_array(second, f"v{i}")]
            nodes += [helper.make_node("Conv", [xs[0], f"w{i}"], [_chain_input(i)], name=f"c{i}"),
                      helper.make_node(s.op, [_chain_input(i)], [y], name=name,
                                       **{k: list(v) if isinstance(v, tuple) else v for k, v in s.attrs}),
                      helper.make_node("Conv", [y, f"v{i}"], [f"o{i}"], name=f"o{i}")]
            y = f"o{i}"
        else:
            x, wshape = xs[0], _weight_shape(s, widths)
            inits.append(numpy_helper.from_array(weights[i], f"w{i}"))
            if s.op in CONVS:
                k, strides, pads, dil, outpad = s.attrs
                kw = {"kernel_shape": list(k), "strides": list(strides), "pads": list(pads), "dilations": list(dil)}
                if outpad:
                    kw["output_padding"] = list(outpad)
                if s.op in ("ConvDW", "ConvG"):
                    kw["group"] = widths[0]
                inits.append(numpy_helper.from_array(np.zeros(wshape[1] if s.op == "ConvTranspose" else wshape[0],
                                                              np.float32), f"b{i}"))
                op = "ConvTranspose" if s.op == "ConvTranspose" else "Conv"
                nodes.append(helper.make_node(op, [x, f"w{i}", f"b{i}"], [y], name=name, **kw))
            elif s.op == "Gemm":
                nodes.append(helper.make_node("Gemm", [x, f"w{i}"], [y], name=name, transB=1))
            else:
                nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y], name=name))
        if on_device:  # named apart from `name`: _kernel_for counts `name` and `name_*` as the point's
            nodes += [helper.make_node("Reshape", [y, "flat"], [f"out{i}_flat"], name=f"out{i}_flat"),
                      helper.make_node("Slice", [f"out{i}_flat", "zero", "one"], [f"out{i}"], name=f"out{i}_slice")]
            y = f"out{i}"
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    if on_device:
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("flat", [-1]), ("zero", [0]), ("one", [1]))]
    graph = helper.make_graph(nodes, "timing", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(CONTRIB, 1)])
    model.ir_version = 8
    return model


@functools.lru_cache(maxsize=None)
def nchwc_block(provider: str) -> int | None:
    """The channel block of ORT's NCHWc layout on this CPU (16 with AVX-512, 8 with AVX2), read from
    the padded filter of a one-output-channel conv in the graph ORT optimizes; None where convs do
    not run blocked (another provider, a CPU without the layout)."""
    import tempfile

    from onnx_prune.backends.ort import make_session

    if provider != "cpu":
        return None
    w = numpy_helper.from_array(np.ones((1, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory(prefix="onnx-prune-block-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        make_session(model, provider, threads=1, quiet=True, optimized_path=path)
        optimized = onnx.load(path)
    blocked = {i for n in optimized.graph.node if n.domain.endswith("nchwc") and n.op_type == "Conv" for i in n.input}
    dims = [int(t.dims[0]) for t in optimized.graph.initializer if t.name in blocked and len(t.dims) == 4]
    return dims[0] if dims and dims[0] > 1 else None


def _reorders_of(kernels, value) -> float:
    """µs of ORT's layout reorders that read or write `value`."""
    return float(sum(k.time_us for k in kernels.values() if k.op.startswith("Reorder") and value in k.values))


def _kernel_for(kernels, name) -> float:
    """Sum of the kernels ORT made from node `name` (e.g. `pt3_nchwc`), reorders excluded."""
    total = [k.time_us for kname, k in kernels.items() if kname == name or kname.startswith(name + "_")]
    return float(sum(total)) if total else 0.0
