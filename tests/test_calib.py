"""Calibration data sources and their errors."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnx_prune.compiler.calib import batches, load_calibration, load_calibration_with_labels, parse_preprocess
from onnx_prune.errors import UserError


def model(h=8):
    node = helper.make_node("Relu", ["x"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, h, h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, h, h])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_npz_and_batches(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, x=np.ones((5, 3, 8, 8), np.float64))
    data = load_calibration(str(p), model())
    assert data["x"].dtype == np.float32 and data["x"].shape == (5, 3, 8, 8)
    assert [b["x"].shape[0] for b in batches(data, 2)] == [2, 2, 1]


def test_npz_wrong_key_and_shape(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, image=np.ones((5, 3, 8, 8), np.float32))
    with pytest.raises(UserError, match="missing: x"):
        load_calibration(str(p), model())
    np.savez(p, x=np.ones((5, 3, 9, 9), np.float32))
    with pytest.raises(UserError, match="dim 2 = 8"):
        load_calibration(str(p), model())


def test_npz_labels_are_one_class_per_sample(tmp_path):
    p = tmp_path / "c.npz"
    x = np.ones((5, 3, 8, 8), np.float32)
    np.savez(p, x=x, labels=np.array([0, 2, 1, 2, 0]))
    data, labels = load_calibration_with_labels(str(p), model())
    assert set(data) == {"x"} and labels.tolist() == [0, 2, 1, 2, 0]
    np.savez(p, x=x)
    assert load_calibration_with_labels(str(p), model())[1] is None
    for bad, message in [(np.zeros(4, np.int64), "one integer class per sample"),
                         (np.zeros(5, np.float32), "one integer class per sample"),
                         (np.zeros((5, 2), np.int64), "one integer class per sample"),
                         (-np.ones(5, np.int64), ">= 0")]:
        np.savez(p, x=x, labels=bad)
        with pytest.raises(UserError, match=message):
            load_calibration_with_labels(str(p), model())
    with pytest.raises(UserError, match="unknown: labels"):  # only the labelled loader takes them
        load_calibration(str(p), model())


def test_callable_batches_and_errors():
    data = load_calibration("calib_fixtures:good_batches", model())
    assert data["x"].shape == (6, 3, 8, 8)
    with pytest.raises(UserError, match="raised RuntimeError: dataset server unreachable"):
        load_calibration("calib_fixtures:raises", model())
    with pytest.raises(UserError, match="no batches"):
        load_calibration("calib_fixtures:empty", model())
    with pytest.raises(UserError, match="dim 2 = 8"):
        load_calibration("calib_fixtures:wrong_shape", model())
    with pytest.raises(UserError, match="cannot import"):
        load_calibration("no_such_module_xyz:fn", model())
    # what it returned is not data: said so, not blamed on the callable as an error it raised
    with pytest.raises(UserError, match="must return a dict of arrays or an iterable of such dicts, got str"):
        load_calibration("calib_fixtures:returns_a_path", model())
    with pytest.raises(UserError, match="raised OSError: lost the connection"):  # a generator's own error
        load_calibration("calib_fixtures:generator_that_fails", model())


def test_python_callers_pass_the_data_itself_or_a_path(tmp_path):
    """From a deployment pipeline: {input: samples}, a list of batches, or a pathlib.Path."""
    x = np.ones((5, 3, 8, 8), np.float32)
    assert load_calibration({"x": x}, model())["x"].shape == (5, 3, 8, 8)
    assert load_calibration([{"x": x[:2]}, {"x": x[2:]}], model())["x"].shape == (5, 3, 8, 8)
    np.savez(tmp_path / "c.npz", x=x)
    assert load_calibration(tmp_path / "c.npz", model())["x"].shape == (5, 3, 8, 8)
    with pytest.raises(UserError, match="batches with different input names"):
        load_calibration([{"x": x}, {"image": x}], model())
    with pytest.raises(UserError, match="calibration data of type ndarray is not"):
        load_calibration(x, model())  # one line, not the array's repr


def test_image_folder(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = load_calibration(str(tmp_path), model(16), preprocess="resize=16,scale=255,mean=0.5/0.5/0.5,std=0.5/0.5/0.5")
    assert data["x"].shape == (3, 3, 16, 16)
    assert data["x"][0].min() == pytest.approx(-1.0)
    with pytest.raises(UserError, match="no images"):
        empty = tmp_path / "empty"
        empty.mkdir()
        load_calibration(str(empty), model())


def test_image_folder_takes_size_and_layout_from_the_model(tmp_path):
    """An NHWC input (Keras) at 24 x 24: images come resized and channels-last without
    --preprocess; given settings still win."""
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    node = helper.make_node("Relu", ["x"], ["y"])
    nhwc = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24, 24, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24, 24, 3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert load_calibration(str(tmp_path), nhwc)["x"].shape == (2, 24, 24, 3)
    assert load_calibration(str(tmp_path), model(16))["x"].shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="expects dim 1 = 24"):
        load_calibration(str(tmp_path), nhwc, preprocess="layout=NCHW")


def test_image_folder_reads_class_folders_and_a_spread_subset_of_a_data_set(tmp_path, monkeypatch):
    """A data set's folder (one subfolder per class) had "no images"; now its images are read in
    sorted order, and past MAX_FOLDER_IMAGES an evenly spaced subset, said in the notes, so that a
    50,000-image folder is neither read whole nor cut to its first classes."""
    from PIL import Image

    import onnx_prune.compiler.calib as calib

    for c, shade in (("cat", 20), ("dog", 220)):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((10, 10, 3), shade, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "README.txt").write_text("not an image")
    assert load_calibration(str(tmp_path), model(8))["x"].shape == (10, 3, 8, 8)
    monkeypatch.setattr(calib, "MAX_FOLDER_IMAGES", 4)
    notes = []
    x = load_calibration(str(tmp_path), model(8), preprocess="scale=1,mean=0/0/0,std=1/1/1", notes=notes)["x"]
    assert x.shape == (4, 3, 8, 8) and sorted(x[:, 0, 0, 0]) == [20, 20, 220, 220]
    assert len(notes) == 1 and "4 of its 10 images" in notes[0]


def test_image_folder_takes_a_non_square_size_from_the_model(tmp_path):
    """A 3 x 24 x 40 input (a segmentation net's wide frames) was fed 224 x 224 images."""
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "a.png")
    node = helper.make_node("Relu", ["x"], ["y"])
    wide = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 24, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 24, 40])]), opset_imports=[helper.make_opsetid("", 17)])
    assert load_calibration(str(tmp_path), wide)["x"].shape == (1, 3, 24, 40)


