"""Triton fused MoE: router top-k, expert alignment and the grouped gate/up + down GEMMs."""

from kernels.moe.align import ExpertAlignment, align_tokens_to_experts
from kernels.moe.config import GemmTiles, MoeKernelConfig, default_config
from kernels.moe.fused_moe import fused_experts_triton

__all__ = ["ExpertAlignment", "GemmTiles", "MoeKernelConfig", "align_tokens_to_experts", "default_config",
           "fused_experts_triton"]
