"""Hugging Face `transformers` architectures built from small configs with random weights.

Nothing is downloaded: every model comes from a config class, gets seeded random
weights (non-trivial BatchNorm statistics included, see zoo.init_weights) and is
wrapped to return one tensor so it exports to a single-output ONNX graph.
"""

from __future__ import annotations

import transformers
from torch import nn

from .feeds import image, mask, tokens
from .zoo import ZooEntry


class SingleOutput(nn.Module):
    """Calls the HF model with named inputs and returns one field of its output."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...], output: str):
        super().__init__()
        self.model, self.input_names, self.output = model, input_names, output

    def forward(self, *inputs):
        return getattr(self.model(**dict(zip(self.input_names, inputs))), self.output)


PIXELS = {"pixel_values": image(2, 3, 64, 64)}
TEXT = {"input_ids": tokens(2, 16, 1000), "attention_mask": mask(2, 16)}


def _entry(name, family, model_fn, inputs, output="logits"):
    builder = lambda: SingleOutput(model_fn(), tuple(inputs), output)  # noqa: E731
    return ZooEntry(name, family, builder, inputs, (output,))


def _resnet():
    config = transformers.ResNetConfig(
        embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_labels=10,
    )
    return transformers.ResNetForImageClassification(config)


def _convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10)
    return transformers.ConvNextForImageClassification(config)


def _convnextv2():
    # global response norm: each channel scaled by its spatial norm over the mean of all channels'
    config = transformers.ConvNextV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10)
    return transformers.ConvNextV2ForImageClassification(config)


def _mobilenetv2():
    # tf_padding=False: TF "same" padding traces to ~900 shape-arithmetic nodes;
    # hf_efficientnet already covers that dynamic-Pad pattern.
    config = transformers.MobileNetV2Config(
        depth_multiplier=0.35, image_size=64, tf_padding=False, num_labels=10,
    )
    return transformers.MobileNetV2ForImageClassification(config)


def _regnet():
    config = transformers.RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
        groups_width=8, layer_type="y", num_labels=10,
    )
    return transformers.RegNetForImageClassification(config)


def _efficientnet():
    # hidden_dim must equal the top conv width, round_filters(1280) = 320 at width 0.25.
    config = transformers.EfficientNetConfig(
        image_size=64, width_coefficient=0.25, depth_coefficient=0.3, hidden_dim=320, num_labels=10,
    )
    return transformers.EfficientNetForImageClassification(config)


def _vit():
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=10, attn_implementation="eager",
    )
    return transformers.ViTForImageClassification(config)


def _bert():
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=1000, max_position_embeddings=64, attn_implementation="eager",
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def _llama_gqa():
    # grouped-query attention: 4 query heads share 2 key/value heads (repeat_kv's Expand)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64, use_cache=False,
        attn_implementation="eager",
    )
    return transformers.LlamaModel(config)


ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _entry("hf_resnet", "cnn", _resnet, PIXELS),
        _entry("hf_convnext", "cnn", _convnext, PIXELS),
        _entry("hf_convnextv2", "cnn", _convnextv2, PIXELS),
        _entry("hf_mobilenetv2", "cnn", _mobilenetv2, PIXELS),
        _entry("hf_regnet", "cnn", _regnet, PIXELS),
        _entry("hf_efficientnet", "cnn", _efficientnet, PIXELS),
        _entry("hf_vit", "transformer", _vit, {"pixel_values": image(2, 3, 32, 32)}),
        _entry("hf_bert", "transformer", _bert, TEXT, "last_hidden_state"),
        _entry("hf_llama_gqa", "transformer", _llama_gqa, TEXT, "last_hidden_state"),
    )
}
