"""Fused element-wise kernels of the decoder layer: each replaces a chain of small torch ops.

A decode step of a small model is dominated by kernel count, not bytes: an unfused RMSNorm is
about nine kernels, rotary embedding with Qwen3's per-head q/k norm about twenty-five. Each kernel
here rounds to the model dtype where the torch (and Hugging Face) formulation does; RMSNorm and
SiLU-and-mul match it up to summation order, rotary to one unit in the last place in some
elements. ``reference.py`` holds those formulations for the tests.
"""

from kernels.fused.activation import silu_and_mul
from kernels.fused.norm import rmsnorm
from kernels.fused.rope import qk_norm_rope_

__all__ = ["qk_norm_rope_", "rmsnorm", "silu_and_mul"]
