"""Colocated updates: the engine reads the trainer's bytes directly (CUDA IPC, or shared memory on CPU).

One ``update_weights_from_tensor`` call per engine carries the whole update (so it is atomic with
respect to the engine's forward passes); the trainer keeps the shared memory alive until every
engine has answered.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from rollout.errors import InvalidArgumentError
from weight_sync.buckets import (
    ALIGN,
    DEFAULT_BUCKET_BYTES,
    BucketLayout,
    TensorSpec,
    bucket_views,
    dtype_name,
    layouts_to_args,
    pack_bucket,
    plan_buckets,
)
from weight_sync.sender import check_version, named_tensor_list, one_version, root_cause_first
from weight_sync.shm import ExportedBuffer
from weight_sync.sources import CudaIpcSource, SharedMemorySource, source_to_dict
from weight_sync.targets import as_target


def _call_all(targets: Iterable[Any], args: dict[str, Any]) -> Any:
    """``update_weights_from_tensor(**args)`` on every target concurrently; the first result."""
    engines = [as_target(t) for t in targets]
    if not engines:
        raise InvalidArgumentError("at least one engine is needed", field="targets")
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="weight-ipc") as pool:
        futures = [pool.submit(e.update_weights_from_tensor, **args) for e in engines]
        concurrent.futures.wait(futures)
    errors = root_cause_first([f.exception() for f in futures if f.exception() is not None])
    if errors:
        raise errors[0]
    return one_version([f.result() for f in futures])


def push_tensors_shm(
    targets: Iterable[Any],
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    swap: bool = False,
    more: bool = False,
) -> Any:
    """Pack the tensors into shared-memory buckets and have every engine load them; returns the new version.

    ``swap``: the engines load into a shadow copy while generating and switch between two steps (the
    result is then a ``SwapResult``). ``more``: further calls carry more of this update, with the
    same version; the engines generate again after the last one (``Engine.update_weights_from_tensor``)."""
    check_version(version)
    items = named_tensor_list(named_tensors)
    layouts = plan_buckets(((n, t.dtype, t.shape) for n, t in items), bucket_bytes)
    buffers: list[ExportedBuffer] = []
    try:
        start = 0
        for layout in layouts:
            buf = ExportedBuffer(layout.nbytes)
            buffers.append(buf)
            pack_bucket(layout, [t for _, t in items[start:start + len(layout.tensors)]], out=buf.tensor)
            start += len(layout.tensors)
        sources = [source_to_dict(SharedMemorySource(b.name, 0, b.nbytes)) for b in buffers]
        return _call_all(targets, {**layouts_to_args(layouts), "sources": sources, "version": version,
                                   **({"swap": True} if swap else {}), **({"more": True} if more else {})})
    finally:
        for buf in buffers:
            buf.close()


def _shared_in_place(
    items: Sequence[tuple[str, torch.Tensor]],
) -> tuple[list[BucketLayout], list[CudaIpcSource]]:
    """One bucket per CUDA allocation holding some of ``items``: the tensors are shared where they are.

    Grouping by allocation also means each handle is sent once: CUDA opens a handle only once per
    process.
    """
    from weight_sync.cuda_ipc import allocation_of, export_range

    by_alloc: dict[tuple[torch.device, int], list[tuple[str, torch.Tensor]]] = {}
    for name, t in items:
        base, _ = allocation_of(t.data_ptr(), t.device)
        by_alloc.setdefault((t.device, base), []).append((name, t))
    layouts, sources = [], []
    for (device, _), members in by_alloc.items():
        # Aligned down (cudaMalloc bases are aligned further), so each offset is a multiple of its dtype size.
        lo = min(t.data_ptr() for _, t in members) // ALIGN * ALIGN
        hi = max(t.data_ptr() + t.numel() * t.element_size() for _, t in members)
        specs = [TensorSpec(n, dtype_name(t.dtype), tuple(t.shape), t.data_ptr() - lo) for n, t in members]
        layouts.append(BucketLayout.of(specs))
        rng = export_range(lo, hi - lo, device)
        sources.append(CudaIpcSource(rng.device_index, rng.handle, rng.offset, rng.size))
    return layouts, sources


def push_tensors_ipc(
    targets: Iterable[Any],
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: torch.device | str | None = None,
    in_place: bool = True,
    swap: bool = False,
    more: bool = False,
) -> Any:
    """Share the tensors with colocated engines by CUDA IPC; returns the engines' new version.

    With ``in_place``, contiguous CUDA tensors are shared where they are (no copy: the engine copies
    straight from the trainer's memory into its parameters); the others (all of them without
    ``in_place``) are first packed into CUDA buckets of ``bucket_bytes`` on ``device`` (default: the
    current device), which costs a copy but gives the engine fewer handles to open. Every CUDA
    allocation involved becomes one bucket of the update: its handle and the tensors' offsets in it.
    ``swap``: the engines read into a shadow copy while generating and switch between two steps.
    ``more``: as in ``push_tensors_shm``.
    """
    check_version(version)
    items = named_tensor_list(named_tensors)
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    shared = [(n, t) for n, t in items if in_place and t.is_cuda and t.is_contiguous() and t.numel() > 0]
    in_place = {n for n, _ in shared}
    to_pack = [(n, t) for n, t in items if n not in in_place]
    packed: list[torch.Tensor] = []  # kept alive until every engine has read them
    start = 0
    for layout in plan_buckets(((n, t.dtype, t.shape) for n, t in to_pack), bucket_bytes):
        buf = pack_bucket(layout, [t for _, t in to_pack[start:start + len(layout.tensors)]], device=dev)
        start += len(layout.tensors)
        packed.append(buf)
        shared += bucket_views(layout, buf)
    # Other processes read through their own streams: every write to these bytes must be done. This
    # also makes each device's context current for the driver calls below.
    for d in {t.device for _, t in shared}:
        torch.cuda.synchronize(d)
    layouts, sources = _shared_in_place(shared)
    args = {**layouts_to_args(layouts), "sources": [source_to_dict(s) for s in sources], "version": version}
    if swap:
        args["swap"] = True
    if more:
        args["more"] = True
    result = _call_all(targets, args)
    del packed
    return result
