"""Bring weights into the L2 cache ahead of the kernels that read them (Hopper bulk prefetch).

A decode step of a small batch reads each layer's weights once, one matmul after another, and each
matmul of a few MB spends much of its time ramping up and draining rather than at full bandwidth;
attention meanwhile reads little. ``prefetch_l2`` issues ``cp.async.bulk.prefetch.L2`` for whole
tensors: one lane per ``CHUNK`` bytes, nothing waited for, so the kernel ends as soon as the
requests are issued and the copy into L2 proceeds while later kernels run. The matmuls that follow
then read from L2. It changes no values: a prefetch only moves lines into the cache.

On devices before sm_90, in Triton's interpreter and on CPU it does nothing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton_utils import interpreting

CHUNK_BYTES = 16384  # bytes per bulk prefetch: a multiple of 16, as the instruction requires
LANES = 128  # chunks per program
CHUNK = tl.constexpr(CHUNK_BYTES)
BLOCK = tl.constexpr(LANES)


@triton.jit
def _region(base, nbytes, pid):
    """Issue the bulk prefetches of program ``pid``'s chunks of ``nbytes`` bytes at ``base``."""
    offs = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    size = tl.minimum(nbytes - offs, CHUNK) // 16 * 16  # the tail: whole 16-byte units
    size = tl.maximum(size, 0).to(tl.int32)
    addr = base.to(tl.pointer_type(tl.int8)) + offs
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _prefetch_kernel(p0, n0, p1, n1, p2, n2, NUM: tl.constexpr):
    # Grid (programs for the largest region, NUM): axis 1 picks the region.
    pid = tl.program_id(0)
    region = tl.program_id(1)
    if region == 0:
        _region(p0, n0, pid)
    if NUM > 1:
        if region == 1:
            _region(p1, n1, pid)
    if NUM > 2:
        if region == 2:
            _region(p2, n2, pid)


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def available(t: torch.Tensor) -> bool:
    """Whether ``prefetch_l2`` does anything for tensors on ``t``'s device."""
    if t.device.type != "cuda" or interpreting():
        return False
    return _supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def prefetch_l2(tensors: list[torch.Tensor], max_bytes: int | None = None) -> None:
    """Start copying up to three contiguous ``tensors`` (their first ``max_bytes`` bytes in all, in
    order) into L2, on the current stream; returns when the requests are issued."""
    assert 0 < len(tensors) <= 3, "one to three tensors"
    if not available(tensors[0]):
        return
    regions = []
    left = max_bytes if max_bytes is not None else float("inf")
    for t in tensors:
        assert t.is_contiguous(), "a prefetched tensor must be contiguous"
        n = int(min(t.numel() * t.element_size(), left))
        if n >= 16:
            regions.append((t, n))
        left -= n
    if not regions:
        return
    largest = max(n for _, n in regions)
    args = [a for t, n in regions for a in (t, n)]
    args += [regions[0][0], 0] * (3 - len(regions))
    grid = (triton.cdiv(triton.cdiv(largest, CHUNK_BYTES), LANES), len(regions))
    _prefetch_kernel[grid](*args, NUM=len(regions), num_warps=4)
