"""ONNX export, parity gates, graph checks and passes, deployment bundles (quantization, predict.py)."""
