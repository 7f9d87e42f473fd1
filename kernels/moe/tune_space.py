"""The search space of ``kernels.moe.tune``: tile variants of each grouped GEMM, pruned before any
compilation, and the row tiles worth trying at a given batch size.

A variant is one kernel (gate/up or down) at one ``block_m`` and one ``GemmTiles``; it compiles once
and serves every token count (the row count is not specialised on). Pruned without a compile:

* shared memory of the pipelined loads above what one block may use on sm_90 (227 KiB): one x or
  act tile plus one (down) or two (gate/up) weight tiles per buffer, ``num_stages`` buffers where
  the MMA is wgmma (``block_m`` >= 64) and ``num_stages - 1`` otherwise (what Triton 3 allocates);
* fp32 accumulators above 128 registers a thread, or, below ``block_m`` 64 where ``tl.dot`` takes its
  operands from registers, operand tiles above 128 registers a thread: those spill;
* 8 warps on a tile of fewer than 2048 outputs: the warps would split rows of 16-wide MMAs;
* at ``block_m`` >= 64 (prefill, MMA-bound, wgmma): K steps over 128, fewer than 3 stages, and 4 warps
  on 128 rows. These compile slowest (4 to 8 s) and were never the fastest in trial sweeps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from kernels.moe.config import GemmTiles, MoeKernelConfig, default_config

GATE_UP, DOWN = "gate_up", "down"
BLOCK_MS = (16, 32, 64, 128)
BLOCK_NS = (32, 64, 128, 256)
BLOCK_KS = (64, 128, 256)
WARPS = (4, 8)
STAGES = (2, 3, 4, 5)
SHARED_LIMIT = 227 * 1024  # opt-in shared memory per block on sm_90
REGISTER_LIMIT = 128  # 32-bit registers a thread for accumulators, and for register operands


@dataclass(frozen=True, slots=True)
class Variant:
    """One compiled kernel: which GEMM, its row tile and its own tiles."""

    kernel: str  # GATE_UP or DOWN
    block_m: int
    tiles: GemmTiles

    def label(self) -> str:
        t = self.tiles
        return f"{self.kernel} m{self.block_m} n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages}"


def shared_bytes(kernel: str, block_m: int, tiles: GemmTiles, elt: int = 2) -> int:
    """Estimated shared memory of one block's pipelined loads (see the module docstring)."""
    weight_tiles = 2 if kernel == GATE_UP else 1
    per_buffer = (block_m + weight_tiles * tiles.block_n) * tiles.block_k * elt
    buffers = tiles.num_stages if block_m >= 64 else max(1, tiles.num_stages - 1)
    return per_buffer * buffers


def fits(kernel: str, block_m: int, tiles: GemmTiles, elt: int = 2) -> bool:
    """Whether the variant passes the pruning rules of the module docstring."""
    threads = 32 * tiles.num_warps
    accumulators = 2 if kernel == GATE_UP else 1
    if accumulators * block_m * tiles.block_n / threads > REGISTER_LIMIT:
        return False
    if block_m < 64:
        operands = (block_m + accumulators * tiles.block_n) * tiles.block_k * elt / 4 / threads
        if operands > REGISTER_LIMIT:
            return False
    if tiles.num_warps > 4 and block_m * tiles.block_n < 2048:
        return False
    if block_m >= 64 and (tiles.block_k > 128 or tiles.num_stages < 3 or (block_m >= 128 and tiles.num_warps < 8)):
        return False  # MMA-bound: wgmma wants 8 warps on 128 rows and a pipeline of short K steps
    return shared_bytes(kernel, block_m, tiles, elt) <= SHARED_LIMIT


def variants(kernel: str, block_m: int, n_dim: int, k_dim: int, elt: int = 2) -> list[Variant]:
    """Every unpruned variant of ``kernel`` at ``block_m``; ``n_dim``/``k_dim`` are its output and
    reduction widths (tiles much wider than them only add masked work)."""
    out = []
    for bn, bk, warps, stages in itertools.product(BLOCK_NS, BLOCK_KS, WARPS, STAGES):
        if bn > max(32, 2 * n_dim) or bk > max(64, 2 * k_dim):
            continue
        tiles = GemmTiles(bn, bk, warps, stages)
        if fits(kernel, block_m, tiles, elt):
            out.append(Variant(kernel, block_m, tiles))
    return out


def block_ms_for(num_rows: int, num_experts: int) -> list[int]:
    """Row tiles worth timing for ``num_rows`` rows: within 1/8 to 2x the mean rows per expert
    (16 always allowed), plus the default's."""
    per_expert = num_rows / max(1, num_experts)
    keep = {bm for bm in BLOCK_MS if bm == 16 or per_expert / 8 <= bm <= 2 * per_expert}
    if per_expert > 2 * 16:  # many rows per expert: 16-row blocks only multiply the weight reads
        keep.discard(16)
    keep.add(default_config(num_rows, num_experts).block_m)
    return sorted(keep)


def default_variants(num_rows: int, num_experts: int) -> tuple[Variant, Variant]:
    """The (gate/up, down) variants ``default_config`` picks, to be compiled and timed with the rest."""
    cfg = default_config(num_rows, num_experts)
    return Variant(GATE_UP, cfg.block_m, cfg.gate_up), Variant(DOWN, cfg.block_m, cfg.down)


def config_of(gate_up: Variant, down: Variant) -> MoeKernelConfig:
    """The config that runs these two variants (they share the row tile)."""
    assert gate_up.block_m == down.block_m
    return MoeKernelConfig(gate_up.block_m, gate_up.tiles, down.tiles)
