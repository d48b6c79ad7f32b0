"""Loading, indexing and atomically saving ONNX models."""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.errors import UserError
from onnx_prune.files import atomic_folder, atomic_path

# ONNX Runtime 1.31 refuses IR version 14; emit the newest it accepts.
MAX_IR_VERSION = 10
CONTRIB = "com.microsoft"  # ONNX Runtime's own ops, as its transformers optimizer fuses them
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def load_model(path_or_model) -> onnx.ModelProto:
    """Load a model from a path (with external data) or copy a ModelProto; never modifies the input."""
    if isinstance(path_or_model, bytes) and not _is_file(path_or_model):
        path_or_model = _from_serialized(path_or_model)
    if isinstance(path_or_model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(path_or_model)
        _external_data_loaded(m)
        return _known_ops(m, "the model")
    if not isinstance(path_or_model, (str, bytes, os.PathLike)):
        hint = (" (a torch.nn.Module: pass example_inputs= to export it, or use onnx_prune.from_torch)"
                if hasattr(path_or_model, "state_dict") else "")
        raise UserError(f"expected a model path or an onnx.ModelProto, got {type(path_or_model).__name__}{hint}")
    path = os.fspath(path_or_model)
    if os.path.isdir(path):
        raise UserError(f"{path}: a folder, not an ONNX file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several types for garbage input
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__}); check the file is complete") from None
    if not model.graph.node:
        raise UserError(f"{path}: not an ONNX model (no graph nodes); check the file is complete")
    _load_external_data(model, os.path.dirname(os.path.abspath(path)), path)
    return _known_ops(model, path)


def _is_file(path: bytes) -> bool:
    try:
        return len(path) < 4096 and os.path.isfile(path)
    except (ValueError, OSError):  # NUL bytes: a serialized model, not a path
        return False


def _from_serialized(data: bytes) -> onnx.ModelProto:
    """Bytes that are not a file's path: a serialized model (never echoed back: megabytes)."""
    try:
        model = onnx.load_from_string(data)
    except Exception:
        model = None
    if model is None or not model.graph.node:
        raise UserError(f"the model is {len(data)} bytes that are neither a file's path nor a serialized ONNX model")
    return model


def _external_data_loaded(model: onnx.ModelProto) -> None:
    """A ModelProto read with load_external_data=False names files relative to a folder it does not
    know: its weights are not there to prune."""
    from onnx.external_data_helper import uses_external_data

    missing = [t.name for t in _all_tensors(model) if uses_external_data(t) and _location(t) != IN_MEMORY]
    if missing:
        raise UserError(f"the model's weights ({missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}) "
                        "are in external data files that were not loaded: pass the model's path, or load it "
                        "with onnx.load(path) (load_external_data=True)")


def _known_ops(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Every node of the ONNX domain names an operator of the model's opset: an exporter that left
    its own framework's ops behind (tf2onnx's StatefulPartitionedCall) made a model no runtime runs."""
    opset = opset_of(model)
    local = {(f.domain, f.name) for f in model.functions}
    unknown: dict[str, int] = {}
    for node in all_nodes(model.graph):
        if node.domain in ("", "ai.onnx") and (node.domain, node.op_type) not in local \
                and not onnx.defs.has(node.op_type, opset, ""):
            unknown[node.op_type] = unknown.get(node.op_type, 0) + 1
    if unknown and not _ort_loads(model):  # ORT registers a few ops of its own in this domain
        ops = ", ".join(f"{op} ({n} node{'s' * (n > 1)})" for op, n in sorted(unknown.items()))
        raise UserError(f"{label}: not a valid ONNX model: {ops} not in ONNX opset {opset}; the exporter left "
                        "them unconverted (re-export, or convert them with a newer exporter)")
    return model


def _ort_loads(model) -> bool:
    from onnx_prune.backends.ort import make_session

    try:
        make_session(model, optimize=False, quiet=True)
    except Exception:
        return False
    return True


def subgraphs(node) -> list:
    """The graphs a node holds as attributes (an If's branches, a Loop's or Scan's body)."""
    return [g for a in node.attribute
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs if a.type == onnx.AttributeProto.GRAPHS
                      else [])]


def all_nodes(graph):
    """Every node of the graph, each followed by the nodes of its subgraphs (nested ones too)."""
    for node in graph.node:
        yield node
        for g in subgraphs(node):
            yield from all_nodes(g)


PROTOBUF_LIMIT = 2**31 - 1  # bytes: protobuf cannot serialize more (nor say how much: ByteSize fails)


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes `model` takes serialized, also past protobuf's 2 GiB (where its own ByteSize fails):
    the main graph's initializers one by one, plus the rest of the model."""
    inits = model.graph.initializer
    return sum(t.ByteSize() for t in inits) + _graph_copy_without(model, {t.name for t in inits}).ByteSize()


