"""A model over protobuf's 2 GiB through `compile`: a BERT with BERT-large's layer shapes and more
layers (random weights, `transformers`), exported by torch with external data.

    python benchmarks/large_model.py [--layers 42] [--seq 128] [--target 2x] [--calib 32] [--dir DIR]

Prints the model's size, the CLI's log and its exit code; `/usr/bin/time -v` gives the peak memory
where it exists. 42 layers of hidden 1024 are 2.24 GB of float32 weights.
"""

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def export(path, layers, seq):
    import torch
    import transformers

    from onnx_prune.models.hf import SingleOutput

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                                     intermediate_size=4096, attn_implementation="eager")
    model = SingleOutput(transformers.BertModel(config), ("input_ids", "attention_mask"), "last_hidden_state").eval()
    ids = torch.randint(0, config.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.int64)
    torch.onnx.export(model, (ids, mask), path, dynamo=False, opset_version=17, do_constant_folding=True,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}})
    return config.vocab_size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--target", default="2x")
    ap.add_argument("--calib", type=int, default=0, help="random token sequences as calibration data (0: none)")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    folder = args.dir or tempfile.mkdtemp()
    path = os.path.join(folder, "bert.onnx")
    # in a child process: torch would keep the model's memory in this one through the compile
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        vocab = pool.apply(export, (path, args.layers, args.seq))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"exported {args.layers} layers: {size / 1e9:.2f} GB in {len(os.listdir(folder))} files", flush=True)
    cmd = [sys.executable, "-m", "onnx_prune", "compile", path, "-o", os.path.join(folder, "out", "bert.fast.onnx"),
           "--target-speedup", args.target, "--input-shape", f"input_ids=1x{args.seq},attention_mask=1x{args.seq}",
           "--report", os.path.join(folder, "out", "report.json")]
    if args.calib:
        rng = np.random.default_rng(0)
        calib = os.path.join(folder, "calib.npz")
        np.savez(calib, input_ids=rng.integers(1000, vocab, (args.calib, args.seq)),
                 attention_mask=np.ones((args.calib, args.seq), np.int64))
        cmd += ["--calib", calib]
    timer = ["/usr/bin/time", "-v"] if shutil.which("time") or os.path.exists("/usr/bin/time") else []
    rc = subprocess.call(timer + cmd)
    print(f"exit code {rc}")


if __name__ == "__main__":
    main()
