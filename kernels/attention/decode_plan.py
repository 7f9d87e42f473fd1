"""How a decode step is cut into pieces for the split kernel (``kernels.attention.decode``): the
grid depth, each request's piece count, the partial-result workspace, and KV runs from an indptr."""

from __future__ import annotations

import math

import torch
import triton


def choose_max_splits(batch_size: int, num_kv_heads: int, sm_count: int, cap: int) -> int:
    """Grid depth ``S`` (a power of two <= ``cap``): enough (request, kv head, split) programs for
    one per SM, no more. Splitting only pays where the (request, kv head) pairs alone leave SMs
    idle: at 600-token contexts on an H100 (132 SMs, 8 kv heads) one piece per request was faster
    than 2-8 from batch 16 up (batch 32: 42 vs 53 us), and a single piece also skips the merge."""
    want = max(1, math.ceil(sm_count / max(1, batch_size * num_kv_heads)))
    return min(triton.next_power_of_2(want), triton.next_power_of_2(cap))


def plan_kv_splits(
    seq_lens: torch.Tensor,  # (B,) int
    max_splits: int,
    min_split_tokens: int,
    out: torch.Tensor | None = None,  # (B,) int32, written in place when given
) -> torch.Tensor:  # (B,) int32
    """Pieces per request: one per ``min_split_tokens`` of KV, between 1 and ``max_splits``.

    Pure device arithmetic (no host sync), so it can run inside a captured CUDA graph."""
    n = torch.clamp((seq_lens.to(torch.int32) + min_split_tokens - 1) // min_split_tokens, 1, max_splits)
    if out is None:
        return n.to(torch.int32)
    out.copy_(n)
    return out


def decode_workspace(
    batch_size: int, num_q_heads: int, max_splits: int, head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh partial-result buffers ``(mid_o (B, Hq, S, D) fp32, mid_lse (B, Hq, S) fp32)``."""
    mid_o = torch.empty(batch_size, num_q_heads, max_splits, head_dim, dtype=torch.float32, device=device)
    mid_lse = torch.empty(batch_size, num_q_heads, max_splits, dtype=torch.float32, device=device)
    return mid_o, mid_lse


def runs_from_indptr(kv_indptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_starts, kv_lens)`` (B,) of a flat index array laid out by ``kv_indptr`` (B+1,)."""
    return kv_indptr[:-1], kv_indptr[1:] - kv_indptr[:-1]
