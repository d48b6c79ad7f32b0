"""The torch training bridge (backends/torch_graph.py): forward equal to onnxruntime (single ops,
every zoo model, MiniLM), gradients, 1:1 export of trained weights, train/eval behaviour, hooks,
and construction-time errors for ops it cannot run."""

import copy
import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnx_prune
from onnx_prune.backends.ort import make_session, run_all_outputs
from onnx_prune.backends.torch_graph import TorchGraph
from onnx_prune.errors import UserError
from onnx_prune.models import registry
from onnx_prune.passes.canonicalize import canonicalize

I64_MAX = np.iinfo(np.int64).max
RNG = np.random.default_rng(0)


def rel_error(out, ref) -> float:
    """max |out - ref| / max |ref| (shape and dtype must match)."""
    out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    if ref.size == 0:
        return 0.0
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()
    return float(diff / max(np.abs(ref.astype(np.float64)).max(), 1e-12))


def run_bridge(tg, feeds):
    out = tg(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out if isinstance(out, tuple) else (out,)


def assert_matches_ort(model, tg, feeds, tol):
    ref = make_session(model, threads=1, quiet=True).run(None, feeds)
    with torch.no_grad():
        outs = run_bridge(tg, feeds)
    assert len(outs) == len(ref)
    for out, r in zip(outs, ref):
        assert rel_error(out, r) <= tol


# ---------------------------------------------------------------- single ops vs onnxruntime


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


def scalar(v, dtype=np.float32):
    return np.array(v, dtype=dtype)


def op_model(op, inputs, attrs=None, opset=17, nout=1, consts=()):
    """A one-node model; inputs at positions in `consts` become initializers, None is omitted."""
    names, graph_inputs, inits, feeds = [], [], [], {}
    for i, v in enumerate(inputs):
        if v is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if i in consts:
            inits.append(numpy_helper.from_array(v, name))
        else:
            dtype = helper.np_dtype_to_tensor_dtype(v.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, v.shape))
            feeds[name] = v
    outs = [f"out{i}" for i in range(nout)]
    domain, _, op = op.rpartition("::")  # "com.microsoft::BiasGelu": ONNX Runtime's own op
    node = helper.make_node(op, names, outs, name="n0", domain=domain or None, **(attrs or {}))
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs],
                              inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8 if opset < 21 else 10
    return model, feeds


