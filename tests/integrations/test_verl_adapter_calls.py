"""The verl adapter sends an update's buckets as calls of one update: a bucket refused after earlier
ones were written leaves the server refusing to generate, never serving a mix of two versions."""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from integrations.verl.adapter import ServerAdapter  # noqa: E402
from rollout import Engine, SamplingParams  # noqa: E402
from rollout.errors import RolloutError  # noqa: E402
from rollout.models.loader import iter_checkpoint  # noqa: E402


class _Remote:
    def __init__(self, fn) -> None:
        self.remote = fn


class _Server:
    """The server actor's global-step calls the adapter makes."""

    def __init__(self) -> None:
        async def none(*_):
            return None

        self.set_global_steps = _Remote(none)
        self.get_global_steps = _Remote(none)


def _adapter(engine: Engine, bucket_mb: int) -> ServerAdapter:
    adapter = ServerAdapter.__new__(ServerAdapter)  # no Ray actor: the engine in this process serves
    adapter.is_leader_rank = True
    adapter._client = engine
    adapter._server = _Server()
    adapter.config = types.SimpleNamespace(
        checkpoint_engine=types.SimpleNamespace(update_weights_bucket_megabytes=bucket_mb))
    return adapter


def test_a_bucket_refused_mid_update_leaves_the_server_refusing(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("qwen3", vocab_size=4096, hidden_size=128)  # a 2 MB embedding: several buckets
    good = [(n, t * 1.1) for n, t in iter_checkpoint(model_dir)]
    bad = [x for x in good if x[0] != "model.norm.weight"] + [("model.norm.weight", torch.ones(3))]
    sp = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    with Engine(model_dir, max_total_tokens=1024) as engine:
        with pytest.raises(RolloutError):
            asyncio.run(_adapter(engine, 1).update_weights(iter(bad), global_steps=7))
        info = engine.info()
        assert not info.weights_valid and info.weight_version == 0
        with pytest.raises(RolloutError, match="weights are invalid"):
            engine.generate([1, 2, 3], sp)
        asyncio.run(_adapter(engine, 1).update_weights(iter(good), global_steps=8))
        assert engine.info().weights_valid
        assert engine.generate([1, 2, 3], sp)[0].weight_versions == [8] * 3


@pytest.mark.parametrize("rank, leads", [(0, True), (1, False), (2, True), (3, False)])
def test_one_worker_of_a_replica_leads_also_when_verl_gives_the_replica(monkeypatch, rank: int, leads: bool) -> None:
    """verl builds every worker of a replica with its replica_rank: all of them led, and each pushed
    every update (and each release / resume) to the one server."""
    monkeypatch.setenv("RANK", str(rank))
    adapter = ServerAdapter(types.SimpleNamespace(tensor_model_parallel_size=2), None, None, replica_rank=0)
    assert adapter.replica_rank == 0 and adapter.is_leader_rank is leads
