"""RMSNorm, computed in float32 like Hugging Face's, with a fused residual-add variant."""

from __future__ import annotations

import torch
from torch import nn

from rollout.layers.fused_ops import use_fused
from rollout.layers.linear import ShardId, copy_checked, new_param


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension."""

    batch_invariant = False  # CPU: on fixed row tiles (see rollout.layers.batch_invariant)

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.eps = eps
        self.weight = new_param((hidden_size,), dtype, device, self.weight_loader)
        with torch.no_grad():
            self.weight.fill_(1.0)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        copy_checked(param.data, loaded, f"{self.prefix}.weight" if self.prefix else "weight")

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight multiply: the same rounding points as HF in bf16/fp16.
        return self.weight * xf.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: the normed ``x``. With it: ``(norm(x + residual), x + residual)``."""
        if x.dim() == 2 and use_fused(x) and x.stride(-1) == 1:
            from kernels.fused import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual.contiguous() if residual is not None else None)
        norm = self._norm
        if self.batch_invariant:
            from rollout.layers.batch_invariant import on_row_tiles

            def norm(rows: torch.Tensor) -> torch.Tensor:
                return on_row_tiles(self._norm, rows)
        if residual is None:
            return norm(x)
        summed = x + residual  # in the model dtype, as HF adds its residual
        return norm(summed), summed
