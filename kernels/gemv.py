"""Skinny matmul ``out = x @ w.T (+ bias)`` for a handful of rows: decode steps of a small batch.

At one to a few tokens a linear layer is a matrix-vector product: all the time goes into reading
the weight once. cuBLAS picks kernels that reach ~2.9 TB/s on the 235 MB gate/up projection of an
8B model but only ~1.6 TB/s on its 33 MB o_proj (H100). Here each program owns ``BLOCK_N`` rows of
the weight and streams them along K in ``BLOCK_K`` tiles with several loads in flight; the few
input rows (padded to 16 for the tensor cores) stay in registers::

    w (N, K), row-major   | rows n0 .. n0+BLOCK_N | -> program n0 / BLOCK_N, tiles of BLOCK_K along K
    x (M, K), M <= 16     | all rows, tile k0..   |
    out (M, N)            | columns n0 .. n0+BLOCK_N, fp32 accumulation, one store

Which kernel serves which shape is measured, not guessed (``rollout.layers.skinny``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_utils import dot_precision, mma, upcast_dot

MAX_ROWS = 16  # rows of x one program holds (tl.dot needs 16)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Candidates tried per weight shape; the engine keeps the fastest (or cuBLAS).
CONFIGS = (
    GemvConfig(16, 256, 4, 4),
    GemvConfig(32, 256, 4, 4),
    GemvConfig(32, 512, 4, 3),
    GemvConfig(64, 256, 4, 3),
    GemvConfig(16, 512, 4, 3),
)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # (1, BLOCK_N)
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BLOCK_M, 1)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        w = tl.load(w_rows + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        x = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        acc = mma(x, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemv(
    x: torch.Tensor,  # (M, K), M <= MAX_ROWS
    weight: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None = None,  # (N,)
    config: GemvConfig = CONFIGS[0],
) -> torch.Tensor:  # (M, N), x's dtype
    """``x @ weight.T + bias`` with fp32 accumulation, for at most ``MAX_ROWS`` rows of ``x``."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k, "x (M <= 16, K) and weight (N, K)"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "rows must be contiguous"
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
