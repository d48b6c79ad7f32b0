"""onnx_prune.passes"""
