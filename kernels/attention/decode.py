"""Paged decode attention (one query token per request), split over the KV length.

Flash-decoding in two kernels. The first gives each (request, kv head, split) a contiguous piece
of the request's KV run and computes, for all ``G = Hq / Hkv`` query heads of that kv head at once
(so each K/V tile is loaded once for the whole group), a partial output normalised by its own
softmax sum plus the log-sum-exp of the piece. The second merges the pieces of each (request,
q head) (with ``max_splits == 1``, large batches, the first kernel writes the output itself)::

    kv run of request b   | split 0 | split 1 | ... | split n_b-1 |     n_b = num_splits[b] <= S
    partial               (o_0, lse_0) (o_1, lse_1)  ...
    out                   sum_s exp2(lse_s - m) o_s / sum_s exp2(lse_s - m),   m = max_s lse_s

``S`` (``max_splits``) fixes the grid; ``num_splits`` is a device tensor, so the split count of
each request follows its length without a host sync, which keeps the launch CUDA-graph safe.

Request ``b``'s KV slots are ``kv_indices[kv_starts[b] : kv_starts[b] + kv_lens[b]]``. With a flat
per-step index array that is ``kv_starts = kv_indptr[:-1]`` (``runs_from_indptr``); the engine
instead passes its request table flattened, ``kv_starts[b] = row_b * max_context`` and ``kv_lens =
seq_lens``, so a decode step needs no per-step index array at all.
Scores are kept in base 2 (``scale * log2(e)`` folded in) so the softmax uses ``exp2``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_utils import dot_precision, mma, pdl_launch, pdl_trigger, pdl_wait, upcast_dot

LOG2E = 1.4426950408889634
# Stand-in for -inf in running maxima: exp2(NEG - x) is 0 without producing inf - inf = nan.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, kv_indices_ptr, kv_starts_ptr, kv_lens_ptr, num_splits_ptr, mid_o_ptr, mid_lse_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, DIRECT: tl.constexpr,
    PDL: tl.constexpr,
):
    # DIRECT: one split per request (large batches): mid_o is the output itself, no lse, no merge.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n_split = tl.load(num_splits_ptr + b)
    if split >= n_split:
        return
    kv_start = tl.load(kv_starts_ptr + b).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    split_len = tl.cdiv(kv_len, n_split)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_h  # (BLOCK_H,) q heads of this kv head; rows >= GROUP are padding
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :], other=0.0,
    )  # (BLOCK_H, BLOCK_D)

    m_i = tl.full([BLOCK_H], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        mask_n = pos < hi
        slots = tl.load(kv_indices_ptr + kv_start + pos, mask=mask_n, other=0).to(tl.int64)  # (BLOCK_N,)
        k = tl.load(
            k_ptr + slots[None, :] * stride_kn + kv_head * stride_kh + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None], other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        s = mma(q, k, tl.zeros([BLOCK_H, BLOCK_N], tl.float32), PRECISION, UPCAST) * scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))  # (BLOCK_H, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + slots[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    # An empty piece (kv_len not divisible into n_split nonempty ones, or kv_len 0) has l_i = 0:
    # it gets lse = -inf and weight 0 in the merge.
    nonempty = l_i > 0
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_base = mid_o_ptr + b * stride_ob + split * stride_os
    tl.store(o_base + heads[:, None] * stride_oh + offs_d[None, :], out.to(mid_o_ptr.dtype.element_ty),
             mask=mask_h[:, None] & mask_d[None, :])
    if not DIRECT:
        tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr, mid_lse_ptr, num_splits_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MAX_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    n_split = tl.load(num_splits_ptr + b)
    offs_s = tl.arange(0, MAX_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < n_split
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(mid_lse_ptr + b * stride_lb + head * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.maximum(tl.max(lse, 0), NEG)  # finite even when every piece is empty
    w = tl.exp2(lse - m)  # (MAX_SPLITS,)
    o = tl.load(
        mid_o_ptr + b * stride_ob + head * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :], other=0.0,
    )  # (MAX_SPLITS, BLOCK_D)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_outb + head * stride_outh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def default_tiles(dtype: torch.dtype) -> tuple[int, int, int]:
    """``(block_n, num_warps, num_stages)`` of the split kernel: KV tiles of 64 for 16-bit inputs,
    three loads in flight (2.68 vs 2.29 TB/s with two, H100, batch 256 x 640 tokens: the kernel
    waits on memory latency, not bandwidth, with fewer); the exact fp32 FMA path needs more
    registers per tile, so it takes tiles of 32 over 8 warps, two stages (no spills)."""
    return (32, 8, 2) if dtype == torch.float32 else (64, 4, 3)


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


def decode_attention(
    q: torch.Tensor,  # (B, Hq, D)
    k_buf: torch.Tensor,  # (num_slots, Hkv, D)
    v_buf: torch.Tensor,  # (num_slots, Hkv, D)
    kv_indices: torch.Tensor,  # (N,) int slots; request b's run starts at kv_starts[b]
    kv_starts: torch.Tensor,  # (B,) int offsets into kv_indices
    kv_lens: torch.Tensor,  # (B,) int KV length of each request
    scale: float,
    num_splits: torch.Tensor,  # (B,) int32, each in [1, max_splits]
    max_splits: int,
    *,
    out: torch.Tensor | None = None,  # (B, Hq, D)
    mid_o: torch.Tensor | None = None,  # (B, Hq, >= max_splits, D) fp32
    mid_lse: torch.Tensor | None = None,  # (B, Hq, >= max_splits) fp32
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:  # (B, Hq, D)
    """Attention of each request's single query over its whole KV run in the paged pool.

    Tile options left ``None`` take ``default_tiles``."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    assert num_q_heads % num_kv_heads == 0, "q heads must be a multiple of kv heads"
    assert k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1, "pool rows must be contiguous"
    if q.dtype != k_buf.dtype or q.stride(-1) != 1:
        q = q.to(k_buf.dtype).contiguous()
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if mid_o is None or mid_lse is None:
        mid_o, mid_lse = decode_workspace(batch, num_q_heads, max_splits, head_dim, q.device)
    if batch == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    dn, dw, ds = default_tiles(q.dtype)
    block_n, num_warps, num_stages = block_n or dn, num_warps or dw, num_stages or ds
    direct = max_splits == 1  # each request in one piece: normalise and write the output at once
    dest = out if direct else mid_o
    _decode_split_kernel[(batch, num_kv_heads, max_splits)](
        q, k_buf, v_buf, kv_indices, kv_starts, kv_lens, num_splits, dest, mid_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        dest.stride(0), dest.stride(1), 0 if direct else mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q), DIRECT=direct,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(q, attention=True),
    )
    if direct:
        return out
    _decode_merge_kernel[(batch, num_q_heads)](
        mid_o, mid_lse, num_splits, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, MAX_SPLITS=triton.next_power_of_2(max_splits),
        num_warps=4 if block_d >= 128 else 2, **pdl_launch(q, attention=True),
    )
    return out
