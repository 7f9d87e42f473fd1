"""The body of a rollout replica actor: one ``rollout serve`` process on the actor's resources.

The actor owns the server's lifetime and forwards every RPC to it over gRPC, so a trainer can drive a
replica through Ray calls alone. Request traffic at scale should go to the server directly
(``RolloutRouter`` over the replicas' addresses): the actor then stays a thin control handle and
tokens never pass through Ray's object store.

``ray.remote(RolloutServer)`` makes the actor class (``create_rollout_actors`` does it with a
placement); its methods are coroutines, so Ray runs it as an async actor and a long ``generate`` does
not block ``pause`` or ``info``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Sequence

from integrations.ray.server_process import RolloutServerConfig, ServerProcess
from rollout.client import DEFAULT_GROUP, AsyncRolloutClient
from rollout.errors import EngineDeadError, FailedPreconditionError
from rollout.types import EngineInfo, GenerateOutput, PauseMode, SamplingParams

_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class ReplicaInfo:
    """Where a replica serves and what it holds: what a trainer or router needs to reach it."""

    address: str  # "host:port" for RolloutClient / AsyncRolloutClient
    node_ip: str
    gpu_ids: tuple[str, ...]
    engine_ranks: int  # ranks this replica adds to a weight-update group
    server_pid: int
    log_path: str
    placement_group_id: str | None  # hex id, when the actor runs in a placement group (as Ray reports it)
    bundle_index: int | None  # the bundle its creator placed it on (Ray does not report it to the actor)


class RolloutServer:
    """One rollout server process on this actor's bundle, with a method for every RPC.

    Errors of the server arrive as the ``rollout.errors`` class of their gRPC status (Ray re-raises
    them on the caller as an error that is also an instance of that class).
    """

    def __init__(self, config: RolloutServerConfig, bundle_index: int | None = None) -> None:
        self.config = config
        self._bundle_index = bundle_index
        self._server = ServerProcess(config)
        self._client: AsyncRolloutClient | None = None
        self._info: ReplicaInfo | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifetime
    async def ready(self) -> ReplicaInfo:
        """Wait until the server has loaded the model and answers SERVING; returns where it serves."""
        if self._info is not None:
            return self._info
        import ray

        deadline = time.monotonic() + self.config.start_timeout_s
        while self._server.poll_port() is None:
            if time.monotonic() > deadline:
                raise EngineDeadError(f"the server did not bind within {self.config.start_timeout_s:g} s:\n"
                                      f"{self._server.log_tail()}")
            await asyncio.sleep(0.05)
        node_ip = ray.util.get_node_ip_address()
        host = node_ip if self.config.host in _WILDCARD_HOSTS else self.config.host
        address = f"{host}:{self._server.port}"
        client = AsyncRolloutClient(address, token=self.config.auth_token)
        try:
            await client.wait_ready(max(deadline - time.monotonic(), 1.0))
        except EngineDeadError:
            await client.close()
            raise EngineDeadError(f"the server was not SERVING in time:\n{self._server.log_tail()}") from None
        self._client = client
        pg_id = ray.get_runtime_context().get_placement_group_id()
        ranks = (await client.get_info()).tp_size  # a server started with --tp-size N joins groups as N ranks
        self._info = ReplicaInfo(address, node_ip, tuple(str(g) for g in ray.get_gpu_ids()), ranks,
                                 self._server.proc.pid, self._server.log_path, pg_id, self._bundle_index)
        return self._info

    async def shutdown(self) -> int:
        """Stop the server (running requests end with reason abort); returns its exit code. Idempotent."""
        self._stopped = True
        if self._client is not None:
            await self._client.close()
            self._client = None
        return await asyncio.get_running_loop().run_in_executor(None, self._server.stop)

    async def server_alive(self) -> bool:
        """True while the server process runs."""
        return self._server.alive()

    async def _c(self) -> AsyncRolloutClient:
        if self._stopped:
            raise FailedPreconditionError("this replica was shut down")
        if self._client is None:
            await self.ready()
        assert self._client is not None
        return self._client

    # ------------------------------------------------------------------ generation
    async def generate(self, prompt: Sequence[int] | str | None = None,
                       sampling_params: SamplingParams | dict[str, Any] | None = None, *,
                       input_ids: Sequence[int] | None = None, text: str | None = None,
                       request_id: str | None = None, return_logprob: bool = True,
                       return_raw_logprob: bool = False, top_logprobs_num: int = 0,
                       return_text: bool = False) -> list[GenerateOutput]:
        """The ``n`` samples of one prompt, with per-token logprobs and weight versions by default."""
        return await (await self._c()).generate(
            prompt, sampling_params, input_ids=input_ids, text=text, request_id=request_id,
            return_logprob=return_logprob, return_raw_logprob=return_raw_logprob,
            top_logprobs_num=top_logprobs_num, return_text=return_text)

    async def generate_batch(self, prompts: Sequence[Sequence[int] | str],
                             sampling_params: SamplingParams | dict[str, Any] | None = None, *,
                             return_logprob: bool = True, return_text: bool = False) -> list[GenerateOutput]:
        """Many prompts concurrently; ``n`` outputs per prompt, prompt-major."""
        return await (await self._c()).generate_batch(prompts, sampling_params, return_logprob=return_logprob,
                                                      return_text=return_text)

    async def abort(self, request_ids: Sequence[str] | str | None = None) -> None:
        """Abort requests by id, or all of them."""
        await (await self._c()).abort(request_ids)

    # ------------------------------------------------------------------ control
    async def pause(self, mode: PauseMode | str = PauseMode.ABORT) -> None:
        """Pause generation (ABORT, RETRACT or IN_PLACE)."""
        await (await self._c()).pause(mode)

    async def continue_(self) -> None:
        """Resume after ``pause``."""
        await (await self._c()).continue_()

    async def flush_cache(self) -> None:
        """Drop the prefix cache."""
        await (await self._c()).flush_cache()

    async def info(self) -> EngineInfo:
        """A snapshot of the engine's state."""
        return await (await self._c()).get_info()

    # ------------------------------------------------------------------ weights and memory
    async def engine_ranks(self) -> int:
        """Ranks this replica adds to a weight-update group (its server's ``--tp-size``)."""
        return (await (await self._c()).get_info()).tp_size

    async def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                       world_size: int, group_name: str = DEFAULT_GROUP, backend: str = "nccl",
                                       timeout_s: float = 0.0) -> str:
        """Join the trainer's weight-update group; returns once the group has formed."""
        return await (await self._c()).init_weight_update_group(master_address, master_port, rank_offset,
                                                                world_size, group_name, backend, timeout_s)

    async def update_weights_from_distributed(self, **layout: Any) -> int:
        """Receive one push of the trainer (the layout ``weight_sync`` sends); returns the new version."""
        return await (await self._c()).update_weights_from_distributed(**layout)

    async def destroy_weight_update_group(self, group_name: str = DEFAULT_GROUP) -> str:
        """Leave a weight-update group."""
        return await (await self._c()).destroy_weight_update_group(group_name)

    async def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        """Reload weights from a checkpoint directory on this node; returns the new version."""
        return await (await self._c()).update_weights_from_disk(model_path, version)

    async def release_memory(self, tags: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Release accelerator memory by tag ("kv_cache", "weights", ...; None: all). Pause first."""
        return await (await self._c()).release_memory(tags)

    async def resume_memory(self, tags: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Map released memory back (None: all)."""
        return await (await self._c()).resume_memory(tags)