OP_CASES = {
    "conv_asym_pads": ("Conv", [f32(1, 4, 9, 10), f32(6, 2, 3, 3), f32(6)],
                       dict(pads=[0, 1, 1, 2], strides=[2, 1], dilations=[2, 1], group=2), 17, 1, (1, 2)),
    "conv_same_upper": ("Conv", [f32(1, 3, 9, 10), f32(4, 3, 4, 3)], dict(auto_pad="SAME_UPPER", strides=[2, 2]),
                        17, 1, (1,)),
    "conv_same_lower": ("Conv", [f32(1, 3, 9, 10), f32(4, 3, 4, 3)], dict(auto_pad="SAME_LOWER", strides=[2, 3]),
                        17, 1, (1,)),
    "conv_valid": ("Conv", [f32(1, 3, 9, 10), f32(4, 3, 3, 3)], dict(auto_pad="VALID", strides=[2, 2]), 17, 1, (1,)),
    "conv1d": ("Conv", [f32(2, 3, 11), f32(4, 3, 3), f32(4)], dict(pads=[1, 1]), 17, 1, (1, 2)),
    "conv3d": ("Conv", [f32(1, 2, 5, 6, 7), f32(3, 2, 3, 3, 3)], dict(pads=[1, 0, 1, 1, 0, 1]), 17, 1, (1,)),
    "conv_t": ("ConvTranspose", [f32(1, 4, 5, 6), f32(4, 3, 3, 3), f32(3)],
               dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), 17, 1, (1, 2)),
    "conv_t_asym_group": ("ConvTranspose", [f32(1, 4, 5, 6), f32(4, 2, 3, 3), f32(4)],
                          dict(strides=[2, 2], pads=[0, 1, 1, 2], group=2, dilations=[2, 1]), 17, 1, (1, 2)),
    "conv_t_output_shape": ("ConvTranspose", [f32(1, 4, 5, 6), f32(4, 3, 3, 3)],
                            dict(strides=[2, 2], output_shape=[10, 13]), 17, 1, (1,)),
    "conv_t_same_upper": ("ConvTranspose", [f32(1, 4, 5, 6), f32(4, 3, 4, 3)],
                          dict(strides=[2, 2], auto_pad="SAME_UPPER"), 17, 1, (1,)),
    "conv_t_same_lower": ("ConvTranspose", [f32(1, 4, 5, 6), f32(4, 3, 4, 3)],
                          dict(strides=[2, 2], auto_pad="SAME_LOWER"), 17, 1, (1,)),
    "conv_t_big_output_padding": ("ConvTranspose", [f32(1, 2, 4, 4), f32(2, 2, 3, 3)],
                                  dict(strides=[2, 2], output_padding=[1, 0]), 17, 1, (1,)),
    "maxpool_ceil": ("MaxPool", [f32(1, 2, 10, 11)],
                     dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), 17, 1, ()),
    "maxpool_asym_ceil": ("MaxPool", [f32(1, 2, 10, 11)],
                          dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 2, 0], ceil_mode=1), 17, 1, ()),
    "maxpool_same": ("MaxPool", [f32(1, 2, 10, 11)], dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
                     17, 1, ()),
    "maxpool_same_lower": ("MaxPool", [f32(1, 2, 9, 10)],
                           dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"), 17, 1, ()),
    "maxpool_dilated": ("MaxPool", [f32(1, 2, 10, 11)], dict(kernel_shape=[2, 2], dilations=[2, 2], pads=[1] * 4),
                        17, 1, ()),
    "maxpool_indices": ("MaxPool", [f32(2, 3, 8, 9)], dict(kernel_shape=[2, 2], strides=[2, 2]), 17, 2, ()),
    "maxpool_indices_asym": ("MaxPool", [f32(2, 3, 8, 9)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 2]),
                             17, 2, ()),
    "avgpool_exclude_pad": ("AveragePool", [f32(1, 2, 10, 11)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
                            17, 1, ()),
    "avgpool_include_pad": ("AveragePool", [f32(1, 2, 10, 11)],
                            dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4, count_include_pad=1), 17, 1, ()),
    "avgpool_ceil": ("AveragePool", [f32(1, 2, 10, 11)], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
                     17, 1, ()),
    "avgpool_asym_ceil": ("AveragePool", [f32(1, 2, 10, 11)],
                          dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 1], ceil_mode=1), 17, 1, ()),
    "avgpool_asym_include": ("AveragePool", [f32(1, 2, 10, 11)],
                             dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 1], count_include_pad=1),
                             17, 1, ()),
    "avgpool_same_lower": ("AveragePool", [f32(1, 2, 10, 11)],
                           dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"), 17, 1, ()),
    "global_avgpool": ("GlobalAveragePool", [f32(2, 3, 5, 6)], None, 17, 1, ()),
    "gemm_trans_alpha_beta": ("Gemm", [f32(5, 3), f32(4, 5), f32(4)], dict(transA=1, transB=1, alpha=0.5, beta=2.0),
                              17, 1, (1, 2)),
    "gemm_c_matrix": ("Gemm", [f32(3, 5), f32(5, 4), f32(3, 4)], dict(beta=0.3), 17, 1, ()),
    "gemm_c_row": ("Gemm", [f32(3, 5), f32(4, 5), f32(1, 4)], dict(transB=1), 17, 1, (1, 2)),
    "gemm_no_c": ("Gemm", [f32(3, 5), f32(5, 4)], dict(alpha=3.0), 17, 1, ()),
    "matmul_broadcast": ("MatMul", [f32(2, 3, 4, 5), f32(5, 6)], None, 17, 1, (1,)),
    "matmul_1d": ("MatMul", [f32(5), f32(2, 5, 3)], None, 17, 1, ()),
    "matmul_batch_broadcast": ("MatMul", [f32(2, 1, 4, 5), f32(3, 5, 2)], None, 17, 1, ()),
    "reshape_zero_minus_one": ("Reshape", [f32(2, 3, 4), i64(0, -1)], None, 17, 1, (1,)),
    "reshape_allowzero": ("Reshape", [f32(2, 3, 0), i64(0, 3, 2)], dict(allowzero=1), 14, 1, (1,)),
    "reshape_runtime_shape": ("Reshape", [f32(2, 3, 4), i64(4, -1, 1)], None, 17, 1, ()),
    "slice_negative_steps": ("Slice", [f32(5, 6, 7), i64(-1, 1), i64(-I64_MAX, I64_MAX), i64(0, 2), i64(-2, 3)],
                             None, 17, 1, (1, 2, 3, 4)),
    "slice_clamped": ("Slice", [f32(5, 6, 7), i64(1, -3), i64(100, -1)], None, 17, 1, (1, 2)),
    "slice_reverse_middle": ("Slice", [f32(5, 6, 7), i64(4), i64(0), i64(1), i64(-2)], None, 17, 1, (1, 2, 3, 4)),
    "slice_runtime_bounds": ("Slice", [f32(5, 6, 7), i64(1, -1), i64(4, -5), i64(0, 2), i64(2, -1)], None, 17, 1, ()),
    "slice_opset9": ("Slice", [f32(5, 6, 7)], dict(starts=[1, 0], ends=[3, -1], axes=[0, 2]), 9, 1, ()),
    "split_input": ("Split", [f32(6, 7), i64(2, 5)], dict(axis=1), 17, 2, (1,)),
    "split_runtime_sizes": ("Split", [f32(6, 7), i64(3, 4)], dict(axis=1), 17, 2, ()),
    "split_equal": ("Split", [f32(6, 9)], dict(axis=1), 17, 3, ()),
    "split_attribute": ("Split", [f32(6, 9)], dict(axis=0, split=[1, 5]), 11, 2, ()),
    "split_num_outputs": ("Split", [f32(6, 7)], dict(axis=1, num_outputs=3), 18, 3, ()),
    "squeeze_attribute": ("Squeeze", [f32(1, 3, 1, 4)], dict(axes=[0, -2]), 11, 1, ()),
    "squeeze_input": ("Squeeze", [f32(1, 3, 1, 4), i64(2)], None, 17, 1, (1,)),
    "squeeze_all": ("Squeeze", [f32(1, 3, 1, 4)], None, 17, 1, ()),
    "unsqueeze_attribute": ("Unsqueeze", [f32(3, 4)], dict(axes=[0, -1]), 11, 1, ()),
    "unsqueeze_input": ("Unsqueeze", [f32(3, 4), i64(1, -1)], None, 17, 1, (1,)),
    "resize_nearest_floor": ("Resize", [f32(1, 2, 5, 6), None, scalar([1, 1, 2, 2])],
                             dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                             17, 1, (2,)),
    "resize_nearest_half_pixel": ("Resize", [f32(1, 2, 5, 6), None, scalar([1, 1, 1.7, 2.3])], dict(mode="nearest"),
                                  17, 1, (2,)),
    "resize_nearest_align_ceil": ("Resize", [f32(1, 2, 5, 6), None, scalar([1, 1, 1.7, 0.6])],
                                  dict(mode="nearest", nearest_mode="round_prefer_ceil",
                                       coordinate_transformation_mode="align_corners"), 17, 1, (2,)),
    "resize_nearest_sizes": ("Resize", [f32(1, 2, 5, 6), None, None, i64(1, 2, 8, 9)],
                             dict(mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn"), 17, 1, (3,)),
    "resize_linear_half_pixel": ("Resize", [f32(1, 2, 5, 6), None, scalar([1, 1, 2, 3])], dict(mode="linear"),
                                 17, 1, (2,)),
    "resize_linear_align_corners": ("Resize", [f32(1, 2, 5, 6), None, scalar([1, 1, 2, 3])],
                                    dict(mode="linear", coordinate_transformation_mode="align_corners"), 17, 1, (2,)),
    "resize_linear_asymmetric": ("Resize", [f32(1, 2, 5, 6), None, scalar([1, 1, 2, 1.5])],
                                 dict(mode="linear", coordinate_transformation_mode="asymmetric"), 17, 1, (2,)),
    "resize_linear_pytorch_sizes": ("Resize", [f32(1, 2, 5, 6), None, None, i64(1, 2, 1, 13)],
                                    dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
                                    17, 1, (3,)),
    "resize_linear_down": ("Resize", [f32(1, 2, 10, 12), None, scalar([1, 1, 0.5, 0.6])], dict(mode="linear"),
                           17, 1, (2,)),
    "resize_cubic_half_pixel": ("Resize", [f32(1, 2, 5, 6), None, scalar([1, 1, 2, 1.5])], dict(mode="cubic"),
                                17, 1, (2,)),
    "resize_cubic_down_exclude_outside": ("Resize", [f32(1, 2, 10, 12), None, scalar([1, 1, 0.5, 0.7])],
                                          dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5), 17, 1, (2,)),
    "resize_cubic_align_corners_sizes": ("Resize", [f32(1, 2, 5, 6), None, None, i64(1, 2, 9, 4)],
                                         dict(mode="cubic", coordinate_transformation_mode="align_corners"),
                                         17, 1, (3,)),
    "resize_cubic_pytorch_half_pixel": ("Resize", [f32(1, 2, 5, 6), None, None, i64(1, 2, 7, 11)],
                                        dict(mode="cubic", coordinate_transformation_mode="pytorch_half_pixel"),
                                        17, 1, (3,)),
    "col2im": ("Col2Im", [f32(2, 3 * 2 * 3, 12), i64(5, 6), i64(2, 3)], dict(strides=[1, 2], pads=[1, 0, 1, 0]),
               18, 1, (1, 2)),
    "col2im_dilated": ("Col2Im", [f32(1, 2 * 4, 4), i64(4, 4), i64(2, 2)], dict(dilations=[2, 2]), 18, 1, (1, 2)),
    "resize_opset11": ("Resize", [f32(1, 2, 5, 6), np.zeros(0, np.float32), scalar([1, 1, 2, 2])],
                       dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                       11, 1, (1, 2)),
    "resize_opset10": ("Resize", [f32(1, 2, 5, 6), scalar([1, 1, 2, 3])], dict(mode="nearest"), 10, 1, (1,)),
    "upsample_nearest": ("Upsample", [f32(1, 2, 5, 6), scalar([1, 1, 2, 3])], dict(mode="nearest"), 9, 1, (1,)),
    "upsample_linear": ("Upsample", [f32(1, 2, 5, 6), scalar([1, 1, 2, 3])], dict(mode="linear"), 9, 1, (1,)),
    "reducemean_attribute": ("ReduceMean", [f32(2, 3, 4)], dict(axes=[1, -1], keepdims=0), 13, 1, ()),
    "reducemean_input": ("ReduceMean", [f32(2, 3, 4), i64(1)], None, 18, 1, (1,)),
    "reducesum_input": ("ReduceSum", [f32(2, 3, 4), i64(0, 2)], dict(keepdims=0), 13, 1, (1,)),
    "reducesum_all": ("ReduceSum", [f32(2, 3, 4)], None, 13, 1, ()),
    "reducesum_noop": ("ReduceSum", [f32(2, 3, 4)], dict(noop_with_empty_axes=1), 13, 1, ()),
    "reducemax": ("ReduceMax", [f32(2, 3, 4)], dict(axes=[1]), 13, 1, ()),
    "reducel2": ("ReduceL2", [f32(2, 3, 4)], dict(axes=[2]), 13, 1, ()),
    "reduceprod": ("ReduceProd", [f32(2, 3, 4)], dict(axes=[0, 2]), 13, 1, ()),
    "argmax_last_index": ("ArgMax", [scalar([[1, 3, 3], [2, 2, 0]])], dict(axis=1, select_last_index=1), 17, 1, ()),
    "softmax_opset11_coerced": ("Softmax", [f32(2, 3, 4)], dict(axis=1), 11, 1, ()),
    "softmax_opset13": ("Softmax", [f32(2, 3, 4)], dict(axis=1), 13, 1, ()),
    "logsoftmax": ("LogSoftmax", [f32(2, 3, 4)], None, 17, 1, ()),
    "layernorm_axis": ("LayerNormalization", [f32(2, 3, 4), f32(3, 4), f32(3, 4)], dict(axis=-2, epsilon=1e-3),
                       17, 1, (1, 2)),
    "layernorm_no_bias": ("LayerNormalization", [f32(2, 3, 4), f32(4)], None, 17, 1, (1,)),
    "gather_negative": ("Gather", [f32(5, 4), i64(-1, 0, 3, -5)], dict(axis=0), 17, 1, (1,)),
    "gather_scalar": ("Gather", [f32(5, 4, 3), np.array(2, np.int64)], dict(axis=1), 17, 1, (1,)),
    "gather_2d_indices": ("Gather", [f32(5, 4), np.array([[1, 2], [3, -1]], np.int64)], dict(axis=1), 17, 1, ()),
    "gather_elements": ("GatherElements", [f32(3, 4), np.array([[1, -1], [0, 2], [3, 3]], np.int64)], dict(axis=1),
                        17, 1, ()),
    "expand": ("Expand", [f32(3, 1), i64(2, 1, 4)], None, 17, 1, (1,)),
    "expand_runtime_shape": ("Expand", [f32(3, 1), i64(2, 3, 5)], None, 17, 1, ()),
    "expand_bidirectional": ("Expand", [f32(2, 3, 4), i64(3, 1)], None, 17, 1, (1,)),
    "where": ("Where", [np.array([[True, False, True]]), f32(2, 3), f32(1)], None, 17, 1, ()),
    "shape_start_end": ("Shape", [f32(2, 3, 4, 5)], dict(start=1, end=-1), 15, 1, ()),
    "cast_to_int": ("Cast", [scalar([1.7, -1.7, 0.0])], dict(to=TensorProto.INT64), 17, 1, ()),
    "cast_to_bool": ("Cast", [scalar([1.7, 0.0])], dict(to=TensorProto.BOOL), 17, 1, ()),
    "constant_of_shape": ("ConstantOfShape", [i64(2, 3)],
                          dict(value=numpy_helper.from_array(np.array([7], np.int64))), 17, 1, ()),
    "constant_of_shape_default": ("ConstantOfShape", [i64(2, 3)], None, 17, 1, (0,)),
    "pow": ("Pow", [np.abs(f32(3, 4)), scalar(1.5)], None, 17, 1, (1,)),
    "pow_int_exponent": ("Pow", [f32(3, 4), np.array(2, np.int64)], None, 17, 1, (1,)),
    "erf": ("Erf", [f32(3, 4)], None, 17, 1, ()),
    "clip_min_input": ("Clip", [f32(3, 4), scalar(-0.5)], None, 13, 1, (1,)),
    "clip_runtime_bounds": ("Clip", [f32(3, 4), scalar(-0.5), scalar(0.3)], None, 13, 1, ()),
    "clip_max_only": ("Clip", [f32(3, 4), None, scalar(0.3)], None, 13, 1, (2,)),
    "clip_opset6": ("Clip", [f32(3, 4)], dict(min=-0.2, max=0.5), 6, 1, ()),
    "lrn": ("LRN", [f32(1, 7, 3, 4)], dict(size=5, alpha=1e-2, beta=0.75, bias=2.0), 17, 1, ()),
    "isnan": ("IsNaN", [np.array([1.0, np.nan, -np.inf, 0.0], np.float32)], None, 17, 1, ()),
    "isinf_positive_only": ("IsInf", [np.array([1.0, np.nan, -np.inf, np.inf], np.float32)],
                            dict(detect_negative=0), 17, 1, ()),
    "hardsigmoid": ("HardSigmoid", [f32(3, 4)], dict(alpha=0.3, beta=0.4), 17, 1, ()),
    "hardswish": ("HardSwish", [4 * f32(3, 4)], None, 17, 1, ()),
    "pad_constant_negative": ("Pad", [f32(2, 3, 4), i64(0, 1, 2, 1, 0, -1), scalar(1.5)], None, 17, 1, (1, 2)),
    "pad_reflect": ("Pad", [f32(2, 3, 4, 5), i64(0, 0, 1, 2, 0, 0, 2, 1)], dict(mode="reflect"), 17, 1, (1,)),
    "pad_edge": ("Pad", [f32(2, 3, 4, 5), i64(0, 0, 1, 2, 0, 0, 2, 1)], dict(mode="edge"), 17, 1, (1,)),
    # torch pads a 4-D input's last 2 or 3 axes in these modes, never its last alone (Swin2SR) or its first
    "pad_reflect_last_axis": ("Pad", [f32(2, 3, 4, 5), i64(0, 0, 0, 1, 0, 0, 0, 3)], dict(mode="reflect"), 17, 1, (1,)),
    "pad_edge_first_axis": ("Pad", [f32(3, 4), i64(2, 0, 1, 0)], dict(mode="edge"), 17, 1, (1,)),
    "pad_wrap_5d": ("Pad", [f32(2, 3, 2, 3, 4), i64(0, 2, 0, 0, 1, 0, 1, 0, 0, 3)], dict(mode="wrap"), 19, 1, (1,)),
    "pad_axes": ("Pad", [f32(2, 3, 4, 5), i64(1, 2, 3, 0), None, i64(-1, 1)], None, 18, 1, (1, 3)),
    "pad_opset2": ("Pad", [f32(2, 3, 4)], dict(pads=[0, 1, 0, 0, 1, 2], value=2.0), 2, 1, ()),
    "flatten_axis0": ("Flatten", [f32(2, 3, 4)], dict(axis=0), 17, 1, ()),
    "flatten_negative": ("Flatten", [f32(2, 3, 4, 5)], dict(axis=-2), 17, 1, ()),
    "transpose_default": ("Transpose", [f32(2, 3, 4)], None, 17, 1, ()),
    "depth_to_space_dcr": ("DepthToSpace", [f32(1, 8, 2, 3)], dict(blocksize=2), 17, 1, ()),
    "depth_to_space_crd": ("DepthToSpace", [f32(1, 8, 2, 3)], dict(blocksize=2, mode="CRD"), 17, 1, ()),
    "space_to_depth": ("SpaceToDepth", [f32(1, 2, 4, 6)], dict(blocksize=2), 17, 1, ()),
    "dropout_mask": ("Dropout", [f32(3, 4), scalar(0.3)], None, 12, 2, (1,)),
    "dropout_opset7": ("Dropout", [f32(3, 4)], dict(ratio=0.2), 7, 1, ()),
    "batchnorm": ("BatchNormalization", [f32(2, 3, 4, 5), f32(3), f32(3), f32(3), np.abs(f32(3))],
                  dict(epsilon=1e-3), 17, 1, (1, 2, 3, 4)),
    "batchnorm_opset9_2d": ("BatchNormalization", [f32(2, 3), f32(3), f32(3), f32(3), np.abs(f32(3))], None,
                            9, 1, (1, 2, 3, 4)),
    "instancenorm": ("InstanceNormalization", [f32(2, 3, 4, 5), f32(3), f32(3)], None, 17, 1, (1, 2)),
    "groupnorm": ("GroupNormalization", [f32(2, 6, 4, 5), f32(6), f32(6)], dict(num_groups=3), 21, 1, (1, 2)),
    "cumsum_exclusive_reverse": ("CumSum", [f32(3, 4), np.array(1, np.int64)], dict(exclusive=1, reverse=1),
                                 17, 1, (1,)),
    "trilu": ("Trilu", [f32(4, 5), np.array(-1, np.int64)], dict(upper=0), 17, 1, (1,)),
    "topk": ("TopK", [f32(3, 6), i64(2)], dict(axis=1, largest=0), 17, 2, (1,)),
    "einsum": ("Einsum", [f32(2, 3, 4), f32(2, 4, 5)], dict(equation="bij,bjk->bik"), 12, 1, ()),
    "range_int": ("Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)], None, 17, 1, ()),
    "range_double": ("Range", [np.array(0.5), np.array(3.0), np.array(0.7)], None, 17, 1, (0, 1, 2)),
    "range_float": ("Range", [scalar(0.5), scalar(3), scalar(0.7)], None, 17, 1, ()),
    "mod": ("Mod", [i64(7, -7, 7, -7), i64(3, 3, -3, -3)], None, 17, 1, ()),
    "fmod": ("Mod", [scalar([7.5, -7.5]), scalar([2, 2])], dict(fmod=1), 17, 1, ()),
    "div_int": ("Div", [i64(7, -7), i64(2, 2)], None, 17, 1, ()),
    "prelu": ("PRelu", [f32(2, 3, 4), f32(3, 1)], None, 17, 1, (1,)),
    "leakyrelu": ("LeakyRelu", [f32(3, 4)], dict(alpha=0.2), 17, 1, ()),
    "selu": ("Selu", [f32(3, 4)], None, 17, 1, ()),
    "gelu_tanh": ("Gelu", [f32(3, 4)], dict(approximate="tanh"), 20, 1, ()),
    "tile": ("Tile", [f32(2, 3), i64(2, 2)], None, 17, 1, (1,)),
    "sum_broadcast": ("Sum", [f32(2, 3), f32(3), f32(1, 3)], None, 17, 1, ()),
    "mean_broadcast": ("Mean", [f32(2, 3), f32(3), f32(1, 3)], None, 17, 1, ()),
    "max_broadcast": ("Max", [f32(2, 3), f32(3)], None, 17, 1, ()),
    "nonzero": ("NonZero", [scalar([[1, 0], [0, 3]])], None, 17, 1, ()),
    "equal": ("Equal", [i64(1, 2, 3), i64(1, 0, 3)], None, 17, 1, ()),
    "and": ("And", [np.array([True, False]), np.array([True, True])], None, 17, 1, ()),
    "gather_nd": ("GatherND", [f32(3, 4, 5), i64(0, -1, 2, 1).reshape(2, 2)], None, 17, 1, (1,)),
    "gather_nd_batch_dims": ("GatherND", [f32(2, 3, 4, 5), np.array([[[1, 3], [-1, 0]], [[0, 0], [2, 3]]], np.int64)],
                             dict(batch_dims=1), 17, 1, (1,)),
    "gather_nd_whole_rows": ("GatherND", [f32(3, 4, 5), i64(2, 0, 1).reshape(3, 1)], None, 17, 1, (1,)),
    "scatter_nd_rows": ("ScatterND", [f32(5, 3, 4), i64(3, -1).reshape(2, 1), f32(2, 3, 4)], None, 17, 1, (1,)),
    "scatter_nd_elements": ("ScatterND", [f32(3, 4), np.array([[0, 1], [2, -1]], np.int64), f32(2)], None, 17, 1, (1,)),
    "scatter_elements": ("ScatterElements", [f32(3, 4), np.array([[1, -1], [0, 2], [3, 0]], np.int64), f32(3, 2)],
                         dict(axis=1), 17, 1, (1,)),
    "scatter_elements_max": ("ScatterElements", [f32(3, 4), np.array([[1], [0], [2]], np.int64), f32(3, 1)],
                             dict(axis=1, reduction="max"), 18, 1, (1,)),
    "scatter_elements_add": ("ScatterElements", [f32(4, 3), np.array([[1, 0, 2], [1, 1, 1]], np.int64), f32(2, 3)],
                             dict(reduction="add"), 16, 1, (1,)),
    "scatter_nd_add": ("ScatterND", [f32(4, 3), i64(1, 1, 2).reshape(3, 1), f32(3, 3)], dict(reduction="add"),
                       18, 1, (1,)),
    "mean_variance_norm": ("MeanVarianceNormalization", [f32(2, 3, 4, 5)], None, 17, 1, ()),
    "mean_variance_norm_axes": ("MeanVarianceNormalization", [f32(2, 3, 4)], dict(axes=[1, 2]), 17, 1, ()),
    "lp_normalization_l1": ("LpNormalization", [f32(2, 3, 4)], dict(axis=1, p=1), 17, 1, ()),
    "lp_normalization": ("LpNormalization", [f32(2, 3, 4)], None, 17, 1, ()),
    "compress_axis": ("Compress", [f32(2, 5, 3), np.array([1, 0, 1, 1], bool)], dict(axis=1), 17, 1, (1,)),
    "compress_flat": ("Compress", [f32(2, 3), np.array([0, 1, 1, 0, 1], bool)], None, 17, 1, (1,)),
    "grid_sample": ("GridSample", [f32(2, 3, 5, 6), np.random.default_rng(2).uniform(-1.1, 1.1, (2, 4, 3, 2)).astype(np.float32)],
                    None, 16, 1, ()),
    "grid_sample_border_aligned": ("GridSample", [f32(1, 2, 4, 4), np.random.default_rng(3).uniform(-1.2, 1.2, (1, 3, 5, 2))
                                   .astype(np.float32)], dict(padding_mode="border", align_corners=1), 16, 1, ()),
    "grid_sample_reflection_cubic": ("GridSample", [f32(1, 2, 5, 5), np.random.default_rng(4).uniform(-1.3, 1.3, (1, 3, 3, 2))
                                     .astype(np.float32)], dict(mode="cubic", padding_mode="reflection"), 20, 1, ()),
    "reverse_sequence_time_first": ("ReverseSequence", [f32(5, 3, 4), i64(5, 2, 0)], None, 17, 1, (1,)),
    "reverse_sequence_batch_first": ("ReverseSequence", [f32(2, 6, 3), i64(4, 6)], dict(batch_axis=0, time_axis=1),
                                     17, 1, (1,)),
    "atanh": ("Atanh", [np.tanh(f32(3, 4))], None, 17, 1, ()),
    "bitwise_xor": ("BitwiseXor", [i64(5, 12, 7), i64(3, 10, 1)], None, 18, 1, ()),
    # a mixture of experts' routing: indices from the end and out of range, classes on another axis
    "one_hot": ("OneHot", [np.array([[0, 3], [-1, 7]], np.int64), scalar(5, np.int64), scalar([0.0, 2.5])],
                None, 17, 1, (1, 2)),
    "one_hot_axis_float_depth": ("OneHot", [np.array([[2, 0, -4], [1, 1, 3]], np.int32), scalar(4.0),
                                            scalar([-1, 1])], dict(axis=1), 17, 1, (1, 2)),
    # recurrent layers, sequence first: X (5 steps, batch 2, 3 features), hidden 4
    "lstm_peepholes_states": ("LSTM", [f32(5, 2, 3), f32(1, 16, 3), f32(1, 16, 4), f32(1, 32), i64(5, 5).astype(np.int32),
                                       f32(1, 2, 4), f32(1, 2, 4), f32(1, 12)], dict(hidden_size=4), 17, 3, (1, 2, 3, 7)),
    "lstm_bidirectional": ("LSTM", [f32(5, 2, 3), f32(2, 16, 3), f32(2, 16, 4), f32(2, 32)],
                           dict(hidden_size=4, direction="bidirectional"), 17, 3, (1, 2, 3)),
    "gru": ("GRU", [f32(5, 2, 3), f32(1, 12, 3), f32(1, 12, 4), f32(1, 24), None, f32(1, 2, 4)],
            dict(hidden_size=4), 17, 2, (1, 2, 3)),
    "gru_linear_before_reset_bidirectional": ("GRU", [f32(5, 2, 3), f32(2, 12, 3), f32(2, 12, 4), f32(2, 24)],
                                              dict(hidden_size=4, linear_before_reset=1, direction="bidirectional"),
                                              17, 2, (1, 2, 3)),
    "rnn_reverse_relu": ("RNN", [f32(5, 2, 3), f32(1, 4, 3), f32(1, 4, 4)],
                         dict(hidden_size=4, direction="reverse", activations=["Relu"]), 17, 2, (1, 2)),
    # opset 23: ONNX's own attention and RMSNorm, as torch's exporter writes them there
    "rms_norm": ("RMSNormalization", [f32(2, 3, 8), f32(8)], dict(epsilon=1e-5), 23, 1, (1,)),
    "attention_4d": ("Attention", [f32(2, 4, 5, 8), f32(2, 4, 6, 8), f32(2, 4, 6, 3)], None, 23, 1, ()),
    "attention_3d_grouped_causal": ("Attention", [f32(2, 5, 32), f32(2, 5, 16), f32(2, 5, 12)],
                                    dict(q_num_heads=4, kv_num_heads=2, is_causal=1), 23, 1, ()),
    "attention_bool_mask_softcap": ("Attention", [f32(2, 4, 5, 8), f32(2, 4, 6, 8), f32(2, 4, 6, 3),
                                                  np.random.default_rng(1).random((5, 6)) > 0.3],
                                    dict(softcap=3.0, scale=0.2), 23, 1, ()),
    "attention_head_bias_past_present": ("Attention", [f32(2, 4, 5, 8), f32(2, 4, 5, 8), f32(2, 4, 5, 3),
                                                       f32(1, 4, 5, 7), f32(2, 4, 2, 8), f32(2, 4, 2, 3)],
                                         dict(is_causal=1), 23, 3, ()),
    # ONNX Runtime's fused ops, as its transformers optimizer writes them
    "ms_bias_gelu": ("com.microsoft::BiasGelu", [f32(2, 3, 8), f32(8)], None, 17, 1, (1,)),
    "ms_fast_gelu": ("com.microsoft::FastGelu", [f32(2, 3, 8), f32(8)], None, 17, 1, (1,)),
    "ms_gelu": ("com.microsoft::Gelu", [f32(2, 3, 8)], None, 17, 1, ()),
    "ms_quick_gelu": ("com.microsoft::QuickGelu", [f32(2, 3, 8)], dict(alpha=1.5), 17, 1, ()),
    "ms_skip_layer_norm": ("com.microsoft::SkipLayerNormalization", [f32(2, 3, 8), f32(2, 3, 8), f32(8), f32(8), f32(8)],
                           dict(epsilon=1e-5), 17, 1, (2, 3, 4)),
    "ms_skip_layer_norm_sum": ("com.microsoft::SkipLayerNormalization", [f32(2, 3, 8), f32(2, 3, 8), f32(8)],
                               dict(epsilon=1e-5), 17, 4, (2,)),
    "ms_skip_simplified_layer_norm": ("com.microsoft::SkipSimplifiedLayerNormalization",
                                      [f32(2, 3, 8), f32(2, 3, 8), f32(8)], dict(epsilon=1e-5), 17, 1, (2,)),
    "ms_simplified_layer_norm": ("SimplifiedLayerNormalization", [f32(2, 3, 8), f32(8)], dict(epsilon=1e-5), 17, 1,
                                 (1,)),
    # ORT's fused BERT attention (packed Q | K | V weight, 4 heads of 4) under each kind of mask index
    "ms_attention_lengths": ("com.microsoft::Attention", [f32(2, 5, 8), f32(8, 48), f32(48), np.array([5, 3], np.int32)],
                             dict(num_heads=4), 17, 1, (1, 2, 3)),
    "ms_attention_ends_starts_scaled": ("com.microsoft::Attention", [f32(2, 5, 8), f32(8, 48), f32(48),
                                                                     np.array([5, 4, 0, 1], np.int32)],
                                        dict(num_heads=4, scale=0.3), 17, 1, (1, 2, 3)),
    "ms_attention_raw_mask": ("com.microsoft::Attention", [f32(2, 5, 8), f32(8, 48), f32(48),
                                                           np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)],
                              dict(num_heads=4), 17, 1, (1, 2, 3)),
    "ms_attention_3d_mask_causal": ("com.microsoft::Attention", [f32(2, 5, 8), f32(8, 48), f32(48),
                                                                 ((f32(2, 5, 5) > 0) | np.eye(5, dtype=bool)).astype(
                                                                     np.int32)],
                                    dict(num_heads=4, unidirectional=1), 17, 1, (1, 2, 3)),
    "ms_attention_no_mask": ("com.microsoft::Attention", [f32(2, 5, 8), f32(8, 48), f32(48)], dict(num_heads=2),
                             17, 1, (1, 2)),
    "ms_multi_head_attention_bias_lengths": ("com.microsoft::MultiHeadAttention",
                                             [f32(2, 5, 16), f32(2, 6, 16), f32(2, 6, 12), f32(44),
                                              np.array([6, 4], np.int32), f32(1, 4, 5, 6)],
                                             dict(num_heads=4), 17, 1, (3, 4, 5)),
    "ms_multi_head_attention_raw_mask_past_causal": (
        "com.microsoft::MultiHeadAttention", [f32(2, 3, 16), f32(2, 3, 16), f32(2, 3, 16), None,
                                              np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], np.int32), None,
                                              f32(2, 4, 2, 4), f32(2, 4, 2, 4)],
        dict(num_heads=4, unidirectional=1, scale=0.3), 17, 3, (4, 6, 7)),
    "ms_multi_head_attention_bnsh": ("com.microsoft::MultiHeadAttention",
                                     [f32(2, 5, 16), f32(2, 4, 6, 4), f32(2, 4, 6, 4)], dict(num_heads=4), 17, 1, ()),
    "ms_embed_layer_norm": ("com.microsoft::EmbedLayerNormalization",
                            [i64(1, 7, 3, 9, 0, 2).reshape(2, 3).astype(np.int32),
                             i64(0, 1, 1, 0, 0, 1).reshape(2, 3).astype(np.int32), f32(10, 8), f32(6, 8), f32(2, 8),
                             f32(8), f32(8), i64(1, 1, 0, 1, 1, 1).reshape(2, 3).astype(np.int32)],
                            dict(epsilon=1e-12), 17, 2, (2, 3, 4, 5, 6)),
    # grouped-query attention (4 query heads over 2 key/value heads of 16; the second sequence padded), as
    # ORT's LLM builder writes it
    "ms_group_query_attention": ("com.microsoft::GroupQueryAttention",
                                 [f32(2, 5, 64), f32(2, 5, 32), f32(2, 5, 32), None, None, np.array([4, 2], np.int32),
                                  np.array(5, np.int32)], dict(num_heads=4, kv_num_heads=2), 17, 3, (5, 6)),
    "ms_group_query_attention_packed_past_softcap": (
        "com.microsoft::GroupQueryAttention", [f32(1, 5, 128), None, None, f32(1, 2, 3, 16), f32(1, 2, 3, 16),
                                               np.array([7], np.int32), np.array(8, np.int32)],
        dict(num_heads=4, kv_num_heads=2, softcap=5.0, scale=0.3), 17, 3, (5, 6)),
    "ms_group_query_attention_rotary": (
        "com.microsoft::GroupQueryAttention", [f32(2, 5, 64), f32(2, 5, 32), f32(2, 5, 32), None, None,
                                               np.array([4, 2], np.int32), np.array(5, np.int32), f32(16, 8),
                                               f32(16, 8)], dict(num_heads=4, kv_num_heads=2, do_rotary=1),
        17, 3, (5, 6, 7, 8)),
    "ms_group_query_attention_rotary_interleaved_past": (
        "com.microsoft::GroupQueryAttention", [f32(1, 3, 128), f32(1, 3, 64), f32(1, 3, 64), f32(1, 2, 4, 32),
                                               f32(1, 2, 4, 32), np.array([6], np.int32), np.array(7, np.int32),
                                               f32(16, 8), f32(16, 8)],  # rotates 16 of 32 dimensions
        dict(num_heads=4, kv_num_heads=2, do_rotary=1, rotary_interleaved=1), 17, 3, (5, 6, 7, 8)),
    # rotary embeddings on their own: ONNX's (opset 23) and ORT's, 3-D (heads packed) or 4-D
    "rotary_3d_position_ids": ("RotaryEmbedding", [f32(2, 5, 32), f32(16, 4), f32(16, 4), i64(0, 1, 2, 3, 4, 3, 4, 5, 6, 7)
                                                   .reshape(2, 5)], dict(num_heads=4), 23, 1, (1, 2)),
    "rotary_4d_per_token_interleaved": ("RotaryEmbedding", [f32(2, 4, 5, 8), f32(2, 5, 4), f32(2, 5, 4)],
                                        dict(interleaved=1), 23, 1, ()),
    "rotary_3d_partial": ("RotaryEmbedding", [f32(2, 5, 32), f32(16, 2), f32(16, 2), i64(*range(5), *range(5))
                                              .reshape(2, 5)], dict(num_heads=4, rotary_embedding_dim=4), 23, 1, (1, 2)),
    "ms_rotary_3d": ("com.microsoft::RotaryEmbedding", [f32(2, 5, 32), i64(2, 3, 4, 5, 6, 0, 1, 2, 3, 4).reshape(2, 5),
                                                        f32(16, 4), f32(16, 4)], dict(num_heads=4), 17, 1, (2, 3)),
    "ms_rotary_offset_interleaved": ("com.microsoft::RotaryEmbedding", [f32(2, 5, 32), i64(3), f32(16, 4), f32(16, 4)],
                                     dict(num_heads=4, interleaved=1), 17, 1, (2, 3)),
    "ms_rotary_4d": ("com.microsoft::RotaryEmbedding", [f32(2, 4, 5, 8), i64(*range(5), *range(5)).reshape(2, 5),
                                                        f32(16, 4), f32(16, 4)], {}, 17, 1, (2, 3)),
    "ms_group_query_attention_bias_bidirectional": (
        "com.microsoft::GroupQueryAttention", [f32(2, 5, 64), f32(2, 5, 16), f32(2, 5, 16), None, None,
                                               np.array([4, 4], np.int32), np.array(5, np.int32), None, None, None,
                                               f32(1, 4, 5, 5)],
        dict(num_heads=4, kv_num_heads=1, causal=0), 17, 3, (5, 6)),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_single_op_matches_onnxruntime(case):
    op, inputs, attrs, opset, nout, consts = OP_CASES[case]
    model, feeds = op_model(op, inputs, attrs, opset, nout, consts)
    assert_matches_ort(model, TorchGraph(model).eval(), feeds, 1e-5)


