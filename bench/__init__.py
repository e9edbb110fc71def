"""Benchmarks of the hot paths against their baselines (see BENCHMARKS.md; run ``python bench/run.py``)."""
