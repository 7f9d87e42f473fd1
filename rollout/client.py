"""Python clients of the rollout service: ``RolloutClient`` (blocking) and ``AsyncRolloutClient`` (asyncio,
in ``rollout.async_client``, importable from here too).

Both cover every RPC of ``rollout.v1.Rollout`` and speak ``rollout.types``: ``generate`` returns
``GenerateOutput`` objects (``n`` per prompt, in sample order), ``generate_batch`` many prompts'
outputs prompt-major like ``Engine.generate``, ``stream`` yields ``StreamChunk`` objects. A failed call
raises the ``RolloutError`` subclass of its status (``err.code``: e.g. "INVALID_ARGUMENT") with the
server's message; no server at the address: ``UnavailableError`` ("UNAVAILABLE: cannot connect ...").

    with RolloutClient("127.0.0.1:50051") as client:
        client.wait_ready()
        outs = client.generate("The answer is", {"n": 8, "max_new_tokens": 32}, return_logprob=True)
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from typing import Any, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import rollout_pb2 as pb
from protos import rollout_pb2_grpc
from rollout.async_client import AsyncRolloutClient
from rollout.errors import InvalidArgumentError
from rollout.server import client_calls as calls
from rollout.server import convert
from rollout.server import convert_weights as cw
from rollout.server.auth import bearer_metadata
from rollout.server.client_calls import DEFAULT_GROUP, SERVING, Messages, Prompt, Sampling
from rollout.types import EngineInfo, GenerateOutput, PauseMode, StreamChunk, SwapResult, parse_memory_tags

__all__ = ["RolloutClient", "AsyncRolloutClient", "DEFAULT_GROUP"]


class RolloutClient:
    """Blocking client; thread-safe (one channel shared by all calls). ``target`` is "host:port";
    ``token`` the server's auth token; ``tls_ca`` a CA file for TLS; ``timeout`` the unary deadline (s);
    ``keepalive_s``: a call whose connection is silent this long pings the server, and fails with
    ``UnavailableError`` when the ping is not answered within as long (a frozen or vanished server).
    """

    def __init__(self, target: str = "127.0.0.1:50051", token: str | None = None, tls_ca: str | None = None,
                 *, timeout: float | None = None, keepalive_s: float = calls.KEEPALIVE_S) -> None:
        self._channel = calls.open_channel(target, tls_ca, aio=False, keepalive_s=keepalive_s)
        self._stub = rollout_pb2_grpc.RolloutStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = bearer_metadata(token) if token else ()
        self.timeout = timeout
        self.target = target

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        self._channel.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise calls.rpc_error(e, self._channel, self.target) from None

    # ------------------------------------------------------------------ health
    def health(self, service: str = "", timeout: float = 5.0) -> bool:
        """True when the server reports SERVING (the model is loaded) within ``timeout`` s."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == SERVING

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until health is SERVING; raise ``UnavailableError`` (UNAVAILABLE) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.health(timeout=max(0.05, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise calls.not_ready(self.target, timeout, calls.connects(self._channel, 0.2))
            time.sleep(0.2)

    # ------------------------------------------------------------------ generation
    def stream(self, prompt: Prompt | None = None, sampling_params: Sampling = None, *,
               input_ids: Sequence[int] | None = None, text: str | None = None, messages: Messages = None,
               tools: Messages = None, request_id: str | None = None, return_logprob: bool = False,
               return_raw_logprob: bool = False, top_logprobs_num: int = 0, return_routed_experts: bool = False,
               timeout: float | None = None) -> Iterator[StreamChunk]:
        """Chunks of all samples as they come (prompts as in ``generate``); closing the iterator early
        aborts the request. The call starts at once (before the first ``next``), so many can run together."""
        prompt = calls.resolve_prompt(prompt, input_ids, text, messages, tools)
        call = calls.GenerateCall(prompt, sampling_params, request_id=request_id,
                                  return_logprob=return_logprob, return_raw_logprob=return_raw_logprob,
                                  top_logprobs_num=top_logprobs_num, return_routed_experts=return_routed_experts)
        responses = self._stub.Generate(call.request, metadata=self._metadata, timeout=timeout)
        return self._read_stream(call, responses)

    def _read_stream(self, call: calls.GenerateCall, responses: Any) -> Iterator[StreamChunk]:
        try:
            for msg in responses:
                yield call.chunk(msg)
        except grpc.RpcError as e:
            raise calls.rpc_error(e, self._channel, self.target) from None
        finally:
            responses.cancel()  # no-op when finished; otherwise the server aborts the request

    def generate(self, prompt: Prompt | None = None, sampling_params: Sampling = None, *,
                 input_ids: Sequence[int] | None = None, text: str | None = None, messages: Messages = None,
                 tools: Messages = None, request_id: str | None = None, return_logprob: bool = False,
                 return_raw_logprob: bool = False, top_logprobs_num: int = 0, return_text: bool = False,
                 return_routed_experts: bool = False, timeout: float | None = None) -> list[GenerateOutput]:
        """Generate the ``n`` samples of one prompt; returns them in sample order.

        The prompt is token ids, text or a chat, positionally or as ``input_ids=`` / ``text=`` /
        ``messages=`` (OpenAI-style dicts, rendered with the model's chat template; ``tools`` go to the
        template). Each output's ``text`` is set when the prompt is text or a chat, or ``return_text``;
        ``return_routed_experts`` decodes the MoE routing into ``Engine.generate``'s arrays.
        """
        prompt = calls.resolve_prompt(prompt, input_ids, text, messages, tools)
        call = calls.GenerateCall(prompt, sampling_params, request_id=request_id, stream=False, return_text=return_text,
                                  return_logprob=return_logprob, return_raw_logprob=return_raw_logprob,
                                  top_logprobs_num=top_logprobs_num, return_routed_experts=return_routed_experts)
        responses = self._stub.Generate(call.request, metadata=self._metadata, timeout=timeout)
        try:
            for msg in responses:
                call.add(msg)
        except grpc.RpcError as e:
            raise calls.rpc_error(e, self._channel, self.target) from None
        finally:
            responses.cancel()
        return call.outputs()

    def generate_batch(self, prompts: Sequence[Prompt], sampling_params: Sampling | Sequence[Sampling] = None,
                       *, max_concurrency: int = 64, **kwargs: Any) -> list[GenerateOutput]:
        """Generate for many prompts concurrently (a thread pool); ``n`` outputs per prompt, prompt-major.

        ``sampling_params`` is one for all prompts or one per prompt; ``kwargs`` are those of
        ``generate``. If one prompt fails, the others are aborted and its error is raised.
        """
        params = calls.per_prompt(prompts, sampling_params)
        if "request_id" in kwargs:
            raise InvalidArgumentError("ids are assigned per prompt in a batch", field="request_id")
        ids = [uuid.uuid4().hex for _ in prompts]
        workers = max(1, min(max_concurrency, len(prompts)))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rollout-client") as pool:
            futures = [pool.submit(self.generate, p, sp, request_id=rid, **kwargs)
                       for p, sp, rid in zip(prompts, params, ids)]
            try:
                # The first failure ends the batch at once, not when every earlier prompt has finished.
                done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
                for f in futures:
                    if f in done and f.exception() is not None:
                        raise f.exception()
                return [o for f in futures for o in f.result()]
            except BaseException:
                for f in futures:
                    f.cancel()
                if ids:
                    self.abort(ids)
                raise

    # ------------------------------------------------------------------ control
    def abort(self, request_ids: Sequence[str] | str | None = None) -> None:
        """Abort requests by id, or every request when ``request_ids`` is None."""
        self._unary(self._stub.Abort, calls.abort_request(request_ids))

    def pause(self, mode: PauseMode | str = PauseMode.ABORT) -> None:
        """Pause generation: ABORT, RETRACT or IN_PLACE (see ``PauseMode``)."""
        request = pb.PauseGenerationRequest(mode=convert.pause_mode_to_proto(mode))
        self._unary(self._stub.PauseGeneration, request)

    def continue_(self) -> None:
        """Resume after ``pause``."""
        self._unary(self._stub.ContinueGeneration, pb.ContinueGenerationRequest())

    def flush_cache(self) -> None:
        """Drop the prefix cache."""
        self._unary(self._stub.FlushCache, pb.FlushCacheRequest())

    def get_info(self) -> EngineInfo:
        """A snapshot of the engine's state."""
        return convert.info_from_proto(self._unary(self._stub.GetInfo, pb.GetInfoRequest()))

    # ------------------------------------------------------------------ weights and memory
    def engine_ranks(self) -> int:
        """Engine ranks behind this server that join a weight-update group (one per GPU rank)."""
        return self.get_info().tp_size

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                 world_size: int, group_name: str = DEFAULT_GROUP, backend: str = "nccl",
                                 timeout_s: float = 0.0) -> str:
        """Join the engine to a process group with the trainer (trainer = rank 0); blocks until it forms."""
        request = cw.init_group_to_proto(master_address, master_port, rank_offset, world_size, group_name,
                                         backend, timeout_s)
        return self._unary(self._stub.InitWeightUpdateGroup, request).group_name

    def destroy_weight_update_group(self, group_name: str = DEFAULT_GROUP) -> str:
        """Leave and destroy a weight update group."""
        request = pb.DestroyWeightUpdateGroupRequest(group_name=group_name)
        return self._unary(self._stub.DestroyWeightUpdateGroup, request).group_name

    def update_weights_from_distributed(self, **layout: Any) -> int | SwapResult:
        """Receive tensors broadcast by the trainer (names, dtypes, shapes, offsets, bucket_sizes,
        group_name, version); returns the new weight version
        (``swap=True``: a ``SwapResult``, see ``Engine.update_weights_from_distributed``)."""
        request = cw.distributed_to_proto(**layout)
        return cw.update_result_from_proto(self._unary(self._stub.UpdateWeightsFromDistributed, request), request.swap)

    def update_weights_from_tensor(self, **layout: Any) -> int | SwapResult:
        """Load colocated tensors shared by handle (layout keywords plus ``sources``); returns the version
        (``swap=True``: a ``SwapResult``)."""
        request = cw.tensor_to_proto(**layout)
        return cw.update_result_from_proto(self._unary(self._stub.UpdateWeightsFromTensor, request), request.swap)

    def update_weights_from_disk(self, model_path: str, version: int | None = None,
                                 swap: bool = False) -> int | SwapResult:
        """Reload weights from a checkpoint directory; returns the new weight version (``swap=True``: a
        ``SwapResult``)."""
        request = calls.from_disk_request(model_path, version, swap)
        return cw.update_result_from_proto(self._unary(self._stub.UpdateWeightsFromDisk, request), swap)

    def release_memory(self, tags: Sequence[str] | str | None = None) -> dict[str, dict[str, Any]]:
        """Release GPU memory of these tags (None: all); returns the memory state per tag."""
        reply = self._unary(self._stub.ReleaseMemory, pb.ReleaseMemoryRequest(tags=parse_memory_tags(tags)))
        return convert.memory_from_proto(reply)

    def resume_memory(self, tags: Sequence[str] | str | None = None) -> dict[str, dict[str, Any]]:
        """Map released memory back (None: all); returns the memory state per tag."""
        reply = self._unary(self._stub.ResumeMemory, pb.ResumeMemoryRequest(tags=parse_memory_tags(tags)))
        return convert.memory_from_proto(reply)

    # ------------------------------------------------------------------ experts
    def rebalance_experts(self) -> dict[str, float | int]:
        """Place the experts of an MoE model served with ``ep_size`` > 1 by the tokens routed since the last
        rebalance (see ``Engine.rebalance_experts``); returns ``balancedness_before`` / ``balancedness_after``
        (mean over max rank load), ``moved`` (expert copies moved) and ``tokens`` (pairs counted).
        FAILED_PRECONDITION on a dense model or with ``ep_size`` 1."""
        return convert.rebalance_from_proto(self._unary(self._stub.RebalanceExperts, pb.RebalanceExpertsRequest()))
