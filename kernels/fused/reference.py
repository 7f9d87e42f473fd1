"""Torch formulations of the fused kernels (the model's CPU path uses the same ops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None:
        summed = x + residual
        return rmsnorm(summed, weight, eps), summed
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def qk_norm_rope(qkv, positions, cos_cache, sin_cache, num_q_heads, num_kv_heads, head_dim,
                 q_norm_weight=None, k_norm_weight=None, eps=1e-6) -> torch.Tensor:
    """The result ``qk_norm_rope_`` leaves in ``qkv`` (returned as a new tensor)."""
    t = qkv.shape[0]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].reshape(t, num_q_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].reshape(t, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rmsnorm(q, q_norm_weight, eps), rmsnorm(k, k_norm_weight, eps)
    cos = cos_cache[positions].to(qkv.dtype)[:, None, :]
    sin = sin_cache[positions].to(qkv.dtype)[:, None, :]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    out = qkv.clone()
    out[:, :q_size] = q.reshape(t, q_size)
    out[:, q_size:q_size + kv_size] = k.reshape(t, kv_size)
    return out