def test_recurrent_layer_over_shorter_sequences_is_refused_clearly():
    """Variable sequence lengths are not run by the bridge: a UserError that names the way out
    (exit 2 from the CLI), not a wrong result."""
    from onnx_prune.errors import UserError

    model, feeds = op_model("LSTM", [f32(5, 2, 3), f32(1, 16, 3), f32(1, 16, 4), None,
                                     np.array([5, 3], np.int32)], dict(hidden_size=4), 17, 1, (1, 2))
    with pytest.raises(UserError, match="--recover layer"):
        TorchGraph(model).eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})


# ---------------------------------------------------------------- the zoo


_ZOO = {}
# hundreds of MB of weights each, and no op the smaller opset-9 graphs lack: canonical form only
BIG = {"light_vgg19", "light_zfnet512", "light_bvlc_alexnet"}


def zoo(name):
    """(zoo entry, canonical model), cached; only one light model at a time (they are big)."""
    if name not in _ZOO:
        if name.startswith("light_"):
            for other in [k for k in _ZOO if k.startswith("light_")]:
                del _ZOO[other]
        entry = registry.load(name)
        _ZOO[name] = entry, canonicalize(entry.model, input_shapes=entry.input_shapes).model
    return _ZOO[name]


@pytest.mark.parametrize("name", registry.names())
def test_zoo_model_matches_onnxruntime(name):
    entry, canonical = zoo(name)
    feeds = entry.make_feeds(0)
    assert_matches_ort(canonical, TorchGraph(canonical).eval(), feeds, 1e-4)
    if name not in BIG:  # the exported graph too: Constant nodes, eager shape arithmetic, opset 9
        assert_matches_ort(entry.model, TorchGraph(entry.model).eval(), feeds, 1e-4)


