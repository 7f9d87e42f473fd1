"""What the trainer side needs from an engine: the weight-update calls, with explicit arguments.

The gRPC clients (``rollout.client``) and the in-process ``rollout.Engine`` both have these methods;
``as_target`` wraps an object without ``engine_ranks`` (the in-process engine) as a one-rank target.
The layout arguments are the wire form of ``buckets.layouts_to_args``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class WeightSyncTarget(Protocol):
    """An engine (one server, possibly several ranks) that takes weights from a trainer."""

    def engine_ranks(self) -> int:
        """How many ranks this engine adds to a weight-update group."""
        ...

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                 group_name: str = "default", backend: str = "nccl",
                                 timeout_s: float | None = None) -> Any:
        """Join a group as ranks ``rank_offset ..`` (the trainer is rank 0); returns once it formed."""
        ...

    def update_weights_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], offsets: Sequence[int] | None = None,
                                        bucket_sizes: Sequence[int] | None = None, flat_bucket: bool = False,
                                        group_name: str = "default", version: int | None = None,
                                        swap: bool = False) -> Any:
        """Receive the broadcast buckets of one push (``swap``: beside generation, then switch)."""
        ...

    def destroy_weight_update_group(self, group_name: str = "default") -> Any:
        """Leave and destroy a group."""
        ...


@runtime_checkable
class ColocatedTarget(Protocol):
    """An engine on the trainer's machine that reads shared tensors (``push_tensors_ipc`` / ``_shm``)."""

    def update_weights_from_tensor(self, *, names: Sequence[str], dtypes: Sequence[str],
                                   shapes: Sequence[Sequence[int]], sources: Sequence[Any],
                                   offsets: Sequence[int] | None = None, bucket_sizes: Sequence[int] | None = None,
                                   flat_bucket: bool = False, version: int | None = None,
                                   swap: bool = False, more: bool = False) -> Any:
        """Load shared buckets, one source per bucket (``swap``: beside generation, then switch;
        ``more``: further calls carry more of this update)."""
        ...


class _OneRank:
    """An in-process ``Engine`` (or any object with the weight-update methods) as a one-rank target."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def engine_ranks(self) -> int:
        return 1

    def __getattr__(self, name: str) -> Any:
        if name in ("init_weight_update_group", "update_weights_from_distributed", "update_weights_from_tensor",
                    "destroy_weight_update_group"):
            return getattr(self._engine, name)
        raise AttributeError(name)


def as_target(obj: Any) -> Any:
    """``obj`` itself if it has ``engine_ranks``; otherwise a one-rank adapter around it."""
    if hasattr(obj, "engine_ranks"):
        return obj
    if hasattr(obj, "init_weight_update_group"):
        return _OneRank(obj)
    raise TypeError(f"{type(obj).__name__} has none of the weight-update methods (init_weight_update_group, ...)")
