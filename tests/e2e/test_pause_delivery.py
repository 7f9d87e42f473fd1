"""Once a pause returns, no token arrives until generation continues: in process and over gRPC.

A pause drains the step in flight; that step's tokens must reach the consumers before the pause's
reply, or a trainer that pauses, reads its streams and pushes weights would see tokens trickle in
after it believed generation had stopped.
"""

from __future__ import annotations

import asyncio

from rollout.client import AsyncRolloutClient
from rollout.engine.messages import AddRequest, Continue, Pause
from rollout.engine.process import start_engine_thread
from rollout.types import PauseMode, SamplingParams

LONG = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
STREAMS = 8


async def _count_while_paused(stream_of, pause, resume, in_transit: bool = False) -> None:
    """Stream ``STREAMS`` requests, pause, and check that no token arrives until ``resume``.

    ``in_transit`` (over gRPC): the server writes the drained step's chunks before it replies to the
    pause, but each stream is its own call, and the client's tasks may read the pause's reply before
    those chunks. So up to one token per stream (the drained step's) may still arrive in the first
    moments after the reply; after that, none."""
    received = [0] * STREAMS

    async def consume(i: int) -> None:
        async for chunk in stream_of(i):
            received[i] += len(chunk.token_ids)

    tasks = [asyncio.ensure_future(consume(i)) for i in range(STREAMS)]
    while min(received) < 3:
        await asyncio.sleep(0.01)
    for mode in (PauseMode.IN_PLACE, PauseMode.RETRACT):
        await pause(mode)
        replied = list(received)
        if in_transit:
            await asyncio.sleep(0.3)
            assert all(0 <= b - a <= 1 for a, b in zip(replied, received)), (
                f"more than the drained step's token arrived after the {mode.value} pause: {replied} -> {received}")
        at_pause = list(received)
        await asyncio.sleep(0.5)
        assert received == at_pause, (
            f"tokens arrived after the {mode.value} pause returned: {at_pause} -> {received}")
        await resume()
        while received == at_pause:
            await asyncio.sleep(0.01)
    await pause(PauseMode.ABORT)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)


def test_no_token_after_pause_in_process(tiny_model) -> None:
    client = start_engine_thread(tiny_model, device="cpu", dtype="float32")
    try:
        def stream_of(i: int):
            return client.astream(AddRequest(f"r{i}", [i + 1, i + 2, i + 3], LONG, stream=True))

        async def pause(mode: PauseMode) -> None:
            await client.acall(Pause(mode))

        async def resume() -> None:
            await client.acall(Continue())

        asyncio.run(_count_while_paused(stream_of, pause, resume))
    finally:
        client.shutdown()


def test_no_token_after_pause_over_grpc(server, token) -> None:
    async def main() -> None:
        async with AsyncRolloutClient(server.address, token=token, timeout=30) as client:
            await _count_while_paused(lambda i: client.stream([i + 1, i + 2, i + 3], LONG),
                                      client.pause, client.continue_, in_transit=True)
            await client.continue_()

    asyncio.run(main())
