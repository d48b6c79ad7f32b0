"""onnx_prune.models"""
