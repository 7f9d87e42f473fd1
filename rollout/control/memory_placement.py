"""EngineMemory: the runner's weights and KV pool live in releasable, tagged regions.

Weights: after the model is built and loaded, every parameter's data moves once into a single arena of
the ``weights`` region; later writes (weight updates) are in-place copies, so addresses never change.
Non-parameter buffers (rotary tables) stay where they are: they are derived from the config, and no
weight update would restore them after a release without backup.

KV: the K and V buffers of every layer are carved from one arena of the ``kv_cache`` region.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from memory_saver import ALIGNMENT, Arena, MemorySaver, MemoryStateError, align_up
from rollout.config import MEMORY_TAGS


class EngineMemory:
    """The engine's ``MemorySaver`` plus the two placements the runner needs."""

    def __init__(self, device: torch.device | str, backup_tags: Iterable[str] = ()) -> None:
        self.saver = MemorySaver(device, MEMORY_TAGS, backup_tags=backup_tags)
        self.device = self.saver.device
        self.weights_arena: Arena | None = None  # the one arena every parameter lives in

    def shadow_weights_arena(self) -> Arena:
        """A new arena the size of the weights arena, for a zero-pause update to fill and switch to
        (``Arena.adopt``); the caller closes it. Raises ``CudaDriverError`` when the device has no room."""
        if self.weights_arena is None:
            raise MemoryStateError("the model has no weights arena")
        return self.saver.region("weights").shadow(self.weights_arena)

    def place_weights(self, model: nn.Module) -> int:
        """Move every parameter of ``model`` into one new ``weights`` arena; returns the arena's bytes.

        Call once, after loading and before anything (a CUDA graph, a weight-sync bucket) captures a
        parameter's address. Tied parameters are one ``Parameter`` object and move once.
        """
        params = [p for _, p in model.named_parameters()]
        if not params:
            return 0
        total = sum(align_up(p.numel() * p.element_size(), ALIGNMENT) for p in params)
        arena = self.saver.region("weights").allocate(total)
        self.weights_arena = arena
        with torch.no_grad():
            for p in params:
                dst = arena.take(p.shape, p.dtype)
                dst.copy_(p.data)
                p.data = dst
        if self.device.type == "cuda":
            # The old copies go back to the driver now, before the KV pool is sized from free memory.
            torch.cuda.empty_cache()
        return arena.nbytes

    def allocate_kv(self, shape: Sequence[int], dtype: torch.dtype, count: int) -> list[torch.Tensor]:
        """``count`` zero-filled tensors of ``shape`` from one new ``kv_cache`` arena (``KVPool``'s hook)."""
        each = align_up(int(torch.Size(shape).numel()) * dtype.itemsize, ALIGNMENT)
        arena = self.saver.region("kv_cache").allocate(max(each * count, 1))
        return [arena.take(shape, dtype) for _ in range(count)]
