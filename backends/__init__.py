"""onnx_prune.backends"""
