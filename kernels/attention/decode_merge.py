"""The merge of a split decode step's pieces (``kernels.attention.decode``): one program per
(request, q head) after the split kernel.

Each piece ``s`` of a request leaves a partial output ``o_s`` normalised by its own softmax sum
and the log-sum-exp ``lse_s`` (base 2) of its scores; the output is::

    m = max_s lse_s,   out = sum_s exp2(lse_s - m) o_s / sum_s exp2(lse_s - m)

Merging inside the split kernel instead (the last piece of each request merges, counted by an
atomic) was measured slower on an H200 at batch 1: the launch of this kernel is hidden by PDL,
and the count's acquire-release and the dependent reads are not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import pdl_trigger, pdl_wait

# Stand-in for -inf in running maxima (here and in the split kernel): exp2(NEG - x) is 0 without
# producing inf - inf = nan.
NEG = tl.constexpr(-1.0e30)


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
