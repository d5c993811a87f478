"""Benchmarks: each workload measures its baselines and prefix-serve in the same run and prints the ratios."""
