"""How the clients fail: within the timeout they were given, fast and aborting the rest of a batch,
and with typed errors a training script can catch (never a bare asyncio.CancelledError)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import pytest

from rollout.client import AsyncRolloutClient, RolloutClient
from rollout.errors import DeadlineExceededError, InvalidArgumentError, RolloutError, UnavailableError

LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 1.0}


@pytest.fixture
def silent_server():
    """An address that accepts TCP and never answers (a hung server)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def test_wait_ready_returns_within_its_timeout(silent_server) -> None:
    with RolloutClient(silent_server) as c:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            c.wait_ready(timeout=1.0)
        assert time.monotonic() - t0 < 2.5

    async def run() -> float:
        async with AsyncRolloutClient(silent_server) as c:
            t0 = time.monotonic()
            with pytest.raises(UnavailableError):
                await c.wait_ready(timeout=1.0)
            return time.monotonic() - t0

    assert asyncio.run(run()) < 2.5


def test_a_batch_fails_as_soon_as_one_prompt_does(server, token, idle) -> None:
    """With the server paused, prompt 0 waits; prompt 1 is refused at once, and the batch raises
    that without waiting for prompt 0, which it aborts."""
    box: dict = {}
    with RolloutClient(server.address, token=token) as c:
        c.pause("in_place")
        try:
            def run() -> None:
                try:
                    box["out"] = c.generate_batch([[1, 2, 3], [10**6]], {"max_new_tokens": 8})
                except BaseException as e:  # noqa: BLE001 - checked below
                    box["err"] = e

            t = threading.Thread(target=run, daemon=True)
            t.start()
            t.join(5)
            blocked = t.is_alive()
        finally:
            c.continue_()
        t.join(30)
    assert not blocked, "the batch waited on prompt 0 after prompt 1 had failed"
    assert isinstance(box.get("err"), InvalidArgumentError)
    idle()


def test_a_deadline_is_a_typed_timeout(client, idle) -> None:
    client.pause("in_place")  # the request waits past its deadline however fast the model is
    try:
        with pytest.raises(DeadlineExceededError, match="ran past the timeout") as err:
            client.generate([1, 2, 3], {"max_new_tokens": 4}, timeout=0.5)
    finally:
        client.continue_()
    assert isinstance(err.value, TimeoutError) and err.value.code == "DEADLINE_EXCEEDED"
    idle()


def test_closing_the_async_client_fails_its_calls_with_an_error(server, token, client, idle) -> None:
    async def run() -> list:
        c = AsyncRolloutClient(server.address, token=token)

        async def consume() -> None:
            async for _ in c.stream([4, 5, 6], LONG):
                pass

        calls = [asyncio.ensure_future(c.generate([1, 2, 3], LONG)), asyncio.ensure_future(consume())]
        await asyncio.sleep(1.0)
        await c.close()
        return await asyncio.gather(*calls, return_exceptions=True)

    client.pause("in_place")  # the calls are still in flight when the client closes, however fast the model
    try:
        results = asyncio.run(run())
    finally:
        client.continue_()
    for got in results:
        assert isinstance(got, UnavailableError) and "was closed while the call ran" in str(got), repr(got)
        assert isinstance(got, RolloutError)
    idle()


def test_an_async_batch_refuses_one_request_id_for_all_prompts() -> None:
    async def run() -> None:
        async with AsyncRolloutClient("127.0.0.1:1") as c:  # refused before any call is made
            await c.generate_batch([[1, 2], [3, 4]], {"max_new_tokens": 2}, request_id="same")

    with pytest.raises(InvalidArgumentError, match="ids are assigned per prompt"):
        asyncio.run(run())


def _consume_in_thread(c: RolloutClient, params: dict, box: dict, first: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            box["tokens"] = 0
            for chunk in c.stream([4, 5, 6], params):
                box["tokens"] += len(chunk.token_ids)
                first.set()
            box["done"] = True
        except BaseException as e:  # noqa: BLE001 - checked by the tests
            box["err"] = e
            box["at"] = time.monotonic()
        first.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_stream_of_a_frozen_server_fails_within_its_keepalive(server, token, idle) -> None:
    """A server that stops answering without closing the connection (a stopped process, a lost host)
    fails a stream that has no deadline within twice ``keepalive_s``, instead of hanging it."""
    box: dict = {}
    first = threading.Event()
    with RolloutClient(server.address, token=token, keepalive_s=1.0) as c:
        t = _consume_in_thread(c, LONG, box, first)
        assert first.wait(60) and "err" not in box
        os.kill(server.proc.pid, signal.SIGSTOP)  # while tokens flow
        stopped = time.monotonic()
        try:
            t.join(15)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    assert not t.is_alive(), "the stream hung on a frozen server"
    assert isinstance(box.get("err"), UnavailableError), box
    assert box["at"] - stopped < 6.0
    idle()


def test_a_quiet_stream_is_guarded_and_not_ended_by_its_pings(client, server, token, idle) -> None:
    """A stream without tokens for a while (a paused engine) keeps pinging, and the server takes the
    pings without ending the connection (gRPC's default answers frequent pings with GOAWAY); when the
    server then freezes, the quiet stream fails too."""
    box: dict = {}
    first = threading.Event()
    with RolloutClient(server.address, token=token, keepalive_s=1.0) as c:
        client.pause("in_place")
        try:
            t = _consume_in_thread(c, {"max_new_tokens": 8, "ignore_eos": True}, box, first)
            time.sleep(5.0)
            assert "err" not in box, box
        finally:
            client.continue_()
        t.join(60)
        assert box.get("done") and box["tokens"] == 8, box
        box.clear()
        client.pause("in_place")
        try:
            t = _consume_in_thread(c, {"max_new_tokens": 8, "ignore_eos": True}, box, first)
            time.sleep(3.0)
            os.kill(server.proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                t.join(15)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
        finally:
            client.continue_()
    assert not t.is_alive(), "the quiet stream hung on a frozen server"
    assert isinstance(box.get("err"), UnavailableError) and box["at"] - stopped < 6.0, box
    idle()


def test_keepalive_is_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="keepalive_s"):
        RolloutClient("127.0.0.1:1", keepalive_s=0.1)
