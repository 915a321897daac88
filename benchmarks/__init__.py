"""Benchmarks: measured ratios, never asserted. Run ``python -m benchmarks``."""
