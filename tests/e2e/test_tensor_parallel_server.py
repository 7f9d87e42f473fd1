"""A ``rollout serve --tp-size 2`` server (two gloo ranks on CPU): weight pushes and a dead rank."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

import weight_sync
from rollout.errors import RolloutError
from rollout.types import SamplingParams
from tests.unit.test_weight_sync import GREEDY, PROMPTS, expected, perturbed  # noqa: F401 (fixtures)
from tests.waiting import DeadlineClient, process_running

BUCKET = 16 << 10  # several buckets for the tiny model


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> str:
    return tiny_model


def rank_pids(server) -> list[int]:
    m = re.search(r"engine ranks 0\.\.1 run as processes (\d+) (\d+)", server.log())
    assert m, server.log()
    return [int(m.group(1)), int(m.group(2))]


def test_pushes_land_in_every_rank_of_a_two_rank_server(start_server, model_dir, perturbed, expected):
    weights, new_dir = perturbed
    server = start_server("--model", model_dir, "--tp-size", "2", "--max-total-tokens", "4096")
    with DeadlineClient(server.address) as c:
        assert [o.output_ids for o in c.generate_batch(PROMPTS, GREEDY)] == expected["old"]
        info = c.get_info()
        assert info.tp_size == 2 and len(info.rank_memory) == 2
        # The trainer (rank 0) and both engine ranks (1 and 2) form one group.
        with weight_sync.connect([c], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            assert group.comm.cfg.world_size == 3
            assert group.push(weights.items(), version=5) == 5
            outs = c.generate_batch(PROMPTS, GREEDY)
            assert [o.output_ids for o in outs] == expected["new"]
            assert all(v == 5 for o in outs for v in o.weight_versions)
        assert c.update_weights_from_disk(model_dir, version=6) == 6
        assert [o.output_ids for o in c.generate_batch(PROMPTS, GREEDY)] == expected["old"]


def test_a_killed_rank_makes_the_server_unavailable_and_exit(start_server, model_dir):
    server = start_server("--model", model_dir, "--tp-size", "2")
    rank0, rank1 = rank_pids(server)
    sp = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
    with DeadlineClient(server.address) as c:
        stream = c.stream([5, 6, 7], sp)
        next(stream)
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(RolloutError) as info:
            for _ in stream:
                pass
        assert info.value.code == "UNAVAILABLE"
        assert time.monotonic() - killed < 10
    # The server does not linger without a rank, and takes rank 0 down with it.
    assert server.proc.wait(30) == 1
    assert "engine process died" in server.log()
    deadline = time.monotonic() + 10
    while process_running(rank0):
        assert time.monotonic() < deadline, "rank 0 outlived the server"
        time.sleep(0.05)
