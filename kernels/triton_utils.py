"""Small pieces shared by the Triton kernels: dot precision, interpreter quirks, device facts."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 ("ieee") for fp32 inputs, where tf32 would cost ~1e-3
    relative error; the tensor-core default for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(t: torch.Tensor) -> bool:
    """Whether ``tl.dot`` must take fp32 operands: CPU tensors mean the Triton interpreter, whose
    bf16 ``tl.dot`` multiplies the raw uint16 storage. On a GPU bf16 goes to the tensor cores."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def interpreting() -> bool:
    """Whether ``@triton.jit`` kernels run in Triton's CPU interpreter (``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 8 for the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32; ``UPCAST`` feeds fp32 operands (see ``upcast_dot``)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out
