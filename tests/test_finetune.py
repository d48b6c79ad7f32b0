"""`finetune` and `compile --finetune`: the requested pattern exactly, bad data refused with one line
and exit 2 before anything is written, channel results verified and smaller, and a 2-process gloo
run (torchrun) that gives the same kind of model as one process, with identical masks on both ranks."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from finetune_fixtures import BATCH, tiny_cnn

from onnx_prune.backends.ort import make_session
from onnx_prune.compiler.cli import main
from onnx_prune.compiler.finetune import finetune_model
from onnx_prune.errors import UserError
from onnx_prune.passes import sparsity as sp

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
X = {"x": np.random.default_rng(9).standard_normal(BATCH).astype(np.float32)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save(tiny_cnn(), str(path))
    return str(path)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def finetune_cli(tiny, tmp_path, *args):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    r = cli("finetune", tiny, "-o", out, "--report", report, "--epochs", 2, *args)
    assert r.exit_code == 0, (r.output, r.exception)
    return onnx.load(str(out)), json.loads(report.read_text())


def prunable_zeros(model):
    arrays = sp.weight_arrays(model)
    names = list(sp.prunable_weights(tiny_cnn()))
    return sum(int((arrays[k] == 0).sum()) for k in names), sum(arrays[k].size for k in names)


def check_runs(model):
    # the full check's shape inference does not type sparse initializers
    onnx.checker.check_model(model, full_check=not model.graph.sparse_initializer)
    y = make_session(model).run(None, X)[0]
    assert y.shape == (BATCH[0], 10) and np.isfinite(y).all()


def test_unstructured_reaches_exact_sparsity_with_sparse_initializers(tiny, tmp_path):
    model, r = finetune_cli(tiny, tmp_path, "--data", "finetune_fixtures:good", "--method", "pdp",
                            "--pattern", "unstructured", "--sparsity", 0.9, "--sparse-initializers")
    check_runs(model)
    zeros, size = prunable_zeros(model)
    assert zeros == round(0.9 * size)  # one global budget: exact in total
    assert r["sparsity_achieved"] == pytest.approx(round(0.9 * size) / size) and r["sparsity_requested"] == 0.9
    assert len(model.graph.sparse_initializer) > 0 and r["sparse_initializers"] == len(model.graph.sparse_initializer)
    assert len(r["losses_per_epoch"]) == 2 and r["epochs"] == 2 and r["method"] == "pdp"
    assert set(r["layers"]) == {"w1", "w2", "w3", "wf"} and r["mask_respected"]
    assert r["latency"]["speedup"] > 0 and "no speedup is expected" in r["latency_note"]
    assert any("emitted model (ONNX Runtime) = trained graph" in c for c in r["verification"])


def test_nm_pattern_leaves_indivisible_layer_dense(tiny, tmp_path):
    model, r = finetune_cli(tiny, tmp_path, "--data", "finetune_fixtures:generator", "--method", "admm",
                            "--pattern", "2:4")
    check_runs(model)
    assert r["nm_check"]["ok"] and r["layers_left_dense"] == ["w1"] and r["sparsity_achieved"] == 0.5
    arrays = sp.weight_arrays(model)
    infos = sp.prunable_weights(model)
    for k in ("w2", "w3", "wf"):
        assert sp.check_nm(arrays[k], 2, 4, infos[k].in_axis, exact=True), k
    assert "3 input channels" in r["notes"][-1]


def test_channel_pattern_is_verified_smaller_and_validated(tiny, tmp_path):
    model, r = finetune_cli(tiny, tmp_path, "--data", "finetune_fixtures:split", "--method", "gap",
                            "--pattern", "channel", "--sparsity", 0.5)
    check_runs(model)
    assert r["max_abs_error_vs_masked_reference"] <= 1e-4 * 10
    assert any(c.startswith("masked-reference equivalence") for c in r["verification"])
    assert r["parameters"]["result"] < r["parameters"]["dense"]
    assert os.path.getsize(tmp_path / "out.onnx") < os.path.getsize(tiny)
    for g in r["groups"]:  # the same share in every group
        assert g["kept"] == g["channels"] - round(0.5 * g["channels"])
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert shapes["w1"][0] == 4 and shapes["w3"] == (8, 4, 1, 1)
    v = r["validation"]
    assert 0 <= v["accuracy"] <= 1 and 0 <= v["dense_accuracy"] <= 1 and -1 <= v["output_cosine_to_dense"] <= 1
    assert "real" in r["latency_note"]


def test_labels_teacher_trains_on_the_task_loss(tiny, tmp_path):
    _model, r = finetune_cli(tiny, tmp_path, "--data", "finetune_fixtures:labeled", "--method", "magnitude",
                             "--sparsity", 0.5, "--teacher", "labels", "--lr", 1e-2)
    assert r["teacher"] == "labels" and r["losses_per_epoch"][0] > 1.0  # cross-entropy over 10 classes


BAD = [("finetune_fixtures:raises", "raised RuntimeError: dataset server unreachable"),
       ("finetune_fixtures:empty", "no training batches"),
       ("finetune_fixtures:wrong_shape", "the model expects (?, 3, 8, 8)"),
       ("finetune_fixtures:wrong_name", "(missing: x) (unknown: image)"),
       ("finetune_fixtures:wrong_dtype", "batch 1: input 'x' is complex64"),
       ("finetune_fixtures:not_batches", "not a list of batches"),
       ("finetune_fixtures:fails_midway", "raised OSError while yielding training batches"),
       ("finetune_fixtures:missing_fn", "not a function"),
       ("no_such_module:fn", "cannot import --data module")]


@pytest.mark.parametrize("data,message", BAD)
def test_bad_data_is_one_line_exit_2_and_nothing_written(tiny, tmp_path, data, message):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    r = cli("finetune", tiny, "-o", out, "--report", report, "--data", data, "--sparsity", 0.5, "--epochs", 1)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-prune: error:") and message in lines[0], r.stderr
    assert not out.exists() and not report.exists()


@pytest.mark.parametrize("args,message", [
    (["--pattern", "2:4", "--sparsity", 0.3], "fixes the sparsity at 0.5"),
    (["--sparsity", 1.0], "--sparsity must be between 0 and 1"),
    (["--teacher", "labels", "--sparsity", 0.5], "needs (feeds, labels)"),
    (["--pattern", "filter", "--sparsity", 0.5], "unstructured, N:M or channel"),
    (["--device", "cuda", "--sparsity", 0.5], "sees no CUDA device"),
])
def test_bad_options_exit_2(tiny, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    out = tmp_path / "out.onnx"
    r = cli("finetune", tiny, "-o", out, "--data", "finetune_fixtures:good", "--epochs", 1, *args)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_python_api_takes_callables_and_batches():
    from finetune_fixtures import good

    res = finetune_model(tiny_cnn(), good, method="magnitude", pattern="unstructured", sparsity=0.5, epochs=1,
                         measure_latency=False)
    zeros, size = prunable_zeros(res.model)
    assert zeros == round(0.5 * size) and "latency" not in res.report
    torch_batches = [{"x": torch.from_numpy(X["x"])}] * 2  # the batches themselves, as torch tensors
    res = finetune_model(tiny_cnn(), torch_batches, method="gap", pattern="unstructured", sparsity=0.5, epochs=1,
                         options={"kappa": 2}, measure_latency=False)
    assert res.report["sparsity_achieved"] == pytest.approx(round(0.5 * size) / size)
    with pytest.raises(UserError, match="a tuple means"):
        finetune_model(tiny_cnn(), lambda: (good(), good(), good()), sparsity=0.5, epochs=1)


def test_compile_then_finetune(tiny, tmp_path, monkeypatch):
    """compile --finetune: fine-tuned weights, shapes as compile left them (so its speedup holds)."""
    from test_compile import AnalyticDB

    monkeypatch.setattr("onnx_prune.backends.predict.TimingDB", lambda *a, **k: AnalyticDB())
    # the measured speedup of a 20-microsecond model is noise: size stands in for it
    monkeypatch.setattr("onnx_prune.compiler.compile.measured_speedup",
                        lambda d, p, f, prov, th: (d.ByteSize() / p.ByteSize(), 1.0, p.ByteSize() / d.ByteSize()))
    out, report = tmp_path / "c.onnx", tmp_path / "c.json"
    r = cli("compile", tiny, "-o", out, "--target-speedup", "1.3x", "--finetune", "finetune_fixtures:split",
            "--epochs", 2, "--report", report)
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(report.read_text())
    ft = rep["finetune"]
    assert ft["epochs"] == 2 and len(ft["losses_per_epoch"]) == 2 and ft["scored_on"] == "validation batches"
    assert "every initializer keeps its shape (the measured latency holds)" in ft["verification"]
    model = onnx.load(str(out))
    check_runs(model)
    kept = {g["name"]: g["kept"] for g in rep["groups"]}
    assert sum(kept.values()) < sum(g["channels"] for g in rep["groups"])
    if ft["applied"]:
        assert rep["max_abs_error_vs_masked_reference"] is None and rep["max_abs_error_before_finetune"] is not None
        assert "fine-tuning epoch(s)" in r.stdout
    # with calibration data and an accuracy budget, the budget judges the fine-tuned weights
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((10,) + BATCH[1:]).astype(np.float32))
    r = cli("compile", tiny, "-o", tmp_path / "b.onnx", "--target-speedup", "1.3x", "--finetune",
            "finetune_fixtures:split", "--epochs", 2, "--calib", calib, "--min-fidelity", 0.01, "--report", report)
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(report.read_text())
    assert rep["accuracy_budget"]["met"] and "accuracy budget met" in r.stdout
    # fine-tuning is judged on the held-out samples, so the recovery did not refit on them
    assert "refit_on_all_samples" not in rep.get("recovery", {})
    if rep["finetune"]["applied"]:
        assert rep["output_fidelity"]["on"].endswith("after fine-tuning") and "output_fidelity_before_finetune" in rep
        assert rep["accuracy_budget"]["fidelity"] != rep["output_fidelity_before_finetune"]["mean_cosine_similarity"]
    bad = cli("compile", tiny, "-o", tmp_path / "d.onnx", "--target-speedup", "1.3x",
              "--finetune", "finetune_fixtures:empty")
    assert bad.exit_code == 2 and "no training batches" in bad.stderr and not (tmp_path / "d.onnx").exists()


def test_two_process_gloo_run_matches_single_process(tiny, tmp_path):
    args = ["finetune", tiny, "--data", "finetune_fixtures:good", "--method", "pdp", "--pattern", "unstructured",
            "--sparsity", 0.75, "--epochs", 2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    ddp_out, ddp_report = tmp_path / "ddp.onnx", tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "onnx_prune", *map(str, args), "-o", str(ddp_out), "--report", str(ddp_report)]
    # its own process group, so a hang cannot leave the two workers behind
    p = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    assert p.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    single, r1 = finetune_cli(tiny, tmp_path, *args[2:])
    ddp, r2 = onnx.load(str(ddp_out)), json.loads(ddp_report.read_text())
    d = r2["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["batches_per_rank"] == 2
    assert d["masks_identical_across_ranks"] and d["weights_identical_across_ranks"]
    assert len(set(d["mask_digests"])) == 1
    check_runs(ddp)
    assert prunable_zeros(ddp) == prunable_zeros(single)  # the same exact sparsity
    assert r2["sparsity_achieved"] == r1["sparsity_achieved"] and r2["pattern"] == r1["pattern"]
    assert r2["steps"] == 4 and r1["steps"] == 8  # 4 batches: 2 per rank per epoch
    assert [(t.name, tuple(t.dims)) for t in ddp.graph.initializer] == \
        [(t.name, tuple(t.dims)) for t in single.graph.initializer]


def test_half_precision_weights_train_through_a_float32_master_copy():
    """A float16 model (ORT's converter, float32 I/O): Adam on the float16 weights themselves
    underflows (the loss was NaN at the second step). The bridge trains a float32 copy and runs the
    graph in float16; the emitted model is float16 again, at the sparsity asked for."""
    from finetune_fixtures import good
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from onnx_prune.backends.torch_graph import TorchGraph

    half = convert_float_to_float16(tiny_cnn(), keep_io_types=True)
    net = TorchGraph(half)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    res = finetune_model(half, good, method="magnitude", pattern="channel", sparsity=0.5, epochs=2,
                         measure_latency=False)
    assert all(np.isfinite(res.report["losses_per_epoch"]))
    weights = [t for t in res.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(weights) == len([t for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16])
    out = make_session(res.model).run(None, X)[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()
