"""Weight updates and memory release / resume through real server processes over gRPC."""

from __future__ import annotations

import pytest

import weight_sync
from rollout.client import RolloutClient
from rollout.errors import FailedPreconditionError, InvalidArgumentError
from rollout.types import PauseMode, SamplingParams
from tests.unit.test_weight_sync import GREEDY, PROMPTS, expected, perturbed  # noqa: F401 (fixtures)
from tests.waiting import DeadlineClient

BUCKET = 16 << 10  # several buckets for the tiny model


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> str:
    return tiny_model


@pytest.fixture(scope="module")
def two_servers(start_server, model_dir):
    servers = [start_server("--model", model_dir, "--max-total-tokens", "4096") for _ in range(2)]
    clients = [DeadlineClient(s.address) for s in servers]
    yield clients
    for c in clients:
        c.close()


def greedy(client: RolloutClient) -> list[list[int]]:
    return [o.output_ids for o in client.generate_batch(PROMPTS, GREEDY)]


def test_gloo_push_to_two_servers_then_disk_and_shared_memory(two_servers, model_dir, perturbed, expected):
    weights, new_dir = perturbed
    for c in two_servers:
        assert greedy(c) == expected["old"]
    # One group: the trainer (this process, rank 0) and both servers' engines.
    with weight_sync.connect(two_servers, backend="gloo", master_address="127.0.0.1", bucket_bytes=BUCKET,
                             timeout_s=60) as group:
        assert group.push(weights.items(), version=7) == 7
    for c in two_servers:
        assert greedy(c) == expected["new"]
        info = c.get_info()
        assert info.weight_version == 7 and info.weights_valid
        out = c.generate(PROMPTS[0], GREEDY)[0]
        assert set(out.weight_versions) == {7}
    # Back to the original weights from disk, then forward again through shared memory.
    a, b = two_servers
    assert a.update_weights_from_disk(model_dir, version=8) == 8
    assert greedy(a) == expected["old"]
    assert weight_sync.push_tensors_shm([a], weights.items(), version=9, bucket_bytes=BUCKET) == 9
    assert greedy(a) == expected["new"]
    # A wrong shape is refused by name and the weights keep serving; (1, hidden) too, which would broadcast.
    for cut in (slice(None, -1), slice(None, 1)):
        bad = {n: (t[cut] if n.endswith("lm_head.weight") else t) for n, t in weights.items()}
        with pytest.raises(InvalidArgumentError, match="lm_head.weight"):
            weight_sync.push_tensors_shm([b], bad.items(), version=10, bucket_bytes=BUCKET)
        assert greedy(b) == expected["new"] and b.get_info().weight_version == 7


def test_release_resume_cycle_over_grpc(two_servers, model_dir, expected):
    c = two_servers[0]
    c.update_weights_from_disk(model_dir)
    before = greedy(c)
    assert before == expected["old"]
    stream = c.stream(PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True))
    next(stream)  # the request is running now
    with pytest.raises(FailedPreconditionError, match="pause"):
        c.release_memory(["kv_cache"])
    stream.close()  # cancelling the stream aborts the request
    c.pause(PauseMode.ABORT)
    states = c.release_memory(["kv_cache", "weights"])
    assert states["kv_cache"]["state"] == "released" and states["weights"]["state"] == "released"
    with pytest.raises(FailedPreconditionError, match="kv_cache"):
        c.generate(PROMPTS[0], GREEDY)
    with pytest.raises(InvalidArgumentError, match="tag"):
        c.release_memory(["optimizer"])
    c.resume_memory(["weights"])
    c.resume_memory(["weights"])  # twice is harmless
    c.update_weights_from_disk(model_dir)  # no backup: the weights come back by an update
    c.resume_memory(["kv_cache"])
    c.continue_()
    info = c.get_info()
    assert all(m["state"] == "active" for m in info.memory.values())
    assert greedy(c) == before


def test_swap_updates_over_grpc(two_servers, model_dir, perturbed, expected):
    import asyncio

    from rollout.async_client import AsyncRolloutClient
    from rollout.types import SwapResult

    weights, new_dir = perturbed
    a, b = two_servers
    for c in two_servers:
        assert c.update_weights_from_disk(model_dir, version=20, swap=True) == SwapResult(20, swapped=True)
        assert greedy(c) == expected["old"]
    with weight_sync.connect(two_servers, backend="gloo", master_address="127.0.0.1", bucket_bytes=BUCKET,
                             timeout_s=60) as group:
        assert group.push(weights.items(), version=21, swap=True) == SwapResult(21, swapped=True)
    assert greedy(a) == expected["new"] and greedy(b) == expected["new"]
    assert weight_sync.push_tensors_shm([b], weights.items(), version=22, swap=True) == SwapResult(22, swapped=True)

    async def back_to_old() -> SwapResult:
        async with AsyncRolloutClient(a.target, timeout=60) as ac:
            return await ac.update_weights_from_disk(model_dir, version=23, swap=True)

    assert asyncio.run(back_to_old()) == SwapResult(23, swapped=True)
    assert greedy(a) == expected["old"] and a.get_info().weights_valid


def test_a_server_started_with_a_weights_backup_keeps_them_over_a_release(start_server, model_dir, expected):
    """``--memory-backup-tags weights``: released weights come back on resume and generate as before
    (without the flag a release over gRPC always left them invalid). One tag may be a plain string."""
    server = start_server("--model", model_dir, "--max-total-tokens", "4096", "--memory-backup-tags", "weights")
    with DeadlineClient(server.address) as c:
        assert greedy(c) == expected["old"]
        c.pause(PauseMode.RETRACT)
        assert c.release_memory("weights")["weights"]["state"] == "released"
        assert c.resume_memory("weights")["weights"]["state"] == "active"
        c.continue_()
        assert c.get_info().weights_valid
        assert greedy(c) == expected["old"]
        with pytest.raises(InvalidArgumentError, match="tags"):
            c.release_memory(5)  # type: ignore[arg-type]
