"""Helpers for tests, examples and benchmarks (random Hugging Face models, benchmark workloads).

Never imported by the engine itself.
"""
