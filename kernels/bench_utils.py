"""Timing and roofline reporting shared by the kernel benchmarks (GPU only)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench

# H100 SXM limits from ANCHORS.md: device copy (read + write counted) and dense bf16 matmul.
H100_BYTES_PER_S = 3.0e12
H100_FLOP_PER_S = 790e12


def median_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (``do_bench`` flushes L2 between runs, so reads come from HBM)."""
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Achieved device-to-device copy bandwidth in bytes/s, read and write both counted."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_ms(lambda: dst.copy_(src)) * 1e-3)


def describe_device(device: torch.device) -> str:
    """GPU name and software versions, for the header of a benchmark printout."""
    props = torch.cuda.get_device_properties(device)
    return (
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}"
    )


def bandwidth_line(label: str, ms: float, nbytes: float, copy_bps: float) -> str:
    """``label: time, bytes, achieved bandwidth and its share of the spec and of the measured copy``."""
    bps = nbytes / (ms * 1e-3)
    return (
        f"{label}: {ms * 1e3:9.1f} us  {nbytes / 1e9:7.3f} GB  {bps / 1e12:5.2f} TB/s  "
        f"{100 * bps / H100_BYTES_PER_S:5.1f}% of 3.0 TB/s  {100 * bps / copy_bps:5.1f}% of measured copy"
    )


def flops_line(label: str, ms: float, flops: float) -> str:
    """``label: time, achieved TFLOP/s and its share of the bf16 dense limit``."""
    fps = flops / (ms * 1e-3)
    return f"{label}: {ms * 1e3:9.1f} us  {fps / 1e12:6.1f} TFLOP/s  {100 * fps / H100_FLOP_PER_S:5.1f}% of 790 TFLOP/s"
