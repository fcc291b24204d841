"""Benchmark programs: python -m tlt_jax.bench.<name> [--json PATH]. Every speed claim is a ratio measured
side by side in one run."""
