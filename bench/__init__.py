"""Benchmarks: one command each; see bench/README.md."""
