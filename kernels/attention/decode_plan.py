"""How a decode step is cut into pieces for the split kernel (``kernels.attention.decode``): the
grid depth, each request's piece count, the partial-result workspace, and KV runs from an indptr."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton


def choose_max_splits(batch_size: int, num_kv_heads: int, sm_count: int, cap: int) -> int:
    """Grid depth ``S`` (a power of two <= ``cap``): enough (request, kv head, split) programs for
    one per SM, and two pieces while the (request, kv head) pairs alone are fewer than 1.5 per SM.

    One piece per request also skips the merge. On an H200 (132 SMs, 8 kv heads, 16-bit KV, the
    kernels replayed per layer from a graph, ``python -m kernels.bench_decode_graph``), two
    pieces at batch 17-24 took 0.69x the time of one (with ``decode_tiles``); from batch 32 one
    piece of 128-token tiles was faster than two."""
    pairs = max(1, batch_size * num_kv_heads)
    want = max(math.ceil(sm_count / pairs), 2 if 2 * pairs <= 3 * sm_count else 1)
    return min(triton.next_power_of_2(want), triton.next_power_of_2(cap))


def decode_grid(batch_size: int, num_kv_heads: int, sm_count: int, cap: int, spare: float) -> int:
    """Pieces in a decode step's grid (``DecodePieces.grid``): ``choose_max_splits`` deep, and at
    least ``spare * batch_size`` beyond one per request, which ``balanced_splits`` hands to the
    longest requests. A grid of exactly ``batch_size`` takes one piece per request and no merge."""
    deep = batch_size * choose_max_splits(batch_size, num_kv_heads, sm_count, cap)
    return max(deep, batch_size + math.ceil(spare * batch_size))


def default_tiles(dtype: torch.dtype) -> tuple[int, int, int]:
    """``(block_n, num_warps, num_stages)`` of the split kernel: KV tiles of 64 for 16-bit inputs,
    three loads in flight (2.68 vs 2.29 TB/s with two, H100, batch 256 x 640 tokens: the kernel
    waits on memory latency, not bandwidth, with fewer); the exact fp32 FMA path needs more
    registers per tile, so it takes tiles of 32 over 8 warps, two stages (no spills)."""
    return (32, 8, 2) if dtype == torch.float32 else (64, 4, 3)


def decode_tiles(dtype: torch.dtype, head_dim: int, batch_size: int, num_kv_heads: int, sm_count: int,
                 max_splits: int, grid: int | None = None) -> tuple[int, int, int]:
    """``(block_n, num_warps, num_stages)`` of the split kernel for a step of ``batch_size``
    requests cut ``max_splits`` deep over ``grid`` pieces (default ``batch_size * max_splits``;
    the balanced cut's grid can hold more): what the step's program count fits best.

    Measured for 16-bit KV with head_dim 128 on an H200 (``python -m kernels.bench_decode_graph``,
    contexts of 300, 1,000 and 3,000 tokens; time relative to ``default_tiles``, mean over them):
    - two pieces while the pairs fill at most one program per SM (batch 9-16 at 8 kv heads): a
      five-deep pipeline, 0.84-0.93x at 1,000-3,000 tokens (1.04-1.08x at 300);
    - two pieces with more pairs (batch 17-24): tiles of 32, five deep, 0.69x with the split;
    - one piece, up to two pairs per SM (batch 25-33): tiles of 128, 0.80x.
    Elsewhere ``default_tiles``: at batch 1-8 and 34-96 no choice was better across the contexts;
    from batch 128 two warps took 0.98x, but spill registers under some Triton releases."""
    if dtype == torch.float32 or head_dim != 128:
        return default_tiles(dtype)
    pairs = batch_size * num_kv_heads
    if max_splits == 2:
        return (64, 4, 5) if pairs <= sm_count else (32, 4, 5)
    # Tiles of 128 were measured on grids of one piece per request. A balanced cut's spare pieces
    # make the grid 1.5x larger, and there its kernel with them ran 15% slower than the uniform
    # cut's (batch 32 x 2,000 tokens): the tiles follow the program count, not the depth.
    programs = (grid if grid is not None else batch_size * max_splits) * num_kv_heads
    if max_splits == 1 and programs <= 2 * sm_count:
        return (128, 4, 3)
    return default_tiles(dtype)


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


def balanced_splits(
    seq_lens: torch.Tensor,  # (B,) int
    grid: int,
    min_split_tokens: int,
    out: torch.Tensor | None = None,  # (B,) int32, written in place when given
) -> torch.Tensor:  # (B,) int32
    """Pieces per request over ``grid`` pieces in all: each request's share of the ``grid - B``
    pieces beyond one each follows its share of the step's KV, so pieces are about equally long
    (at most ``sum(seq_lens) / (grid - B)`` tokens) and a long request no longer holds up the end
    of the kernel; no piece shorter than ``min_split_tokens``.

    ``n_b = min(floor(len_b * (grid - B) / sum(len)) + 1, ceil(len_b / min_split_tokens))``, at
    least 1, so the counts sum to at most ``grid``. Device arithmetic only (graph safe)."""
    lens = seq_lens.to(torch.int64)
    spare = max(grid - lens.numel(), 0)
    total = lens.sum().clamp_min(1)
    n = torch.minimum(lens * spare // total + 1, (lens + min_split_tokens - 1) // min_split_tokens).clamp_min(1)
    if out is None:
        return n.to(torch.int32)
    out.copy_(n)
    return out


class DecodePieces(NamedTuple):
    """A decode step's KV runs cut into pieces, one split-kernel program per (kv head, piece).

    Piece ``b < B`` is request ``b``'s first (so a request in one piece needs no lookup); the
    other pieces follow request by request: request ``b``'s piece ``s >= 1`` is ``B + first[b] +
    s - 1``, and ``owner[i]`` is the request of piece ``B + i`` (the batch size for the slots of a
    grid of ``grid`` past the last piece; those programs exit). ``depth`` is the grid depth the
    cut was planned for (``choose_max_splits``): the kernel's tiles follow it (``decode_tiles``),
    and with PDL pieces load their first KV tile early when it is above one."""

    counts: torch.Tensor  # (B,) int32 pieces per request
    first: torch.Tensor  # (B,) int32 where its pieces after the first start, past the B first ones
    owner: torch.Tensor  # (max(grid - B, 1),) int32
    grid: int
    depth: int


def _depth(batch_size: int, grid: int, depth: int | None) -> int:
    """``depth``, or the uniform cut's (``grid = B * depth``)."""
    return depth if depth is not None else max(1, grid // max(batch_size, 1))


def piece_buffers(batch_size: int, grid: int, device: torch.device | str, depth: int | None = None) -> DecodePieces:
    """Unfilled ``DecodePieces`` buffers of a step of ``batch_size`` requests over ``grid`` pieces
    (for ``cut_step`` to write); ``depth`` defaults to the uniform cut's, ``grid // batch_size``."""
    def ints(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int32, device=device)

    return DecodePieces(ints(batch_size), ints(batch_size), ints(max(grid - batch_size, 1)), grid,
                        _depth(batch_size, grid, depth))


def cut_pieces(counts: torch.Tensor, grid: int, out: DecodePieces | None = None,
               depth: int | None = None) -> DecodePieces:
    """``DecodePieces`` of ``counts`` (B,) pieces per request (at least one each, summing to at most
    ``grid``) over a grid of ``grid`` pieces; ``out``: buffers written in place (graph safe:
    device math only). ``depth``: as in ``piece_buffers`` (``out`` keeps its own)."""
    counts = counts.to(torch.int32)
    more = counts - 1
    ends = torch.cumsum(more, 0, dtype=torch.int32)
    ids = torch.arange(max(grid - counts.numel(), 1), dtype=torch.int32, device=counts.device)
    if out is None:
        owner = torch.searchsorted(ends, ids, right=True, out_int32=True)
        return DecodePieces(counts, ends - more, owner, grid, _depth(counts.numel(), grid, depth))
    assert out.grid == grid and out.owner.numel() == ids.numel()
    if out.counts.data_ptr() != counts.data_ptr():
        out.counts.copy_(counts)
    torch.sub(ends, more, out=out.first)
    torch.searchsorted(ends, ids, right=True, out_int32=True, out=out.owner)
    return out


def uniform_pieces(num_splits: torch.Tensor, max_splits: int) -> DecodePieces:
    """The uniform cut: request ``b`` in ``num_splits[b]`` pieces (clamped to ``[1, max_splits]``)
    over a grid ``max_splits`` deep, ``B * max_splits`` pieces (``plan_kv_splits`` gives counts)."""
    counts = torch.clamp(num_splits, 1, max_splits)
    return cut_pieces(counts, counts.numel() * max_splits, depth=max_splits)


def decode_workspace(
    num_pieces: int, num_q_heads: int, head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh partial-result buffers ``(mid_o (G, Hq, D) fp32, mid_lse (G, Hq) fp32)`` for a grid
    of ``num_pieces`` pieces."""
    mid_o = torch.empty(num_pieces, num_q_heads, head_dim, dtype=torch.float32, device=device)
    mid_lse = torch.empty(num_pieces, num_q_heads, dtype=torch.float32, device=device)
    return mid_o, mid_lse


def runs_from_indptr(kv_indptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_starts, kv_lens)`` (B,) of a flat index array laid out by ``kv_indptr`` (B+1,)."""
    return kv_indptr[:-1], kv_indptr[1:] - kv_indptr[:-1]
