"""Token -> expert alignment in three small Triton kernels (the torch version in ``align.py`` is its
reference): count the rows of every expert, scan the padded counts into each expert's start (and
write every block's expert), then place each row at its expert's next free position.

Rows of one expert land in an order set by atomics, not by row number. That changes nothing in the
result: each output row of the grouped GEMMs depends only on its own input row, and the per-token
sum over its k rows reads them by row number. Buffers have the same fixed sizes as ``align.py``'s
and nothing waits for the device, so the MoE stays capturable in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.moe.align import ExpertAlignment

_BLOCK_ROWS = 1024  # rows per program of the count and place kernels
_BLOCKS_PER_ITER = 128  # GEMM blocks whose expert the scan kernel finds per iteration


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_rows, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_rows
    e = tl.load(ids_ptr + offs, mask=mask, other=0)
    tl.atomic_add(counts_ptr + e, 1, mask=mask)


@triton.jit
def _scan_kernel(counts_ptr, cursor_ptr, block_experts_ptr, num_experts, num_blocks,
                 BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCKS: tl.constexpr):
    e = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(cursor_ptr + e, ends - padded, mask=e < num_experts)  # each expert's first position
    ends = tl.where(e < num_experts, ends, 2147483647)  # padding experts never end before a block
    for b0 in range(0, num_blocks, BLOCKS):
        b = b0 + tl.arange(0, BLOCKS)
        start = b * BLOCK_M
        expert = tl.sum((ends[None, :] <= start[:, None]).to(tl.int32), axis=1)  # experts ending before it
        expert = tl.where(expert < num_experts, expert, -1)
        tl.store(block_experts_ptr + b, expert, mask=b < num_blocks)


@triton.jit
def _place_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, num_rows, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_rows
    e = tl.load(ids_ptr + offs, mask=mask, other=0)
    pos = tl.atomic_add(cursor_ptr + e, 1, mask=mask)
    tl.store(sorted_ids_ptr + pos, offs, mask=mask)


def align_tokens_to_experts_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """``align.align_tokens_to_experts`` with Triton kernels (same buffers, same sizes)."""
    flat = topk_ids.reshape(-1).to(torch.int32)
    n = flat.numel()
    device = flat.device
    capacity = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    num_blocks = capacity // block_m
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_ids = torch.full((capacity,), n, dtype=torch.int32, device=device)
    block_experts = torch.empty(num_blocks, dtype=torch.int32, device=device)
    grid = (triton.cdiv(n, _BLOCK_ROWS),)
    _count_kernel[grid](flat, counts, n, BLOCK=_BLOCK_ROWS)
    _scan_kernel[(1,)](counts, cursor, block_experts, num_experts, num_blocks, BLOCK_M=block_m,
                       E_PAD=triton.next_power_of_2(num_experts), BLOCKS=_BLOCKS_PER_ITER)
    _place_kernel[grid](flat, cursor, sorted_ids, n, BLOCK=_BLOCK_ROWS)
    return ExpertAlignment(sorted_ids, block_experts, block_m, n)
