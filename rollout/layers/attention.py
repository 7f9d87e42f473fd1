"""The attention layer: reshapes q/k/v into heads and hands them to the step's attention backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rollout.batch import ForwardBatch

if TYPE_CHECKING:
    from kernels.attention import NewTokenRope


class Attention(nn.Module):
    """Causal paged attention of one layer; the backend owns the KV cache and the kernels."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, layer_id: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id
        self.scale = scale

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, kv_stored: bool = False
    ) -> torch.Tensor:
        """q (T, Hq*D) or (T, Hq, D); k, v (T, Hkv*D) or (T, Hkv, D) -> (T, Hq*D).

        ``kv_stored``: k and v are already in this layer's KV cache at ``batch.out_cache_loc``."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = batch.attn_backend.forward(q, k, v, self.layer_id, self.scale, batch, kv_stored=kv_stored)  # (T, Hq, D)
        return out.reshape(t, self.num_heads * self.head_dim)

    def forward_decode_qkv(self, qkv: torch.Tensor, rope: NewTokenRope, batch: ForwardBatch) -> torch.Tensor | None:
        """A decode step from the fused projection ``qkv`` (T, (Hq + 2 Hkv) * D), q/k norm and rotary
        not yet applied, to (T, Hq*D), where the backend does it in one pass; else None."""
        out = batch.attn_backend.forward_decode_qkv(qkv, self.num_heads, rope, self.layer_id, self.scale, batch)
        return None if out is None else out.reshape(qkv.shape[0], self.num_heads * self.head_dim)
