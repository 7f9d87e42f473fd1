"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollout.layers.fused_ops import use_fused


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for an input laid out as ``[gate | up]`` on the last dimension."""

    batch_invariant = False  # CPU: on fixed row tiles (see rollout.layers.batch_invariant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and use_fused(x) and x.stride(-1) == 1:
            from kernels.fused import silu_and_mul

            return silu_and_mul(x)
        if self.batch_invariant and x.dim() >= 2:
            from rollout.layers.batch_invariant import on_row_tiles

            return on_row_tiles(self._torch, x)
        return self._torch(x)

    @staticmethod
    def _torch(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return F.silu(x[..., :half]) * x[..., half:]  # (..., half)
