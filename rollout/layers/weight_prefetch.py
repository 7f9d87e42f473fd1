"""A decoder layer's later weights brought into L2 while its attention runs (small decode batches).

At a few rows a decode step is a chain of matmuls that each read a few MB of weight, and
attention between them, which reads little. ``WeightPrefetch.start`` issues L2 prefetches of the
weights the layer reads after attention (o_proj, gate_up, down) from a side stream, forked from the
current stream after the qkv projection; ``join`` rejoins it at the end of the layer. Inside a
CUDA-graph capture the fork and join are graph edges, so the prefetch kernel runs beside the
attention kernel and adds nothing to the chain. Values do not change: only the cache is warmed.

``ROLLOUT_L2_PREFETCH``: ``1`` on, ``0`` off (default). On an H200 it shortened batch-1 decode at
short contexts (Qwen3-0.6B shape, 128 + 512 tokens: 0.926 -> 0.910 ms/token) but lengthened a GRPO
rollout step (12.75 -> 13.27 s): with thousands of tokens of context, attention at 2-16 rows reads
more KV than the layer has weights, and the prefetch competes with it for bandwidth. A CUDA graph
is captured per batch size, not per context length, so the choice cannot follow the context.
"""

from __future__ import annotations

import os

import torch

from rollout.layers.linear import SKINNY_ROWS

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def enabled() -> bool:
    """Whether decoder layers prefetch their weights at small decode batches."""
    return os.environ.get("ROLLOUT_L2_PREFETCH", "0").strip().lower() in ("1", "true", "on", "yes")


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class WeightPrefetch:
    """Prefetches ``tensors`` (in order, up to half the device's L2) when a step has few rows."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.on = enabled()  # read once: start() runs in every eager forward of the layer
        self._side: torch.cuda.Stream | None = None

    def start(self, x: torch.Tensor) -> None:
        """Fork a side stream from the current one and issue the prefetches there, for a step of
        ``x.shape[0]`` rows: only at up to ``SKINNY_ROWS`` rows on a device that can prefetch."""
        if not (self.on and 0 < x.shape[0] <= SKINNY_ROWS):
            return
        from kernels.l2_prefetch import available, prefetch_l2

        if not available(x):
            return
        l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 0)
        if l2 <= 0:
            return
        side = _side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            prefetch_l2(self.tensors, max_bytes=l2 // 2)
        self._side = side

    def join(self) -> None:
        """Make the current stream wait for the side stream (a capture must rejoin every fork)."""
        if self._side is not None:
            torch.cuda.current_stream(self._side.device).wait_stream(self._side)
            self._side = None
