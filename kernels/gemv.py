"""Skinny matmul ``out = x @ w.T (+ bias)`` for a few rows: decode steps of a small batch.

At one to a few tokens a linear layer reads its whole weight for little arithmetic, and the
time is that read. cuBLAS's choices there leave bandwidth unused on small weights (H200, Qwen3-0.6B
shape at one row: o_proj 0.4 TB/s, down_proj 1.0 TB/s). Two kernels:

- tensor cores (``_gemv_kernel``): each program owns ``BLOCK_N`` rows of the weight and streams
  them along K in ``BLOCK_K`` tiles with several loads in flight; the rows of x (padded to 16)
  stay in registers::

    w (N, K), row-major   | rows n0 .. n0+BLOCK_N | -> program n0 / BLOCK_N, tiles of BLOCK_K along K
    x (M, K), M <= 16     | all rows, tile k0..   |
    out (M, N)            | columns n0 .. n0+BLOCK_N, fp32 accumulation, one store

- CUDA-core multiply-adds (``_gemv_fma_kernel``, up to 4 rows): the same streaming with as few as
  2 weight rows per program, so a 1024-column weight still gives every SM several programs.

Both also take a gated form for an MLP's ``[gate | up]`` weight (``gated=True``): a program reads
gate row ``n`` and up row ``N + n`` side by side and stores ``silu(gate) * up``, so the
activation costs no kernel of its own and the (M, 2N) projection is never written.

And both take the RMSNorm in front of a projection (``norm=InputNorm(...)``): each program
first sums the squares of its rows of ``x`` (plus the residual, whose sum program 0 stores as the
new residual stream), then normalises every x tile as it loads it. The rows are a few KB read from
L2 by every program; the norm kernel and its round trip through memory are gone.

Which kernel serves which shape is measured, not guessed (``rollout.layers.skinny``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_utils import dot_precision, mma, pdl_launch, pdl_trigger, pdl_wait, upcast_dot

MAX_ROWS = 16  # rows of x one program holds (tl.dot needs 16)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fma: bool = False  # CUDA-core multiply-adds over a few rows (``_gemv_fma_kernel``), no tensor cores


# Candidates tried per weight shape; the engine keeps the fastest (or cuBLAS). Tensor-core tiles
# for 17-64 rows were tried too (H200): within 2% of cuBLAS at every shape, so not offered.
CONFIGS = (
    GemvConfig(16, 256, 4, 4),
    GemvConfig(32, 256, 4, 4),
    GemvConfig(32, 512, 4, 3),
    GemvConfig(64, 256, 4, 3),
    GemvConfig(16, 512, 4, 3),
)
FMA_MAX_ROWS = 4  # rows up to which the FMA kernel is a candidate
# Few output columns per program, so that even a 1024-column weight spreads over every SM (the
# tensor-core kernel needs 16 and leaves most SMs idle there), and wide K tiles for long loads.
FMA_CONFIGS = (
    GemvConfig(2, 1024, 4, 3, True),
    GemvConfig(4, 512, 4, 3, True),
    GemvConfig(4, 1024, 4, 2, True),
    GemvConfig(8, 512, 4, 3, True),
    GemvConfig(8, 1024, 8, 2, True),
    GemvConfig(16, 512, 8, 3, True),
    GemvConfig(2, 2048, 4, 1, True),  # a whole 1-2k K slice loaded before the PDL wait
    GemvConfig(4, 2048, 8, 1, True),
)


class InputNorm(NamedTuple):
    """RMSNorm of the rows of x (plus ``residual``) applied as x is read, rounded as
    ``kernels.fused.rmsnorm`` rounds (the sum of squares is taken in another order)."""

    weight: torch.Tensor  # (K,)
    eps: float
    residual: torch.Tensor | None = None  # (M, K): x + residual is what is normed
    summed: torch.Tensor | None = None  # (M, K), with residual: receives x + residual


def candidates(rows: int) -> tuple[GemvConfig, ...]:
    """The configs worth timing for ``rows`` rows of x."""
    return CONFIGS + (FMA_CONFIGS if rows <= FMA_MAX_ROWS else ())


@triton.jit
def _silu_mul(gate, up, dtype: tl.constexpr):
    """``silu(gate) * up`` of two fp32 accumulators, rounded as a gemv followed by
    ``kernels.fused.silu_and_mul`` rounds: each projection, then silu, then the product."""
    g = gate.to(dtype).to(tl.float32)
    u = up.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (act * u).to(dtype)


@triton.jit
def _input_tile(x_rows, r_rows, k, mask, HAS_RESIDUAL: tl.constexpr):
    """A tile of x's rows at columns ``k``, plus the residual's, rounded to x's dtype as the
    residual stream is kept."""
    x = tl.load(x_rows + k[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_rows + k[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _input_rstd(x_rows, r_rows, s_ptr, stride_sm, offs_m, offs_k, mask_m, pid, K, eps, NORM: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """``1 / rms`` (rows,) of x (+ residual) over K, ones without ``NORM``; program 0 stores
    x + residual at ``s_ptr``."""
    if not NORM:
        return tl.full([ROWS], 1.0, tl.float32)
    s_rows = s_ptr + offs_m[:, None] * stride_sm
    store_m = mask_m & (offs_m * 0 + pid == 0)  # a tensor test: the interpreter has no scalar & tensor of bools
    ss = tl.zeros([ROWS], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        h = _input_tile(x_rows, r_rows, k, mask_m[:, None] & (k < K)[None, :], HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(s_rows + k[None, :], h, mask=store_m[:, None] & (k < K)[None, :])
        hf = h.to(tl.float32)
        ss += tl.sum(hf * hf, axis=1)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def _x_tile(x_rows, r_rows, nw_ptr, rstd, k, mask_m, mask_k, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The tile of x the product reads at columns ``k``: as stored, or (``NORM``) normalised by
    ``rstd`` and the norm weight, with the rounding points of ``kernels.fused.rmsnorm``."""
    x = _input_tile(x_rows, r_rows, k, mask_m[:, None] & mask_k[None, :], HAS_RESIDUAL)
    if NORM:
        w = tl.load(nw_ptr + k, mask=mask_k, other=0.0).to(tl.float32)
        normed = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
        x = (w[None, :] * normed).to(x.dtype)
    return x


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    r_ptr, nw_ptr, s_ptr, stride_rm, stride_sm, eps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    # GATED: out (M, N) = silu(x @ w[:N].T) * (x @ w[N:2N].T); u_* are the up rows' tiles.
    # NORM: x is RMS-normalised (after adding the residual rows r, HAS_RESIDUAL) as it is read.
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # (1, BLOCK_N)
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BLOCK_M, 1)
    r_rows = r_ptr + offs_m[:, None] * stride_rm
    mask_k = offs_k < K
    # The first weight tile before the wait (PDL; see _gemv_fma_kernel).
    u_rows = w_rows + N * stride_wn
    w = tl.load(w_rows + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
    if GATED:
        u = tl.load(u_rows + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    pdl_wait(PDL)
    rstd = _input_rstd(x_rows, r_rows, s_ptr, stride_sm, offs_m, offs_k, mask_m, pid, K, eps, NORM, HAS_RESIDUAL,
                       BLOCK_M, BLOCK_K)
    x = _x_tile(x_rows, r_rows, nw_ptr, rstd, offs_k, mask_m, mask_k, NORM, HAS_RESIDUAL)  # (BLOCK_M, BLOCK_K)
    acc = mma(x, w, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION, UPCAST)
    if GATED:
        acc_u = mma(x, u, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION, UPCAST)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        w = tl.load(w_rows + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if GATED:
            u = tl.load(u_rows + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        x = _x_tile(x_rows, r_rows, nw_ptr, rstd, k, mask_m, mask_k, NORM, HAS_RESIDUAL)
        acc = mma(x, w, acc, PRECISION, UPCAST)
        if GATED:
            acc_u = mma(x, u, acc_u, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if GATED:
        tl.store(out, _silu_mul(acc, acc_u, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemv_fma_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    r_ptr, nw_ptr, s_ptr, stride_rm, stride_sm, eps,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    # One program: BLOCK_N weight rows, read along K in (BLOCK_N, BLOCK_K) tiles whose K runs are
    # contiguous (wide loads), multiplied with the ROWS rows of x on the CUDA cores and summed over
    # each tile's K in fp32. The first weight tile is loaded before waiting for the previous kernel
    # (PDL): the weight is nobody's output, so its read overlaps that kernel's end.
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    offs_m = tl.arange(0, ROWS)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (ROWS, 1)
    r_rows = r_ptr + offs_m[:, None] * stride_rm
    mask_k = offs_k < K
    u_rows = w_rows + N * stride_wn  # GATED: the up rows
    w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
    if GATED:
        u = tl.load(u_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    pdl_wait(PDL)
    rstd = _input_rstd(x_rows, r_rows, s_ptr, stride_sm, offs_m, offs_k, mask_m, pid, K, eps, NORM, HAS_RESIDUAL,
                       ROWS, BLOCK_K)
    x = _x_tile(x_rows, r_rows, nw_ptr, rstd, offs_k, mask_m, mask_k, NORM, HAS_RESIDUAL)  # (ROWS, BLOCK_K)
    acc = tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)  # (ROWS, BLOCK_N)
    if GATED:
        acc_u = tl.sum(x.to(tl.float32)[:, None, :] * u.to(tl.float32)[None, :, :], axis=2)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if GATED:
            u = tl.load(u_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        x = _x_tile(x_rows, r_rows, nw_ptr, rstd, k, mask_m, mask_k, NORM, HAS_RESIDUAL)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if GATED:
            acc_u += tl.sum(x.to(tl.float32)[:, None, :] * u.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if GATED:
        tl.store(out, _silu_mul(acc, acc_u, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemv(
    x: torch.Tensor,  # (M, K), M <= MAX_ROWS
    weight: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None = None,  # (N,)
    config: GemvConfig = CONFIGS[0],
    gated: bool = False,
    norm: InputNorm | None = None,
) -> torch.Tensor:  # (M, N), or (M, N / 2) gated; x's dtype
    """``x @ weight.T + bias`` with fp32 accumulation, for at most ``MAX_ROWS`` rows of ``x``.

    ``gated``: ``weight`` (and ``bias``) hold ``[gate | up]`` halves along N, and the result is
    ``silu(gate) * up`` (M, N / 2), as ``kernels.fused.silu_and_mul`` of the plain product.
    ``norm``: the product is of ``rmsnorm(x + norm.residual)`` (residual optional), and with a
    residual ``norm.summed`` receives ``x + residual``: ``kernels.fused.rmsnorm`` then this."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k, "x (M <= 16, K) and weight (N, K)"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "rows must be contiguous"
    if gated:
        assert n % 2 == 0, "a gated weight stacks two halves of equal size"
        n //= 2
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    norm_args = _norm_args(x, norm)
    if m == 0 or n == 0:
        if norm is not None and norm.residual is not None:
            torch.add(x, norm.residual, out=norm.summed)
        return out
    flags = dict(GATED=gated, NORM=norm is not None, HAS_RESIDUAL=norm is not None and norm.residual is not None,
                 num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x))
    b = bias if bias is not None else weight
    if config.fma:
        assert m <= FMA_MAX_ROWS, "the FMA kernel takes at most FMA_MAX_ROWS rows"
        _gemv_fma_kernel[(triton.cdiv(n, config.block_n),)](
            x, weight, b, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), *norm_args,
            HAS_BIAS=bias is not None, ROWS=triton.next_power_of_2(m), BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, **flags,
        )
        return out
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, b, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), *norm_args,
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x), **flags,
    )
    return out


def _norm_args(x: torch.Tensor, norm: InputNorm | None) -> tuple:
    """The kernels' ``r_ptr, nw_ptr, s_ptr, stride_rm, stride_sm, eps`` for ``norm`` (x in unused slots)."""
    if norm is None:
        return x, x, x, 0, 0, 0.0
    assert norm.weight.shape == (x.shape[1],) and norm.weight.is_contiguous(), "a norm weight of K elements"
    if norm.residual is None:
        return x, norm.weight, x, 0, 0, float(norm.eps)
    r, s = norm.residual, norm.summed
    assert s is not None, "a residual needs a buffer for the summed rows"
    assert r.shape == x.shape == s.shape and r.dtype == s.dtype == x.dtype, "residual and summed shaped like x"
    assert r.stride(1) == 1 and s.stride(1) == 1, "rows must be contiguous"
    return r, norm.weight, s, r.stride(0), s.stride(0), float(norm.eps)
