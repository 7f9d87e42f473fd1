"""What the trainer side needs from an engine: the weight-update control operations.

``WeightSyncTarget`` (and ``ColocatedTarget`` for the shared-memory paths) is meant to be satisfied
by the gRPC client; through ``as_target`` the in-process ``rollout.Engine`` and an ``EngineClient``
(``.call(op, **args)``) of an engine process satisfy it too.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class WeightSyncTarget(Protocol):
    """An engine (one server, possibly several ranks) that takes weights from a trainer.

    Keyword arguments are those of the engine's control operations of the same names (see
    ``rollout.weight_updates``).
    """

    def engine_ranks(self) -> int:
        """How many ranks this engine adds to a weight-update group."""
        ...

    def init_weight_update_group(self, **kwargs: Any) -> Any:
        """Join a group: master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s."""
        ...

    def update_weights_from_distributed(self, **kwargs: Any) -> Any:
        """Receive broadcast buckets: group_name, names, dtypes, shapes, offsets, bucket_sizes, version."""
        ...

    def destroy_weight_update_group(self, group_name: str) -> Any:
        """Leave and destroy a group."""
        ...


@runtime_checkable
class ColocatedTarget(Protocol):
    """An engine on the trainer's machine that reads shared tensors (``push_tensors_ipc`` / ``_shm``)."""

    def update_weights_from_tensor(self, **kwargs: Any) -> Any:
        """Load shared buckets: names, dtypes, shapes, offsets, bucket_sizes, sources, version."""
        ...


class _OneRank:
    """An in-process ``Engine`` (or any object with the methods) as a one-rank target."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def engine_ranks(self) -> int:
        return 1

    def init_weight_update_group(self, **kwargs: Any) -> Any:
        return self._engine.init_weight_update_group(**kwargs)

    def update_weights_from_distributed(self, **kwargs: Any) -> Any:
        return self._engine.update_weights_from_distributed(**kwargs)

    def update_weights_from_tensor(self, **kwargs: Any) -> Any:
        return self._engine.update_weights_from_tensor(**kwargs)

    def destroy_weight_update_group(self, group_name: str) -> Any:
        return self._engine.destroy_weight_update_group(group_name=group_name)


class _OpCaller:
    """An ``EngineClient`` (``call(op, **args)``) of an engine thread or process as a one-rank target."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def engine_ranks(self) -> int:
        return 1

    def init_weight_update_group(self, **kwargs: Any) -> Any:
        return self._client.call("init_weight_update_group", **kwargs)

    def update_weights_from_distributed(self, **kwargs: Any) -> Any:
        return self._client.call("update_weights_from_distributed", **kwargs)

    def update_weights_from_tensor(self, **kwargs: Any) -> Any:
        return self._client.call("update_weights_from_tensor", **kwargs)

    def destroy_weight_update_group(self, group_name: str) -> Any:
        return self._client.call("destroy_weight_update_group", group_name=group_name)


def as_target(obj: Any) -> Any:
    """``obj`` itself if it has ``engine_ranks``; otherwise a one-rank adapter around it."""
    if hasattr(obj, "engine_ranks"):
        return obj
    if hasattr(obj, "init_weight_update_group"):
        return _OneRank(obj)
    if hasattr(obj, "call"):
        return _OpCaller(obj)
    raise TypeError(f"{type(obj).__name__} has neither the weight-update methods nor call(op, **args)")
