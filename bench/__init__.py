"""Benchmarks: figures as ratios against a reference run in the same process."""
