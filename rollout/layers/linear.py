"""Linear layers split across the ranks of a ``TPGroup`` (the single-rank group by default).

Every parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``, which copies this
rank's slice of a full checkpoint tensor (or of one of the checkpoint tensors fused into it) into
the parameter in place. Parameters are never replaced, so their addresses stay valid for CUDA graphs
and for weight refits. Column-parallel layers need no communication; the row-parallel layer sums
its partial outputs over the group.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from rollout.distributed.tp import SINGLE, TPGroup, kv_heads_per_rank
from rollout.errors import InvalidArgumentError
from rollout.layers.fused_ops import use_fused

ShardId = str | int | None
# Rows up to which a linear layer may take the skinny kernel (kernels.gemv.MAX_ROWS), and its dtypes.
SKINNY_ROWS = 16
_SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def normed_matmul_enabled() -> bool:
    """Whether a column-parallel layer may take the RMSNorm in front of it into its skinny matmul
    (``ROLLOUT_NORM_MATMUL=0``: never, to compare against the separate norm kernel)."""
    return os.environ.get("ROLLOUT_NORM_MATMUL", "1").strip().lower() not in ("0", "false", "off", "no")


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


def load_slice(dst: torch.Tensor, loaded: torch.Tensor, dim: int, full: int, start: int, name: str) -> None:
    """Copy rows ``[start, start + dst.shape[dim])`` along ``dim`` of ``loaded`` into ``dst``.

    ``loaded`` is the full tensor, ``full`` long along ``dim``; the error names the full shape
    expected. When ``dst`` is the whole of it (one rank) the tensor is copied as it is.
    """
    if loaded.dim() != dst.dim() or loaded.shape[dim] != full:
        expected = tuple(full if d == dim else n for d, n in enumerate(dst.shape))
        raise InvalidArgumentError(f"shape mismatch: expected {expected}, got {tuple(loaded.shape)}", field=name)
    copy_checked(dst, loaded if full == dst.shape[dim] else loaded.narrow(dim, start, dst.shape[dim]), name)


def _check_rows(param: torch.Tensor, loaded: torch.Tensor, full: int, name: str) -> None:
    """Raise unless ``loaded`` is a fused tensor of ``full`` rows shaped like ``param`` otherwise."""
    if loaded.dim() != param.dim() or loaded.shape[0] != full or loaded.shape[1:] != param.shape[1:]:
        raise InvalidArgumentError(
            f"shape mismatch: expected {(full, *param.shape[1:])}, got {tuple(loaded.shape)}", field=name
        )


class _LinearBase(nn.Module):
    """``y = x W^T + b`` with ``W`` of shape (out_per_rank, in_per_rank)."""

    batch_invariant = False  # rows computed independently of the batch (set_batch_invariant)

    def __init__(
        self,
        in_per_rank: int,
        out_per_rank: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.tp = tp
        self.tp_rank = tp.rank
        self.tp_size = tp.size
        self.weight = new_param((out_per_rank, in_per_rank), dtype, device, self.weight_loader)
        self.bias = new_param((out_per_rank,), dtype, device, self.weight_loader) if bias else None

    def _name(self, param: nn.Parameter, shard_id: ShardId = None) -> str:
        leaf = "bias" if param is self.bias else "weight"
        suffix = f"[{shard_id}]" if shard_id is not None else ""
        return f"{self.prefix}.{leaf}{suffix}" if self.prefix else f"{leaf}{suffix}"

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        raise NotImplementedError

    def _skinny(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a few rows that the skinny kernels may take (decode of a small batch)."""
        return x.dim() == 2 and 0 < x.shape[0] <= SKINNY_ROWS and x.dtype in _SKINNY_DTYPES and use_fused(x)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.batch_invariant:
            from rollout.layers.batch_invariant import invariant_linear

            return invariant_linear(x, self.weight, bias)
        if self._skinny(x):
            from rollout.layers.skinny import skinny_linear

            return skinny_linear(x, self.weight, bias)  # decode of a few rows: weight-read bound
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


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
        super().__init__(input_size, output_size, bias, dtype, device, prefix, SINGLE)

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
        tp: TPGroup = SINGLE,
    ) -> None:
        if output_size % tp.size:
            raise InvalidArgumentError(f"{output_size} not divisible by tp_size {tp.size}", field=prefix)
        super().__init__(input_size, output_size // tp.size, bias, dtype, device, prefix, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        rows = param.shape[0]
        load_slice(param.data, loaded, 0, rows * self.tp_size, rows * self.tp_rank, self._name(param))

    def forward_normed(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(self(rmsnorm(x + residual)), x + residual)`` (no residual: ``x`` second) by one skinny
        kernel that norms x as it reads it (decode of a few rows), or None: the caller applies the
        norm and then ``forward``, as it must off that path or where that is faster for the shape.
        The input of a column-parallel layer is every rank's whole row, so the norm can be here."""
        return self._normed(x, residual, norm_weight, eps, gated=False)

    def _normed(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, gated: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.batch_invariant or not self._skinny(x) or not normed_matmul_enabled():
            return None
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
            return None
        from rollout.layers.skinny import skinny_norm_linear

        return skinny_norm_linear(x, residual, norm_weight, eps, self.weight, self.bias, gated)


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
        tp: TPGroup = SINGLE,
    ) -> None:
        if any(size % tp.size for size in output_sizes):  # each rank takes a slice of every projection
            raise InvalidArgumentError(f"{output_sizes} not all divisible by tp_size {tp.size}", field=prefix)
        self.output_sizes = list(output_sizes)
        super().__init__(
            input_size,
            sum(output_sizes),
            bias,
            dtype=dtype,
            device=device,
            prefix=prefix,
            tp=tp,
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is None:  # an already-fused tensor, e.g. a refit by our own names
            if self.tp_size == 1:
                super().weight_loader(param, loaded)
                return
            # Each rank's rows are a slice of every projection, not one block of the fused tensor.
            _check_rows(param, loaded, sum(self.output_sizes), self._name(param))
            for i, part in enumerate(loaded.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise InvalidArgumentError(f"unknown shard {shard_id!r}", field=self._name(param))
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        dst = param.data.narrow(0, offset, size)
        load_slice(dst, loaded, 0, self.output_sizes[shard_id], size * self.tp_rank, self._name(param, shard_id))

    def _gated(self) -> bool:
        return len(self.output_sizes) == 2 and self.output_sizes[0] == self.output_sizes[1]

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of this ``[gate | up]`` projection of ``x`` by one skinny kernel that
        stores only the product (decode of a few rows), or None: the caller applies ``forward`` and
        its activation, as it must off that path or where that is faster for the shape."""
        if self.batch_invariant or not self._gated() or not self._skinny(x):
            return None
        from rollout.layers.skinny import skinny_gated_linear

        return skinny_gated_linear(x, self.weight, self.bias)

    def silu_and_mul_normed(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``silu_and_mul`` of ``rmsnorm(x + residual)``, and ``x + residual``, by one skinny kernel
        (see ``forward_normed``), or None: the caller norms and then takes the plain path."""
        if not self._gated():
            return None
        return self._normed(x, residual, norm_weight, eps, gated=True)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused along the output; ``shard_id`` is "q", "k" or "v".

    Rank r holds its query heads, then its kv heads of k, then of v. With fewer kv heads than ranks
    each kv head is replicated: the ranks whose query heads share a kv head all hold that head::

        Hq=4, Hkv=1, tp=2:   rank 0: q heads 0,1  kv head 0     rank 1: q heads 2,3  kv head 0
        Hq=8, Hkv=2, tp=4:   ranks 0,1 hold kv head 0; ranks 2,3 hold kv head 1
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
        tp: TPGroup = SINGLE,
    ) -> None:
        if num_heads % tp.size:
            raise InvalidArgumentError(f"{num_heads} heads not divisible by tp_size {tp.size}", field=prefix)
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp.size)
        # This rank's first kv head: its own block, or the replicated head of its group of ranks.
        kv_start = tp.rank * self.num_kv_heads if num_kv_heads >= tp.size else tp.rank // (tp.size // num_kv_heads)
        q_out, kv_out = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.shard_ranges = {"q": (0, q_out), "k": (q_out, kv_out), "v": (q_out + kv_out, kv_out)}
        # shard -> (rows of the full checkpoint tensor, first row this rank takes from it)
        self.full_rows = {
            "q": (num_heads * head_dim, tp.rank * q_out),
            "k": (num_kv_heads * head_dim, kv_start * head_dim),
            "v": (num_kv_heads * head_dim, kv_start * head_dim),
        }
        super().__init__(
            hidden_size,
            (q_out + 2 * kv_out) * tp.size,
            bias,
            dtype=dtype,
            device=device,
            prefix=prefix,
            tp=tp,
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is None:
            if self.tp_size == 1:
                super().weight_loader(param, loaded)
                return
            # A fused [q; k; v] tensor of the whole model: split it and take this rank's heads of each.
            sizes = [self.full_rows[s][0] for s in ("q", "k", "v")]
            _check_rows(param, loaded, sum(sizes), self._name(param))
            for part_id, part in zip(("q", "k", "v"), loaded.split(sizes, dim=0), strict=True):
                self.weight_loader(param, part, part_id)
            return
        if shard_id not in self.shard_ranges:
            raise InvalidArgumentError(f"unknown shard {shard_id!r}", field=self._name(param))
        offset, size = self.shard_ranges[shard_id]
        full, start = self.full_rows[shard_id]
        load_slice(param.data.narrow(0, offset, size), loaded, 0, full, start, self._name(param, shard_id))


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
        tp: TPGroup = SINGLE,
    ) -> None:
        if input_size % tp.size:
            raise InvalidArgumentError(f"{input_size} not divisible by tp_size {tp.size}", field=prefix)
        super().__init__(input_size // tp.size, output_size, bias, dtype, device, prefix, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is self.bias:
            copy_checked(param.data, loaded, self._name(param))
            return
        cols = param.shape[1]
        load_slice(param.data, loaded, 1, cols * self.tp_size, cols * self.tp_rank, self._name(param))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        out = self.tp.all_reduce(self._matmul(x, None))  # (T, out): the sum of every rank's part
        return out if self.bias is None else out + self.bias
