"""Delivery of a request's events to an asyncio stream (``EngineClient.astream``), with a stand-in
engine loop: every event arrives, in order, whether it came before the consumer waited or while it
waited; a consumer cancelled while waiting leaves no waiter behind; and the delivery example runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from rollout.engine.messages import Abort, AddRequest
from rollout.testing.stand_in_loop import StandInLoop
from rollout.types import SamplingParams, StreamChunk

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _chunk(rid: str, token: int, finished: bool = False) -> StreamChunk:
    return StreamChunk(rid, 0, [token], finished=finished)


def test_events_before_and_during_the_wait_all_arrive_in_order():
    engine = StandInLoop()
    client = engine.client()

    async def main() -> list[int]:
        got = []
        stream = client.astream(AddRequest("a", [1], SamplingParams(max_new_tokens=8), stream=True))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)  # submitted and waiting on an empty stream
        engine.inbox.put([_chunk("a", 0)])
        got += (await first).token_ids
        # Several steps land before the consumer asks again: taken without another wait, in order.
        for t in range(1, 4):
            engine.inbox.put([_chunk("a", t)])
        await asyncio.sleep(0.1)
        engine.inbox.put([_chunk("a", 4), _chunk("a", 5, finished=True)])
        async for chunk in stream:
            got += chunk.token_ids
        return got

    try:
        assert asyncio.run(main()) == [0, 1, 2, 3, 4, 5]
    finally:
        client.shutdown()


def test_a_consumer_cancelled_while_waiting_aborts_and_leaves_no_waiter():
    engine = StandInLoop()
    client = engine.client()

    async def main() -> None:
        async def consume() -> None:
            async for _ in client.astream(AddRequest("b", [1], SamplingParams(max_new_tokens=8), stream=True)):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        (sink,) = client._open_streams
        assert sink.waiter is not None and not sink.waiter.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sink.waiter is None and not client._open_streams
        engine.inbox.put([_chunk("b", 0)])  # a step already in flight: handed to nobody, no error
        await asyncio.sleep(0.05)

    try:
        asyncio.run(main())
        assert any(isinstance(c, Abort) and c.request_ids == ["b"] for c in engine.sent)
    finally:
        client.shutdown()


def test_the_delivery_example_runs():
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "profile_stream_delivery.py"),
                          "--batch", "4", "--steps", "20", "--repeats", "1"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "batch     4:" in out.stdout and "us per token" in out.stdout
