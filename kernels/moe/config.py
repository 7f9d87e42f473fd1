"""Tile choices of the two grouped GEMMs of the fused MoE.

Both kernels read the same expert alignment, so they share the row tile ``block_m`` (the alignment
pads every expert to it); each has its own column tile, reduction tile, warps and pipeline stages,
since the gate/up kernel (K = hidden, two accumulators) and the down kernel (K = intermediate, one
accumulator) favour different shapes. ``default_config`` is the untuned choice; tuned choices per
shape and device come from ``kernels.moe.tuned_configs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GemmTiles:
    """Column tile, reduction tile and launch options of one grouped GEMM."""

    block_n: int = 64  # output columns per program
    block_k: int = 64  # reduction step
    num_warps: int = 4
    num_stages: int = 3  # software-pipeline depth of the loads

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(block_n, block_k, num_warps, num_stages)``."""
        return self.block_n, self.block_k, self.num_warps, self.num_stages


@dataclass(frozen=True, slots=True)
class MoeKernelConfig:
    """Row tile shared by both GEMMs (and the alignment) plus each GEMM's own tiles."""

    block_m: int = 64
    gate_up: GemmTiles = field(default_factory=GemmTiles)
    down: GemmTiles = field(default_factory=GemmTiles)

    @classmethod
    def uniform(cls, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> MoeKernelConfig:
        """The same tiles for both GEMMs."""
        tiles = GemmTiles(block_n, block_k, num_warps, num_stages)
        return cls(block_m, tiles, tiles)


def default_config(num_rows: int, num_experts: int) -> MoeKernelConfig:
    """Tiles by the mean rows per expert: decode batches give each expert a handful of rows, so a
    short ``block_m`` avoids wasted MMA rows and the kernel streams weights; prefill is MMA-bound."""
    per_expert = num_rows / max(1, num_experts)
    if per_expert <= 16:
        return MoeKernelConfig.uniform(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return MoeKernelConfig.uniform(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return MoeKernelConfig.uniform(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)
