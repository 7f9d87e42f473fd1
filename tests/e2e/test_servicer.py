"""The servicer under faults, over real gRPC, with a scripted engine in place of the engine process."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import grpc
import pytest

from rollout.client import AsyncRolloutClient
from rollout.engine.messages import Continue, GetInfo, Pause
from rollout.engine.request_validation import RequestLimits
from rollout.errors import RolloutError
from rollout.server.servicer import RolloutServicer, add_to_server
from rollout.types import FinishReason, PauseMode, StreamChunk


class ScriptedEngine:
    """Stands in for ``EngineClient``: prompt [1, ...] fails mid-stream, others count up slowly."""

    limits = RequestLimits(vocab_size=100, context_length=4096, max_total_tokens=100_000)
    tokenizer = None

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.aborted: list[list[str] | None] = []

    def abort(self, request_ids: list[str] | None) -> None:
        self.aborted.append(request_ids)

    async def acall(self, command: Any) -> Any:
        if isinstance(command, GetInfo):
            raise RuntimeError("info exploded")
        self.calls.append(command)

    async def quiesce(self, timeout: float = 2.0) -> bool:
        return True

    async def astream(self, req) -> AsyncIterator[StreamChunk]:
        done = False
        try:
            for i in range(req.sampling.max_new_tokens):
                if req.input_ids[0] == 1 and i == 1:
                    raise ZeroDivisionError("step exploded")
                yield StreamChunk(req.request_id, 0, [i])
                await asyncio.sleep(0.01)
            n = req.sampling.max_new_tokens
            done = True
            yield StreamChunk(req.request_id, 0, [], finished=True, finish_reason=FinishReason.LENGTH,
                              prompt_tokens=len(req.input_ids), completion_tokens=n)
        finally:
            if not done:
                self.aborted.append([req.request_id])


async def _scenario() -> None:
    server = grpc.aio.server()
    servicer = RolloutServicer()
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    engine = ScriptedEngine()
    try:
        async with AsyncRolloutClient(f"127.0.0.1:{port}", timeout=10) as client:
            # Before the engine is attached (model loading): UNAVAILABLE, with the reason.
            with pytest.raises(RolloutError) as info:
                await client.get_info()
            assert info.value.code == "UNAVAILABLE" and "loading" in str(info.value)
            servicer.attach(engine)

            # An unexpected exception in a unary handler: INTERNAL with its message, server lives on.
            with pytest.raises(RolloutError) as info:
                await client.get_info()
            assert info.value.code == "INTERNAL" and "RuntimeError: info exploded" in str(info.value)
            await client.pause("retract")
            await client.continue_()
            assert engine.calls == [Pause(PauseMode.RETRACT), Continue()]

            # ... and in the middle of a stream.
            got = []
            with pytest.raises(RolloutError) as info:
                async for chunk in client.stream([1, 2], {"max_new_tokens": 5}):
                    got.append(chunk)
            assert info.value.code == "INTERNAL" and "step exploded" in str(info.value)
            assert [c.token_ids for c in got] == [[0]]
            [out] = await client.generate([2, 3], {"max_new_tokens": 3})
            assert out.output_ids == [0, 1, 2] and out.finish_reason == FinishReason.LENGTH

            # A client that stops reading cancels the call; the engine request is aborted.
            async for chunk in client.stream([5, 6], {"max_new_tokens": 1000}, request_id="leaver"):
                if chunk.token_ids == [2]:
                    break
            for _ in range(200):
                if ["leaver"] in engine.aborted:
                    break
                await asyncio.sleep(0.01)
            assert ["leaver"] in engine.aborted

            # After begin_shutdown new generations are refused.
            servicer.begin_shutdown()
            with pytest.raises(RolloutError) as info:
                await client.generate([2, 3], {"max_new_tokens": 3})
            assert info.value.code == "UNAVAILABLE" and "shutting down" in str(info.value)
    finally:
        await server.stop(None)


def test_servicer_faults_map_to_statuses_and_the_server_keeps_serving():
    asyncio.run(_scenario())