def _weighted_loss(out, seed=0):
    """A loss whose gradient reaches every output element (a plain sum through Softmax would not)."""
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)


@pytest.mark.parametrize("name", ["densenet", "mobilenetv3", "minilm"])
def test_every_parameter_gets_a_gradient(name):
    entry, canonical = zoo(name)
    tg = TorchGraph(canonical).train()
    params = tg.parameters_by_initializer()
    assert params and set(params) <= {t.name for t in canonical.graph.initializer}
    assert all(p.dim() > 0 and p.numel() > 1 for p in params.values()), "scalar constants must not be trained"
    _weighted_loss(run_bridge(tg, entry.make_feeds(0))).backward()
    for init, p in params.items():
        assert p.grad is not None, init
        assert torch.isfinite(p.grad).all(), init
        assert p.grad.abs().max() > 0, init


def test_batchnorm_fed_statistics_the_graph_computes_trains_in_eval_mode():
    """tf2onnx writes Keras' LayerNorm as a BatchNormalization fed the input's own mean and
    variance: in eval mode (global AdaPrune's) gradients flow through them, as ORT's outputs match."""
    entry, canonical = zoo("keras_encoder")
    assert any(n.op_type == "BatchNormalization" for n in canonical.graph.node)
    tg = TorchGraph(canonical).eval()
    feeds = entry.make_feeds(0)
    assert_matches_ort(canonical, tg, feeds, 1e-4)
    _weighted_loss(run_bridge(tg, feeds)).backward()
    grads = [p.grad for p in tg.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- export


def test_export_untouched_is_identical():
    entry, canonical = zoo("densenet")
    tg = TorchGraph(canonical)
    exported = tg.export()
    assert exported.SerializeToString() == canonical.SerializeToString()
    light = registry.load("light_squeezenet").model  # opset 9, initializers also listed as graph inputs
    exported = TorchGraph(light).export()
    for a, b in zip(exported.graph.initializer, light.graph.initializer):
        assert a.name == b.name and a.data_type == b.data_type and list(a.dims) == list(b.dims)
        assert numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()


def test_export_after_a_training_step_matches_onnxruntime():
    entry, canonical = zoo("densenet")
    feeds = entry.make_feeds(0)
    tg = TorchGraph(canonical).train()
    opt = torch.optim.SGD(tg.parameters(), lr=0.05)
    _weighted_loss(run_bridge(tg, feeds)).backward()
    opt.step()
    tg.eval()
    exported = tg.export()

    assert [n.SerializeToString() for n in exported.graph.node] == [n.SerializeToString() for n in canonical.graph.node]
    assert exported.graph.input == canonical.graph.input and exported.graph.output == canonical.graph.output
    before = {t.name: numpy_helper.to_array(t) for t in canonical.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    assert list(after) == list(before)
    for name in before:
        assert after[name].dtype == before[name].dtype and after[name].shape == before[name].shape
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert set(tg.param_names) <= set(changed)  # every weight moved...
    bn = [n.input[3] for n in canonical.graph.node if n.op_type == "BatchNormalization"]
    assert bn and set(bn) <= set(changed)  # ...and the running statistics were written back
    onnx.checker.check_model(exported, full_check=True)
    assert_matches_ort(exported, tg, feeds, 1e-4)


def test_load_from_path(tmp_path):
    model, feeds = op_model("Conv", [f32(1, 3, 8, 8), f32(4, 3, 3, 3)], dict(pads=[1] * 4), consts=(1,))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    tg = onnx_prune.torch_graph(path)
    assert onnx_prune.TorchGraph is TorchGraph
    assert isinstance(tg, TorchGraph) and list(tg.param_names) == ["in1"] and tg.param_names["in1"].isidentifier()
    assert getattr(tg, tg.param_names["in1"]) is tg.parameters_by_initializer()["in1"]
    assert_matches_ort(model, tg, feeds, 1e-5)


# ---------------------------------------------------------------- train / eval


def _bn_model(momentum=0.8):
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in [
        ("scale", rng.uniform(0.5, 1.5, 3)), ("bias", rng.standard_normal(3)),
        ("mean", rng.standard_normal(3)), ("var", rng.uniform(0.5, 1.5, 3)), ("ratio", np.array(0.5))]]
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"],
                              momentum=momentum, epsilon=1e-5, name="bn"),
             helper.make_node("Dropout", ["y", "ratio"], ["z"], name="drop")]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 5, 5])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 3, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def test_batchnorm_and_dropout_follow_train_and_eval():
    model = _bn_model(momentum=0.8)
    tg = TorchGraph(model)
    assert set(tg.param_names) == {"scale", "bias"} and {"mean", "var", "ratio"} <= set(tg.buffer_names)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    mean0, var0 = tg.tensor("mean").clone(), tg.tensor("var").clone()

    tg.eval()
    y1, y2 = tg(x), tg(x)
    assert torch.equal(y1, y2)
    assert torch.equal(tg.tensor("mean"), mean0)  # eval: running stats untouched
    assert_matches_ort(model, tg, {"x": x.numpy()}, 1e-5)

    tg.train()
    y = tg(x)
    assert (y == 0).float().mean() > 0.3  # dropout is active
    kept = y != 0
    normalized = torch.nn.functional.batch_norm(x, None, None, tg.tensor("scale"), tg.tensor("bias"), True)
    assert torch.allclose(y[kept], 2 * normalized[kept], atol=1e-5)  # batch statistics, scaled by 1/(1-p)
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = x.var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(tg.tensor("mean"), 0.8 * mean0 + 0.2 * batch_mean, atol=1e-6)  # ONNX momentum
    assert torch.allclose(tg.tensor("var"), 0.8 * var0 + 0.2 * batch_var, atol=1e-5)

    exported = {t.name: numpy_helper.to_array(t) for t in tg.export().graph.initializer}
    np.testing.assert_array_equal(exported["mean"], tg.tensor("mean").numpy())
    np.testing.assert_array_equal(exported["var"], tg.tensor("var").numpy())