def too_large_to_serialize(model) -> bool:
    return isinstance(model, onnx.ModelProto) and serialized_size(model) > PROTOBUF_LIMIT


def _load_external_data(model: onnx.ModelProto, base_dir: str, path: str):
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    tensors = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not tensors:
        return
    base_real = os.path.realpath(base_dir)
    for t in tensors:
        location = _location(t)
        target = os.path.realpath(os.path.join(base_dir, location))
        if os.path.isabs(location) or os.path.commonpath([base_real, target]) != base_real:
            raise UserError(f"{path}: external data '{location}' of tensor '{t.name}' lies outside the model's folder; move it beside the model")
        if not os.path.isfile(target):
            raise UserError(f"{path}: external data file '{location}' for tensor '{t.name}' is missing; copy it beside the model")
    try:
        load_external_data_for_model(model, base_dir)
    except Exception as exc:
        raise UserError(f"{path}: cannot read external data ({exc}); check the data files are complete") from None


def _location(t: onnx.TensorProto) -> str:
    """The file (relative to the model's folder) an external tensor's data is in."""
    return next((e.value for e in t.external_data if e.key == "location"), "")


def _all_tensors(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


EXTERNAL_DATA_BYTES = 1_900_000_000  # protobuf cannot serialize 2 GiB: larger models keep weights beside


def save_model(model: onnx.ModelProto, path: str):
    """Write atomically (onnx_prune/files.py). Large models use external data, written beside the
    model as PATH.data (fresh: onnx appends to an existing data file)."""
    path = os.fspath(path)
    if serialized_size(model) > EXTERNAL_DATA_BYTES:
        with atomic_folder(path) as staging:
            name = os.path.basename(path)
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # onnx moves the weights of the model it saves out to the file
            onnx.save_model(copy, os.path.join(staging, name), save_as_external_data=True, location=name + ".data")
    else:
        with atomic_path(path) as tmp:
            onnx.save_model(model, tmp)


LARGE_ELEMENTS = 4096  # initializers larger than this are weights, not shape tensors


def has_large_weights(model) -> bool:
    return isinstance(model, onnx.ModelProto) and bool(_large(model))


def _large(model: onnx.ModelProto) -> list:
    return [t for t in model.graph.initializer if np.prod(t.dims, dtype=np.int64) > LARGE_ELEMENTS]


def _graph_copy_without(model: onnx.ModelProto, names: set) -> onnx.ModelProto:
    """A copy of `model` without the initializers `names` (nothing else copies their data)."""
    graph = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = graph.name
    lg.node.extend(graph.node)
    lg.input.extend(graph.input)
    lg.output.extend(graph.output)
    lg.value_info.extend(graph.value_info)
    lg.sparse_initializer.extend(graph.sparse_initializer)
    lg.initializer.extend(t for t in graph.initializer if t.name not in names)
    return light


def _copy_header(model: onnx.ModelProto, light: onnx.ModelProto):
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, field, getattr(model, field))
    light.metadata_props.extend(model.metadata_props)


def without_large_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    """A copy of `model` that declares its large initializers as typed graph inputs instead of
    carrying their data, and those initializers. onnx's shape inference and ORT's session creation
    serialize the model they are given (about 2 s per call on BERT-base's 435 MB)."""
    large = _large(model)
    light = _graph_copy_without(model, {t.name for t in large})
    light.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in large)
    return light, large


def shapes_only_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large initializers keep their name, type and dims but not their
    data: a second full copy of the weights for shape-level work cost BERT-base 435 MB."""
    return _with_placeholders(model, lambda t: onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))[0]


def _with_placeholders(model: onnx.ModelProto, placeholder) -> tuple[onnx.ModelProto, list]:
    """A copy of `model` whose large initializers are replaced by `placeholder(initializer)`, and
    those initializers."""
    large = _large(model)
    light = _graph_copy_without(model, {t.name for t in large})
    light.graph.initializer.extend(placeholder(t) for t in large)
    _copy_header(model, light)
    return light, large


def check_model(model: onnx.ModelProto, full_check=True):
    """onnx's checker. It serializes what it checks: a model over protobuf's 2 GiB is checked with
    its large weights declared as typed inputs (their data cannot be wrong: numpy wrote it)."""
    if too_large_to_serialize(model):
        model, _ = without_large_weights(model)
    onnx.checker.check_model(model, full_check=full_check)


IN_MEMORY = "onnx-prune:in-memory"  # the location of a weight handed to ONNX Runtime from memory


def external_placeholders(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    """A copy of `model` whose large initializers are declared as external data (name, type, dims,
    a location nothing reads), and those initializers: a model over protobuf's 2 GiB serializes
    small this way, and ONNX Runtime takes the weights from memory (`add_external_initializers`)."""
    return _with_placeholders(model, _in_memory)


def _in_memory(t: onnx.TensorProto) -> onnx.TensorProto:
    placeholder = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, data_location=onnx.TensorProto.EXTERNAL)
    placeholder.external_data.add(key="location", value=IN_MEMORY)
    return placeholder


def _shape_only(t: onnx.TensorProto) -> bool:
    """A tensor of some elements that carries no data (a `shapes_only_copy` placeholder)."""
    return (np.prod(t.dims, dtype=np.int64) > 0 and not t.raw_data and not t.external_data
            and not any(len(getattr(t, f)) for f in ("float_data", "int32_data", "int64_data", "double_data",
                                                     "uint64_data", "string_data")))


def op_label(node) -> str:
    """An op as messages name it: its type, prefixed by its domain outside ONNX's own."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


