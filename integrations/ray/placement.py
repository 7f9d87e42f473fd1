"""Creating replica actors on placement-group bundles: the trainer's (colocated) or their own.

Colocated: each replica takes a fraction of one of the trainer's bundles (e.g. ``num_gpus=0.4`` next
to a trainer worker that holds 0.6 of the same GPU), and the two share the device by releasing and
resuming memory around each training step. Standalone: a new placement group with one bundle per
replica, which this module owns and removes at shutdown.

    replicas = create_rollout_actors(RolloutServerConfig(model_dir, device="cuda"), 4, num_gpus=1)
    infos = replicas.ready()               # each replica's address, node, GPUs, bundle
    router = RolloutRouter([i.address for i in infos])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from integrations.ray.actor import ReplicaInfo, RolloutServer
from integrations.ray.server_process import RolloutServerConfig
from integrations.ray.weights import ActorWeightTarget
from rollout.errors import InvalidArgumentError, ResourceExhaustedError

_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RolloutReplicas:
    """Replica actors, the placement group they run in, and whether this module created that group."""

    actors: list[Any]
    placement_group: Any
    bundle_indices: tuple[int, ...]
    owns_placement_group: bool

    def ready(self, timeout_s: float | None = None) -> list[ReplicaInfo]:
        """Wait until every replica serves; returns their infos in replica order."""
        import ray

        return ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)

    def weight_targets(self, timeout_s: float | None = None) -> list[ActorWeightTarget]:
        """The replicas as ``weight_sync`` targets (``weight_sync.connect(replicas.weight_targets(), ...)``)."""
        return [ActorWeightTarget(a, timeout_s) for a in self.actors]

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every server, end the actors, and remove the placement group if this module made it."""
        import ray

        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=timeout_s)
        finally:
            for a in self.actors:
                ray.kill(a)
            if self.owns_placement_group:
                ray.util.remove_placement_group(self.placement_group)


def _check(num_replicas: int, num_cpus: float, num_gpus: float, strategy: str) -> None:
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise InvalidArgumentError(f"must be an integer >= 1 (got {num_replicas!r})", field="num_replicas")
    for name, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise InvalidArgumentError(f"must be a number >= 0 (got {v!r})", field=name)
    if strategy not in _STRATEGIES:
        raise InvalidArgumentError(f"must be one of {_STRATEGIES} (got {strategy!r})", field="strategy")


def create_rollout_actors(
    config: RolloutServerConfig,
    num_replicas: int,
    *,
    placement_group: Any = None,
    bundle_indices: Sequence[int] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    strategy: str = "PACK",
    placement_timeout_s: float = 120.0,
    name_prefix: str | None = None,
) -> RolloutReplicas:
    """Start ``num_replicas`` ``RolloutServer`` actors, one per bundle; returns before they serve.

    With ``placement_group`` (the trainer's), replica i runs on bundle ``bundle_indices[i]`` (default
    i) and takes ``num_cpus`` / ``num_gpus`` of it. Without, a new group of ``num_replicas`` bundles of
    that size is made with ``strategy``; ``ResourceExhaustedError`` if the cluster cannot place it
    within ``placement_timeout_s``. ``name_prefix`` names the actors ``{prefix}-{i}`` (Ray named actors).
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    _check(num_replicas, num_cpus, num_gpus, strategy)
    owns = placement_group is None
    if owns:
        bundle = {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {})}
        placement_group = ray.util.placement_group([dict(bundle) for _ in range(num_replicas)], strategy=strategy)
        ready, _ = ray.wait([placement_group.ready()], timeout=placement_timeout_s)
        if not ready:
            ray.util.remove_placement_group(placement_group)
            raise ResourceExhaustedError(f"the cluster could not place {num_replicas} bundles of {bundle} "
                                         f"within {placement_timeout_s:g} s")
        indices = tuple(range(num_replicas))
    else:
        indices = tuple(range(num_replicas)) if bundle_indices is None else tuple(bundle_indices)
        if len(indices) != num_replicas:
            raise InvalidArgumentError(f"needs one bundle per replica ({num_replicas}), got {len(indices)}",
                                       field="bundle_indices")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < placement_group.bundle_count
               for i in indices):
            raise InvalidArgumentError(f"must be in [0, {placement_group.bundle_count}) (got {indices})",
                                       field="bundle_indices")
    actor_cls = ray.remote(RolloutServer)
    actors = []
    try:
        for i, index in enumerate(indices):
            options: dict[str, Any] = dict(
                num_cpus=num_cpus, num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group,
                                                                     placement_group_bundle_index=index))
            if name_prefix is not None:
                options["name"] = f"{name_prefix}-{i}"
            actors.append(actor_cls.options(**options).remote(config, index))
    except BaseException:
        # A failed start (a name already taken, ...) leaves nothing behind: no actor, no group we made.
        for actor in actors:
            ray.kill(actor)
        if owns:
            ray.util.remove_placement_group(placement_group)
        raise
    return RolloutReplicas(actors, placement_group, indices, owns)
