"""Fused MoE experts in Triton: two grouped GEMMs over expert-aligned rows.

Same semantics as ``rollout.layers.moe.fused_experts_reference``::

    rows r = token * top_k + k, aligned by expert (kernels.moe.align)
    act[r]  = silu(x[token] @ w1[e]^T) * (x[token] @ w3[e]^T)       gate/up kernel, (N, I)
    y[r]    = topk_weight[r] * act[r] @ w2[e]^T                      down kernel, (N, H)
    out[t]  = sum_k y[t * top_k + k]                                 combine kernel, (T, H)

The gate/up kernel keeps two accumulators (gate and up columns of one ``BLOCK_N`` slice of the
intermediate dimension) so the activation is applied in registers and the (N, 2I) intermediate
never reaches memory. Blocks of padding rows (expert -1) return at once. The two GEMMs share the
row tile (one alignment) and take their own column/reduction tiles: tuned per shape and device where
``kernels/moe/configs`` has a file (``kernels.moe.tune`` writes it), ``default_config`` otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.moe.align import ExpertAlignment
from kernels.moe.align_triton import align_tokens_to_experts_triton
from kernels.moe.config import GemmTiles, MoeKernelConfig, default_config
from kernels.moe.tuned_configs import tuned_config
from kernels.triton_utils import dot_precision, mma, upcast_dot


@triton.jit(do_not_specialize=["num_rows"])  # one build for every batch size
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


@triton.jit(do_not_specialize=["num_rows"])
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


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, hidden, stride_yr, stride_ot,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, SKIP_NEGATIVE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(TOP_K):  # a fixed order: the same sum for a token in any batch
        row = token * TOP_K + j
        keep = mask
        if SKIP_NEGATIVE:  # rows of other ranks' experts are never written: do not read them
            keep = mask & ((tl.zeros([BLOCK_H], tl.int32) + tl.load(ids_ptr + row)) >= 0)
        acc += tl.load(y_ptr + row * stride_yr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_rows(y: torch.Tensor, topk_ids: torch.Tensor, out_dtype: torch.dtype,
                 skip_negative: bool = False) -> torch.Tensor:
    """``out[t] = sum_k y[t * top_k + k]`` in fp32, rounded once to ``out_dtype``: (N, H) -> (T, H).

    Equal to ``y.view(T, k, H).sum(1, dtype=float32).to(out_dtype)`` in one launch, without the fp32
    intermediate. With ``skip_negative`` the rows whose id in ``topk_ids`` (T, k) is negative are
    not read (they may hold anything) and count as zero."""
    num_tokens, top_k = topk_ids.shape
    hidden = y.shape[1]
    assert y.shape[0] == num_tokens * top_k and y.stride(1) == 1, "y must be (T * k, H), row-major"
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=y.device)
    if num_tokens == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_ids.contiguous(), out, hidden, y.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, SKIP_NEGATIVE=skip_negative,
    )
    return out


def launch_gate_up(hidden: torch.Tensor, w13: torch.Tensor, act: torch.Tensor, align: ExpertAlignment,
                   top_k: int, tiles: GemmTiles) -> None:
    """``act[r] = silu(x w1^T) * (x w3^T)`` for every aligned row r: (T, H) -> (N, I)."""
    inter = w13.shape[1] // 2
    _gate_up_kernel[(align.block_experts.shape[0], triton.cdiv(inter, tiles.block_n))](
        hidden, w13, act, align.sorted_ids, align.block_experts,
        align.num_rows, hidden.shape[1], inter, top_k,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0),
        BLOCK_M=align.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        PRECISION=dot_precision(hidden.dtype), UPCAST=upcast_dot(hidden),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def launch_down(act: torch.Tensor, w2: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                align: ExpertAlignment, tiles: GemmTiles) -> None:
    """``y[r] = weight[r] * act[r] @ w2[e]^T`` for every aligned row r: (N, I) -> (N, H)."""
    hidden = w2.shape[1]
    _down_kernel[(align.block_experts.shape[0], triton.cdiv(hidden, tiles.block_n))](
        act, w2, y, weights, align.sorted_ids, align.block_experts,
        align.num_rows, hidden, w2.shape[2],
        act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_M=align.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        PRECISION=dot_precision(act.dtype), UPCAST=upcast_dot(act),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def align_rows(topk_ids: torch.Tensor, num_experts: int, block_m: int, skip_negative: bool) -> ExpertAlignment:
    """The expert alignment of ``topk_ids``; with ``skip_negative`` ids of -1 land in blocks of a
    sentinel expert that is then marked -1, so the kernels skip them."""
    if not skip_negative:
        return align_tokens_to_experts_triton(topk_ids, num_experts, block_m)
    topk_ids = torch.where(topk_ids < 0, num_experts, topk_ids)
    align = align_tokens_to_experts_triton(topk_ids, num_experts + 1, block_m)
    block_experts = torch.where(align.block_experts == num_experts, -1, align.block_experts)
    return ExpertAlignment(align.sorted_ids, block_experts, align.block_m, align.num_rows)


def select_config(hidden: torch.Tensor, w13: torch.Tensor, num_rows: int) -> MoeKernelConfig:
    """The tuned config for this shape, dtype and device (see ``tuned_configs``), else ``default_config``."""
    num_experts, two_inter, hidden_size = w13.shape
    tuned = tuned_config(num_experts, two_inter // 2, hidden_size, w13.dtype, w13.device, num_rows)
    return tuned or default_config(num_rows, num_experts)


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

    ``config`` None: the tuned tiles of this shape and device where a config file exists, else
    ``default_config``. With ``skip_negative`` an id of -1 in ``topk_ids`` (an expert another rank
    holds) contributes nothing: its rows fall in blocks of a sentinel expert that the kernels skip."""
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
    cfg = config or select_config(hidden, w13, num_rows)
    align = align_rows(topk_ids, num_experts, cfg.block_m, skip_negative)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # (N,)
    act = torch.empty(num_rows, inter, dtype=hidden.dtype, device=hidden.device)  # (N, I)
    launch_gate_up(hidden, w13, act, align, top_k, cfg.gate_up)
    y = torch.empty(num_rows, hidden_size, dtype=hidden.dtype, device=hidden.device)  # (N, H)
    launch_down(act, w2, y, weights, align, cfg.down)
    return combine_rows(y, topk_ids, out_dtype, skip_negative)
