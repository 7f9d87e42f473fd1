"""Per-head q/k RMSNorm (Qwen3) and rotary embedding, in place on the fused qkv projection output.

The qkv rows are laid out ``[q heads | k heads | v heads]``, so q and k heads are one run of
``Hq + Hkv`` heads: one program per token reads all of them, optionally normalises each,
rotates them by the token's position (its cos / sin loaded once) and writes them back. v is
untouched. Given the layer's KV cache and the tokens' slots, the same program also stores the
token's rotated k heads and its v heads there, which saves the two scatter kernels per layer
that storing them afterwards takes (``KVPool.set_kv``). (A program per (token, head) made 200k
programs of one warp for an 8k-token prompt chunk of Qwen3-0.6B, 120 us per layer.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import pdl_launch, pdl_trigger, pdl_wait


@triton.jit
def rms_norm_heads(x1, x2, w1, w2, eps, HEAD_DIM: tl.constexpr):
    """Per-row RMSNorm of heads held as halves ``x1``, ``x2`` (rows, HEAD_DIM / 2) in the model dtype,
    by weight halves ``w1``, ``w2`` (fp32, broadcast over rows); rounded as Hugging Face rounds."""
    dtype = x1.dtype
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / HEAD_DIM + eps)  # (rows,)
    y1 = (w1 * (f1 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
    y2 = (w2 * (f2 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
    return y1, y2


@triton.jit
def rotate_halves(x1, x2, c1, c2, s1, s2):
    """``x * cos + rotate_half(x) * sin`` of heads held as halves (rows, HEAD_DIM / 2), with the
    cos / sin halves (fp32 table rows, broadcast over rows) rounded to the model dtype first and
    each product rounded to it, as torch does."""
    dtype = x1.dtype
    c1 = c1.to(dtype).to(tl.float32)
    c2 = c2.to(dtype).to(tl.float32)
    s1 = s1.to(dtype).to(tl.float32)
    s2 = s2.to(dtype).to(tl.float32)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    o1 = ((a1 * c1).to(dtype).to(tl.float32) + (-a2 * s1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * c2).to(dtype).to(tl.float32) + (a1 * s2).to(dtype).to(tl.float32)).to(dtype)
    return o1, o2


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_t, stride_cos, stride_kc, stride_vc, num_q_heads, num_heads, eps,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, HAS_NORM: tl.constexpr,
    STORE_KV: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, half)[None, :]  # (1, half)
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    mask = (heads < num_heads) & (offs < half)  # (BLOCK_H, half)
    base = qkv_ptr + t * stride_t + heads * HEAD_DIM
    x1 = tl.load(base + offs, mask=mask, other=0.0)
    x2 = tl.load(base + half + offs, mask=mask, other=0.0)
    if HAS_NORM:
        is_q = heads < num_q_heads  # (BLOCK_H, 1)
        w1 = tl.where(is_q, tl.load(qw_ptr + offs), tl.load(kw_ptr + offs)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(qw_ptr + half + offs), tl.load(kw_ptr + half + offs)).to(tl.float32)
        x1, x2 = rms_norm_heads(x1, x2, w1, w2, eps, HEAD_DIM)
    # One token's cos / sin serve all of its heads.
    pos = tl.load(pos_ptr + t)
    o1, o2 = rotate_halves(
        x1, x2, tl.load(cos_ptr + pos * stride_cos + offs), tl.load(cos_ptr + pos * stride_cos + half + offs),
        tl.load(sin_ptr + pos * stride_cos + offs), tl.load(sin_ptr + pos * stride_cos + half + offs),
    )
    tl.store(base + offs, o1, mask=mask)
    tl.store(base + half + offs, o2, mask=mask)
    if STORE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        num_kv = num_heads - num_q_heads
        kv_row = heads - num_q_heads  # (BLOCK_H, 1): k head index of the k rows
        is_k = mask & (heads >= num_q_heads)
        k_base = k_cache_ptr + slot * stride_kc + kv_row * HEAD_DIM
        tl.store(k_base + offs, o1, mask=is_k)
        tl.store(k_base + half + offs, o2, mask=is_k)
        vh = tl.arange(0, BLOCK_KV)[:, None]  # (BLOCK_KV, 1)
        vd = tl.arange(0, HEAD_DIM)[None, :]  # (1, HEAD_DIM)
        vmask = (vh < num_kv) & (vd < HEAD_DIM)
        v = tl.load(qkv_ptr + t * stride_t + (num_heads + vh) * HEAD_DIM + vd, mask=vmask, other=0.0)
        tl.store(v_cache_ptr + slot * stride_vc + vh * HEAD_DIM + vd, v, mask=vmask)


def qk_norm_rope_(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Rotate (after an optional per-head RMSNorm) the q and k heads of ``qkv`` (T, (Hq+2Hkv)*D) in place.

    ``positions`` (T,) int64; ``cos_cache`` / ``sin_cache`` (P, D) float32 in the ``rotate_half``
    layout. Same rounding as ``reference.qk_norm_rope``. ``kv_cache = (k_cache, v_cache, slots)``:
    also store each token's rotated k heads and its v heads at row ``slots[t]`` of the caches
    (``(num_slots, Hkv, D)`` each, qkv's dtype), as ``KVPool.set_kv`` would.
    """
    t = qkv.shape[0]
    assert qkv.dim() == 2 and qkv.stride(-1) == 1 and qkv.shape[1] >= (num_q_heads + num_kv_heads) * head_dim
    assert head_dim % 2 == 0 and (head_dim & (head_dim - 1)) == 0, "head_dim must be a power of two"
    assert cos_cache.stride() == sin_cache.stride() and cos_cache.stride(-1) == 1
    has_norm = q_norm_weight is not None
    if t == 0:
        return
    qw = q_norm_weight if has_norm else cos_cache
    kw = k_norm_weight if has_norm else cos_cache
    heads = num_q_heads + num_kv_heads
    block_h = triton.next_power_of_2(heads)
    if kv_cache is not None:
        k_cache, v_cache, slots = kv_cache
        assert qkv.shape[1] == (num_q_heads + 2 * num_kv_heads) * head_dim, "the v heads must follow k"
        for c in (k_cache, v_cache):
            assert c.dtype == qkv.dtype and c.shape[1:] == (num_kv_heads, head_dim), "cache must be (N, Hkv, D)"
            assert c.stride(2) == 1 and c.stride(1) == head_dim, "cache rows must be contiguous"
        assert slots.shape == (t,)
        stride_kc, stride_vc = k_cache.stride(0), v_cache.stride(0)
    else:
        k_cache = v_cache = slots = qkv
        stride_kc = stride_vc = 0
    _qk_norm_rope_kernel[(t,)](
        qkv, positions, cos_cache, sin_cache, qw, kw, k_cache, v_cache, slots,
        qkv.stride(0), cos_cache.stride(0), stride_kc, stride_vc, num_q_heads, heads, eps,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_KV=triton.next_power_of_2(num_kv_heads), HAS_NORM=has_norm,
        STORE_KV=kv_cache is not None, num_warps=max(1, min(8, block_h * head_dim // 1024)),
        **pdl_launch(qkv, kind="attention"),
    )
