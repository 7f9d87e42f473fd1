"""Rollout replicas as Ray actors, their placement, and a client that routes over them.

    from integrations.ray import RolloutServerConfig, create_rollout_actors, RolloutRouter

    replicas = create_rollout_actors(RolloutServerConfig(model_dir, device="cuda"), 4, num_gpus=1)
    infos = replicas.ready()
    router = RolloutRouter([i.address for i in infos])          # asyncio; a GRPO group stays on one replica
    group = weight_sync.connect(replicas.weight_targets(), backend="nccl", master_address=trainer_ip)

Each actor (``RolloutServer``) owns one ``rollout serve`` process on its bundle's resources. Imports
are lazy, so the routing rule is usable without Ray installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["RolloutServerConfig", "RolloutServer", "ReplicaInfo", "create_rollout_actors", "RolloutReplicas",
           "RolloutRouter", "PrefixAffinityPolicy", "ActorWeightTarget"]

if TYPE_CHECKING:
    from integrations.ray.actor import ReplicaInfo, RolloutServer
    from integrations.ray.placement import RolloutReplicas, create_rollout_actors
    from integrations.ray.router import RolloutRouter
    from integrations.ray.routing import PrefixAffinityPolicy
    from integrations.ray.server_process import RolloutServerConfig
    from integrations.ray.weights import ActorWeightTarget

_WHERE = {
    "RolloutServerConfig": "integrations.ray.server_process",
    "RolloutServer": "integrations.ray.actor",
    "ReplicaInfo": "integrations.ray.actor",
    "create_rollout_actors": "integrations.ray.placement",
    "RolloutReplicas": "integrations.ray.placement",
    "RolloutRouter": "integrations.ray.router",
    "PrefixAffinityPolicy": "integrations.ray.routing",
    "ActorWeightTarget": "integrations.ray.weights",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
