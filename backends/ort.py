"""ONNX Runtime sessions and feeds, from one place."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.errors import UserError
from onnx_prune.passes.graph import (MAX_IR_VERSION, dims_of, external_placeholders, has_large_weights,
                                     without_large_weights)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_input(model) -> bytes | str | onnx.ModelProto:
    """What `make_session` takes, prepared once for several sessions: bytes and paths pass
    through, and so does a model with weights (`make_session` hands them over from memory);
    a model without weights is serialized (IR version capped)."""
    if isinstance(model, (bytes, str)) or has_large_weights(model):
        return model
    return _to_bytes(model)


def _to_bytes(model: onnx.ModelProto) -> bytes:
    if model.ir_version > MAX_IR_VERSION:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.ir_version = MAX_IR_VERSION
        model = m
    return model.SerializeToString()


def errors_only_from_ort():
    """ORT's optimizer logs its warnings (a fusion it skipped) through the default logger, not a
    session's; onnx-graphsurgeon's constant folding runs sessions of its own."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


def make_session(model, provider="cpu", threads=None, optimize=True, denormal_as_zero=True, quiet=False,
                 profile_prefix=None, optimized_path=None, spin=True):
    """An InferenceSession on `provider`; asking for CUDA where it is missing is an error.
    `spin=False` for a session whose runs alternate with other work (torch training steps): its
    idle threads would otherwise spin on the cores that work needs."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UserError(f"unknown provider '{provider}' (choose: {', '.join(PROVIDERS)})")
    ep = PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        raise UserError(f"provider '{provider}' is not available in this onnxruntime ({', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA")
    if provider == "cuda":
        _load_cuda_libraries(ort)
    errors_only_from_ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4 if quiet else 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if denormal_as_zero:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path:  # ORT writes the graph it runs (fusions, layout reorders) there
        so.optimized_model_filepath = optimized_path
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
    payload, weights = session_input(model), []
    if isinstance(payload, onnx.ModelProto):
        # The weights go over from memory, not serialized: serializing ResNet-50's 100 MB took
        # 0.25-0.9 s per session, and protobuf cannot serialize a model over 2 GiB at all.
        light, large = external_placeholders(payload)
        weights = [ort.OrtValue.ortvalue_from_numpy(_array_of(t)) for t in large]
        so.add_external_initializers([t.name for t in large], weights)
        payload = _to_bytes(light)
    session = ort.InferenceSession(payload, so, providers=[ep])
    if ep not in session.get_providers():
        # ORT falls back to the CPU, with only a log line, where the provider's libraries fail to load
        raise UserError(f"the {ep} did not start (its CUDA or cuDNN libraries failed to load; ORT would run on the "
                        f"CPU instead): install onnxruntime-gpu's CUDA {_cuda_version(ort)} libraries, e.g. "
                        f"pip install 'onnxruntime-gpu[cuda,cudnn]'")
    session.weights_held = weights  # ORT may read the weights from these buffers: they live as long
    return session


_cuda_libraries_loaded = False


def _load_cuda_libraries(ort) -> None:
    """Once: ORT's CUDA provider links cuBLAS and cuDNN by name, and pip's nvidia-* packages put
    them where the loader does not look; ORT's preload_dlls loads them from there (nothing to do
    where torch loaded them, or where they are on the library path)."""
    global _cuda_libraries_loaded
    if _cuda_libraries_loaded or not hasattr(ort, "preload_dlls"):
        return
    _cuda_libraries_loaded = True
    with contextlib.redirect_stdout(io.StringIO()):  # it prints what it could not find; the check above says it
        try:
            ort.preload_dlls()
        except Exception:  # a library it tried and failed to load: the provider check says what it means
            pass


def _cuda_version(ort) -> str:
    return getattr(ort, "cuda_version", "") or "12/13"


def _array_of(t: onnx.TensorProto) -> np.ndarray:
    """A weight's values; raw data is read without numpy_helper's second copy."""
    dtype = _NP.get(t.data_type)
    if t.raw_data and dtype is not None and dtype is not np.bool_:
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def feed_kind(inp) -> str:
    """What a graph input holds, by its type and name: "float", "mask", "segment" (segment or
    token type ids) or "ids" (any other integers: indices into a table)."""
    dtype = _NP.get(inp.type.tensor_type.elem_type, np.float32)
    lname = inp.name.lower()
    if np.issubdtype(dtype, np.floating):
        return "float"
    if dtype == np.bool_ or "mask" in lname:
        return "mask"
    if "type" in lname or "segment" in lname:
        return "segment"
    return "ids"


def random_feeds(model: onnx.ModelProto, shapes: dict, seed=0) -> dict:
    """Random inputs: normal floats; integer ids below the size of the table they index
    (found from the Gather that reads them), masks of ones, segment ids of zeros."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shape = shapes[inp.name]
        dtype = _NP.get(inp.type.tensor_type.elem_type, np.float32)
        kind = feed_kind(inp)
        if kind == "float":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif kind == "mask":
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        elif kind == "segment":
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
        else:
            feeds[inp.name] = rng.integers(0, index_bound(model, inp.name, inits), size=shape).astype(dtype)
    return feeds


