"""Worker-side adapter (verl's ``BaseRollout``): weights and memory of one replica's server.

verl creates it through ``get_rollout_class(name, "async")`` (the ``_ROLLOUT_REGISTRY`` entry set
in ``registration``) in two places:

- hybrid (colocated training, ``checkpoint_engine.backend=naive``): inside each trainer worker.
  ``ActorRolloutRefWorker.update_weights`` calls ``resume(["weights"])``, ``update_weights`` with
  the trainer's full tensors (Hugging Face names) and ``resume(["kv_cache"])``;
- standalone / colocated replicas: inside verl's ``CheckpointEngineWorker``, which feeds
  ``update_weights`` with what its checkpoint engine received.

Weights reach the server through ``weight_sync``: CUDA tensors by CUDA IPC (the server shares the
worker's GPU), CPU tensors through shared memory, in buckets of
``checkpoint_engine.update_weights_bucket_megabytes``. Each push carries verl's step as the weight
version, so every token generated afterwards is tagged with that step.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout

import weight_sync
from integrations.verl.replica import server_actor_name
from integrations.verl.server import ALL_TAGS
from rollout.client import RolloutClient
from rollout.errors import UnimplementedError


class ServerAdapter(BaseRollout):
    """Talks to the ``rollout serve`` of replica ``replica_rank`` (default: from this worker's rank:
    a replica has ``tensor_model_parallel_size`` consecutive ranks, and the first leads it).

    Only the leader talks to the server: the trainer hands every worker the full tensors, and one
    push reaches every rank of the server (each keeps its shard); the others do nothing."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1) -> None:
        super().__init__(config, model_config, device_mesh)
        tp = int(getattr(config, "tensor_model_parallel_size", 1) or 1)
        rank = int(os.environ.get("RANK", "0"))
        self.replica_rank = rank // tp if replica_rank == -1 else replica_rank
        # verl passes replica_rank to every worker of a replica (its checkpoint-engine workers), so
        # it says nothing of who leads: the first rank of the replica's tp ranks does.
        self.is_leader_rank = rank % tp == 0
        self._server: Any = None  # the replica's RolloutServer actor
        self._client: RolloutClient | None = None

    async def _connect(self) -> RolloutClient:
        if self._client is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
            host, port = await self._server.get_server_address.remote()
            self._client = RolloutClient(f"{host}:{port}")
        return self._client

    async def resume(self, tags: list[str]) -> None:
        """Map the released memory of ``tags`` ("weights", "kv_cache") back."""
        if not self.is_leader_rank:
            return
        client = await self._connect()
        if self.config.free_cache_engine:
            await asyncio.to_thread(client.resume_memory, list(tags))

    async def release(self) -> None:
        """Release the KV cache and the weights."""
        if not self.is_leader_rank:
            return
        client = await self._connect()
        if self.config.free_cache_engine:
            await asyncio.to_thread(client.release_memory, ALL_TAGS)

    async def update_weights(self, weights: Any, global_steps: int | None = None,
                             wire_format: str = "named_tensors", **kwargs: Any) -> None:
        """Load ``(name, tensor)`` pairs (a generator, sync or async) into the server.

        The version is ``global_steps``; without it, the step last given to the server's
        ``set_global_steps`` when that is newer than the loaded weights, else their version + 1. All
        buckets carry the same version. The prefix cache is dropped after.

        Each bucket is one call of a single update (``more`` on all but the last, so at most two
        buckets are staged at a time), and the server generates again only after the last: if a
        call fails once earlier ones were written, the server refuses to generate until a full update.
        """
        if wire_format != "named_tensors":
            raise UnimplementedError(f"only full tensors are loaded, not {wire_format!r}",
                                     field="checkpoint_engine.backend")
        if kwargs.get("peft_config") is not None:
            raise UnimplementedError("LoRA adapters are not served; set model.lora.merge=True",
                                     field="peft_config")
        if not self.is_leader_rank:
            async for _ in _items(weights):  # the generator may hold collectives: drain it like the leader
                pass
            return
        client = await self._connect()
        version = global_steps if global_steps is not None else await self._next_version(client)
        bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        held = None  # one bucket behind, so that the last one goes without ``more``
        async for bucket in _buckets(weights, bucket_bytes):
            if held is not None:
                await asyncio.to_thread(_push, client, held, version, bucket_bytes, True)
            held = bucket
        if held is not None:
            await asyncio.to_thread(_push, client, held, version, bucket_bytes, False)
        await asyncio.to_thread(client.flush_cache)
        await self._server.set_global_steps.remote(version)

    async def _next_version(self, client: RolloutClient) -> int:
        current = (await asyncio.to_thread(client.get_info)).weight_version
        pending = await self._server.get_global_steps.remote()
        return pending if pending is not None and pending > current else current + 1


def _push(client: RolloutClient, items: list[tuple[str, torch.Tensor]], version: int | None,
          bucket_bytes: int, more: bool) -> None:
    if any(t.is_cuda for _, t in items):
        weight_sync.push_tensors_ipc([client], items, version=version, bucket_bytes=bucket_bytes, more=more)
    else:
        weight_sync.push_tensors_shm([client], items, version=version, bucket_bytes=bucket_bytes, more=more)


async def _items(weights: Any) -> AsyncIterator[tuple[str, torch.Tensor]]:
    if hasattr(weights, "__aiter__"):
        async for item in weights:
            yield item
    else:
        for item in weights:
            yield item


def _own(tensor: torch.Tensor) -> torch.Tensor:
    # Checkpoint engines yield views of a receive buffer that they refill for their next bucket;
    # a view is copied before the generator moves on. A tensor with its storage to itself is kept.
    tensor = tensor.detach()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


async def _buckets(weights: Iterable[tuple[str, torch.Tensor]] | Any,
                   bucket_bytes: int) -> AsyncIterator[list[tuple[str, torch.Tensor]]]:
    """Lists of ``(name, tensor)`` of about ``bucket_bytes`` (one larger tensor is a bucket alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    async for name, tensor in _items(weights):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, _own(tensor)))
        size += nbytes
    if bucket:
        yield bucket
