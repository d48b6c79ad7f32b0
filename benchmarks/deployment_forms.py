"""The forms models reach users in, beyond a plain export: each analysed, pruned at 0.5 (verified)
and compiled to a measured target (README, "Deployment forms and other exporters").

    python benchmarks/deployment_forms.py [NAME ...] [--no-compile]

Forms: zoo models saved from an ONNX Runtime session at level extended (FusedConv, FusedMatMul),
converted to float16 by ORT's converter, fused by ORT's transformers optimizer (a LLaMA: RMS norms
as SimplifiedLayerNormalization); torch modules exported by `from_torch`: a stack with opset 23's
RMSNormalization, one with `torch.onnx.ops.rotary_embedding`, a GAN-style generator and an
EDSR-like super-resolution net; and, where onnxruntime-genai is installed, a LLaMA written by its
model builder. Random weights; figures vary by machine and by run.
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnx_prune
from onnx_prune.errors import TargetNotMet
from onnx_prune.models.registry import load

WORK = Path(tempfile.mkdtemp(prefix="deployment_forms_"))


def _zoo(name):
    entry = load(name)
    return entry.model, dict(entry.input_shapes), entry.make_feeds()


def ort_saved(name):
    import onnxruntime as ort

    model, shapes, feeds = _zoo(name)
    src, saved = WORK / f"{name}.onnx", WORK / f"{name}_ort_extended.onnx"
    onnx.save(model, src)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(saved)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return onnx.load(saved), shapes, feeds


def float16(name):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model, shapes, feeds = _zoo(name)
    return convert_float_to_float16(model, keep_io_types=True), shapes, feeds


def _torch(module, inputs, names, opset=17, dynamo=False):
    import torch

    module.eval()
    if dynamo:
        model = torch.onnx.export(module, inputs, input_names=names, opset_version=opset, dynamo=True).model_proto
    else:
        model = onnx_prune.from_torch(module, inputs, input_names=names, opset=opset)
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    return model, {n: tuple(v.shape) for n, v in feeds.items()}, feeds


def llama_ort_fused():
    import torch
    import transformers
    from onnxruntime.transformers.optimizer import optimize_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=2000,
                                      max_position_embeddings=128, use_cache=False, attn_implementation="eager")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = transformers.LlamaForCausalLM(config)

        def forward(self, ids, mask):
            return self.lm(input_ids=ids, attention_mask=mask).logits

    ids = torch.randint(0, 2000, (2, 32))
    model, shapes, feeds = _torch(Logits(), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"])
    onnx.save(model, WORK / "llama.onnx")
    fused = optimize_model(str(WORK / "llama.onnx"), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    return fused.model, shapes, feeds


def _blocks(norm, rope=False):
    import torch

    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, d=256, heads=8):
            super().__init__()
            self.heads, self.n1, self.n2 = heads, norm(d), norm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            angles = torch.outer(torch.arange(128).float(), 1.0 / 10000 ** (torch.arange(d // heads // 2) / (d // heads // 2)))
            self.register_buffer("cos", angles.cos())
            self.register_buffer("sin", angles.sin())

        def forward(self, x, pos):
            b, s, d = x.shape
            h = self.n1(x)
            turn = (lambda t: torch.onnx.ops.rotary_embedding(t, self.cos, self.sin, pos, num_heads=self.heads)) \
                if rope else (lambda t: t)
            q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (turn(self.q(h)), turn(self.k(h)), self.v(h)))
            a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
            x = x + self.o(a)
            return x + self.down(torch.relu(self.up(self.n2(x))))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.head = nn.ModuleList(Block() for _ in range(2)), nn.Linear(256, 10)

        def forward(self, x, pos):
            for block in self.blocks:
                x = block(x, pos)
            return self.head(x)

    return Stack()


def rmsnorm_opset23():
    import torch

    torch.manual_seed(0)
    x, pos = torch.randn(2, 32, 256), torch.arange(32).repeat(2, 1)
    return _torch(_blocks(torch.nn.RMSNorm), (x, pos), ["x", "pos"], opset=23, dynamo=True)


def rotary_opset23():
    import torch

    torch.manual_seed(0)
    x, pos = torch.randn(2, 32, 256), torch.arange(32).repeat(2, 1)
    return _torch(_blocks(torch.nn.LayerNorm, rope=True), (x, pos), ["x", "pos"], opset=23, dynamo=True)


def _batchnorm_stats(module):
    import torch

    for m in module.modules():  # random statistics, so that pruning has something to lose
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return module


def generator():
    import torch

    nn = torch.nn
    torch.manual_seed(0)

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 256 * 4 * 4)
            self.up = nn.Sequential(nn.ConvTranspose2d(256, 128, 4, 2, 1), nn.BatchNorm2d(128), nn.ReLU(),
                                    nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                    nn.ConvTranspose2d(64, 3, 4, 2, 1), nn.Tanh())

        def forward(self, z):
            return self.up(self.fc(z).view(-1, 256, 4, 4))

    return _torch(_batchnorm_stats(Generator()), (torch.randn(4, 64),), ["z"])


def super_resolution():
    import torch

    nn = torch.nn
    torch.manual_seed(0)

    class EDSR(nn.Module):
        def __init__(self, c=64):
            super().__init__()
            self.head, self.tail = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 3, 3, padding=1)
            self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
                                      for _ in range(4))
            self.up = nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2),
                                    nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2))

        def forward(self, x):
            h = r = self.head(x)
            for block in self.body:
                r = r + 0.1 * block(r)
            return self.tail(self.up(h + r))

    return _torch(EDSR(), (torch.randn(1, 3, 48, 48),), ["image"])


def genai_llama():
    """A LLaMA as `onnxruntime_genai`'s model builder writes it (fp32, CPU: GroupQueryAttention with
    rotary embedding, the key/value cache as graph inputs and outputs), timed at a prompt's prefill
    (an empty cache). Needs `pip install onnxruntime-genai` (not a dependency)."""
    import subprocess

    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=2000,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    source, built = WORK / "llama_hf", WORK / "llama_genai"
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(2000)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", bos_token="w1",
                                         eos_token="w2").save_pretrained(source)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(built),
                    "-p", "fp32", "-e", "cpu", "-c", str(WORK / "cache")], check=True, capture_output=True)
    model = onnx.load(built / "model.onnx")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 2000, (1, 16)), "attention_mask": np.ones((1, 16), np.int64)}
    for i in model.graph.input:
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, 4, 0, 32), np.float32)
    return model, {k: v.shape for k, v in feeds.items()}, feeds


FORMS = {  # name -> (build, compile target)
    "resnet_basic_ort_saved": (lambda: ort_saved("resnet_basic"), 1.5),
    "mobilenetv3_ort_saved": (lambda: ort_saved("mobilenetv3"), 1.5),
    "hf_bert_ort_saved": (lambda: ort_saved("hf_bert"), 1.5),
    "resnet_basic_float16": (lambda: float16("resnet_basic"), 1.5),
    "hf_bert_float16": (lambda: float16("hf_bert"), 1.5),
    "llama_ort_transformers_optimizer": (llama_ort_fused, 2.0),
    "rmsnorm_opset23": (rmsnorm_opset23, 2.0),
    "rotary_opset23": (rotary_opset23, 2.0),
    "generator": (generator, 2.0),
    "super_resolution": (super_resolution, 2.0),
    "genai_llama": (genai_llama, 1.5),  # only where onnxruntime-genai is installed
}


def _calibration(feeds, n=32, seed=1):
    """n random samples like the example feeds: normal floats, token ids in the examples' range,
    constant inputs (attention masks, positions) as given."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in feeds.items():
        same_rows = len(v) > 1 and np.all(v == v[:1])  # positions given alike for every sample
        if v.size == 0 or np.all(v == v.flat[0]) or (v.dtype.kind in "iu" and same_rows):
            out[k] = np.repeat(v[:1], n, axis=0)
        elif v.dtype.kind == "f":
            out[k] = rng.standard_normal((n,) + v.shape[1:]).astype(v.dtype)
        else:
            out[k] = rng.integers(0, int(v.max()) + 1, (n,) + v.shape[1:]).astype(v.dtype)
    return out


