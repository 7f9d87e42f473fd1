"""A replica actor as a ``weight_sync`` target, so a trainer pushes to actors it holds handles of.

    group = weight_sync.connect([ActorWeightTarget(a) for a in actors], backend="nccl",
                                master_address=trainer_ip)
    group.push(model.named_parameters(), version=step)

``weight_sync`` calls the target's methods from its own threads and each call blocks until the
replica answers, as a gRPC client's would. Pushing to the replicas' gRPC addresses
(``RolloutClient(info.address)``) works the same and skips the hop through the actor.
"""

from __future__ import annotations

from typing import Any


class ActorWeightTarget:
    """Blocking ``WeightSyncTarget`` over a ``RolloutServer`` actor handle."""

    def __init__(self, actor: Any, timeout_s: float | None = None) -> None:
        self._actor = actor
        self._timeout_s = timeout_s
        self._ranks: int | None = None

    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref, timeout=self._timeout_s)

    def engine_ranks(self) -> int:
        """Ranks the replica adds to a group (asked once)."""
        if self._ranks is None:
            self._ranks = int(self._get(self._actor.engine_ranks.remote()))
        return self._ranks

    def init_weight_update_group(self, **kwargs: Any) -> str:
        """Join the group (master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s)."""
        return self._get(self._actor.init_weight_update_group.remote(**kwargs))

    def update_weights_from_distributed(self, **kwargs: Any) -> int:
        """Receive one push; returns the replica's new weight version."""
        return self._get(self._actor.update_weights_from_distributed.remote(**kwargs))

    def destroy_weight_update_group(self, group_name: str) -> str:
        """Leave the group."""
        return self._get(self._actor.destroy_weight_update_group.remote(group_name))
