"""Token -> expert alignment for the grouped GEMM: rows sorted by expert, each expert padded to blocks.

Every (token, k) pair is one row, numbered ``token * top_k + k``. Rows are grouped by expert and
each expert's group is padded to a multiple of ``block_m`` with the sentinel ``num_rows``, so one
GEMM program (one block of ``block_m`` rows) always serves a single expert::

    topk_ids        [[2, 0], [2, 1], [0, 2]]      rows 0..5, experts 2 0 2 1 0 2
    sorted_ids      | 1 4 _ _ | 3 _ _ _ | 0 2 5 _ | _ ...      block_m = 4, _ = 6 (padding)
    block_experts   |   0     |   1     |   2     | -1 ...

The buffers have a fixed, data-independent size (the worst case ``rows + min(E, rows) * (block_m - 1)``
rounded up to blocks) and are built with sync-free torch ops, so the whole MoE can be captured in
a CUDA graph; the kernels skip blocks whose expert is -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True, slots=True)
class ExpertAlignment:
    """Rows grouped by expert in ``block_m`` blocks (see the module docstring)."""

    sorted_ids: torch.Tensor  # (P,) int32 row ids; num_rows marks padding
    block_experts: torch.Tensor  # (P // block_m,) int32 expert of each block; -1 for unused blocks
    block_m: int
    num_rows: int  # T * top_k


def align_tokens_to_experts(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Group the rows of ``topk_ids`` (T, k) by expert, padding every expert to ``block_m`` rows."""
    flat = topk_ids.reshape(-1).to(torch.int64)  # (N,)
    n = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )  # (E,)
    padded = (counts + block_m - 1) // block_m * block_m  # (E,)
    padded_end = torch.cumsum(padded, 0)  # (E,)
    order = torch.argsort(flat, stable=True)  # (N,) rows, expert-major
    experts_sorted = flat[order]
    # Rank of each sorted row inside its expert = its index minus the expert's unpadded start.
    unpadded_start = torch.cumsum(counts, 0) - counts
    dest = (padded_end - padded)[experts_sorted] + torch.arange(n, device=device) - unpadded_start[experts_sorted]
    capacity = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((capacity,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, capacity, block_m, device=device)  # (P // block_m,)
    block_experts = torch.searchsorted(padded_end, block_start, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return ExpertAlignment(sorted_ids, block_experts, block_m, n)
