"""The host side of a step's inputs: one buffer built from Python lists, one copy to the device.

A decode step at a small batch spends more time on the host than on the device, so each step's
host work is kept to a few Python list operations and one host-to-device copy. ``array`` builds
the buffer several times faster than ``torch.tensor`` on each list:

- ``host_segments_to_device``: an eager step's int64 inputs, each segment at an even offset.

- ``copy_decode_inputs``: the five input segments of the graph (``PACKED_FIELDS``, padding rows
  included) and, after them at an even offset, the bit patterns of the step's sampling draws
  (float64 uniforms), as one int64 buffer.
- ``put_previous_samples``: with overlap scheduling a row's input is the previous step's sample,
  known only on the device (``BatchPlan.input_ids``: ``-1 - j`` for its row ``j``). When the rows
  take the samples of consecutive rows in order (steady decode) one device copy puts them in
  place, where the general case takes a handful of kernels (``resolve_previous_samples``).
"""

from __future__ import annotations

from array import array

import torch

from rollout.batch import BatchPlan
from rollout.runner.cuda_graph import PACKED_FIELDS, DecodeGraphRunner


def host_segments_to_device(segments: list[list[int] | torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copy int64 ``segments`` (lists or CPU tensors) to ``device`` in one copy; a device view of each.

    On CUDA the copy is from pinned memory and queued (it does not wait for the device). Each
    segment starts at an even offset, so every view is 16-byte aligned like a fresh tensor: Triton
    compiles a kernel per pointer alignment, and a view aligned in one step and not in the next
    compiled the kernels reading it again in the middle of a run.
    """
    host = array("q")
    sizes = []
    for seg in segments:
        if isinstance(seg, torch.Tensor):
            host.frombytes(memoryview(seg.to(torch.int64).contiguous().numpy()).cast("B"))
        else:
            host.extend(seg)
        sizes.append(len(seg))
        if len(seg) % 2:
            host.append(0)
    if not host:
        flat = torch.empty(0, dtype=torch.int64, device=device)
    else:
        flat = torch.frombuffer(host, dtype=torch.int64)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        elif flat.data_ptr() % 16:
            flat = flat.clone()  # the CPU views are the buffer itself: give it a fresh tensor's alignment
    views, offset = [], 0
    for n in sizes:
        views.append(flat[offset: offset + n])
        offset += n + n % 2
    return views


def draws_offset(num_inputs: int) -> int:
    """Where the draws start after ``num_inputs`` int64 inputs: an even offset, so that their device
    view is 16-byte aligned in every step (Triton compiles a kernel per pointer alignment)."""
    return num_inputs + num_inputs % 2


def packed_decode_inputs(input_ids: list[int], positions: list[int], out_slots: list[int], rows: list[int],
                         graph_size: int, padding_row: int, draws: list[float] | None) -> torch.Tensor:
    """``| input_ids | positions | out_cache_loc | req_rows | seq_lens |`` of a decode graph of
    ``graph_size`` rows (the rows past ``len(rows)`` are padding: token 0 at position 0 in slot 0,
    table row ``padding_row``), then the bit patterns of ``draws`` at ``draws_offset``; (N,) int64
    on the CPU. ``positions`` are the rows' prefix lengths (the new token's position)."""
    pad = graph_size - len(rows)
    zeros = [0] * pad
    host = array("q", input_ids)
    host.extend(zeros)
    host.extend(positions)
    host.extend(zeros)
    host.extend(out_slots)
    host.extend(zeros)
    host.extend(rows)
    host.extend([padding_row] * pad)
    host.extend([p + 1 for p in positions])  # seq_lens: the prefix and the new token
    host.extend([1] * pad)
    if draws:
        if len(host) % 2:
            host.append(0)
        host.frombytes(array("d", draws).tobytes())  # float64 bits, read back through a float64 view
    return torch.frombuffer(host, dtype=torch.int64)


def copy_decode_inputs(plan: BatchPlan, graphs: DecodeGraphRunner, graph_size: int, padding_row: int,
                       draws: list[float] | None) -> torch.Tensor | None:
    """Put ``plan``'s inputs (a decode plan) into the packed input buffer of graph ``graph_size``,
    and ``draws`` after them, with one copy that does not wait for the device; returns the draws'
    view on the device ((B,) float64), None without draws."""
    host = packed_decode_inputs(plan.input_ids, plan.prefix_lens, plan.out_slots, plan.rows, graph_size,
                                padding_row, draws)
    device = graphs.packed.device
    if device.type == "cuda":
        host = host.pin_memory()  # a queued copy: a pageable one would wait for the device
    inputs = len(PACKED_FIELDS) * graph_size
    packed = graphs.packed_inputs(graph_size, host.numel() - inputs)
    packed.copy_(host, non_blocking=True)
    return packed[draws_offset(inputs):].view(torch.float64) if draws else None


def previous_samples_run(input_ids: list[int], num_previous: int) -> int | None:
    """The first row ``j`` when the inputs are ``-1 - j, -1 - (j + 1), ...`` (the previous step's
    samples ``j, j + 1, ...`` in order, all of them among its ``num_previous``); None otherwise."""
    if not input_ids or input_ids[0] >= 0:
        return None
    first = -1 - input_ids[0]
    n = len(input_ids)
    if first + n > num_previous or input_ids != list(range(-1 - first, -1 - first - n, -1)):
        return None
    return first


def resolve_previous_samples(input_ids: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``input_ids`` with each ``-1 - j`` replaced by ``previous[j]`` (the previous step's samples),
    on the device."""
    assert previous is not None, "a step refers to samples of a step that sampled nothing"
    return torch.where(input_ids < 0, previous[(-1 - input_ids).clamp(0, previous.numel() - 1)], input_ids)


def put_previous_samples(dst: torch.Tensor, input_ids: list[int], previous: torch.Tensor | None) -> None:
    """Resolve the references to ``previous`` samples in ``dst`` (a graph's input ids on the device,
    the step's ``input_ids`` first, then padding) in place."""
    first = previous_samples_run(input_ids, previous.numel()) if previous is not None else None
    if first is not None:  # steady decode: one copy
        dst[: len(input_ids)].copy_(previous[first: first + len(input_ids)])
    else:
        dst.copy_(resolve_previous_samples(dst, previous))


def draws_to_device(draws: list[float], device: torch.device) -> torch.Tensor:
    """The draws (B,) float64 on ``device``, copied without waiting for the device's queue."""
    host = torch.frombuffer(array("d", draws), dtype=torch.float64)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
