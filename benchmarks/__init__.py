"""Benchmarks: `python -m benchmarks.step` (train step vs the PyTorch peer), `benchmarks.matmul`."""
