"""Per-head q/k RMSNorm (Qwen3) and rotary embedding, in place on the fused qkv projection output.

The qkv rows are laid out ``[q heads | k heads | v heads]``, so q and k heads are one run of
``Hq + Hkv`` heads: one program per token reads all of them, optionally normalises each,
rotates them by the token's position (its cos / sin loaded once) and writes them back. v is
untouched. (A program per (token, head) made 200k programs of one warp for an 8k-token prompt
chunk of Qwen3-0.6B, 120 us per layer.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
    stride_t, stride_cos, num_q_heads, num_heads, eps,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dtype = qkv_ptr.dtype.element_ty
    half: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, half)[None, :]  # (1, half)
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    mask = (heads < num_heads) & (offs < half)  # (BLOCK_H, half)
    base = qkv_ptr + t * stride_t + heads * HEAD_DIM
    x1 = tl.load(base + offs, mask=mask, other=0.0)
    x2 = tl.load(base + half + offs, mask=mask, other=0.0)
    if HAS_NORM:
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / HEAD_DIM + eps)  # (BLOCK_H,)
        is_q = heads < num_q_heads  # (BLOCK_H, 1)
        w1 = tl.where(is_q, tl.load(qw_ptr + offs), tl.load(kw_ptr + offs)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(qw_ptr + half + offs), tl.load(kw_ptr + half + offs)).to(tl.float32)
        x1 = (w1 * (f1 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (f2 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
    # One token's cos / sin serve all of its heads.
    pos = tl.load(pos_ptr + t)
    c1 = tl.load(cos_ptr + pos * stride_cos + offs).to(dtype).to(tl.float32)  # (1, half)
    c2 = tl.load(cos_ptr + pos * stride_cos + half + offs).to(dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_cos + offs).to(dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_cos + half + offs).to(dtype).to(tl.float32)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    # q * cos + rotate_half(q) * sin, each product rounded to the model dtype as torch does.
    o1 = ((a1 * c1).to(dtype).to(tl.float32) + (-a2 * s1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * c2).to(dtype).to(tl.float32) + (a1 * s2).to(dtype).to(tl.float32)).to(dtype)
    tl.store(base + offs, o1, mask=mask)
    tl.store(base + half + offs, o2, mask=mask)


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
) -> None:
    """Rotate (after an optional per-head RMSNorm) the q and k heads of ``qkv`` (T, (Hq+2Hkv)*D) in place.

    ``positions`` (T,) int64; ``cos_cache`` / ``sin_cache`` (P, D) float32 in the ``rotate_half``
    layout. Same rounding as ``reference.qk_norm_rope``.
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
    _qk_norm_rope_kernel[(t,)](
        qkv, positions, cos_cache, sin_cache, qw, kw, qkv.stride(0), cos_cache.stride(0), num_q_heads, heads, eps,
        HEAD_DIM=head_dim, BLOCK_H=block_h, HAS_NORM=has_norm,
        num_warps=max(1, min(8, block_h * head_dim // 1024)),
    )
