"""A client over data-parallel replicas: each request to one replica, chosen by ``PrefixAffinityPolicy``.

    router = RolloutRouter([info.address for info in replicas.ready()])
    outs = await router.generate(prompt_ids, {"n": 8, "max_new_tokens": 256}, return_logprob=True)
    await router.pause("in_place"); ...push weights to every replica...; await router.continue_()

Requests go straight to the replicas' gRPC servers (not through their actors). Control calls
(pause, continue, flush, abort of all) go to every replica.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Mapping, Sequence

from integrations.ray.routing import PrefixAffinityPolicy, Prompt
from rollout.client import AsyncRolloutClient
from rollout.errors import InvalidArgumentError
from rollout.types import EngineInfo, GenerateOutput, PauseMode, SamplingParams

Sampling = SamplingParams | Mapping[str, Any] | None


def _samples(sampling_params: Sampling) -> int:
    if sampling_params is None:
        return 1
    if isinstance(sampling_params, SamplingParams):
        return sampling_params.n
    return SamplingParams.from_dict(dict(sampling_params)).n  # validates here, before any routing


class RolloutRouter:
    """asyncio client that spreads requests over replicas and keeps a prompt's samples on one of them.

    ``addresses`` are the replicas' "host:port"; ``prefix_tokens`` and ``balance_slack`` are the
    routing rule's (see ``integrations.ray.routing``). Use it from one event loop.
    """

    def __init__(self, addresses: Sequence[str], *, token: str | None = None, prefix_tokens: int = 256,
                 balance_slack: int = 32, timeout: float | None = None) -> None:
        if not addresses:
            raise InvalidArgumentError("at least one replica is needed", field="addresses")
        self.addresses = list(addresses)
        self.policy = PrefixAffinityPolicy(len(self.addresses), prefix_tokens=prefix_tokens,
                                           balance_slack=balance_slack)
        self._token = token
        self._timeout = timeout
        self._clients: list[AsyncRolloutClient] | None = None
        self._where: dict[str, int] = {}  # request id -> replica, while in flight

    @property
    def clients(self) -> list[AsyncRolloutClient]:
        """One client per replica (channels are made on first use, inside the running loop)."""
        if self._clients is None:
            self._clients = [AsyncRolloutClient(a, token=self._token, timeout=self._timeout) for a in self.addresses]
        return self._clients

    async def close(self) -> None:
        """Close every replica's channel."""
        if self._clients is not None:
            await asyncio.gather(*(c.close() for c in self._clients))
            self._clients = None

    async def __aenter__(self) -> RolloutRouter:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until every replica answers SERVING."""
        await asyncio.gather(*(c.wait_ready(timeout) for c in self.clients))

    # ------------------------------------------------------------------ generation
    async def generate(self, prompt: Prompt | None = None, sampling_params: Sampling = None, *,
                       input_ids: Sequence[int] | None = None, text: str | None = None,
                       request_id: str | None = None, **kwargs: Any) -> list[GenerateOutput]:
        """The ``n`` samples of one prompt, all from one replica; ``kwargs`` as ``AsyncRolloutClient.generate``."""
        given = [p for p in (prompt, input_ids, text) if p is not None]
        if len(given) != 1:
            raise InvalidArgumentError("give exactly one prompt: token ids or text", field="prompt")
        n = _samples(sampling_params)
        request_id = request_id or uuid.uuid4().hex
        replica = self.policy.choose(given[0], n)
        self._where[request_id] = replica
        try:
            return await self.clients[replica].generate(given[0], sampling_params, request_id=request_id, **kwargs)
        finally:
            self._where.pop(request_id, None)
            self.policy.finished(replica, n)

    async def generate_batch(self, prompts: Sequence[Prompt], sampling_params: Sampling = None, *,
                             max_concurrency: int = 256, **kwargs: Any) -> list[GenerateOutput]:
        """Many prompts concurrently, each routed on its own; ``n`` outputs per prompt, prompt-major.

        If one prompt fails the others are cancelled (which aborts them on their replicas).
        """
        gate = asyncio.Semaphore(max(1, max_concurrency))

        async def one(p: Prompt) -> list[GenerateOutput]:
            async with gate:
                return await self.generate(p, sampling_params, **kwargs)

        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [o for outs in results for o in outs]

    async def abort(self, request_ids: Sequence[str] | str | None = None) -> None:
        """Abort requests by id on the replicas running them, or every request everywhere (None)."""
        if request_ids is None:
            await asyncio.gather(*(c.abort(None) for c in self.clients))
            return
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        per: dict[int, list[str]] = {}
        for rid in ids:
            if rid in self._where:
                per.setdefault(self._where[rid], []).append(rid)
        await asyncio.gather(*(self.clients[r].abort(rs) for r, rs in per.items()))

    # ------------------------------------------------------------------ control of every replica
    async def pause(self, mode: PauseMode | str = PauseMode.ABORT) -> None:
        """Pause every replica."""
        await asyncio.gather(*(c.pause(mode) for c in self.clients))

    async def continue_(self) -> None:
        """Resume every replica."""
        await asyncio.gather(*(c.continue_() for c in self.clients))

    async def flush_cache(self) -> None:
        """Drop every replica's prefix cache."""
        await asyncio.gather(*(c.flush_cache() for c in self.clients))

    async def get_info(self) -> list[EngineInfo]:
        """Each replica's state, in replica order."""
        return list(await asyncio.gather(*(c.get_info() for c in self.clients)))
