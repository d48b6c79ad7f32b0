from onnx_prune.compiler.cli import main

main()