USER_SHAPES_HINT = "check --input-shape and --batch-size"


def is_ort_error(exc: Exception) -> bool:
    """Raised by ONNX Runtime itself (its InvalidArgument, Fail, RuntimeException), not by our code."""
    return type(exc).__module__.split(".")[0] == "onnxruntime"


@contextlib.contextmanager
def runs_at_user_shapes(feeds: dict, hint: str = USER_SHAPES_HINT):
    """Around the first run of the user's model at the shapes asked for: a model that does not run
    there (a sequence longer than its position table, a wrong image size) is the input's fault,
    said in one line (with `hint`), not a crash deep in canonicalization or profiling."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not is_ort_error(exc):
            raise
        shapes = ", ".join(f"{k}={'x'.join(map(str, np.shape(v)))}" for k, v in feeds.items())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the model does not run at input shapes {shapes} ({hint}): {first}") from None


def check_runs(model, feeds: dict, hint: str = USER_SHAPES_HINT) -> None:
    """Run the user's model once on `feeds` (see runs_at_user_shapes)."""
    with runs_at_user_shapes(feeds, hint):
        make_session(model, optimize=False, quiet=True).run(None, feeds)


def index_bound(model, name, inits) -> int:
    """Smallest table size among constant Gathers indexed by `name` (2 if none)."""
    bounds = []
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            bounds.append(inits[node.input[0]].dims[axis])
    return min(bounds) if bounds else 2


def feeds_for(model, input_shapes: dict, batch_size=None, seed=0):
    """Load a model (path or proto) and random feeds for it; a batch size replaces dynamic dim 0."""
    from onnx_prune.passes.canonicalize import resolve_input_shapes, with_batch
    from onnx_prune.passes.graph import load_model

    model = load_model(model)
    shapes = resolve_input_shapes(model, dict(input_shapes), [])
    if batch_size is not None:
        shapes = with_batch(model, shapes, batch_size)
    return model, random_feeds(model, shapes, seed)


def session_with_outputs(model: onnx.ModelProto, names, optimize=False, spin=True):
    """A session that can also return the intermediate tensors `names` (ORT keeps every tensor
    asked for as an output, optimized or not; `optimize=False` also keeps the graph as written)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    return make_session(m, optimize=optimize, quiet=True, spin=spin)


def run_all_outputs(model: onnx.ModelProto, names, feeds=None, weights: onnx.ModelProto | None = None) -> dict:
    """Values of intermediate tensors `names`, computed without graph optimizations. `weights`:
    the model holding the large initializers' data, where `model` holds only their shapes."""
    if feeds is None:
        feeds = random_feeds(model, {i.name: dims_of(i.type) for i in model.graph.input})
    light, weight_feeds = weights_as_inputs(model, weights)
    return dict(zip(names, session_with_outputs(light, names).run(names, {**feeds, **weight_feeds})))


def weights_as_inputs(model: onnx.ModelProto, weights: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, dict]:
    """`model` with its large weights as graph inputs, and their values to feed: the same values,
    without serializing them into a session. `weights`: the model holding their data, where
    `model` holds only their shapes."""
    light, large = without_large_weights(model)
    if weights is not None:
        source = {t.name: t for t in weights.graph.initializer}
        large = [source[t.name] for t in large]
    return light, {t.name: numpy_helper.to_array(t) for t in large}
