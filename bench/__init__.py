"""Benchmarks: they measure speed and report ratios; tests assert behaviour."""
