"""Verification of an emitted model against the invariants in DESIGN.md.

Masked-reference equivalence: the pruned model's outputs equal the dense model's when every
tensor of a pruned group has its removed channels set to zero. The masked reference is built
from the same analysis (one `Where` per tensor), so a wrong coupling in the dependency graph
shows up as a mismatch here, on any model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.backends.ort import make_session, weights_as_inputs
from onnx_prune.passes.analysis import Analysis
from onnx_prune.passes.graph import MAX_IR_VERSION, check_model
from onnx_prune.passes.rules import recurrent_weight

COPY_OPS = ("Gather", "Slice", "Concat", "Pad", "GatherElements", "GatherND", "Tile", "Expand")
TOLERANCE = 1e-4  # relative to the output scale, for float32 arithmetic
# half-precision models: their sums in another order differ by a few units of roundoff per layer
ROUNDOFF = {onnx.TensorProto.FLOAT: 2.0 ** -23, onnx.TensorProto.FLOAT16: 2.0 ** -10,
            onnx.TensorProto.BFLOAT16: 2.0 ** -7}


def _roundoff(model: onnx.ModelProto) -> float:
    """16 units of roundoff of the narrowest float type among `model`'s weights and outputs."""
    types = {t.data_type for t in model.graph.initializer} | {o.type.tensor_type.elem_type for o in model.graph.output}
    return 16 * max([ROUNDOFF[onnx.TensorProto.FLOAT]] + [ROUNDOFF[t] for t in types if t in ROUNDOFF])


def tolerance(model: onnx.ModelProto) -> float:
    """The relative tolerance for `model`: TOLERANCE, or 16 units of roundoff of its narrowest
    float type (a float16 BERT differs by 5e-4 of its scale)."""
    return max(TOLERANCE, _roundoff(model))


class VerificationError(Exception):
    pass


@dataclass
class Verification:
    max_abs_error: float
    output_scale: float
    checks: list = field(default_factory=list)
    allowed: float = 0.0  # the largest max_abs_error this verification would have passed

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.output_scale


def masked_reference(model: onnx.ModelProto, analysis: Analysis, plan: dict) -> onnx.ModelProto:
    """The dense model with removed channels zeroed on every tensor that carries them. A recurrent
    layer reads its own hidden units inside the node, through the columns of its recurrence weight
    R: there a removed unit is zeroed in R (an initializer, or an input where large weights are
    fed), as it is on every tensor outside."""
    keep = analysis.keep_arrays(plan)
    table, ctx = analysis.table, analysis.ctx
    index = ctx.index
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    g = ref.graph
    recurrent = {r for r in map(recurrent_weight, g.node) if r}
    renames = {}
    new_nodes = {}
    for name, axes in ctx.axes.items():
        if axes is None or (name in index.inits or name in index.graph_inputs) and name not in recurrent:
            continue
        mask = np.ones([1] * len(axes), dtype=bool)
        for k, e in enumerate(axes):
            m = table.keep_mask(e, keep)
            if not m.all():
                mask = mask & m.reshape([len(m) if j == k else 1 for j in range(len(axes))])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(index.dtypes.get(name) or onnx.TensorProto.FLOAT)
        if mask.all() or not np.issubdtype(dtype, np.number):
            continue
        masked = f"{name}__masked"
        g.initializer.append(numpy_helper.from_array(mask, f"{name}__keep"))
        g.initializer.append(numpy_helper.from_array(np.zeros((), dtype=dtype), f"{name}__zero"))
        new_nodes[name] = onnx.helper.make_node("Where", [f"{name}__keep", name, f"{name}__zero"], [masked], name=f"{name}__mask")
        renames[name] = masked
    nodes = [new_nodes[r] for r in sorted(recurrent) if r in new_nodes]  # weights: masked first
    for node in g.node:
        for i, inp in enumerate(node.input):
            if inp in renames:
                node.input[i] = renames[inp]
        nodes.append(node)
        for o in node.output:
            if o in new_nodes:
                nodes.append(new_nodes[o])
    del g.node[:]
    g.node.extend(nodes)
    return ref


def compare_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, a_weights=None) -> tuple[float, float]:
    """Max abs difference between two models' outputs, and the reference output scale.
    `a_weights`: values of the inputs `a` reads beyond `feeds` (its weights)."""
    out_a = make_session(a).run(None, {**feeds, **(a_weights or {})})
    out_b = make_session(b).run(None, feeds)
    err = 0.0
    for x, y in zip(out_a, out_b):
        x, y = numeric(x), numeric(y)
        if x.shape != y.shape:
            raise VerificationError(f"output shape changed: {x.shape} -> {y.shape}")
        if x.size:
            err = max(err, _max_abs_difference(x, y))
    return err, _scale(out_a)


def output_scale(model: onnx.ModelProto, feeds: dict, weights=None) -> float:
    """The largest finite magnitude among `model`'s outputs on `feeds` (plus `weights`)."""
    return _scale(make_session(model).run(None, {**feeds, **(weights or {})}))


