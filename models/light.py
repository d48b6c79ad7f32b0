"""The "light" ONNX model-zoo graphs shipped with the onnx package (onnx/backend/test/data/light).

These are real legacy exports (IR 3, opset 9, Caffe2 origin): initializers are
also listed as graph inputs, and the weights are not stored but built at load time
by ConstantOfShape nodes filling them with one constant. `load_light(fold=True)`
folds those nodes into initializers; `randomize_weights` then gives every weight
a random value of sensible scale so outputs depend on every channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.passes.graph import quiet_graphsurgeon

from .feeds import InputSpec

LIGHT_NAMES = (
    "resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet",
    "squeezenet", "vgg19", "bvlc_alexnet", "zfnet512",
)

# IR 3 requires every initializer to be a graph input; folding adds initializers
# that are not inputs, which needs IR >= 4.
MIN_IR_WITHOUT_INITIALIZER_INPUTS = 4


def light_names() -> list[str]:
    return list(LIGHT_NAMES)


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that carry data: neither an initializer nor produced by a node."""
    constants = {i.name for i in model.graph.initializer}
    constants.update(out for node in model.graph.node for out in node.output)
    return [i for i in model.graph.input if i.name not in constants]


def input_specs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    return {
        i.name: InputSpec(tuple(d.dim_value for d in i.type.tensor_type.shape.dim))
        for i in real_inputs(model)
    }


def constant_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold ConstantOfShape, Unsqueeze-of-constant etc. into initializers.

    graphsurgeon drops initializers from the graph inputs, leaving only the real ones.
    """
    import onnx_graphsurgeon as gs

    with quiet_graphsurgeon():
        graph = gs.import_onnx(model)
        graph.fold_constants().cleanup()
        folded = gs.export_onnx(graph)
    folded.ir_version = max(model.ir_version, MIN_IR_WITHOUT_INITIALIZER_INPUTS)
    return folded


def load_light(name: str, fold: bool = True) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """A light model (constant-folded unless fold=False) and the static shape of its real input."""
    if name not in LIGHT_NAMES:
        raise KeyError(f"unknown light model {name!r}; choose from {LIGHT_NAMES}")
    model = onnx.load(str(light_dir() / f"light_{name}.onnx"))
    if fold:
        model = constant_fold(model)
    return model, {n: spec.shape for n, spec in input_specs(model).items()}


# ---------------------------------------------------------------- weight randomisation


def _fan_in(op: str, shape: tuple[int, ...], node: onnx.NodeProto) -> int:
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return shape[1] if trans_b else shape[0]
    if op == "MatMul":
        return shape[-2]
    if op == "ConvTranspose":  # weight is (C_in, C_out / group, k...)
        return shape[0] * int(np.prod(shape[2:]))
    return int(np.prod(shape[1:]))  # Conv: (C_out, C_in / group, k...)


def _random_value(op: str, slot: int, shape, node, rng: np.random.Generator) -> np.ndarray | None:
    """Random replacement for an initializer used at (op, input slot); None keeps it."""
    # float32 draws: VGG-19 has 143M weights and float64 draws double the time.
    normal = lambda std: rng.standard_normal(shape, dtype=np.float32) * np.float32(std)  # noqa: E731
    positive = lambda: rng.random(shape, dtype=np.float32) + np.float32(0.5)  # noqa: E731
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and slot == 1:
        # LeCun scale: He scale blows residual nets up (ResNet-50 logits ~1e4), this keeps
        # every light model's logits between ~0.1 and ~20.
        return normal(1.0 / np.sqrt(_fan_in(op, shape, node)))
    if op in ("Conv", "ConvTranspose", "Gemm") and slot == 2:
        return normal(0.05)
    if op == "BatchNormalization" and slot in (1, 4):  # scale, variance
        return positive()
    if op == "BatchNormalization" and slot in (2, 3):  # bias, mean
        return normal(0.1)
    if op in ("Mul", "Div"):  # per-channel affine "scale" layers
        return positive()
    if op in ("Add", "Sub", "PRelu"):
        return normal(0.1)
    return None


def _first_uses(graph: onnx.GraphProto) -> dict[str, tuple[onnx.NodeProto, int]]:
    uses: dict[str, tuple[onnx.NodeProto, int]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            uses.setdefault(name, (node, slot))
    return uses


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Copy of a folded model whose float weight/bias/BN initializers are seeded random.

    What an initializer gets depends on the op and input slot of its first use;
    initializers with other roles (shapes, Resize scales, scalars) are kept.
    """
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    uses = _first_uses(out.graph)
    for init in out.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or not init.dims or init.name not in uses:
            continue
        node, slot = uses[init.name]
        value = _random_value(node.op_type, slot, tuple(init.dims), node, rng)
        if value is not None:
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out
