"""``RolloutReplica`` for verl: one ``rollout serve`` per replica, behind a ``RolloutServer`` actor.

verl builds replicas through ``RolloutReplicaRegistry`` (``rollout.name`` picks the class) and
calls ``init_hybrid`` / ``init_colocated`` / ``init_standalone``; each ends in ``launch_servers``,
which starts the server actor on the node (and with the devices) of the replica's worker.
Everything else a replica does (sleep, wake_up, abort, resume, KV cache) is the base class's fan-out
to ``self.servers``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.plugin.platform import get_platform
from verl.utils.device import get_visible_devices_keyword
from verl.workers.rollout.replica import RolloutReplica

from integrations.verl.registration import BACKEND_NAME
from integrations.verl.server import RolloutServer
from rollout.errors import UnimplementedError


def server_actor_name(replica_rank: int, kind: str = "") -> str:
    """The Ray name of a replica's server actor; the adapter finds its server by it."""
    return f"{BACKEND_NAME}_server{kind}_{replica_rank}_0"


class RolloutServerReplica(RolloutReplica):
    """A replica of ``tensor_model_parallel_size`` ranks: one ``rollout serve --tp-size N`` over the
    GPUs of the replica's N workers (one node; no data or pipeline parallelism inside a replica)."""

    def __init__(self, replica_rank: int, config: Any, model_config: Any, gpus_per_node: int = 8,
                 is_reward_model: bool = False, is_teacher_model: bool = False, name_suffix: str = "") -> None:
        super().__init__(replica_rank, config, model_config, gpus_per_node, is_reward_model, is_teacher_model,
                         name_suffix)
        tp = int(getattr(self.config, "tensor_model_parallel_size", 1) or 1)
        if self.world_size != tp:
            raise UnimplementedError(
                f"a replica's ranks are its tensor-parallel ranks; set data_parallel_size and "
                f"pipeline_model_parallel_size to 1 (world size {self.world_size}, tensor parallel {tp})",
                field="actor_rollout_ref.rollout.data_parallel_size")
        self.server_class = ray.remote(RolloutServer)

    def _actor_name(self) -> str:
        kind = "_reward" if self.is_reward_model else "_teacher" if self.is_teacher_model else ""
        return server_actor_name(self.replica_rank, kind) + self.name_suffix

    async def launch_servers(self) -> None:
        """Start the server actor next to the replica's worker and its ``rollout serve``."""
        if len(self.workers) != self.world_size:
            raise UnimplementedError(f"expected the replica's {self.world_size} workers, got {len(self.workers)}",
                                     field="workers")
        key = get_visible_devices_keyword()
        places = await asyncio.gather(*(w.__ray_call__.remote(
            lambda _: (ray.get_runtime_context().get_node_id(), os.environ.get(key, ""))) for w in self.workers))
        node_id = places[0][0]
        if any(n != node_id for n, _ in places):
            raise UnimplementedError("a replica's ranks must share one node", field="workers")
        # The server's ranks run on every worker's devices, in worker order (rank r on the r-th).
        devices = ",".join(d for _, d in places if d)
        platform = get_platform()
        server = self.server_class.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            # The actor holds no GPU of its own (the worker does); Ray must leave the devices it sets alone.
            runtime_env={"env_vars": {**{var: "1" for var in platform.ray_noset_envvars()}}},
            name=self._actor_name(),
            max_concurrency=self.max_concurrency,
        ).remote(
            config=self.config,
            model_config=self.model_config,
            mode=self.rollout_mode.value,
            replica_rank=self.replica_rank,
            visible_devices=devices,
            visible_devices_key=key,
        )
        self.servers = [server]
        self._server_address = await server.launch_server.remote()
        self._server_handle = server

    async def shutdown(self) -> None:
        """Stop the server processes (verl drops replicas without a call; this is for tests and tools)."""
        for server in self.servers:
            await server.shutdown.remote()
