"""``silu(gate) * up`` over a ``[gate | up]`` row layout."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import pdl_launch, pdl_trigger, pdl_wait

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)  # silu rounds to the model dtype first
    tl.store(out_ptr + row * stride_o + offs, (act * u).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(N, 2I) -> (N, I): ``silu(x[:, :I]) * x[:, I:]``, rounded like ``reference.silu_and_mul``."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0
    n, half = x.shape[0], x.shape[1] // 2
    out = torch.empty((n, half), dtype=x.dtype, device=x.device)
    if n:
        _silu_and_mul_kernel[(n, triton.cdiv(half, _BLOCK))](x, out, x.stride(0), out.stride(0), half,
                                                             BLOCK=_BLOCK, num_warps=4, **pdl_launch(x))
    return out
