"""Benchmarks: run with `bash scripts/bench` (they print figures, they assert nothing)."""
