"""Rotary position embedding in the Hugging Face ``rotate_half`` convention.

The cos/sin table is built once in float32 for every position up to ``max_position`` and cast to
the activations' dtype at use, which reproduces HF's rounding. Scaling types follow
``transformers.modeling_rope_utils``: "default", "linear" (positions divided by ``factor``) and
"llama3" (Llama 3.1: low frequencies divided by ``factor``, a smooth blend in between).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rollout.config import RopeConfig
from rollout.errors import InvalidArgumentError


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32, after the configured scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)  # (D/2,)
    if rope.scaling_type == "default":
        return inv_freq
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise InvalidArgumentError(f"rope scaling {rope.scaling_type!r} is not supported", field="rope_scaling")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1 | x2] -> [-x2 | x1]`` on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q and k at given positions."""

    def __init__(
        self, head_dim: int, max_position: int, rope: RopeConfig, *, device: torch.device | str
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq = rope_inv_freq(head_dim, rope)  # (D/2,)
        freqs = torch.arange(max_position, dtype=torch.int64).float()[:, None] * inv_freq[None, :]  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        # Non-persistent buffers: derived from the config, so never part of a checkpoint or a refit.
        self.register_buffer("cos_cache", emb.cos().to(device), persistent=False)
        self.register_buffer("sin_cache", emb.sin().to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, 1, D) at ``positions`` (T,) in ``dtype``: computed once a step for all layers."""
        cos = self.cos_cache[positions].to(dtype)[:, None, :]  # (T, 1, D)
        sin = self.sin_cache[positions].to(dtype)[:, None, :]  # (T, 1, D)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,); q (T, Hq, D), k (T, Hkv, D) -> rotated q, k of the same shapes."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return apply_rotary(q, k, cos, sin)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, Hq, D) and k (T, Hkv, D) by cos, sin (T, 1, D)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
