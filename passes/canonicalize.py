"""Canonicalize an imported model into the one form the analysis reads.

- initializers are not graph inputs (IR < 4 style), Constant nodes become initializers;
- old opsets are upgraded with onnx's version converter;
- constant subgraphs are folded (old zoo graphs build weights with ConstantOfShape), static parts
  of shape computations too (onnx-graphsurgeon with ONNX Runtime);
- Identity and Dropout are removed; every node has a unique name;
- small initializers used by several nodes are un-shared, so editing one use leaves the others.

Two models come out: `model` keeps the dynamic axes and is what gets pruned and emitted;
`static` is the same graph with the input dims fixed and every shape inferred, for the analysis.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.errors import UserError
from onnx_prune.passes.graph import (MAX_IR_VERSION, all_nodes, dims_of, infer_shapes, load_model, opset_of,
                                     quiet_graphsurgeon, shapes_only_copy, subgraphs, too_large_to_serialize,
                                     without_large_weights)
from onnx_prune.passes.rules import SHAPE_TARGETS
from onnx_prune.passes.unfuse import unfuse_ort_ops

UPGRADE_BELOW = 13
UPGRADE_TO = 17
UNSHARE_MAX_ELEMENTS = 1 << 16


@dataclass
class Canonical:
    model: onnx.ModelProto
    static: onnx.ModelProto
    input_shapes: dict
    notes: list = field(default_factory=list)


def canonicalize(model_or_path, input_shapes=None) -> Canonical:
    model = load_model(model_or_path)
    notes = []
    opset = opset_of(model)
    newest = max_ort_opset()
    if opset > newest:
        raise UserError(f"opset {opset} is newer than this onnxruntime runs (up to {newest}); upgrade onnxruntime "
                        f"or convert the model down with onnx.version_converter")
    _densify_sparse_initializers(model, notes)
    _drop_initializer_inputs(model)
    model = _inline_local_functions(model, notes)
    _import_used_domains(model)
    if opset < UPGRADE_BELOW:  # opsets before 7, which ORT does not run, included
        model = _upgrade(model, opset)
        notes.append(f"upgraded opset {opset} -> {UPGRADE_TO}")
    notes.extend(unfuse_ort_ops(model))
    _name_nodes(model)
    model = _fold_constants(model)
    _remove_identities(model)
    _unshare_fills(model)
    _unshare_shape_computations(model)
    _unshare_small_initializers(model)
    _name_nodes(model)
    _spell_out_kernel_shapes(model)
    shapes = resolve_input_shapes(model, input_shapes or {}, notes)
    static = make_static(model, shapes)
    if _fold_static_shape_reads(model, static, shapes):
        model = _fold_constants(model)
        _remove_identities(model)
        _name_nodes(model)
        static = make_static(model, shapes)
    return Canonical(model, static, shapes, notes)


def _densify_sparse_initializers(model, notes):
    """Weights stored as sparse initializers (`finetune --sparse-initializers` writes them; ORT
    reads them) become dense ones: the analysis and surgery read and slice initializers, and saw
    none (0 weight layers). The emitted model stores them dense."""
    sparse = list(model.graph.sparse_initializer)
    if not sparse:
        return
    for t in sparse:
        values = numpy_helper.to_array(t.values)
        indices = numpy_helper.to_array(t.indices).astype(np.int64)
        dense = np.zeros(tuple(t.dims), dtype=values.dtype)
        if indices.ndim == 1:  # positions in the flattened tensor
            dense.reshape(-1)[indices] = values
        else:  # one coordinate row per value
            dense[tuple(indices.T)] = values
        model.graph.initializer.append(numpy_helper.from_array(dense, t.values.name))
    del model.graph.sparse_initializer[:]
    notes.append(f"{len(sparse)} sparse initializer(s) read as dense weights; the emitted model stores them dense")


def _inline_local_functions(model, notes):
    """Every call of a local function (torch's `export_modules_as_functions`, onnxscript) spelled
    out in the graph, with onnx's inliner: each call then prunes to widths of its own, which one
    shared body could not hold, and the rules see the ops inside."""
    functions = {(f.domain, f.name) for f in model.functions}
    if not functions:
        return model
    from onnx import inliner

    light, large = without_large_weights(model)  # the inliner serializes the model it is given
    inlined = inliner.inline_local_functions(light)
    moved = {t.name for t in large}
    inputs = [i for i in inlined.graph.input if i.name not in moved]
    del inlined.graph.input[:]
    inlined.graph.input.extend(inputs)
    inlined.graph.initializer.extend(large)
    used = {n.domain for n in inlined.graph.node}
    function_domains = {d for d, _ in functions}
    imports = [o for o in inlined.opset_import if o.domain in used or o.domain not in function_domains]
    del inlined.opset_import[:]
    inlined.opset_import.extend(imports)
    names = sorted({name for _, name in functions})
    notes.append(f"inlined the model's local functions ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): "
                 "each call prunes on its own, and the emitted model has no functions")
    return inlined


@functools.lru_cache(maxsize=1)
def max_ort_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (probed once)."""
    import onnxruntime as ort

    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    for opset in range(onnx.defs.onnx_opset_version(), UPGRADE_BELOW, -1):
        m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
        m.ir_version = MAX_IR_VERSION
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return UPGRADE_TO


def _import_used_domains(model):
    """A domain the nodes use but the model does not import (ORT's transformers optimizer hands
    back its model so, and adds com.microsoft only when saving it): onnx's shape inference then
    skips those nodes, and every shape after them was read differently. Import it at version 1."""
    imported = {o.domain for o in model.opset_import} | {"", "ai.onnx"}
    for domain in sorted({n.domain for n in model.graph.node} - imported):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def _drop_initializer_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
    if model.ir_version < 4:
        model.ir_version = 4


def _upgrade(model, opset):
    from onnx import version_converter

    try:
        if not too_large_to_serialize(model):
            return version_converter.convert_version(model, UPGRADE_TO)
        # the converter serializes what it converts: over 2 GiB it converts the graph with the
        # large weights as typed inputs, and they go back in as initializers
        light, large = without_large_weights(model)
        upgraded = version_converter.convert_version(light, UPGRADE_TO)
        names = {t.name for t in large}
        inputs = [i for i in upgraded.graph.input if i.name not in names]
        del upgraded.graph.input[:]
        upgraded.graph.input.extend(inputs)
        upgraded.graph.initializer.extend(large)
        return upgraded
    except Exception as exc:
        raise UserError(f"cannot upgrade opset {opset} to {UPGRADE_TO} ({str(exc).splitlines()[0][:200]}); re-export the model with opset >= {UPGRADE_BELOW}") from None


def _name_nodes(model):
    seen = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _spell_out_kernel_shapes(model):
    """Conv and ConvTranspose may leave `kernel_shape` to be read off the weight; every pass that
    reads it (timing points, calibration patches) then finds it on the node."""
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and not any(a.name == "kernel_shape" for a in node.attribute):
            w = weights.get(node.input[1])
            if w is not None:
                node.attribute.append(onnx.helper.make_attribute("kernel_shape", list(w.dims[2:])))


def _fold_constants(model):
    """Fold constant subgraphs (and static shape reads) with onnx-graphsurgeon."""
    import onnx_graphsurgeon as gs

    meta = [(p.key, p.value) for p in model.metadata_props]
    header = (model.ir_version, model.producer_name, model.producer_version, model.doc_string, model.model_version, model.domain)
    try:
        inferred = infer_shapes(model, data_prop=True)  # canonicalize's own copy: value_info written in
    except Exception:
        inferred = model
    from onnx_prune.backends.ort import errors_only_from_ort

    errors_only_from_ort()
    with warnings.catch_warnings(), quiet_graphsurgeon():
        warnings.simplefilter("ignore")
        graph = gs.import_onnx(inferred)
        graph.fold_constants(fold_shapes=True, error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        folded = gs.export_onnx(graph, do_type_check=False)
    del folded.graph.value_info[:]
    _keep_declared_interface(model, folded)
    folded.ir_version = min(max(header[0], 7), MAX_IR_VERSION)
    folded.producer_name, folded.producer_version, folded.doc_string, folded.model_version, folded.domain = header[1:]
    del folded.metadata_props[:]
    for k, v in meta:
        folded.metadata_props.add(key=k, value=v)
    _constants_to_initializers(folded)
    _hoist_body_weights(folded)
    return folded


def _hoist_body_weights(model):
    """onnx-graphsurgeon exports a weight that only an If, Loop or Scan body reads as that body's
    initializer; the torch bridge trains the main graph's initializers (a body's are constants) and
    the sparsity methods mask them: each goes back there, where the body reads it from the scope
    around it. A copy of one already hoisted (a weight both branches read) is dropped."""
    g = model.graph
    hoisted = {}
    taken = {t.name for t in g.initializer} | {i.name for i in g.input} | {o for n in all_nodes(g) for o in n.output}
    for node in all_nodes(g):
        for body in subgraphs(node):
            moved = set()
            returned = {o.name for o in body.output}  # ORT refuses a body returning an outer value as is
            for t in body.initializer:
                if t.name in returned:
                    continue
                if t.name not in taken:
                    g.initializer.add().CopyFrom(t)
                    hoisted[t.name] = g.initializer[-1]
                    taken.add(t.name)
                    moved.add(t.name)
                elif t.name in hoisted and hoisted[t.name] == t:
                    moved.add(t.name)
            for i in reversed(range(len(body.initializer))):
                if body.initializer[i].name in moved:
                    del body.initializer[i]


def _keep_declared_interface(original, folded):
    """The graph's inputs and outputs as the model declared them. onnx-graphsurgeon exports the
    shapes that inference found (a dynamic output axis becomes a number, an output without a shape
    gets one) and knows tensors only: a sequence or map (scikit-learn's ZipMap output) comes back
    as a sequence of untyped tensors, which ORT refuses. It also drops their doc strings."""
    declared = {vi.name: vi for vi in list(original.graph.input) + list(original.graph.output)}
    for vi in list(folded.graph.input) + list(folded.graph.output):
        if vi.name in declared:
            vi.type.CopyFrom(declared[vi.name].type)
            vi.doc_string = declared[vi.name].doc_string
    # IR 10's graph and node metadata, which graphsurgeon drops too (nodes found by name)
    del folded.graph.metadata_props[:]
    folded.graph.metadata_props.extend(original.graph.metadata_props)
    node_meta = {n.name: n.metadata_props for n in original.graph.node if n.name and n.metadata_props}
    for node in folded.graph.node:
        if node.name in node_meta and not node.metadata_props:
            node.metadata_props.extend(node_meta[node.name])


def _constants_to_initializers(model):
    """Remaining Constant nodes (e.g. feeding graph outputs) become initializers."""
    keep = []
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = onnx.numpy_helper.to_array(_constant_value(node))
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _constant_value(node):
    a = node.attribute[0]
    if a.name == "value":
        return a.t
    v = onnx.helper.get_attribute_value(a)
    return numpy_helper.from_array(np.asarray(v, dtype=np.float32 if a.name.startswith("value_float") else np.int64))


def _remove_identities(model):
    """Identity, and Dropout at inference, pass their input through; rewire their consumers."""
    outputs = {o.name for o in model.graph.output}
    used = {i for n in model.graph.node for i in n.input} | outputs
    rename = {}
    keep = []
    for node in model.graph.node:
        is_passthrough = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or node.output[1] not in used))
        if is_passthrough and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            src = node.input[0]
            rename[node.output[0]] = rename.get(src, src)
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


