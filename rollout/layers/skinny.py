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

The RMSNorm in front of a projection has one too (``skinny_norm_linear``): the skinny kernel that
normalises x (after adding the residual) as it reads it, timed against the norm kernel followed by
this module's choice for the projection.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
import triton

from kernels.gemv import MAX_ROWS, GemvConfig, InputNorm, candidates, gemv

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, MAX_ROWS)
_CALLS = 16  # calls per timed graph
_REPLAYS = 5
_MAX_COPIES_BYTES = 256 << 20  # cap on the weight copies a timing allocates

# (N, K, row bucket, dtype, bias?, device, gated?, norm) -> the kernel config that won, or None:
# cuBLAS (gated: the plain path and a separate activation; norm: the norm kernel, then the plain
# path). norm: 0 none, 1 RMSNorm of x, 2 of x + residual.
_choices: dict[tuple, GemvConfig | None] = {}


def _bucket(rows: int) -> int:
    return next(b for b in ROW_BUCKETS if rows <= b)


def _key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False, norm: int = 0) -> tuple:
    return (weight.shape[0], weight.shape[1], _bucket(x.shape[0]), x.dtype, bias is not None, x.device, gated, norm)


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
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False, norm: int = 0
) -> GemvConfig | None:
    """The faster kernel for this shape (measured on first sight), or None: cuBLAS (``gated``:
    the plain path, then the activation kernel; ``norm``: the norm kernel, then the plain path)."""
    key = _key(x, weight, bias, gated, norm)
    rows = key[2]
    if key in _choices:
        return _choices[key]
    k = weight.shape[1]
    probe = torch.randn(rows, k, dtype=x.dtype, device=x.device)
    input_norm = None
    if norm:
        res = torch.randn_like(probe) if norm == 2 else None
        input_norm = InputNorm(torch.rand(k, dtype=x.dtype, device=x.device) + 0.5, 1e-6, res,
                               torch.empty_like(probe) if res is not None else None)
    try:
        weights = _weight_copies(weight)
    except torch.OutOfMemoryError:
        weights = [weight]  # an L2-warm timing: still ranks the kernels, only flatters them all
    base_ms = _per_call_ms(lambda w: _plain(probe, w, bias, gated, input_norm), weights)
    best: tuple[float, GemvConfig | None] = (base_ms, None)
    configs = candidates(rows)
    if norm:
        # The norm is a prologue: the tile that serves the matmul without it is the one tried with
        # it (one more compiled variant per shape, not every candidate again).
        plain = _served(probe, weight, bias, gated, 0)
        configs = (plain,) if plain is not None else ()
    for config in configs:
        try:
            ms = _per_call_ms(lambda w, c=config: gemv(probe, w, bias, c, gated, input_norm), weights)
        except triton.runtime.errors.OutOfResources:  # tiles too large for this GPU's shared memory
            continue
        if ms < best[0]:
            best = (ms, config)
    del weights
    _choices[key] = best[1]
    base = ("rmsnorm + " if norm else "") + ("linear + silu_and_mul" if gated else "linear" if norm else "cuBLAS")
    logger.info("%s%slinear %d x %d at %d rows: %s (%.1f us; %s %.1f us)", "normed " if norm else "",
                "gated " if gated else "", weight.shape[0], k, rows,
                base if best[1] is None else f"skinny kernel {tuple(best[1])}", best[0] * 1e3, base, base_ms * 1e3)
    return best[1]


def _plain(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool, norm: InputNorm | None
) -> torch.Tensor:
    """What the skinny form ``(gated, norm)`` replaces, the baseline it is timed against: cuBLAS for
    the plain form; ``skinny_linear`` and the activation kernel for the gated one; the norm kernel
    and then the faster of those (gated: the gated kernel where it serves) for a normed one. It
    only asks for other forms' choices, never its own."""
    from kernels.fused import rmsnorm, silu_and_mul

    if norm is None:
        return silu_and_mul(skinny_linear(x, weight, bias)) if gated else F.linear(x, weight, bias)
    x = rmsnorm(x, norm.weight, norm.eps) if norm.residual is None else rmsnorm(x, norm.weight, norm.eps,
                                                                                 norm.residual)[0]
    if not gated:
        return skinny_linear(x, weight, bias)
    out = skinny_gated_linear(x, weight, bias)
    return out if out is not None else silu_and_mul(skinny_linear(x, weight, bias))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for ``x`` of at most ``MAX_ROWS`` rows on CUDA, by the faster kernel for the shape.

    During a CUDA-graph capture nothing is measured: a shape not timed yet takes cuBLAS."""
    config = _served(x, weight, bias, False, 0)
    if config is None or x.stride(1) != 1:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, config)


def _served(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool, norm: int
) -> GemvConfig | None:
    """The config chosen for this form and shape; during a CUDA-graph capture nothing is measured,
    so a shape not timed yet there gets None."""
    key = _key(x, weight, bias, gated, norm)
    if key in _choices:
        return _choices[key]
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return choose(x, weight, bias, gated, norm)


def skinny_gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``silu(gate) * up`` of ``F.linear(x, weight, bias)`` (``weight`` = ``[gate | up]`` along N) in
    one skinny kernel, for ``x`` of at most ``MAX_ROWS`` rows on CUDA; None where the plain linear
    and a separate activation are faster, or the shape was first seen in a CUDA-graph capture."""
    config = _served(x, weight, bias, True, 0)
    if config is None or x.stride(1) != 1:
        return None
    return gemv(x, weight, bias, config, gated=True)


def skinny_norm_linear(
    x: torch.Tensor,  # (M, K), M <= MAX_ROWS
    residual: torch.Tensor | None,  # (M, K)
    norm_weight: torch.Tensor,  # (K,)
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(linear(rmsnorm(x + residual)), x + residual)`` (``gated``: ``silu(gate) * up`` of the
    linear, as ``skinny_gated_linear``), the norm done by the skinny kernel as it reads x; with no
    residual the second item is ``x``. None where the norm kernel followed by the plain path is
    faster, or the shape was first seen in a CUDA-graph capture."""
    config = _served(x, weight, bias, gated, 2 if residual is not None else 1)
    if config is None or x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        return None
    summed = torch.empty_like(x) if residual is not None else None
    out = gemv(x, weight, bias, config, gated, InputNorm(norm_weight, eps, residual, summed))
    return out, summed if summed is not None else x
