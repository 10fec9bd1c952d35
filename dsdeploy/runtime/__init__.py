"""ONNX Runtime execution providers, sessions, benchmarks and their reports, system information."""