SHAPE_ARITHMETIC = {"Concat", "Unsqueeze", "Squeeze", "Gather", "Slice", "Cast", "Mul", "Add", "Sub", "Div",
                    "Where", "Equal", "ConstantOfShape", "Reshape", "Abs", "Neg", "Max", "Min"}
MAX_SHAPE_NODES = 64


def _unshare_fills(model):
    """A fill (a ConstantOfShape, or an Expand of a one-element constant) read by several nodes gets
    a copy per reader: one value repeated carries no channels of its own, and shared it would tie
    the widths of everything reading it (torch's exporter sizes the zero initial states of all
    stacked LSTM layers with one ConstantOfShape; its dynamo exporter gives every Mamba layer's
    scan one Expand of zero)."""
    readers = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in model.graph.output}
    scalars = {t.name for t in model.graph.initializer if math.prod(t.dims) == 1}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if not _is_fill(node, scalars) or node.output[0] in outputs:
            continue
        for k, (reader, i) in enumerate(readers.get(node.output[0], [])[1:], start=1):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name, copy.output[0] = f"{node.name}__use{k}", f"{node.output[0]}__use{k}"
            nodes.append(copy)
            reader.input[i] = copy.output[0]
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _is_fill(node, scalars) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    return node.op_type == "ConstantOfShape" or (node.op_type == "Expand" and node.input[0] in scalars)


