"""Linear layers at a few rows: cuBLAS or a skinny Triton kernel, whichever is faster per shape.

Decode steps of small batches multiply a handful of rows by each weight, and the time is the
weight's read. cuBLAS's choice there is good for some shapes and poor for others (H200, Qwen3-0.6B
shape at one row: o_proj 0.4 TB/s, down_proj 1.0 TB/s), so each (weight shape, row bucket, dtype)
is timed once with cuBLAS and every candidate kernel config, the first time it is seen outside a
CUDA-graph capture (the graph warm-up runs every decode batch size eagerly first), and the faster
one serves it from then on.

The timing is what a decode step sees: each candidate is captured in a CUDA graph that calls it
back to back on enough copies of the weight to overflow the L2 cache, so every call reads its
weight from memory and no launch gap is counted (timing one launch with events measured a floor
of ~9 us for every shape and picked at random among the kernels under it).

An MLP's ``[gate | up]`` projection has a gated form (``skinny_gated_linear``): the skinny kernel
that stores ``silu(gate) * up`` itself, timed against the plain path it replaces (this module's
choice for the shape, then ``kernels.fused.silu_and_mul``); where the plain path is faster the
caller takes it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
import triton

from kernels.gemv import MAX_ROWS, GemvConfig, candidates, gemv

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, MAX_ROWS)
_CALLS = 16  # calls per timed graph
_REPLAYS = 5
_MAX_COPIES_BYTES = 256 << 20  # cap on the weight copies a timing allocates

# (N, K, row bucket, dtype, bias?, device, gated?) -> the kernel config that won, or None: cuBLAS
# (gated: the plain path and a separate activation).
_choices: dict[tuple, GemvConfig | None] = {}


def _bucket(rows: int) -> int:
    return next(b for b in ROW_BUCKETS if rows <= b)


def _key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> tuple:
    return (weight.shape[0], weight.shape[1], _bucket(x.shape[0]), x.dtype, bias is not None, x.device, gated)


def _weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight and enough copies of it that reading them in turn overflows twice the L2."""
    l2 = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 64 << 20) or (64 << 20)
    nbytes = weight.numel() * weight.element_size()
    want = min(_CALLS, math.ceil(2 * l2 / max(nbytes, 1)), max(1, _MAX_COPIES_BYTES // max(nbytes, 1)))
    return [weight] + [weight.clone() for _ in range(want - 1)]


def _per_call_ms(fn, weights: list[torch.Tensor]) -> float:
    """Median time of one ``fn(w)`` over graph replays of ``_CALLS`` calls, cycling through ``weights``."""
    fn(weights[0])  # compile / pick the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use the GPU meanwhile
        for i in range(_CALLS):
            fn(weights[i % len(weights)])
    graph.replay()
    times = []
    for _ in range(_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    del graph
    return ms[len(ms) // 2] / _CALLS


def choose(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False
) -> GemvConfig | None:
    """The faster kernel for this shape (measured on first sight), or None: cuBLAS (``gated``:
    the plain path, then the activation kernel)."""
    key = _key(x, weight, bias, gated)
    rows = key[2]
    if key in _choices:
        return _choices[key]
    probe = torch.randn(rows, weight.shape[1], dtype=x.dtype, device=x.device)
    try:
        weights = _weight_copies(weight)
    except torch.OutOfMemoryError:
        weights = [weight]  # an L2-warm timing: still ranks the kernels, only flatters them all
    if gated:
        from kernels.fused import silu_and_mul

        cublas_ms = _per_call_ms(lambda w: silu_and_mul(skinny_linear(probe, w, bias)), weights)
    else:
        cublas_ms = _per_call_ms(lambda w: F.linear(probe, w, bias), weights)
    best: tuple[float, GemvConfig | None] = (cublas_ms, None)
    for config in candidates(rows):
        try:
            ms = _per_call_ms(lambda w, c=config: gemv(probe, w, bias, c, gated), weights)
        except triton.runtime.errors.OutOfResources:  # tiles too large for this GPU's shared memory
            continue
        if ms < best[0]:
            best = (ms, config)
    del weights
    _choices[key] = best[1]
    base = "linear + silu_and_mul" if gated else "cuBLAS"
    logger.info("%slinear %d x %d at %d rows: %s (%.1f us; %s %.1f us)", "gated " if gated else "",
                weight.shape[0], weight.shape[1], rows,
                base if best[1] is None else f"skinny kernel {tuple(best[1])}", best[0] * 1e3, base, cublas_ms * 1e3)
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


def skinny_gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``silu(gate) * up`` of ``F.linear(x, weight, bias)`` (``weight`` = ``[gate | up]`` along N) in
    one skinny kernel, for ``x`` of at most ``MAX_ROWS`` rows on CUDA; None where the plain linear
    and a separate activation are faster, or the shape was first seen in a CUDA-graph capture."""
    key = _key(x, weight, bias, gated=True)
    if key in _choices:
        config = _choices[key]
    elif torch.cuda.is_current_stream_capturing():
        config = None
    else:
        config = choose(x, weight, bias, gated=True)
    if config is None or x.stride(1) != 1:
        return None
    return gemv(x, weight, bias, config, gated=True)
