"""Benchmarks: ``python -m benchmarks.run`` (see `benchmarks.run` and BENCHMARKS.md)."""
