"""A decode step's cut of the requests' KV runs into pieces (``DecodePieces``), in one kernel.

The torch functions of ``kernels.attention.decode_plan`` (``balanced_splits`` or
``plan_kv_splits``, then ``cut_pieces``) are the reference; they take about sixteen small
launches per step, which this kernel replaces with one program: the piece counts, their prefix
sums and, for each piece past the requests' first ones, its request (a count of the prefix sums
at or below the piece's index). That count compares every request with every such piece:
``B * (grid - B)`` comparisons, none for the uniform cut at large batches (one piece each) and
about 33,000 for the balanced cut at batch 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.decode_plan import DecodePieces


@triton.jit
def _cut_kernel(
    lens_ptr, counts_ptr, first_ptr, owner_ptr, batch, grid, num_owner, min_tokens, max_splits,
    BALANCED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr,
):
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < batch
    lens = tl.load(lens_ptr + offs_b, mask=mask_b, other=0).to(tl.int64)
    cap = (lens + min_tokens - 1) // min_tokens  # pieces of at least min_tokens
    if BALANCED:  # balanced_splits
        spare = tl.maximum(grid - batch, 0).to(tl.int64)
        total = tl.maximum(tl.sum(lens, 0), 1)
        n = tl.maximum(tl.minimum(lens * spare // total + 1, cap), 1)
    else:  # plan_kv_splits
        n = tl.minimum(tl.maximum(cap, 1), max_splits)
    n = n.to(tl.int32)
    tl.store(counts_ptr + offs_b, n, mask=mask_b)
    more = tl.where(mask_b, n - 1, 0)
    ends = tl.cumsum(more, 0)
    tl.store(first_ptr + offs_b, ends - more, mask=mask_b)
    ends = tl.where(mask_b, ends, 1 << 30)  # rows past the batch never count
    for o0 in range(0, num_owner, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        owner = tl.sum((ends[None, :] <= offs_o[:, None]).to(tl.int32), 1)
        tl.store(owner_ptr + offs_o, owner, mask=offs_o < num_owner)


def cut_step(seq_lens: torch.Tensor, min_split_tokens: int, out: DecodePieces, *, balanced: bool) -> DecodePieces:
    """Write the cut of a decode step into ``out`` (its buffers sized for ``seq_lens`` (B,) and
    ``out.grid`` pieces): ``balanced_splits(seq_lens, out.grid, min_split_tokens)`` counts if
    ``balanced``, else ``plan_kv_splits(seq_lens, out.depth, min_split_tokens)`` (the grid then
    ``B * out.depth``); then ``cut_pieces``. One launch, device work only (graph safe)."""
    batch, grid = seq_lens.numel(), out.grid
    assert out.counts.numel() == batch and out.owner.numel() == max(grid - batch, 1)
    block_b = max(16, triton.next_power_of_2(batch))
    block_o = max(1, min(triton.next_power_of_2(out.owner.numel()), 8192 // block_b))
    _cut_kernel[(1,)](
        seq_lens, out.counts, out.first, out.owner, batch, grid, out.owner.numel(), min_split_tokens, out.depth,
        BALANCED=balanced, BLOCK_B=block_b, BLOCK_O=block_o, num_warps=4,
    )
    return out
