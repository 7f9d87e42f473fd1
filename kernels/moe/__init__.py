"""Triton fused MoE: expert alignment and the grouped gate/up + down GEMMs."""

from kernels.moe.align import ExpertAlignment, align_tokens_to_experts
from kernels.moe.fused_moe import MoeKernelConfig, default_config, fused_experts_triton

__all__ = ["ExpertAlignment", "MoeKernelConfig", "align_tokens_to_experts", "default_config", "fused_experts_triton"]
