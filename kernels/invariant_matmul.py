"""Batch-invariant matmul ``out = x @ w.T (+ bias)``: row ``i`` of the result has the same bits
whatever the other rows of ``x`` are and however many there are.

cuBLAS picks its kernel (tile shape, split-K, stream-K) by the problem size, so the same row of
``x`` is summed in a different order when the batch grows from 3 rows to 300. This kernel has one
configuration for every row count: each program owns a ``BLOCK_M x BLOCK_N`` tile of the output
and walks K in ``BLOCK_K`` steps from 0 up, accumulating in float32, never splitting K::

    x (M, K)  rows m0 .. m0+BLOCK_M   (rows past M load as zeros and are not stored)
    w (N, K)  rows n0 .. n0+BLOCK_N
    acc       sum over k-tiles 0, BLOCK_K, 2 BLOCK_K, ...  in that order, for every M

Every output element therefore sums the same K tiles in the same order. The tile's rows and
columns (``BLOCK_M``, ``BLOCK_N``, warps, stages) do not enter that order: a tensor-core
instruction sums its K slice the same way whatever the tile around it, so the kernel may take
larger tiles for many rows and smaller ones for few without changing a bit (checked on the H200
for every tile below at the Qwen3-0.6B shapes and 1 to 8192 rows: ``kernels/bench_deterministic.py``,
and by ``tests/gpu/test_deterministic_gpu.py``). ``BLOCK_K`` is the one thing fixed per dtype.
The price left: no split-K for skinny shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_utils import dot_precision, mma, upcast_dot


class MatmulConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The K tile is fixed per dtype (module doc): 64 for 16-bit inputs, whose tiles are chosen by size
# (``choose_config``). fp32 takes the exact FMA path, whose operands need small tiles to stay in
# registers: one config.
FP32 = MatmulConfig(32, 64, 32, 4, 2)
# 16-bit tiles by problem size (H200, Qwen3-0.6B shapes, us per call against the one 64 x 128 /
# 4-stage config used for every size before):
# few rows take 64 x 64 tiles with 6 loads in flight, so that a 1024-wide output still gives enough
# programs (o_proj at 256 rows 21 -> 12 us, down_proj 22 -> 15); many rows, or a wide output such as
# the LM head past a tile of rows, take 128 x 128 over two warpgroups (qkv at 8192 rows 162 -> 136 us,
# LM head at 256 rows 207 -> 177).
FEW_ROWS = MatmulConfig(64, 64, 64, 4, 6)
MANY_ROWS = MatmulConfig(128, 128, 64, 8, 3)


def choose_config(m: int, n: int, dtype: torch.dtype) -> MatmulConfig:
    """Tiles for an ``(m, k) @ (k, n)`` product; every choice has the dtype's ``block_k``."""
    if dtype == torch.float32:
        return FP32
    if m >= 512 or (n >= 32768 and m > 64):
        return MANY_ROWS
    return FEW_ROWS


GROUP_M = 8  # tiles of GROUP_M row blocks share weight tiles in L2 (grouped launch order)


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
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
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # (1, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        x = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_rows + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        w = w.to(x.dtype)  # a 16-bit weight under float32 x: exact upcast
        acc = mma(x, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def invariant_matmul(
    x: torch.Tensor,  # (M, K)
    weight: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None = None,  # (N,)
    out_dtype: torch.dtype | None = None,
    config: MatmulConfig | None = None,
) -> torch.Tensor:  # (M, N), out_dtype or x's dtype
    """``x @ weight.T + bias`` with float32 accumulation in a fixed order per output element.

    ``x`` float32 with a 16-bit ``weight`` upcasts the weight in the kernel (the float32 LM head,
    without a float32 copy of the weight); the result has ``out_dtype`` (default: ``x``'s).
    ``config`` (benchmarks): other tiles, with the dtype's ``block_k`` for the same bits."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], "x (M, K), weight (N, K)"
    assert x.dtype == weight.dtype or x.dtype == torch.float32, "x and weight share a dtype, or x is float32"
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config or choose_config(m, n, x.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _matmul_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP=GROUP_M,
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(weight), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
