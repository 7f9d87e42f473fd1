"""Cancel, abort and pause / continue through a real server."""

from __future__ import annotations

import asyncio
import time

import pytest

from rollout.client import AsyncRolloutClient
from rollout.types import FinishReason, PauseMode, SamplingParams
from tests.waiting import WAIT_S, StreamReader

LONG = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)


def _kv_in_use(client) -> bool:
    info = client.get_info()
    return info.num_running > 0 and info.kv_used_tokens > 0


def test_client_cancel_frees_kv(client, server, token, idle):
    idle()
    stream = client.stream([1, 2, 3, 4, 5], LONG)
    for _ in range(3):
        next(stream)
    assert _kv_in_use(client)
    stream.close()  # cancels the call: the server aborts the request
    idle()

    async def cancel_async() -> None:
        async with AsyncRolloutClient(server.address, token=token) as ac:
            got = asyncio.Event()

            async def consume() -> None:
                async for _ in ac.stream([6, 7, 8], LONG):
                    got.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(got.wait(), WAIT_S)
            assert (await ac.get_info()).num_running == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(cancel_async())
    idle()


def test_abort_by_id_and_all(client, idle):
    idle()
    reader = StreamReader(client.stream([9, 8, 7], LONG, request_id="abort-me"))
    reader.wait_tokens()
    client.abort("abort-me")
    reader.join()
    assert reader.last.finish_reason == FinishReason.ABORT
    assert 0 < len(reader.ids) < LONG.max_new_tokens and reader.last.completion_tokens == len(reader.ids)
    idle()

    readers = [StreamReader(client.stream([i + 1, i + 2], LONG)) for i in range(3)]
    for r in readers:
        r.wait_tokens()
    client.abort()  # all
    for r in readers:
        r.join()
        assert r.last.finish_reason == FinishReason.ABORT and len(r.ids) < LONG.max_new_tokens
    idle()


@pytest.mark.parametrize("mode", [PauseMode.RETRACT, PauseMode.IN_PLACE])
def test_pause_then_continue_gives_uninterrupted_tokens(client, engine, idle, mode):
    sp = SamplingParams(temperature=0.0, max_new_tokens=300, ignore_eos=True)
    prompt = [11, 22, 33, 44, 55, 66]
    [expected] = engine.generate(input_ids=prompt, sampling_params=sp, return_logprob=True)
    idle()
    reader = StreamReader(client.stream(prompt, sp))
    reader.wait_tokens()
    client.pause(mode)
    try:
        info = client.get_info()
        assert info.paused and info.pause_mode == mode.value
        if mode is PauseMode.IN_PLACE:
            assert info.num_paused == 1 and info.kv_used_tokens > 0
        else:
            assert info.num_running == 0 and info.num_waiting == 1
        # Nothing moves while paused.
        time.sleep(0.1)
        frozen = len(reader.ids)
        time.sleep(0.3)
        assert len(reader.ids) == frozen < sp.max_new_tokens
    finally:
        client.continue_()
    reader.join()
    assert reader.ids == expected.output_ids
    assert reader.last.finish_reason == FinishReason.LENGTH
    assert not client.get_info().paused
    idle()


def test_pause_abort_returns_partial_and_new_requests_wait(client, idle):
    idle()
    reader = StreamReader(client.stream([3, 1, 4, 1, 5], LONG))
    reader.wait_tokens()
    client.pause("abort")
    try:
        reader.join()
        assert reader.last.finish_reason == FinishReason.ABORT and len(reader.ids) < LONG.max_new_tokens
        # A request sent while paused waits in the queue until continue.
        waiting = StreamReader(
            client.stream([2, 7, 1, 8], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
        )
        deadline = time.monotonic() + 10
        while (info := client.get_info()).num_waiting != 1:
            assert time.monotonic() < deadline, (
                f"a request sent while paused is not queued by the server: {info.num_waiting} waiting, "
                f"{info.num_running} running")
            time.sleep(0.02)
        assert waiting.ids == [] and waiting.last is None
    finally:
        client.continue_()
    waiting.join()
    assert len(waiting.ids) == 4 and waiting.last.finish_reason == FinishReason.LENGTH
    idle()


def test_pause_without_a_mode_aborts(client, server, token, idle):
    """A PauseGeneration that leaves ``mode`` unset (the proto default, UNSPECIFIED) pauses in ABORT mode."""
    import grpc

    from protos import rollout_pb2 as pb
    from protos import rollout_pb2_grpc

    idle()
    reader = StreamReader(client.stream([3, 1, 4, 1, 5], LONG))
    reader.wait_tokens()
    with grpc.insecure_channel(server.address) as channel:
        stub = rollout_pb2_grpc.RolloutStub(channel)
        try:
            stub.PauseGeneration(pb.PauseGenerationRequest(), metadata=(("authorization", f"Bearer {token}"),),
                                 timeout=30)
            info = client.get_info()
            assert info.paused and info.pause_mode == PauseMode.ABORT.value
            reader.join()
            assert reader.last.finish_reason == FinishReason.ABORT and len(reader.ids) < LONG.max_new_tokens
        finally:
            client.continue_()
    idle()
