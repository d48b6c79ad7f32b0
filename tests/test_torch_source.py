"""A model given as a torch.nn.Module: from Python (example_inputs=) and on the command line
(`pkg.module:fn` returning the module and its example inputs); callables import from the
current folder even where the console script's sys.path lacks it."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

import onnx_prune
from onnx_prune.compiler.calib import import_callable
from onnx_prune.errors import UserError

torch = pytest.importorskip("torch")

BUILDER = textwrap.dedent("""
    import torch

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                                   torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 1))

    def build():
        return net(), torch.randn(1, 3, 16, 16)

    def bare():
        return net()

    def broken():
        raise RuntimeError("weights not found")

    def number():
        return 3
""")


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                               torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 1))


def test_prune_and_analyze_take_a_torch_module_and_leave_its_modes_alone():
    module, x = net(), torch.randn(2, 3, 16, 16)
    module.train()
    module[1].eval()  # a frozen BatchNorm in a training model: modes differ per submodule
    result = onnx_prune.prune(module, 0.5, example_inputs=x)
    assert result.report["max_abs_error_vs_masked_reference"] < 1e-4
    kept = [g["kept"] for g in result.report["groups"]]
    assert kept == [16], kept  # the 32 channels between the convs, halved
    assert [m.training for m in module.modules()] == [True, True, False, True, True]
    assert len(onnx_prune.analyze(module, example_inputs=x).groups) == 1
    assert len(onnx_prune.analyze(module, example_inputs=[x]).groups) == 1  # a list of arguments, as a tuple


def test_torch_module_without_example_inputs_or_wrong_types_are_clear_errors():
    with pytest.raises(UserError, match="example_inputs="):
        onnx_prune.analyze(net())
    with pytest.raises(UserError, match="example_inputs is for a torch module"):
        onnx_prune.analyze(onnx.ModelProto(), example_inputs=torch.zeros(1))
    with pytest.raises(UserError, match="expected a model path or an onnx.ModelProto, got int"):
        onnx_prune.analyze(3)
    with pytest.raises(UserError, match="failed on its example inputs"):
        onnx_prune.from_torch(net(), torch.zeros(1, 5, 16, 16))  # 5 channels into a 3-channel conv


def test_an_op_the_torchscript_exporter_lacks_exports_through_dynamo():
    """torch.diff (as transformers' decoder masks use it) has no TorchScript symbolic: from_torch
    exports through dynamo instead, and the model runs as the module does and prunes."""
    import onnxruntime as ort

    class DiffNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(9, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(torch.diff(x, dim=-1))))

    module, x = DiffNet().eval(), torch.randn(2, 10)
    model = onnx_prune.from_torch(module, x)
    assert any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in model.opset_import)  # dynamo's opset
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert [g.size for g in onnx_prune.analyze(model, input_shapes={sess.get_inputs()[0].name: (2, 10)}).groups] == [32]
    # torch.export fixes a batch of 1: the graph says so instead of declaring a batch it cannot run
    one = onnx_prune.from_torch(module, x[:1])
    assert [d.dim_value for d in one.graph.input[0].type.tensor_type.shape.dim] == [1, 10]


def test_dynamo_fallback_keeps_a_varargs_forwards_dynamic_batch_and_prints_nothing(capfd):
    """A forward(*inputs) (as the zoo's wrappers of transformers models have): torch.export binds
    dynamic axes by parameter name, so from_torch gives it dynamic_shapes in the signature's
    structure. The TorchScript exporter's failure dumps its whole graph on the process's stdout
    from C++: none of it reaches the user."""
    import onnxruntime as ort

    class VarargsDiff(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(9, 4)

        def forward(self, *inputs):
            return self.fc(torch.diff(inputs[0], dim=-1)) + inputs[1]

    module, a, b = VarargsDiff().eval(), torch.randn(2, 10), torch.randn(2, 4)
    capfd.readouterr()
    model = onnx_prune.from_torch(module, (a, b), input_names=["a", "b"])
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out[:200], err[:200])
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", 10]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a3, b3 = torch.randn(3, 10), torch.randn(3, 4)
    y = sess.run(None, {"a": a3.numpy(), "b": b3.numpy()})[0]
    np.testing.assert_allclose(y, module(a3, b3).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_an_invalid_torchscript_export_is_redone_through_dynamo():
    """torch.onnx.ops.rotary_embedding through the TorchScript exporter becomes a RotaryEmbedding
    with its attributes as extra inputs, which ONNX's schema (and ORT) reject: from_torch checks the
    graph and exports again through dynamo, whose RotaryEmbedding prunes its heads."""
    import onnxruntime as ort

    class Rope(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o = torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)
            angles = torch.outer(torch.arange(16).float(), 1.0 / 100 ** (torch.arange(4) / 4))
            self.register_buffer("cos", angles.cos())
            self.register_buffer("sin", angles.sin())

        def forward(self, x, pos):
            return self.o(torch.onnx.ops.rotary_embedding(self.q(x), self.cos, self.sin, pos, num_heads=4))

    module, x, pos = Rope().eval(), torch.randn(2, 6, 32), torch.arange(6).repeat(2, 1)
    model = onnx_prune.from_torch(module, (x, pos), input_names=["x", "pos"], opset=23)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.numpy(), "pos": pos.numpy()})[0]
    np.testing.assert_allclose(y, module(x, pos).detach().numpy(), rtol=1e-5, atol=1e-5)
    groups = onnx_prune.analyze(model, input_shapes={"x": (2, 6, 32), "pos": (2, 6)}).groups
    assert sorted(g.size for g in groups) == [4, 4]  # heads; each head's 4 pairs of dimensions


def test_a_torchscript_export_onnx_runtime_cannot_run_is_redone_through_dynamo():
    """torch.tensor_split at an index read from a shape (as transformers' Mamba splits its scan)
    passes ONNX's checker through the TorchScript exporter, but its Tile gets 2-d repeats that ONNX
    Runtime refuses: from_torch runs the graph on the example inputs and exports again through
    dynamo, whose graph runs as the module does and prunes."""
    import onnxruntime as ort

    class SplitAtShape(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            h = self.fc(x)
            kept, _ = torch.tensor_split(h, [h.shape[1]], dim=1)
            return self.out(torch.relu(kept))

    module, x = SplitAtShape().eval(), torch.randn(2, 6, 8)
    model = onnx_prune.from_torch(module, x)
    assert any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in model.opset_import)  # dynamo's opset
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], module(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    assert [g.size for g in onnx_prune.analyze(model, input_shapes={"input": (2, 6, 8)}).groups] == [32]


def test_callables_import_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "calibsrc.py").write_text("def fn():\n    return {'x': [[1.0]]}\n")
    monkeypatch.chdir(tmp_path)
    # as under the `onnx-prune` console script: neither '' nor the current folder on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    assert import_callable("calibsrc:fn")() == {"x": [[1.0]]}


def console_script():
    """The installed `onnx-prune` script of this interpreter (its scripts folder, or the user
    scheme's under pip --user), else the one on PATH."""
    import shutil
    import sysconfig

    folders = [os.path.dirname(sys.executable), sysconfig.get_path("scripts"),
               sysconfig.get_path("scripts", f"{os.name}_user")]
    for folder in folders:
        path = os.path.join(folder, "onnx-prune")
        if os.path.exists(path):
            return path
    path = shutil.which("onnx-prune")
    if path is None:
        pytest.fail(f"the onnx-prune console script is not installed (looked in {folders} and on PATH)")
    return path


def run_script(*args, cwd):
    return subprocess.run([console_script(), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_model_from_a_torch_builder_in_the_current_folder(tmp_path):
    (tmp_path / "netdef.py").write_text(BUILDER)
    r = run_script("prune", "netdef:build", "-o", "small.onnx", "--ratio", "0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    small = onnx.load(str(tmp_path / "small.onnx"))
    conv_out = [i for i in small.graph.initializer if list(i.dims[:2]) == [16, 3]]
    assert conv_out, [list(i.dims) for i in small.graph.initializer]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((4, 3, 16, 16), np.float32)})[0].shape == (4, 8, 16, 16)


@pytest.mark.parametrize("spec, message", [
    ("netdef:bare", "returned a torch module alone: return (module, example_inputs)"),
    ("netdef:broken", "raised RuntimeError: weights not found"),
    ("netdef:number", "must return an onnx.ModelProto, a path, or (torch module, example inputs)"),
    ("netdef:missing", "'missing' is not a function of netdef"),
])
def test_cli_model_builder_errors(tmp_path, spec, message):
    (tmp_path / "netdef.py").write_text(BUILDER)
    r = run_script("analyze", spec, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_compile_takes_a_torch_module_and_times_it_at_the_examples_batch(monkeypatch):
    from test_compile import AnalyticDB

    monkeypatch.setattr("onnx_prune.backends.predict.TimingDB", lambda *a, **k: AnalyticDB())
    module = net()
    result = onnx_prune.compile(module, "1.3x", example_inputs=torch.randn(4, 3, 16, 16),
                                timer=lambda d, p, f: (d.ByteSize() / p.ByteSize(), 1.0, p.ByteSize() / d.ByteSize()))
    assert result.report["batch_size"] == 4 and result.report["measured_speedup"] >= 1.3
    assert [i.name for i in result.model.graph.input] == ["input"]
    assert module.training  # a fresh module trains; the export left it so


class KeywordNet(torch.nn.Module):
    """A module that takes keyword arguments and returns a dict of tensors, as transformers'
    models take a tokenizer's {input_ids, attention_mask} and return a ModelOutput."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 32)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))

    def forward(self, input_ids=None, attention_mask=None):
        h = self.embed(input_ids) * attention_mask[..., None]
        h = h + self.ffn(h)
        return {"last_hidden_state": h, "pooled": h.mean(1)}


def test_keyword_example_inputs_name_the_graph_inputs_and_outputs(monkeypatch):
    """example_inputs as a dict (a tokenizer's output) were passed as one positional argument (the
    module failed on them); now they are the module's keyword arguments, the graph's inputs take
    their names, a returned dict of tensors names the outputs, and compile times the dict's batch."""
    from test_compile import AnalyticDB

    monkeypatch.setattr("onnx_prune.backends.predict.TimingDB", lambda *a, **k: AnalyticDB())
    enc = {"input_ids": torch.randint(0, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    model = onnx_prune.from_torch(KeywordNet().eval(), enc)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "pooled"]
    result = onnx_prune.compile(KeywordNet(), "1.3x", example_inputs=enc,
                                timer=lambda d, p, f: (d.ByteSize() / p.ByteSize(), 1.0, p.ByteSize() / d.ByteSize()))
    assert result.report["batch_size"] == 3 and [g["channels"] for g in result.report["groups"]] == [64]
