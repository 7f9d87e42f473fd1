"""Batch-invariant numerics (``deterministic=True``): a row's result never depends on the other rows.

A request's logprobs drift with the batch because kernels choose their reduction order by problem
size. Where that happened, and what the mode does (tests: ``tests/unit/test_deterministic.py``,
``tests/gpu/test_deterministic_gpu.py``):

- matmuls (every linear layer, the LM head): cuBLAS and MKL pick kernels by row count; on CPU one
  row already sums differently from two. GPU: ``kernels.invariant_matmul``, one tile configuration
  for every row count and no split-K. CPU: ``F.linear`` on tiles of exactly ``TILE_ROWS`` rows,
  zero padded, so MKL always runs the same kernel; a row's result does not depend on its place in
  the tile or on the tile's other rows (``test_cpu_row_tiles_are_position_free`` checks that).
- the skinny GEMV path, taken below 17 rows: not used.
- CPU activations: ATen vectorises in chunks whose edges follow the tensor's size, and a chunk's
  tail takes the scalar ``exp``; ``silu`` and RMSNorm also run on fixed row tiles.
- attention: the backends take ``deterministic`` (torch: each query over exactly its visible keys;
  triton: every step, decode included, through the extend kernel with one tile shape, KV tiles
  aligned at position 0 and no KV splits), so chunked prefill, a prefix hit and decode agree.
- sampling: each row takes the fused kernel or the torch code by its own parameters, and the
  kernel's chunking of the vocabulary is fixed (``Sampler(deterministic=True)``).
- CUDA-graph padding rows are rows like any other: with the above they change nothing.

On GPU the fused RMSNorm, rotary and activation kernels already work one row at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TILE_ROWS = 16  # rows of every CPU matmul in this mode


def on_row_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` computed on tiles of exactly ``TILE_ROWS`` rows of ``x`` (T, ...), the last padded
    with zeros; ``fn`` must treat rows independently."""
    t = x.shape[0]
    x = x.contiguous()
    pad = -t % TILE_ROWS
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])  # (T + pad, ...)
    return torch.cat([fn(tile) for tile in x.split(TILE_ROWS)])[:t]


def invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fp32: bool = False
) -> torch.Tensor:
    """``x @ weight.T + bias`` whose rows do not depend on the number or content of the others.

    ``fp32``: float32 inputs and output whatever the weight's dtype (the float32 LM head)."""
    if x.is_cuda:
        from kernels.invariant_matmul import invariant_matmul

        return invariant_matmul(x.float() if fp32 else x, weight, bias)
    if fp32:
        weight, bias, x = weight.float(), None if bias is None else bias.float(), x.float()
    return on_row_tiles(lambda tile: F.linear(tile, weight, bias), x)


def set_numerics(model: nn.Module, *, batch_invariant: bool, fp32_lm_head: bool) -> nn.Module:
    """Put the layers of ``model`` in these modes (like ``model.eval()``: modes of the layers, set
    once before the first forward): their batch-invariant paths, and a float32 LM head."""
    for module in model.modules():
        if hasattr(module, "batch_invariant"):
            module.batch_invariant = batch_invariant
        if hasattr(module, "fp32"):
            module.fp32 = fp32_lm_head
    return model
