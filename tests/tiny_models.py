"""Small hand-built graphs shared by several test files."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def residual_cnn(seed=0, batchnorm=True):
    """x(N,3,8,8) -> conv1 -> [BN] -> Relu -> conv2 -> Add(relu1) -> Relu -> conv3(1x1) -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm(transB) -> y(N,10). conv1/conv2 share a group (the Add)."""
    rng = np.random.default_rng(seed)

    def w(*s):
        return (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)

    inits = {"w1": w(8, 3, 3, 3), "b1": w(8, 1)[:, 0] * 0.1, "w2": w(8, 8, 3, 3), "b2": w(8, 1)[:, 0] * 0.1,
             "w3": w(16, 8, 1, 1), "b3": w(16, 1)[:, 0] * 0.1, "wf": w(10, 16), "bf": w(10, 1)[:, 0] * 0.1}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4, kernel_shape=[3, 3])]
    if batchnorm:
        inits.update({"g": (1 + 0.1 * rng.standard_normal(8)).astype(np.float32), "be": w(8, 1)[:, 0] * 0.1,
                      "mu": w(8, 1)[:, 0] * 0.1, "var": (1 + 0.1 * rng.random(8)).astype(np.float32)})
        nodes.append(n("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"], name="bn1"))
    nodes += [n("Relu", ["n1" if batchnorm else "c1"], ["r1"], name="relu1"),
              n("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4, kernel_shape=[3, 3]),
              n("Add", ["c2", "r1"], ["a"], name="add"),
              n("Relu", ["a"], ["r2"], name="relu2"),
              n("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", kernel_shape=[1, 1]),
              n("Relu", ["c3"], ["r3"], name="relu3"),
              n("GlobalAveragePool", ["r3"], ["p"], name="gap"),
              n("Flatten", ["p"], ["f"], name="flat"),
              n("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "rescnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m
