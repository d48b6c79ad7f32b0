"""onnx_prune.compiler"""
