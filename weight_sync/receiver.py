"""Receiving side of a push: the broadcast buckets as ``(name, view)`` pairs, two buckets in flight."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from weight_sync.buckets import BucketLayout, bucket_views
from weight_sync.group import CommGroup

RECEIVE_DEPTH = 2  # buckets posted ahead: the next one is on the wire while the current one is loaded


def receive_buckets(group: CommGroup, layouts: Sequence[BucketLayout]) -> Iterator[tuple[str, torch.Tensor]]:
    """Post the broadcasts of ``layouts`` (from rank 0) and yield each bucket's views once it arrived.

    A view is valid until the next item is requested. The caller copies it (on GPU, on the current
    stream: the receive of a later bucket into a reused block is ordered after that copy, because
    each broadcast waits for the current stream before it writes).
    """
    n = len(layouts)
    pending: collections.deque[tuple[torch.Tensor, Any]] = collections.deque()

    def post(i: int) -> None:
        buf = torch.empty(layouts[i].nbytes, dtype=torch.uint8, device=group.device)  # (nbytes,)
        pending.append((buf, group.broadcast(buf)))

    for i in range(min(RECEIVE_DEPTH, n)):
        post(i)
    for i in range(n):
        buf, work = pending.popleft()
        group.wait(work, f"receiving bucket {i + 1} of {n}")
        yield from bucket_views(layouts[i], buf)
        del buf  # its block may serve the next receive; stream order keeps the copies above first
        if i + RECEIVE_DEPTH < n:
            post(i + RECEIVE_DEPTH)