def _scale(outputs) -> float:
    scale = 0.0
    for x in map(numeric, outputs):
        finite = np.abs(x[np.isfinite(x)])
        scale = max(scale, float(finite.max()) if finite.size else 0.0)
    return max(scale, 1e-12)


def _max_abs_difference(x: np.ndarray, y: np.ndarray) -> float:
    """Max |x - y| over the finite positions, infinite where the non-finite ones differ (NaN against
    a number, or infinities of other signs): np.max over a NaN is NaN, and max(0.0, nan) is 0.0,
    which would pass any two models whose outputs hold a NaN."""
    finite_x, finite_y = np.isfinite(x), np.isfinite(y)
    if not np.array_equal(finite_x, finite_y):
        return float("inf")
    odd = ~finite_x
    if odd.any() and not np.array_equal(x[odd], y[odd], equal_nan=True):
        return float("inf")
    return float(np.max(np.abs(x[finite_x] - y[finite_x]))) if finite_x.any() else 0.0


def numeric(value) -> np.ndarray:
    """An output as float64 numbers: a map's values in key order, a sequence's elements one after
    another (scikit-learn's ZipMap gives a sequence of maps, one per sample)."""
    if isinstance(value, dict):
        return np.asarray([value[k] for k in sorted(value)], dtype=np.float64)
    if isinstance(value, list):
        parts = [numeric(v) for v in value]
        return np.stack(parts) if parts and len({p.shape for p in parts}) == 1 else \
            np.concatenate([p.ravel() for p in parts] or [np.zeros(0)])
    return np.asarray(value, dtype=np.float64)


# the full check runs shape inference, whose errors are not ValidationErrors
CHECKER_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)


def check_valid(original: onnx.ModelProto, pruned: onnx.ModelProto) -> list[str]:
    """Checker, ORT load, drop-in interface and metadata, no copies inserted."""
    done = []
    if pruned.ir_version > MAX_IR_VERSION:
        raise VerificationError(f"IR version {pruned.ir_version} is newer than ONNX Runtime accepts")
    try:
        check_model(pruned)
        done.append("onnx.checker (full)")
    except CHECKER_ERRORS as exc:
        ours = _first_line(exc)
        if _checker_error(original) != ours:
            raise VerificationError(f"the pruned model fails onnx's checker: {ours}") from None
        # e.g. GroupNormalization at opset 18-20, deprecated by opset 21 but run by ORT
        done.append(f"onnx.checker (full) fails as on the input model: {ours}")
    make_session(pruned)
    done.append("onnxruntime loads it")
    for kind in ("input", "output"):
        a = [(v.name, v.type.SerializeToString()) for v in getattr(original.graph, kind)]
        b = [(v.name, v.type.SerializeToString()) for v in getattr(pruned.graph, kind)]
        if a != b:
            raise VerificationError(f"graph {kind}s changed (names, dtypes or dynamic axes)")
    done.append("same inputs/outputs, dtypes and dynamic axes")
    if [(p.key, p.value) for p in original.metadata_props] != [(p.key, p.value) for p in pruned.metadata_props]:
        raise VerificationError("metadata_props changed")
    done.append("metadata kept")
    before = Counter(n.op_type for n in original.graph.node)
    after = Counter(n.op_type for n in pruned.graph.node)
    added = {op: after[op] - before[op] for op in COPY_OPS if after[op] > before[op]}
    if added:
        raise VerificationError(f"pruning inserted copies: {added}")
    done.append("no activation copies inserted")
    return done


def _first_line(exc) -> str:
    return str(exc).strip().splitlines()[0]


def _checker_error(model) -> str | None:
    try:
        check_model(model)
    except CHECKER_ERRORS as exc:
        return _first_line(exc)
    return None


def verify(canonical: onnx.ModelProto, pruned: onnx.ModelProto, analysis: Analysis, plan: dict,
           feeds: dict) -> Verification:
    checks = check_valid(canonical, pruned)
    # the reference reads the large weights as inputs, fed from `canonical`: no second copy of
    # them in a model, its serialized bytes and its session
    light, weight_feeds = weights_as_inputs(canonical)
    err, scale = compare_outputs(masked_reference(light, analysis, plan), pruned, feeds, weight_feeds)
    allowed = tolerance(canonical) * scale
    if err > allowed:
        # A plan can cancel an output down to far below the values it is summed from (a keep-one
        # plan left 6.9e-7 of a dense 0.46, off by 1.2e-8): rounding of those values, at the
        # dense output's scale, is no mismatch. One dense run, paid only here.
        allowed += _roundoff(canonical) * output_scale(light, feeds, weight_feeds)
    if err > allowed:
        raise VerificationError(f"pruned model differs from the masked reference: max abs error {err:.3g} (output scale {scale:.3g})")
    checks.append(f"masked-reference equivalence (max abs error {err:.2e}, scale {scale:.2e})")
    return Verification(err, scale, checks, allowed)
