"""A server started with --disable-control, then stopped with SIGTERM while streams run."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from rollout.errors import RolloutError
from rollout.types import FinishReason, SamplingParams
from tests.waiting import DeadlineClient


@pytest.fixture(scope="module")
def locked_server(start_server, tiny_model):
    return start_server("--model", tiny_model, "--disable-control", "--http-port", "0")


def test_control_rpcs_are_denied_when_disabled(locked_server):
    with DeadlineClient(locked_server.address) as c:
        for call in (
            lambda: c.pause("in_place"),
            c.continue_,
            c.flush_cache,
            lambda: c.update_weights_from_disk("/tmp/x"),
            c.release_memory,
            c.resume_memory,
            lambda: c.init_weight_update_group("127.0.0.1", 29500, 1, 2),
            c.rebalance_experts,
        ):
            with pytest.raises(RolloutError) as info:
                call()
            assert info.value.code == "PERMISSION_DENIED" and "--disable-control" in str(info.value)
        # Generation, info and abort stay available.
        [out] = c.generate([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
        assert len(out.output_ids) == 3
        assert not c.get_info().paused
        c.abort()


def test_sigterm_aborts_running_streams_and_exits(locked_server):
    children = locked_server.children()
    assert locked_server.engine_pid() in children
    sp = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
    body = {"model": "any", "prompt": [1, 2, 3], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    body["model"] = httpx.get(f"{locked_server.http_url}/v1/models").json()["data"][0]["id"]
    with DeadlineClient(locked_server.address) as c, httpx.Client(timeout=30) as http, \
            http.stream("POST", f"{locked_server.http_url}/v1/completions", json=body) as reply:
        events = reply.iter_lines()
        assert next(events).startswith("data: ")
        streams = [c.stream([i + 1, i + 2, i + 3], sp) for i in range(3)]
        received = [list(next(s).token_ids) for s in streams]
        locked_server.proc.send_signal(signal.SIGTERM)
        # The HTTP stream ends too, with its partial output and reason abort.
        data = [json.loads(line[6:]) for line in events if line.startswith("data: {")]
        assert data[-1]["choices"][0]["finish_reason"] == "abort"
        for ids, stream in zip(received, streams):
            last = None
            for ch in stream:
                ids += ch.token_ids
                last = ch if ch.finished else last
            assert last is not None and last.finish_reason == FinishReason.ABORT
            assert 0 < len(ids) < sp.max_new_tokens and last.completion_tokens == len(ids)
    assert locked_server.proc.wait(30) == 0
    assert "server stopped" in locked_server.log()
    deadline = time.monotonic() + 10
    for pid in children:
        while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            assert time.monotonic() < deadline, f"engine process {pid} outlived the server"
            time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_engine_death_fails_streams_and_stops_the_server(start_server, tiny_model):
    server = start_server("--model", tiny_model)
    engine_pid = server.engine_pid()
    sp = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
    with DeadlineClient(server.address) as c:
        stream = c.stream([5, 6, 7], sp)
        next(stream)
        os.kill(engine_pid, signal.SIGKILL)
        with pytest.raises(RolloutError) as info:
            for _ in stream:
                pass
        assert info.value.code == "UNAVAILABLE"
    # The server does not linger without its engine: it exits non-zero, saying why.
    assert server.proc.wait(30) == 1
    assert "engine process died" in server.log()


def test_a_killed_front_end_takes_its_engine_ranks_with_it(start_server, tiny_model):
    """SIGKILL of the server's front end (no chance to stop its children): both engine ranks exit
    within seconds, instead of polling and waiting in a collective while holding their memory."""
    server = start_server("--model", tiny_model, "--tp-size", "2")
    m = re.search(r"engine ranks 0\.\.1 run as processes (\d+) (\d+)", server.log())
    assert m, server.log()
    ranks = [int(m.group(1)), int(m.group(2))]
    server.proc.kill()
    server.proc.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_state(p) not in ("gone", "Z") for p in ranks):
        time.sleep(0.2)
    left = [p for p in ranks if _state(p) not in ("gone", "Z")]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"engine ranks {left} outlived their front end"


def test_the_watch_compares_with_the_pid_it_was_given():
    """A rank whose start outlasted its front end is already re-parented when the watch begins: the
    watch checks the pid the front end passed down, so it exits at once."""
    import subprocess
    import sys

    from tests.e2e.conftest import REPO_ROOT

    code = ("import time\nfrom rollout.engine.parent_watch import exit_with_parent\n"
            "exit_with_parent(parent=-1, poll_s=0.05)\ntime.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 1, proc.stderr[-2000:]
