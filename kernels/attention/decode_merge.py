"""The merge of a split decode step's pieces (``kernels.attention.decode``) after the split kernel:
one program per (request with more than one piece, q head).

Each piece ``s`` of a request leaves a partial output ``o_s`` normalised by its own softmax sum
and the log-sum-exp ``lse_s`` (base 2) of its scores; the output is::

    m = max_s lse_s,   out = sum_s exp2(lse_s - m) o_s / sum_s exp2(lse_s - m)

taken over the pieces in chunks of ``BLOCK_S``, the sums rescaled when a chunk raises ``m`` (a
request in one chunk gets the one-pass result bit for bit). A request in one piece had its output
written by the split kernel and has no program here.

Merging inside the split kernel instead (the last piece of each request merges, counted by an
atomic) was measured slower on an H200 at batch 1: the launch of this kernel is hidden by PDL,
and the count's acquire-release and the dependent reads are not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.decode_plan import DecodePieces
from kernels.triton_utils import pdl_trigger, pdl_wait

# Stand-in for -inf in running maxima (here and in the split kernel): exp2(NEG - x) is 0 without
# producing inf - inf = nan.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr, mid_lse_ptr, counts_ptr, first_ptr, owner_ptr, out_ptr, batch,
    stride_og, stride_oh, stride_lg, stride_lh, stride_outb, stride_outh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    # One program per (piece past the B first ones, q head); the one holding its request's second
    # piece merges that request (DecodePieces: its pieces are b, then B + first[b] onwards).
    pdl_trigger(PDL)
    extra = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.load(owner_ptr + extra)  # step inputs: read before the wait
    real = b < batch
    first = tl.load(first_ptr + b, mask=real, other=-1)
    n_split = tl.load(counts_ptr + b, mask=real, other=1)
    merges = real & (first == extra)
    # Program (0, 0) waits even with nothing to merge, so this kernel never ends before the split
    # kernel: a later kernel's wait then covers the outputs the split kernel wrote. The others
    # with nothing to merge leave at once.
    if merges | ((extra == 0) & (head == 0)):
        pdl_wait(PDL)
        if merges:
            offs_s = tl.arange(0, BLOCK_S)
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HEAD_DIM
            m = tl.full([1], NEG, tl.float32)
            total = tl.zeros([1], tl.float32)
            acc = tl.zeros([BLOCK_D], tl.float32)
            for start in range(0, n_split, BLOCK_S):
                s = start + offs_s
                mask_s = s < n_split
                piece = tl.where(s == 0, b, batch + first + s - 1)
                lse = tl.load(mid_lse_ptr + piece * stride_lg + head * stride_lh, mask=mask_s, other=float("-inf"))
                m_new = tl.maximum(m, tl.max(lse, 0))  # finite even when every piece is empty
                rescale = tl.exp2(m - m_new)
                w = tl.exp2(lse - m_new)  # (BLOCK_S,)
                o = tl.load(mid_o_ptr + piece[:, None] * stride_og + head * stride_oh + offs_d[None, :],
                            mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
                acc = acc * rescale + tl.sum(w[:, None] * o, 0)
                total = total * rescale + tl.sum(w, 0)
                m = m_new
            out = acc / tl.where(total > 0, total, 1.0)
            tl.store(out_ptr + b * stride_outb + head * stride_outh + offs_d, out.to(out_ptr.dtype.element_ty),
                     mask=mask_d)


def launch_merge(mid_o: torch.Tensor, mid_lse: torch.Tensor, pieces: DecodePieces, out: torch.Tensor,
                 pdl: dict) -> None:
    """The merge kernel over ``mid_o`` (G, Hq, D) / ``mid_lse`` (G, Hq) into ``out`` (B, Hq, D)."""
    batch, num_q_heads, head_dim = out.shape
    block_d = triton.next_power_of_2(head_dim)
    # Chunks as deep as the most pieces a request can take (a grid of G holds at most G - B + 1),
    # at most 16.
    block_s = min(16, triton.next_power_of_2(max(2, pieces.grid - batch + 1)))
    _decode_merge_kernel[(pieces.owner.numel(), num_q_heads)](
        mid_o, mid_lse, pieces.counts, pieces.first, pieces.owner, out, batch,
        mid_o.stride(0), mid_o.stride(1), mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4 if block_d >= 128 else 2, **pdl,
    )
