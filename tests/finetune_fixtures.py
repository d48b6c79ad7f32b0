"""A tiny model and data callables for the finetune tests (imported by name, as a user's module
would be: `--data finetune_fixtures:good`)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

BATCH = (4, 3, 8, 8)


def tiny_cnn(seed=0):
    """x(N,3,8,8) -> conv1 -> Relu -> conv2 -> Add(relu1) -> Relu -> conv3(1x1) -> Relu -> GAP
    -> Flatten -> Gemm(transB) -> y(N,10). conv1/conv2 share a channel group (the Add)."""
    rng = np.random.default_rng(seed)

    def w(*s):
        return (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)

    inits = {"w1": w(8, 3, 3, 3), "b1": w(8, 1)[:, 0], "w2": w(8, 8, 3, 3), "b2": w(8, 1)[:, 0],
             "w3": w(16, 8, 1, 1), "b3": w(16, 1)[:, 0], "wf": w(10, 16), "bf": w(10, 1)[:, 0]}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4, kernel_shape=[3, 3]),
             n("Relu", ["c1"], ["r1"], name="relu1"),
             n("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4, kernel_shape=[3, 3]),
             n("Add", ["c2", "r1"], ["a"], name="add"),
             n("Relu", ["a"], ["r2"], name="relu2"),
             n("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", kernel_shape=[1, 1]),
             n("Relu", ["c3"], ["r3"], name="relu3"),
             n("GlobalAveragePool", ["r3"], ["p"], name="gap"),
             n("Flatten", ["p"], ["f"], name="flat"),
             n("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _x(rng):
    return rng.standard_normal(BATCH).astype(np.float32)


def good():
    rng = np.random.default_rng(0)
    return [{"x": _x(rng)} for _ in range(4)]


def split():
    """(train, val); validation batches carry integer class labels (accuracy is reported)."""
    rng = np.random.default_rng(1)
    train = [{"x": _x(rng)} for _ in range(4)]
    val = [({"x": _x(rng)}, rng.integers(0, 10, BATCH[0])) for _ in range(2)]
    return train, val


def labeled():
    rng = np.random.default_rng(2)
    return [({"x": _x(rng)}, rng.integers(0, 10, BATCH[0])) for _ in range(4)]


def generator():
    rng = np.random.default_rng(3)
    for _ in range(4):
        yield {"x": _x(rng)}


def raises():
    raise RuntimeError("dataset server\nunreachable")


def empty():
    return []


def wrong_shape():
    return [{"x": np.zeros((4, 3, 5, 5), np.float32)}]


def wrong_name():
    return [{"image": np.zeros(BATCH, np.float32)}]


def wrong_dtype():
    return [{"x": np.zeros(BATCH, np.int64)}, {"x": np.zeros(BATCH, np.complex64)}]  # ints widen; complex not


def not_batches():
    return 42


def fails_midway():
    yield {"x": np.zeros(BATCH, np.float32)}
    raise OSError("shard 2 missing")
