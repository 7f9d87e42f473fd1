"""Fused MoE experts in Triton: two grouped GEMMs over expert-aligned rows.

Same semantics as ``rollout.layers.moe.fused_experts_reference``::

    rows r = token * top_k + k, aligned by expert (kernels.moe.align)
    act[r]  = silu(x[token] @ w1[e]^T) * (x[token] @ w3[e]^T)       gate/up kernel, (N, I)
    y[r]    = topk_weight[r] * act[r] @ w2[e]^T                      down kernel, (N, H)
    out[t]  = sum_k y[t * top_k + k]                                 torch sum over top-k

The gate/up kernel keeps two accumulators (gate and up columns of one ``BLOCK_N`` slice of the
intermediate dimension) so the activation is applied in registers and the (N, 2I) intermediate
never reaches memory. Blocks of padding rows (expert -1) return at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.moe.align import ExpertAlignment
from kernels.moe.align_triton import align_tokens_to_experts_triton
from kernels.triton_utils import dot_precision, mma, upcast_dot


@dataclass(frozen=True, slots=True)
class MoeKernelConfig:
    """Tile shape and launch options of both grouped GEMMs."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_config(num_rows: int, num_experts: int) -> MoeKernelConfig:
    """Tiles by the mean rows per expert: decode batches give each expert a handful of rows, so a
    short ``block_m`` avoids wasted MMA rows and the kernel streams weights; prefill is MMA-bound."""
    per_expert = num_rows / max(1, num_experts)
    if per_expert <= 16:
        return MoeKernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return MoeKernelConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return MoeKernelConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, act_ptr, sorted_ids_ptr, block_experts_ptr,
    num_rows, hidden, inter, top_k,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ar,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    mask_m = rows < num_rows
    tokens = rows // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    # w13[e] rows [0, I) are the gate (w1), rows [I, 2I) the up projection (w3); tiles are (BLOCK_K, BLOCK_N).
    wg_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    wu_ptrs = wg_ptrs + inter * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        mask_k = offs_k < hidden - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc_g = mma(x, wg, acc_g, PRECISION, UPCAST)
        acc_u = mma(x, wu, acc_u, PRECISION, UPCAST)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    # Round like the reference, whose gate_up product is materialised in the activation dtype.
    gate = acc_g.to(act_ptr.dtype.element_ty).to(tl.float32)
    up = acc_u.to(act_ptr.dtype.element_ty).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up
    tl.store(
        act_ptr + rows[:, None] * stride_ar + offs_n[None, :],
        act.to(act_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _down_kernel(
    act_ptr, w_ptr, out_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr,
    num_rows, hidden, inter,
    stride_ar, stride_we, stride_wn, stride_wk, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    mask_m = rows < num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None] * stride_ar + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        mask_k = offs_k < inter - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, w, acc, PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    y = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    routing = tl.load(weights_ptr + rows, mask=mask_m, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_or + offs_n[None, :],
        (y * routing[:, None]).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )


def fused_experts_triton(
    hidden: torch.Tensor,  # (T, H)
    w13: torch.Tensor,  # (E, 2I, H)
    w2: torch.Tensor,  # (E, H, I)
    topk_weights: torch.Tensor,  # (T, k)
    topk_ids: torch.Tensor,  # (T, k)
    config: MoeKernelConfig | None = None,
    skip_negative: bool = False,
) -> torch.Tensor:  # (T, H)
    """Expert MLPs of every token combined with its routing weights, as two grouped GEMMs.

    With ``skip_negative`` an id of -1 in ``topk_ids`` (an expert another rank holds) contributes
    nothing: its rows fall in blocks of a sentinel expert that the kernels skip, and stay zero."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    num_rows = num_tokens * top_k
    out_dtype = hidden.dtype
    if num_rows == 0:
        return torch.zeros_like(hidden)
    assert w2.shape == (num_experts, hidden_size, inter), "w2 must be (E, H, I)"
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1, "expert weights must be row-major"
    if hidden.dtype != w13.dtype or hidden.stride(-1) != 1:
        hidden = hidden.to(w13.dtype).contiguous()
    cfg = config or default_config(num_rows, num_experts)
    if skip_negative:
        topk_ids = torch.where(topk_ids < 0, num_experts, topk_ids)
        align = align_tokens_to_experts_triton(topk_ids, num_experts + 1, cfg.block_m)
        align = ExpertAlignment(align.sorted_ids, torch.where(align.block_experts == num_experts, -1,
                                                              align.block_experts), align.block_m, align.num_rows)
    else:
        align = align_tokens_to_experts_triton(topk_ids, num_experts, cfg.block_m)
    num_blocks = align.block_experts.shape[0]
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # (N,)
    precision, upcast = dot_precision(hidden.dtype), upcast_dot(hidden)
    act = torch.empty(num_rows, inter, dtype=hidden.dtype, device=hidden.device)  # (N, I)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, cfg.block_n))](
        hidden, w13, act, align.sorted_ids, align.block_experts,
        num_rows, hidden_size, inter, top_k,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision, UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # Rows of skipped experts are never written: they must read as zero in the sum below.
    alloc = torch.zeros if skip_negative else torch.empty
    y = alloc(num_rows, hidden_size, dtype=hidden.dtype, device=hidden.device)  # (N, H)
    _down_kernel[(num_blocks, triton.cdiv(hidden_size, cfg.block_n))](
        act, w2, y, weights, align.sorted_ids, align.block_experts,
        num_rows, hidden_size, inter,
        act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision, UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(out_dtype)
