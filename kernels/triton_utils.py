"""Small pieces shared by the Triton kernels: dot precision, interpreter quirks, device facts."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control (Hopper and later); absent from older Triton releases
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the Triton release
    gdc_launch_dependents = gdc_wait = None


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


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 8 for the CPU interpreter). Cached: the
    decode launcher asks once per layer to pick its tiles."""
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


@functools.cache
def _pdl_device(index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(index)
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover
        return False
    return major >= 9 and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_PDL_MODES = {"linear": ("linear",), "decode": ("linear", "decode"), "all": ("linear", "decode", "attention")}


def pdl_kinds() -> tuple[str, ...]:
    """The kinds of kernel ROLLOUT_PDL launches with PDL where the device takes it (``pdl_enabled``);
    an unknown value means the default."""
    mode = os.environ.get("ROLLOUT_PDL", "decode").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return ()
    return _PDL_MODES.get(mode, _PDL_MODES["decode"])


def pdl_enabled(t: torch.Tensor, kind: str = "linear") -> bool:
    """Whether kernels of ``kind`` on ``t``'s device launch with programmatic dependent launch (PDL).

    With PDL a kernel may start while the one before it on the stream is still running: it does
    the work that needs nothing from that kernel (loading weights, or the KV cache of earlier
    steps), then waits in ``pdl_wait`` for it to finish and its writes to show. Hopper and later,
    a Triton that knows ``launch_pdl``. Kinds: ``linear`` (norm, activation, skinny matmuls),
    ``decode`` (decode attention, which loads each piece's first KV tile before its wait) and
    ``attention`` (q/k norm and rotary). ROLLOUT_PDL: ``decode`` (default) for the first two,
    ``linear`` for the first, ``all`` for every kind, ``0`` for none."""
    if t.device.type != "cuda" or gdc_wait is None or interpreting() or kind not in pdl_kinds():
        return False
    return _pdl_device(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_launch(t: torch.Tensor, kind: str = "linear") -> dict:
    """Launch arguments of a kernel with a ``PDL`` constexpr for a step on ``t``'s device:
    ``PDL=True`` and ``launch_pdl=True`` where ``pdl_enabled(t, kind)``, else ``PDL=False``."""
    return dict(PDL=True, launch_pdl=True) if pdl_enabled(t, kind) else dict(PDL=False)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the kernels before this one on the stream (a PDL launch); nothing without PDL.

    Before this a PDL kernel writes nothing and reads only what was written before the stream's
    last launch without PDL: weights, the step's inputs (copied or computed by torch before the
    step's first kernels) and the KV cache of earlier steps. Kernels launched with PDL may all be
    running at once back to that launch, since each lets the next start before it waits itself;
    so every PDL kernel must have a program that reaches this wait."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel on the stream start early if it is a PDL launch (it waits in ``pdl_wait``)."""
    if PDL:
        gdc_launch_dependents()