# ---------------------------------------------------------------- hooks


def _first_conv(model):
    node = next(n for n in model.graph.node if n.op_type == "Conv")
    return node, {t.name: t for t in model.graph.initializer}


def _with_channel_zeroed(model, node, channel):
    """A copy of `model` whose conv `node` writes zeros on output `channel` (weight and bias zeroed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in node.input[1:]:
            value = numpy_helper.to_array(t).copy()
            value[channel] = 0
            t.CopyFrom(numpy_helper.from_array(value, t.name))
    return out


def test_value_hook_zeroing_a_channel_equals_the_zeroed_weights():
    entry, canonical = zoo("resnet_basic")
    feeds = entry.make_feeds(0)
    node, _ = _first_conv(canonical)
    assert len(node.input) == 3  # weight and bias
    tg = TorchGraph(canonical).eval()
    with torch.no_grad():
        dense = run_bridge(tg, feeds)[0]

    def zero_channel_3(t):
        mask = torch.ones(t.shape[1], 1, 1)
        mask[3] = 0
        return t * mask

    tg.value_hooks[node.output[0]] = zero_channel_3
    zeroed = _with_channel_zeroed(canonical, node, 3)
    assert_matches_ort(zeroed, tg, feeds, 1e-4)
    with torch.no_grad():
        assert not torch.allclose(run_bridge(tg, feeds)[0], dense, atol=1e-4)
    tg.value_hooks.clear()
    assert_matches_ort(canonical, tg, feeds, 1e-4)


def test_weight_hook_applies_a_trainable_soft_mask():
    entry, canonical = zoo("resnet_basic")
    feeds = entry.make_feeds(0)
    node, _ = _first_conv(canonical)
    weight, bias = node.input[1], node.input[2]
    channels = numpy_helper.to_array(next(t for t in canonical.graph.initializer if t.name == weight)).shape[0]
    mask = torch.ones(channels, requires_grad=True)
    with torch.no_grad():
        mask[5] = 0.0
    hooks = {weight: lambda w: w * mask.view(-1, 1, 1, 1), bias: lambda b: b * mask}
    tg = TorchGraph(canonical, weight_hooks=hooks).eval()
    assert_matches_ort(_with_channel_zeroed(canonical, node, 5), tg, feeds, 1e-4)
    _weighted_loss(run_bridge(tg, feeds)).backward()
    assert mask.grad is not None and mask.grad.abs().max() > 0
    assert tg.parameters_by_initializer()[weight].grad[5].abs().max() == 0  # masked out
    # the hook does not touch the stored weight: export still holds the unmasked values
    exported = {t.name: numpy_helper.to_array(t) for t in tg.export().graph.initializer}
    assert np.abs(exported[weight][5]).max() > 0


def test_hooks_on_unknown_names_are_user_errors():
    model, feeds = op_model("Relu", [f32(2, 3)])
    x = torch.from_numpy(feeds["in0"])
    with pytest.raises(UserError, match="nope"):
        TorchGraph(model, value_hooks={"nope": lambda t: t})(x)
    with pytest.raises(UserError, match="not an initializer"):
        TorchGraph(model, weight_hooks={"in0": lambda t: t})(x)


def test_inputs_by_position_or_name():
    entry, canonical = zoo("minilm")
    feeds = {k: torch.from_numpy(v) for k, v in entry.make_feeds(0).items()}
    tg = TorchGraph(canonical).eval()
    assert tg.input_names == list(feeds)
    with torch.no_grad():
        by_name = tg(**feeds)
        by_position = tg(*feeds.values())
        mixed = tg(feeds["input_ids"], attention_mask=feeds["attention_mask"])
    assert torch.equal(by_name, by_position) and torch.equal(by_name, mixed)
    with pytest.raises(TypeError, match="missing"):
        tg(feeds["input_ids"])


# ---------------------------------------------------------------- what it cannot run


def _graph_with(nodes, opset=17, extra_opsets=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def test_unsupported_ops_fail_at_construction_naming_op_and_node():
    model = _graph_with([
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("NonMaxSuppression", ["a", "a"], ["b"], name="/nms"),
        helper.make_node("FusedGemm", ["b", "b"], ["c"], name="/fused", domain="com.microsoft"),
        helper.make_node("Add", ["c", "x"], ["y"], name="add"),
    ], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UserError) as info:
        TorchGraph(model)
    message = str(info.value)
    assert "NonMaxSuppression" in message and "/nms" in message
    assert "com.microsoft::FusedGemm" in message and "/fused" in message
    assert "Relu" not in message and "Add" not in message


def test_a_model_that_draws_random_values_is_refused_for_training():
    """ViT-MAE draws its patch mask with RandomUniformLike: a draw in torch and another in ONNX
    Runtime give targets nothing could fit, so the bridge says why instead of naming a missing op."""
    model = _graph_with([helper.make_node("RandomUniformLike", ["x"], ["noise"], name="/mask_noise"),
                         helper.make_node("Add", ["x", "noise"], ["y"], name="add")])
    with pytest.raises(UserError, match=r"draws random values \(RandomUniformLike, node /mask_noise\).*--recover layer"):
        TorchGraph(model)


def test_unsupported_attributes_fail_at_construction():
    model, _ = op_model("Resize", [f32(1, 2, 5, 6), None, scalar([1, 1, 2, 2])], dict(mode="linear", antialias=1),
                        consts=(2,), opset=18)
    with pytest.raises(UserError, match="Resize.*n0.*antialias"):
        TorchGraph(model)


def test_ops_that_do_not_reach_an_output_are_not_run():
    model = _graph_with([
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("NonMaxSuppression", ["x", "x"], ["dead"], name="/nms"),
    ])
    x = torch.randn(1, 4)
    assert torch.equal(TorchGraph(model)(x), torch.relu(x))


def test_copies_keep_their_own_train_mode_and_pickle():
    model = _bn_model()
    tg = TorchGraph(model).eval()
    clone = copy.deepcopy(tg).train()
    x = torch.randn(4, 3, 5, 5)
    clone(x)  # train mode: updates the clone's running stats only
    assert not torch.equal(clone.tensor("mean"), tg.tensor("mean"))
    assert torch.equal(tg(x), tg(x))  # the original stays in eval mode
    buffer = io.BytesIO()
    torch.save(tg, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert torch.equal(restored(x), tg(x))


# ---------------------------------------------------------------- control flow and sequences


def _branch(name, weight, out):
    """A subgraph of one Conv + Relu reading `x` and a weight of the graph around it."""
    return helper.make_graph([helper.make_node("Conv", ["x", weight], [f"{name}_c"], name=f"{name}_conv", pads=[1] * 4),
                              helper.make_node("Relu", [f"{name}_c"], [out], name=f"{name}_relu")],
                             name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _if_model():
    """conv -> If(mean > 0: conv a, else: conv b) -> conv: the branches read weights no input names."""
    w = {k: numpy_helper.from_array(f32(*shape) * 0.3, k) for k, shape in
         (("w1", (4, 3, 3, 3)), ("wa", (4, 4, 3, 3)), ("wb", (4, 4, 3, 3)), ("w2", (2, 4, 1, 1)))}
    nodes = [helper.make_node("Conv", ["input", "w1"], ["x"], name="c1", pads=[1] * 4),
             helper.make_node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=_branch("then", "wa", "ya"),
                              else_branch=_branch("else", "wb", "yb")),
             helper.make_node("Conv", ["y", "w2"], ["out"], name="c2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [*w.values(), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_if_runs_the_branch_its_condition_picks_and_trains_that_branchs_weights():
    model = _if_model()
    tg = TorchGraph(model).train()
    assert {"wa", "wb"} <= set(tg.param_names)  # read only inside the branches, still weights
    branches = set()
    for sign in (1.0, -1.0):  # c1 is linear: flipping the input's sign flips the condition
        x = sign * np.abs(f32(2, 3, 6, 6))
        x_feed = {"input": x}
        mean = run_all_outputs(model, ["m"], x_feed)["m"]
        taken = "then" if mean > 0 else "else"
        branches.add(taken)
        assert_matches_ort(model, tg.eval(), x_feed, 1e-5)
        tg.train().zero_grad()
        run_bridge(tg, x_feed)[0].square().sum().backward()
        grads = tg.parameters_by_initializer()
        used, unused = ("wa", "wb") if taken == "then" else ("wb", "wa")
        assert grads[used].grad is not None and grads[used].grad.abs().sum() > 0, taken
        assert grads[unused].grad is None or grads[unused].grad.abs().sum() == 0, taken
        with torch.no_grad():
            grads[used].add_(0.1)  # a training step: export writes it where the branch reads it
        assert_matches_ort(tg.export(), tg.eval(), x_feed, 1e-5)
    assert branches == {"then", "else"}


def test_loop_with_carried_values_scan_outputs_and_a_sequence_matches_onnxruntime():
    """A TorchScript-style Loop: M and the condition given, a running sum carried, a sequence
    grown by SequenceInsert (EmbeddingBag's bags), each step's value scanned out; the condition
    the body computes ends it early."""
    body = helper.make_graph(
        [helper.make_node("Gather", ["rows", "i"], ["row"], name="pick", axis=0),
         helper.make_node("MatMul", ["row", "w"], ["proj"], name="proj"),
         helper.make_node("Add", ["acc_in", "proj"], ["acc_out"], name="accumulate"),
         helper.make_node("SequenceInsert", ["seq_in", "proj"], ["seq_out"], name="insert"),
         helper.make_node("Cast", ["i"], ["i_f"], name="cast", to=TensorProto.FLOAT),
         helper.make_node("Less", ["i_f", "stop"], ["go"], name="less"),
         helper.make_node("Mul", ["proj", "i_f"], ["scan"], name="scaled")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None),
         helper.make_tensor_sequence_value_info("seq_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("go", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
         helper.make_tensor_sequence_value_info("seq_out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("scan", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("SequenceEmpty", [], ["empty"], name="empty"),
             helper.make_node("Loop", ["trips", "start", "acc0", "empty"], ["acc", "seq", "scans"], name="loop", body=body),
             helper.make_node("ConcatFromSequence", ["seq"], ["stacked"], name="concat", axis=0, new_axis=1),
             helper.make_node("SequenceLength", ["seq"], ["n"], name="length")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [6, 4]),
         helper.make_tensor_value_info("trips", TensorProto.INT64, []),
         helper.make_tensor_value_info("stop", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info(v, t, None) for v, t in
         (("acc", TensorProto.FLOAT), ("stacked", TensorProto.FLOAT), ("scans", TensorProto.FLOAT), ("n", TensorProto.INT64))],
        [numpy_helper.from_array(f32(4, 3), "w"), numpy_helper.from_array(np.zeros(3, np.float32), "acc0"),
         numpy_helper.from_array(np.array(True), "start")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    tg = TorchGraph(model).eval()
    for trips, stop in ((5, 10.0), (6, 2.0)):  # the trip count ends it; the body's condition does
        feeds = {"rows": f32(6, 4), "trips": np.array(trips, np.int64), "stop": np.array(stop, np.float32)}
        assert_matches_ort(model, tg, feeds, 1e-5)
    assert "w" in tg.param_names  # read only in the body: a weight still
    tg.train()(torch.randn(6, 4), torch.tensor(4), torch.tensor(9.0))[0].sum().backward()
    assert tg.parameters_by_initializer()["w"].grad.abs().sum() > 0


def _scan_model(opset=17):
    """A recurrent Scan: h <- tanh(x_t W + h R) over x's first axis, with z's second axis read from
    its end; W and R are weights of the graph around the body. Outputs: the last h, each step's h
    stacked on axis 0, each step's z slice stacked on axis 1 in reverse order, then a MatMul."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "W"], ["xw"], name="xw"),
         helper.make_node("MatMul", ["h_in", "R"], ["hr"], name="hr"),
         helper.make_node("Add", ["xw", "hr"], ["pre"], name="pre"),
         helper.make_node("Add", ["pre", "z_t"], ["pre_z"], name="pre_z"),
         helper.make_node("Tanh", ["pre_z"], ["h_out"], name="tanh"),
         helper.make_node("Identity", ["h_out"], ["h_seq"], name="seq"),
         helper.make_node("Mul", ["z_t", "h_out"], ["zh"], name="zh")],
        "body",
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("h_in", "x_t", "z_t")],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("h_out", "h_seq", "zh")])
    nodes = [helper.make_node("Scan", ["h0", "x", "z"], ["h_last", "hs", "zhs"], name="scan", body=body,
                              num_scan_inputs=2, scan_input_axes=[0, -2], scan_input_directions=[0, 1],
                              scan_output_axes=[0, 1], scan_output_directions=[0, 1]),
             helper.make_node("MatMul", ["hs", "V"], ["out"], name="head")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 5, 4])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("h_last", "out", "zhs")],
        [numpy_helper.from_array(f32(3, 4) * 0.5, "W"), numpy_helper.from_array(f32(4, 4) * 0.5, "R"),
         numpy_helper.from_array(f32(4, 2), "V"), numpy_helper.from_array(np.zeros((2, 4), np.float32), "h0")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def test_scan_over_axes_either_way_matches_onnxruntime_and_trains_the_weights_its_body_reads():
    model = _scan_model()
    tg = TorchGraph(model).eval()
    feeds = {"x": f32(5, 2, 3), "z": f32(2, 5, 4)}
    assert_matches_ort(model, tg, feeds, 1e-5)
    assert {"W", "R", "V"} <= set(tg.param_names)
    tg.train().zero_grad()
    run_bridge(tg, feeds)[1].square().sum().backward()
    weights = tg.parameters_by_initializer()
    assert all(weights[w].grad.abs().sum() > 0 for w in ("W", "R", "V"))
    with torch.no_grad():
        weights["R"].mul_(0.5)  # a training step: export writes it where the body reads it
    assert_matches_ort(tg.export(), tg.eval(), feeds, 1e-5)


def _shared_weight_if_model():
    """_if_model with both branches reading the then branch's weight."""
    model = _if_model()
    (else_branch,) = [a.g for a in model.graph.node[3].attribute if a.name == "else_branch"]
    else_branch.node[0].input[1] = "wa"
    return model


@pytest.mark.parametrize("build, weights", [(_if_model, {"wa", "wb"}), (_shared_weight_if_model, {"wa"}),
                                            (_scan_model, {"W", "R"})])
def test_weights_a_body_reads_stay_in_the_main_graph_through_canonicalize_and_train(build, weights):
    """onnx-graphsurgeon's export puts a weight only a body reads into that body, where the bridge
    does not train it (nor does a sparsity method mask it): canonicalize moves it back."""
    from onnx_prune.passes.graph import all_nodes, subgraphs
    from onnx_prune.passes.sparsity import prunable_weights

    model = build()
    canon = canonicalize(model).model
    assert weights <= {t.name for t in canon.graph.initializer}
    assert not [t.name for n in all_nodes(canon.graph) for g in subgraphs(n) for t in g.initializer]
    tg = TorchGraph(canon).eval()
    assert weights <= set(tg.param_names)
    assert weights <= set(prunable_weights(canon))  # unstructured and N:M masks reach them
    feeds = {i.name: f32(*[d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input}
    dense = make_session(model).run(None, feeds)
    for a, b in zip(dense, make_session(canon).run(None, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert_matches_ort(canon, tg, feeds, 1e-5)


def test_a_weight_a_body_returns_as_is_stays_in_the_body():
    """ONNX Runtime refuses a body output that is an outer value returned as is: such an
    initializer stays where it is; and a table a body's Gather reads is a lookup table, which
    global AdaPrune leaves as it is."""
    from onnx_prune.passes.global_refit import _lookup_tables
    from onnx_prune.passes.graph import subgraphs

    then = helper.make_graph([], "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
                             [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "c")])
    other = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["row"], name="pick", axis=0),
                               helper.make_node("Neg", ["row"], ["n"], name="neg")], "else", [],
                              [helper.make_tensor_value_info("n", TensorProto.FLOAT, [2])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("ids", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(f32(5, 2), "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    canon = canonicalize(model).model
    (if_node,) = canon.graph.node
    assert [t.name for g in subgraphs(if_node) for t in g.initializer] == ["c"]
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "ids": np.array(3, np.int64)}
        assert np.array_equal(make_session(canon).run(None, feeds)[0], make_session(model).run(None, feeds)[0])
    assert _lookup_tables(canon) == {"table"}


def test_opset_8_scan_is_named_not_run():
    with pytest.raises(UserError, match=r"Scan \(node scan: opset 8's batched form\)"):
        TorchGraph(_scan_model(opset=8))


@pytest.mark.parametrize("ops, outputs", [
    ([helper.make_node("SplitToSequence", ["x"], ["s"], axis=1, keepdims=0),
      helper.make_node("SequenceErase", ["s", "one"], ["e"]),
      helper.make_node("SequenceAt", ["e", "minus_one"], ["y"]),
      helper.make_node("SequenceLength", ["e"], ["n"])], ("y", "n")),
    ([helper.make_node("SplitToSequence", ["x", "two"], ["s"], axis=1),
      helper.make_node("SequenceConstruct", ["x", "x"], ["pair"]),
      helper.make_node("SequenceAt", ["s", "minus_one"], ["last"]),
      helper.make_node("SequenceInsert", ["pair", "x", "zero"], ["three"]),
      helper.make_node("ConcatFromSequence", ["three"], ["y"], axis=-1),
      helper.make_node("ConcatFromSequence", ["s"], ["back"], axis=1)], ("y", "last", "back")),
])
def test_sequence_ops_match_onnxruntime(ops, outputs):
    consts = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
              (("one", 1), ("minus_one", -1), ("two", 2), ("zero", 0))]
    graph = helper.make_graph([helper.make_node(n.op_type, n.input, n.output, name=f"n{i}", **{
        a.name: helper.get_attribute_value(a) for a in n.attribute}) for i, n in enumerate(ops)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3])],
        [helper.make_tensor_value_info(v, TensorProto.INT64 if v == "n" else TensorProto.FLOAT, None) for v in outputs],
        consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert_matches_ort(model, TorchGraph(model).eval(), {"x": f32(2, 5, 3)}, 0)


def test_an_op_the_bridge_cannot_run_inside_a_branch_is_named():
    model = _if_model()
    then = next(a.g for a in model.graph.node[3].attribute if a.name == "then_branch")
    then.node[1].op_type = "NonMaxSuppression"
    with pytest.raises(UserError, match=r"NonMaxSuppression \(node then_relu\)"):
        TorchGraph(model)


def test_a_value_hook_inside_a_branch_is_refused_not_ignored():
    tg = TorchGraph(_if_model(), value_hooks={"ya": lambda v: v * 0})
    with pytest.raises(UserError, match="ya.*inside an If, Loop or Scan body"):
        tg(torch.randn(2, 3, 6, 6))
