"""The merge of a split decode step's pieces (``kernels.attention.decode``), two ways.

Each piece ``s`` of a request leaves a partial output ``o_s`` normalised by its own softmax sum
and the log-sum-exp ``lse_s`` (base 2) of its scores; the output is::

    m = max_s lse_s,   out = sum_s exp2(lse_s - m) o_s / sum_s exp2(lse_s - m)

- ``_decode_merge_kernel``: a kernel of its own after the split kernel, one program per
  (request, q head).
- ``merge_if_last`` (the default): inside the split kernel. Each program stores its piece, then
  counts itself in on its (request, kv head) with an acquire-release atomic; the program that
  counts last merges that kv head's q heads, summing the pieces in piece order (its own read back
  like the others, so the order does not depend on which program came last), and sets the count
  back to zero. At small batches a step's time is latency, and the merge kernel is one more
  launch and one more wait per layer on that path.

The counts must be zero when a launch starts, and launches sharing them must not overlap: they are
touched only after the split kernel's PDL wait, when the launch before it on the stream has ended.
The attention backend owns one buffer and passes it; ``merge_counts`` keeps one per device for
other callers (one stream at a time). Each launch leaves its counts zeroed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.triton_utils import pdl_trigger, pdl_wait

NEG = tl.constexpr(-1.0e30)  # a finite -inf for maxima (as in kernels.attention.decode)


def fused_merge_enabled() -> bool:
    """Whether split steps merge in the split kernel (``ROLLOUT_FUSED_MERGE``, default on)."""
    return os.environ.get("ROLLOUT_FUSED_MERGE", "1").strip().lower() not in ("0", "false", "off", "no")


_counts: dict[torch.device, torch.Tensor] = {}


def merge_counts(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 count buffer of at least ``n`` entries kept for ``device``.

    Kept and grown outside a graph capture; a capture that needs more than the kept buffer holds
    gets its own, zeroed by the graph itself (a memset node on every replay)."""
    buf = _counts.get(device)
    if buf is None or buf.numel() < n:
        fresh = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return fresh
        buf = _counts[device] = fresh
    return buf


@triton.jit
def merge_if_last(count_ptr, n_split, o_rows, lse_rows, out_rows, stride_os, mask_h, mask_d, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Count this piece in at ``count_ptr``; the last of the ``n_split`` pieces merges the pieces
    at ``o_rows`` (BLOCK_H, BLOCK_D) / ``lse_rows`` (BLOCK_H,) pointers (piece ``s`` at
    ``+ s * stride_os`` / ``+ s``) into ``out_rows`` and zeroes the count."""
    tl.debug_barrier()  # every thread's part of the piece is stored before the count says so
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if done == n_split - 1:
        mask = mask_h[:, None] & mask_d[None, :]
        m = tl.full([BLOCK_H], NEG, tl.float32)
        for s in range(0, n_split):
            m = tl.maximum(m, tl.load(lse_rows + s, mask=mask_h, other=NEG, cache_modifier=".cg"))
        total = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for s in range(0, n_split):
            w = tl.exp2(tl.load(lse_rows + s, mask=mask_h, other=float("-inf"), cache_modifier=".cg") - m)
            o = tl.load(o_rows + s * stride_os, mask=mask, other=0.0, cache_modifier=".cg")
            acc += w[:, None] * o
            total += w
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_rows, out.to(out_rows.dtype.element_ty), mask=mask)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr, mid_lse_ptr, num_splits_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MAX_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    n_split = tl.maximum(tl.load(num_splits_ptr + b), 1)  # a step input: read before the wait
    pdl_wait(PDL)
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


def launch_merge(mid_o: torch.Tensor, mid_lse: torch.Tensor, num_splits: torch.Tensor, out: torch.Tensor,
                 max_splits: int, pdl: dict) -> None:
    """The merge kernel over ``mid_o`` (B, Hq, S, D) / ``mid_lse`` (B, Hq, S) into ``out`` (B, Hq, D)."""
    batch, num_q_heads, head_dim = out.shape
    block_d = triton.next_power_of_2(head_dim)
    _decode_merge_kernel[(batch, num_q_heads)](
        mid_o, mid_lse, num_splits, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, MAX_SPLITS=triton.next_power_of_2(max_splits),
        num_warps=4 if block_d >= 128 else 2, **pdl,
    )
