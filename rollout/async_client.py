"""The asyncio client of the rollout service, ``AsyncRolloutClient``: the methods of ``RolloutClient``
(``rollout.client``) as coroutines, ``stream`` as an async iterator.

    async with AsyncRolloutClient("127.0.0.1:50051") as client:
        await client.wait_ready()
        outs = await client.generate("The answer is", {"n": 8, "max_new_tokens": 32})
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import rollout_pb2 as pb
from protos import rollout_pb2_grpc
from rollout.errors import InvalidArgumentError, UnavailableError
from rollout.server import client_calls as calls
from rollout.server import convert
from rollout.server import convert_weights as cw
from rollout.server.auth import bearer_metadata
from rollout.server.client_calls import DEFAULT_GROUP, SERVING, Messages, Prompt, Sampling
from rollout.types import EngineInfo, GenerateOutput, PauseMode, StreamChunk, SwapResult, parse_memory_tags

__all__ = ["AsyncRolloutClient"]


class AsyncRolloutClient:
    """asyncio client with the methods of ``RolloutClient``, as coroutines (``stream``: an async iterator)."""

    def __init__(self, target: str = "127.0.0.1:50051", token: str | None = None, tls_ca: str | None = None,
                 *, timeout: float | None = None, keepalive_s: float = calls.KEEPALIVE_S) -> None:
        self._channel = calls.open_channel(target, tls_ca, aio=True, keepalive_s=keepalive_s)
        self._stub = rollout_pb2_grpc.RolloutStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = bearer_metadata(token) if token else ()
        self.timeout = timeout
        self.target = target
        self._closed = False

    async def close(self) -> None:
        """Close the channel; calls in flight raise ``UnavailableError`` (their requests are aborted)."""
        self._closed = True
        await self._channel.close()

    def _closed_mid_call(self) -> UnavailableError:
        # grpc.aio cancels the calls of a closed channel: without this they would look cancelled
        # (asyncio.CancelledError) though nobody cancelled their task.
        return UnavailableError(f"the client of {self.target} was closed while the call ran")

    async def __aenter__(self) -> AsyncRolloutClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise await calls.async_rpc_error(e, self._channel, self.target) from None

    async def health(self, service: str = "", timeout: float = 5.0) -> bool:
        """True when the server reports SERVING within ``timeout`` s."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == SERVING

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until health is SERVING; raise ``UnavailableError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not await self.health(timeout=max(0.05, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise calls.not_ready(self.target, timeout, await calls.async_connects(self._channel, 0.2))
            await asyncio.sleep(0.2)

    async def stream(self, prompt: Prompt | None = None, sampling_params: Sampling = None, *,
                     input_ids: Sequence[int] | None = None, text: str | None = None, messages: Messages = None,
                     tools: Messages = None, request_id: str | None = None, return_logprob: bool = False,
                     return_raw_logprob: bool = False, top_logprobs_num: int = 0,
                     return_routed_experts: bool = False, timeout: float | None = None) -> AsyncIterator[StreamChunk]:
        """Chunks of all samples as they are generated; stopping early or cancelling aborts the request."""
        prompt = calls.resolve_prompt(prompt, input_ids, text, messages, tools)
        call = calls.GenerateCall(prompt, sampling_params, request_id=request_id,
                                  return_logprob=return_logprob, return_raw_logprob=return_raw_logprob,
                                  top_logprobs_num=top_logprobs_num, return_routed_experts=return_routed_experts)
        responses = self._stub.Generate(call.request, metadata=self._metadata, timeout=timeout)
        try:
            async for msg in responses:
                yield call.chunk(msg)
        except grpc.RpcError as e:
            raise await calls.async_rpc_error(e, self._channel, self.target) from None
        except asyncio.CancelledError:
            if self._closed:
                raise self._closed_mid_call() from None
            raise
        finally:
            responses.cancel()

    async def generate(self, prompt: Prompt | None = None, sampling_params: Sampling = None, *,
                       input_ids: Sequence[int] | None = None, text: str | None = None,
                       messages: Messages = None, tools: Messages = None, request_id: str | None = None,
                       return_logprob: bool = False, return_raw_logprob: bool = False, top_logprobs_num: int = 0,
                       return_text: bool = False, return_routed_experts: bool = False,
                       timeout: float | None = None) -> list[GenerateOutput]:
        """Generate the ``n`` samples of one prompt; see ``RolloutClient.generate``."""
        prompt = calls.resolve_prompt(prompt, input_ids, text, messages, tools)
        call = calls.GenerateCall(prompt, sampling_params, request_id=request_id, stream=False, return_text=return_text,
                                  return_logprob=return_logprob, return_raw_logprob=return_raw_logprob,
                                  top_logprobs_num=top_logprobs_num, return_routed_experts=return_routed_experts)
        responses = self._stub.Generate(call.request, metadata=self._metadata, timeout=timeout)
        try:
            async for msg in responses:
                call.add(msg)
        except grpc.RpcError as e:
            raise await calls.async_rpc_error(e, self._channel, self.target) from None
        except asyncio.CancelledError:
            if self._closed:
                raise self._closed_mid_call() from None
            raise
        finally:
            responses.cancel()
        return call.outputs()

    async def generate_batch(self, prompts: Sequence[Prompt],
                             sampling_params: Sampling | Sequence[Sampling] = None, *,
                             max_concurrency: int = 256, **kwargs: Any) -> list[GenerateOutput]:
        """Generate for many prompts concurrently; ``n`` outputs per prompt, prompt-major.

        If one prompt fails the others are cancelled (which aborts them on the server).
        """
        params = calls.per_prompt(prompts, sampling_params)
        if "request_id" in kwargs:  # one id for every prompt: the second would be refused as in use
            raise InvalidArgumentError("ids are assigned per prompt in a batch", field="request_id")
        gate = asyncio.Semaphore(max(1, max_concurrency))

        async def one(p: Prompt, sp: Sampling) -> list[GenerateOutput]:
            async with gate:
                return await self.generate(p, sp, **kwargs)

        tasks = [asyncio.ensure_future(one(p, sp)) for p, sp in zip(prompts, params)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()  # a cancelled call aborts its request on the server
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [o for outs in results for o in outs]

    async def abort(self, request_ids: Sequence[str] | str | None = None) -> None:
        """Abort requests by id, or every request when ``request_ids`` is None."""
        await self._unary(self._stub.Abort, calls.abort_request(request_ids))

    async def pause(self, mode: PauseMode | str = PauseMode.ABORT) -> None:
        """Pause generation: ABORT, RETRACT or IN_PLACE."""
        request = pb.PauseGenerationRequest(mode=convert.pause_mode_to_proto(mode))
        await self._unary(self._stub.PauseGeneration, request)

    async def continue_(self) -> None:
        """Resume after ``pause``."""
        await self._unary(self._stub.ContinueGeneration, pb.ContinueGenerationRequest())

    async def flush_cache(self) -> None:
        """Drop the prefix cache."""
        await self._unary(self._stub.FlushCache, pb.FlushCacheRequest())

    async def get_info(self) -> EngineInfo:
        """A snapshot of the engine's state."""
        info = convert.info_from_proto(await self._unary(self._stub.GetInfo, pb.GetInfoRequest()))
        self._tp_size = info.tp_size  # for engine_ranks
        return info

    def engine_ranks(self) -> int:
        """Engine ranks behind this server in a weight-update group, as of the last ``get_info``."""
        return getattr(self, "_tp_size", 1)

    async def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                       world_size: int, group_name: str = DEFAULT_GROUP, backend: str = "nccl",
                                       timeout_s: float = 0.0) -> str:
        """Join the engine to a process group with the trainer (trainer = rank 0); blocks until it forms."""
        request = cw.init_group_to_proto(master_address, master_port, rank_offset, world_size, group_name,
                                         backend, timeout_s)
        return (await self._unary(self._stub.InitWeightUpdateGroup, request)).group_name

    async def destroy_weight_update_group(self, group_name: str = DEFAULT_GROUP) -> str:
        """Leave and destroy a weight update group."""
        request = pb.DestroyWeightUpdateGroupRequest(group_name=group_name)
        return (await self._unary(self._stub.DestroyWeightUpdateGroup, request)).group_name

    async def update_weights_from_distributed(self, **layout: Any) -> int | SwapResult:
        """Receive tensors broadcast by the trainer; returns the new weight version
        (``swap=True``: a ``SwapResult``, see ``Engine.update_weights_from_distributed``)."""
        request = cw.distributed_to_proto(**layout)
        reply = await self._unary(self._stub.UpdateWeightsFromDistributed, request)
        return cw.update_result_from_proto(reply, request.swap)

    async def update_weights_from_tensor(self, **layout: Any) -> int | SwapResult:
        """Load colocated tensors shared by handle; returns the new weight version
        (``swap=True``: a ``SwapResult``, see ``Engine.update_weights_from_distributed``)."""
        request = cw.tensor_to_proto(**layout)
        reply = await self._unary(self._stub.UpdateWeightsFromTensor, request)
        return cw.update_result_from_proto(reply, request.swap)

    async def update_weights_from_disk(self, model_path: str, version: int | None = None,
                                       swap: bool = False) -> int | SwapResult:
        """Reload weights from a checkpoint directory; returns the new weight version (``swap=True``: a
        ``SwapResult``)."""
        request = calls.from_disk_request(model_path, version, swap)
        reply = await self._unary(self._stub.UpdateWeightsFromDisk, request)
        return cw.update_result_from_proto(reply, swap)

    async def release_memory(self, tags: Sequence[str] | str | None = None) -> dict[str, dict[str, Any]]:
        """Release GPU memory of these tags (None: all)."""
        reply = await self._unary(self._stub.ReleaseMemory, pb.ReleaseMemoryRequest(tags=parse_memory_tags(tags)))
        return convert.memory_from_proto(reply)

    async def resume_memory(self, tags: Sequence[str] | str | None = None) -> dict[str, dict[str, Any]]:
        """Map released memory back (None: all)."""
        reply = await self._unary(self._stub.ResumeMemory, pb.ResumeMemoryRequest(tags=parse_memory_tags(tags)))
        return convert.memory_from_proto(reply)

    async def rebalance_experts(self) -> dict[str, float | int]:
        """Place the experts by the tokens routed since the last rebalance (``RolloutClient.rebalance_experts``)."""
        reply = await self._unary(self._stub.RebalanceExperts, pb.RebalanceExpertsRequest())
        return convert.rebalance_from_proto(reply)