def row(name, compile_too):
    build, target = FORMS[name]
    model, shapes, feeds = build()
    analysis = onnx_prune.analyze(model, input_shapes=shapes)
    pruned = onnx_prune.prune(model, 0.5, input_shapes=shapes)
    out = {"form": name, "groups": len(analysis.groups), "prune_error": pruned.report["max_abs_error_vs_masked_reference"]}
    if compile_too:
        t = time.time()
        calib = _calibration(feeds)
        try:
            report = onnx_prune.compile(model, target, input_shapes=shapes, calib=calib).report
        except TargetNotMet as exc:
            report = exc.report
        out.update(target=target, measured=report.get("measured_speedup"), seconds=time.time() - t,
                   cosine=(report.get("output_fidelity") or {}).get("mean_cosine_similarity"))
    return out


def main(argv):
    chosen = [a for a in argv if not a.startswith("--")] or list(FORMS)
    for name in chosen:
        try:
            r = row(name, "--no-compile" not in argv)
        except Exception as exc:  # report and go on: this is a survey
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        line = f"{r['form']:34s} groups={r['groups']:3d} prune 0.5 err={r['prune_error']:.1e}"
        if "target" in r:
            cos = f" held-out cosine {r['cosine']:.3f}" if r["cosine"] is not None else ""
            line += f" | compile {r['target']}x -> {r['measured'] or 0:.2f}x in {r['seconds']:.0f} s{cos}"
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
