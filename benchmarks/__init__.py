"""Benchmarks of the data path, the trainer, DDP scaling and the GPU path (run by hand:
``deepfake-dist bench NAME`` or ``python -m benchmarks.NAME`` from the repository root; the
figures and how they were measured are in BENCHMARKS.md)."""