def test_image_folder_feeds_a_grayscale_model(tmp_path):
    """A 1-channel input (MNIST-like, NCHW or NHWC): images are read as grayscale, not as RGB (3
    channels the model refused), and a mean and std of three values count as one, their average."""
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((20, 30, 3), 60 * (i + 1), np.uint8)).save(tmp_path / f"{i}.png")
    for shape, expected in (([None, 1, 12, 12], (2, 1, 12, 12)), ([None, 12, 12, 1], (2, 12, 12, 1))):
        node = helper.make_node("Relu", ["x"], ["y"])
        gray = helper.make_model(helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]), opset_imports=[helper.make_opsetid("", 17)])
        x = load_calibration(str(tmp_path), gray, preprocess="scale=255,mean=0.2/0.4/0.6,std=0.5/0.5/0.5")["x"]
        assert x.shape == expected
        assert float(x.reshape(2, -1)[1, 0]) == pytest.approx((120 / 255 - 0.4) / 0.5, abs=1e-5)


def test_preprocess_syntax():
    assert parse_preprocess("resize=32,layout=NHWC")["layout"] == "NHWC"
    assert parse_preprocess("channels=1")["channels"] == 1
    assert parse_preprocess("resize=32")["resize"] == (32, 32) and parse_preprocess("resize=24x40")["resize"] == (24, 40)
    for bad in ("resize=0", "resize=2x3x4", "resize=big"):
        with pytest.raises(UserError, match="bad value"):
            parse_preprocess(bad)
    with pytest.raises(UserError, match="bad value"):
        parse_preprocess("channels=2")
    with pytest.raises(UserError):
        parse_preprocess("blur=3")


def test_non_finite_samples_are_refused(tmp_path):
    """One NaN spreads through every Gram matrix the error database sums: the plan would be garbage."""
    p = tmp_path / "c.npz"
    x = np.ones((5, 3, 8, 8), np.float32)
    x[2, 1, 3, 3] = np.nan
    np.savez(p, x=x)
    with pytest.raises(UserError, match="'x' holds 1 NaN or infinite"):
        load_calibration(str(p), model())
    np.savez(p, x=np.full((5, 3, 8, 8), 1e300))  # finite as float64, infinite once cast to the model's float32
    with pytest.raises(UserError, match="once cast to float32"):
        load_calibration(str(p), model())


def test_a_scalar_input_exports_without_a_batch_axis_and_calibration_says_it_cannot_vary(tmp_path):
    """A module with a 0-d input (a temperature): exported, its other input keeps a dynamic batch;
    a batch size leaves the scalar's shape alone; calibration samples cannot vary it, and say so."""
    torch = pytest.importorskip("torch")
    from onnx_prune.models.torch_export import from_torch
    from onnx_prune.passes.canonicalize import with_batch
    from onnx_prune.passes.graph import dims_of

    class Tempered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x, t):
            return (self.fc(x) / t).softmax(-1)

    m = from_torch(Tempered(), (torch.randn(2, 8), torch.tensor(2.0)))
    x, t = m.graph.input
    assert dims_of(x.type) == (None, 8) and dims_of(t.type) == ()
    assert with_batch(m, {"input0": (2, 8), "input1": ()}, 4) == {"input0": (4, 8), "input1": ()}
    p = tmp_path / "c.npz"
    np.savez(p, input0=np.zeros((6, 8), np.float32), input1=np.full(6, 2.0, np.float32))
    with pytest.raises(UserError, match="input 'input1' is a scalar \\(rank 0\\), which calibration samples cannot vary"):
        load_calibration(str(p), m)
    np.savez(p, x=np.float32(1.0))
    with pytest.raises(UserError, match="calibration input 'x' is a scalar; samples go on axis 0"):
        load_calibration(str(p), model())
