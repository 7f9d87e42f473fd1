"""Linear layers at a few rows: cuBLAS or the skinny Triton kernel, whichever is faster per shape.

Decode steps of small batches multiply a handful of rows by each weight, and the time is the
weight's read. cuBLAS's choice there is good for some shapes and poor for others (H100, Llama-8B
shape at one row: gate/up 2.9 TB/s, o_proj 1.6 TB/s), so each (weight shape, row bucket, dtype)
is timed once with both, the first time it is seen outside a CUDA-graph capture (the graph
warm-up runs every decode batch size eagerly first), and the faster one serves it from then on.
Each timing starts from a cold L2, as a weight read in a real step does.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kernels.gemv import CONFIGS, MAX_ROWS, GemvConfig, gemv

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, MAX_ROWS)
_REPS = 8
_FLUSH_BYTES = 96 << 20  # more than the L2 of any current GPU (H100: 50 MB)

# (N, K, row bucket, dtype, bias?, device) -> the kernel config that won, or None for cuBLAS.
_choices: dict[tuple, GemvConfig | None] = {}


def _bucket(rows: int) -> int:
    return next(b for b in ROW_BUCKETS if rows <= b)


def _key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    return (weight.shape[0], weight.shape[1], _bucket(x.shape[0]), x.dtype, bias is not None, x.device)


def _median_ms(fn, flush: torch.Tensor) -> float:
    times = []
    for _ in range(_REPS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return ms[len(ms) // 2]


def choose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> GemvConfig | None:
    """The faster kernel for this shape (measured on first sight), or None: cuBLAS."""
    key = _key(x, weight, bias)
    rows = key[2]
    if key in _choices:
        return _choices[key]
    probe = torch.randn(rows, weight.shape[1], dtype=x.dtype, device=x.device)
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=x.device)
    cublas_ms = _median_ms(lambda: F.linear(probe, weight, bias), flush)
    best: tuple[float, GemvConfig | None] = (cublas_ms, None)
    for config in CONFIGS:
        ms = _median_ms(lambda c=config: gemv(probe, weight, bias, c), flush)
        if ms < best[0]:
            best = (ms, config)
    del flush
    _choices[key] = best[1]
    logger.info("linear %d x %d at %d rows: %s (%.1f us; cuBLAS %.1f us)", weight.shape[0], weight.shape[1], rows,
                "cuBLAS" if best[1] is None else f"skinny kernel {tuple(best[1])}", best[0] * 1e3, cublas_ms * 1e3)
    return best[1]


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for ``x`` of at most ``MAX_ROWS`` rows on CUDA, by the faster kernel for the shape.

    During a CUDA-graph capture nothing is measured: a shape not timed yet takes cuBLAS."""
    key = _key(x, weight, bias)
    if key in _choices:
        config = _choices[key]
    elif torch.cuda.is_current_stream_capturing():
        config = None
    else:
        config = choose(x, weight, bias)
    if config is None or x.stride(1) != 1:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, config)
