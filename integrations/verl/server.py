"""The server actor of one replica: what verl's server mode calls, answered by a ``rollout serve``.

``RolloutReplica.launch_servers`` makes one of these per replica (as a Ray actor). verl calls:

- ``generate(prompt_ids, sampling_params, request_id, ...) -> TokenOutput`` from its agent loop
  (through ``LLMServerClient``), with ``logprobs`` asking for per-token log-probs;
- ``wake_up`` / ``sleep``, ``clear_kv_cache``, ``release_kv_cache`` / ``resume_kv_cache``,
  ``abort_all_requests`` / ``resume_generation`` from ``CheckpointEngineManager`` (through the replica);
- ``set_global_steps`` from the adapter after a weight update, ``get_server_address`` from the adapter.

Memory tags follow SGLang's server in verl: a sleep releases the KV cache and the weights (hybrid
and colocated) or only the KV cache (standalone); the weights are then refilled by the next update.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from integrations.verl.requests import LengthBudget, check_prompt, empty_fields, to_generate_call, token_fields
from integrations.verl.server_process import ServerProcess, server_options
from rollout.client import AsyncRolloutClient
from rollout.errors import FailedPreconditionError, UnavailableError, UnimplementedError
from rollout.types import PauseMode

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large checkpoint from network storage is slow
ALL_TAGS = ["kv_cache", "weights"]


class RolloutServer:
    """One replica's engine, served by a ``rollout serve`` child process on this node.

    ``mode`` is verl's ``RolloutMode`` value ("hybrid", "colocated" or "standalone");
    ``visible_devices`` the replica's GPUs (empty on CPU), exported to the server process.
    """

    def __init__(self, config: Any, model_config: Any, mode: str, replica_rank: int, visible_devices: str,
                 visible_devices_key: str = "CUDA_VISIBLE_DEVICES") -> None:
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig, RolloutConfig

        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.mode = mode
        self.replica_rank = replica_rank
        if visible_devices:
            # Set before anything initialises CUDA here; the server process inherits it.
            os.environ[visible_devices_key] = visible_devices
        self._device = "cuda" if visible_devices and _have_cuda() else "cpu"
        self.global_steps: int | None = None  # verl's step of the current weights (set_global_steps)
        self._process: ServerProcess | None = None
        self._client: AsyncRolloutClient | None = None
        self._address: str | None = None
        self._budget: LengthBudget | None = None
        self._reject = False  # abort_all_requests(reject_request=True) until resume_generation
        # Cleared by abort_all_requests, set by resume_generation: new requests wait for it (verl
        # resubmits aborted requests while the weights are updated and the KV cache may be released).
        self._generating = asyncio.Event()
        self._generating.set()

    async def launch_server(self) -> str:
        """Start ``rollout serve`` and wait until it serves; returns its "host:port"."""
        options = server_options(self.model_config.local_path, self.config, self._device)
        self._process = ServerProcess(options)
        self._address = await asyncio.to_thread(self._process.wait_address, START_TIMEOUT_S)
        self._client = AsyncRolloutClient(self._address)
        await self._client.wait_ready(timeout=60.0)
        info = await self._client.get_info()
        self._budget = LengthBudget(self.config.prompt_length, self.config.response_length, info.context_length)
        logger.info("replica %d: rollout serve %d at %s (%s, context %d)", self.replica_rank,
                    self._process.pid, self._address, self._device, info.context_length)
        return self._address

    def get_server_address(self) -> tuple[str, int]:
        """("host", port) of the gRPC server."""
        host, _, port = self._require_address().rpartition(":")
        return host, int(port)

    def _require_address(self) -> str:
        if self._address is None:
            raise FailedPreconditionError("the server is not launched yet")
        return self._address

    def _require_client(self) -> AsyncRolloutClient:
        if self._client is None:
            raise FailedPreconditionError("the server is not launched yet")
        return self._client

    async def generate(self, prompt_ids: Any, sampling_params: dict[str, Any], request_id: str,
                       image_data: list[Any] | None = None, video_data: list[Any] | None = None,
                       **kwargs: Any) -> Any:
        """Generate one response to ``prompt_ids``; verl's ``TokenOutput``.

        ``priority`` is accepted and ignored (as SGLang does); images, videos and audio are refused.
        """
        from verl.workers.rollout.replica import TokenOutput

        kwargs.pop("priority", None)
        if image_data or video_data or kwargs.get("audio_data"):
            raise UnimplementedError("multimodal inputs are not supported", field="image_data")
        client = self._require_client()
        if self._reject:
            raise UnavailableError("generation is paused on this replica and it takes no new requests")
        await self._generating.wait()
        if self._reject:  # aborted again with reject_request while this one waited
            raise UnavailableError("generation is paused on this replica and it takes no new requests")
        assert self._budget is not None
        prompt = check_prompt(prompt_ids, self._budget.context_length)
        call = to_generate_call(len(prompt), sampling_params, self._budget, self.config.logprobs_mode)
        if call.max_new_tokens == 0:
            fields = empty_fields(call, self.global_steps)
        else:
            outs = await client.generate(input_ids=prompt, sampling_params=call.sampling, request_id=request_id,
                                         return_logprob=call.return_logprob and not call.raw_logprobs,
                                         return_raw_logprob=call.return_logprob and call.raw_logprobs)
            fields = token_fields(outs[0], call, self.global_steps)
        return TokenOutput(token_ids=fields.token_ids, log_probs=fields.log_probs, routed_experts=None,
                           stop_reason=fields.stop_reason, extra_fields=fields.extra_fields)

    async def set_global_steps(self, global_steps: int) -> None:
        """Record verl's step of the weights just loaded (or about to be: see the adapter)."""
        self.global_steps = global_steps

    async def get_global_steps(self) -> int | None:
        """The last step given to ``set_global_steps``."""
        return self.global_steps

    async def wake_up(self) -> None:
        """Map back what ``sleep`` released and drop the (stale) prefix cache."""
        if not self.config.free_cache_engine:
            return
        tags = ["kv_cache"] if self.mode == "standalone" else ALL_TAGS
        await self._require_client().resume_memory(tags)
        await self._require_client().flush_cache()

    async def sleep(self) -> None:
        """Release device memory: KV cache and weights, or only the KV cache when standalone."""
        if not self.config.free_cache_engine:
            return
        tags = ["kv_cache"] if self.mode == "standalone" else ALL_TAGS
        await self._require_client().release_memory(tags)

    async def clear_kv_cache(self) -> None:
        """Drop the prefix cache."""
        await self._require_client().flush_cache()

    async def release_kv_cache(self) -> None:
        """Release the KV cache only (weights stay, for an update written in place)."""
        if self.config.free_cache_engine:
            await self._require_client().release_memory(["kv_cache"])

    async def resume_kv_cache(self) -> None:
        """Map the KV cache back after ``release_kv_cache``; the prefix cache starts empty."""
        if self.config.free_cache_engine:
            await self._require_client().resume_memory(["kv_cache"])
            await self._require_client().flush_cache()

    async def abort_all_requests(self, reject_request: bool = False) -> None:
        """Pause in ABORT mode: requests in flight end now with their partial output ("aborted").

        New requests wait for ``resume_generation``, or with ``reject_request`` fail at once.
        """
        self._reject = reject_request
        self._generating.clear()
        await self._require_client().pause(PauseMode.ABORT)

    async def resume_generation(self) -> None:
        """Continue after ``abort_all_requests``; the requests that waited go to the engine."""
        self._reject = False
        await self._require_client().continue_()
        self._generating.set()

    async def start_profile(self, **kwargs: Any) -> None:
        """Profiling is not wired to verl's profiler: a no-op."""

    async def stop_profile(self) -> None:
        """See ``start_profile``."""

    async def shutdown(self) -> None:
        """Stop the server process."""
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._process is not None:
            await asyncio.to_thread(self._process.stop)
            self._process = None


def _have_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