def _unshare_shape_computations(model):
    """Give each Reshape/Expand/Resize its own copy of the arithmetic that computes its target
    shape (the shape inputs surgery edits: rules.SHAPE_TARGETS). Exporters that merge common
    subexpressions (torch's dynamo exporter) let one computed [batch, seq, heads, head_dim] serve
    the Q, K and V of every layer; pruning one layer's heads must edit its own copy. The copies
    stop at Shape reads, which stay shared."""
    slot = dict(SHAPE_TARGETS)
    producer = {o: n for n in model.graph.node for o in n.output}
    claimed = set()  # output names computed for some shape input already
    nodes = []
    for node in model.graph.node:
        k = slot.get(node.op_type)
        cone = _shape_cone(node.input[k], producer) if k is not None and len(node.input) > k else []
        if cone and any(n.output[0] in claimed for n in cone):
            rename = {}
            for n in cone:  # upstream first
                copy = onnx.NodeProto()
                copy.CopyFrom(n)
                copy.name = f"{n.name}__for_{node.name}"
                for i, name in enumerate(copy.input):
                    copy.input[i] = rename.get(name, name)
                for i, name in enumerate(copy.output):
                    rename[name] = copy.output[i] = f"{name}__for_{node.name}"
                nodes.append(copy)
            node.input[k] = rename[node.input[k]]
        else:
            claimed.update(n.output[0] for n in cone)
        nodes.append(node)
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _shape_cone(value, producer) -> list:
    """The shape-arithmetic nodes `value` is computed by, upstream first, down to Shape reads,
    inputs and constants; empty when it is not all shape arithmetic or too large."""
    order, seen = [], set()

    def visit(name) -> bool:
        node = producer.get(name)
        if node is None or node.op_type == "Shape" or name in seen:
            return True
        if node.op_type not in SHAPE_ARITHMETIC or len(order) >= MAX_SHAPE_NODES:
            return False
        seen.update(node.output)
        if not all(visit(i) for i in node.input if i):
            return False
        order.append(node)
        return True

    return order if visit(value) else []


