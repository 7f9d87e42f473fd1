"""Triton / CUDA kernels, each with a torch reference."""
