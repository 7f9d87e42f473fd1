"""Opening the shared buffers of a colocated update (CUDA IPC handles, shared-memory segments)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rollout.errors import InvalidArgumentError
from weight_sync.buckets import BucketLayout
from weight_sync.sources import CudaIpcSource, Source


def check_sources(sources: Sequence[Source], layouts: Sequence[BucketLayout], device: torch.device) -> None:
    """One source per bucket, large enough for it, of a kind this engine's device can read."""
    if len(sources) != len(layouts):
        raise InvalidArgumentError(f"{len(sources)} sources for {len(layouts)} buckets", field="sources")
    for i, (src, layout) in enumerate(zip(sources, layouts)):
        if src.size < layout.nbytes:
            raise InvalidArgumentError(
                f"source {i} holds {src.size} bytes but its tensors need {layout.nbytes}", field="sources"
            )
        if isinstance(src, CudaIpcSource) and device.type != "cuda":
            raise InvalidArgumentError("CUDA IPC sources need an engine on a CUDA device", field="sources")


class OpenedSources:
    """Context manager: a uint8 tensor per bucket over its source; everything is unmapped on exit.

    Each distinct IPC handle or segment is opened once (several buckets may share one allocation;
    CUDA refuses to open a handle twice in one process).
    """

    def __init__(self, sources: Sequence[Source], layouts: Sequence[BucketLayout], device: torch.device) -> None:
        self._sources = list(sources)
        self._layouts = list(layouts)
        self._device = device
        self._opened: dict[Any, Any] = {}

    def __enter__(self) -> list[torch.Tensor]:
        try:
            pairs = zip(self._sources, self._layouts)
            return [self._open(src).view(src.offset, layout.nbytes) for src, layout in pairs]
        except BaseException:
            self._close()
            raise

    def _open(self, src: Source) -> Any:
        key = (type(src).__name__, src.handle if isinstance(src, CudaIpcSource) else src.name)
        if key not in self._opened:
            if isinstance(src, CudaIpcSource):
                from weight_sync.cuda_ipc import ImportedAllocation

                self._opened[key] = ImportedAllocation(src.handle, self._device)
            else:
                from weight_sync.shm import ImportedBuffer

                self._opened[key] = ImportedBuffer(src.name)
        return self._opened[key]

    def _close(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # every copy out of the shared bytes is done
        for opened in self._opened.values():
            opened.close()
        self._opened.clear()

    def __exit__(self, *exc: Any) -> None:
        self._close()
