"""onnx-prune: structured pruning of ONNX graphs, verified by masked-reference equivalence."""

from collections.abc import Mapping

__version__ = "0.1.0"


def from_torch(module, example_inputs, **kwargs):
    """Export a torch.nn.Module to an ONNX ModelProto (needs the `torch` extra)."""
    from onnx_prune.models.torch_export import from_torch as _from_torch

    return _from_torch(module, example_inputs, **kwargs)


def _onnx(model, example_inputs):
    from onnx_prune.models.torch_export import as_onnx

    return as_onnx(model, example_inputs)


def analyze(model, input_shapes=None, example_inputs=None):
    """Channel dependency groups of a model (path, ModelProto, or a torch.nn.Module with
    `example_inputs`, exported first)."""
    from onnx_prune.passes.analysis import analyze_model

    return analyze_model(_onnx(model, example_inputs), input_shapes=input_shapes)


def prune(model, ratio, importance="l2", input_shapes=None, verify=True, seed=0, example_inputs=None):
    """Uniform structured pruning baseline; returns a PruneResult with .model and .report."""
    from onnx_prune.compiler.prune import prune_uniform

    return prune_uniform(_onnx(model, example_inputs), ratio, importance=importance, input_shapes=input_shapes,
                         verify=verify, seed=seed)


def compile(model, target_speedup, example_inputs=None, **kwargs):  # noqa: A001  (the tool's verb)
    """Prune until the speedup measured on ONNX Runtime meets `target_speedup` (e.g. 2.0 or "2x").

    `model`: a path, an onnx.ModelProto, or a torch.nn.Module exported first on `example_inputs`
    (a tensor, a tuple or list of tensors, or a dict of keyword arguments such as a tokenizer's output,
    whose keys name the graph's inputs; the batch axis stays dynamic, and is timed at the examples'
    batch unless `batch_size` says otherwise). Returns a CompileResult with
    .model (ONNX) and .report (dict); raises TargetNotMet (with .report, and .model: what was
    reached) when the measured speedup stays below the target or the accuracy budget is missed.
    Keyword arguments: provider, threads, calib, preprocess, input_shapes, method, search,
    search_seconds, recover, batch_size, finetune, epochs, min_fidelity, max_accuracy_drop."""
    from onnx_prune.compiler.compile import compile_model

    if example_inputs is not None and kwargs.get("batch_size") is None:
        if isinstance(example_inputs, Mapping):
            first = next(iter(example_inputs.values()), None)
        else:
            first = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        kwargs["batch_size"] = int(first.shape[0]) if getattr(first, "ndim", 0) else None
    return compile_model(_onnx(model, example_inputs), target_speedup, **kwargs)


def torch_graph(model, **kwargs):
    """The torch training bridge: an nn.Module executing `model` (ONNX) whose parameters are its initializers."""
    from onnx_prune.backends.torch_graph import TorchGraph

    return TorchGraph(model, **kwargs)


def finetune(model, data, **kwargs):
    """Train `model` under a sparsity method through the torch bridge (see compiler/finetune.py)."""
    from onnx_prune.compiler.finetune import finetune_model

    return finetune_model(model, data, **kwargs)


def __getattr__(name):
    # onnx_prune.TorchGraph without importing torch for users who never train
    if name == "TorchGraph":
        from onnx_prune.backends.torch_graph import TorchGraph

        return TorchGraph
    raise AttributeError(f"module 'onnx_prune' has no attribute {name!r}")
