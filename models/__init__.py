"""onnx_prune.models: the model zoo the pruner is tested on.

registry (names/load) is the entry point; torch_export.from_torch exports any
torch module; zoo, hf, light and minilm hold the individual sources.
"""
