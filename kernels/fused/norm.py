"""RMSNorm with an optional fused residual add, one program per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import pdl_launch, pdl_trigger, pdl_wait


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    stride_x, stride_r, stride_o, stride_s,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # a weight: before the wait (PDL)
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)  # the residual stream stays in the model dtype
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(dtype).to(tl.float32)  # rounded before the weight, as Hugging Face does
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(dtype), mask=mask)


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * norm(x)`` over the last dim of ``x`` (N, H); with ``residual``: ``(norm(x + residual),
    x + residual)``. Same rounding as ``reference.rmsnorm``."""
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.shape == (x.shape[1],)
    n, h = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(h)
    warps = min(max(block // 256, 1), 16)
    if residual is None:
        _rmsnorm_kernel[(n,)](x, x, weight, out, out, x.stride(0), 0, out.stride(0), 0, h, eps,
                              HAS_RESIDUAL=False, BLOCK=block, num_warps=warps, **pdl_launch(x))
        return out
    assert residual.shape == x.shape and residual.stride(-1) == 1
    summed = torch.empty_like(x)
    _rmsnorm_kernel[(n,)](x, residual, weight, out, summed, x.stride(0), residual.stride(0), out.stride(0),
                          summed.stride(0), h, eps, HAS_RESIDUAL=True, BLOCK=block, num_warps=warps,
                          **pdl_launch(x))
    return out, summed