@contextlib.contextmanager
def quiet_graphsurgeon():
    """onnx-graphsurgeon's warnings (large constants, types it cannot map, its missing `colored`
    module) describe its internals, not the user's model: errors only."""
    from onnx_graphsurgeon.logger import G_LOGGER

    level = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = level


def infer_shapes(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    """onnx's shape inference, given the large initializers' shapes but not their data (shape
    tensors are small, so data propagation still sees them). The inferred value_info and output
    types are written into `model`, which is returned."""
    light, large = without_large_weights(model)
    if not large:
        return onnx.shape_inference.infer_shapes(model, **options)
    inferred = onnx.shape_inference.infer_shapes(light, **options).graph
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.value_info)
    del model.graph.output[:]
    model.graph.output.extend(inferred.output)
    return model


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def same_pads(mode, size, kernel, strides, dilations) -> tuple[list, list]:
    """(begin, end) pads per spatial axis for `auto_pad` SAME_UPPER / SAME_LOWER: the output keeps
    ceil(size / stride); an odd total goes at the end (UPPER) or the beginning (LOWER)."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin, end


def conv_pads(node, spatial, kernel) -> tuple:
    """The pads a Conv really uses, (begin..., end...), with `auto_pad` (TF-style exports) spelled
    out for its input's spatial size."""
    mode = attr(node, "auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "VALID":
        return (0,) * (2 * len(kernel))
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(attr(node, "pads", [0] * (2 * len(kernel))))
    begin, end = same_pads(mode, spatial, kernel, attr(node, "strides", [1] * len(kernel)),
                           attr(node, "dilations", [1] * len(kernel)))
    return tuple(begin + end)


def dims_of(type_proto):
    """Static dims of a tensor type, None for unknown; None if the rank is unknown."""
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


class GraphIndex:
    """Read-only index of a model: producers, consumers, constants, static shapes and dtypes.

    `weights`: the model that holds the large initializers' data where `model` holds only their
    shapes (a static copy: see `shapes_only_copy`)."""

    def __init__(self, model: onnx.ModelProto, weights: onnx.ModelProto | None = None):
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self._weights = {t.name: t for t in weights.graph.initializer} if weights is not None else {}
        self._arrays: dict[str, np.ndarray] = {}
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
        self.shapes: dict[str, tuple | None] = {}
        self.dtypes: dict[str, int] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            self.shapes[vi.name] = dims_of(vi.type)
            self.dtypes[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            self.shapes[t.name] = tuple(t.dims)
            self.dtypes[t.name] = t.data_type
        self.graph_inputs = [i.name for i in g.input if i.name not in self.inits]
        self.graph_outputs = [o.name for o in g.output]

    def const(self, name):
        """The value of an initializer, or None if `name` is computed at run time."""
        if name not in self.inits:
            return None
        if name in self._arrays:
            return self._arrays[name]
        t = self._weights.get(name, self.inits[name])
        if _shape_only(t):
            raise ValueError(f"initializer '{name}' is held by shape only (canonicalize's static copy): index "
                             "the static copy with its weights, GraphIndex(static, canon.model) / analyze_canonical(canon)")
        array = numpy_helper.to_array(t)
        if array.size <= LARGE_ELEMENTS:  # shape tensors, read by many rules; weights are read once per phase
            self._arrays[name] = array
        return array

    def forget(self, name):
        """Drop the value cached for initializer `name`: its data was rewritten (passes/rotate.py)."""
        self._arrays.pop(name, None)

    def shape(self, name):
        s = self.shapes.get(name)
        if s is None or any(d is None for d in s):
            return None
        return s