def _unshare_small_initializers(model):
    uses = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))
    by_name = {t.name: t for t in model.graph.initializer}
    for name, refs in uses.items():
        t = by_name.get(name)
        if t is None or len(refs) < 2 or int(np.prod(t.dims)) > UNSHARE_MAX_ELEMENTS:
            continue
        for k, (node, i) in enumerate(refs[1:], start=1):
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = f"{name}__use{k}"
            model.graph.initializer.append(copy)
            node.input[i] = copy.name


def _fold_static_shape_reads(model, static, shapes) -> bool:
    """Replace run-time shape computations that do not depend on dynamic dims by constants.

    Exporters compute e.g. an attention scale from the head dim at run time; as a constant it
    keeps its dense value after pruning, exactly like the masked reference. A value is static
    when it is the same for two different sizes of every dynamic input dim."""
    dynamic = _dynamic_dims(model)
    derived = _shape_derived(model)
    if not dynamic or not derived:
        return False
    from onnx_prune.backends.ort import random_feeds, run_all_outputs, runs_at_user_shapes

    feeds = random_feeds(model, shapes)
    with runs_at_user_shapes(feeds):
        first = run_all_outputs(model, derived, feeds)
    static = set(derived)
    for dims in dynamic.values():  # vary one dynamic dim at a time, in every input that shares it
        # exporters do not always name a shared dim alike: if it cannot vary alone, vary it with
        # every dynamic dim of the same size; a dim that cannot vary at all is static indeed
        size = shapes[dims[0][0]][dims[0][1]]
        alike = [d for ds in dynamic.values() for d in ds if shapes[d[0]][d[1]] == size]
        for together in (dims, alike):
            other = _run_scaled(model, derived, shapes, together)
            if other is not None:
                static = {n for n in static if first[n].shape == other[n].shape and np.array_equal(first[n], other[n])}
                break
    folded = {n: first[n] for n in derived if n in static}
    if not folded:
        return False
    for name, value in folded.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    keep = [n for n in model.graph.node if not any(o in folded for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return True


def _run_scaled(model, names, shapes, dims):
    """Values of `names` with the given (input, axis) dims doubled (or halved); None if the model
    cannot run at either size."""
    from onnx_prune.backends.ort import random_feeds, run_all_outputs

    for scale in (2, 0.5):
        alt = dict(shapes)
        for name, axis in dims:
            alt[name] = tuple(max(1, int(v * scale)) if k == axis else v for k, v in enumerate(alt[name]))
        try:
            return run_all_outputs(model, names, random_feeds(model, alt))
        except Exception:
            continue
    return None


def _shape_derived(model) -> list:
    """Outputs of nodes computed only from Shape/Size reads and constants."""
    inits = {t.name for t in model.graph.initializer}
    derived = set()
    out = []
    for node in model.graph.node:
        ins = [i for i in node.input if i and i not in inits]
        if node.op_type in ("Shape", "Size") or (ins and all(i in derived for i in ins)):
            derived.update(o for o in node.output if o)
            out.extend(o for o in node.output if o)
    graph_outputs = {o.name for o in model.graph.output}
    return [o for o in out if o not in graph_outputs]


def _dynamic_dims(model) -> dict:
    """Dynamic dims by symbol: {dim_param (or input:axis if unnamed): [(input, axis), ...]}; inputs
    that share a symbol (batch, sequence) must be varied together."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        dims = dims_of(inp.type)
        if inp.name in inits or dims is None:
            continue
        for k, d in enumerate(dims):
            if d is None:
                symbol = inp.type.tensor_type.shape.dim[k].dim_param or f"{inp.name}:{k}"
                out.setdefault(symbol, []).append((inp.name, k))
    return out


EXAMPLE_DIM = 128  # offered for a dynamic dim other than the batch: a size worth timing, not 1


def _require_static_dims(inputs):
    """Dynamic dims other than the batch need a shape from the user: one line naming every input
    that has them, with an example to edit (the sizes it will run at are the ones to time)."""
    dynamic = [(inp, dims_of(inp.type)) for inp in inputs]
    dynamic = [(inp, dims) for inp, dims in dynamic if dims is not None and None in dims[1:]]
    if not dynamic:
        return
    def labels(inp, dims):
        return [inp.type.tensor_type.shape.dim[k].dim_param or "?" for k, d in enumerate(dims) if d is None]

    def example_shape(dims):  # batch 1, EXAMPLE_DIM for the other dynamic dims
        return "x".join(str(d or (EXAMPLE_DIM if k else 1)) for k, d in enumerate(dims))

    what = ", ".join(f"'{inp.name}' {labels(inp, dims)}" for inp, dims in dynamic)
    example = " ".join(f"--input-shape {inp.name}={example_shape(dims)}" for inp, dims in dynamic)
    raise UserError(f"dynamic dims in {what}: pass the shapes to prune and time at, e.g. {example}")


def resolve_input_shapes(model, given: dict, notes: list) -> dict:
    """Static shapes for the analysis: the model's own dims, `given` for dynamic ones."""
    inits = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    names = {i.name for i in real}
    for name, want in given.items():
        if name not in names:
            raise UserError(f"--input-shape names '{name}', but the model's inputs are: {', '.join(sorted(names))}")
        _check_given_shape(name, want)
    _require_static_dims([i for i in real if i.name not in given])
    shapes = {}
    for inp in real:
        dims = dims_of(inp.type)
        want = given.get(inp.name)
        if dims is None:
            if want is None:
                raise UserError(f"input '{inp.name}' has no declared shape; pass --input-shape {inp.name}=1x3x224x224 (for example)")
            shapes[inp.name] = tuple(want)
            continue
        if want is not None:
            if len(want) != len(dims):
                raise UserError(f"--input-shape {inp.name} has rank {len(want)}, the model's input has rank {len(dims)}")
            for k, (d, w) in enumerate(zip(dims, want)):
                if d is not None and d != w:
                    raise UserError(f"--input-shape {inp.name} sets dim {k} to {w}, but the model fixes it at {d}")
            shapes[inp.name] = tuple(int(w) for w in want)
            continue
        missing = [k for k, d in enumerate(dims) if d is None]
        if missing:
            notes.append(f"input '{inp.name}': dynamic batch analysed at 1")
        shapes[inp.name] = tuple(d if d is not None else 1 for d in dims)
    return shapes


def valid_given_dims(dims) -> bool:
    """A shape a user may give an input (`--input-shape`, `input_shapes=`): integers, a positive
    batch, other dims >= 0 (0 is a length, as of an empty key/value cache; not a batch)."""
    import numbers

    return isinstance(dims, (tuple, list)) and len(dims) > 0 \
        and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims) \
        and dims[0] > 0 and all(d >= 0 for d in dims)


def _check_given_shape(name, want):
    if not valid_given_dims(want):
        raise UserError(f"input shape for '{name}' must be integers (positive batch, other dims >= 0), got {want!r}")


def with_batch(model, shapes: dict, batch_size: int) -> dict:
    """`shapes` with dim 0 set to `batch_size`; only an input whose batch is dynamic can change, and
    a scalar input (a 0-d temperature) has none."""
    for inp in model.graph.input:
        dims = dims_of(inp.type) or ()
        if inp.name in shapes and dims and dims[0] is not None and dims[0] != batch_size:
            raise UserError(f"input '{inp.name}' has a fixed batch of {dims[0]}; --batch-size {batch_size} does not apply")
    return {k: (batch_size,) + tuple(v[1:]) if len(v) else tuple(v) for k, v in shapes.items()}


def make_static(model, shapes: dict) -> onnx.ModelProto:
    """A copy with fixed input dims and every tensor's shape inferred. It holds the large
    initializers' shapes but not their data, which stays in `model` (GraphIndex(static, model))."""
    static = shapes_only_copy(model)
    for inp in static.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == 0:
                for _ in shapes[inp.name]:
                    dims.add()
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    try:
        static = infer_shapes(static, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise UserError(f"shape inference failed ({str(exc).splitlines()[0][:200]}); check --input-shape") from None
    _fill_shapes_with_ort(static, model)
    return static


def _fill_shapes_with_ort(static, weights):
    """Shape inference leaves gaps around some ops; run the graph once to read the rest."""
    known = {}
    for vi in list(static.graph.value_info) + list(static.graph.output) + list(static.graph.input):
        dims = dims_of(vi.type)
        if dims is not None and all(d is not None for d in dims):
            known[vi.name] = dims
    known.update({t.name: tuple(t.dims) for t in static.graph.initializer})
    # a sequence or map (scikit-learn's ZipMap) carries no channels, and a session cannot return it
    # beside the tensors: asking for it lost every shape
    not_tensors = {vi.name for vi in list(static.graph.value_info) + list(static.graph.output)
                   if vi.type.WhichOneof("value") not in (None, "tensor_type")}
    missing = [o for n in static.graph.node for o in n.output if o and o not in known and o not in not_tensors]
    if not missing:
        return
    from onnx_prune.backends.ort import run_all_outputs

    try:
        values = run_all_outputs(static, missing, weights=weights)
    except Exception:
        return  # the analysis freezes channels around tensors whose shape stays unknown
    kept = [vi for vi in static.graph.value_info if vi.name not in values]
    del static.graph.value_info[:]
    static.graph.value_info.extend(kept)
    outputs = {o.name: o for o in static.graph.output}
    for name, arr in values.items():
        dtype = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        measured = onnx.helper.make_tensor_value_info(name, dtype, arr.shape)
        # a graph output's declared type (symbolic dims the inference could not resolve) is what
        # the index reads for it: it takes the measured shape
        (outputs[name] if name in outputs else static.graph.value_info.add()).CopyFrom(measured)
