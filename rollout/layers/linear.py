"""Linear layers named and shaped for tensor parallelism (``tp_size`` is 1 in this build).

Every parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``, which copies a full
checkpoint tensor (or one of the checkpoint tensors fused into it) into this rank's slice of the
parameter in place. Parameters are never replaced, so their addresses stay valid for CUDA graphs
and for weight refits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollout.errors import InvalidArgumentError
from rollout.layers.fused_ops import use_fused

ShardId = str | int | None
# Rows up to which a linear layer may take the skinny kernel (kernels.gemv.MAX_ROWS), and its dtypes.
SKINNY_ROWS = 16
_SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """``dst.copy_(src)`` after checking the shapes match; ``name`` goes into the error."""
    if tuple(dst.shape) != tuple(src.shape):
        raise InvalidArgumentError(
            f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}", field=name
        )
    dst.copy_(src)


def new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, loader) -> nn.Parameter:
    """An uninitialised, non-trainable parameter with ``loader`` as its ``weight_loader``."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def _tp_slice(loaded: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's contiguous block of ``loaded`` along ``dim`` (the whole tensor when tp_size is 1)."""
    if tp_size == 1:
        return loaded
    size = loaded.shape[dim] // tp_size
    return loaded.narrow(dim, tp_rank * size, size)


class _LinearBase(nn.Module):
    """``y = x W^T + b`` with ``W`` of shape (out_per_rank, in_per_rank)."""

    def __init__(
        self,
        in_per_rank: int,
        out_per_rank: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.weight = new_param((out_per_rank, in_per_rank), dtype, device, self.weight_loader)
        self.bias = new_param((out_per_rank,), dtype, device, self.weight_loader) if bias else None

    def _name(self, param: nn.Parameter, shard_id: ShardId = None) -> str:
        leaf = "bias" if param is self.bias else "weight"
        suffix = f"[{shard_id}]" if shard_id is not None else ""
        return f"{self.prefix}.{leaf}{suffix}" if self.prefix else f"{leaf}{suffix}"

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and 0 < x.shape[0] <= SKINNY_ROWS and x.dtype in _SKINNY_DTYPES and use_fused(x):
            from rollout.layers.skinny import skinny_linear

            return skinny_linear(x, self.weight, self.bias)  # decode of a few rows: weight-read bound
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(_LinearBase):
    """Every rank holds the whole weight (routers, small projections)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, bias, dtype, device, prefix, 0, 1)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        copy_checked(param.data, loaded, self._name(param))


class ColumnParallelLinear(_LinearBase):
    """Output features split across ranks: rank r holds rows [r*out/tp, (r+1)*out/tp) of ``W``."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        if output_size % tp_size:
            raise InvalidArgumentError(f"{output_size} not divisible by tp_size {tp_size}", field=prefix)
        super().__init__(input_size, output_size // tp_size, bias, dtype, device, prefix, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if loaded.shape[0] != param.shape[0] * self.tp_size:
            copy_checked(param.data, loaded, self._name(param))  # raises with both shapes
        copy_checked(param.data, _tp_slice(loaded, 0, self.tp_rank, self.tp_size), self._name(param))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused along the output (gate_up_proj).

    ``shard_id`` is the index of the fused projection (0 = gate, 1 = up); each rank's parameter is
    the concatenation of its slice of every projection.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(
            input_size,
            sum(output_sizes),
            bias,
            dtype=dtype,
            device=device,
            prefix=prefix,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is None:  # an already-fused tensor, e.g. a refit by our own names
            super().weight_loader(param, loaded)
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise InvalidArgumentError(f"unknown shard {shard_id!r}", field=self._name(param))
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        dst = param.data.narrow(0, offset, size)
        if loaded.shape[0] != self.output_sizes[shard_id]:
            copy_checked(dst, loaded, self._name(param, shard_id))
        copy_checked(dst, _tp_slice(loaded, 0, self.tp_rank, self.tp_size), self._name(param, shard_id))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused along the output; ``shard_id`` is "q", "k" or "v".

    Rank r holds its query heads, then its kv heads of k, then of v.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        q_out, kv_out = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.shard_ranges = {"q": (0, q_out), "k": (q_out, kv_out), "v": (q_out + kv_out, kv_out)}
        super().__init__(
            hidden_size,
            (q_out + 2 * kv_out) * tp_size,
            bias,
            dtype=dtype,
            device=device,
            prefix=prefix,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is None:
            super().weight_loader(param, loaded)
            return
        if shard_id not in self.shard_ranges:
            raise InvalidArgumentError(f"unknown shard {shard_id!r}", field=self._name(param))
        offset, size = self.shard_ranges[shard_id]
        dst = param.data.narrow(0, offset, size)
        name = self._name(param, shard_id)
        if loaded.shape[0] != size * self.tp_size:
            copy_checked(dst, loaded, name)
        copy_checked(dst, _tp_slice(loaded, 0, self.tp_rank, self.tp_size), name)


class RowParallelLinear(_LinearBase):
    """Input features split across ranks; partial outputs are summed across ranks (tp_size 1: no-op).

    The bias is not split: it is added once, after the sum.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        if input_size % tp_size:
            raise InvalidArgumentError(f"{input_size} not divisible by tp_size {tp_size}", field=prefix)
        super().__init__(input_size // tp_size, output_size, bias, dtype, device, prefix, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is self.bias or loaded.dim() != 2 or loaded.shape[1] != param.shape[1] * self.tp_size:
            copy_checked(param.data, loaded, self._name(param))
            return
        copy_checked(param.data, _tp_slice(loaded, 1, self.tp_rank, self.tp_size), self._name(param))
