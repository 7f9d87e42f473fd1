"""Split-K matmul ``out = x @ w.T (+ bias)`` for tens to hundreds of rows: decode steps of a
mid-size or large batch.

At 256 rows a 1024-wide output (Qwen3-0.6B's o_proj and down_proj) is 16 tiles of 128 x 128, so a
one-program-per-tile kernel (cuBLAS's choice there) keeps 16 of an H200's 132 SMs busy while each
walks all of K. This kernel also cuts K into ``splits`` slices, one program per (tile, slice),
so the same product runs on ``tiles x splits`` SMs::

    x (M, K)      rows m0 .. m0+BLOCK_M, columns of slice s only
    w (N, K)      rows n0 .. n0+BLOCK_N, the same columns
    part (S, M, N) fp32: slice s's partial product of the tile
    count (tiles,) int32: slices of the tile done so far

Each program stores its partial product, then counts itself in with an acquire-release atomic.
The program that counts last sums the tile's ``S`` partials in slice order (its own included,
read back like the others, so the order does not depend on which program came last), adds the
bias, stores the tile in the output dtype and sets the count back to zero. One launch, no reduce
kernel. Every element's sum therefore has a fixed order for a given config: calls repeat bit for
bit (not across configs or row counts; the batch-invariant path is ``kernels.invariant_matmul``).

The counts must be zero when a launch starts, and launches that share a count buffer must not
overlap in time: ``split_matmul`` takes one buffer per (device, stream) by default, allocated
outside any graph capture, which a launch leaves zeroed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_utils import dot_precision, mma, upcast_dot


class SplitConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    splits: int  # slices of K; each is a whole number of BLOCK_K tiles


GROUP_M = 8  # tiles of GROUP_M row blocks share weight tiles in L2 (grouped launch order)
_MAX_TILES = 1 << 14  # entries of a count buffer


@triton.jit
def _split_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, K_SLICE, stride_xm, stride_wn, stride_om,
    SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)  # output tile
    split = tl.program_id(1)  # slice of K
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = split * K_SLICE
    k_hi = tl.minimum(k_lo + K_SLICE, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < k_hi
        x = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_rows + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(x, w.to(x.dtype), acc, PRECISION, UPCAST)
    mask = mask_m[:, None] & mask_n[None, :]
    tile = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # (BLOCK_M, BLOCK_N) offsets in one (M, N) slab
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        slab = M.to(tl.int64) * N
        tl.store(part_ptr + split * slab + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the count says so
        done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:  # the last slice of this tile: sum them all, in slice order
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLITS):
                # .cg: from L2, where the other programs' stores are, never a stale L1 line
                total += tl.load(part_ptr + s * slab + tile, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next launch


_counts: dict[tuple[torch.device, int], torch.Tensor] = {}


def count_buffer(device: torch.device) -> torch.Tensor:
    """The zeroed count buffer of ``device``'s current stream. Allocated on first use outside a
    graph capture; inside one a first use gets a buffer zeroed by the graph itself (a memset node)."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    buf = _counts.get(key)
    if buf is None:
        buf = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return buf  # graph-private memory: zeroed on every replay, never kept
        _counts[key] = buf
    return buf


def tiles(m: int, n: int, cfg: SplitConfig) -> int:
    """Output tiles of an ``(m, n)`` product under ``cfg``."""
    return triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)


def split_matmul(
    x: torch.Tensor,  # (M, K)
    weight: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None,  # (N,)
    cfg: SplitConfig,
    counts: torch.Tensor | None = None,  # (>= tiles,) int32 zeros; default: count_buffer
) -> torch.Tensor:  # (M, N), x's dtype
    """``x @ weight.T + bias`` with float32 accumulation, K cut into ``cfg.splits`` slices."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], "x (M, K), weight (N, K)"
    assert x.dtype == weight.dtype, "x and weight share a dtype"
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    n_tiles = tiles(m, n, cfg)
    # Whole K tiles per slice, and no empty slice: fewer slices where K is short.
    k_tiles = triton.cdiv(k, cfg.block_k)
    splits = max(1, min(cfg.splits, k_tiles))
    k_slice = triton.cdiv(k_tiles, splits) * cfg.block_k
    splits = triton.cdiv(k, k_slice)
    if splits > 1:
        assert n_tiles <= _MAX_TILES, f"{n_tiles} output tiles: more than a count buffer holds"
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        counts = count_buffer(x.device) if counts is None else counts
    else:
        part = counts = out  # unused
    _split_kernel[(n_tiles, splits)](
        x, weight, bias if bias is not None else weight, out, part, counts, m, n, k, k_slice,
        x.stride(0), weight.stride(0), out.stride(0),
        SPLITS=splits, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP=GROUP_M, PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(weight),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
